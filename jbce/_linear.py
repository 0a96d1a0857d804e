"""Fused linear + softmax cross-entropy: the loss of ``hidden @ weight + bias`` without the logits.

For a language model the ``[N, V]`` logits dominate training memory. Here the logits are
only ever formed one ``[token_chunk, vocab_chunk]`` tile at a time:

- the forward pass walks the tiles with an online log-sum-exp and keeps three numbers per
  token: the log-sum-exp, the target logit and the sum of the logits (label smoothing);
- the backward pass recomputes each tile of logits from ``hidden`` and ``weight`` and
  accumulates ``d hidden``, ``d weight`` and ``d bias`` (in float32 for bf16/fp16 inputs).

The per-token statistics go through :func:`jbce._softmax.loss_from_stats`, the same assembly
the materialised loss uses, so every option means exactly what it means there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jbce import _checks, _parallel, _vma
from jbce._softmax import _softcap, loss_from_stats

# Elements in one tile of logits when the token chunk is picked automatically: 2**20 float32
# logits are 4 MiB, and a tile holds a few such temporaries (logits, probabilities, grads).
_TILE_ELEMENTS = 1 << 20
# Default vocabulary chunk. Wide enough that each tile is an efficient matmul.
_VOCAB_CHUNK = 2048


def _tile_sizes(n: int, v: int, chunk_size: int | None) -> tuple[int, int]:
    """(token chunk, vocabulary chunk) for ``n`` tokens and ``v`` classes.

    The vocabulary chunk is ``chunk_size`` (default 2048), at most ``v``; the token chunk
    is chosen so that a tile has at most 2**20 logits (at least 1 and at most ``n``).
    """
    tv = max(1, min(v, _VOCAB_CHUNK if chunk_size is None else chunk_size))
    tn = max(1, min(n, _TILE_ELEMENTS // tv))
    return tn, tv


def _chunk_start(i, size: int, total: int):
    """Start of chunk ``i``; the last chunk is moved back to end at ``total`` (it overlaps).

    Overlapping entries (index < i * size) were already handled by chunk ``i - 1`` and are
    masked wherever counting them twice would matter; no operand is ever padded or copied.
    """
    return jnp.minimum(i * size, total - size)


def _tile_logits(h, w, b, dtype, cap):
    """(pre-cap logits z, softcapped logits x) of one tile, in ``dtype``."""
    if h.dtype == w.dtype:
        z = jnp.dot(h, w, preferred_element_type=dtype).astype(dtype)
    else:
        z = jnp.dot(h.astype(dtype), w.astype(dtype))
    if b is not None:
        z = z + b.astype(dtype)[None, :]
    return z, _softcap(z, cap)


def _varying_like(*refs):
    """Makes a loop's initial carry vary over the mesh axes its inputs vary over.

    Inside ``shard_map`` a loop carry must keep its type; the zeros a loop starts from are
    replicated while the tiles of a sharded ``weight`` are not. A no-op elsewhere.
    """
    axes = frozenset().union(*(_vma._varying_axes(r) for r in refs if r is not None))

    def vary(x):
        extra = tuple(sorted(axes - _vma._varying_axes(x)))
        return lax.pcast(x, extra, to="varying") if extra else x

    return vary


def _same_class(cols, labels):
    """[tn, tv] mask of ``labels[:, None] == cols`` (compared in a common integer type)."""
    it = np.promote_types(cols.dtype, labels.dtype)
    return cols.astype(it) == labels.astype(it)[:, None]


def _slice_cols(a, start, size):
    return None if a is None else lax.dynamic_slice_in_dim(a, start, size, a.ndim - 1)


# --- the two tile walks ------------------------------------------------------------------------
def _tiled_forward(hidden, weight, bias, labels, cap, dtype, tn, tv):
    """Per token: (max, sum exp(x - max), target logit, sum of included logits).

    hidden [N, D], weight [D, V], bias [V] or None, labels [N]. A label outside [0, V)
    gives a target logit of 0. Classes whose logit is -inf are left out of all four.
    """
    n, v = hidden.shape[0], weight.shape[1]
    vary = _varying_like(hidden, weight, bias, labels)

    def token_chunk(i, out):
        r0 = _chunk_start(i, tn, n)
        h = lax.dynamic_slice_in_dim(hidden, r0, tn, 0)
        y = lax.dynamic_slice_in_dim(labels, r0, tn, 0)

        def vocab_chunk(j, carry):
            m, se, xt, s = carry
            c0 = _chunk_start(j, tv, v)
            _, x = _tile_logits(
                h, _slice_cols(weight, c0, tv), _slice_cols(bias, c0, tv), dtype, cap
            )
            cols = (c0 + jnp.arange(tv))[None, :]
            fresh = cols >= j * tv  # columns not already seen in the previous chunk
            inc = fresh & (x > -jnp.inf)
            xm = jnp.where(inc, x, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(xm, axis=1))
            m_safe = jnp.where(m_new > -jnp.inf, m_new, 0)
            se = se * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(xm - m_safe[:, None]), axis=1)
            hit = _same_class(cols, y) & fresh
            xt = xt + jnp.sum(jnp.where(hit, x, 0), axis=1)
            s = s + jnp.sum(jnp.where(inc, x, 0), axis=1)
            return m_new, se, xt, s

        zero = jnp.zeros((tn,), dtype)
        init = tuple(map(vary, (jnp.full((tn,), -jnp.inf, dtype), zero, zero, zero)))
        stats = lax.fori_loop(0, -(-v // tv), vocab_chunk, init)
        # Rows of an overlapping last chunk are recomputed identically, so writing is safe.
        return tuple(lax.dynamic_update_slice_in_dim(o, t, r0, 0) for o, t in zip(out, stats))

    zeros = jnp.zeros((n,), dtype)
    init = tuple(map(vary, (jnp.full((n,), -jnp.inf, dtype), zeros, zeros, zeros)))
    return lax.fori_loop(0, -(-n // tn), token_chunk, init)


def _tiled_backward(hidden, weight, bias, labels, lse, g, cap, dtype, tn, tv):
    """(d hidden, d weight, d bias) in ``dtype`` for cotangents ``g`` of (lse, x_y, sum x).

    Per tile: d x = g_lse softmax(x) + g_xt [c = y] + g_s (times the soft-cap derivative),
    then d hidden += d x W^T, d W += h^T d x, d b += sum_rows d x.
    """
    g_lse, g_xt, g_s = g
    n, d = hidden.shape
    v = weight.shape[1]
    lse = jnp.where(lse > -jnp.inf, lse, 0)  # a row with no class has p = 0 everywhere
    vary = _varying_like(hidden, weight, bias, labels, lse, *g)

    def vocab_chunk(j, carry):
        dh, dw, db = carry
        c0 = _chunk_start(j, tv, v)
        w = _slice_cols(weight, c0, tv)
        b = _slice_cols(bias, c0, tv)
        cols = (c0 + jnp.arange(tv))[None, :]
        fresh = cols >= j * tv
        w_dt = w.astype(dtype)

        def token_chunk(i, carry):
            dh, dw_j, db_j = carry
            r0 = _chunk_start(i, tn, n)
            rows = r0 + jnp.arange(tn)
            new_row = (rows >= i * tn)[:, None]  # rows of an overlapping chunk count once
            h = lax.dynamic_slice_in_dim(hidden, r0, tn, 0)
            y = lax.dynamic_slice_in_dim(labels, r0, tn, 0)
            gl, gx, gs, lse_i = (
                lax.dynamic_slice_in_dim(a, r0, tn, 0)[:, None] for a in (g_lse, g_xt, g_s, lse)
            )
            z, x = _tile_logits(h, w, b, dtype, cap)
            inc = fresh & (x > -jnp.inf)
            p = jnp.exp(jnp.where(inc, x - lse_i, -jnp.inf))
            hit = _same_class(cols, y) & fresh
            dx = gl * p + jnp.where(hit, gx, 0) + jnp.where(inc, gs, 0)
            if cap is not None:
                t = jnp.tanh(z / cap)
                dx = dx * (1 - t * t)
            dx = jnp.where(new_row, dx, 0)
            dh_rows = lax.dynamic_slice_in_dim(dh, r0, tn, 0) + jnp.dot(dx, w_dt.T)
            dh = lax.dynamic_update_slice_in_dim(dh, dh_rows, r0, 0)
            dw_j = dw_j + jnp.dot(h.astype(dtype).T, dx)
            db_j = db_j + jnp.sum(dx, axis=0)
            return dh, dw_j, db_j

        init = (dh, vary(jnp.zeros((d, tv), dtype)), vary(jnp.zeros((tv,), dtype)))
        dh, dw_j, db_j = lax.fori_loop(0, -(-n // tn), token_chunk, init)
        # The columns an overlapping last chunk shares with the previous one are kept as they
        # were (the chunk computed zeros there).
        dw_j = jnp.where(fresh, dw_j, _slice_cols(dw, c0, tv))
        dw = lax.dynamic_update_slice_in_dim(dw, dw_j, c0, 1)
        db_j = jnp.where(fresh[0], db_j, _slice_cols(db, c0, tv))
        db = lax.dynamic_update_slice_in_dim(db, db_j, c0, 0)
        return dh, dw, db

    init = tuple(map(vary, (jnp.zeros((n, d), dtype), jnp.zeros((d, v), dtype),
                            jnp.zeros((v,), dtype))))  # fmt: skip
    return lax.fori_loop(0, -(-v // tv), vocab_chunk, init)


def _lse(m, se):
    return jnp.where(se > 0, m + jnp.log(jnp.where(se > 0, se, 1)), -jnp.inf)


def _cotangents(hidden, weight, bias, labels, dh, dw, db):
    """Casts to the inputs' dtypes; inside ``shard_map`` an input replicated over a mesh axis
    its gradient varies on (weight under data parallelism, hidden under vocabulary
    parallelism) gets the sum over that axis, as the transpose of the implicit broadcast."""
    like = _vma.psum_to_like
    dbias = None if bias is None else like(db.astype(bias.dtype), bias)
    dlabels = jnp.zeros(labels.shape, jax.dtypes.float0)
    return (
        like(dh.astype(hidden.dtype), hidden),
        like(dw.astype(weight.dtype), weight),
        dbias,
        dlabels,
    )


# --- per-token statistics with a custom VJP ----------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _linear_stats(hidden, weight, bias, labels, cap, dtype, tn, tv):
    """(lse, target logit, sum of included logits) per token of ``hidden @ weight + bias``."""
    m, se, xt, s = _tiled_forward(hidden, weight, bias, labels, cap, dtype, tn, tv)
    return _lse(m, se), xt, s


def _linear_stats_fwd(hidden, weight, bias, labels, cap, dtype, tn, tv):
    out = _linear_stats(hidden, weight, bias, labels, cap, dtype, tn, tv)
    # Residuals: the inputs and one lse per token; no logits are kept, each tile is
    # recomputed in the backward pass.
    return out, (hidden, weight, bias, labels, out[0])


def _linear_stats_bwd(cap, dtype, tn, tv, res, g):
    hidden, weight, bias, labels, lse = res
    grads = _tiled_backward(hidden, weight, bias, labels, lse, g, cap, dtype, tn, tv)
    return _cotangents(hidden, weight, bias, labels, *grads)


_linear_stats.defvjp(_linear_stats_fwd, _linear_stats_bwd)


# --- the same with weight's vocabulary axis sharded over a mesh axis ---------------------------
def _shard_labels(labels, v_local, axis_name):
    """Global labels as this shard's column indices (outside [0, V_local) if not owned)."""
    return labels - lax.axis_index(axis_name).astype(labels.dtype) * v_local


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _sharded_linear_stats(hidden, weight, bias, labels, cap, dtype, tn, tv, axis_name):
    """Global (lse, x_y, sum x) from this shard's ``weight`` [D, V_local] (and bias)."""
    y = _shard_labels(labels, weight.shape[1], axis_name)
    m, se, xt, s = _tiled_forward(hidden, weight, bias, y, cap, dtype, tn, tv)
    return _parallel.combine_stats(m, se, xt, s, axis_name=axis_name)


