"""Information measures behind cross-entropy: entropy and KL divergence (CE = H + KL)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jbce import _checks
from jbce._dtypes import compute_dtype, to_compute
from jbce._softmax import batch_shape, softmax_cross_entropy, to_rows


@jax.custom_vjp
def _neg_xlogx(p: jax.Array) -> jax.Array:
    """-p log p elementwise, with 0 log 0 = 0."""
    # 0 where p == 0; NaN stays NaN.
    return -jnp.where(p == 0, 0, p * jnp.log(jnp.where(p == 0, 1, p)))


def _neg_xlogx_fwd(p):
    # Residual: the input only.
    return _neg_xlogx(p), p


def _neg_xlogx_bwd(p, g):
    # d/dp (-p log p) = -(log p + 1); at p = 0 the log is taken of the smallest normal
    # number instead of 0, so the gradient is large but finite.
    tiny = jnp.finfo(p.dtype).tiny
    return (g * -(jnp.log(jnp.maximum(p, tiny)) + 1),)


_neg_xlogx.defvjp(_neg_xlogx_fwd, _neg_xlogx_bwd)


def entropy(probs: ArrayLike, *, axis: int | Sequence[int] = -1) -> jax.Array:
    r"""Shannon entropy (in nats) of distributions along ``axis``.

    .. math:: H(p) = -\sum_c p_c \log p_c, \qquad 0 \log 0 = 0

    Args:
      probs: float array of probabilities; bf16/fp16 computed in float32.
      axis: the class axis, or a tuple of class axes.

    Returns:
      float32 entropies with the class axes removed. The gradient ``-(log p + 1)`` is
      finite at ``p = 0`` (the log is clamped at the smallest normal float).

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> jbce.entropy(jnp.array([0.5, 0.5, 0.0]))
      Array(0.693147..., dtype=float32)
    """
    probs = _checks.as_array("probs", probs)
    _checks.check_float("probs", probs)
    axes = _checks.canonical_axes(axis, probs.ndim, "probs")
    p = to_rows(to_compute(probs, compute_dtype(probs)), axes)
    _checks.debug_check_unit_interval("probs", p)
    h = jnp.sum(_neg_xlogx(p), axis=-1)
    return h.reshape(batch_shape(probs.shape, axes))


def kl_divergence(
    labels: ArrayLike, logits: ArrayLike, *, axis: int | Sequence[int] = -1
) -> jax.Array:
    r"""KL divergence of ``softmax(logits)`` from the target distribution ``labels``.

    .. math::
        \mathrm{KL}(y \,\|\, \mathrm{softmax}(x)) = \sum_c y_c \log y_c
            - \sum_c y_c \log \mathrm{softmax}(x)_c = \mathrm{CE}(x, y) - H(y)

    So cross-entropy = entropy + KL: minimising either in ``logits`` is the same.
    Note the argument order: target first, as in the notation KL(y || q).

    Args:
      labels: target distributions, same shape as ``logits``.
      logits: float array of unnormalised log-probabilities.
      axis: the class axis, or a tuple of class axes.

    Returns:
      float32 per-example divergences (>= 0) with the class axes removed.

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> jbce.kl_divergence(jnp.array([0.5, 0.5]), jnp.array([0.0, 0.0]))
      Array(0., dtype=float32)
    """
    ce = softmax_cross_entropy(logits, labels, axis=axis, reduction="none")
    labels = _checks.as_array("labels", labels)
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(ce.dtype)
    return ce - entropy(labels, axis=axis).astype(ce.dtype)
