"""jbce: exact, fast cross-entropy losses for JAX with hand-written gradients."""

from jbce._binary import binary_cross_entropy, sigmoid_binary_cross_entropy, sigmoid_focal_loss
from jbce._gan import discriminator_loss, generator_loss
from jbce._info import entropy, kl_divergence
from jbce._linear import linear_softmax_cross_entropy
from jbce._softmax import softmax_cross_entropy, softmax_cross_entropy_with_integer_labels

__all__ = [
    "binary_cross_entropy",
    "discriminator_loss",
    "entropy",
    "generator_loss",
    "kl_divergence",
    "linear_softmax_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]

__version__ = "0.1.0"
