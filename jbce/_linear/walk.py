"""The one tile walk of the fused linear ops, and the one rule for its tile sizes.

:func:`jbce.linear_softmax_cross_entropy`, :func:`jbce.linear_log_probs` and
:func:`jbce.linear_distillation_loss` (their XLA implementations, :mod:`jbce._linear.chunked_xla`
and :mod:`jbce._linear.distill_xla`) compute the logits ``hidden @ weight + bias`` of one or two
models one ``[token_chunk, vocab_chunk]`` tile at a time and never all of them. What differs
between them is what they compute of a tile; how the tiles are walked is written here once:

- :func:`forward`, token-major: for each block of tokens (a ``lax.scan``; one block when a
  tile holds whole batches), a first pass over the vocabulary chunks merges each tile's
  per-row statistics into the rows' running ones (:class:`Reduce`: ``stats``, ``merge``,
  ``empty``; an online log-sum-exp), combines them over the vocabulary's mesh axis, and an
  optional second pass walks the chunks again summing per-row terms given the rows' final
  statistics (the distillation's divergence). With whole vocabulary rows in a tile (one
  chunk) both passes read the same tile: each model's logits are computed once.
- :func:`backward`, vocabulary-major: the same tiles are recomputed, turned into ``d z`` of
  each model by the op (:class:`Grad`), and accumulated into ``d hidden`` (in the compute
  dtype), ``d bias``, per-class gradients (class weights) and scalar ones (soft-cap,
  temperature); each ``d weight`` chunk is complete after its vocabulary step and written
  once, in ``weight``'s dtype (no ``[D, V]`` float32 accumulator for bf16 weights). Only the
  gradients :class:`Grad` asks for are computed: a model without any costs no matmul beyond
  its tile's recomputation.

Chunks never pad or copy an operand: the last chunk of an axis is moved back to end at the
axis' size and overlaps its predecessor. A tile tells the op which of its columns are new
(:attr:`Tile.fresh`: the op takes the others out of its softmax) and, backward, which of its
rows count (:attr:`Tile.keep`: the others must get zero gradient); the forward walk counts an
overlapping token block's rows once, the backward walk keeps the gradient columns of the
earlier chunk.

Tile sizes (:func:`tile_sizes`) come from ``chunk_size`` and the table :data:`DEFAULTS` (per op,
pass and platform); the platform's are chosen when the program is lowered
(:func:`per_platform`, no conditional).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jbce._core import sharding

# --- tile sizes ---------------------------------------------------------------------------------
PASSES = ("forward", "backward")
PLATFORMS = ("cpu", "other")

# (vocabulary chunk, or None for whole rows; logits per tile when the token chunk is not
# given), per (op, pass), on CPU and on the other platforms. A tile holds the logits of each
# model and, backward, their gradient: 2**23 float32 logits are 32 MiB.
# - Cross-entropy and log-probabilities: 2048-column chunks, wide enough that each tile is an
#   efficient matmul, 2**23 logits a tile.
# - Distillation: forward, whole vocabulary rows (each model's logits computed once for both
#   passes); backward, wider chunks off CPU. Off CPU 2**25 logits a tile, so that an
#   accelerator runs a few large tiles (each launches a handful of kernels, and each token
#   block of the forward pass reads the weights once): at N=4096, V=32768 the deviceless H100
#   compile launches about a quarter of the kernels (`python -m bench.accelerators`).
_CE = {"forward": ((2048, 1 << 23), (2048, 1 << 23)), "backward": ((2048, 1 << 23),) * 2}
DEFAULTS: dict[str, dict[str, tuple[tuple[int | None, int], tuple[int | None, int]]]] = {
    "cross_entropy": _CE,
    "log_probs": _CE,
    "distillation": {
        "forward": ((None, 1 << 23), (None, 1 << 25)),
        "backward": ((2048, 1 << 23), (8192, 1 << 25)),
    },
}


@dataclasses.dataclass(frozen=True)
class Tiles:
    """``(token chunk, vocabulary chunk)`` of each pass, as ``(on CPU, elsewhere)``."""

    forward: tuple[tuple[int, int], tuple[int, int]]
    backward: tuple[tuple[int, int], tuple[int, int]]


def tile_sizes(n: int, v: int, chunk_size, op: str) -> Tiles:
    """The tiles of ``op`` (a key of :data:`DEFAULTS`) for ``n`` tokens and ``v`` classes.

    ``chunk_size`` None: the table's tiles of each pass and platform; an int: the vocabulary
    chunk of both passes; a pair ``(token_chunk, vocab_chunk)``: both passes' tiles. A token
    chunk not given keeps a tile at the table's number of logits. Both are clipped into
    ``[1, n]`` and ``[1, v]``.
    """

    def one(default):
        chunk, elements = default
        tn = None
        if isinstance(chunk_size, tuple):
            tn, chunk = chunk_size
        elif chunk_size is not None:
            chunk = chunk_size
        tv = max(1, min(v, v if chunk is None else chunk))
        tn = elements // tv if tn is None else tn
        return max(1, min(n, tn)), tv

    table = DEFAULTS[op]
    return Tiles(*(tuple(one(d) for d in table[p]) for p in PASSES))


def per_platform(fn, tiles, *args):
    """``fn(*args, tn, tv)`` with ``tiles = (on CPU, elsewhere)``'s tile, the platform's chosen
    when the program is lowered (no conditional); directly when they are the same."""
    cpu, other = tiles
    if cpu == other:
        return fn(*args, *cpu)
    return lax.platform_dependent(
        *args, cpu=lambda *a: fn(*a, *cpu), default=lambda *a: fn(*a, *other)
    )


# --- what a walk is given -----------------------------------------------------------------------
class Model(NamedTuple):
    """One model's output layer: ``hidden`` ``[N, D]``, ``weight`` ``[D, V]``, ``bias`` ``[V]``
    or None."""

    hidden: jax.Array
    weight: jax.Array
    bias: jax.Array | None = None


class Operands(NamedTuple):
    """What a walk reads.

    Attributes:
      models: one or two :class:`Model` (the same ``N`` and ``V``).
      rows: a pytree of ``[N]`` arrays (labels, saved statistics, cotangents, row masks);
        each tile gets its token chunk's.
      columns: a tuple of ``[V]`` arrays (class weights) or None; each tile gets its chunk.
      params: a tuple of scalar arrays (soft-cap, temperature) or None, given to every tile.
    """

    models: tuple[Model, ...]
    rows: Any = ()
    columns: tuple = ()
    params: tuple = ()


@dataclasses.dataclass(frozen=True)
class Walk:
    """The static options of a walk (hashable: a custom-derivative core takes them as one
    non-differentiable argument): the tiles' compute ``dtype``, their shapes
    (:func:`tile_sizes`) and the mesh axis the vocabulary is sharded over, or None."""

    dtype: jnp.dtype
    tiles: Tiles
    axis_name: str | None = None


class Tile(NamedTuple):
    """One tile as an op sees it.

    Attributes:
      z: each model's logits ``h W + b`` ``[tn, tv]``, in the compute dtype.
      rows, columns, params: the tile's share of :class:`Operands`' (``[tn]``, ``[tv]``,
        scalars).
      fresh: None, or ``[1, tv]`` boolean: the columns no earlier (overlapped) chunk had; the
        op must leave the others out.
      keep: None, or ``[tn]`` boolean (backward): the rows this tile counts; the others
        (covered by an earlier, overlapped token chunk) must get exactly zero gradient.
      start: the first column of the tile; index: its vocabulary chunk's index.
    """

    z: tuple[jax.Array, ...]
    rows: Any
    columns: tuple
    params: tuple
    fresh: jax.Array | None
    keep: jax.Array | None
    start: jax.Array
    index: jax.Array

    def local(self, labels: jax.Array) -> jax.Array:
        """Class ids as columns of this tile: outside ``[0, tv)`` for a class outside it or
        one an earlier, overlapped chunk had (so that no label is hit twice)."""
        tv = self.z[0].shape[1]
        return jnp.where(labels >= self.index * tv, labels - self.start, -1)

    def masked(self, x: jax.Array) -> jax.Array:
        """``x`` ``[tn, tv]`` with the columns an earlier chunk had taken out (``-inf``)."""
        return x if self.fresh is None else jnp.where(self.fresh, x, -jnp.inf)

    def kept(self, mask: jax.Array | None) -> jax.Array | None:
        """``mask`` (``[tn]`` or None) and :attr:`keep`."""
        if self.keep is None:
            return mask
        return self.keep if mask is None else mask & self.keep


@dataclasses.dataclass(frozen=True)
class Reduce:
    """What an op computes of a tile in the forward walk.

    Attributes:
      stats: ``Tile -> stats``, a pytree of ``[tn]`` per-row statistics of the tile's classes.
      merge: ``(a, b) -> stats`` of two disjoint blocks of the rows' classes (exact).
      empty: ``(tn, dtype) -> stats`` of no class.
      combine: ``(stats, axis_name) -> stats`` over the shards of the vocabulary's mesh axis.
      sums: None, or ``(Tile, stats) -> sums``: a second pass, a pytree of ``[tn]`` per-row
        sums over the vocabulary given the rows' final statistics (summed over the shards of
        the vocabulary's mesh axis).
    """

    stats: Callable
    merge: Callable
    empty: Callable
    combine: Callable
    sums: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Grad:
    """What an op computes of a tile in the backward walk, and which gradients it wants.

    Attributes:
      tile: ``Tile -> (d z, d columns, d params)``: ``d z`` a tuple of ``[tn, tv]`` per model
        (None for a model without wanted gradients), ``d columns`` a tuple like ``columns``
        of ``[tv]`` and ``d params`` one like ``params`` of scalars (None where not wanted).
      models: per model, whether ``(d hidden, d weight, d bias)`` are wanted.
      columns, params: per column / parameter, whether its gradient is wanted.
    """

    tile: Callable
    models: tuple[tuple[bool, bool, bool], ...]
    columns: tuple[bool, ...] = ()
    params: tuple[bool, ...] = ()


class Grads(NamedTuple):
    """:func:`backward`'s result: per model a :class:`Model` of ``(d hidden, d weight,
    d bias)``, then the columns' and parameters' gradients (None where not wanted).
    ``d hidden`` and the others are in the compute dtype, ``d weight`` in ``weight``'s."""

    models: tuple[Model, ...]
    columns: tuple
    params: tuple


