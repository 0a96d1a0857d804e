"""Fused linear + softmax statistics as Pallas kernels: the logits tiles never leave the chip.

``implementation="pallas"`` of :func:`jbce.linear_softmax_cross_entropy`. The kernels
compute the same per-token :class:`jbce._softmax.stats.Stats` as the XLA tiled loop
(:mod:`jbce._linear.chunked_xla`), so the loss is assembled from them by the same code and every
option means the same thing; only where the ``[token_block, vocab_block]`` tiles live
differs: in registers / shared memory (GPU, :mod:`jbce._linear.pallas_triton`, the Triton
lowering) or VMEM (TPU, :mod:`jbce._linear.pallas_mosaic_tpu`, Mosaic), never in HBM. The tile math
both share is :mod:`jbce._linear.pallas_tiles`.

The kernel is picked when the program is lowered (:func:`jax.lax.platform_dependent`):
the GPU kernel on CUDA, the TPU kernel on TPU, and elsewhere (CPU) the XLA tiled loop, as
Pallas has no compiled CPU backend. ``pallas_call`` cannot be differentiated, so the
statistics have their own ``custom_vjp``: residuals are the inputs and two floats per token
(shift and log-sum-exp); the backward kernels recompute each tile.

Tests run the kernels on a CPU in Pallas interpret mode with :func:`interpret`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jbce._core import autodiff, sharding
from jbce._linear import chunked_xla, walk
from jbce._linear import pallas_mosaic_tpu as tpu
from jbce._linear import pallas_tiles as tiles
from jbce._linear import pallas_triton as gpu
from jbce._softmax import stats as _stats

PLATFORMS = ("gpu", "tpu")
_INTERPRET: contextvars.ContextVar[tuple | None] = contextvars.ContextVar(
    "jbce_pallas_interpret", default=None
)


@contextlib.contextmanager
def interpret(platform: str, *, block_sizes: tuple[int, ...] | None = None):
    """Within the block, ``implementation="pallas"`` runs ``platform``'s kernels (``"gpu"`` or
    ``"tpu"``) in Pallas interpret mode on any backend (slow; for tests).

    ``block_sizes`` caps the kernels' blocks, so that small inputs still span several ragged
    blocks: ``(tn, tv, tk, td)`` for the GPU kernels (powers of two >= 16), ``(tn, tv)`` for
    the TPU kernels (multiples of 8 and 128). Read when a call is traced: a function jitted
    inside the block keeps the interpreted kernels.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}; got {platform!r}")
    token = _INTERPRET.set((platform, None if block_sizes is None else tuple(block_sizes)))
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def interpreting() -> tuple | None:
    """``(platform, block_sizes)`` as :func:`interpret` set them, or None (compiled kernels)."""
    return _INTERPRET.get()


def _column(a, dtype):
    return a.reshape(-1, 1).astype(dtype)


def _gpu_stats(ops: tiles.Operands, call: tiles.Call):
    n = ops.hidden.shape[0]
    padded, _ = gpu.pad(ops)
    out = gpu.forward(padded, dataclasses.replace(call, v=ops.weight.shape[1]))
    return tuple(o[:n, 0] for o in out)


def _tpu_stats(ops: tiles.Operands, call: tiles.Call):
    return tuple(o[:, 0] for o in tpu.forward(ops, call))


def _xla(ops: tiles.Operands, rows, sums: bool):
    """The XLA tiled loop's statistics as a function of (hidden, weight, bias, cap, class
    weights), and those arguments from the kernels' layout."""
    hidden, weight, bias, labels, cap, cw = ops
    tile_sizes = walk.tile_sizes(hidden.shape[0], weight.shape[1], None, "cross_entropy")
    ce = chunked_xla.CrossEntropy(walk.Walk(jnp.float32, tile_sizes), sums)

    def stats(h, w, b, c, k):
        return chunked_xla.linear_stats(h, w, b, labels[:, 0], k, c, rows, ce)

    return stats, (
        hidden,
        weight,
        None if bias is None else bias[0],
        None if cap is None else cap[0, 0],
        None if cw is None else cw[0],
    )


def _xla_stats(ops: tiles.Operands, sums: bool):
    stats, args = _xla(ops, None, sums)
    st = stats(*args)
    fields = (st.shift, st.lse, st.target, st.logit_sum, st.weight_sum)
    fields = tuple(f for f in fields if f is not None)
    return fields if ops.cw is None else (*fields, st.count)  # as the kernels: see linear_stats


