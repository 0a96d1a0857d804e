"""Argument validation shared by every jbce loss.

Every message is written once here. Each names the argument, what was expected and what
was given, so a failing call says how to fix it. Shapes, dtypes and Python-number options
are checked when the function is traced (``ValueError`` / ``TypeError``); values that are
only known at run time (labels, probabilities, traced hyperparameters) are reported under
``jax.experimental.checkify`` and cost nothing elsewhere (:func:`value_check`).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax._src import checkify as _checkify_internal
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.typing import ArrayLike

REDUCTIONS = ("none", "sum", "mean")


def as_array(name: str, x) -> jax.Array:
    """``x`` as a jax array; lists, tuples and scalars are accepted as ``jnp.asarray`` does."""
    if isinstance(x, jax.Array):
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{name} must be an array (or a list of numbers); got {type(x).__name__}: {e}"
        ) from None


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")


def check_float(name: str, x: ArrayLike) -> None:
    try:
        chex.assert_type(x, float)
    except AssertionError:
        dt = jnp.result_type(x)
        raise TypeError(f"{name} must be a floating-point array; got dtype {dt}") from None


def integer_labels(name: str, x: ArrayLike, num_classes: int | None = None) -> jax.Array:
    """Integer class indices as int32, so ``ignore_index`` and class ids compare in one type.

    A narrow dtype (``uint8``, ``int8``, ``int16``) would otherwise compare against
    ``ignore_index=-100`` and class ids in its own, wrapped type.
    """
    x = _integers(
        name, x, "integer class indices (got dtype {dtype}); for probability targets use "
        "softmax_cross_entropy, or cast with labels.astype(jnp.int32)",
    )  # fmt: skip
    if num_classes is not None and num_classes > np.iinfo(np.int32).max:
        raise ValueError(f"{name}: {num_classes} classes do not fit in int32 class ids")
    return x.astype(jnp.int32)


def integer_ids(name: str, x: ArrayLike) -> jax.Array:
    """Integer identifiers (compared for equality only), as an array of their own dtype."""
    return _integers(name, x, "integers (equal ids mark the same item); got dtype {dtype}")


def _integers(name: str, x: ArrayLike, expected: str) -> jax.Array:
    """``x`` as an array of an integer dtype, else a TypeError: ``{name} must be {expected}``
    (``{dtype}`` in ``expected`` names the dtype given)."""
    x = as_array(name, x)
    try:
        chex.assert_type(x, int)
    except AssertionError:
        raise TypeError(f"{name} must be " + expected.format(dtype=x.dtype)) from None
    return x


def check_rank(name: str, x: ArrayLike, ndim: int, layout: str) -> None:
    if jnp.ndim(x) != ndim:
        raise ValueError(f"{name} must have shape {layout}; got {jnp.shape(x)}")


def check_ignore_index(ignore_index) -> int | None:
    if ignore_index is None:
        return None
    try:
        return operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an int or None; got {ignore_index!r}") from None


def integer_label_options(
    labels: jax.Array,
    batch_shape: Sequence[int],
    num_classes_here: int,
    *,
    weights,
    class_weights,
    ignore_index: int | None,
    num_classes,
    dtype,
):
    """The per-example options of an integer-label loss, checked and cast to ``dtype``.

    Returns ``(weights, class_weights, kept)``: ``weights`` broadcastable to the labels,
    ``class_weights`` ``[num_classes_here]``, and ``kept`` (labels that are not
    ``ignore_index``; None without one). Labels outside ``[0, num_classes)`` are reported
    under checkify.
    """
    if weights is not None:
        check_broadcastable("weights", weights, "labels", batch_shape)
        weights = as_array("weights", weights).astype(dtype)
    if class_weights is not None:
        class_weights = as_array("class_weights", class_weights)
        check_shape("class_weights", class_weights, (num_classes_here,), "(one weight per class)")
        class_weights = class_weights.astype(dtype)
    debug_check_labels("labels", labels, num_classes, ignore_index)
    kept = None if ignore_index is None else labels != ignore_index
    return weights, class_weights, kept


def both(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
    """``a & b`` for optional masks (None: everything)."""
    return b if a is None else a if b is None else a & b


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


def check_classes(name: str, num_classes: int, what: str = "class axis") -> None:
    if num_classes == 0:
        raise ValueError(f"{name} must have at least one class along its {what}; got 0")


def canonical_axes(axis: int | Sequence[int], ndim: int, name: str = "logits") -> tuple[int, ...]:
    """The class axes as non-negative ints; numpy integers are accepted like ints."""
    if isinstance(axis, numbers.Integral) or hasattr(axis, "__index__"):
        axes = (axis,)
    else:
        try:
            axes = tuple(axis)
        except TypeError:
            raise TypeError(f"axis must be an int or a tuple of ints; got {axis!r}") from None
    if not axes:
        raise ValueError("axis must name at least one class axis; got ()")
    out = []
    for a in axes:
        try:
            a = operator.index(a)
        except TypeError:
            raise TypeError(f"axis must be an int or a tuple of ints; got {axis!r}") from None
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for {name} of rank {ndim}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis must not repeat an axis; got {axis!r}")
    return tuple(out)


def class_axes(name: str, x, axis) -> tuple[jax.Array, tuple[int, ...], int]:
    """``(x, class axes, K)`` of a float array with classes along ``axis``, checked."""
    x = as_array(name, x)
    check_float(name, x)
    axes = canonical_axes(axis, x.ndim, name)
    k = math.prod(x.shape[a] for a in axes)
    check_classes(name, k)
    return x, axes, k


def with_integer_labels(name: str, x, labels, axis):
    """``(x, labels, class axes, K, batch shape)``: ``x`` as :func:`class_axes` and the class
    indices (int32) checked to have ``x``'s shape without the class axes."""
    x, axes, k = class_axes(name, x, axis)
    labels = integer_labels("labels", labels, k)
    bshape = tuple(n for i, n in enumerate(x.shape) if i not in axes)
    axis_txt = operator.index(axis) if hasattr(axis, "__index__") else tuple(axis)
    check_shape("labels", labels, bshape, f"to match {name} {x.shape} without axis {axis_txt}")
    return x, labels, axes, k, bshape


