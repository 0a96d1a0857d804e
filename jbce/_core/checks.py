"""Argument validation shared by every jbce loss.

Every message is written once here. Each names the argument, what was expected and what
was given, so a failing call says how to fix it. Shapes, dtypes and Python-number options
are checked when the function is traced (``ValueError`` / ``TypeError``); values that are
only known at run time (labels, probabilities, traced hyperparameters) are reported under
``jax.experimental.checkify`` and cost nothing elsewhere (:func:`value_check`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

# The one private JAX import: checkify's table of error rules and its error constructors, so
# that the value check below reports under checkify without costing anything elsewhere. No
# public route does both: checkify.debug_check is public but takes every jitted call off the
# fast dispatch path (157 us instead of 11 us per call of a tiny jitted function, jax 0.10.2
# on the 2-core dev box). pyproject.toml bounds jax below the next minor release for this.
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


def check_reduction(
    reduction: str, *, normalizer=None, batch_axis_name=None, batchmean: bool = False
) -> None:
    """``reduction`` is one of :data:`REDUCTIONS` (or ``"batchmean"`` where ``batchmean``);
    ``normalizer`` (a mean's denominator) needs a mean; ``batch_axis_name`` names a mesh
    axis bound here (:func:`axis_size`)."""
    allowed = REDUCTIONS + (("batchmean",) if batchmean else ())
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}; got {reduction!r}")
    if normalizer is not None:
        if reduction not in ("mean", "batchmean"):
            raise ValueError(
                "normalizer replaces the denominator of a mean; it needs "
                f'reduction="mean"; got reduction={reduction!r}'
            )
        hyperparameter("normalizer", normalizer)
    if batch_axis_name is not None:
        axis_size("batch_axis_name", batch_axis_name)


def axis_size(arg: str, axis_name) -> int:
    """The size of the mesh axis (or axes) ``axis_name`` given as argument ``arg``, which
    must be bound here: inside ``shard_map``, ``pmap`` or a ``vmap`` with that axis name."""
    if not isinstance(axis_name, (str, tuple)) or (
        isinstance(axis_name, tuple) and not all(isinstance(a, str) for a in axis_name)
    ):
        raise TypeError(
            f"{arg} must be a mesh axis name (a str, or a tuple of them); got "
            f"{type(axis_name).__name__}: {axis_name!r}"
        )
    try:
        return jax.lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"{arg}={axis_name!r} is not a mesh axis bound here: call the loss inside "
            f"jax.shard_map (a mesh with axis {axis_name!r}), jax.pmap(..., axis_name="
            f"{axis_name!r}) or jax.vmap(..., axis_name={axis_name!r}), or leave {arg} "
            "out for a loss over this call's inputs only"
        ) from None


def implementation(value, table) -> None:
    """``implementation=`` is None (what the platform the program is lowered for picks) or a
    name in ``table`` (the loss family's implementations)."""
    if value is not None and value not in table:
        raise ValueError(f"implementation must be None or one of {tuple(table)}; got {value!r}")


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
        hint = ""
        if jnp.shape(weights) == (num_classes_here,) != tuple(batch_shape)[-1:]:
            hint = (
                "; weights multiply each example: for one weight per class (PyTorch's "
                "weight=) did you mean class_weights=?"
            )
        check_broadcastable("weights", weights, "labels", batch_shape, hint)
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


def check_broadcastable(
    name: str, x: ArrayLike, ref_name: str, ref_shape: Sequence[int], hint: str = ""
) -> None:
    xs = jnp.shape(x)
    try:
        out = jnp.broadcast_shapes(xs, tuple(ref_shape))
    except ValueError:
        out = None
    if out != tuple(ref_shape):
        raise ValueError(
            f"{name} must broadcast to the shape of {ref_name} {tuple(ref_shape)}; got {xs}" + hint
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
def static_number(value) -> float | int | None:
    """``value`` as a Python number if it is known when tracing (a Python number, a NumPy
    scalar or a 0-d NumPy array; not a bool), else None (a jax array, traced or not).

    The one test of whether an option is static: a static 0 can leave a term out of the
    traced program, and a NumPy scalar behaves exactly as the Python number it holds.

    Example:
      >>> import numpy as np
      >>> from jbce._core.checks import static_number
      >>> static_number(np.float32(0.5)), static_number(2), static_number(True)
      (0.5, 2, None)
    """
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, np.ndarray):
        if value.ndim != 0 or value.dtype.kind not in "iuf":
            return None
        value = value[()]
    if isinstance(value, np.generic) and value.dtype.kind in "iuf":
        return value.item()
    if isinstance(value, numbers.Real):
        return value
    return None


def is_zero(value) -> bool:
    """Whether an option is a static 0 (:func:`static_number`): a term that can be left out."""
    v = static_number(value)
    return v is not None and v == 0


@dataclasses.dataclass(frozen=True)
class Interval:
    """The allowed values of a hyperparameter: ``[low, high]``, ``(low, high]`` with
    ``low_open``; a None bound is no bound (NaN is never allowed)."""

    low: float | None
    high: float | None = None
    low_open: bool = False

    def __str__(self) -> str:
        if self.low is None and self.high is None:
            return "a number (not NaN)"
        if self.high is None:
            return f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
        lo = "(" if self.low_open else "["
        return f"in {lo}{self.low:g}, {self.high:g}]"

    def holds(self, v):
        """``v`` (a number or an array) inside the interval; NaN is outside."""
        if self.low is None:
            ok = v == v  # False for NaN
        else:
            ok = (v > self.low) if self.low_open else (v >= self.low)
        return ok if self.high is None else ok & (v <= self.high)


# The one table of hyperparameter ranges. A key "loss:name" is the range of ``name`` in that
# loss where it differs from the general one (the error names ``name``).
HYPERPARAMETERS = {
    "label_smoothing": Interval(0.0, 1.0),
    "z_loss": Interval(0.0),
    "logit_softcap": Interval(0.0, low_open=True),
    "alpha": Interval(0.0),
    "sigmoid_focal_loss:alpha": Interval(0.0, 1.0),
    "gamma": Interval(0.0),
    "epsilon": Interval(-1.0),
    "beta": Interval(0.0, 1.0),
    "temperature": Interval(0.0, low_open=True),
    "normalizer": Interval(0.0),
    "scale": Interval(0.0),
    "bias": Interval(None),
}


def hyperparameter(key: str, value, *, scalar: bool = True):
    """An option such as ``label_smoothing``: a Python number, a NumPy scalar, or an array
    (e.g. a jit argument), checked against its range in :data:`HYPERPARAMETERS`.

    A static value (:func:`static_number`) outside the range raises a ``ValueError`` naming
    it and is returned as a Python number, so a 0 can still switch a term off. An array is
    returned as an array and its range is reported under checkify.
    """
    name = key.rsplit(":", 1)[-1]
    interval = HYPERPARAMETERS[key]
    if value is None:
        raise TypeError(f"{name} must be a number or an array; got None")
    v = static_number(value)
    if v is not None:
        if np.isnan(v) or not interval.holds(v):
            raise ValueError(f"{name} must be {interval}; got {value!r}")
        return v
    x = as_array(name, value)
    if scalar and x.ndim != 0:
        raise ValueError(f"{name} must be a scalar; got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating) and not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be a real number; got dtype {x.dtype}")
    if x.size:
        value_check(interval.holds(x), f"{name} must be {interval}")
    return x


# --- value checks reported by checkify, free everywhere else ------------------------------------
# checkify.debug_check attaches an effect to every jaxpr that contains it, which takes each jitted
# function (and any user step that calls a jbce loss) off JAX's fast dispatch path (see the
# import above). This primitive has no effect: outside checkify it lowers to nothing and is dead
# code; under checkify its rule adds a user-check error exactly as checkify.check would.
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


# --- fused linear losses -----------------------------------------------------------------------
def hidden_and_weight(hidden, weight):
    """``(hidden, weight, batch shape)`` checked: float ``hidden`` ``[..., D]`` and ``weight``
    ``[D, V]`` with at least one class (every fused linear op's first two operands)."""
    hidden = as_array("hidden", hidden)
    weight = as_array("weight", weight)
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.ndim < 1:
        raise ValueError(f"hidden must have shape [..., D]; got {hidden.shape}")
    d = hidden.shape[-1]
    if weight.ndim != 2 or weight.shape[0] != d:
        raise ValueError(
            f"weight must have shape ({d}, V) to match hidden {hidden.shape}; got {weight.shape}"
            " (a Flax Dense kernel; transpose a PyTorch Linear weight)"
        )
    if weight.shape[1] == 0:
        raise ValueError(f"weight must have at least one class column; got {weight.shape}")
    return hidden, weight, hidden.shape[:-1]


def linear_operands(hidden, weight, labels, bias):
    """``(hidden [N, D], weight, labels, bias, batch shape)`` of a fused linear op, checked:
    ``hidden`` ``[..., D]`` flattened to ``[N, D]``, ``weight`` ``[D, V]``, int32 labels of
    ``hidden``'s batch shape (flattened to ``[N]``) and an optional ``[V]`` bias."""
    hidden, weight, bshape = hidden_and_weight(hidden, weight)
    labels = integer_labels("labels", labels)
    check_shape("labels", labels, bshape, f"to match hidden {hidden.shape} without D")
    if bias is not None:
        bias = as_array("bias", bias)
        check_float("bias", bias)
        check_shape("bias", bias, (weight.shape[1],), f"to match weight {weight.shape}")
    return hidden.reshape(math.prod(bshape), hidden.shape[-1]), weight, labels, bias, bshape


def distillation_operands(hidden, weight, teacher_hidden, teacher_weight, bias, teacher_bias):
    """``(hidden, weight, teacher_hidden, teacher_weight, bias, teacher_bias, batch shape)`` of
    a fused distillation loss, checked: :func:`hidden_and_weight` for the student, a teacher
    ``[..., D_t]`` with the student's batch shape and ``[D_t, V]``, optional ``[V]`` biases."""
    hidden, weight, bshape = hidden_and_weight(hidden, weight)
    teacher_hidden = as_array("teacher_hidden", teacher_hidden)
    teacher_weight = as_array("teacher_weight", teacher_weight)
    check_float("teacher_hidden", teacher_hidden)
    check_float("teacher_weight", teacher_weight)
    v = weight.shape[1]
    if teacher_hidden.ndim != hidden.ndim or teacher_hidden.shape[:-1] != bshape:
        raise ValueError(
            f"teacher_hidden must have shape {bshape + ('D_t',)} to match hidden "
            f"{hidden.shape} without D; got {teacher_hidden.shape}"
        )
    check_shape(
        "teacher_weight", teacher_weight, (teacher_hidden.shape[-1], v),
        f"to match teacher_hidden {teacher_hidden.shape} and weight {weight.shape}",
    )  # fmt: skip
    biases = []
    for name, b in (("bias", bias), ("teacher_bias", teacher_bias)):
        if b is not None:
            b = as_array(name, b)
            check_float(name, b)
            check_shape(name, b, (v,), f"to match weight {weight.shape}")
        biases.append(b)
    return (hidden, weight, teacher_hidden, teacher_weight, *biases, bshape)


def check_chunk_size(chunk_size) -> None:
    sizes = chunk_size if isinstance(chunk_size, tuple) else (chunk_size,)
    ok = chunk_size is None or (
        len(sizes) in (1, 2)
        and all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in sizes
        )
    )
    if not ok:
        raise ValueError(
            "chunk_size must be a positive int, a pair (token_chunk, vocab_chunk) of them, "
            f"or None; got {chunk_size!r}"
        )


def pallas_options(implementation, chunk_size, gradient_filter, dtype) -> None:
    """Errors for options ``implementation="pallas"`` of the fused cross-entropy does not
    take (or only it takes)."""
    if implementation != "pallas":
        if gradient_filter is not None:
            raise ValueError(
                'gradient_filter applies to implementation="pallas" only; '
                f"got implementation={implementation!r}"
            )
        return
    if chunk_size is not None:
        raise ValueError(
            'chunk_size must be None with implementation="pallas" (the kernels choose their '
            f"own block sizes); got {chunk_size!r}"
        )
    threshold = static_number(gradient_filter)
    if gradient_filter is not None and (threshold is None or not 0 <= threshold <= 1):
        raise ValueError(
            "gradient_filter must be None or a number in [0, 1] known when tracing (a "
            f"threshold relative to each token's label term); got {gradient_filter!r}"
        )
    if jnp.dtype(dtype) != jnp.float32:
        raise ValueError(
            'implementation="pallas" computes in float32 (float32, bfloat16 or float16 '
            f'inputs); got inputs computed in {jnp.dtype(dtype).name} (use implementation="xla")'
        )
