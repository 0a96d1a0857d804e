r"""Fused linear + Jensen-Shannon distillation in plain XLA: tiles of both models' logits only.

The implementation behind :func:`jbce.linear_distillation_loss` on every platform. With the
student's tile :math:`z = (h W + b) / T` (log-probabilities :math:`\log Q`) and the teacher's
:math:`y = (h_t W_t + b_t) / T` (:math:`\log P`), every quantity of the generalised JSD is
built from each token's two softmax normalisers and a few per-token sums:

- Forward, token-major: a scan over blocks of tokens; for each block, pass 1 walks its
  vocabulary chunks keeping an online log-sum-exp of both models (:func:`jbce._softmax.stats.merge`;
  under ``axis_name`` combined over the shards with :func:`jbce._softmax.stats.combine_over_axis`),
  pass 2 walks them again summing the divergence terms given both normalisers (one
  ``psum`` under ``axis_name``). By default a block holds whole vocabulary rows (one tile of
  at most 2**23 logits per model), so both passes read the same tile: each model's logits
  are computed once in the forward pass.
- Backward, vocabulary-major (as :mod:`jbce._linear.chunked_xla`): the same walk over
  ``[token_chunk, vocab_chunk]`` tiles recomputes both models' tiles, turns them into
  ``d z`` and ``d y`` from the saved per-token statistics, accumulates ``d hidden`` and
  ``d bias`` and writes each ``d weight`` chunk once. Only the gradients of the inputs that
  are differentiated are computed (the custom VJP is declared with ``symbolic_zeros``): a
  frozen teacher costs no teacher matmul in the backward pass, only its tile's recomputation.

Residuals: the inputs and, per token, the shift and shifted log-sum-exp of each model and
one (``beta`` 0 or 1), two (inside (0, 1)) or four (a traced ``beta``) divergence sums.

Chunks never pad or copy an operand: the last chunk of an axis is moved back to end at the
axis' size and overlaps its predecessor; overlapping columns are taken out of both softmaxes
(``-inf``) for that chunk, overlapping tokens are recomputed identically and counted once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jbce._core import sharding
from jbce._core.autodiff import first_order_only

# The numerically careful pieces of the materialised JSD, so that both compute the same
# numbers: d = log Q - log P, 0 * inf = 0, and g * d with an exact 0 for an unused row.
from jbce._core.math import log_ratio, mixture_logs, xmul

# The chunk arithmetic of the fused cross-entropy, shared as is.
from jbce._linear.chunked_xla import chunk_start, num_chunks
from jbce._softmax import stats as _stats

# Logits per model in one tile when a chunk is picked automatically: on CPU 2**23 (32 MiB in
# float32 per model), elsewhere 2**25, so that an accelerator runs a few large tiles (each
# launches a handful of kernels, and each token block of the forward pass reads the weights
# once): at N=4096, V=32768 the deviceless H100 compile launches about a quarter of the
# kernels (`python -m bench.accelerators`, the distill case).
TILE_ELEMENTS = 1 << 23
ACCELERATOR_TILE_ELEMENTS = 1 << 25
# The backward pass's default vocabulary chunk: the fused cross-entropy's on CPU, larger
# (fewer loop steps) elsewhere.
BACKWARD_VOCAB_CHUNK = 2048
ACCELERATOR_BACKWARD_VOCAB_CHUNK = 8192

MODES = ("forward", "reverse", "mix", "traced")
# The per-token sums each mode needs: KL(P||Q), KL(Q||P), KL(P||M), KL(Q||M).
SUMS = {
    "forward": ("kl_pq",),
    "reverse": ("kl_qp",),
    "mix": ("kl_pm", "kl_qm"),
    "traced": ("kl_pq", "kl_qp", "kl_pm", "kl_qm"),
}


def tile_sizes(n: int, v: int, chunk_size, *, accelerator: bool = False):
    """((token chunk, vocabulary chunk) of the forward pass, the same of the backward pass).

    ``chunk_size`` None: the forward pass takes whole vocabulary rows (``min(n, E // v)``
    tokens a block, ``E`` = 2**23 logits on CPU, 2**25 with ``accelerator``) and the
    backward pass ``[min(n, E // c), c]`` tiles (``c`` = 2048 on CPU, 8192 with
    ``accelerator``); an int: the vocabulary chunk of both passes; a pair
    ``(token_chunk, vocab_chunk)``: both passes' tiles. A missing token chunk keeps a tile
    at ``E`` logits. Clipped into ``[1, n]``, ``[1, v]``.
    """
    elements = ACCELERATOR_TILE_ELEMENTS if accelerator else TILE_ELEMENTS

    def clip(tn, tv):
        tv = max(1, min(v, tv))
        tn = elements // tv if tn is None else tn
        return max(1, min(n, tn)), tv

    if chunk_size is None:
        chunk = ACCELERATOR_BACKWARD_VOCAB_CHUNK if accelerator else BACKWARD_VOCAB_CHUNK
        return clip(None, v), clip(None, chunk)
    if isinstance(chunk_size, tuple):
        both = clip(*chunk_size)
    else:
        both = clip(None, chunk_size)
    return both, both


def per_platform(fn, cpu, other, *args):
    """``fn(*args, *tiles)`` with the CPU's or the accelerators' ``tiles``, chosen when the
    program is lowered (no conditional); directly when they are the same."""
    if cpu == other:
        return fn(*args, *cpu)
    return lax.platform_dependent(
        *args, cpu=lambda *a: fn(*a, *cpu), default=lambda *a: fn(*a, *other)
    )


def _logits(h, w, b, c0, tv, temperature, dtype):
    """``(h @ w[:, c0:c0+tv] + b[c0:c0+tv]) / T`` in ``dtype`` (float32 accumulation)."""
    if tv != w.shape[1]:
        w = lax.dynamic_slice_in_dim(w, c0, tv, 1)
    if h.dtype == w.dtype:
        x = jnp.dot(h, w, preferred_element_type=dtype).astype(dtype)
    else:
        x = jnp.dot(h.astype(dtype), w.astype(dtype))
    if b is not None:
        if tv != b.shape[0]:
            b = lax.dynamic_slice_in_dim(b, c0, tv, 0)
        x = x + b.astype(dtype)[None, :]
    return x / temperature


def _fresh(j, c0, tv, v):
    """``[1, tv]`` columns an overlapping last chunk did not see before (None if tv divides v)."""
    if v % tv == 0:
        return None
    return (c0 + lax.broadcasted_iota(jnp.int32, (1, tv), 1)) >= j * tv


def _masked(x, fresh):
    return x if fresh is None else jnp.where(fresh, x, -jnp.inf)


def _log_probs(x, st):
    """``log softmax`` of a tile from its rows' full statistics (a row without classes: -inf)."""
    lse = jnp.where(st.lse == -jnp.inf, 0, st.lse)
    return (x - st.shift[:, None]) - lse[:, None]


def _safe_beta(mode, beta):
    """beta, with a traced beta at 0 or 1 replaced by 0.5 in the mixture's (unused) branch."""
    if mode != "traced":
        return beta
    return jnp.where((beta == 0) | (beta == 1), jnp.full((), 0.5, beta.dtype), beta)


def _tile_sums(mode, lq, lp, beta):
    """This tile's share of each of :data:`SUMS` ``[mode]``, per token."""
    q, p = jnp.exp(lq), jnp.exp(lp)
    d = log_ratio(lq, lp)
    out = {}
    if mode in ("forward", "traced"):
        out["kl_pq"] = xmul(p, -d)
    if mode in ("reverse", "traced"):
        out["kl_qp"] = xmul(q, d)
    if mode in ("mix", "traced"):
        e, f = mixture_logs(d, _safe_beta(mode, beta))
        out["kl_pm"] = xmul(p, e)
        out["kl_qm"] = xmul(q, f)
    return _row_sums(tuple(out[k] for k in SUMS[mode]))


def _row_sums(terms):
    """Row sums of each ``[tn, tv]`` term. Off CPU one variadic reduction, so that the terms'
    common producer (the transcendentals of both softmaxes) fuses into it rather than being
    written out for separate reductions (deviceless H100 compile: one 3-output elementwise
    kernel and its reader replaced by one kernel); XLA:CPU runs separate sums faster."""

    def separate(*t):
        return tuple(jnp.sum(a, axis=-1) for a in t)

    def variadic(*t):
        init = tuple(jnp.zeros((), a.dtype) for a in t)
        add = lambda x, y: tuple(a + b for a, b in zip(x, y))
        return tuple(lax.reduce(t, init, add, (t[0].ndim - 1,)))

    if len(terms) == 1:
        return separate(*terms)
    return lax.platform_dependent(*terms, cpu=separate, default=variadic)


def _select(mode, beta, forward, reverse, mix):
    """The per-mode value (thunks), a traced beta choosing by value with ``where``."""
    if mode == "forward":
        return forward()
    if mode == "reverse":
        return reverse()
    if mode == "mix":
        return mix()
    lo, hi = beta == 0, beta == 1
    return jnp.where(lo, forward(), jnp.where(hi, reverse(), mix()))


def divergence(mode, sums, beta):
    """Per-token generalised JSD from its sums (:data:`SUMS`)."""
    s = dict(zip(SUMS[mode], sums))
    b = _safe_beta(mode, beta)
    return _select(
        mode,
        beta,
        lambda: s["kl_pq"],
        lambda: s["kl_qp"],
        lambda: b * s["kl_pm"] + (1 - b) * s["kl_qm"],
    )


def _beta_grad(mode, sums, beta):
    """d JSD / d beta per token: KL(P||M) - KL(Q||M) inside (0, 1), 0 at the ends."""
    if mode in ("forward", "reverse"):
        return jnp.zeros_like(sums[0])
    s = dict(zip(SUMS[mode], sums))
    gb = s["kl_pm"] - s["kl_qm"]
    if mode == "traced":
        gb = jnp.where((beta == 0) | (beta == 1), jnp.zeros((), gb.dtype), gb)
    return gb


def _class_grads(mode, lq, lp, beta, sums):
    """(d JSD / d z, d JSD / d y) of a tile, from the tokens' full sums (``[tn]`` each)."""
    s = {k: v[:, None] for k, v in zip(SUMS[mode], sums)}
    q, p = jnp.exp(lq), jnp.exp(lp)
    d = log_ratio(lq, lp)

    def forward():  # KL(P || Q)
        return q - p, xmul(p, -d - s["kl_pq"])

    def reverse():  # KL(Q || P)
        return xmul(q, d - s["kl_qp"]), p - q

    def mix():
        b = _safe_beta(mode, beta)
        e, f = mixture_logs(d, b)
        return (1 - b) * xmul(q, f - s["kl_qm"]), b * xmul(p, e - s["kl_pm"])

    if mode != "traced":
        return {"forward": forward, "reverse": reverse, "mix": mix}[mode]()
    lo, hi = beta == 0, beta == 1
    parts = forward(), reverse(), mix()
    return tuple(
        jnp.where(lo, parts[0][k], jnp.where(hi, parts[1][k], parts[2][k])) for k in (0, 1)
    )


def _empty_stats(n, dtype, vary):
    return _stats.Stats(vary(jnp.zeros((n,), dtype)), vary(jnp.full((n,), -jnp.inf, dtype)), None)


def _by_token_blocks(fn, n, tn):
    """``fn(r0)`` for every block of ``tn`` tokens (the last moved back to end at ``n``),
    its per-token outputs ``[tn]`` assembled into ``[n]``."""
    count = num_chunks(n, tn)
    if count == 1:
        return fn(0)
    starts = jnp.minimum(jnp.arange(count) * tn, n - tn)
    _, stacked = lax.scan(lambda c, r0: (c, fn(r0)), None, starts)
    head = (count - 1) * tn  # rows the full blocks cover; the last block adds the rest
    tail = head - (n - tn)
    return jax.tree.map(lambda a: jnp.concatenate([a[:-1].reshape(-1), a[-1, tail:]]), stacked)


def forward_rows(args, mode, dtype, tn, tv, axis_name):
    """Per token: (student shift, lse, teacher shift, lse, *sums), each ``[N]``."""
    h, w, b, ht, wt, bt, beta, temperature = args
    n, v = h.shape[0], w.shape[1]
    count = num_chunks(v, tv)
    vary = sharding.varying_like(*args)

    def block(r0):
        hs = lax.dynamic_slice_in_dim(h, r0, tn, 0) if tn != n else h
        hts = lax.dynamic_slice_in_dim(ht, r0, tn, 0) if tn != n else ht

        def tiles(j):
            c0 = chunk_start(j, tv, v)
            fresh = _fresh(j, c0, tv, v)
            z = _masked(_logits(hs, w, b, c0, tv, temperature, dtype), fresh)
            y = _masked(_logits(hts, wt, bt, c0, tv, temperature, dtype), fresh)
            return z, y

        if count == 1:  # whole rows: both passes read the one tile
            z, y = tiles(0)
            sz, sy = _stats.block_stats(z, None), _stats.block_stats(y, None)
        else:

            def pass1(j, acc):
                z, y = tiles(j)
                tz, ty = _stats.block_stats(z, None), _stats.block_stats(y, None)
                return _stats.merge(acc[0], tz), _stats.merge(acc[1], ty)

            init = (_empty_stats(tn, dtype, vary), _empty_stats(tn, dtype, vary))
            sz, sy = lax.fori_loop(0, count, pass1, init)
        if axis_name is not None:
            sz = _stats.combine_over_axis(sz, axis_name)
            sy = _stats.combine_over_axis(sy, axis_name)

        def sums_of(z, y):
            return _tile_sums(mode, _log_probs(z, sz), _log_probs(y, sy), beta)

        if count == 1:
            sums = sums_of(z, y)
        else:

            def pass2(j, acc):
                return tuple(a + s for a, s in zip(acc, sums_of(*tiles(j))))

            zero = vary(sharding.varying_like(sz.lse, sy.lse)(jnp.zeros((tn,), dtype)))
            sums = lax.fori_loop(0, count, pass2, (zero,) * len(SUMS[mode]))
        if axis_name is not None:
            sums = lax.psum(sums, axis_name)
        return (sz.shift, sz.lse, sy.shift, sy.lse, *sums)

    return _by_token_blocks(block, n, tn)


def _loss(mode, rows, beta):
    mz, lz, my, ly, *sums = rows
    value = divergence(mode, sums, beta)
    return jnp.where(jnp.isnan(lz) | jnp.isnan(ly), jnp.nan, value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def distillation_rows(h, w, b, ht, wt, bt, beta, temperature, mode, dtype, tiles, axis_name):
    r"""Per-token generalised JSD between ``softmax((h w + b) / T)`` (student, Q) and
    ``softmax((h_t w_t + b_t) / T)`` (teacher, P); ``h`` ``[N, D]``, ``w`` ``[D, V]``,
    ``ht`` ``[N, D_t]``, ``wt`` ``[D_t, V]``, biases ``[V]`` or None, ``beta`` and
    ``temperature`` scalars in ``dtype``. ``mode``: one of :data:`MODES`; ``tiles``: the
    (forward, backward) tile shapes of :func:`tile_sizes` on CPU and elsewhere. With
    ``axis_name`` the weights and biases hold this shard's vocabulary columns and the
    result is global (replicated)."""
    args = (h, w, b, ht, wt, bt, beta, temperature)
    return _loss(mode, _forward(args, mode, dtype, tiles, axis_name), beta)


def _forward(args, mode, dtype, tiles, axis_name):
    (cpu, _), (other, _) = tiles
    return per_platform(
        lambda *a: forward_rows(a[:8], mode, dtype, a[8], a[9], axis_name), cpu, other, *args
    )


def _distillation_rows_fwd(h, w, b, ht, wt, bt, beta, temperature, mode, dtype, tiles,
                           axis_name):  # fmt: skip
    primals = (h, w, b, ht, wt, bt, beta, temperature)
    args = tuple(None if a is None else a.value for a in primals)
    # Which inputs are differentiated, as pytree structure (static): () yes, None no.
    wanted = tuple(() if a is not None and a.perturbed else None for a in primals)
    rows = _forward(args, mode, dtype, tiles, axis_name)
    # Residuals: the inputs and a few floats per token (two per model and the sums).
    return _loss(mode, rows, args[6]), (args, rows, wanted)


def _distillation_rows_bwd(mode, dtype, tiles, axis_name, res, g):
    args, rows, wanted = res
    h, w, b, ht, wt, bt, beta, temperature = args
    want = [x is not None for x in wanted]
    (_, cpu), (_, other) = tiles
    grads = per_platform(
        lambda args, rows, g, tn, tv: backward(args, rows, g, want, mode, dtype, tn, tv),
        cpu, other, args, rows, g,
    )  # fmt: skip
    # Inside shard_map an input replicated over an axis its cotangent varies on gets the sum.
    # Differentiating this backward pass again gives wrong numbers (not derived for it):
    # second derivatives raise.
    return tuple(
        None if ct is None else _SECOND_ORDER(sharding.psum_to_like(ct.astype(a.dtype), a))
        for ct, a in zip(grads, args)
    )


_SECOND_ORDER = first_order_only(
    "linear_distillation_loss",
    "jbce.jensen_shannon_divergence on the materialised logits (jax.hessian works there)",
)


distillation_rows.defvjp(_distillation_rows_fwd, _distillation_rows_bwd, symbolic_zeros=True)


def backward(args, rows, g, want, mode, dtype, tn, tv):
    """Cotangents of (h, w, b, ht, wt, bt, beta, temperature); None where not ``want``-ed."""
    h, w, b, ht, wt, bt, beta, temperature = args
    mz, lz, my, ly, *sums = rows
    n, v = h.shape[0], w.shape[1]
    d, dt_ = h.shape[1], ht.shape[1]
    want_h, want_w, want_b, want_ht, want_wt, want_bt, want_beta, want_t = want
    want_b, want_bt = want_b and b is not None, want_bt and bt is not None
    student, teacher = want_h or want_w or want_b, want_ht or want_wt or want_bt
    vary = sharding.varying_like(*args, g, lz, ly)
    count = num_chunks(n, tn)
    repeated = count > 1 and n % tn != 0

    def zeros(shape, dt, on):
        return vary(jnp.zeros(shape, dt)) if on else None

    def rows_of(i, *arrays):
        if count == 1:
            return arrays
        r0 = chunk_start(i, tn, n)
        return tuple(lax.dynamic_slice_in_dim(a, r0, tn, 0) for a in arrays)

    def put(i, full, part):
        if count == 1:
            return part
        return lax.dynamic_update_slice_in_dim(full, part, chunk_start(i, tn, n), 0)

    def vocab_chunk(j, carry):
        dh, dw, db, dht, dwt, dbt, dtemp = carry
        c0 = chunk_start(j, tv, v)
        fresh = _fresh(j, c0, tv, v)
        w_j = lax.dynamic_slice_in_dim(w, c0, tv, 1).astype(dtype) if want_h else None
        wt_j = lax.dynamic_slice_in_dim(wt, c0, tv, 1).astype(dtype) if want_ht else None

        def token_chunk(i, carry):
            dh, dw_j, db_j, dht, dwt_j, dbt_j, dtemp = carry
            hs, hts, gs, mzs, lzs, mys, lys, *ss = rows_of(i, h, ht, g, mz, lz, my, ly, *sums)
            z = _masked(_logits(hs, w, b, c0, tv, temperature, dtype), fresh)
            y = _masked(_logits(hts, wt, bt, c0, tv, temperature, dtype), fresh)
            lq = _log_probs(z, _stats.Stats(mzs, lzs, None))
            lp = _log_probs(y, _stats.Stats(mys, lys, None))
            gz, gy = _class_grads(mode, lq, lp, beta, ss)
            gcol = gs[:, None]
            if repeated:  # rows an overlapping last token chunk shares count once
                again = (chunk_start(i, tn, n) + jnp.arange(tn)) < i * tn
                gcol = jnp.where(again[:, None], jnp.zeros((), gcol.dtype), gcol)
            dz, dy = xmul(gcol, gz), xmul(gcol, gy)
            if want_t:  # z = x / T: d/dT = -sum(d/dz z) / T, z read as log Q (see _softmax_terms)
                dtemp = dtemp + jnp.sum(xmul(dz, lq)) + jnp.sum(xmul(dy, lp))
            dz, dy = dz / temperature, dy / temperature
            if want_h:
                dh = put(i, dh, rows_of(i, dh)[0] + jnp.dot(dz, w_j.T))
            if want_w:
                dw_j = dw_j + jnp.dot(hs.astype(dtype).T, dz)
            if want_b:
                db_j = db_j + jnp.sum(dz, axis=0)
            if want_ht:
                dht = put(i, dht, rows_of(i, dht)[0] + jnp.dot(dy, wt_j.T))
            if want_wt:
                dwt_j = dwt_j + jnp.dot(hts.astype(dtype).T, dy)
            if want_bt:
                dbt_j = dbt_j + jnp.sum(dy, axis=0)
            return dh, dw_j, db_j, dht, dwt_j, dbt_j, dtemp

        init = (
            dh, zeros((d, tv), dtype, want_w), zeros((tv,), dtype, want_b),
            dht, zeros((dt_, tv), dtype, want_wt), zeros((tv,), dtype, want_bt), dtemp,
        )  # fmt: skip
        out = lax.fori_loop(0, count, token_chunk, init) if count > 1 else token_chunk(0, init)
        dh, dw_j, db_j, dht, dwt_j, dbt_j, dtemp = out
        dw = _write_columns(dw, dw_j, c0, fresh)
        db = _write_columns(db, db_j, c0, fresh)
        dwt = _write_columns(dwt, dwt_j, c0, fresh)
        dbt = _write_columns(dbt, dbt_j, c0, fresh)
        return dh, dw, db, dht, dwt, dbt, dtemp

    init = (
        zeros((n, d), dtype, want_h),
        zeros(w.shape, w.dtype, want_w),
        zeros((v,), dtype, want_b),
        zeros((n, dt_), dtype, want_ht),
        zeros(wt.shape, wt.dtype, want_wt),
        zeros((v,), dtype, want_bt),
        zeros((), dtype, want_t),
    )
    if student or teacher or want_t:
        dh, dw, db, dht, dwt, dbt, dtemp = lax.fori_loop(0, num_chunks(v, tv), vocab_chunk, init)
    else:
        dh = dw = db = dht = dwt = dbt = dtemp = None
    dbeta = None
    if want_beta:
        dbeta = jnp.sum(xmul(g, _beta_grad(mode, sums, beta)))
    if dtemp is not None:
        dtemp = -dtemp / temperature
    return dh, dw, db, dht, dwt, dbt, dbeta, dtemp


def _write_columns(full, part, c0, fresh):
    """``full[..., c0:c0+tv] = part``, columns an overlapping chunk already wrote kept."""
    if full is None:
        return None
    part = part.astype(full.dtype)
    if fresh is not None:
        old = lax.dynamic_slice_in_dim(full, c0, part.shape[-1], full.ndim - 1)
        part = jnp.where(fresh if full.ndim == 2 else fresh[0], part, old)
    return lax.dynamic_update_slice_in_dim(full, part, c0, full.ndim - 1)
