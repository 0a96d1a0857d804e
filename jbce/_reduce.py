"""The one place where weights, masks and reductions are applied.

Every loss computes per-element (binary) or per-example (softmax) loss terms,
then calls :func:`reduce_loss`. Semantics, identical for every loss:

- ``weights`` multiply each term; they do not enter the mean's denominator.
- ``where`` (False = excluded) removes a term from both numerator and denominator.
- ``denominator_weights`` (class weights of the targets, as in PyTorch's
  ``cross_entropy(weight=...)``) replace the count in the mean's denominator.
- ``"mean"`` over nothing included is 0 with a zero gradient, never NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jbce._checks import check_reduction


def apply_mask(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """values where mask, 0 elsewhere; the gradient of excluded entries is exactly 0."""
    if mask is None:
        return values
    return jnp.where(mask, values, jnp.zeros((), values.dtype))


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 (with a zero gradient) where den == 0."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), jnp.zeros((), num.dtype))


def reduce_loss(
    values: jax.Array,
    *,
    reduction: str,
    weights: jax.Array | None = None,
    where: jax.Array | None = None,
    denominator_weights: jax.Array | None = None,
) -> jax.Array:
    """Applies weights, mask and reduction to per-term losses ``values``.

    Args:
      values: per-term losses, in the compute dtype.
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      weights: optional multiplier of each term, broadcastable to ``values``.
      where: optional boolean mask broadcastable to ``values``; False excludes a term.
      denominator_weights: optional per-term weight of the mean's denominator
        (defaults to 1 for each included term).

    Returns:
      ``values``'s shape for ``"none"`` (0 where excluded), else a scalar.
    """
    check_reduction(reduction)
    mask = None if where is None else jnp.broadcast_to(where, values.shape)
    # Masked first: an excluded term (NaN or not) then gives its weight a zero gradient too.
    values = apply_mask(values, mask)
    if weights is not None:
        values = values * jnp.broadcast_to(weights, values.shape)
    if reduction == "none":
        return values
    total = jnp.sum(values)
    if reduction == "sum":
        return total
    if denominator_weights is None:
        den = values.size if mask is None else jnp.sum(mask, dtype=values.dtype)
        den = jnp.asarray(den, values.dtype)
    else:
        den = jnp.sum(apply_mask(jnp.broadcast_to(denominator_weights, values.shape), mask))
    return safe_divide(total, den)