def _sharded_linear_stats_fwd(hidden, weight, bias, labels, cap, dtype, tn, tv, axis_name):
    out = _sharded_linear_stats(hidden, weight, bias, labels, cap, dtype, tn, tv, axis_name)
    # Residuals: the inputs and the global lse per token (no communication in the backward).
    return out, (hidden, weight, bias, labels, out[0])


def _sharded_linear_stats_bwd(cap, dtype, tn, tv, axis_name, res, g):
    hidden, weight, bias, labels, lse = res
    y = _shard_labels(labels, weight.shape[1], axis_name)
    dh, dw, db = _tiled_backward(hidden, weight, bias, y, lse, g, cap, dtype, tn, tv)
    # This shard's d hidden is its classes' share; a hidden replicated over the axis (as
    # under shard_map) collects the sum of the shares in _cotangents.
    return _cotangents(hidden, weight, bias, labels, dh, dw, db)


_sharded_linear_stats.defvjp(_sharded_linear_stats_fwd, _sharded_linear_stats_bwd)


def linear_softmax_cross_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    weights: ArrayLike | None = None,
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy of the logits ``hidden @ weight + bias``, never materialised.

    Equals :func:`jbce.softmax_cross_entropy_with_integer_labels` applied to
    ``hidden @ weight + bias`` with the same options: with
    :math:`x_{nc} = h_n \cdot W_{:c} + b_c` (soft-capped to :math:`c \tanh(x/c)` with
    ``logit_softcap``), :math:`\ell_n = \log\sum_c e^{x_{nc}}` and label smoothing
    :math:`e` over :math:`V` classes,

    .. math::
        L_n = (1 - e) (\ell_n - x_{n y_n}) + \frac{e}{V} \sum_c (\ell_n - x_{nc})
              + z\, \ell_n^2

    but the ``[N, V]`` logits only ever exist one ``[token_chunk, vocab_chunk]`` tile at a
    time: the forward pass keeps an online log-sum-exp, and the backward pass recomputes
    each tile and accumulates the gradients (in float32 for bf16/fp16 inputs). The backward
    pass saves the inputs and one log-sum-exp per token. Use it when the logits would not
    fit, or would dominate memory (large vocabularies); it does one more
    ``hidden @ weight``-sized matmul than the materialised loss.

    A bias of ``-inf`` removes that class (vocabulary padding), as a ``-inf`` logit does in
    the materialised loss.

    Args:
      hidden: float array ``[..., D]``.
      weight: float array ``[D, V]`` (the layout of a Flax ``Dense`` kernel).
      labels: integer array ``[...]`` (``hidden``'s shape without ``D``).
      bias: optional ``[V]``.
      weights: optional per-token multiplier, broadcastable to ``labels``.
      ignore_index: label value whose tokens are excluded (``None`` for none).
      label_smoothing: e in [0, 1].
      z_loss: coefficient of the :math:`\ell^2` auxiliary loss (PaLM).
      logit_softcap: optional c > 0 for Gemma-style soft-capping.
      reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-token losses, ``labels``' shape).
      chunk_size: vocabulary columns per tile (default ``min(V, 2048)``). The token chunk
        is then ``min(N, 2**20 // chunk_size)``, so a tile holds at most 2**20 logits.
      axis_name: mesh axis over which ``weight``'s (and ``bias``'s) vocabulary axis is
        sharded: each shard passes its ``[D, V / n]`` columns (shard ``i`` owning classes
        ``[i V / n, (i+1) V / n)``), the labels are global class ids and the loss comes out
        replicated. Inside ``shard_map`` the gradient of a replicated ``hidden`` is summed
        over the shards; under ``pmap``/``vmap`` each shard returns its classes' share.

    Returns:
      A float32 scalar (float64 for float64 inputs), or the per-token losses for ``"none"``.

    Example:
      >>> import jax, jax.numpy as jnp, jbce
      >>> hidden = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> weight = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> jbce.linear_softmax_cross_entropy(hidden, weight, jnp.array([0, -100]))
      Array(0.2395..., dtype=float32)
      >>> grads = jax.grad(jbce.linear_softmax_cross_entropy, (0, 1))(
      ...     hidden, weight, jnp.array([0, 1]))
    """
    _checks.check_float("hidden", hidden)
    _checks.check_float("weight", weight)
    _checks.check_integer_labels("labels", labels)
    _checks.check_reduction(reduction)
    hidden = jnp.asarray(hidden)
    weight = jnp.asarray(weight)
    labels = jnp.asarray(labels)
    if hidden.ndim < 1:
        raise ValueError(f"hidden must have shape [..., D]; got {hidden.shape}")
    d = hidden.shape[-1]
    if weight.ndim != 2 or weight.shape[0] != d:
        raise ValueError(
            f"weight must have shape ({d}, V) to match hidden {hidden.shape}; got {weight.shape}"
            " (a Flax Dense kernel; transpose a PyTorch Linear weight)"
        )
    v = weight.shape[1]
    if v == 0:
        raise ValueError(f"weight must have at least one class column; got {weight.shape}")
    bshape = hidden.shape[:-1]
    _checks.check_shape("labels", labels, bshape, f"to match hidden {hidden.shape} without D")
    if bias is not None:
        _checks.check_float("bias", bias)
        bias = jnp.asarray(bias)
        _checks.check_shape("bias", bias, (v,), f"to match weight {weight.shape}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be > 0 or None; got {logit_softcap!r}")
    dt = _checks.compute_dtype(hidden, weight, bias, weights)
    if weights is not None:
        _checks.check_broadcastable("weights", weights, "labels", bshape)
        weights = _checks.as_float(weights, dt)
    if axis_name is None:
        _checks.debug_check_labels("labels", labels, v, ignore_index)
        num_classes = v
    else:
        num_classes = v * lax.axis_size(axis_name)
    lse, xt, s = linear_stats(
        hidden, weight, bias, labels, dtype=dt, cap=logit_softcap, chunk_size=chunk_size,
        axis_name=axis_name,
    )  # fmt: skip
    num_inc = num_included(bias, num_classes, logit_softcap, axis_name)
    return loss_from_stats(
        lse, xt, s, labels,
        num_classes=num_classes, num_included=num_inc,
        included_weight_sum=jnp.asarray(num_inc, dt), target_weight=None,
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        weights=weights, where=None, reduction=reduction,
    )  # fmt: skip


def linear_stats(hidden, weight, bias, labels, *, dtype, cap, chunk_size, axis_name=None):
    """Per-token (lse, target logit, logit sum) of ``hidden @ weight + bias``, labels' shape.

    With ``axis_name``, ``weight`` [D, V_local] (and ``bias``) are this shard's columns of
    the vocabulary, the labels global ids, and the statistics are global (replicated).
    Without, a label outside ``[0, V)`` has a target logit of 0.
    """
    bshape = labels.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    n, v = h2.shape[0], weight.shape[1]
    if n == 0:
        empty = jnp.zeros(bshape, dtype)
        return empty, empty, empty
    tn, tv = _tile_sizes(n, v, chunk_size)
    if axis_name is None:
        stats = _linear_stats(h2, weight, bias, y, cap, jnp.dtype(dtype), tn, tv)
    else:
        stats = _sharded_linear_stats(h2, weight, bias, y, cap, jnp.dtype(dtype), tn, tv,
                                      axis_name)  # fmt: skip
    return tuple(t.reshape(bshape) for t in stats)


def num_included(bias, v: int, cap: float | None, axis_name=None):
    """Classes taking part in the softmax: those whose (soft-capped) logit can be finite.

    ``v`` is the global vocabulary size; with ``axis_name`` the bias is this shard's slice.
    """
    if bias is None or cap is not None:
        return v
    count = jnp.sum(bias > -jnp.inf)
    return count if axis_name is None else lax.psum(count, axis_name)
