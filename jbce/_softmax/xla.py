"""Softmax statistics of materialised logits in plain XLA, with a lean custom VJP.

The implementation behind :func:`jbce.softmax_cross_entropy` and
:func:`jbce.softmax_cross_entropy_with_integer_labels`, on every platform. One
max-shifted log-sum-exp pass over the logits (:func:`jbce._softmax.stats.block_stats`); with
``axis_name`` the class axis is sharded and each shard's statistics are merged with one
``pmax`` and one ``psum`` (:func:`jbce._softmax.stats.combine_over_axis`), so the logits are never
gathered. The derivatives are one tangent map, linear in the tangents
(:func:`jbce._stats.stats_tangent`, :mod:`jbce._core.autodiff`): forward mode evaluates it and
reverse mode is its transpose, which recomputes the softmax from the logits and the saved
shift and log-sum-exp (the formula of :func:`jbce._softmax.stats.logits_grad`).

The sharded case (``axis_name``) keeps a ``custom_vjp`` with that formula as its backward
pass: its tangent needs a ``psum`` of the per-row tangents, whose transpose is again a
``psum`` under ``pmap`` (every gradient 8x too large on 8 devices), while the hand-written
backward pass needs no communication and is right under ``pmap`` and ``shard_map`` alike.
So vocabulary-parallel losses have reverse-mode derivatives only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jbce._core import autodiff
from jbce._core.dtypes import to_compute
from jbce._core.sharding import psum_to_like
from jbce._softmax import stats as _stats


def _local_labels(labels, num_local: int, axis_name):
    """Global class ids as indices into this shard's classes (outside [0, k) if not here)."""
    if labels is None or axis_name is None:
        return labels
    return labels - jax.lax.axis_index(axis_name).astype(labels.dtype) * num_local


def _softmax_stats(logits, labels, weights, mask, cap, rows, dtype, sums, soft, axis_name,
                   method):  # fmt: skip
    """:class:`jbce._softmax.stats.Stats` of each row of ``logits`` ``[..., K]`` (classes last).

    Args:
      logits: float array in any float dtype, computed in ``dtype``.
      labels: ``[...]`` integer class ids (global ones with ``axis_name``), or None.
      weights: ``[K]`` class weights, ``[..., K]`` soft labels (``soft=True``), or None.
      mask: ``[..., K]`` boolean class mask, or None.
      cap: logit soft-cap (a scalar array), or None.
      rows: ``[...]`` boolean, the rows the loss uses (others get zero derivatives), or None.
      dtype, sums, soft: see :func:`jbce._softmax.stats.block_stats`.
      axis_name: mesh axis the class axis is sharded over, or None.
      method: how the log-sum-exp is reduced (:func:`jbce._softmax.stats.row_reduce`).
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
    return tan


# Residuals in reverse mode: the inputs as given (bf16 stays bf16) and two floats per row, the
# shift and the shifted log-sum-exp; the softmax is recomputed in the backward pass.
_local_stats = autodiff.lean_jvp(
    _softmax_stats, _softmax_stats_tangent, num_static=5, saved=lambda st: (st.shift, st.lse)
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _sharded_stats(logits, labels, weights, mask, cap, rows, dtype, sums, soft, axis_name,
                   method):  # fmt: skip
    return _softmax_stats(
        logits, labels, weights, mask, cap, rows, dtype, sums, soft, axis_name, method
    )


def _sharded_stats_fwd(logits, labels, weights, mask, cap, rows, dtype, sums, soft, axis_name,
                       method):  # fmt: skip
    st = _softmax_stats(
        logits, labels, weights, mask, cap, rows, dtype, sums, soft, axis_name, method
    )
    # The same residuals as the local case's: the inputs and two floats per row.
    return st, (logits, labels, weights, mask, cap, rows, st.shift, st.lse)


def _sharded_stats_bwd(dtype, sums, soft, axis_name, method, res, g):
    logits, labels, weights, mask, cap, rows, shift, lse = res
    z = to_compute(logits, dtype)
    x = _stats.softcap(z, cap)
    w = None if weights is None else to_compute(weights, dtype)
    y = _local_labels(labels, x.shape[-1], axis_name)
    saved = _stats.Stats(shift, lse, None)
    dx, dw = _stats.logits_grad(x, y, saved, g, weights=w, mask=mask, rows=rows, soft=soft)
    dz, dcap = _stats.softcap_vjp(z, cap, dx)
    return (
        psum_to_like(dz.astype(logits.dtype), logits),
        _zero_cotangent(labels),
        None if weights is None else psum_to_like(dw.astype(weights.dtype), weights),
        _zero_cotangent(mask),
        None if cap is None else psum_to_like(dcap.astype(cap.dtype), cap),
        _zero_cotangent(rows),
    )


def _zero_cotangent(a):
    return None if a is None else jnp.zeros(a.shape, jax.dtypes.float0)


_sharded_stats.defvjp(_sharded_stats_fwd, _sharded_stats_bwd)


def softmax_stats(logits, labels, weights, mask, cap, rows, dtype, sums, soft, axis_name,
                  method, *, loss_name: str = "softmax_cross_entropy"):  # fmt: skip
    """:func:`_softmax_stats` with its derivatives: forward and reverse mode for local
    logits, reverse mode only with ``axis_name`` (see the module docstring)."""
    args = (logits, labels, weights, mask, cap, rows, dtype, sums, soft, axis_name, method)
    if axis_name is None:
        return _local_stats(*args)
    with autodiff.reverse_only(loss_name):
        return _sharded_stats(*args)
