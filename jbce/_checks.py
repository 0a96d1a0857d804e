"""Argument validation and dtype promotion shared by every jbce loss.

Every message is written once here. Each names the argument, what was expected
and what was given, so a failing call says how to fix it.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
from jax.experimental import checkify
from jax.typing import ArrayLike

REDUCTIONS = ("none", "sum", "mean")


def compute_dtype(*xs: ArrayLike) -> jnp.dtype:
    """The float dtype losses are computed in: float32, or float64 if an input is float64.

    bf16/fp16 (and integer/bool) inputs are computed in float32.
    """
    dt = jnp.float32
    for x in xs:
        if x is not None and jnp.result_type(x) == jnp.float64:
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


def debug_check_unit_interval(name: str, x: jax.Array) -> None:
    """Reports values outside [0, 1] as a checkify error (a no-op outside checkify)."""
    if x.size:
        checkify.debug_check(jnp.all((x >= 0) & (x <= 1)), f"{name} must lie in [0, 1]")


def debug_check_labels(name: str, labels: jax.Array, num_classes: int, ignore_index) -> None:
    """Reports integer labels outside [0, K) that are not ignore_index (no-op outside checkify)."""
    if labels.size:
        ok = (labels >= 0) & (labels < num_classes)
        if ignore_index is not None:
            ok = ok | (labels == ignore_index)
        checkify.debug_check(
            jnp.all(ok),
            f"{name} must lie in [0, {num_classes}) or equal ignore_index={ignore_index}",
        )
