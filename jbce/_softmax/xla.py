"""Softmax statistics of materialised logits in plain XLA, with lean derivatives.

The implementation behind :func:`jbce.softmax_cross_entropy`,
:func:`jbce.softmax_cross_entropy_with_integer_labels` and the integer-label focal loss, on
every platform. One max-shifted log-sum-exp pass over the logits
(:func:`jbce._softmax.stats.block_stats`); with ``axis_name`` the class axis is sharded and
each shard's statistics are merged with one ``pmax`` and one ``psum``
(:func:`jbce._softmax.stats.combine_over_axis`), so the logits are never gathered.

The derivatives of local logits are one tangent map, linear in the tangents
(:func:`jbce._softmax.stats.stats_tangent`, :mod:`jbce._core.autodiff`): forward mode
evaluates it and reverse mode is its transpose, which recomputes the softmax from the logits
and the saved shift and log-sum-exp; second derivatives differentiate the map.

The sharded case (``axis_name``) is a ``custom_vjp`` whose backward pass is the same
formula (:func:`jbce._softmax.stats.logits_grad`): a tangent map would need a ``psum`` of
the per-row tangents, whose transpose is again a ``psum`` under ``pmap`` (every gradient n
times too large on n devices), while the hand-written backward pass needs no communication
and is right under ``pmap`` and ``shard_map`` alike. It has reverse-mode derivatives only
(JAX refuses forward mode on a ``custom_vjp``), to any order: the backward pass is plain
``jnp``, and the forward rule computes the statistics it saves through the custom VJP
itself, so that a second derivative (``jax.jacrev(jax.grad(f))``) differentiates them by
this rule too rather than holding them constant.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jbce._core import autodiff, sharding
from jbce._core.dtypes import to_compute
from jbce._softmax import stats as _stats


@dataclasses.dataclass(frozen=True)
class Options:
    """The static options of :func:`softmax_stats` (hashable: the custom-derivative cores
    take them as one non-differentiable argument).

    Attributes:
      dtype: the compute dtype.
      sums: also compute ``logit_sum``, ``weight_sum`` and ``count`` (label smoothing, soft
        labels; :func:`jbce._softmax.stats.block_stats`).
      soft: the weights are probability targets.
      axis_name: the mesh axis the class axis is sharded over, or None.
      method: how the log-sum-exp is reduced (:func:`jbce._softmax.stats.row_reduce`).
    """

    dtype: jnp.dtype
    sums: bool = False
    soft: bool = False
    axis_name: str | None = None
    method: str | None = None


def _softmax_stats(logits, labels, weights, mask, cap, rows, opts: Options):
    """:class:`jbce._softmax.stats.Stats` of each row of ``logits`` ``[..., K]`` (classes last).

    Args:
      logits: float array in any float dtype, computed in ``opts.dtype``.
      labels: ``[...]`` integer class ids (global ones with ``axis_name``), or None.
      weights: ``[K]`` class weights, ``[..., K]`` soft labels (``soft=True``), or None.
      mask: ``[..., K]`` boolean class mask, or None.
      cap: logit soft-cap (a scalar array), or None.
      rows: ``[...]`` boolean, the rows the loss uses (others get zero derivatives), or None.
      opts: :class:`Options`.
    """
    y = sharding.local_labels(labels, logits.shape[-1], opts.axis_name)
    st = _stats.block_stats(
        logits, y, to_x=_to_x(opts.dtype, cap), weights=weights,
        to_w=lambda v: to_compute(v, opts.dtype), mask=mask, sums=opts.sums, soft=opts.soft,
        method=opts.method,
    )  # fmt: skip
    return st if opts.axis_name is None else _stats.combine_over_axis(st, opts.axis_name)


def _to_x(dtype, cap):
    """The logits as the loss sees them: in the compute dtype, soft-capped."""
    return lambda v: _stats.softcap(to_compute(v, dtype), cap)


def _softmax_stats_tangent(primals, saved, tangents, opts: Options):
    logits, labels, weights, mask, cap, rows = primals
    dlogits, _, dweights, _, dcap, _ = tangents
    z = to_compute(logits, opts.dtype)
    x = _stats.softcap(z, cap)
    dx = _stats.softcap_jvp(z, cap, dlogits, dcap, rows)
    w = None if weights is None else to_compute(weights, opts.dtype)
    dw = None if dweights is None else dweights.astype(opts.dtype)
    y = sharding.local_labels(labels, x.shape[-1], opts.axis_name)
    return _stats.stats_tangent(
        x, y, _stats.Stats(*saved, None), (dx, dw), weights=w, masks=(mask, rows),
        sums=opts.sums, soft=opts.soft,
    )  # fmt: skip


# Residuals in reverse mode: the inputs as given (bf16 stays bf16) and two floats per row, the
# shift and the shifted log-sum-exp; the softmax is recomputed in the backward pass.
_local_stats = autodiff.lean_jvp(
    _softmax_stats, _softmax_stats_tangent, num_static=1, saved=lambda st: (st.shift, st.lse)
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _sharded_stats(logits, labels, weights, mask, cap, rows, opts: Options):
    return _softmax_stats(logits, labels, weights, mask, cap, rows, opts)


def _sharded_stats_fwd(logits, labels, weights, mask, cap, rows, opts: Options):
    # The statistics through the custom VJP itself: differentiated again (a second
    # derivative), the saved statistics get their own derivative from this rule.
    st = _sharded_stats(logits, labels, weights, mask, cap, rows, opts)
    # The same residuals as the local case's: the inputs and two floats per row.
    return st, (logits, labels, weights, mask, cap, rows, st.shift, st.lse)


def _sharded_stats_bwd(opts: Options, res, g):
    logits, labels, weights, mask, cap, rows, shift, lse = res
    z = to_compute(logits, opts.dtype)
    x = _stats.softcap(z, cap)
    w = None if weights is None else to_compute(weights, opts.dtype)
    y = sharding.local_labels(labels, x.shape[-1], opts.axis_name)
    saved = _stats.Stats(shift, lse, None)
    dx, dw = _stats.logits_grad(x, y, saved, g, weights=w, mask=mask, rows=rows, soft=opts.soft)
    dz, dcap = _stats.softcap_vjp(z, cap, dx)
    return autodiff.cotangents(
        (logits, dz), (labels, None), (weights, dw), (mask, None), (cap, dcap), (rows, None),
    )  # fmt: skip


_sharded_stats.defvjp(_sharded_stats_fwd, _sharded_stats_bwd)


def softmax_stats(logits, labels, weights, mask, cap, rows, opts: Options):
    """:func:`_softmax_stats` with its derivatives: forward and reverse mode to any order for
    local logits, first-order reverse mode with ``axis_name`` (see the module docstring)."""
    core = _local_stats if opts.axis_name is None else _sharded_stats
    return core(logits, labels, weights, mask, cap, rows, opts)
