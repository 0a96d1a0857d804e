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


@jax.custom_jvp
def _with_value(differentiated: jax.Array, value: jax.Array) -> jax.Array:
    """``value``, differentiated as if it were ``differentiated`` (same shape)."""
    del differentiated
    return value


@_with_value.defjvp
def _with_value_jvp(primals, tangents):
    return _with_value(*primals), tangents[0]


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
    """``reduce_loss(exact(*prepare(*args)))``, computed with the cheaper ``fast`` core if it can.

    ``fast`` must agree with ``exact`` except that it may give NaN (never a wrong finite
    value) on inputs it does not handle, such as infinite logits, and both must share one
    backward pass. The reduced fast loss is checked once: if it is NaN the loss is recomputed
    with ``exact`` under a ``lax.cond`` (so the exact core costs nothing when it is not
    needed), and the gradient is always the shared backward pass. ``reduction="none"`` and
    small inputs use ``exact`` directly.

    ``prepare`` (dtype casts, broadcasts) runs inside each branch and ``weights`` are cast to
    the loss dtype there too, so the cond's operands are the caller's arrays as they are and
    XLA fuses the casts into the loss kernels instead of materialising cast copies.
    """
    prepare = prepare or (lambda *a: a)

    def total(core, a, w, m):
        values = core(*prepare(*a))
        w = None if w is None else w.astype(values.dtype)
        return reduce_loss(values, reduction=reduction, weights=w, where=m)

    check_reduction(reduction)
    if reduction == "none" or args[0].size < FAST_PATH_MIN_SIZE:
        return total(exact, args, weights, where)
    value = total(fast, args, weights, where)
    frozen = jax.lax.stop_gradient((args, weights, where, value))
    fixed = jax.lax.cond(
        jnp.isnan(frozen[-1]),
        lambda a, w, m, v: total(exact, a, w, m),
        lambda a, w, m, v: v,
        *frozen,
    )
    return _with_value(value, fixed)
