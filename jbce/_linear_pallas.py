"""Fused linear + softmax statistics as Pallas kernels: the logits tiles never leave the chip.

``implementation="pallas"`` of :func:`jbce.linear_softmax_cross_entropy`. The kernels
compute the same per-token :class:`jbce._stats.Stats` as the XLA tiled loop
(:mod:`jbce._linear_xla`), so the loss is assembled from them by the same code and every
option means the same thing; only where the ``[token_block, vocab_block]`` tiles live
differs: in registers / shared memory (GPU, :mod:`jbce._linear_pallas_gpu`, the Triton
lowering) or VMEM (TPU, :mod:`jbce._linear_pallas_tpu`, Mosaic), never in HBM. The tile math
both share is :mod:`jbce._linear_pallas_tiles`.

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
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jbce import _linear_pallas_gpu as gpu
from jbce import _linear_pallas_tpu as tpu
from jbce import _linear_xla, _stats, _vma

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


def check_options(
    implementation, chunk_size, gradient_filter, dtype, class_weights=None, smoothing=False
) -> None:
    """Errors for options the Pallas implementation does not take (or only it takes);
    ``smoothing``: whether the loss has a label-smoothing term (a nonzero or traced
    ``label_smoothing``)."""
    if implementation != "pallas":
        if gradient_filter is not None:
            raise ValueError(
                'gradient_filter applies to implementation="pallas" only; '
                f"got implementation={implementation!r}"
            )
        return
    if class_weights is not None and smoothing:
        raise ValueError(
            'class_weights with label smoothing are not supported with implementation="pallas" '
            "yet (the kernels' smoothing sums are unweighted); got class_weights of shape "
            f"{class_weights.shape} and a nonzero or traced label_smoothing (use "
            'implementation="xla", or label_smoothing=0)'
        )
    if chunk_size is not None:
        raise ValueError(
            'chunk_size must be None with implementation="pallas" (the kernels choose their '
            f"own block sizes); got {chunk_size!r}"
        )
    if gradient_filter is not None and (
        not isinstance(gradient_filter, (int, float))
        or isinstance(gradient_filter, bool)
        or not 0 <= gradient_filter <= 1
    ):
        raise ValueError(
            "gradient_filter must be None or a Python number in [0, 1] (a probability "
            f"threshold); got {gradient_filter!r}"
        )
    if jnp.dtype(dtype) != jnp.float32:
        raise ValueError(
            'implementation="pallas" computes in float32 (float32, bfloat16 or float16 '
            f'inputs); got inputs computed in {jnp.dtype(dtype).name} (use implementation="xla")'
        )


def _column(a, dtype):
    return a.reshape(-1, 1).astype(dtype)


def _gpu_stats(hidden, weight, bias, labels, cap, *, sums, interpret, blocks=None):
    n, v = hidden.shape[0], weight.shape[1]
    h, w, b, y, _ = gpu.pad(hidden, weight, bias, labels)
    out = gpu.forward(h, w, b, y, cap, v=v, sums=sums, interpret=interpret, blocks=blocks)
    return tuple(o[:n, 0] for o in out)


def _tpu_stats(hidden, weight, bias, labels, cap, *, sums, interpret, blocks=None):
    out = tpu.forward(
        hidden, weight, bias, labels, cap, sums=sums, interpret=interpret, blocks=blocks
    )
    return tuple(o[:, 0] for o in out)


def _xla(hidden, weight, bias, labels, cap, rows, sums):
    """The XLA tiled loop's statistics as a function of (hidden, weight, bias, cap)."""
    n, v = hidden.shape[0], weight.shape[1]
    tn, tv = _linear_xla.tile_sizes(n, v, None)

    def stats(h, w, b, c):
        return _linear_xla.linear_stats(
            h, w, b, labels, None, c, rows, jnp.float32, tn, tv, sums, None
        )

    return stats, (
        hidden,
        weight,
        None if bias is None else bias[0],
        None if cap is None else cap[0, 0],
    )


def _xla_stats(hidden, weight, bias, labels, cap, *, sums):
    stats, args = _xla(hidden, weight, bias, labels[:, 0], cap, None, sums)
    st = stats(*args)
    return tuple(
        f for f in (st.shift, st.lse, st.target, st.logit_sum, st.weight_sum) if f is not None
    )


