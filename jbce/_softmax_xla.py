"""Softmax statistics of materialised logits in plain XLA, with a lean custom VJP.

The implementation behind :func:`jbce.softmax_cross_entropy` and
:func:`jbce.softmax_cross_entropy_with_integer_labels`, on every platform. One
max-shifted log-sum-exp pass over the logits (:func:`jbce._stats.block_stats`); with
``axis_name`` the class axis is sharded and each shard's statistics are merged with one
``pmax`` and one ``psum`` (:func:`jbce._stats.combine_over_axis`), so the logits are never
gathered. The derivatives are one tangent map, linear in the tangents
(:func:`jbce._stats.stats_tangent`, :mod:`jbce._forward`): forward mode evaluates it and
reverse mode is its transpose, which recomputes the softmax from the logits and the saved
shift and log-sum-exp (the formula of :func:`jbce._stats.logits_grad`), a psum of one
value per row for the sharded case.
"""

from __future__ import annotations

import jax

from jbce import _forward, _stats
from jbce._dtypes import to_compute


def _local_labels(labels, num_local: int, axis_name):
    """Global class ids as indices into this shard's classes (outside [0, k) if not here)."""
    if labels is None or axis_name is None:
        return labels
    return labels - jax.lax.axis_index(axis_name).astype(labels.dtype) * num_local


def _softmax_stats(logits, labels, weights, mask, cap, rows, dtype, sums, soft, axis_name,
                   method):  # fmt: skip
    """:class:`jbce._stats.Stats` of each row of ``logits`` ``[..., K]`` (classes last).

    Args:
      logits: float array in any float dtype, computed in ``dtype``.
      labels: ``[...]`` integer class ids (global ones with ``axis_name``), or None.
      weights: ``[K]`` class weights, ``[..., K]`` soft labels (``soft=True``), or None.
      mask: ``[..., K]`` boolean class mask, or None.
      cap: logit soft-cap (a scalar array), or None.
      rows: ``[...]`` boolean, the rows the loss uses (others get zero derivatives), or None.
      dtype, sums, soft: see :func:`jbce._stats.block_stats`.
      axis_name: mesh axis the class axis is sharded over, or None.
      method: how the log-sum-exp is reduced (:func:`jbce._stats.row_reduce`).
    """
    w = None if weights is None else to_compute(weights, dtype)
    y = _local_labels(labels, logits.shape[-1], axis_name)
    st = _stats.block_stats(
        logits, y, to_x=_to_x(dtype, cap), weights=w, mask=mask, sums=sums, soft=soft,
        method=method,
    )  # fmt: skip
    return st if axis_name is None else _stats.combine_over_axis(st, axis_name)


def _to_x(dtype, cap):
    """The logits as the loss sees them: in the compute dtype, soft-capped."""
    return lambda v: _stats.softcap(to_compute(v, dtype), cap)


def _softmax_stats_tangent(primals, saved, tangents, dtype, sums, soft, axis_name, method):
    logits, labels, weights, mask, cap, rows = primals
    dlogits, _, dweights, _, dcap, _ = tangents
    z = to_compute(logits, dtype)
    x = _stats.softcap(z, cap)
    dx = _stats.softcap_jvp(z, cap, dlogits, dcap, rows)
    w = None if weights is None else to_compute(weights, dtype)
    dw = None if dweights is None else dweights.astype(dtype)
    y = _local_labels(labels, x.shape[-1], axis_name)
    tan = _stats.stats_tangent(
        x, y, _stats.Stats(*saved, None), dx, weights=w, dweights=dw, mask=mask, rows=rows,
        sums=sums, soft=soft,
    )  # fmt: skip
    if axis_name is None:
        return tan
    # Each shard's classes add to the row's statistics: one psum of the per-row tangents
    # (its transpose, in reverse mode, needs no communication).
    return _stats.Stats(*(None if f is None else jax.lax.psum(f, axis_name) for f in tan))


# Residuals in reverse mode: the inputs as given (bf16 stays bf16) and two floats per row, the
# shift and the shifted log-sum-exp; the softmax is recomputed in the backward pass.
softmax_stats = _forward.lean_jvp(
    _softmax_stats, _softmax_stats_tangent, num_static=5, saved=lambda st: (st.shift, st.lse)
)
