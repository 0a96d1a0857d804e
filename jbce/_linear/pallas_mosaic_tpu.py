"""The fused linear cross-entropy as Pallas kernels for TPUs (Mosaic).

Three kernels, each a two-axis grid whose second axis is sequential ("arbitrary") and whose
blocks Pallas pipelines from HBM into VMEM; the accumulators live in VMEM and each output
block is written back once, when its block index changes:

- forward (grid: token blocks x vocabulary blocks): the tile ``hidden[rows] @
  weight[:, cols]`` (float32 accumulation on the MXU) folds into the rows' running
  statistics (:func:`jbce._linear.pallas_tiles.update_stats`) kept in VMEM scratch; the
  per-token statistics are the only output.
- d hidden (token blocks x vocabulary blocks): recomputes each tile and accumulates
  ``d logits @ weight[:, cols].T`` in a float32 ``[rows, D]`` scratch, written once in
  ``hidden``'s dtype, with each row's share of ``d logit_softcap``.
- d weight, d bias (vocabulary blocks x token blocks): accumulates
  ``hidden[rows].T @ d logits`` in a float32 ``[D, cols]`` scratch, written once in
  ``weight``'s dtype (and, with class weights and label smoothing, their share of
  ``d class_weights``, a ``[1, cols]`` sum over the tokens).

Ragged sizes: the last block of an axis reads past the array's end (whatever is there);
those rows and columns are masked out (to ``-inf`` logits, or zero operands of the
reductions) and their outputs are dropped by the write-back. Block sizes (``TN`` tokens x
``TV`` classes, the class block shrunk so that a ``[D, TV]`` weight block stays within
``WEIGHT_BLOCK_BYTES``) are starting points, not tuned on hardware.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jbce._linear import pallas_tiles as tiles

TN = 512
TV = 512
WEIGHT_BLOCK_BYTES = 2 << 20
VMEM_LIMIT_BYTES = 64 << 20


def block_sizes(n: int, d: int, v: int, itemsize: int, caps=None) -> tuple[int, int]:
    """(tn, tv): multiples of (8, 128) as Mosaic requires, or the whole axis if smaller;
    ``caps`` replaces the maxima ``(TN, TV)``."""
    max_n, max_v = caps or (TN, TV)
    tn = n if n <= max_n else max_n
    tv_max = max(128, min(max_v, WEIGHT_BLOCK_BYTES // (d * itemsize) // 128 * 128))
    tv = v if v <= tv_max else tv_max
    return tn, tv


def _logits(h, w, b_ref):
    if h.dtype != w.dtype:
        h, w = h.astype(jnp.float32), w.astype(jnp.float32)
    z = tiles.matmul(h, w)
    return z if b_ref is None else z + b_ref[...].astype(jnp.float32)


def _cols(j, tv):
    return j * tv + lax.broadcasted_iota(jnp.int32, (1, tv), 1)


def _forward_kernel(*refs, v, tv, has_bias, has_cap, has_cw, sums, n_in, n_out):
    r = tiles.split_refs(refs, has_bias, has_cap, n_in, has_cw)
    outs, scratch = r.outs[:n_out], r.outs[n_out:]
    j = pl.program_id(1)
    tn = r.h.shape[0]

    @pl.when(j == 0)
    def _():
        for ref, val in zip(scratch, tiles.empty(tn, sums, has_cw)[: len(scratch)], strict=True):
            ref[...] = val

    cap = r.cap[...] if has_cap else None
    z = _logits(r.h[...], r.w[...], r.b)
    cols = _cols(j, tv)
    acc = tiles.Running(*(ref[...] for ref in scratch))  # the absent fields are the last
    cw = r.cw[...] if has_cw else None
    new = tiles.update_stats(acc, tiles.softcap(z, cap), cols < v, cols == r.y[...], cw)
    for ref, val in zip(scratch, new, strict=False):
        ref[...] = val
    for ref, val in zip(outs, tiles.finish(new), strict=True):
        ref[...] = val


def _specs(tn, tv, d, has_bias, has_cap, n_rows, *, has_cw=False, vocab_major=False):
    """BlockSpecs for (hidden, weight[, bias], labels[, cap][, class weights], *row
    columns)."""
    if vocab_major:  # grid (j, i)

        def tok(f):
            return lambda j, i: f(i, j)
    else:

        def tok(f):
            return f

    specs = [
        pl.BlockSpec((tn, d), tok(lambda i, j: (i, 0))),
        pl.BlockSpec((d, tv), tok(lambda i, j: (0, j))),
    ]
    if has_bias:
        specs.append(pl.BlockSpec((1, tv), tok(lambda i, j: (0, j))))
    specs.append(pl.BlockSpec((tn, 1), tok(lambda i, j: (i, 0))))
    if has_cap:
        specs.append(pl.BlockSpec((1, 1), tok(lambda i, j: (0, 0))))
    if has_cw:
        specs.append(pl.BlockSpec((1, tv), tok(lambda i, j: (0, j))))
    specs += [pl.BlockSpec((tn, 1), tok(lambda i, j: (i, 0)))] * n_rows
    return specs


def _params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT_BYTES)


def _column(n):
    return jax.ShapeDtypeStruct((n, 1), jnp.float32)


def forward(hidden, weight, bias, labels, cap, cw=None, *, sums, interpret, blocks=None):
    """Per-token ``(shift, lse, target[, logit_sum, weight_sum[, count]])``, ``[n, 1]``
    float32 each; ``cw``: the ``[1, V]`` class weights of the smoothing sums, or None."""
    n, d = hidden.shape
    v = weight.shape[1]
    tn, tv = block_sizes(n, d, v, weight.dtype.itemsize, blocks)
    args = tiles.operands(hidden, weight, bias, labels, cap, cw)
    has_cw = cw is not None
    n_out = tiles.fields(sums, has_cw)
    kernel = functools.partial(
        _forward_kernel, v=v, tv=tv, has_bias=bias is not None, has_cap=cap is not None,
        has_cw=has_cw, sums=sums, n_in=len(args), n_out=n_out,
    )  # fmt: skip
    col = pl.BlockSpec((tn, 1), lambda i, j: (i, 0))
    return tiles.pallas_call(
        kernel,
        out_shape=[_column(n)] * n_out,
        grid=(pl.cdiv(n, tn), pl.cdiv(v, tv)),
        in_specs=_specs(tn, tv, d, bias is not None, cap is not None, 0, has_cw=has_cw),
        out_specs=[col] * n_out,
        scratch_shapes=[pltpu.VMEM((tn, 1), jnp.float32)] * n_out,
        compiler_params=_params(("parallel", "arbitrary")),
        interpret=interpret,
        name="jbce_linear_ce_fwd_tpu",
    )(*args)


def _dlogits(refs, i, j, *, n, v, tn, tv, has_bias, has_cap, has_cw, sums, n_in, dcw=False):
    """(refs split, d z, d cap per row, p, valid columns, label hits, row mask, and with
    ``dcw`` the tile's ``[1, tv]`` share of d class weights) of tile (i, j)."""
    r = tiles.split_refs(refs, has_bias, has_cap, n_in, has_cw)
    keep, m, lse, g_lse, g_t, g_s, g_w = tiles.row_columns([ref[...] for ref in r.inputs])
    cap = r.cap[...] if has_cap else None
    cols = _cols(j, tv)
    valid = cols < v
    hit = cols == r.y[...]
    real = (i * tn + lax.broadcasted_iota(jnp.int32, (tn, 1), 0)) < n
    used = keep & real
    # Logits of rows past N and columns past V come from whatever follows the arrays in
    # memory (NaN, say): zeroed, so that no 0 * NaN reaches a real row's or column's sum.
    z = jnp.where(valid & real, _logits(r.h[...], r.w[...], r.b), 0.0)
    x = tiles.softcap(z, cap)
    cw = r.cw[...] if has_cw else None
    dx, p = tiles.logits_grad(x, valid, hit, used, m, lse, g_lse, g_t, g_s, cw)
    dz, dc = tiles.softcap_grad(z, cap, dx)
    d_cw = tiles.class_weights_grad(x, valid, used, m, g_s, g_w) if dcw else None
    return r, dz, dc, p, valid, hit, real, d_cw


def _dhidden_kernel(*refs, thr, n_voc, **static):
    i, j = pl.program_id(0), pl.program_id(1)
    r, dz, dc, p, valid, hit, real, _ = _dlogits(refs, i, j, **static)
    w_ref, outs = r.w, r.outs
    has_cap = static["has_cap"]
    dh_ref, acc_ref = outs[0], outs[-1]
    dcap_ref = outs[1] if has_cap else None

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)
        if dcap_ref is not None:
            dcap_ref[...] = jnp.zeros(dcap_ref.shape, dcap_ref.dtype)

    if dcap_ref is not None:
        dcap_ref[...] += dc

    def add():
        # Columns past V hold whatever follows weight in memory: zeroed, not just unused.
        w = jnp.where(valid, w_ref[...].astype(jnp.float32), 0.0)
        acc_ref[...] += tiles.matmul(dz, w, transpose_b=True)

    if thr is None:
        add()
    else:
        pl.when(jnp.logical_not(tiles.small(p, hit & real, thr)))(add)

    @pl.when(j == n_voc - 1)
    def _():
        dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def _dweight_kernel(*refs, thr, n_tok, **static):
    j, i = pl.program_id(0), pl.program_id(1)
    has_bias, has_cw = static["has_bias"], static["has_cw"]
    r, dz, _, p, valid, hit, real, d_cw = _dlogits(refs, i, j, dcw=has_cw, **static)
    # outputs: d weight[, d bias][, d class weights], then their accumulators in that order
    n_out = 1 + has_bias + has_cw
    outs, accs = r.outs[:n_out], r.outs[n_out:]
    dw_ref, acc_ref = outs[0], accs[0]
    db_ref, dbacc_ref = (outs[1], accs[1]) if has_bias else (None, None)
    dcw_ref, dcwacc_ref = (outs[-1], accs[-1]) if has_cw else (None, None)

    @pl.when(i == 0)
    def _():
        for ref in accs:
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    def add():
        # Rows past N hold whatever follows hidden in memory: zeroed, not just unused.
        h = jnp.where(real, r.h[...].astype(jnp.float32), 0.0)
        acc_ref[...] += tiles.matmul(h, dz, transpose_a=True)
        if dbacc_ref is not None:
            dbacc_ref[...] += jnp.sum(dz, axis=0, keepdims=True)
        if dcwacc_ref is not None:
            dcwacc_ref[...] += d_cw

    if thr is None:
        add()
    else:
        pl.when(jnp.logical_not(tiles.small(p, hit & real, thr)))(add)

    @pl.when(i == n_tok - 1)
    def _():
        dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)
        if db_ref is not None:
            db_ref[...] = dbacc_ref[...]
        if dcw_ref is not None:
            dcw_ref[...] = dcwacc_ref[...]


