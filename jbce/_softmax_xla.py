"""Softmax statistics of materialised logits in plain XLA, with a lean custom VJP.

The implementation behind :func:`jbce.softmax_cross_entropy` and
:func:`jbce.softmax_cross_entropy_with_integer_labels`, on every platform. One
max-shifted log-sum-exp pass over the logits (:func:`jbce._stats.block_stats`); with
``axis_name`` the class axis is sharded and each shard's statistics are merged with one
``pmax`` and one ``psum`` (:func:`jbce._stats.combine_over_axis`), so the logits are never
gathered. The backward pass recomputes the softmax from the logits and the saved shift and
log-sum-exp (:func:`jbce._stats.logits_grad`) and needs no communication.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jbce import _stats
from jbce._dtypes import to_compute
from jbce._vma import psum_to_like


def _local_labels(labels, num_local: int, axis_name):
    """Global class ids as indices into this shard's classes (outside [0, k) if not here)."""
    if labels is None or axis_name is None:
        return labels
    return labels - jax.lax.axis_index(axis_name).astype(labels.dtype) * num_local


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def softmax_stats(logits, labels, weights, mask, cap, rows, dtype, sums, soft, axis_name, method):
    """:class:`jbce._stats.Stats` of each row of ``logits`` ``[..., K]`` (classes last).

    Args:
      logits: float array in any float dtype, computed in ``dtype``.
      labels: ``[...]`` integer class ids (global ones with ``axis_name``), or None.
      weights: ``[K]`` class weights, ``[..., K]`` soft labels (``soft=True``), or None.
      mask: ``[..., K]`` boolean class mask, or None.
      cap: logit soft-cap (a scalar array), or None.
      rows: ``[...]`` boolean, the rows the loss uses (others get zero gradient), or None.
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


def _softmax_stats_fwd(logits, labels, weights, mask, cap, rows, dtype, sums, soft, axis_name,
                       method):  # fmt: skip
    st = softmax_stats(
        logits, labels, weights, mask, cap, rows, dtype, sums, soft, axis_name, method
    )
    # Residuals: the inputs as given (bf16 stays bf16) and two floats per row, the shift and
    # the shifted log-sum-exp; the softmax is recomputed in the backward pass.
    return st, (logits, labels, weights, mask, cap, rows, st.shift, st.lse)


def _softmax_stats_bwd(dtype, sums, soft, axis_name, method, res, g):
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


softmax_stats.defvjp(_softmax_stats_fwd, _softmax_stats_bwd)
