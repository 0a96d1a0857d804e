"""The one place where weights, masks and reductions are applied.

Every loss computes per-element (binary) or per-example (softmax) loss terms,
then calls :func:`reduce_loss`. Semantics, identical for every loss:

- ``weights`` multiply each term; they do not enter the mean's denominator.
- ``where`` (False = excluded) removes a term from both numerator and denominator.
- ``denominator_weights`` (class weights of the targets, as in PyTorch's
  ``cross_entropy(weight=...)``) replace the count in the mean's denominator.
- ``"mean"`` over nothing included is 0 with a zero gradient, never NaN.
- Global means (the same two arguments on every loss): ``batch_axis_name`` sums the
  numerator and the denominator over a mesh axis the batch is sharded on (inside
  ``shard_map`` or ``pmap``), so every shard gets the mean over the global batch;
  ``normalizer`` replaces the denominator by a given total (gradient accumulation: the
  micro-batch losses then add up to the full batch's mean, and so do their gradients).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jbce._core import checks


def apply_mask(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """values where mask, 0 elsewhere; the gradient of excluded entries is exactly 0."""
    if mask is None:
        return values
    return jnp.where(mask, values, jnp.zeros((), values.dtype))


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 (with a zero gradient) where den == 0."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), jnp.zeros((), num.dtype))


def global_sum(x, axis_name):
    """The sum of ``x`` (an array or a tuple of them) over the mesh axis ``axis_name``.

    ``x`` itself for ``None``.

    A plain ``psum``, so gradients follow JAX's own convention: inside ``shard_map`` each
    shard's terms get the global loss's gradient; under ``pmap`` (and ``shard_map`` with
    ``check_vma=False``, differentiated inside) the transpose of ``psum`` is a ``psum``, so
    each device's gradient is the axis size times its share, which the usual ``pmean`` of
    the gradients turns back into the global batch's gradient.
    """
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def divide_globally(total, den, *, normalizer=None, batch_axis_name=None):
    """``total / den`` summed over ``batch_axis_name``; ``normalizer`` replaces ``den``."""
    if normalizer is not None:
        total = global_sum(total, batch_axis_name)
        den = jnp.asarray(normalizer, total.dtype)
    else:
        # One collective for both: one all-reduce launch instead of two, and no pair of
        # independent all-reduces that processes could run in different orders.
        total, den = global_sum((total, jnp.asarray(den, total.dtype)), batch_axis_name)
    return safe_divide(total, den)


def reduce_loss(
    values: jax.Array,
    *,
    reduction: str,
    weights: jax.Array | None = None,
    where: jax.Array | None = None,
    denominator_weights: jax.Array | None = None,
    normalizer: jax.Array | float | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
    batch_size: int | None = None,
) -> jax.Array:
    """Applies weights, mask and reduction to per-term losses ``values``.

    Args:
      values: per-term losses, in the compute dtype.
      reduction: ``"none"``, ``"sum"`` or ``"mean"``; ``"batchmean"`` (PyTorch's, for the
        divergences) where ``batch_size`` is given: the sum over ``batch_size``.
      weights: optional multiplier of each term, broadcastable to ``values``.
      where: optional boolean mask broadcastable to ``values``; False excludes a term.
      denominator_weights: optional per-term weight of the mean's denominator
        (defaults to 1 for each included term).
      normalizer: optional denominator of ``"mean"`` in place of the one above: the
        total over a whole batch when this call sees a micro-batch of it.
      batch_axis_name: optional mesh axis (or axes) the batch is sharded on: ``"sum"`` and
        ``"mean"`` sum numerator and denominator over it (``"none"`` is unaffected).
      batch_size: the denominator of ``"batchmean"`` (the size of the first batch axis).

    Returns:
      ``values``'s shape for ``"none"`` (0 where excluded), else a scalar.
    """
    checks.check_reduction(
        reduction, normalizer=normalizer, batch_axis_name=batch_axis_name,
        batchmean=batch_size is not None,
    )  # fmt: skip
    mask = None if where is None else jnp.broadcast_to(where, values.shape)
    # Masked first: an excluded term (NaN or not) then gives its weight a zero gradient too.
    values = apply_mask(values, mask)
    if weights is not None:
        values = values * jnp.broadcast_to(weights, values.shape)
    if reduction == "none":
        return values
    total = jnp.sum(values)
    if reduction == "sum":
        return global_sum(total, batch_axis_name)
    if normalizer is not None or reduction == "batchmean":
        den = batch_size
    elif denominator_weights is None:
        den = values.size if mask is None else jnp.sum(mask, dtype=values.dtype)
    else:
        den = jnp.sum(apply_mask(jnp.broadcast_to(denominator_weights, values.shape), mask))
    return divide_globally(total, den, normalizer=normalizer, batch_axis_name=batch_axis_name)
