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

from collections.abc import Callable

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
    if weights is not None:
        values = values * jnp.broadcast_to(weights, values.shape)
    mask = None if where is None else jnp.broadcast_to(where, values.shape)
    values = apply_mask(values, mask)
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


# Below this many terms the fast core's saving is smaller than the cost of the conditional.
FAST_PATH_MIN_SIZE = 2**14
# Softmax losses take the fast path from this many logits: below it the cond and the fast
# path's extra per-row kernels cost about what the max pass saves (bench/NOTES.md 14), so a
# single row traced under vmap(grad(loss)) (per-example gradients) of fewer classes simply
# takes the exact path.
SOFTMAX_FAST_PATH_MIN_SIZE = 2**16


def has_nan(values: jax.Array) -> jax.Array:
    """Whether ``values`` holds a NaN: a boolean scalar, also under ``jax.vmap``.

    One float reduction (``isnan(sum(v))``; on XLA:CPU cheaper than ``any`` over a boolean
    array, and a NaN anywhere, or +inf meeting -inf, makes the sum NaN). Under ``vmap`` the
    answer is for the whole batch (any member), so a ``lax.cond`` on it stays a conditional
    instead of becoming a select that runs both branches for every member. Not
    differentiated (custom_vmap functions have no reverse-mode rule, and need none here).
    """
    return _has_nan(jax.lax.stop_gradient(values))


def _nan_in_sum(values: jax.Array) -> jax.Array:
    return jnp.isnan(jnp.sum(values))


_has_nan = jax.custom_batching.custom_vmap(_nan_in_sum)


@_has_nan.def_vmap
def _has_nan_vmap(axis_size, in_batched, values):
    del axis_size, in_batched
    return _nan_in_sum(values), False  # over the whole batch, and unbatched


@jax.custom_jvp
def _with_value(differentiated: jax.Array, value: jax.Array) -> jax.Array:
    """``value``, differentiated as if it were ``differentiated`` (same shape)."""
    del differentiated
    return value


@_with_value.defjvp
def _with_value_jvp(primals, tangents):
    value = _with_value(*primals)
    # The tangent scaled by a 1 computed from `value`: the backward pass then waits for the
    # (usually trivial) recomputation, so XLA does not schedule the cond, which reads the
    # inputs, after it. Inside a training step the backward pass is then the inputs' last
    # reader and can write the gradient in place of the logits (one logits-sized buffer
    # instead of two).
    one = 1 + 0 * jnp.isnan(value).astype(tangents[0].dtype)
    return value, tangents[0] * one


def fast_or_exact(
    total: Callable[..., jax.Array], operands: tuple, *, use_fast: bool = True
) -> jax.Array:
    """``total(False, *operands)``, computed as ``total(True, *operands)`` where that is valid.

    ``total(fast, *operands)`` computes a loss (any shape) with a fast or an exact core. The
    fast one must agree with the exact one except that it may give NaN (never a wrong
    finite value) on inputs it does not handle, such as infinite logits or logits beyond
    the range of an unshifted exp, and both must differentiate the same way. The fast
    result is checked once, after every reduction (so XLA can fuse each kernel whole): if
    it has a NaN, the loss is recomputed exactly under a ``lax.cond``, so the exact core
    costs nothing when it is not needed. The gradient is always the fast core's. Every array
    ``total`` reads must be in ``operands`` (the cond's branches close over nothing).
    Under ``vmap`` the check is made once for the whole batch (:func:`has_nan`): if any
    member needs the exact core, every member is recomputed with it.
    """
    if not use_fast:
        return total(False, *operands)
    value = total(True, *operands)
    frozen = jax.lax.stop_gradient((operands, value))
    # NaN in the sum also catches +inf + -inf (recomputed exactly: slower, still right).
    fixed = jax.lax.cond(
        has_nan(frozen[1]),
        lambda ops, v: total(False, *ops),
        lambda ops, v: v,
        *frozen,
    )
    return _with_value(value, fixed)


def reduce_fast_or_exact(
    fast: Callable[..., jax.Array],
    exact: Callable[..., jax.Array],
    args: tuple,
    *,
    prepare: Callable[..., tuple] | None = None,
    reduction: str,
    weights: jax.Array | None = None,
    where: jax.Array | None = None,
) -> jax.Array:
    """``reduce_loss(exact(*prepare(*args)))`` through :func:`fast_or_exact` with ``fast``.

    For elementwise cores: ``reduction="none"`` and small inputs use ``exact`` directly
    (checking an N-element output for NaN would cost a pass of its own). ``prepare`` (dtype
    casts, broadcasts) runs inside each branch and ``weights`` are cast to the loss dtype
    there too, so the cond's operands are the caller's arrays as they are and XLA fuses the
    casts into the loss kernels instead of materialising cast copies.
    """
    prepare = prepare or (lambda *a: a)

    def total(use_fast, a, w, m):
        values = (fast if use_fast else exact)(*prepare(*a))
        w = None if w is None else w.astype(values.dtype)
        return reduce_loss(values, reduction=reduction, weights=w, where=m)

    check_reduction(reduction)
    use_fast = reduction != "none" and args[0].size >= FAST_PATH_MIN_SIZE
    return fast_or_exact(total, (args, weights, where), use_fast=use_fast)
