"""Fused linear + softmax statistics in plain XLA: tiles of ``hidden @ weight``, never all of it.

The implementation behind :func:`jbce.linear_softmax_cross_entropy` on every platform.

- Forward: a loop over vocabulary chunks (and, for very long inputs, token chunks inside
  it) computes one ``[token_chunk, vocab_chunk]`` tile of logits at a time, takes its
  :class:`jbce._stats.Stats` and merges them into each token's running statistics
  (:func:`jbce._stats.merge`, an online log-sum-exp). Only the per-token statistics leave
  the loop.
- Backward: the same walk recomputes each tile, turns it into its slice of ``d logits``
  (:func:`jbce._stats.logits_grad`, the formula every softmax loss uses) and accumulates
  ``d hidden`` (in the compute dtype) and ``d bias``; each ``d weight`` chunk is complete
  after its vocabulary step and is written once, in ``weight``'s dtype, so no
  ``[D, V]`` accumulator in float32 exists for bf16 weights.

Residuals: the inputs and two floats per token (shift and shifted log-sum-exp).

Chunks never pad or copy an operand: the last chunk of an axis is moved back to end at
the axis' size and overlaps its predecessor; the overlapping columns are masked out of the
statistics (and their gradient kept from the previous chunk), overlapping tokens are
recomputed identically.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jbce import _stats, _vma

# Logits in one tile when the token chunk is picked automatically: 2**23 float32 logits are
# 32 MiB; a tile holds the logits and their gradient. Few, large tiles keep the number of
# kernels per step small on accelerators (each tile launches a few).
TILE_ELEMENTS = 1 << 23
# Default vocabulary chunk: wide enough that each tile is an efficient matmul.
VOCAB_CHUNK = 2048


def tile_sizes(n: int, v: int, chunk_size) -> tuple[int, int]:
    """(token chunk, vocabulary chunk) for ``n`` tokens and ``v`` classes.

    ``chunk_size`` is None (vocabulary chunk 2048), an int (the vocabulary chunk) or a pair
    ``(token_chunk, vocab_chunk)``. Without a token chunk it is chosen so that a tile has at
    most 2**23 logits. Both are clipped into ``[1, n]`` and ``[1, v]``.
    """
    tn = None
    tv = VOCAB_CHUNK
    if isinstance(chunk_size, tuple):
        tn, tv = chunk_size
    elif chunk_size is not None:
        tv = chunk_size
    tv = max(1, min(v, tv))
    if tn is None:
        tn = TILE_ELEMENTS // tv
    return max(1, min(n, tn)), tv


def _chunk_start(i, size: int, total: int):
    """Start of chunk ``i``; the last chunk is moved back to end at ``total`` (it overlaps)."""
    return jnp.minimum(i * size, total - size)


def _num_chunks(total: int, size: int) -> int:
    return -(-total // size)


def _tile(hidden, weight, bias, labels, j, c0, tv, cap, dtype):
    """(pre-cap logits z, capped logits x, labels in tile columns, fresh-column mask)."""
    w = lax.dynamic_slice_in_dim(weight, c0, tv, 1)
    if hidden.dtype == w.dtype:
        z = jnp.dot(hidden, w, preferred_element_type=dtype).astype(dtype)
    else:
        z = jnp.dot(hidden.astype(dtype), w.astype(dtype))
    if bias is not None:
        z = z + lax.dynamic_slice_in_dim(bias, c0, tv, 0).astype(dtype)[None, :]
    cols = c0 + lax.broadcasted_iota(jnp.int32, (1, tv), 1)
    # Columns an overlapping last chunk did not see before (all of them when tv divides V).
    fresh = None if weight.shape[1] % tv == 0 else cols >= j * tv
    # A label seen by an earlier chunk must not be hit again in the overlap.
    local = jnp.where(labels >= j * tv, labels - c0, -1)
    return z, _stats.softcap(z, cap), local, fresh


def _token_slices(n, tn):
    """(number of token chunks, slicer) over the tokens; one chunk needs no slicing."""
    count = _num_chunks(n, tn)

    def take(i, *arrays):
        if count == 1:
            return arrays
        r0 = _chunk_start(i, tn, n)
        return tuple(None if a is None else lax.dynamic_slice_in_dim(a, r0, tn, 0) for a in arrays)

    return count, take


def _repeated_rows(i, n, tn):
    """Rows of token chunk ``i`` that an earlier chunk covered (None with one chunk)."""
    if _num_chunks(n, tn) == 1:
        return None
    return (_chunk_start(i, tn, n) + jnp.arange(tn)) < i * tn


def _put(i, n, tn, full, part):
    if _num_chunks(n, tn) == 1:
        return part
    r0 = _chunk_start(i, tn, n)
    return lax.dynamic_update_slice_in_dim(full, part, r0, 0)


def _empty_stats(n, dtype, sums, vary):
    zero = jnp.zeros((n,), dtype)
    lse = jnp.full((n,), -jnp.inf, dtype)
    fields = (zero, lse, zero) + ((zero, zero, None, zero) if sums else ())
    return _stats.Stats(*(None if f is None else vary(f) for f in fields))


def tiled_stats(hidden, weight, bias, labels, cap, dtype, tn, tv, sums):
    """Per-token :class:`jbce._stats.Stats` of ``hidden @ weight + bias`` ([N, D], [D, V])."""
    n, v = hidden.shape[0], weight.shape[1]
    vary = _vma.varying_like(hidden, weight, bias, labels, cap)
    count, take = _token_slices(n, tn)

    def vocab_chunk(j, acc):
        c0 = _chunk_start(j, tv, v)

        def token_chunk(i, acc):
            h, y = take(i, hidden, labels)
            _, x, local, fresh = _tile(h, weight, bias, y, j, c0, tv, cap, dtype)
            tile = _stats.block_stats(x, local, mask=fresh, sums=sums)
            old = _stats.Stats(*take(i, *acc))
            new = _stats.merge(old, tile)
            # Rows an overlapping last token chunk shares with its predecessor have this tile
            # merged in already.
            again = _repeated_rows(i, n, tn)
            if again is not None:
                new = _stats.Stats(*(None if f is None else jnp.where(again, o, f)
                                     for o, f in zip(old, new)))  # fmt: skip
            return _stats.Stats(*(None if f is None else _put(i, n, tn, a, f)
                                  for a, f in zip(acc, new)))  # fmt: skip

        return lax.fori_loop(0, count, token_chunk, acc) if count > 1 else token_chunk(0, acc)

    return lax.fori_loop(0, _num_chunks(v, tv), vocab_chunk, _empty_stats(n, dtype, sums, vary))


def tiled_grads(hidden, weight, bias, labels, cap, rows, saved, g, dtype, tn, tv):
    """(d hidden, d weight, d bias, d cap) for the cotangents ``g`` of :func:`tiled_stats`."""
    n, d = hidden.shape
    v = weight.shape[1]
    vary = _vma.varying_like(hidden, weight, bias, labels, cap, rows, saved.lse, g.lse)
    count, take = _token_slices(n, tn)

    def vocab_chunk(j, carry):
        dh, dw, db, dcap = carry
        c0 = _chunk_start(j, tv, v)
        w_j = lax.dynamic_slice_in_dim(weight, c0, tv, 1).astype(dtype)

        def token_chunk(i, carry):
            dh, dw_j, db_j, dcap = carry
            h, y, r, shift, lse = take(i, hidden, labels, rows, saved.shift, saved.lse)
            g_i = _stats.Stats(*take(i, *g))
            z, x, local, fresh = _tile(h, weight, bias, y, j, c0, tv, cap, dtype)
            dx, _ = _stats.logits_grad(
                x, local, _stats.Stats(shift, lse, None), g_i, mask=fresh, rows=r
            )
            again = _repeated_rows(i, n, tn)
            if again is not None:  # rows an overlapping last chunk shares count once
                dx = jnp.where(again[:, None], 0, dx)
            dz, dc = _stats.softcap_vjp(z, cap, dx)
            dh_i = take(i, dh)[0] + jnp.dot(dz, w_j.T)
            dh = _put(i, n, tn, dh, dh_i)
            dw_j = dw_j + jnp.dot(h.astype(dtype).T, dz)
            db_j = db_j + jnp.sum(dz, axis=0)
            return dh, dw_j, db_j, (None if dc is None else dcap + dc)

        init = (dh, vary(jnp.zeros((d, tv), dtype)), vary(jnp.zeros((tv,), dtype)), dcap)
        dh, dw_j, db_j, dcap = (
            lax.fori_loop(0, count, token_chunk, init) if count > 1 else token_chunk(0, init)
        )
        dw_j = dw_j.astype(dw.dtype)
        if v % tv:  # columns an overlapping last chunk shares with its predecessor keep theirs
            fresh = (c0 + jnp.arange(tv)) >= j * tv
            dw_j = jnp.where(fresh[None, :], dw_j, lax.dynamic_slice_in_dim(dw, c0, tv, 1))
            if db is not None:
                db_j = jnp.where(fresh, db_j, lax.dynamic_slice_in_dim(db, c0, tv, 0))
        dw = lax.dynamic_update_slice_in_dim(dw, dw_j, c0, 1)
        if db is not None:
            db = lax.dynamic_update_slice_in_dim(db, db_j, c0, 0)
        return dh, dw, db, dcap

    init = (
        vary(jnp.zeros((n, d), dtype)),
        vary(jnp.zeros((d, v), weight.dtype)),
        None if bias is None else vary(jnp.zeros((v,), dtype)),
        None if cap is None else vary(jnp.zeros((), dtype)),
    )
    return lax.fori_loop(0, _num_chunks(v, tv), vocab_chunk, init)


def _local_labels(labels, v_local, axis_name):
    if axis_name is None:
        return labels
    return labels - lax.axis_index(axis_name).astype(labels.dtype) * v_local


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def linear_stats(hidden, weight, bias, labels, cap, rows, dtype, tn, tv, sums, axis_name):
    """Per-token Stats of ``hidden @ weight + bias``; with ``axis_name`` ``weight`` (and
    ``bias``) hold this shard's vocabulary columns, labels are global ids and the
    statistics are global (replicated)."""
    y = _local_labels(labels, weight.shape[1], axis_name)
    st = tiled_stats(hidden, weight, bias, y, cap, dtype, tn, tv, sums)
    return st if axis_name is None else _stats.combine_over_axis(st, axis_name)


def _linear_stats_fwd(hidden, weight, bias, labels, cap, rows, dtype, tn, tv, sums, axis_name):
    st = linear_stats(hidden, weight, bias, labels, cap, rows, dtype, tn, tv, sums, axis_name)
    # Residuals: the inputs and two floats per token; each tile is recomputed backward.
    return st, (hidden, weight, bias, labels, cap, rows, st.shift, st.lse)


def _linear_stats_bwd(dtype, tn, tv, sums, axis_name, res, g):
    hidden, weight, bias, labels, cap, rows, shift, lse = res
    y = _local_labels(labels, weight.shape[1], axis_name)
    saved = _stats.Stats(shift, lse, None)
    dh, dw, db, dcap = tiled_grads(hidden, weight, bias, y, cap, rows, saved, g, dtype, tn, tv)
    # Inside shard_map an input replicated over a mesh axis its gradient varies on (weight
    # under data parallelism, hidden under vocabulary parallelism) gets the sum over it.
    like = _vma.psum_to_like
    return (
        like(dh.astype(hidden.dtype), hidden),
        like(dw, weight),
        None if bias is None else like(db.astype(bias.dtype), bias),
        jnp.zeros(labels.shape, jax.dtypes.float0),
        None if cap is None else like(dcap.astype(cap.dtype), cap),
        None if rows is None else jnp.zeros(rows.shape, jax.dtypes.float0),
    )


linear_stats.defvjp(_linear_stats_fwd, _linear_stats_bwd)