def _stats_fields(hidden, weight, bias, labels, cap, sums, interpret):
    kw = dict(sums=sums)
    if interpret is not None:
        platform, blocks = interpret
        fn = _gpu_stats if platform == "gpu" else _tpu_stats
        return fn(hidden, weight, bias, labels, cap, interpret=True, blocks=blocks, **kw)
    return lax.platform_dependent(
        hidden, weight, bias, labels, cap,
        cuda=functools.partial(_gpu_stats, interpret=False, **kw),
        tpu=functools.partial(_tpu_stats, interpret=False, **kw),
        default=functools.partial(_xla_stats, **kw),
    )  # fmt: skip


def _operands(hidden, weight, bias, labels, cap):
    """The kernels' layout: bias ``[1, V]``, labels ``[N, 1]`` int32, cap ``[1, 1]`` f32.

    Inside ``shard_map`` every operand is marked varying over each mesh axis one of them
    varies on, so that each platform's branch computes this shard's partial results with
    one type (gradients of replicated inputs are summed over the shards afterwards)."""
    ops = (
        hidden,
        weight,
        None if bias is None else bias.reshape(1, -1),
        labels.reshape(-1, 1).astype(jnp.int32),
        None if cap is None else jnp.asarray(cap, jnp.float32).reshape(1, 1),
    )
    vary = _vma.varying_like(*ops)
    return tuple(None if a is None else vary(a) for a in ops)


def _label_weights(y, class_weights):
    """``w_y`` per token from this shard's classes (0 for a label outside them, e.g.
    ``ignore_index``): the :class:`jbce._stats.Stats` field ``target_weight``. Without label
    smoothing it is the only place class weights enter the loss, so it is taken outside the
    kernels (a gather of N weights; its gradient a scatter-add onto the labels' classes)."""
    v = class_weights.shape[0]
    here = (y >= 0) & (y < v)
    zero = jnp.zeros((), class_weights.dtype)
    return jnp.where(here, class_weights[jnp.clip(y, 0, v - 1)], zero), here


def _local_labels(labels, v_local, axis_name):
    if axis_name is None:
        return labels
    return labels - lax.axis_index(axis_name).astype(labels.dtype) * v_local


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def linear_stats(
    hidden, weight, bias, labels, class_weights, cap, rows, sums, threshold, axis_name, interpret
):
    """Per-token :class:`jbce._stats.Stats` (float32) of ``hidden @ weight + bias``
    (``[N, D]``, ``[D, V]``, ``[V]``), with ``class_weights`` ``[V]`` or None (without
    ``sums`` only); ``rows`` (``[N]`` bool or None) are the tokens the
    loss uses (the others get zero gradient); ``sums``: also ``logit_sum``, ``weight_sum``
    and ``count`` (label smoothing); ``threshold``: gradient filtering (None: off);
    ``interpret``: None (compiled kernels, picked per platform) or :func:`interpreting`'s
    ``(platform, block_sizes)`` (that platform's kernels in interpret mode). With ``axis_name``, as
    :func:`jbce._linear_xla.linear_stats`."""
    del rows, threshold  # the backward pass's
    y = _local_labels(labels, weight.shape[1], axis_name)
    ops = _operands(hidden, weight, bias, y, cap)
    fields = _stats_fields(*ops, sums, interpret)
    shift, lse, target = fields[:3]
    st = _stats.Stats(shift, lse, target)
    if sums:
        st = _stats.Stats(shift, lse, target, fields[3], fields[4], None, fields[4])
    if class_weights is not None:
        st = st._replace(target_weight=_label_weights(y, class_weights)[0])
    return st if axis_name is None else _stats.combine_over_axis(st, axis_name)


def _fwd(
    hidden, weight, bias, labels, class_weights, cap, rows, sums, threshold, axis_name, interpret
):
    st = linear_stats(
        hidden, weight, bias, labels, class_weights, cap, rows, sums, threshold, axis_name,
        interpret,
    )  # fmt: skip
    # Residuals: the inputs and two floats per token; each tile is recomputed backward.
    return st, (hidden, weight, bias, labels, class_weights, cap, rows, st.shift, st.lse)