# --- chunks -----------------------------------------------------------------------------------
def chunk_start(i, size: int, total: int):
    """Start of chunk ``i``; the last chunk is moved back to end at ``total`` (it overlaps)."""
    return jnp.minimum(i * size, total - size)


def num_chunks(total: int, size: int) -> int:
    return -(-total // size)


def _fresh(j, c0, tv: int, v: int):
    """``[1, tv]`` columns an overlapping last chunk did not see before (None if tv divides v)."""
    if v % tv == 0:
        return None
    return (c0 + lax.broadcasted_iota(jnp.int32, (1, tv), 1)) >= j * tv


def _slice(a, start, size: int, axis: int):
    """``a``'s ``[start, start + size)`` along ``axis``; ``a`` itself when that is all of it."""
    if a is None or a.shape[axis] == size:
        return a
    return lax.dynamic_slice_in_dim(a, start, size, axis)


def _logits(h, m: Model, c0, tv: int, dtype):
    """``h @ weight[:, c0:c0+tv] + bias[c0:c0+tv]`` in ``dtype`` (float32 accumulation of
    bf16 inputs, the tile not rounded to bf16)."""
    w = _slice(m.weight, c0, tv, 1)
    if h.dtype == w.dtype:
        z = jnp.dot(h, w, preferred_element_type=dtype).astype(dtype)
    else:
        z = jnp.dot(h.astype(dtype), w.astype(dtype))
    if m.bias is not None:
        z = z + _slice(m.bias, c0, tv, 0).astype(dtype)[None, :]
    return z


def _write_columns(full, part, c0, fresh):
    """``full[..., c0:c0+tv] = part`` (in ``full``'s dtype), keeping the columns an earlier,
    overlapped chunk wrote; None stays None."""
    if full is None:
        return None
    part = part.astype(full.dtype)
    if fresh is not None:
        old = lax.dynamic_slice_in_dim(full, c0, part.shape[-1], full.ndim - 1)
        part = jnp.where(fresh if full.ndim == 2 else fresh[0], part, old)
    return lax.dynamic_update_slice_in_dim(full, part, c0, full.ndim - 1)


def _loop(count: int, body, init):
    return lax.fori_loop(0, count, body, init) if count > 1 else body(0, init)


def _add(acc, part):
    """Elementwise sum of two tuples; None (not wanted) in ``acc`` stays None."""
    return tuple(None if a is None else a + b for a, b in zip(acc, part, strict=True))


# --- the forward walk -------------------------------------------------------------------------
def forward(ops: Operands, reduce: Reduce, walk: Walk):
    """Per-row statistics of every row (``[N]`` leaves) of the logits of ``ops.models``,
    global over ``walk.axis_name``; with ``reduce.sums``, ``(statistics, sums)``."""

    def run(ops, tn, tv):
        return _forward(ops, reduce, walk, tn, tv)

    return per_platform(run, walk.tiles.forward, ops)


def _forward(ops: Operands, reduce: Reduce, walk: Walk, tn: int, tv: int):
    dtype, axis_name = walk.dtype, walk.axis_name
    n, v = ops.models[0].hidden.shape[0], ops.models[0].weight.shape[1]
    count = num_chunks(v, tv)
    vary = sharding.varying_like(*jax.tree.leaves(ops))

    def block(r0):
        hidden = tuple(_slice(m.hidden, r0, tn, 0) for m in ops.models)
        rows = jax.tree.map(lambda a: _slice(a, r0, tn, 0), ops.rows)

        def tile(j):
            c0 = chunk_start(j, tv, v)
            z = tuple(_logits(h, m, c0, tv, dtype) for h, m in zip(hidden, ops.models))
            cols = tuple(_slice(c, c0, tv, 0) for c in ops.columns)
            return Tile(z, rows, cols, ops.params, _fresh(j, c0, tv, v), None, c0, j)

        if count == 1:  # whole rows: both passes read the one tile
            only = tile(0)
            st = reduce.stats(only)
        else:
            init = jax.tree.map(vary, reduce.empty(tn, dtype))
            st = lax.fori_loop(0, count, lambda j, a: reduce.merge(a, reduce.stats(tile(j))), init)
        if axis_name is not None:
            st = reduce.combine(st, axis_name)
        if reduce.sums is None:
            return st
        if count == 1:
            sums = reduce.sums(only, st)
        else:
            shapes = jax.eval_shape(lambda: reduce.sums(tile(0), st))
            vary_st = sharding.varying_like(*jax.tree.leaves(st))
            init = jax.tree.map(lambda s: vary(vary_st(jnp.zeros(s.shape, s.dtype))), shapes)

            def step(j, acc):
                return jax.tree.map(jnp.add, acc, reduce.sums(tile(j), st))

            sums = lax.fori_loop(0, count, step, init)
        if axis_name is not None:
            sums = lax.psum(sums, axis_name)
        return st, sums

    return _by_token_blocks(block, n, tn)


def _by_token_blocks(fn, n: int, tn: int):
    """``fn(r0)`` for every block of ``tn`` tokens (the last moved back to end at ``n``),
    its per-row outputs ``[tn]`` assembled into ``[n]`` (each row once)."""
    count = num_chunks(n, tn)
    if count == 1:
        return fn(0)
    starts = jnp.minimum(jnp.arange(count) * tn, n - tn)
    _, stacked = lax.scan(lambda c, r0: (c, fn(r0)), None, starts)
    head = (count - 1) * tn  # rows the full blocks cover; the last block adds the rest
    tail = head - (n - tn)
    return jax.tree.map(lambda a: jnp.concatenate([a[:-1].reshape(-1), a[-1, tail:]]), stacked)


# --- the backward walk ------------------------------------------------------------------------
def backward(ops: Operands, grad: Grad, walk: Walk) -> Grads:
    """The gradients :class:`Grad` asks for, recomputing each tile of :func:`forward`."""

    def run(ops, tn, tv):
        return _backward(ops, grad, walk.dtype, tn, tv)

    return per_platform(run, walk.tiles.backward, ops)


def _backward(ops: Operands, grad: Grad, dtype, tn: int, tv: int) -> Grads:
    models = ops.models
    n, v = models[0].hidden.shape[0], models[0].weight.shape[1]
    vary = sharding.varying_like(*jax.tree.leaves(ops))
    # (d hidden, d weight, d bias) wanted, per model
    want = tuple((h, w, b and m.bias is not None) for m, (h, w, b) in zip(models, grad.models))
    count = num_chunks(n, tn)

    def zeros(shape, dt, on):
        return vary(jnp.zeros(shape, dt)) if on else None

    def take(i, tree):
        return jax.tree.map(lambda a: _slice(a, chunk_start(i, tn, n), tn, 0), tree)

    def vocab_chunk(j, carry):
        dh, dw, db, dcols, dps = carry
        c0 = chunk_start(j, tv, v)
        fresh = _fresh(j, c0, tv, v)
        w_j = tuple(
            _slice(m.weight, c0, tv, 1).astype(dtype) if on[0] else None
            for m, on in zip(models, want)
        )
        cols = tuple(_slice(c, c0, tv, 0) for c in ops.columns)

        def token_chunk(i, carry):
            dh, dw_j, db_j, dcols_j, dps = carry
            r0 = chunk_start(i, tn, n)
            hidden, rows = take(i, (tuple(m.hidden for m in models), ops.rows))
            z = tuple(_logits(h, m, c0, tv, dtype) for h, m in zip(hidden, models))
            keep = None  # rows an overlapping last token chunk shares count once
            if count > 1 and n % tn:
                keep = (r0 + jnp.arange(tn)) >= i * tn
            dz, dc, dp = grad.tile(Tile(z, rows, cols, ops.params, fresh, keep, c0, j))
            out = []
            for k, (on_h, on_w, on_b) in enumerate(want):
                a, b_, c = dh[k], dw_j[k], db_j[k]
                if dz[k] is not None:
                    if on_h:  # this chunk's rows of d hidden += d z @ w_j.T
                        part = _slice(a, r0, tn, 0) + jnp.dot(dz[k], w_j[k].T)
                        a = part if count == 1 else lax.dynamic_update_slice_in_dim(a, part, r0, 0)
                    if on_w:
                        b_ = b_ + jnp.dot(hidden[k].astype(dtype).T, dz[k])
                    if on_b:
                        c = c + jnp.sum(dz[k], axis=0)
                out.append((a, b_, c))
            dh, dw_j, db_j = (tuple(o[q] for o in out) for q in range(3))
            return dh, dw_j, db_j, _add(dcols_j, dc), _add(dps, dp)

        init = (
            dh,
            tuple(zeros((m.hidden.shape[1], tv), dtype, on[1]) for m, on in zip(models, want)),
            tuple(zeros((tv,), dtype, on[2]) for on in want),
            tuple(zeros((tv,), dtype, on) for on in grad.columns),
            dps,
        )
        dh, dw_j, db_j, dcols_j, dps = _loop(count, token_chunk, init)
        return (
            dh,
            tuple(_write_columns(f, p, c0, fresh) for f, p in zip(dw, dw_j)),
            tuple(_write_columns(f, p, c0, fresh) for f, p in zip(db, db_j)),
            tuple(_write_columns(f, p, c0, fresh) for f, p in zip(dcols, dcols_j)),
            dps,
        )

    init = (
        tuple(zeros((n, m.hidden.shape[1]), dtype, on[0]) for m, on in zip(models, want)),
        tuple(zeros(m.weight.shape, m.weight.dtype, on[1]) for m, on in zip(models, want)),
        tuple(zeros((v,), dtype, on[2]) for on in want),
        tuple(zeros((v,), dtype, on) for on in grad.columns),
        tuple(zeros((), dtype, on) for on in grad.params),
    )
    if any(any(on) for on in want) or any(grad.columns) or any(grad.params):
        dh, dw, db, dcols, dps = lax.fori_loop(0, num_chunks(v, tv), vocab_chunk, init)
    else:
        dh, dw, db, dcols, dps = init
    return Grads(tuple(Model(*g) for g in zip(dh, dw, db)), dcols, dps)
