"""Argument validation and dtype promotion shared by every jbce loss.

Every message is written once here. Each names the argument, what was expected
and what was given, so a failing call says how to fix it.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
from jax._src import checkify as _checkify_internal
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.typing import ArrayLike

REDUCTIONS = ("none", "sum", "mean")


def compute_dtype(*xs: ArrayLike) -> jnp.dtype:
    """The float dtype losses are computed in: float32, or float64 if an input is float64.

    bf16/fp16 (and integer/bool) inputs are computed in float32.
    """
    dt = jnp.float32
    for x in xs:
        # Python scalars are weakly typed: a label of 1.0 must not turn a float32 loss into
        # float64 when x64 is enabled.
        if x is None or isinstance(x, (bool, int, float)):
            continue
        if jnp.result_type(x) == jnp.float64:
            dt = jnp.float64
    return jnp.dtype(dt)


def as_float(x: ArrayLike, dtype) -> jax.Array:
    return jnp.asarray(x).astype(dtype)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")


def check_float(name: str, x: ArrayLike) -> None:
    try:
        chex.assert_type(x, float)
    except AssertionError:
        dt = jnp.result_type(x)
        raise TypeError(f"{name} must be a floating-point array; got dtype {dt}") from None


def check_integer_labels(name: str, x: ArrayLike) -> None:
    try:
        chex.assert_type(x, int)
    except AssertionError:
        dt = jnp.result_type(x)
        raise TypeError(
            f"{name} must be integer class indices (got dtype {dt}); for probability "
            "targets use softmax_cross_entropy, or cast with labels.astype(jnp.int32)"
        ) from None


def check_same_shape(name: str, x: ArrayLike, ref_name: str, ref: ArrayLike) -> None:
    xs, rs = jnp.shape(x), jnp.shape(ref)
    try:
        chex.assert_equal_shape([x, ref])
    except AssertionError:
        raise ValueError(f"{name} must have the shape of {ref_name} {rs}; got {xs}") from None


def check_broadcastable(name: str, x: ArrayLike, ref_name: str, ref_shape: Sequence[int]) -> None:
    xs = jnp.shape(x)
    try:
        out = jnp.broadcast_shapes(xs, tuple(ref_shape))
    except ValueError:
        out = None
    if out != tuple(ref_shape):
        raise ValueError(
            f"{name} must broadcast to the shape of {ref_name} {tuple(ref_shape)}; got {xs}"
        )


def check_shape(name: str, x: ArrayLike, expected: Sequence[int], why: str) -> None:
    try:
        chex.assert_shape(x, tuple(expected))
    except AssertionError:
        raise ValueError(
            f"{name} must have shape {tuple(expected)} {why}; got {jnp.shape(x)}"
        ) from None


def canonical_axes(axis: int | Sequence[int], ndim: int, name: str = "logits") -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not axes:
        raise ValueError("axis must name at least one class axis; got ()")
    out = []
    for a in axes:
        if not isinstance(a, int) or not -ndim <= a < ndim:
            raise ValueError(f"axis {a!r} is out of range for {name} of rank {ndim}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis must not repeat an axis; got {axis!r}")
    return tuple(out)


# --- value checks reported by checkify, free everywhere else ------------------------------------
# checkify.debug_check attaches an effect to every jaxpr that contains it, which takes each jitted
# function (and any user step that calls a jbce loss) off JAX's fast dispatch path: measured
# 181 us against 27 us per call for a tiny jitted loss. This primitive has no effect: outside
# checkify it lowers to nothing and is dead code; under checkify its rule adds a user-check
# error exactly as checkify.check would.
_value_check_p = Primitive("jbce_value_check")
_value_check_p.multiple_results = True
_value_check_p.def_impl(lambda pred, *, msg: [])
_value_check_p.def_abstract_eval(lambda pred, *, msg: [])
mlir.register_lowering(_value_check_p, lambda ctx, pred, *, msg: [])


def _value_check_jvp(primals, tangents, *, msg):
    return _value_check_p.bind(*primals, msg=msg), []


def _value_check_batch(args, dims, *, msg):
    (pred,) = args
    return _value_check_p.bind(jnp.all(pred), msg=msg), []


def _value_check_checkify(error, enabled_errors, pred, *, msg):
    if _checkify_internal.FailedCheckError in enabled_errors:
        new = _checkify_internal.FailedCheckError(_checkify_internal.get_traceback(), msg)
        error = _checkify_internal.assert_func(error, jnp.logical_not(pred), new)
    return error, []


ad.primitive_jvps[_value_check_p] = _value_check_jvp
batching.primitive_batchers[_value_check_p] = _value_check_batch
_checkify_internal.error_checks[_value_check_p] = _value_check_checkify


def value_check(pred: jax.Array, msg: str) -> None:
    """Reports ``all(pred) == False`` as an error under ``jax.experimental.checkify``.

    Outside checkify it costs nothing (no effect, no computation after dead-code elimination).
    """
    _value_check_p.bind(jnp.all(pred), msg=msg)


def debug_check_unit_interval(name: str, x: jax.Array) -> None:
    """Reports values outside [0, 1] as a checkify error (free outside checkify)."""
    if x.size:
        value_check((x >= 0) & (x <= 1), f"{name} must lie in [0, 1]")


def debug_check_labels(name: str, labels: jax.Array, num_classes: int, ignore_index) -> None:
    """Reports integer labels outside [0, K) that are not ignore_index (free outside checkify)."""
    if labels.size:
        ok = (labels >= 0) & (labels < num_classes)
        if ignore_index is not None:
            ok = ok | (labels == ignore_index)
        value_check(
            ok, f"{name} must lie in [0, {num_classes}) or equal ignore_index={ignore_index}"
        )
