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


def pad(hidden, weight, bias, labels, keep=None):
    """Operands padded where an axis is below 16 or D isn't a multiple of 16 (zeros; padded
    classes are masked out by the kernels, padded tokens dropped by the caller). Class
    weights take :func:`pad_classes` to ``weight``'s padded width."""
    n, d = hidden.shape
    v = weight.shape[1]
    pn, pv, pd = max(0, MIN_BLOCK - n), max(0, MIN_BLOCK - v), -d % MIN_BLOCK
    if pn or pd:
        hidden = jnp.pad(hidden, ((0, pn), (0, pd)))
    if pv or pd:
        weight = jnp.pad(weight, ((0, pd), (0, pv)))
    bias = pad_classes(bias, v + pv)
    if pn:
        labels = jnp.pad(labels, ((0, pn), (0, 0)), constant_values=-1)
        keep = None if keep is None else jnp.pad(keep, ((0, pn), (0, 0)))
    return hidden, weight, bias, labels, keep


def _start(i, size: int, total: int):
    """Start of block ``i``; the last block ends at ``total`` (overlapping its predecessor)."""
    return jnp.minimum(i * size, total - size)


def _logits(h_ref, w_ref, b_ref, r0, c0, tn, tv, tk, d):
    """``hidden[r0:r0+tn] @ weight[:, c0:c0+tv] + bias`` in float32, D in ``tk`` slices."""

    def step(k, acc):
        hk = h_ref[pl.ds(r0, tn), pl.ds(k * tk, tk)]
        wk = w_ref[pl.ds(k * tk, tk), pl.ds(c0, tv)]
        if hk.dtype != wk.dtype:
            hk, wk = hk.astype(jnp.float32), wk.astype(jnp.float32)
        return acc + tiles.matmul(hk, wk)

    z = lax.fori_loop(0, d // tk, step, jnp.zeros((tn, tv), jnp.float32))
    if b_ref is not None:
        z = z + b_ref[:, pl.ds(c0, tv)].astype(jnp.float32)
    return z


def _class_weights(r, c0, tv):
    """The class weights ``[1, tv]`` of columns ``c0:c0+tv``, or None without them."""
    return None if r.cw is None else r.cw[:, pl.ds(c0, tv)]


def _forward_kernel(*refs, n, v, vp, d, tn, tv, tk, has_bias, has_cap, has_cw, sums, n_in):
    r = tiles.split_refs(refs, has_bias, has_cap, n_in, has_cw)
    r0 = _start(pl.program_id(0), tn, n)
    y = r.y[pl.ds(r0, tn), :]
    cap = r.cap[...] if has_cap else None

    def vocab_block(j, acc):
        c0 = _start(j, tv, vp)
        z = _logits(r.h, r.w, r.b, r0, c0, tn, tv, tk, d)
        cols = c0 + lax.broadcasted_iota(jnp.int32, (1, tv), 1)
        valid = (cols >= j * tv) & (cols < v)
        hit = (cols == y) & (y >= j * tv)
        cw = _class_weights(r, c0, tv)
        return tiles.update_stats(acc, tiles.softcap(z, cap), valid, hit, cw)

    acc = lax.fori_loop(0, pl.cdiv(vp, tv), vocab_block, tiles.empty(tn, sums, has_cw))
    for ref, val in zip(r.outs, tiles.finish(acc), strict=True):
        ref[pl.ds(r0, tn), :] = val


def _params():
    return plt.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _column(n):
    return jax.ShapeDtypeStruct((n, 1), jnp.float32)


def forward(hidden, weight, bias, labels, cap, cw=None, *, v, sums, interpret, blocks=None):
    """Per-token ``(shift, lse, target[, logit_sum, weight_sum[, count]])``, ``[n, 1]``
    float32 each, for padded operands (:func:`pad`; ``cw`` the ``[1, vp]`` class weights of
    the smoothing sums, or None); ``v`` is the number of real classes."""
    n, d = hidden.shape
    vp = weight.shape[1]
    tn, tv, tk, _ = block_sizes(n, d, vp, blocks)
    args = tiles.operands(hidden, weight, bias, labels, cap, cw)
    kernel = functools.partial(
        _forward_kernel,
        n=n, v=v, vp=vp, d=d, tn=tn, tv=tv, tk=tk, has_bias=bias is not None,
        has_cap=cap is not None, has_cw=cw is not None, sums=sums, n_in=len(args),
    )  # fmt: skip
    return tiles.pallas_call(
        kernel,
        out_shape=[_column(n)] * tiles.fields(sums, cw is not None),
        grid=(pl.cdiv(n, tn),),
        compiler_params=_params(),
        interpret=interpret,
        name="jbce_linear_ce_fwd_gpu",
    )(*args)


def _row_inputs(refs, r0, tn):
    """:func:`jbce._linear.pallas_tiles.row_columns` of rows ``r0:r0+tn``."""
    return tiles.row_columns([r[pl.ds(r0, tn), :] for r in refs])


def _dhidden_kernel(*refs, n, v, vp, d, tn, tv, tk, td, has_bias, has_cap, has_cw, sums, thr, n_in):
    r = tiles.split_refs(refs, has_bias, has_cap, n_in, has_cw)
    dh_ref, dcap_ref = r.outs[0], r.outs[1] if has_cap else None
    i, kd = pl.program_id(0), pl.program_id(1)
    r0 = _start(i, tn, n)
    y = r.y[pl.ds(r0, tn), :]
    keep, m, lse, g_lse, g_t, g_s, _ = _row_inputs(r.inputs, r0, tn)
    cap = r.cap[...] if has_cap else None

    def vocab_block(j, carry):
        acc, dcap = carry
        c0 = _start(j, tv, vp)
        z = _logits(r.h, r.w, r.b, r0, c0, tn, tv, tk, d)
        cols = c0 + lax.broadcasted_iota(jnp.int32, (1, tv), 1)
        valid = (cols >= j * tv) & (cols < v)
        hit = (cols == y) & (y >= j * tv)
        x = tiles.softcap(z, cap)
        cw = _class_weights(r, c0, tv)
        dx, p = tiles.logits_grad(x, valid, hit, keep, m, lse, g_lse, g_t, g_s, cw)
        dz, dc = tiles.softcap_grad(z, cap, dx)
        if dc is not None:
            dcap = dcap + dc

        def add(acc):
            wd = r.w[pl.ds(kd * td, td), pl.ds(c0, tv)].astype(jnp.float32)
            return acc + tiles.matmul(dz, wd, transpose_b=True)

        if thr is None:
            return add(acc), dcap
        return lax.cond(tiles.small(p, hit, thr), lambda a: a, add, acc), dcap

    init = (jnp.zeros((tn, td), jnp.float32), jnp.zeros((tn, 1), jnp.float32))
    acc, dcap = lax.fori_loop(0, pl.cdiv(vp, tv), vocab_block, init)
    dh_ref[pl.ds(r0, tn), pl.ds(kd * td, td)] = acc.astype(dh_ref.dtype)
    if dcap_ref is not None:
        dcap_ref[pl.ds(r0, tn), :] = dcap


def _dweight_kernel(*refs, n, v, vp, d, tn, tv, tk, td, has_bias, has_cap, has_cw, sums, thr, n_in):
    r = tiles.split_refs(refs, has_bias, has_cap, n_in, has_cw)
    dw_ref = r.outs[0]
    db_ref = r.outs[1] if has_bias else None
    dcw_ref = r.outs[1 + has_bias] if has_cw else None
    j, kd = pl.program_id(0), pl.program_id(1)
    c0 = _start(j, tv, vp)
    cols = c0 + lax.broadcasted_iota(jnp.int32, (1, tv), 1)
    valid = cols < v  # every real class of this block (overlapping ones too: same values)
    cap = r.cap[...] if has_cap else None
    cw = _class_weights(r, c0, tv)

    def token_block(i, carry):
        r0 = _start(i, tn, n)
        y = r.y[pl.ds(r0, tn), :]
        keep, m, lse, g_lse, g_t, g_s, g_w = _row_inputs(r.inputs, r0, tn)
        fresh = (r0 + lax.broadcasted_iota(jnp.int32, (tn, 1), 0)) >= i * tn
        z = _logits(r.h, r.w, r.b, r0, c0, tn, tv, tk, d)
        hit = cols == y
        x = tiles.softcap(z, cap)
        dx, p = tiles.logits_grad(x, valid, hit, keep & fresh, m, lse, g_lse, g_t, g_s, cw)
        dz, _ = tiles.softcap_grad(z, cap, dx)

        def add(carry):
            acc, db, dcw = carry
            hd = r.h[pl.ds(r0, tn), pl.ds(kd * td, td)].astype(jnp.float32)
            acc = acc + tiles.matmul(hd, dz, transpose_a=True)
            db = db + jnp.sum(dz, 0, keepdims=True)
            if dcw is not None:
                dcw = dcw + tiles.class_weights_grad(x, valid, keep & fresh, m, g_s, g_w)
            return acc, db, dcw

        if thr is None:
            return add(carry)
        return lax.cond(tiles.small(p, hit & fresh, thr), lambda c: c, add, carry)

    row = jnp.zeros((1, tv), jnp.float32)
    init = (jnp.zeros((td, tv), jnp.float32), row, row if has_cw else None)
    acc, db, dcw = lax.fori_loop(0, pl.cdiv(n, tn), token_block, init)
    dw_ref[pl.ds(kd * td, td), pl.ds(c0, tv)] = acc.astype(dw_ref.dtype)
    if db_ref is not None:
        db_ref[:, pl.ds(c0, tv)] = db
    if dcw_ref is not None:  # the same in every slice of D
        dcw_ref[:, pl.ds(c0, tv)] = dcw


def backward(
    hidden, weight, bias, labels, cap, cw, rows, *, v, sums, threshold, interpret, blocks=None
):
    """(d hidden, d weight (in their inputs' dtypes), d bias ``[1, vp]`` f32 or None, per-row
    d cap ``[n, 1]`` or None, d class weights ``[1, vp]`` f32 through the smoothing sums or
    None) for padded operands; ``cw`` as for :func:`forward`; ``rows`` = (keep, shift, lse,
    g_lse, g_t[, g_s[, g_w]]) ``[n, 1]`` columns (keep int32; g_w, the cotangent of
    weight_sum, with ``cw``)."""
    n, d = hidden.shape
    vp = weight.shape[1]
    tn, tv, tk, td = block_sizes(n, d, vp, blocks)
    args = tiles.operands(hidden, weight, bias, labels, cap, cw) + list(rows)
    has_cw = cw is not None
    static = dict(
        n=n, v=v, vp=vp, d=d, tn=tn, tv=tv, tk=tk, td=td, has_bias=bias is not None,
        has_cap=cap is not None, has_cw=has_cw, sums=sums, thr=threshold, n_in=len(args),
    )  # fmt: skip
    dh_out = [jax.ShapeDtypeStruct((n, d), hidden.dtype)]  # accumulated in f32, written once
    if cap is not None:
        dh_out.append(_column(n))
    dh = tiles.pallas_call(
        functools.partial(_dhidden_kernel, **static),
        out_shape=dh_out,
        grid=(pl.cdiv(n, tn), d // td),
        compiler_params=_params(),
        interpret=interpret,
        name="jbce_linear_ce_dhidden_gpu",
    )(*args)
    dw_out = [jax.ShapeDtypeStruct((d, vp), weight.dtype)]
    if bias is not None:
        dw_out.append(jax.ShapeDtypeStruct((1, vp), jnp.float32))
    if has_cw:
        dw_out.append(jax.ShapeDtypeStruct((1, vp), jnp.float32))
    dw = tiles.pallas_call(
        functools.partial(_dweight_kernel, **static),
        out_shape=dw_out,
        grid=(pl.cdiv(vp, tv), d // td),
        compiler_params=_params(),
        interpret=interpret,
        name="jbce_linear_ce_dweight_gpu",
    )(*args)
    return (
        dh[0],
        dw[0],
        dw[1] if bias is not None else None,
        dh[1] if cap is not None else None,
        dw[-1] if has_cw else None,
    )