def _gpu_grads(hidden, weight, bias, labels, cap, rows, *, sums, threshold, interpret, blocks=None):
    n, d = hidden.shape
    v = weight.shape[1]
    h, w, b, y, rows_p = gpu.pad(hidden, weight, bias, labels, rows[0])
    rows = (rows_p, *(jnp.pad(r, ((0, h.shape[0] - n), (0, 0))) for r in rows[1:]))
    dh, dw, db, dcap = gpu.backward(
        h,
        w,
        b,
        y,
        cap,
        rows,
        v=v,
        sums=sums,
        threshold=threshold,
        interpret=interpret,
        blocks=blocks,
    )
    return (
        dh[:n, :d],
        dw[:d, :v],
        None if db is None else db[0, :v],
        None if dcap is None else jnp.sum(dcap),
    )


def _tpu_grads(hidden, weight, bias, labels, cap, rows, *, sums, threshold, interpret, blocks=None):
    dh, dw, db, dcap = tpu.backward(
        hidden, weight, bias, labels, cap, rows, sums=sums, threshold=threshold,
        interpret=interpret, blocks=blocks,
    )  # fmt: skip
    return dh, dw, None if db is None else db[0], None if dcap is None else jnp.sum(dcap)


def _xla_grads(hidden, weight, bias, labels, cap, rows, *, sums, threshold):
    del threshold  # the XLA loop has no filtering: its gradient is the exact one
    keep, _, _, g_lse, g_t, *g_s = (r[:, 0] for r in rows)
    stats, args = _xla(hidden, weight, bias, labels[:, 0], cap, keep != 0, sums)
    st, vjp = jax.vjp(stats, *args)
    g = jax.tree.map(jnp.zeros_like, st)._replace(lse=g_lse, target=g_t)
    if g_s:
        g = g._replace(logit_sum=g_s[0])
    # Inside shard_map the cotangents take the (per-shard) statistics' mesh-axis types.
    g = jax.tree.map(_vma.pvary_like, g, st)
    dh, dw, db, dcap = vjp(g)
    return dh, dw, db, dcap


def _bwd(sums, threshold, axis_name, interpret, res, g):
    hidden, weight, bias, labels, class_weights, cap, rows, shift, lse = res
    n = hidden.shape[0]
    y = _local_labels(labels, weight.shape[1], axis_name)
    dcw = None
    if class_weights is not None:
        _, here = _label_weights(y, class_weights)
        used = here if rows is None else here & rows
        g_w = jnp.where(used, g.target_weight, jnp.zeros((), g.target_weight.dtype))
        v = class_weights.shape[0]
        dcw = jnp.zeros((v,), jnp.float32).at[jnp.clip(y, 0, v - 1)].add(g_w)
    ops = _operands(hidden, weight, bias, y, cap)
    keep = jnp.ones((n, 1), jnp.int32) if rows is None else _column(rows, jnp.int32)
    cols = [keep] + [_column(a, jnp.float32) for a in (shift, lse, g.lse, g.target)]
    if sums:
        cols.append(_column(g.logit_sum, jnp.float32))
    # With label smoothing every class has a gradient (e / K each): no tile is negligible.
    kw = dict(sums=sums, threshold=None if sums else threshold)
    if interpret is not None:
        platform, blocks = interpret
        fn = _gpu_grads if platform == "gpu" else _tpu_grads
        dh, dw, db, dcap = fn(*ops, tuple(cols), interpret=True, blocks=blocks, **kw)
    else:
        dh, dw, db, dcap = lax.platform_dependent(
            *ops, tuple(cols),
            cuda=functools.partial(_gpu_grads, interpret=False, **kw),
            tpu=functools.partial(_tpu_grads, interpret=False, **kw),
            default=functools.partial(_xla_grads, **kw),
        )  # fmt: skip
    # Inside shard_map an input replicated over a mesh axis its gradient varies on gets the
    # sum over it (as in the XLA implementation).
    like = _vma.psum_to_like
    return (
        like(dh.astype(hidden.dtype), hidden),
        like(dw.astype(weight.dtype), weight),
        None if bias is None else like(db.astype(bias.dtype), bias),
        jnp.zeros(labels.shape, jax.dtypes.float0),
        None if dcw is None else like(dcw.astype(class_weights.dtype), class_weights),
        None if cap is None else like(jnp.asarray(dcap, cap.dtype).reshape(cap.shape), cap),
        None if rows is None else jnp.zeros(rows.shape, jax.dtypes.float0),
    )


linear_stats.defvjp(_fwd, _bwd)
