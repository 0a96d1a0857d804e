"""jbce: exact, fast cross-entropy losses for JAX with hand-written gradients."""

from importlib import metadata as _metadata

from jbce._binary.api import binary_cross_entropy, sigmoid_binary_cross_entropy, sigmoid_focal_loss
from jbce._binary.gan import discriminator_loss, generator_loss
from jbce._contrastive.api import clip_loss, siglip_loss
from jbce._linear.api import linear_softmax_cross_entropy
from jbce._linear.distill import linear_distillation_loss
from jbce._linear.log_probs import linear_log_probs
from jbce._softmax.api import softmax_cross_entropy, softmax_cross_entropy_with_integer_labels
from jbce._softmax.categorical import categorical_cross_entropy, nll_loss
from jbce._softmax.focal import (
    poly_loss_cross_entropy,
    softmax_focal_loss,
    softmax_focal_loss_with_integer_labels,
)
from jbce._softmax.info import entropy, jensen_shannon_divergence, kl_divergence

__all__ = [
    "binary_cross_entropy",
    "categorical_cross_entropy",
    "clip_loss",
    "discriminator_loss",
    "entropy",
    "generator_loss",
    "jensen_shannon_divergence",
    "kl_divergence",
    "linear_distillation_loss",
    "linear_log_probs",
    "linear_softmax_cross_entropy",
    "nll_loss",
    "poly_loss_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "siglip_loss",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_focal_loss",
    "softmax_focal_loss_with_integer_labels",
]

try:  # the one version: the installed package's metadata (pyproject.toml's)
    __version__ = _metadata.version("jbce")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"
