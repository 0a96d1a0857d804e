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

import dataclasses
import functools
from typing import NamedTuple

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


Static = tiles.Static


def _static(ops: tiles.Operands, call: tiles.Call, n_rows: int) -> Static:
    n, d = ops.hidden.shape
    tn, tv = block_sizes(n, d, ops.weight.shape[1], ops.weight.dtype.itemsize, call.blocks)
    return tiles.static(ops, call, len(ops.present()) + n_rows, {"tn": tn, "tv": tv})


def _logits(h, w, b_ref):
    if h.dtype != w.dtype:
        h, w = h.astype(jnp.float32), w.astype(jnp.float32)
    z = tiles.matmul(h, w)
    return z if b_ref is None else z + b_ref[...].astype(jnp.float32)


def _cols(j, tv):
    return j * tv + lax.broadcasted_iota(jnp.int32, (1, tv), 1)


def _forward_kernel(*refs, s: Static):
    r = tiles.split_refs(refs, s)
    n_out = tiles.fields(s.sums, s.has_cw)
    outs, scratch = r.outs[:n_out], r.outs[n_out:]
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        for ref, val in zip(scratch, tiles.empty(s.tn, s.sums, s.has_cw)[:n_out], strict=True):
            ref[...] = val

    cap = r.cap[...] if s.has_cap else None
    z = _logits(r.h[...], r.w[...], r.b)
    cols = _cols(j, s.tv)
    acc = tiles.Running(*(ref[...] for ref in scratch))  # the absent fields are the last
    cw = r.cw[...] if s.has_cw else None
    new = tiles.update_stats(acc, tiles.softcap(z, cap), cols < s.v, cols == r.y[...], cw)
    for ref, val in zip(scratch, new, strict=False):
        ref[...] = val
    for ref, val in zip(outs, tiles.finish(new), strict=True):
        ref[...] = val


def _specs(s: Static, n_rows: int, *, vocab_major=False):
    """BlockSpecs for (hidden, weight[, bias], labels[, cap][, class weights], *row
    columns)."""
    if vocab_major:  # grid (j, i)

        def tok(f):
            return lambda j, i: f(i, j)
    else:

        def tok(f):
            return f

    tn, tv = s.tn, s.tv
    specs = [
        pl.BlockSpec((tn, s.d), tok(lambda i, j: (i, 0))),
        pl.BlockSpec((s.d, tv), tok(lambda i, j: (0, j))),
    ]
    if s.has_bias:
        specs.append(pl.BlockSpec((1, tv), tok(lambda i, j: (0, j))))
    specs.append(pl.BlockSpec((tn, 1), tok(lambda i, j: (i, 0))))
    if s.has_cap:
        specs.append(pl.BlockSpec((1, 1), tok(lambda i, j: (0, 0))))
    if s.has_cw:
        specs.append(pl.BlockSpec((1, tv), tok(lambda i, j: (0, j))))
    specs += [pl.BlockSpec((tn, 1), tok(lambda i, j: (i, 0)))] * n_rows
    return specs


def _column(n):
    return jax.ShapeDtypeStruct((n, 1), jnp.float32)


def _call(kernel, s: Static, call: tiles.Call, **kwargs):
    """The kernel's ``pallas_call`` over a (parallel, sequential) grid."""
    return tiles.pallas_call(
        functools.partial(kernel, s=s),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=VMEM_LIMIT_BYTES
        ),
        interpret=call.interpret,
        **kwargs,
    )


def forward(ops: tiles.Operands, call: tiles.Call):
    """Per-token ``(shift, lse, target[, logit_sum, weight_sum[, count]])``, ``[n, 1]``
    float32 each; ``ops.cw``: the ``[1, V]`` class weights of the smoothing sums, or None."""
    s = _static(ops, call, 0)
    n_out = tiles.fields(s.sums, s.has_cw)
    col = pl.BlockSpec((s.tn, 1), lambda i, j: (i, 0))
    return _call(
        _forward_kernel, s, call,
        out_shape=[_column(s.n)] * n_out,
        grid=(pl.cdiv(s.n, s.tn), pl.cdiv(s.v, s.tv)),
        in_specs=_specs(s, 0),
        out_specs=[col] * n_out,
        scratch_shapes=[pltpu.VMEM((s.tn, 1), jnp.float32)] * n_out,
        name="jbce_linear_ce_fwd_tpu",
    )(*ops.present())  # fmt: skip


class _Tile(NamedTuple):
    """A backward tile: the refs, ``d z``, d cap per row, ``p``, the valid columns, label
    hits, real rows, and (with class weights in the sums) the tile's d class weights."""

    r: tiles.Refs
    dz: jax.Array
    dcap: jax.Array | None
    p: jax.Array
    valid: jax.Array
    hit: jax.Array
    real: jax.Array
    dcw: jax.Array | None


def _dlogits(refs, i, j, s: Static, dcw: bool = False) -> _Tile:
    """Tile (i, j) of the backward kernels (``dcw``: its share of d class weights too)."""
    r = tiles.split_refs(refs, s)
    rows = tiles.row_columns([ref[...] for ref in r.inputs])
    cap = r.cap[...] if s.has_cap else None
    cols = _cols(j, s.tv)
    valid = cols < s.v
    hit = cols == r.y[...]
    real = (i * s.tn + lax.broadcasted_iota(jnp.int32, (s.tn, 1), 0)) < s.n
    rows = rows._replace(keep=rows.keep & real)
    # Logits of rows past N and columns past V come from whatever follows the arrays in
    # memory (NaN, say): zeroed, so that no 0 * NaN reaches a real row's or column's sum.
    z = jnp.where(valid & real, _logits(r.h[...], r.w[...], r.b), 0.0)
    x = tiles.softcap(z, cap)
    cw = r.cw[...] if s.has_cw else None
    dx, p = tiles.logits_grad(x, valid, hit, rows, cw)
    dz, dc = tiles.softcap_grad(z, cap, dx)
    d_cw = tiles.class_weights_grad(x, valid, rows) if dcw else None
    return _Tile(r, dz, dc, p, valid, hit, real, d_cw)