def _by_platform(args: tuple, call: tiles.Call, interpret, fns):
    """``fns`` = (GPU, TPU, elsewhere) applied to ``(*args, call)`` (elsewhere: to
    ``(*args, call.sums)``): the interpreted platform's with ``interpret`` (:func:`interpreting`'s
    pair), else chosen when the program is lowered (elsewhere the XLA loop: Pallas has no
    compiled CPU backend)."""
    gpu_fn, tpu_fn, xla_fn = fns
    if interpret is not None:
        platform, blocks = interpret
        fn = gpu_fn if platform == "gpu" else tpu_fn
        return fn(*args, dataclasses.replace(call, interpret=True, blocks=blocks))
    return lax.platform_dependent(
        *args,
        cuda=lambda *a: gpu_fn(*a, call),
        tpu=lambda *a: tpu_fn(*a, call),
        default=lambda *a: xla_fn(*a, call.sums),
    )


def _operands(hidden, weight, bias, labels, cap, class_weights) -> tiles.Operands:
    """The kernels' layout (:class:`jbce._linear.pallas_tiles.Operands`): bias ``[1, V]``,
    labels ``[N, 1]`` int32, cap ``[1, 1]`` f32, class weights ``[1, V]`` f32 (None: the
    kernels' smoothing sums are unweighted).

    Inside ``shard_map`` every operand is marked varying over each mesh axis one of them
    varies on, so that each platform's branch computes this shard's partial results with
    one type (gradients of replicated inputs are summed over the shards afterwards)."""
    ops = tiles.Operands(
        hidden,
        weight,
        None if bias is None else bias.reshape(1, -1),
        labels.reshape(-1, 1).astype(jnp.int32),
        None if cap is None else jnp.asarray(cap, jnp.float32).reshape(1, 1),
        None if class_weights is None else class_weights.reshape(1, -1).astype(jnp.float32),
    )
    vary = sharding.varying_like(*ops)
    return tiles.Operands(*(None if a is None else vary(a) for a in ops))


def _label_weights(y, class_weights):
    """``w_y`` per token from this shard's classes (0 for a label outside them, e.g.
    ``ignore_index``): the :class:`jbce._softmax.stats.Stats` field ``target_weight``, taken outside
    the kernels (a gather of N weights; its gradient a scatter-add onto the labels'
    classes). With label smoothing the class weights also enter the smoothing sums
    ``logit_sum`` and ``weight_sum``, which the kernels compute (:func:`linear_stats`)."""
    v = class_weights.shape[0]
    here = (y >= 0) & (y < v)
    zero = jnp.zeros((), class_weights.dtype)
    return jnp.where(here, class_weights[jnp.clip(y, 0, v - 1)], zero), here


