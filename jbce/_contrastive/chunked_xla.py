r"""The contrastive losses on one device: the similarity matrix ``scale * x @ y.T`` in tiles.

The ``[B, B]`` logits of :func:`jbce.clip_loss` and :func:`jbce.siglip_loss` are the logits of
the fused linear loss with ``hidden = x`` and ``weight = y.T``, so both losses run on the one
tile walk of the fused losses (:func:`jbce._linear.walk.forward` / ``backward``), each passing
in what it computes of a ``[row_chunk, col_chunk]`` tile (a :class:`jbce._linear.walk.Reduce`
forward, a :class:`jbce._linear.walk.Grad` backward). The tiles are square, an eighth of the
block a side within [512, 4096] (:func:`jbce._linear.walk.tile_sizes`, op ``"contrastive"``).

- CLIP: each tile's row and column softmax statistics (:func:`jbce._softmax.stats.block_stats`
  with the positive pairs of the tile as soft-label weights), merged into every row's and
  every column's running statistics (an online log-sum-exp in both directions from one
  matmul per tile: the walk's column statistics, :attr:`jbce._linear.walk.Reduce.columns`).
  The backward pass recomputes each tile and turns it into its slice of
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
from jax import lax

from jbce._core import autodiff
from jbce._core.dtypes import to_compute
from jbce._core.math import sigmoid_pair, softplus_pair
from jbce._linear import walk as _walk
from jbce._softmax import stats as _stats


@dataclasses.dataclass(frozen=True)
class Config:
    """The static options of a contrastive core (hashable: a ``nondiff_argnum``).

    Attributes:
      loss: ``"clip"`` or ``"siglip"``.
      dtype: the compute dtype (float32, or float64).
      tiles: the tiles of a block (:func:`jbce._linear.walk.tile_sizes`, op
        ``"contrastive"``: rows of ``x`` as tokens, columns of ``y`` as classes).
      axis_name: the mesh axis the batch is sharded on (the ring), or None (one device).
    """

    loss: str
    dtype: jnp.dtype
    tiles: _walk.Tiles
    axis_name: str | tuple[str, ...] | None = None


def _positives(ids_r, ids_c):
    """``[rows, cols]``: the true pairs of a tile (equal ids)."""
    return ids_r[:, None] == ids_c[None, :]


# --- CLIP: row and column softmax statistics, the positives as soft targets ---------------------
def _clip_init(b, dtype):
    zero = jnp.zeros((b,), dtype)
    return _stats.Stats(zero, jnp.full((b,), -jnp.inf, dtype), None, zero, zero)


def _clip_tile_stats(t: _walk.Tile):
    (ids_c,), (scale,), (ids_r,) = t.columns, t.params, t.rows
    x = scale * t.z[0]
    w = _positives(ids_r, ids_c).astype(x.dtype)
    rows = _stats.block_stats(x, None, weights=w, mask=t.fresh, sums=True, soft=True)
    kept = None if t.keep is None else t.keep[None, :]  # rows an earlier chunk counted
    cols = _stats.block_stats(x.T, None, weights=w.T, mask=kept, sums=True, soft=True)
    return rows, cols


def _clip_tile_grad(t: _walk.Tile):
    (ids_c, *col), (scale,), (ids_r, *row) = t.columns, t.params, t.rows
    z, fresh, keep = t.z[0], t.fresh, t.keep
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
    return (scale * dx,), (None,) * len(t.columns), (jnp.sum(dx * z),)


def _saved_and_cotangent(shift, lse, g_lse, g_logit_sum):
    return _stats.Stats(shift, lse, None), _stats.Stats(None, g_lse, None, g_logit_sum)


# --- SigLIP: row sums of -log sigmoid(+-(scale z + bias)) ----------------------------------------
def _siglip_init(b, dtype):
    return jnp.zeros((b,), dtype)


def _siglip_logits(t: _walk.Tile):
    (ids_c, *_), (scale, bias), (ids_r, *_) = t.columns, t.params, t.rows
    return scale * t.z[0] + bias, _positives(ids_r, ids_c)


def _siglip_tile_stats(t: _walk.Tile):
    x, pos = _siglip_logits(t)
    sp_pos, sp_neg = softplus_pair(x)  # -log sigmoid(-x), -log sigmoid(x)
    terms = jnp.where(pos, sp_neg, sp_pos)
    if t.fresh is not None:
        terms = jnp.where(t.fresh, terms, jnp.zeros((), terms.dtype))
    return jnp.sum(terms, axis=1)


def _siglip_tile_grad(t: _walk.Tile):
    x, pos = _siglip_logits(t)
    (_, g) = t.rows
    s_pos, s_neg = sigmoid_pair(x)
    # d/dx -log sigmoid(x) = -sigmoid(-x); d/dx -log sigmoid(-x) = sigmoid(x)
    dx = g[:, None] * jnp.where(pos, -s_neg, s_pos)
    zero = jnp.zeros((), dx.dtype)
    if t.fresh is not None:
        dx = jnp.where(t.fresh, dx, zero)
    if t.keep is not None:
        dx = jnp.where(t.keep[:, None], dx, zero)
    scale = t.params[0]
    return (scale * dx,), (None,) * len(t.columns), (jnp.sum(dx * t.z[0]), jnp.sum(dx))


class _Loss(NamedTuple):
    reduce: _walk.Reduce  # what the forward walk computes of a tile (CLIP: columns too)
    tile_grad: callable  # the backward walk's :attr:`jbce._linear.walk.Grad.tile`


LOSSES = {
    "clip": _Loss(
        _walk.Reduce(_clip_tile_stats, _stats.merge, _clip_init, _stats.combine_over_axis,
                     columns=True),
        _clip_tile_grad,
    ),
    "siglip": _Loss(
        _walk.Reduce(_siglip_tile_stats, operator.add, _siglip_init, lax.psum), _siglip_tile_grad
    ),
}  # fmt: skip


# --- one block of rows against one block of columns ---------------------------------------------
def forward_block(cfg: Config, x, y, ids_x, ids_y, params):
    """Statistics of ``x``'s rows and (CLIP; None for SigLIP) ``y``'s columns in the block
    ``scale * x @ y.T`` ([bx, D], [by, D])."""
    reduce = LOSSES[cfg.loss].reduce
    ops = _walk.Operands((_walk.Model(x, y.T),), (ids_x,), (ids_y,), params)
    out = _walk.forward(ops, reduce, _walk.Walk(cfg.dtype, cfg.tiles))
    return out if reduce.columns else (out, None)


def backward_block(cfg: Config, x, y, ids_x, ids_y, params, row_res, col_res):
    """(d x, d y, d params) of the block ``scale * x @ y.T``, in the compute dtype.

    ``row_res``/``col_res``: per row of ``x`` / per column of ``y``, what the tile's backward
    needs (CLIP: saved shift and log-sum-exp, and their cotangents; SigLIP: the rows'
    cotangents / nothing)."""
    # y.T in the compute dtype: d y (the walk's d weight) then comes in it too, so that a
    # ring can add the blocks' parts up in float32.
    model = _walk.Model(x, to_compute(y, cfg.dtype).T)
    ops = _walk.Operands((model,), (ids_x, *row_res), (ids_y, *col_res), params)
    grad = _walk.Grad(
        LOSSES[cfg.loss].tile_grad, ((True, True, False),), (False,) * len(ops.columns),
        (True,) * len(params),
    )  # fmt: skip
    out = _walk.backward(ops, grad, _walk.Walk(cfg.dtype, cfg.tiles))
    dx, dy_t, _ = out.models[0]
    return dx, dy_t.T, out.params


def residuals(cfg: Config, out):
    """What the backward pass keeps of the statistics: (per row, per column) tuples."""
    if not LOSSES[cfg.loss].reduce.columns:
        return (), ()
    rows, cols = out
    return (rows.shift, rows.lse), (cols.shift, cols.lse)


def tile_inputs(cfg: Config, saved, g):
    """(per row, per column) inputs of the tiles' backward from the residuals and the
    cotangents ``g`` of the statistics."""
    if not LOSSES[cfg.loss].reduce.columns:
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
    rows, cols = forward_block(cfg, x, y, ids, ids, params)
    return (rows, cols) if cols is not None else rows


def backward(cfg: Config, x, y, ids, params, row_res, col_res):
    return backward_block(cfg, x, y, ids, ids, params, row_res, col_res)


similarity_stats = stats_core(forward, backward)