def backward(
    hidden, weight, bias, labels, cap, cw, rows, *, sums, threshold, interpret, blocks=None
):
    """(d hidden, d weight (in their inputs' dtypes), d bias ``[1, V]`` f32 or None, per-row
    d cap ``[n, 1]`` or None, d class weights ``[1, V]`` f32 through the smoothing sums or
    None); ``cw`` as for :func:`forward`; ``rows`` = (keep, shift, lse, g_lse, g_t[, g_s[,
    g_w]]) ``[n, 1]`` columns (keep int32; g_w, the cotangent of weight_sum, with ``cw``)."""
    n, d = hidden.shape
    v = weight.shape[1]
    tn, tv = block_sizes(n, d, v, weight.dtype.itemsize, blocks)
    has_bias, has_cap, has_cw = bias is not None, cap is not None, cw is not None
    args = tiles.operands(hidden, weight, bias, labels, cap, cw) + list(rows)
    static = dict(
        n=n, v=v, tn=tn, tv=tv, has_bias=has_bias, has_cap=has_cap, has_cw=has_cw, sums=sums,
        n_in=len(args), thr=threshold,
    )  # fmt: skip
    ni, nj = pl.cdiv(n, tn), pl.cdiv(v, tv)
    dh_out = [jax.ShapeDtypeStruct((n, d), hidden.dtype)]
    dh_specs = [pl.BlockSpec((tn, d), lambda i, j: (i, 0))]
    if has_cap:
        dh_out.append(_column(n))
        dh_specs.append(pl.BlockSpec((tn, 1), lambda i, j: (i, 0)))
    dh = tiles.pallas_call(
        functools.partial(_dhidden_kernel, n_voc=nj, **static),
        out_shape=dh_out,
        grid=(ni, nj),
        in_specs=_specs(tn, tv, d, has_bias, has_cap, len(rows), has_cw=has_cw),
        out_specs=dh_specs,
        scratch_shapes=[pltpu.VMEM((tn, d), jnp.float32)],
        compiler_params=_params(("parallel", "arbitrary")),
        interpret=interpret,
        name="jbce_linear_ce_dhidden_tpu",
    )(*args)
    dw_out = [jax.ShapeDtypeStruct((d, v), weight.dtype)]
    dw_specs = [pl.BlockSpec((d, tv), lambda j, i: (0, j))]
    scratch = [pltpu.VMEM((d, tv), jnp.float32)]
    for _ in range(has_bias + has_cw):  # d bias, d class weights
        dw_out.append(jax.ShapeDtypeStruct((1, v), jnp.float32))
        dw_specs.append(pl.BlockSpec((1, tv), lambda j, i: (0, j)))
        scratch.append(pltpu.VMEM((1, tv), jnp.float32))
    dw = tiles.pallas_call(
        functools.partial(_dweight_kernel, n_tok=ni, **static),
        out_shape=dw_out,
        grid=(nj, ni),
        in_specs=_specs(tn, tv, d, has_bias, has_cap, len(rows), has_cw=has_cw, vocab_major=True),
        out_specs=dw_specs,
        scratch_shapes=scratch,
        compiler_params=_params(("parallel", "arbitrary")),
        interpret=interpret,
        name="jbce_linear_ce_dweight_tpu",
    )(*args)
    return (
        dh[0],
        dw[0],
        dw[1] if has_bias else None,
        dh[1] if has_cap else None,
        dw[-1] if has_cw else None,
    )
