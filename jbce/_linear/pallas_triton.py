"""The fused linear cross-entropy as Pallas kernels for GPUs (the Triton lowering).

Three kernels; each walks its tiles with loops inside the kernel, reading the operands
straight from HBM (the refs are whole arrays; every load is a ``pl.ds`` window):

- forward (grid: token blocks): for each vocabulary block, the logits tile is
  ``hidden[rows] @ weight[:, cols]`` (accumulated over ``tk``-wide slices of D, in
  float32) and folds into the rows' running statistics
  (:func:`jbce._linear.pallas_tiles.update_stats`); only the per-token statistics are
  written.
- d hidden (grid: token blocks x ``td``-wide slices of D): recomputes each tile, turns it
  into ``d logits`` and accumulates ``d logits @ weight[d_slice, cols].T``; it also writes
  each row's share of ``d logit_softcap``.
- d weight, d bias (grid: vocabulary blocks x slices of D): the same over token blocks,
  accumulating ``hidden[rows, d_slice].T @ d logits`` (and, with class weights and label
  smoothing, their share of ``d class_weights``: a ``[1, V]`` sum over the tokens).

Ragged sizes are handled without padding an operand: the last block of an axis is moved
back to end at the axis' size and overlaps its predecessor (the overlap is masked out of
the statistics and the reductions; overlapping outputs are written twice with the same
values). Only tiny axes (fewer than 16 tokens or classes, or a D that is not a multiple of
16, the Triton ``dot``'s minimum) are padded by the caller (:func:`pad`).

Block sizes (powers of two, as Triton requires): ``TN`` tokens x ``TV`` classes per tile,
``TK`` of D per ``dot``, ``TD`` of D per backward program. They are starting points, not
tuned on hardware (no GPU was available when they were chosen).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jbce._linear import pallas_tiles as tiles

TN = 64
TV = 128
TK = 64
TD = 256
MIN_BLOCK = 16  # the smallest dimension of a Triton dot
NUM_WARPS = 4
NUM_STAGES = 2


def _floor_pow2(x: int) -> int:
    return 1 << (x.bit_length() - 1)


def block_sizes(n: int, d: int, v: int, caps=None) -> tuple[int, int, int, int]:
    """(tn, tv, tk, td) for an ``[n, d] @ [d, v]`` problem already padded by :func:`pad`;
    ``caps`` replaces the maxima ``(TN, TV, TK, TD)``."""
    max_n, max_v, max_k, max_d = caps or (TN, TV, TK, TD)
    tn = min(max_n, _floor_pow2(n))
    tv = min(max_v, _floor_pow2(v))
    low = d & -d  # the largest power of two dividing d
    return tn, tv, min(max_k, low), min(max_d, low)


def pad_classes(row, vp: int):
    """A ``[1, V]`` per-class row (bias, class weights) padded with zeros to ``vp`` classes
    (:func:`pad`'s); None stays None."""
    if row is None or row.shape[1] == vp:
        return row
    return jnp.pad(row, ((0, 0), (0, vp - row.shape[1])))


def pad(ops: tiles.Operands, keep=None) -> tuple[tiles.Operands, jax.Array | None]:
    """Operands (and the ``[N, 1]`` row mask ``keep``, or None) padded where an axis is below
    16 or D isn't a multiple of 16 (zeros; padded classes are masked out by the kernels,
    padded tokens dropped by the caller)."""
    hidden, weight, labels = ops.hidden, ops.weight, ops.labels
    n, d = hidden.shape
    v = weight.shape[1]
    pn, pv, pd = max(0, MIN_BLOCK - n), max(0, MIN_BLOCK - v), -d % MIN_BLOCK
    if pn or pd:
        hidden = jnp.pad(hidden, ((0, pn), (0, pd)))
    if pv or pd:
        weight = jnp.pad(weight, ((0, pd), (0, pv)))
    if pn:
        labels = jnp.pad(labels, ((0, pn), (0, 0)), constant_values=-1)
        keep = None if keep is None else jnp.pad(keep, ((0, pn), (0, 0)))
    bias, cw = pad_classes(ops.bias, v + pv), pad_classes(ops.cw, v + pv)
    return ops._replace(hidden=hidden, weight=weight, bias=bias, labels=labels, cw=cw), keep


Static = tiles.Static


def _static(ops: tiles.Operands, call: tiles.Call, n_in: int) -> Static:
    n, d = ops.hidden.shape
    blocks = block_sizes(n, d, ops.weight.shape[1], call.blocks)
    return tiles.static(ops, call, n_in, dict(zip(("tn", "tv", "tk", "td"), blocks)))


def _start(i, size: int, total: int):
    """Start of block ``i``; the last block ends at ``total`` (overlapping its predecessor)."""
    return jnp.minimum(i * size, total - size)


def _logits(r: tiles.Refs, r0, c0, s: Static):
    """``hidden[r0:r0+tn] @ weight[:, c0:c0+tv] + bias`` in float32, D in ``tk`` slices."""
    tn, tv, tk = s.tn, s.tv, s.tk

    def step(k, acc):
        hk = r.h[pl.ds(r0, tn), pl.ds(k * tk, tk)]
        wk = r.w[pl.ds(k * tk, tk), pl.ds(c0, tv)]
        if hk.dtype != wk.dtype:
            hk, wk = hk.astype(jnp.float32), wk.astype(jnp.float32)
        return acc + tiles.matmul(hk, wk)

    z = lax.fori_loop(0, s.d // tk, step, jnp.zeros((tn, tv), jnp.float32))
    if r.b is not None:
        z = z + r.b[:, pl.ds(c0, tv)].astype(jnp.float32)
    return z


def _class_weights(r, c0, tv):
    """The class weights ``[1, tv]`` of columns ``c0:c0+tv``, or None without them."""
    return None if r.cw is None else r.cw[:, pl.ds(c0, tv)]


def _columns(j, c0, s: Static):
    """(columns ``[1, tv]`` of vocabulary block ``j`` starting at ``c0``, those it owns: real
    classes no earlier block had)."""
    cols = c0 + lax.broadcasted_iota(jnp.int32, (1, s.tv), 1)
    return cols, (cols >= j * s.tv) & (cols < s.v)


def _forward_kernel(*refs, s: Static):
    r = tiles.split_refs(refs, s)
    r0 = _start(pl.program_id(0), s.tn, s.n)
    y = r.y[pl.ds(r0, s.tn), :]
    cap = r.cap[...] if s.has_cap else None

    def vocab_block(j, acc):
        c0 = _start(j, s.tv, s.vp)
        z = _logits(r, r0, c0, s)
        cols, valid = _columns(j, c0, s)
        hit = (cols == y) & (y >= j * s.tv)
        cw = _class_weights(r, c0, s.tv)
        return tiles.update_stats(acc, tiles.softcap(z, cap), valid, hit, cw)

    acc = lax.fori_loop(0, pl.cdiv(s.vp, s.tv), vocab_block, tiles.empty(s.tn, s.sums, s.has_cw))
    for ref, val in zip(r.outs, tiles.finish(acc), strict=True):
        ref[pl.ds(r0, s.tn), :] = val


def _call(kernel, s: Static, call: tiles.Call, *, out_shape, grid, name):
    return tiles.pallas_call(
        functools.partial(kernel, s=s),
        out_shape=out_shape,
        grid=grid,
        compiler_params=plt.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=call.interpret,
        name=name,
    )


def _column(n):
    return jax.ShapeDtypeStruct((n, 1), jnp.float32)


def forward(ops: tiles.Operands, call: tiles.Call):
    """Per-token ``(shift, lse, target[, logit_sum, weight_sum[, count]])``, ``[n, 1]``
    float32 each, for padded operands (:func:`pad`; ``ops.cw`` the ``[1, vp]`` class weights
    of the smoothing sums, or None); ``call.v`` is the number of real classes."""
    args = ops.present()
    s = _static(ops, call, len(args))
    return _call(
        _forward_kernel, s, call,
        out_shape=[_column(s.n)] * tiles.fields(s.sums, s.has_cw),
        grid=(pl.cdiv(s.n, s.tn),),
        name="jbce_linear_ce_fwd_gpu",
    )(*args)  # fmt: skip


def _row_inputs(refs, r0, tn):
    """:func:`jbce._linear.pallas_tiles.row_columns` of rows ``r0:r0+tn``."""
    return tiles.row_columns([r[pl.ds(r0, tn), :] for r in refs])


def _dhidden_kernel(*refs, s: Static):
    r = tiles.split_refs(refs, s)
    dh_ref, dcap_ref = r.outs[0], r.outs[1] if s.has_cap else None
    i, kd = pl.program_id(0), pl.program_id(1)
    r0 = _start(i, s.tn, s.n)
    y = r.y[pl.ds(r0, s.tn), :]
    rows = _row_inputs(r.inputs, r0, s.tn)
    cap = r.cap[...] if s.has_cap else None

    def vocab_block(j, carry):
        acc, dcap = carry
        c0 = _start(j, s.tv, s.vp)
        z = _logits(r, r0, c0, s)
        cols, valid = _columns(j, c0, s)
        hit = (cols == y) & (y >= j * s.tv)
        x = tiles.softcap(z, cap)
        cw = _class_weights(r, c0, s.tv)
        dx, p = tiles.logits_grad(x, valid, hit, rows, cw)
        dz, dc = tiles.softcap_grad(z, cap, dx)
        if dc is not None:
            dcap = dcap + dc

        def add(acc):
            wd = r.w[pl.ds(kd * s.td, s.td), pl.ds(c0, s.tv)].astype(jnp.float32)
            return acc + tiles.matmul(dz, wd, transpose_b=True)

        if s.thr is None:
            return add(acc), dcap
        return lax.cond(tiles.small(p, hit, s.thr), lambda a: a, add, acc), dcap

    init = (jnp.zeros((s.tn, s.td), jnp.float32), jnp.zeros((s.tn, 1), jnp.float32))
    acc, dcap = lax.fori_loop(0, pl.cdiv(s.vp, s.tv), vocab_block, init)
    dh_ref[pl.ds(r0, s.tn), pl.ds(kd * s.td, s.td)] = acc.astype(dh_ref.dtype)
    if dcap_ref is not None:
        dcap_ref[pl.ds(r0, s.tn), :] = dcap


def _dweight_kernel(*refs, s: Static):
    r = tiles.split_refs(refs, s)
    dw_ref = r.outs[0]
    db_ref = r.outs[1] if s.has_bias else None
    dcw_ref = r.outs[1 + s.has_bias] if s.has_cw else None
    j, kd = pl.program_id(0), pl.program_id(1)
    c0 = _start(j, s.tv, s.vp)
    cols = c0 + lax.broadcasted_iota(jnp.int32, (1, s.tv), 1)
    valid = cols < s.v  # every real class of this block (overlapping ones too: same values)
    cap = r.cap[...] if s.has_cap else None
    cw = _class_weights(r, c0, s.tv)

    def token_block(i, carry):
        r0 = _start(i, s.tn, s.n)
        y = r.y[pl.ds(r0, s.tn), :]
        rows = _row_inputs(r.inputs, r0, s.tn)
        fresh = (r0 + lax.broadcasted_iota(jnp.int32, (s.tn, 1), 0)) >= i * s.tn
        rows = rows._replace(keep=rows.keep & fresh)
        z = _logits(r, r0, c0, s)
        hit = cols == y
        x = tiles.softcap(z, cap)
        dx, p = tiles.logits_grad(x, valid, hit, rows, cw)
        dz, _ = tiles.softcap_grad(z, cap, dx)

        def add(carry):
            acc, db, dcw = carry
            hd = r.h[pl.ds(r0, s.tn), pl.ds(kd * s.td, s.td)].astype(jnp.float32)
            acc = acc + tiles.matmul(hd, dz, transpose_a=True)
            db = db + jnp.sum(dz, 0, keepdims=True)
            if dcw is not None:
                dcw = dcw + tiles.class_weights_grad(x, valid, rows)
            return acc, db, dcw

        if s.thr is None:
            return add(carry)
        return lax.cond(tiles.small(p, hit & fresh, s.thr), lambda c: c, add, carry)

    row = jnp.zeros((1, s.tv), jnp.float32)
    init = (jnp.zeros((s.td, s.tv), jnp.float32), row, row if s.has_cw else None)
    acc, db, dcw = lax.fori_loop(0, pl.cdiv(s.n, s.tn), token_block, init)
    dw_ref[pl.ds(kd * s.td, s.td), pl.ds(c0, s.tv)] = acc.astype(dw_ref.dtype)
    if db_ref is not None:
        db_ref[:, pl.ds(c0, s.tv)] = db
    if dcw_ref is not None:  # the same in every slice of D
        dcw_ref[:, pl.ds(c0, s.tv)] = dcw


def backward(ops: tiles.Operands, rows, call: tiles.Call):
    """(d hidden, d weight (in their inputs' dtypes), d bias ``[1, vp]`` f32 or None, per-row
    d cap ``[n, 1]`` or None, d class weights ``[1, vp]`` f32 through the smoothing sums or
    None) for padded operands; ``ops``, ``call`` as for :func:`forward`; ``rows`` = (keep,
    shift, lse, g_lse, g_t[, g_s[, g_w]]) ``[n, 1]`` columns (keep int32; g_w, the cotangent
    of weight_sum, with ``ops.cw``)."""
    args = ops.present() + list(rows)
    s = _static(ops, call, len(args))
    dh_out = [jax.ShapeDtypeStruct((s.n, s.d), ops.hidden.dtype)]  # f32 accumulation
    if s.has_cap:
        dh_out.append(_column(s.n))
    dh = _call(
        _dhidden_kernel, s, call, out_shape=dh_out, grid=(pl.cdiv(s.n, s.tn), s.d // s.td),
        name="jbce_linear_ce_dhidden_gpu",
    )(*args)  # fmt: skip
    row = jax.ShapeDtypeStruct((1, s.vp), jnp.float32)  # d bias, d class weights
    dw_out = [jax.ShapeDtypeStruct((s.d, s.vp), ops.weight.dtype)] + [row] * (s.has_bias + s.has_cw)
    dw = _call(
        _dweight_kernel, s, call, out_shape=dw_out, grid=(pl.cdiv(s.vp, s.tv), s.d // s.td),
        name="jbce_linear_ce_dweight_gpu",
    )(*args)  # fmt: skip
    return tiles.backward_outputs(dh, dw, s)