# --- scalar hyperparameters: Python numbers checked now, arrays (jit arguments) under checkify --
def is_zero(value) -> bool:
    """Whether an option is the Python number 0 (a term that can be left out when tracing)."""
    return isinstance(value, numbers.Number) and not isinstance(value, bool) and value == 0


def hyperparameter(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    scalar: bool = True,
):
    """An option such as ``label_smoothing``: a Python number, or an array (e.g. a jit argument).

    A Python number outside ``[low, high]`` (``(low, high]`` with ``low_open``) raises a
    ``ValueError`` naming it; it is returned as is, so a 0 can still switch a term off. An
    array is returned as an array and its range is reported under checkify.
    """
    if value is None:
        raise TypeError(f"{name} must be a number or an array; got None")
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        v = float(value)
        bad = (
            np.isnan(v)
            or (low is not None and (v <= low if low_open else v < low))
            or (high is not None and v > high)
        )
        if bad:
            raise ValueError(f"{name} must be {_interval(low, high, low_open)}; got {value!r}")
        return value
    x = as_array(name, value)
    if scalar and x.ndim != 0:
        raise ValueError(f"{name} must be a scalar; got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating) and not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be a real number; got dtype {x.dtype}")
    ok = jnp.ones(x.shape, bool)
    if low is not None:
        ok = ok & ((x > low) if low_open else (x >= low))
    if high is not None:
        ok = ok & (x <= high)
    if x.size and (low is not None or high is not None):
        value_check(ok, f"{name} must be {_interval(low, high, low_open)}")
    return x


def _interval(low, high, low_open) -> str:
    if high is None:
        return f"> {low:g}" if low_open else f">= {low:g}"
    lo = "(" if low_open else "["
    return f"in {lo}{low:g}, {high:g}]"


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
    """Reports values outside [0, 1] (and NaN) as a checkify error (free outside checkify)."""
    if x.size:
        value_check((x >= 0) & (x <= 1), f"{name} must lie in [0, 1]")


def debug_check_labels(name: str, labels: jax.Array, num_classes, ignore_index) -> None:
    """Reports integer labels outside [0, K) that are not ignore_index (free outside checkify)."""
    if labels.size:
        ok = (labels >= 0) & (labels < num_classes)
        if ignore_index is not None:
            ok = ok | (labels == ignore_index)
        value_check(
            ok, f"{name} must lie in [0, {num_classes}) or equal ignore_index={ignore_index}"
        )