def _unless_filtered(t: _Tile, s: Static, add) -> None:
    """Runs ``add`` (the tile's accumulation) unless gradient filtering skips the tile."""
    if s.thr is None:
        add()
    else:
        pl.when(jnp.logical_not(tiles.small(t.p, t.hit & t.real, s.thr)))(add)


def _dhidden_kernel(*refs, s: Static):
    i, j = pl.program_id(0), pl.program_id(1)
    t = _dlogits(refs, i, j, s)
    outs = t.r.outs
    dh_ref, acc_ref = outs[0], outs[-1]
    dcap_ref = outs[1] if s.has_cap else None

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)
        if dcap_ref is not None:
            dcap_ref[...] = jnp.zeros(dcap_ref.shape, dcap_ref.dtype)

    if dcap_ref is not None:
        dcap_ref[...] += t.dcap

    def add():
        # Columns past V hold whatever follows weight in memory: zeroed, not just unused.
        w = jnp.where(t.valid, t.r.w[...].astype(jnp.float32), 0.0)
        acc_ref[...] += tiles.matmul(t.dz, w, transpose_b=True)

    _unless_filtered(t, s, add)

    @pl.when(j == s.steps - 1)
    def _():
        dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def _dweight_kernel(*refs, s: Static):
    j, i = pl.program_id(0), pl.program_id(1)
    t = _dlogits(refs, i, j, s, dcw=s.has_cw)
    # outputs: d weight[, d bias][, d class weights], then their accumulators in that order
    n_out = 1 + s.has_bias + s.has_cw
    outs, accs = t.r.outs[:n_out], t.r.outs[n_out:]
    dw_ref, acc_ref = outs[0], accs[0]
    db_ref, dbacc_ref = (outs[1], accs[1]) if s.has_bias else (None, None)
    dcw_ref, dcwacc_ref = (outs[-1], accs[-1]) if s.has_cw else (None, None)

    @pl.when(i == 0)
    def _():
        for ref in accs:
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    def add():
        # Rows past N hold whatever follows hidden in memory: zeroed, not just unused.
        h = jnp.where(t.real, t.r.h[...].astype(jnp.float32), 0.0)
        acc_ref[...] += tiles.matmul(h, t.dz, transpose_a=True)
        if dbacc_ref is not None:
            dbacc_ref[...] += jnp.sum(t.dz, axis=0, keepdims=True)
        if dcwacc_ref is not None:
            dcwacc_ref[...] += t.dcw

    _unless_filtered(t, s, add)

    @pl.when(i == s.steps - 1)
    def _():
        dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)
        if db_ref is not None:
            db_ref[...] = dbacc_ref[...]
        if dcw_ref is not None:
            dcw_ref[...] = dcwacc_ref[...]


def backward(ops: tiles.Operands, rows, call: tiles.Call):
    """(d hidden, d weight (in their inputs' dtypes), d bias ``[1, V]`` f32 or None, per-row
    d cap ``[n, 1]`` or None, d class weights ``[1, V]`` f32 through the smoothing sums or
    None); ``ops``, ``call`` as for :func:`forward`; ``rows`` = (keep, shift, lse, g_lse,
    g_t[, g_s[, g_w]]) ``[n, 1]`` columns (keep int32; g_w, the cotangent of weight_sum, with
    ``ops.cw``)."""
    s = _static(ops, call, len(rows))
    args = ops.present() + list(rows)
    ni, nj = pl.cdiv(s.n, s.tn), pl.cdiv(s.v, s.tv)
    dh_out = [jax.ShapeDtypeStruct((s.n, s.d), ops.hidden.dtype)]
    dh_specs = [pl.BlockSpec((s.tn, s.d), lambda i, j: (i, 0))]
    if s.has_cap:
        dh_out.append(_column(s.n))
        dh_specs.append(pl.BlockSpec((s.tn, 1), lambda i, j: (i, 0)))
    dh = _call(
        _dhidden_kernel, dataclasses.replace(s, steps=nj), call,
        out_shape=dh_out,
        grid=(ni, nj),
        in_specs=_specs(s, len(rows)),
        out_specs=dh_specs,
        scratch_shapes=[pltpu.VMEM((s.tn, s.d), jnp.float32)],
        name="jbce_linear_ce_dhidden_tpu",
    )(*args)  # fmt: skip
    n_rows = s.has_bias + s.has_cw  # d bias, d class weights: [1, V] each
    dw = _call(
        _dweight_kernel, dataclasses.replace(s, steps=ni), call,
        out_shape=[jax.ShapeDtypeStruct((s.d, s.v), ops.weight.dtype)]
        + [jax.ShapeDtypeStruct((1, s.v), jnp.float32)] * n_rows,
        grid=(nj, ni),
        in_specs=_specs(s, len(rows), vocab_major=True),
        out_specs=[pl.BlockSpec((s.d, s.tv), lambda j, i: (0, j))]
        + [pl.BlockSpec((1, s.tv), lambda j, i: (0, j))] * n_rows,
        scratch_shapes=[pltpu.VMEM((s.d, s.tv), jnp.float32)]
        + [pltpu.VMEM((1, s.tv), jnp.float32)] * n_rows,
        name="jbce_linear_ce_dweight_tpu",
    )(*args)  # fmt: skip
    return tiles.backward_outputs(dh, dw, s)
