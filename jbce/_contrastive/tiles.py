"""The contrastive losses' own tiled walk over the similarity matrix ``x @ y.T``, with
per-column statistics beside the per-row ones.

Transitional: this is the fused losses' former walk, kept here for the contrastive losses
until they move onto the one walk of :mod:`jbce._linear.walk`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jbce._core import sharding


@dataclasses.dataclass(frozen=True)
class Walk:
    """The static options of a tiled walk (hashable: the custom-VJP cores take them as one
    non-differentiable argument).

    Attributes:
      dtype: the compute dtype of the tiles.
      tn, tv: the tile's token and vocabulary chunks (:func:`tile_sizes`).
      axis_name: the mesh axis the vocabulary is sharded over, or None.
      sums: the cross-entropy's smoothing sums too (``logit_sum``, ``weight_sum``, ``count``).
    """

    dtype: jnp.dtype
    tn: int
    tv: int
    axis_name: str | None = None
    sums: bool = False


def chunk_start(i, size: int, total: int):
    """Start of chunk ``i``; the last chunk is moved back to end at ``total`` (it overlaps)."""
    return jnp.minimum(i * size, total - size)


def num_chunks(total: int, size: int) -> int:
    return -(-total // size)


def _tile(hidden, weight, bias, labels, j, c0, tv, dtype):
    """(logits ``z`` of the tile, labels as tile columns, fresh-column mask or None)."""
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
    if labels is None:
        return z, None, fresh
    # A label seen by an earlier chunk must not be hit again in the overlap.
    local = jnp.where(labels >= j * tv, labels - c0, -1)
    return z, local, fresh


def _columns(columns, c0, tv):
    """The vocabulary chunk ``[c0, c0 + tv)`` of each ``[V]`` array (None stays None)."""
    return tuple(None if c is None else lax.dynamic_slice_in_dim(c, c0, tv, 0) for c in columns)


def _token_slices(n, tn):
    """(number of token chunks, slicer of a pytree of ``[N, ...]`` arrays); one chunk needs no
    slicing."""
    count = num_chunks(n, tn)

    def take(i, tree):
        if count == 1:
            return tree
        r0 = chunk_start(i, tn, n)
        return jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, r0, tn, 0), tree)

    return count, take


def _repeated_rows(i, n, tn):
    """Rows of token chunk ``i`` that an earlier chunk covered (None with one chunk)."""
    if num_chunks(n, tn) == 1:
        return None
    return (chunk_start(i, tn, n) + jnp.arange(tn)) < i * tn


def _put(i, n, tn, full, part):
    """``part`` (a pytree of ``[tn, ...]``) written into ``full`` at token chunk ``i``."""
    if num_chunks(n, tn) == 1:
        return part
    r0 = chunk_start(i, tn, n)
    return jax.tree.map(lambda f, p: lax.dynamic_update_slice_in_dim(f, p, r0, 0), full, part)


def _loop(count, body, init):
    return lax.fori_loop(0, count, body, init) if count > 1 else body(0, init)


def tiled_stats(model, columns, params, tile_stats, merge, init, walk: Walk, *, per_row=(),
                col_init=None):  # fmt: skip
    """Per-token statistics of the logits ``hidden @ weight + bias`` ([N, D], [D, V]).

    The one forward walk over ``[tn, tv]`` tiles that every fused op shares.

    Args:
      model: ``(hidden [N, D], weight [D, V], bias [V] or None, labels [N] or None)``; each
        tile gets the labels as its local columns.
      columns: tuple of ``[V]`` arrays (class weights) or None; each tile gets its chunk.
      params: tuple of scalar arrays (soft-cap, temperature) or None, passed to every tile.
      tile_stats: ``(z, local_labels, fresh, keep, columns, params, per_row) -> stats`` of
        one tile's logits ``z`` ``[tn, tv]``: a pytree of ``[tn]`` arrays (the signature of
        :func:`tiled_grads`'s ``tile_grad``). ``fresh`` (None, or ``[1, tv]`` boolean) marks
        the columns an overlapping last chunk has not seen yet: the others must be left out.
        ``keep`` (None, or ``[tn]`` boolean) marks the rows an overlapping last token chunk
        has not seen yet; the walk itself keeps the other rows' statistics.
      merge: ``(old, new) -> stats`` of two disjoint blocks of the same rows' classes.
      init: the statistics of no class, ``[N]`` leaves.
      walk: the tile shapes and compute dtype.
      per_row: a pytree of ``[N]`` arrays; each tile gets its token chunk.
      col_init: per-column statistics (``[V]`` leaves) to merge the tiles' into, or None.
        With it ``tile_stats`` returns ``(row stats, column stats)``, the column statistics
        of its ``keep`` rows only (a pytree of ``[tv]`` arrays, merged with ``merge`` too),
        and the walk returns ``(row stats, column stats)``: both directions of the logits
        from one matmul per tile (the contrastive losses' rows and columns).
    """
    hidden, weight, bias, labels = model
    dtype, tn, tv = walk.dtype, walk.tn, walk.tv
    n, v = hidden.shape[0], weight.shape[1]
    vary = sharding.varying_like(hidden, weight, bias, labels, *columns, *params,
                                 *jax.tree.leaves((per_row, col_init)))  # fmt: skip
    count, take = _token_slices(n, tn)

    def vocab_chunk(j, carry):
        acc, col_acc = carry
        c0 = chunk_start(j, tv, v)
        cols = _columns(columns, c0, tv)

        def token_chunk(i, carry):
            acc, col_j = carry
            h, y, rows = take(i, (hidden, labels, per_row))
            z, local, fresh = _tile(h, weight, bias, y, j, c0, tv, dtype)
            # Rows an overlapping last token chunk shares with its predecessor have this tile
            # merged in already.
            again = _repeated_rows(i, n, tn)
            keep = None if again is None else ~again
            out = tile_stats(z, local, fresh, keep, cols, params, rows)
            if col_j is not None:
                out, col_out = out
                col_j = merge(col_j, col_out)
            old = take(i, acc)
            new = merge(old, out)
            if again is not None:
                new = jax.tree.map(lambda o, f: jnp.where(again, o, f), old, new)
            return _put(i, n, tn, acc, new), col_j

        col_j = jax.tree.map(lambda c: lax.dynamic_slice_in_dim(c, c0, tv, 0), col_acc)
        acc, col_j = _loop(count, token_chunk, (acc, col_j))
        return acc, _write_columns(j, c0, tv, v, col_acc, col_j)

    init = jax.tree.map(vary, (init, col_init))
    acc, col_acc = lax.fori_loop(0, num_chunks(v, tv), vocab_chunk, init)
    return acc if col_init is None else (acc, col_acc)


def tiled_grads(model, columns, params, per_row, tile_grad, walk: Walk):
    """``(d hidden, d weight, d bias, d columns, d params)``: the backward walk every fused op
    shares, recomputing each tile of :func:`tiled_stats`.

    Args:
      model, columns, params, walk: as for :func:`tiled_stats`.
      per_row: a pytree of ``[N]`` arrays (saved statistics, their cotangents, row masks);
        each tile gets its token chunk.
      tile_grad: ``(z, local_labels, fresh, keep, columns, params, per_row) -> (d z,
        d columns, d params)`` for one tile: ``d z`` ``[tn, tv]``, a tuple like ``columns``
        of ``[tv]`` (None for None) and a tuple like ``params``. ``keep`` (None, or ``[tn]``
        boolean) marks the rows this tile counts: the others (covered by an earlier,
        overlapping token chunk) must get exactly zero gradient.

    ``d hidden`` is in the compute dtype, ``d weight`` in ``weight``'s, the others in the
    compute dtype.
    """
    hidden, weight, bias, labels = model
    dtype, tn, tv = walk.dtype, walk.tn, walk.tv
    n, d = hidden.shape
    v = weight.shape[1]
    vary = sharding.varying_like(hidden, weight, bias, labels, *columns, *params,
                             *jax.tree.leaves(per_row))  # fmt: skip
    count, take = _token_slices(n, tn)

    def vocab_chunk(j, carry):
        dh, dw, db, dcols, dps = carry
        c0 = chunk_start(j, tv, v)
        w_j = lax.dynamic_slice_in_dim(weight, c0, tv, 1).astype(dtype)
        cols = _columns(columns, c0, tv)

        def token_chunk(i, carry):
            dh, dw_j, db_j, dcols_j, dps = carry
            h, y, rows = take(i, (hidden, labels, per_row))
            z, local, fresh = _tile(h, weight, bias, y, j, c0, tv, dtype)
            again = _repeated_rows(i, n, tn)
            keep = None if again is None else ~again  # rows a shared chunk counts once
            dz, dc, dp = tile_grad(z, local, fresh, keep, cols, params, rows)
            dh = _put(i, n, tn, dh, take(i, dh) + jnp.dot(dz, w_j.T))
            dw_j = dw_j + jnp.dot(h.astype(dtype).T, dz)
            db_j = None if db_j is None else db_j + jnp.sum(dz, axis=0)
            return dh, dw_j, db_j, _add(dcols_j, dc), _add(dps, dp)

        zeros = tuple(None if c is None else vary(jnp.zeros((tv,), dtype)) for c in columns)
        db_j = None if db is None else vary(jnp.zeros((tv,), dtype))
        init = (dh, vary(jnp.zeros((d, tv), dtype)), db_j, zeros, dps)
        dh, dw_j, db_j, dcols_j, dps = _loop(count, token_chunk, init)
        dw_j = dw_j.astype(dw.dtype)
        dw, db, dcols = _write_columns(j, c0, tv, v, (dw, db, dcols), (dw_j, db_j, dcols_j))
        return dh, dw, db, dcols, dps

    init = (
        vary(jnp.zeros((n, d), dtype)),
        vary(jnp.zeros((d, v), weight.dtype)),
        None if bias is None else vary(jnp.zeros((v,), dtype)),
        tuple(None if c is None else vary(jnp.zeros((v,), dtype)) for c in columns),
        tuple(None if p is None else vary(jnp.zeros((), dtype)) for p in params),
    )
    return lax.fori_loop(0, num_chunks(v, tv), vocab_chunk, init)


def _write_columns(j, c0, tv, v, fulls, parts):
    """``parts`` (a pytree of ``[..., tv]`` chunks) written into ``fulls`` (``[..., V]``) at
    vocabulary chunk ``j``; columns an overlapping last chunk shares with its predecessor
    keep what that one wrote."""
    if v % tv:
        fresh = (c0 + jnp.arange(tv)) >= j * tv
        parts = jax.tree.map(lambda p, f: _keep_fresh(fresh, p, f, c0, tv), parts, fulls)
    return jax.tree.map(
        lambda f, p: lax.dynamic_update_slice_in_dim(f, p, c0, f.ndim - 1), fulls, parts
    )


def _keep_fresh(fresh, part, full, c0, tv):
    """``part`` (a chunk of a ``[..., V]`` gradient) where ``fresh``, else what ``full`` has."""
    old = lax.dynamic_slice_in_dim(full, c0, tv, full.ndim - 1)
    return jnp.where(fresh.reshape((1,) * (part.ndim - 1) + (tv,)), part, old)


def _add(acc, part):
    """Elementwise sum of two tuples; a None part (no gradient) leaves its entry as it is."""
    return tuple(a if b is None else a + b for a, b in zip(acc, part, strict=True))


# --- softmax cross-entropy statistics (jbce.linear_softmax_cross_entropy) ----------------------