def _summed_weights(class_weights, sums):
    """The class weights the kernels' smoothing sums take: only with ``sums`` (without label
    smoothing they enter through ``w_y`` alone, and the kernels get no extra operand)."""
    return class_weights if sums else None


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The static options of :func:`linear_stats`.

    Attributes:
      sums: also ``logit_sum``, ``weight_sum`` and ``count`` (label smoothing), weighted by
        the class weights.
      threshold: gradient filtering (None: off; ``gradient_filter`` of the API).
      axis_name: the mesh axis the vocabulary is sharded over, or None.
      interpret: None (compiled kernels, picked per platform) or :func:`interpreting`'s
        ``(platform, block_sizes)`` (that platform's kernels in interpret mode).
    """

    sums: bool
    threshold: float | None = None
    axis_name: str | None = None
    interpret: tuple | None = None


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def linear_stats(hidden, weight, bias, labels, class_weights, cap, rows, kernels: Kernels):
    """Per-token :class:`jbce._softmax.stats.Stats` (float32) of ``hidden @ weight + bias``
    (``[N, D]``, ``[D, V]``, ``[V]``), with ``class_weights`` ``[V]`` or None; ``rows``
    (``[N]`` bool or None) are the tokens the loss uses (the others get zero gradient).
    With ``kernels.axis_name``, as :func:`jbce._linear.chunked_xla.linear_stats`."""
    del rows  # the backward pass's
    sums, axis_name = kernels.sums, kernels.axis_name
    y = sharding.local_labels(labels, weight.shape[1], axis_name)
    cw = _summed_weights(class_weights, sums)
    ops = _operands(hidden, weight, bias, y, cap, cw)
    fields = _by_platform(
        (ops,), tiles.Call(sums), kernels.interpret, (_gpu_stats, _tpu_stats, _xla_stats)
    )
    st = _stats.Stats(*fields[:3])
    if sums:
        # Without class weights weight_sum is the number of included classes: the count.
        count = fields[4] if cw is None else fields[5]
        st = _stats.Stats(*fields[:5], None, count)
    if class_weights is not None:
        st = st._replace(target_weight=_label_weights(y, class_weights)[0])
    return st if axis_name is None else _stats.combine_over_axis(st, axis_name)


def _fwd(hidden, weight, bias, labels, class_weights, cap, rows, kernels: Kernels):
    st = linear_stats(hidden, weight, bias, labels, class_weights, cap, rows, kernels)
    # Residuals: the inputs and two floats per token; each tile is recomputed backward.
    return st, (hidden, weight, bias, labels, class_weights, cap, rows, st.shift, st.lse)


def _gpu_grads(ops: tiles.Operands, rows, call: tiles.Call):
    n, d = ops.hidden.shape
    v = ops.weight.shape[1]
    padded, keep = gpu.pad(ops, rows[0])
    rows = (keep, *(jnp.pad(r, ((0, padded.hidden.shape[0] - n), (0, 0))) for r in rows[1:]))
    dh, dw, db, dcap, dcw = gpu.backward(padded, rows, dataclasses.replace(call, v=v))
    return (
        dh[:n, :d],
        dw[:d, :v],
        None if db is None else db[0, :v],
        None if dcap is None else jnp.sum(dcap),
        None if dcw is None else dcw[0, :v],
    )


def _tpu_grads(ops: tiles.Operands, rows, call: tiles.Call):
    dh, dw, db, dcap, dcw = tpu.backward(ops, rows, call)
    return (
        dh,
        dw,
        None if db is None else db[0],
        None if dcap is None else jnp.sum(dcap),
        None if dcw is None else dcw[0],
    )


def _xla_grads(ops: tiles.Operands, rows, sums: bool):
    # The XLA loop has no filtering: its gradient is the exact one.
    keep, _, _, g_lse, g_t, *g_sums = (r[:, 0] for r in rows)
    stats, args = _xla(ops, keep != 0, sums)
    st, vjp = jax.vjp(stats, *args)
    # The target_weight cotangent stays 0: w_y's gradient is taken outside (see _bwd).
    g = jax.tree.map(jnp.zeros_like, st)._replace(lse=g_lse, target=g_t)
    if g_sums:
        g = g._replace(logit_sum=g_sums[0])
    if ops.cw is not None:
        g = g._replace(weight_sum=g_sums[1])
    # Inside shard_map the cotangents take the (per-shard) statistics' mesh-axis types.
    g = jax.tree.map(sharding.pvary_like, g, st)
    dh, dw, db, dcap, dcw = vjp(g)
    return dh, dw, db, dcap, dcw


# The backward kernels are not derived for second derivatives (a pallas_call has no JVP rule
# to differentiate them by): differentiating the backward pass raises this error first.
_SECOND_ORDER = autodiff.first_order_only(
    "linear_softmax_cross_entropy",
    'implementation="xla", the default (jax.jacrev(jax.grad(f)) works there)',
)


def _bwd(kernels: Kernels, res, g):
    sums, threshold, axis_name, interpret = (
        kernels.sums, kernels.threshold, kernels.axis_name, kernels.interpret
    )  # fmt: skip
    res, g = _SECOND_ORDER((res, g))
    hidden, weight, bias, labels, class_weights, cap, rows, shift, lse = res
    n = hidden.shape[0]
    y = sharding.local_labels(labels, weight.shape[1], axis_name)
    cw = _summed_weights(class_weights, sums)
    ops = _operands(hidden, weight, bias, y, cap, cw)
    keep = jnp.ones((n, 1), jnp.int32) if rows is None else _column(rows, jnp.int32)
    per_row = [shift, lse, g.lse, g.target]
    if sums:
        per_row.append(g.logit_sum)
    if cw is not None:  # the smoothing sums' class weights: d class weights needs d W too
        per_row.append(g.weight_sum)
    cols = tuple([keep] + [_column(a, jnp.float32) for a in per_row])
    # With label smoothing every class has a gradient (e / K each): no tile is negligible.
    call = tiles.Call(sums, None if sums else threshold)
    fns = (_gpu_grads, _tpu_grads, _xla_grads)
    dh, dw, db, dcap, dcw = _by_platform((ops, cols), call, interpret, fns)
    if class_weights is not None:
        # w_y's share: a scatter-add of the target_weight cotangents onto the labels' classes
        # (added to the smoothing sums' share from the kernels, if any).
        _, here = _label_weights(y, class_weights)
        used = here if rows is None else here & rows
        g_w = jnp.where(used, g.target_weight, jnp.zeros((), g.target_weight.dtype))
        v = class_weights.shape[0]
        base = jnp.zeros((v,), jnp.float32) if dcw is None else dcw.astype(jnp.float32)
        dcw = base.at[jnp.clip(y, 0, v - 1)].add(g_w)
    return autodiff.cotangents(
        (hidden, dh), (weight, dw), (bias, db), (labels, None), (class_weights, dcw),
        (cap, None if cap is None else jnp.asarray(dcap).reshape(cap.shape)), (rows, None),
    )  # fmt: skip


linear_stats.defvjp(_fwd, _bwd)
