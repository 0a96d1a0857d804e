r"""The contrastive losses on one device: the similarity matrix ``scale * x @ y.T`` in tiles.

The ``[B, B]`` logits of :func:`jbce.clip_loss` and :func:`jbce.siglip_loss` are the logits of
the fused linear loss with ``hidden = x`` and ``weight = y.T``, so both losses run on its one
tile walk (:func:`jbce._linear.chunked_xla.tiled_stats` / ``tiled_grads``), each passing in
what it computes of a ``[row_chunk, col_chunk]`` tile:

- CLIP: each tile's row and column softmax statistics (:func:`jbce._softmax.stats.block_stats`
  with the positive pairs of the tile as soft-label weights), merged into every row's and
  every column's running statistics (an online log-sum-exp in both directions from one
  matmul per tile). The backward pass recomputes each tile and turns it into its slice of
  ``d logits`` with the one softmax backward formula
  (:func:`jbce._softmax.stats.logits_grad`), once for the rows and once for the columns.
  Residuals: the inputs and two floats (shift, shifted log-sum-exp) per row and per column.
- SigLIP: each tile's row sums of :math:`-\log\sigma(\pm\ell)` (the exact log-sigmoid pair of
  the binary losses, :func:`jbce._core.math.softplus_pair`). Residuals: the inputs only.

:func:`forward_block` / :func:`backward_block` handle one block of rows against one block of
columns; a whole matrix on one device is one block, and :mod:`jbce._contrastive.ring` passes
the column blocks of several devices around a ring. :func:`stats_core` turns a pair of such
drivers into the ``custom_vjp`` both implementations use.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jbce._contrastive.tiles import Walk, tiled_grads, tiled_stats
from jbce._core import autodiff, sharding
from jbce._core.dtypes import to_compute
from jbce._core.math import sigmoid_pair, softplus_pair
from jbce._softmax import stats as _stats

# A tile's side when ``chunk_size`` is None: an eighth of the block's, so that the few
# tile-sized buffers of the backward pass stay a small fraction of the matrix (1/64 each),
# between 512 (smaller tiles only add loop steps) and 4096 (a 64 MiB float32 tile; larger
# ones gain little on a GPU, where fewer tiles mean fewer kernel launches). Value-and-grad
# temp at B = 8192, D = 64, against the dense loss's (``python -m bench.contrastive
# --memory``; deviceless H100 from ``--accelerators``): tiles of 1024 (this rule) 1/42 on
# CPU and 1/32 on an H100, of 2048 1/11 and 1/8.
TILE_MIN, TILE_MAX = 512, 4096


@dataclasses.dataclass(frozen=True)
class Config:
    """The static options of a contrastive core (hashable: a ``nondiff_argnum``).

    Attributes:
      loss: ``"clip"`` or ``"siglip"``.
      dtype: the compute dtype (float32, or float64).
      rows, cols: the tile's rows (of ``x``) and columns (of ``y``), at most the block's.
      axis_name: the mesh axis the batch is sharded on (the ring), or None (one device).
    """

    loss: str
    dtype: jnp.dtype
    rows: int
    cols: int
    axis_name: str | tuple[str, ...] | None = None


def tile_sizes(b: int, chunk_size) -> tuple[int, int]:
    """(rows, columns) of a tile for a block of ``b`` rows and columns: ``chunk_size`` is an
    int (both ways), a pair, or None (``b / 8`` within ``[TILE_MIN, TILE_MAX]``); clipped to
    ``[1, b]``."""
    auto = max(TILE_MIN, min(TILE_MAX, b // 8))
    rows, cols = chunk_size if isinstance(chunk_size, tuple) else (chunk_size, chunk_size)
    rows, cols = (auto if c is None else c for c in (rows, cols))
    return max(1, min(b, rows)), max(1, min(b, cols))


def _positives(ids_r, ids_c):
    """``[rows, cols]``: the true pairs of a tile (equal ids)."""
    return ids_r[:, None] == ids_c[None, :]


# --- CLIP: row and column softmax statistics, the positives as soft targets ---------------------
def _clip_init(b, dtype):
    zero = jnp.zeros((b,), dtype)
    return _stats.Stats(zero, jnp.full((b,), -jnp.inf, dtype), None, zero, zero)


def _clip_tile_stats(z, local, fresh, keep, columns, params, per_row):
    (ids_c,), (scale,), (ids_r,) = columns, params, per_row
    x = scale * z
    w = _positives(ids_r, ids_c).astype(x.dtype)
    rows = _stats.block_stats(x, None, weights=w, mask=fresh, sums=True, soft=True)
    kept = None if keep is None else keep[None, :]  # rows an overlapping chunk counted already
    cols = _stats.block_stats(x.T, None, weights=w.T, mask=kept, sums=True, soft=True)
    return rows, cols


def _clip_tile_grad(z, local, fresh, keep, columns, params, per_row):
    (ids_c, *col), (scale,), (ids_r, *row) = columns, params, per_row
    x = scale * z
    w = _positives(ids_r, ids_c).astype(x.dtype)
    saved_r, g_r = _saved_and_cotangent(*row)
    saved_c, g_c = _saved_and_cotangent(*col)
    fresh_cols = None if fresh is None else fresh[0]
    kept = None if keep is None else keep[None, :]
    d_r, _ = _stats.logits_grad(x, None, saved_r, g_r, weights=w, mask=fresh, rows=keep, soft=True)
    d_c, _ = _stats.logits_grad(
        x.T, None, saved_c, g_c, weights=w.T, mask=kept, rows=fresh_cols, soft=True
    )
    dx = d_r + d_c.T
    # x = scale z: d z = scale d x, d scale = sum(d x z)
    return scale * dx, (None,) * len(columns), (jnp.sum(dx * z),)


def _saved_and_cotangent(shift, lse, g_lse, g_logit_sum):
    return _stats.Stats(shift, lse, None), _stats.Stats(None, g_lse, None, g_logit_sum)


# --- SigLIP: row sums of -log sigmoid(+-(scale z + bias)) ----------------------------------------
def _siglip_init(b, dtype):
    return jnp.zeros((b,), dtype)


def _siglip_logits(z, columns, params, per_row):
    (ids_c, *_), (scale, bias), (ids_r, *_) = columns, params, per_row
    return scale * z + bias, _positives(ids_r, ids_c)


def _siglip_tile_stats(z, local, fresh, keep, columns, params, per_row):
    x, pos = _siglip_logits(z, columns, params, per_row)
    sp_pos, sp_neg = softplus_pair(x)  # -log sigmoid(-x), -log sigmoid(x)
    terms = jnp.where(pos, sp_neg, sp_pos)
    if fresh is not None:
        terms = jnp.where(fresh, terms, jnp.zeros((), terms.dtype))
    return jnp.sum(terms, axis=1)


def _siglip_tile_grad(z, local, fresh, keep, columns, params, per_row):
    x, pos = _siglip_logits(z, columns, params, per_row)
    (_, g) = per_row
    s_pos, s_neg = sigmoid_pair(x)
    # d/dx -log sigmoid(x) = -sigmoid(-x); d/dx -log sigmoid(-x) = sigmoid(x)
    dx = g[:, None] * jnp.where(pos, -s_neg, s_pos)
    zero = jnp.zeros((), dx.dtype)
    if fresh is not None:
        dx = jnp.where(fresh, dx, zero)
    if keep is not None:
        dx = jnp.where(keep[:, None], dx, zero)
    scale = params[0]
    return scale * dx, (None,) * len(columns), (jnp.sum(dx * z), jnp.sum(dx))


class _Loss(NamedTuple):
    init: callable  # (b, dtype) -> running row statistics of no column
    tile_stats: callable
    merge: callable
    tile_grad: callable
    columns: bool  # column statistics too (CLIP)


LOSSES = {
    "clip": _Loss(_clip_init, _clip_tile_stats, _stats.merge, _clip_tile_grad, True),
    "siglip": _Loss(_siglip_init, _siglip_tile_stats, operator.add, _siglip_tile_grad, False),
}


# --- one block of rows against one block of columns ---------------------------------------------
def empty(cfg: Config, b: int, like):
    """(row, column) statistics of no tile for ``b`` rows and ``b`` columns (columns: None for
    SigLIP), varying over the mesh axes ``like`` (a tuple of arrays) varies on."""
    loss = LOSSES[cfg.loss]
    vary = sharding.varying_like(*like)
    rows = jax.tree.map(vary, loss.init(b, cfg.dtype))
    return rows, (rows if loss.columns else None)


def forward_block(cfg: Config, x, y, ids_x, ids_y, params, rows, cols):
    """Running statistics of ``x``'s rows (``rows``, merged into) and ``y``'s columns (``cols``,
    CLIP; None for SigLIP) after the block ``scale * x @ y.T`` ([bx, D], [by, D])."""
    loss = LOSSES[cfg.loss]
    tn, tv = min(cfg.rows, x.shape[0]), min(cfg.cols, y.shape[0])
    out = tiled_stats(
        (x, y.T, None, None), (ids_y,), params, loss.tile_stats, loss.merge, rows,
        Walk(cfg.dtype, tn, tv), per_row=(ids_x,), col_init=cols,
    )  # fmt: skip
    return out if loss.columns else (out, None)


def backward_block(cfg: Config, x, y, ids_x, ids_y, params, row_res, col_res):
    """(d x, d y, d params) of the block ``scale * x @ y.T``, in the compute dtype.

    ``row_res``/``col_res``: per row of ``x`` / per column of ``y``, what the tile's backward
    needs (CLIP: saved shift and log-sum-exp, and their cotangents; SigLIP: the rows'
    cotangents / nothing)."""
    loss = LOSSES[cfg.loss]
    tn, tv = min(cfg.rows, x.shape[0]), min(cfg.cols, y.shape[0])
    # y.T in the compute dtype: d y (the walk's d weight) then comes in it too, so that a
    # ring can add the blocks' parts up in float32.
    dh, dw, _, _, dps = tiled_grads(
        (x, to_compute(y, cfg.dtype).T, None, None), (ids_y, *col_res), params,
        (ids_x, *row_res), loss.tile_grad, Walk(cfg.dtype, tn, tv),
    )  # fmt: skip
    return dh, dw.T, dps


def residuals(cfg: Config, out):
    """What the backward pass keeps of the statistics: (per row, per column) tuples."""
    if not LOSSES[cfg.loss].columns:
        return (), ()
    rows, cols = out
    return (rows.shift, rows.lse), (cols.shift, cols.lse)


def tile_inputs(cfg: Config, saved, g):
    """(per row, per column) inputs of the tiles' backward from the residuals and the
    cotangents ``g`` of the statistics."""
    if not LOSSES[cfg.loss].columns:
        return (g,), ()
    (row_saved, col_saved), (g_rows, g_cols) = saved, g
    # The loss depends on the statistics through l and s (W counts positives, a constant).
    return (*row_saved, g_rows.lse, g_rows.logit_sum), (*col_saved, g_cols.lse, g_cols.logit_sum)


def params_of(cfg: Config, scale, bias):
    return (scale,) if cfg.loss == "clip" else (scale, bias)


def stats_core(forward, backward):
    """The ``custom_vjp`` ``core(x, y, ids, scale, bias, cfg)`` of an implementation.

    ``forward(cfg, x, y, ids, params)`` gives the statistics (CLIP: (rows, columns)
    :class:`jbce._softmax.stats.Stats`; SigLIP: the row sums); ``backward(cfg, x, y, ids,
    params, row_res, col_res)`` gives (d x, d y, d params) from :func:`tile_inputs`.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
    def core(x, y, ids, scale, bias, cfg):
        return forward(cfg, x, y, ids, params_of(cfg, scale, bias))

    def core_fwd(x, y, ids, scale, bias, cfg):
        out = core(x, y, ids, scale, bias, cfg)
        # Residuals: the inputs, and for CLIP each row's and column's shift and log-sum-exp;
        # every tile is recomputed backward.
        return out, (x, y, ids, scale, bias, residuals(cfg, out))

    def core_bwd(cfg, res, g):
        x, y, ids, scale, bias, saved = res
        row_res, col_res = tile_inputs(cfg, saved, g)
        dx, dy, dps = backward(cfg, x, y, ids, params_of(cfg, scale, bias), row_res, col_res)
        dbias = dps[1] if bias is not None else None
        return autodiff.cotangents((x, dx), (y, dy), (ids, None), (scale, dps[0]), (bias, dbias))

    core.defvjp(core_fwd, core_bwd)
    return core


def forward(cfg: Config, x, y, ids, params):
    """The statistics of the whole matrix: one block."""
    rows, cols = empty(cfg, x.shape[0], (x, y, ids, *params))
    rows, cols = forward_block(cfg, x, y, ids, ids, params, rows, cols)
    return (rows, cols) if cols is not None else rows


def backward(cfg: Config, x, y, ids, params, row_res, col_res):
    return backward_block(cfg, x, y, ids, ids, params, row_res, col_res)


similarity_stats = stats_core(forward, backward)
