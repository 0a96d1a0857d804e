"""The inputs of the softmax-family losses, checked and laid out as rows: the one place where
the class axes move last, ``where`` splits into a class mask and a row mask, and the label
options (weights, class weights, ``ignore_index``) are checked and cast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jbce._core import checks
from jbce._core.dtypes import compute_dtype


def to_rows(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """[..batch.., ..classes..] with the class axes flattened into one last axis."""
    batch = tuple(i for i in range(x.ndim) if i not in axes)
    if axes != (x.ndim - 1,):
        x = jnp.transpose(x, batch + axes)
    k = math.prod(x.shape[len(batch) :])
    return x.reshape(tuple(x.shape[: len(batch)]) + (k,))


def batch_shape(shape: Sequence[int], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n for i, n in enumerate(shape) if i not in axes)


def split_where(where, shape, axes, bshape):
    """(per-logit mask in row layout or None, per-example mask or None)."""
    if where is None:
        return None, None
    where = checks.as_array("where", where).astype(bool)
    if where.ndim == len(shape) and len(shape) > len(bshape):
        checks.check_broadcastable("where", where, "logits", shape)
        return to_rows(jnp.broadcast_to(where, shape), axes), None
    checks.check_broadcastable("where", where, "the logits' batch shape", bshape)
    return None, jnp.broadcast_to(where, bshape)


class Rows(NamedTuple):
    """A softmax loss's inputs in row layout.

    Attributes:
      x: the logits ``[..., K]`` in their own dtype (the cores cast them).
      labels: integer labels ``[...]`` (int32), or targets ``[..., K]`` in their own float dtype.
      weights: per-example multipliers in the compute dtype, or None.
      mask: ``[..., K]`` boolean class mask (False: out of the softmax), or None.
      rows: ``[...]`` boolean, the rows the loss uses (where, ignore_index, a row whose every
        class is masked), or None for all.
      dtype: the compute dtype.
      bshape: the batch shape.
      class_weights: ``[K]`` in the compute dtype, or None (integer labels only).
    """

    x: jax.Array
    labels: jax.Array
    weights: jax.Array | None
    mask: jax.Array | None
    rows: jax.Array | None
    dtype: jnp.dtype
    bshape: tuple[int, ...]
    class_weights: jax.Array | None = None


# What a soft-label loss's ``labels`` are: probabilities (checked to lie in [0, 1] under
# checkify), their logs, or a teacher's logits.
LABEL_KINDS = {"labels": True, "log_labels": False, "teacher_logits": False}


def soft_inputs(logits, labels, *, axis, weights, where, options=(), kind="labels") -> Rows:
    """Checked soft-label inputs (``labels`` of the logits' shape) in row layout.

    ``options`` (the hyperparameters) count towards the compute dtype; ``kind`` (a key of
    :data:`LABEL_KINDS`) names the labels in errors and says whether they are probabilities.
    """
    name = "teacher_logits" if kind == "teacher_logits" else "labels"
    logits, axes, _ = checks.class_axes("logits", logits, axis)
    labels = checks.as_array(name, labels)
    checks.check_shape(name, labels, logits.shape, f"to match logits {logits.shape}")
    bshape = batch_shape(logits.shape, axes)
    dt = compute_dtype(logits, labels, weights, *options)
    logit_mask, rows = split_where(where, logits.shape, axes, bshape)
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(dt)
    y = to_rows(labels, axes)
    if LABEL_KINDS[kind]:
        checks.debug_check_unit_interval(name, y)
    if weights is not None:
        checks.check_broadcastable("weights", weights, "the logits' batch shape", bshape)
        weights = checks.as_array("weights", weights).astype(dt)
    if logit_mask is not None:
        rows = checks.both(rows, jnp.any(logit_mask, axis=-1))
    return Rows(to_rows(logits, axes), y, weights, logit_mask, rows, dt, bshape)


class LabelOptions(NamedTuple):
    """An integer-label loss's per-example options, as the public API takes them."""

    weights: jax.typing.ArrayLike | None
    class_weights: jax.typing.ArrayLike | None
    ignore_index: int | None


def integer_inputs(logits, labels, *, axis, where, label_options: LabelOptions, options=(),
                   shards=1) -> Rows:  # fmt: skip
    """Checked integer-label inputs in row layout; ``shards``: how many shards the class axis
    is split over (labels are global class ids in ``[0, K * shards)``)."""
    weights, class_weights, ignore_index = label_options
    logits, labels, axes, k, bshape = checks.with_integer_labels("logits", logits, labels, axis)
    ignore_index = checks.check_ignore_index(ignore_index)
    dt = compute_dtype(logits, weights, class_weights, *options)
    logit_mask, rows = split_where(where, logits.shape, axes, bshape)
    weights, cw, kept = checks.integer_label_options(
        labels, bshape, k, weights=weights, class_weights=class_weights,
        ignore_index=ignore_index, num_classes=k * shards, dtype=dt,
    )  # fmt: skip
    return Rows(
        to_rows(logits, axes), labels, weights, logit_mask, checks.both(rows, kept), dt, bshape, cw
    )
