"""Fused linear + softmax statistics in plain XLA: tiles of ``hidden @ weight``, never all of it.

The implementation behind :func:`jbce.linear_softmax_cross_entropy` and
:func:`jbce.linear_log_probs` on every platform, on the walk every fused op shares
(:mod:`jbce._linear.walk`): what these ops pass in is what they compute of one tile.

- Forward: each tile's per-token statistics (:func:`jbce._softmax.stats.block_stats`, or
  :func:`jbce._softmax.entropy_stats.block_stats` for log-probabilities and entropy), merged
  into each token's running statistics (an online log-sum-exp) and, with ``axis_name``,
  combined over the vocabulary's shards. Only the per-token statistics leave the walk.
- Backward: each recomputed tile's slice of ``d logits`` (:func:`jbce._softmax.stats.logits_grad`,
  the formula every softmax loss uses, or :func:`jbce._softmax.entropy_stats.logits_grad`),
  with the soft-cap's and temperature's chain rule and the class weights' gradient.

Residuals: the inputs and two (cross-entropy) or three (log-probabilities and entropy)
floats per token. Second derivatives (reverse over reverse) are exact: each forward rule
calls its own ``custom_vjp`` for the saved statistics, so that they get their derivative,
and the backward walk is plain ``jnp``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jbce._core import autodiff, sharding
from jbce._linear import walk as _walk
from jbce._softmax import entropy_stats as _entropy_stats
from jbce._softmax import stats as _stats


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
    """The static options of :func:`linear_stats`: the walk, and whether the cross-entropy's
    smoothing sums (``logit_sum``, ``weight_sum``, ``count``) are kept too."""

    walk: _walk.Walk
    sums: bool = False


# --- softmax cross-entropy statistics (jbce.linear_softmax_cross_entropy) ----------------------
def _ce_init(n, dtype, sums, weighted):
    zero = jnp.zeros((n,), dtype)
    lse = jnp.full((n,), -jnp.inf, dtype)
    tw = zero if weighted else None
    if not sums:
        return _stats.Stats(zero, lse, zero, target_weight=tw)
    return _stats.Stats(zero, lse, zero, zero, zero, tw, zero)


def _ce_reduce(sums: bool, weighted: bool) -> _walk.Reduce:
    def tile_stats(t: _walk.Tile):
        (labels,), (cw,), (cap,) = t.rows, t.columns, t.params
        x = _stats.softcap(t.z[0], cap)
        return _stats.block_stats(x, t.local(labels), weights=cw, mask=t.fresh, sums=sums)

    def empty(n, dtype):
        return _ce_init(n, dtype, sums, weighted)

    return _walk.Reduce(tile_stats, _stats.merge, empty, _stats.combine_over_axis)


def _ce_tile_grad(t: _walk.Tile):
    (cw,), (cap,) = t.columns, t.params
    labels, rows, shift, lse, g = t.rows
    x = _stats.softcap(t.z[0], cap)
    saved = _stats.Stats(shift, lse, None)
    dx, dcw = _stats.logits_grad(
        x, t.local(labels), saved, g, weights=cw, mask=t.fresh, rows=t.kept(rows)
    )
    dz, dcap = _stats.softcap_vjp(t.z[0], cap, dx)
    return (dz,), (dcw,), (dcap,)


def _operands(hidden, weight, bias, rows, class_weights, cap):
    return _walk.Operands((_walk.Model(hidden, weight, bias),), rows, (class_weights,), (cap,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def linear_stats(hidden, weight, bias, labels, class_weights, cap, rows, ce: CrossEntropy):
    """Per-token :class:`jbce._softmax.stats.Stats` of ``hidden @ weight + bias`` (soft-capped
    with ``cap``), with ``class_weights`` ``[V]`` (or None); with ``ce.walk.axis_name``
    ``weight`` (and ``bias``, ``class_weights``) hold this shard's vocabulary columns, labels
    are global ids and the statistics are global (replicated). ``rows`` (``[N]`` boolean or
    None): the tokens the loss uses, the others get exactly zero gradient."""
    del rows  # the backward pass's
    walk = ce.walk
    y = sharding.local_labels(labels, weight.shape[1], walk.axis_name)
    ops = _operands(hidden, weight, bias, (y,), class_weights, cap)
    return _walk.forward(ops, _ce_reduce(ce.sums, class_weights is not None), walk)


def _linear_stats_fwd(hidden, weight, bias, labels, class_weights, cap, rows, ce: CrossEntropy):
    st = linear_stats(hidden, weight, bias, labels, class_weights, cap, rows, ce)
    # Residuals: the inputs and two floats per token; each tile is recomputed backward.
    return st, (hidden, weight, bias, labels, class_weights, cap, rows, st.shift, st.lse)


def _linear_stats_bwd(ce: CrossEntropy, res, g):
    hidden, weight, bias, labels, class_weights, cap, rows, shift, lse = res
    y = sharding.local_labels(labels, weight.shape[1], ce.walk.axis_name)
    ops = _operands(hidden, weight, bias, (y, rows, shift, lse, g), class_weights, cap)
    grad = _walk.Grad(
        _ce_tile_grad, ((True, True, True),), (class_weights is not None,), (cap is not None,)
    )
    out = _walk.backward(ops, grad, ce.walk)
    (dh, dw, db), (dcw,), (dcap,) = out.models[0], out.columns, out.params
    return autodiff.cotangents(
        (hidden, dh), (weight, dw), (bias, db), (labels, None), (class_weights, dcw), (cap, dcap),
        (rows, None),
    )  # fmt: skip


linear_stats.defvjp(_linear_stats_fwd, _linear_stats_bwd)


# --- log-probability and entropy statistics (jbce.linear_log_probs) ----------------------------
def _scaled(z, temperature):
    return z if temperature is None else z / temperature


def _entropy_tile_stats(t: _walk.Tile):
    (labels,), (temperature,) = t.rows, t.params
    return _entropy_stats.block_stats(_scaled(t.z[0], temperature), t.local(labels), mask=t.fresh)


_ENTROPY = _walk.Reduce(
    _entropy_tile_stats, _entropy_stats.merge, _entropy_stats.empty,
    _entropy_stats.combine_over_axis,
)  # fmt: skip


def _entropy_tile_grad(t: _walk.Tile):
    (temperature,) = t.params
    labels, used, saved, g = t.rows
    x = _scaled(t.z[0], temperature)
    dx = _entropy_stats.logits_grad(x, t.local(labels), saved, g, mask=t.fresh, rows=t.kept(used))
    if temperature is None:
        return (dx,), (), (None,)
    # x = z / T: d z = d x / T and d T = -sum(d x * x) / T (d x is 0 on -inf logits).
    dt = -jnp.sum(jnp.where(dx == 0, jnp.zeros((), dx.dtype), dx * x)) / temperature
    return (dx / temperature,), (), (dt,)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def linear_entropy_stats(hidden, weight, bias, labels, temperature, walk: _walk.Walk):
    """Per-token :class:`jbce._softmax.entropy_stats.EntropyStats` of
    ``(hidden @ weight + bias) / T`` (``temperature`` a scalar array, or None for 1); with
    ``walk.axis_name`` ``weight`` and ``bias`` hold this shard's vocabulary columns, labels
    are global ids and the statistics are global (replicated)."""
    y = sharding.local_labels(labels, weight.shape[1], walk.axis_name)
    ops = _walk.Operands((_walk.Model(hidden, weight, bias),), (y,), (), (temperature,))
    return _walk.forward(ops, _ENTROPY, walk)


def _linear_entropy_stats_fwd(hidden, weight, bias, labels, temperature, walk: _walk.Walk):
    st = linear_entropy_stats(hidden, weight, bias, labels, temperature, walk)
    # Residuals: the inputs and three floats per token (shift, shifted log-sum-exp and the
    # softmax mean of the shifted logits); each tile is recomputed backward.
    return st, (hidden, weight, bias, labels, temperature, st.shift, st.lse, st.mean)


def _linear_entropy_stats_bwd(walk: _walk.Walk, res, g):
    hidden, weight, bias, labels, temperature, shift, lse, mean = res
    y = sharding.local_labels(labels, weight.shape[1], walk.axis_name)
    saved = _entropy_stats.EntropyStats(shift, lse, None, mean)
    # Tokens whose statistics get no cotangent (masked out by the caller) get exactly zero
    # gradient, whatever their hidden state.
    used = (g.lse != 0) | (g.target != 0) | (g.mean != 0)
    ops = _walk.Operands(
        (_walk.Model(hidden, weight, bias),), (y, used, saved, g), (), (temperature,)
    )
    grad = _walk.Grad(_entropy_tile_grad, ((True, True, True),), (), (temperature is not None,))
    out = _walk.backward(ops, grad, walk)
    (dh, dw, db), (dt,) = out.models[0], out.params
    return autodiff.cotangents(
        (hidden, dh), (weight, dw), (bias, db), (labels, None), (temperature, dt)
    )


linear_entropy_stats.defvjp(_linear_entropy_stats_fwd, _linear_entropy_stats_bwd)
