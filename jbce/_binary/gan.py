"""GAN losses on discriminator logits (Goodfellow et al., 2014), via exact sigmoid BCE."""

from __future__ import annotations

import jax
from jax.typing import ArrayLike

from jbce._binary.api import sigmoid_binary_cross_entropy
from jbce._core import checks


def discriminator_loss(
    real_logits: ArrayLike,
    fake_logits: ArrayLike,
    *,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""Discriminator loss: real samples labelled 1, generated samples labelled 0.

    .. math::
        L_D = \operatorname{mean}\, \mathrm{BCE}(x_\mathrm{real}, 1)
            + \operatorname{mean}\, \mathrm{BCE}(x_\mathrm{fake}, 0)
            = \operatorname{mean} \log(1 + e^{-x_\mathrm{real}})
            + \operatorname{mean} \log(1 + e^{x_\mathrm{fake}})

    Exact for any logit (no ``log(sigmoid)`` underflow) with finite gradients.

    Args:
      real_logits: discriminator logits on real data, any shape.
      fake_logits: discriminator logits on generated data, any shape.
      batch_axis_name: optional mesh axis the batch is sharded on, inside ``shard_map``
        or ``pmap``: the means are then over the global batch.

    Returns:
      A float32 scalar.

    References:
      Goodfellow et al., "Generative Adversarial Nets", NeurIPS 2014.

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> jbce.discriminator_loss(jnp.array([0.0]), jnp.array([0.0]))
      Array(1.386294..., dtype=float32)
    """
    checks.check_float("real_logits", real_logits)
    checks.check_float("fake_logits", fake_logits)
    real = sigmoid_binary_cross_entropy(real_logits, 1.0, batch_axis_name=batch_axis_name)
    fake = sigmoid_binary_cross_entropy(fake_logits, 0.0, batch_axis_name=batch_axis_name)
    return real + fake


def generator_loss(
    fake_logits: ArrayLike, *, batch_axis_name: str | tuple[str, ...] | None = None
) -> jax.Array:
    r"""Non-saturating generator loss: generated samples labelled 1.

    .. math:: L_G = \operatorname{mean}\, \mathrm{BCE}(x_\mathrm{fake}, 1)
                  = \operatorname{mean} \log(1 + e^{-x_\mathrm{fake}})

    Its gradient stays large while the discriminator confidently rejects fakes, unlike
    the saturating :math:`-\mathrm{BCE}(x_\mathrm{fake}, 0)`.

    Args:
      fake_logits: discriminator logits on generated data, any shape.
      batch_axis_name: optional mesh axis the batch is sharded on, inside ``shard_map``
        or ``pmap``: the means are then over the global batch.

    Returns:
      A float32 scalar.

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> jbce.generator_loss(jnp.array([0.0]))
      Array(0.693147..., dtype=float32)
    """
    checks.check_float("fake_logits", fake_logits)
    return sigmoid_binary_cross_entropy(fake_logits, 1.0, batch_axis_name=batch_axis_name)
