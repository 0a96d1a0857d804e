r"""Softmax statistics: the few numbers per row that every softmax cross-entropy is made of.

Every softmax loss in jbce (materialised, tiled over a vocabulary, sharded over a mesh axis)
reduces its logits to one :class:`Stats` per row, builds the loss from them in plain
``jnp`` (:func:`loss_terms`), and differentiates them with one formula
(:func:`logits_grad`). For a row of logits :math:`x` over its included classes :math:`C`
(not ``-inf``, not masked out), class (or label) weights :math:`w` and label :math:`y`:

.. math::
    m = \max_{c \in C} x_c, \qquad
    \ell = \log \sum_{c \in C} e^{x_c - m}, \qquad
    t = x_y, \qquad
    s = \sum_{c \in C} w_c (x_c - m), \qquad
    W = \sum_{c \in C} w_c

so that the log-sum-exp is :math:`m + \ell`, :math:`-\log p_y = \ell - (t - m)` and
:math:`\sum_c w_c (\text{lse} - x_c) = W \ell - s`. Every loss is a function of these
combinations only, which do not change with :math:`m`: the shift is a constant (no
gradient), kept apart so that rows of huge magnitude (all ``-1e30``, or offset by ``1e4``)
lose nothing to rounding at :math:`|m|`. Blocks of a row (vocabulary tiles, shards) are
merged exactly with :func:`merge` / :func:`combine_over_axis`.

The gradient of any loss built from the statistics w.r.t. the logits of a block is

.. math::
    \frac{\partial L}{\partial x_c} = \bar\ell\, p_c + \bar t\, [c = y] + \bar s\, w_c,
    \qquad p_c = e^{x_c - m - \ell}

(:func:`logits_grad`), where :math:`\bar\ell, \bar t, \bar s` are the cotangents of the
statistics: the backward pass needs the logits, :math:`m` and :math:`\ell`, two floats a row.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jbce._core import checks
from jbce._core.math import xmul
from jbce._softmax import xla_cpu


class Stats(NamedTuple):
    """Per-row statistics (see the module docstring); ``None`` for a field a loss doesn't need.

    Attributes:
      shift: :math:`m`, the row max over included classes (0 for a row without any).
      lse: :math:`\\ell = \\log\\sum_C e^{x - m}`; ``-inf`` for a row without classes.
      target: :math:`x_y`, the label's logit (0 if the label is not among these classes).
      logit_sum: :math:`s = \\sum_C w (x - m)`.
      weight_sum: :math:`W = \\sum_C w`.
      target_weight: :math:`w_y` (0 if the label is not among these classes).
      count: :math:`|C|`, the number of included classes.
    """

    shift: jax.Array
    lse: jax.Array
    target: jax.Array
    logit_sum: jax.Array | None = None
    weight_sum: jax.Array | None = None
    target_weight: jax.Array | None = None
    count: jax.Array | None = None


def softcap(x: jax.Array, cap) -> jax.Array:
    """Gemma-style soft-capping ``cap * tanh(x / cap)``, with ``-inf`` kept ``-inf`` (a removed
    class stays removed; ``+inf`` becomes ``cap``, NaN stays NaN) and a derivative of 0 there;
    ``cap=None`` leaves ``x`` as it is."""
    if cap is None:
        return x
    removed = x == -jnp.inf
    # x = 0 inside tanh where removed: the unused branch's d/d cap would be 0 * inf = NaN.
    capped = cap * jnp.tanh(jnp.where(removed, jnp.zeros((), x.dtype), x) / cap)
    return jnp.where(removed, jnp.full((), -jnp.inf, capped.dtype), capped)


def softcap_coefficients(z: jax.Array, cap):
    """``(d x / d z, d x / d cap)`` of ``x = softcap(z, cap)``, elementwise: ``1 - t^2`` and
    ``t - (z / cap)(1 - t^2)`` with ``t = tanh(z / cap)``. Where ``1 - t^2`` is 0 (``z`` at
    ``+inf`` or rounding to ``+-cap``) the latter is ``t``, not ``inf * 0``; at ``z = -inf``
    both are 0 (``x`` stays ``-inf``)."""
    zero = jnp.zeros((), z.dtype)
    removed = z == -jnp.inf
    z = jnp.where(removed, zero, z)  # as in softcap: no NaN in the coefficients' derivatives
    t = jnp.tanh(z / cap)
    slope = 1 - t * t
    z_over = jnp.where(slope == 0, zero, z / jnp.where(slope == 0, 1, cap))
    return jnp.where(removed, zero, slope), jnp.where(removed, zero, t - slope * z_over)


def softcap_vjp(z: jax.Array, cap, dx: jax.Array):
    """(d z, d cap) for ``x = softcap(z, cap)`` and the cotangent ``dx`` of ``x``: the
    transpose of :func:`softcap_jvp`."""
    if cap is None:
        return dx, None
    slope, cap_coef = softcap_coefficients(z, cap)
    return dx * slope, jnp.sum(dx * cap_coef)


def softcap_jvp(z: jax.Array, cap, dz: jax.Array | None, dcap, rows=None) -> jax.Array | None:
    """The tangent of ``x = softcap(z, cap)`` (linear in ``dz``, ``dcap``; None: zero).

    The coefficients (:func:`softcap_coefficients`) are 0 in the rows outside ``rows``
    (``[...]`` boolean, or None).
    """
    zero = jnp.zeros((), z.dtype)

    def coef(c):
        return c if rows is None else jnp.where(_col(rows), c, zero)

    if cap is None:
        return None if dz is None else dz.astype(z.dtype)
    slope, cap_coef = softcap_coefficients(z, cap)
    out = None
    if dz is not None:
        out = coef(slope) * dz.astype(z.dtype)
    if dcap is not None:
        d = coef(cap_coef) * dcap.astype(z.dtype)
        out = d if out is None else out + d
    return out


def _row_weights(w: jax.Array | None, x: jax.Array) -> jax.Array:
    """Class weights ``[k]`` or per-logit weights ``[..., k]`` shaped to broadcast with ``x``."""
    if w is None:
        return jnp.ones((), x.dtype)
    return w.reshape((1,) * (x.ndim - w.ndim) + w.shape)


def _masked(x, weights, mask, soft):
    """A masked-out class is a ``-inf`` class (and a soft target on it is dropped)."""
    if mask is None:
        return x, weights
    x = jnp.where(mask, x, -jnp.inf)
    if soft:
        weights = jnp.where(mask, weights, jnp.zeros((), weights.dtype))
    return x, weights


def _sum_weights(x, weights, soft, to_w=None):
    """(w, 0/1 included) for the sums ``s`` and ``W``: class weights count included classes
    only, soft targets every class (a target on a ``-inf`` class is flagged separately).
    Soft targets stay as given (``to_w`` is applied by their reader, :func:`row_reduce`)."""
    inc = (x != -jnp.inf).astype(x.dtype)  # NaN logits are included
    if soft:
        return _row_weights(weights, x), inc
    if weights is None:
        return inc, inc
    return inc * _row_weights((to_w or _identity)(weights), x), inc


def _finite_shifted(x, shift):
    """``x - m`` with ``-inf`` replaced by the most negative float, so a zero weight gives 0."""
    return jnp.maximum(x - shift[..., None], jnp.finfo(x.dtype).min)


LSE_METHODS = ("one_pass", "two_pass")


def row_reduce(logits, to_x, weights=None, method: str | None = None, to_w=None):
    """``(m, sum_c exp(x_c - m'), W, s)`` over the last axis of ``x = to_x(logits)``.

    ``m`` is the row max, ``m'`` the same with ``-inf`` (a row without classes) replaced
    by 0; with ``weights`` (per logit, broadcastable to ``x``, read as ``w = to_w(weights)``;
    None: as given), ``W = sum_c w_c`` and
    ``s = sum_c w_c (x_c - m')``, a positive weight on a ``-inf`` logit making ``s``
    ``-inf``; without, both are None. Two ways:

    - ``"one_pass"``: one variadic reduction whose carry is merged as :func:`merge` merges
      blocks (an online softmax: each logit is a block of one class): the logits are read
      once. On an H100 and a TPU v5e it halves the HBM traffic of the forward pass
      (deviceless compile of 4096 x 32768 float32, ``python -m bench.accelerators``:
      1.08 GB -> 0.55 GB for integer labels). Rows longer than :data:`GPU_ROW_BOUND` are
      cut into a few equal pieces first (:func:`row_pieces`).
    - ``"two_pass"``: the max, then the sums. XLA:CPU runs the variadic reduction about 7x
      slower than the two passes (2048 x 32768 float32 on the 2-core dev box).

    ``None`` picks per platform when the program is lowered (on CPU the two passes as
    :mod:`jbce._softmax.xla_cpu` writes them for XLA:CPU's fused kernels, the same numbers;
    ``one_pass`` elsewhere, with uncut rows on TPU), so a program compiled for a GPU or TPU
    on a CPU host gets its platform's choice.
    """
    to_w = to_w or _identity
    read = lambda w: None if w is None else to_w(w)  # noqa: E731
    if method is None:
        return jax.lax.platform_dependent(
            logits,
            weights,
            cpu=lambda v, w: xla_cpu.two_pass(v, to_x, w, to_w),
            tpu=lambda v, w: _one_pass(v, to_x, read(w), pieces=1),
            default=lambda v, w: _one_pass(v, to_x, read(w)),
        )
    return (_one_pass if method == "one_pass" else _two_pass)(logits, to_x, read(weights))


def _nonempty(m):
    return jnp.where(m == -jnp.inf, jnp.zeros((), m.dtype), m)


def _two_pass(logits, to_x, weights):
    # The max is taken on the raw logits and transformed after (to_x is elementwise and
    # non-decreasing), so the transformed copy (a bf16 -> f32 cast) has one reader.
    m = to_x(jnp.max(logits, axis=-1))  # NaN propagates; -inf logits give exp(-inf) = 0
    x = to_x(logits)
    sumexp = jnp.sum(jnp.exp(x - _nonempty(m)[..., None]), axis=-1)
    if weights is None:
        return m, sumexp, None, None
    w = jnp.broadcast_to(weights, x.shape)
    # -inf logits as the most negative float, so that a zero weight gives exactly 0 there.
    shifted = jnp.maximum(x - _nonempty(m)[..., None], jnp.finfo(x.dtype).min)
    s = jnp.sum(w * shifted, axis=-1)
    impossible = jnp.sum(w * (x == -jnp.inf).astype(x.dtype), axis=-1) > 0  # weight on -inf
    return m, sumexp, jnp.sum(w, axis=-1), jnp.where(impossible, -jnp.inf, s)


# XLA:GPU reduces a row of up to 16384 elements in one kernel; a longer row goes to two
# kernels, the first writing a partial result per 256 columns to memory for the second to
# read back (H100 deviceless compile, 4096 x 32768 float32 soft labels: 8 MiB of temp and
# 1.6% more traffic than reading the logits once). A row cut into a few pieces of at most
# this many columns, reduced in one kernel, and its pieces' carries merged (a few floats
# per row) keeps the single read. TPU needs no cut (its reduction is not split; the reshape
# would cost a relayout copy there).
GPU_ROW_BOUND = 16384
_MAX_PIECES = 64


def row_pieces(k: int) -> int:
    """The fewest equal pieces of at most :data:`GPU_ROW_BOUND` columns a row of ``k``
    splits into; 1 if it is short enough, or has no such divisor up to 64 (left to XLA)."""
    if k <= GPU_ROW_BOUND:
        return 1
    for c in range(-(-k // GPU_ROW_BOUND), _MAX_PIECES + 1):
        if k % c == 0:
            return c
    return 1


def _combine(a, b):
    """The merge of two carries ``(m, e, [W, s])``: the rule of :func:`merge`."""
    (m1, e1, *ws1), (m2, e2, *ws2) = a, b
    m = jnp.maximum(m1, m2)
    d1, d2 = m1 - _nonempty(m), m2 - _nonempty(m)
    out = (m, e1 * jnp.exp(d1) + e2 * jnp.exp(d2))
    if not ws1:
        return out
    (w1, s1), (w2, s2) = ws1, ws2
    return *out, w1 + w2, s1 + xmul(w1, d1) + s2 + xmul(w2, d2)


def _one_pass(logits, to_x, weights, pieces=None):
    k = logits.shape[-1]
    pieces = row_pieces(k) if pieces is None else pieces
    x = to_x(logits)
    zero = jnp.zeros((), x.dtype)
    # Each logit is a block of one class, with the carry merge(init, it) would give: a -inf
    # logit adds nothing to the sum of exps (e = 0), and a positive weight on it makes s
    # -inf. (A class axis of one element, or a piece of one, is never merged.)
    absent = x == -jnp.inf
    operands = (x, jnp.where(absent, zero, jnp.ones((), x.dtype)))
    init = (jnp.array(-jnp.inf, x.dtype), zero)
    if weights is not None:  # each logit: W = w, s = w (x - x) = 0
        w = jnp.broadcast_to(weights, x.shape).astype(x.dtype)
        operands += (w, jnp.where(absent & (w > 0), jnp.array(-jnp.inf, x.dtype), zero))
        init += (zero, zero)
    if pieces > 1:  # [..., K] -> [..., pieces, K / pieces]: each piece's carry, then theirs
        operands = tuple(o.reshape(*o.shape[:-1], pieces, k // pieces) for o in operands)
        operands = jax.lax.reduce(operands, init, _combine, (x.ndim,))
    out = jax.lax.reduce(operands, init, _combine, (x.ndim - 1,))
    return out if weights is not None else (*out, None, None)


def _identity(v):
    return v


def block_stats(
    logits: jax.Array,
    labels: jax.Array | None,
    *,
    to_x=None,
    weights: jax.Array | None = None,
    to_w=None,
    mask: jax.Array | None = None,
    sums: bool = False,
    soft: bool = False,
    method: str | None = None,
) -> Stats:
    """:class:`Stats` of a block of each row's classes, ``x = to_x(logits)`` ``[..., k]``.

    Args:
      logits: the block as given (any float dtype).
      labels: ``[...]`` class indices into this block (outside ``[0, k)``: not here), or None.
      to_x: elementwise, non-decreasing map to the compute dtype (the cast and soft-cap);
        applied lazily so the max and the target logit can be read from ``logits`` and the
        transformed copy has a single reader. None: ``logits`` are ``x``.
      weights: ``[k]`` class weights or ``[..., k]`` label weights (soft labels), or None (1).
      to_w: the map of ``weights`` to the compute dtype, applied lazily as ``to_x`` is (a
        platform's reduction may read them its own way, :func:`row_reduce`). None: as given.
      mask: optional ``[..., k]`` boolean, False takes a class out of the softmax.
      sums: also compute ``logit_sum``, ``weight_sum`` and ``count``.
      soft: ``weights`` are probability targets: a positive target on a ``-inf`` logit makes
        ``logit_sum`` ``-inf`` (an impossible target costs ``+inf``), where class weights
        only count included classes.
      method: how the log-sum-exp is reduced (:func:`row_reduce`).
    """
    to_x = to_x or _identity
    target = target_weight = None
    if labels is not None:
        # The label's own logit even where the mask takes its class out of the softmax (as
        # optax's where does): the loss is then lse over the included classes minus x_y.
        target = _take(logits, labels, to_x)
        if weights is not None and not soft:
            target_weight = _take(weights, labels, to_w or _identity)
    if mask is not None:  # masked after the transform (soft-capping maps -inf to -cap)
        logits, weights = _masked(to_x(logits), weights, mask, soft)
        to_x = _identity
    w = inc = None
    if sums:
        x = to_x(logits)
        w, inc = _sum_weights(x, weights, soft, to_w)
    m, sumexp, weight_sum, logit_sum = row_reduce(logits, to_x, w, method, to_w)
    m = jax.lax.stop_gradient(_nonempty(m))
    lse = jnp.log(sumexp)
    if not sums:
        return Stats(m, lse, target, target_weight=target_weight)
    count = None if soft else jnp.sum(inc, axis=-1)
    return Stats(m, lse, target, logit_sum, weight_sum, target_weight, count)


def _take(a: jax.Array, labels: jax.Array, to_x=_identity) -> jax.Array:
    """``to_x(a[..., label])`` per row (class weights ``a`` ``[k]`` too), 0 where the label
    is not in ``[0, k)``."""
    k = a.shape[-1]
    here = (labels >= 0) & (labels < k)
    idx = jnp.clip(labels, 0, k - 1)
    got = a[idx] if a.ndim == 1 else jnp.take_along_axis(a, idx[..., None], axis=-1)[..., 0]
    got = to_x(got)
    return jnp.where(here, got, jnp.zeros((), got.dtype))


def _onehot(labels: jax.Array, x: jax.Array) -> jax.Array:
    cols = jax.lax.broadcasted_iota(labels.dtype, x.shape, x.ndim - 1)
    return cols == labels[..., None]


def merge(a: Stats, b: Stats) -> Stats:
    """The statistics of a row from those of two disjoint blocks of its classes (exact)."""
    m = _common_shift(jnp.maximum(_effective_max(a), _effective_max(b)))
    da, db = a.shift - m, b.shift - m
    lse = jnp.logaddexp(a.lse + da, b.lse + db)
    return Stats(
        m,
        lse,
        _add(a.target, b.target),
        _add(_shifted(a.logit_sum, a.weight_sum, da), _shifted(b.logit_sum, b.weight_sum, db)),
        _add(a.weight_sum, b.weight_sum),
        _add(a.target_weight, b.target_weight),
        _add(a.count, b.count),
    )


def combine_over_axis(local: Stats, axis_name) -> Stats:
    """The statistics of rows whose classes are sharded over ``axis_name``, from each shard's.

    One ``pmax`` and one ``psum``; the result is identical (replicated) on every shard. Not
    differentiable by design: it serves the forward pass of a ``custom_vjp`` whose backward
    pass needs only the returned ``shift`` and ``lse``.
    """
    m = _common_shift(jax.lax.pmax(_effective_max(local), axis_name))
    d = local.shift - m
    parts = (
        jnp.exp(local.lse + d),
        local.target,
        _shifted(local.logit_sum, local.weight_sum, d),
        local.weight_sum,
        local.target_weight,
        local.count,
    )
    total, *rest = jax.lax.psum(parts, axis_name)
    return Stats(m, jnp.log(total), *rest)


def _effective_max(s: Stats) -> jax.Array:
    return jnp.where(s.lse == -jnp.inf, -jnp.inf, s.shift)


def _common_shift(m: jax.Array) -> jax.Array:
    return jnp.where(m == -jnp.inf, jnp.zeros((), m.dtype), m)


def _shifted(logit_sum, weight_sum, delta):
    """``s`` re-expressed relative to a new shift: ``s + W (m_old - m_new)``."""
    if logit_sum is None:
        return None
    return logit_sum + jnp.where(weight_sum == 0, 0, weight_sum * delta)


def _add(a, b):
    return None if a is None else a + b


def probs(x, shift, lse):
    """The softmax of a block of logits ``x`` from its rows' full ``shift`` and shifted
    log-sum-exp ``lse`` (shaped to broadcast against ``x``); 0 in a row without classes.

    ``exp(x - m) * exp(-l)`` rather than ``exp(x - m - l)``: ``exp(-l) <= 1`` carries the
    normalisation with a relative error of a few ulps, where the latter would amplify the
    rounding of ``x - m - l``.
    """
    return jnp.exp(x - shift) * jnp.exp(-jnp.where(lse == -jnp.inf, jnp.zeros((), lse.dtype), lse))


def softmax_grad(x, shift, lse, g_lse, target=None, sums=None):
    r"""The one backward formula of the softmax statistics, on a block of logits ``x``:
    ``(dL/dx, p)`` with

    .. math::
        \frac{\partial L}{\partial x_c} = \bar\ell\, p_c + \bar t\, [c = y]
            + \bar s\, w_c, \qquad p_c = e^{x_c - m}\, e^{-\ell}

    for the row's full ``shift`` :math:`m` and shifted log-sum-exp ``lse`` :math:`\ell`
    (``-inf`` for a row without classes: ``p = 0``), the cotangent ``g_lse`` of
    :math:`\ell` (per row, or per element where a statistic's own term is folded into it, as
    the entropy's), ``target = (label hits, the target's cotangent)`` and
    ``sums = (the logit sum's cotangent, w)`` with ``w`` 0 on classes outside the sums (either
    None: no such term). Every per-row value is shaped to broadcast against ``x`` (a column):
    :func:`logits_grad`, the entropy statistics and the Pallas kernels' tiles all call it.

    """
    p = probs(x, shift, lse)
    dx = g_lse * p
    zero = jnp.zeros((), x.dtype)
    if target is not None:
        hit, g_t = target
        dx = dx + jnp.where(hit, g_t, zero)
    if sums is not None:
        g_s, w = sums
        dx = dx + g_s * w
    return dx, p


def logits_grad(
    x: jax.Array,
    labels: jax.Array | None,
    stats: Stats,
    g: Stats,
    *,
    weights: jax.Array | None = None,
    mask: jax.Array | None = None,
    rows: jax.Array | None = None,
    soft: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """(d x, d weights) for the cotangents ``g`` of ``block_stats(x, labels, ...)``.

    ``stats`` are the row's full statistics (``shift`` and ``lse`` over all its classes, as
    saved by the forward pass), so ``p`` is this block's slice of the softmax. ``g.shift``
    is ignored: every loss depends on the statistics only through combinations invariant
    to the shift. ``d weights`` (class weights, or soft labels) is None without weights.
    ``rows`` (``[...]`` boolean) marks the rows the loss uses: the others get exactly zero
    gradient, whatever their logits (NaN included).
    """
    x, weights = _masked(x, weights, mask, soft)
    zero = jnp.zeros((), x.dtype)
    hit = None if g.target is None or labels is None else _onehot(labels, x)
    w = inc = None
    if g.logit_sum is not None:
        w, inc = _sum_weights(x, weights, soft)
    dx, _ = softmax_grad(
        x, _col(stats.shift), _col(stats.lse), _col(g.lse),
        None if hit is None else (hit, _col(g.target)),
        None if w is None else (_col(g.logit_sum), w * inc),
    )  # fmt: skip
    if rows is not None:
        dx = jnp.where(_col(rows), dx, zero)
    if weights is None:
        return dx, None
    dw = jnp.zeros(x.shape, x.dtype)
    if g.logit_sum is not None:
        dw = dw + _col(g.logit_sum) * inc * _finite_shifted(x, stats.shift)
    if g.weight_sum is not None:
        dw = dw + _col(g.weight_sum) * inc  # s and W: included classes only, as stats_tangent
    if g.target_weight is not None and labels is not None:
        dw = dw + jnp.where(_onehot(labels, x), _col(g.target_weight), zero)
    if rows is not None:
        dw = jnp.where(_col(rows), dw, zero)
    if mask is not None and soft:
        dw = jnp.where(mask, dw, zero)
    if weights.ndim < x.ndim:  # class weights: summed over the rows
        dw = jnp.sum(dw.reshape(-1, *weights.shape), axis=0)
    return dx, dw


def _col(v: jax.Array) -> jax.Array:
    return v[..., None]


def stats_tangent(
    x: jax.Array,
    labels: jax.Array | None,
    stats: Stats,
    tangents: tuple[jax.Array | None, jax.Array | None],
    *,
    weights: jax.Array | None = None,
    masks: tuple[jax.Array | None, jax.Array | None] = (None, None),
    sums: bool = False,
    soft: bool = False,
) -> Stats:
    r"""The tangent of ``block_stats(x, labels, ...)`` for ``tangents = (dx, dweights)``;
    ``masks = (mask, rows)``: the class mask and the rows the loss uses, as for
    :func:`logits_grad`.

    Linear in ``(dx, dweights)`` (either may be None: zero), with the coefficients of
    :func:`logits_grad`, so that its transpose is that formula:

    .. math::
        \dot\ell = \sum_c p_c \dot x_c, \quad \dot t = \dot x_y, \quad
        \dot s = \sum_c w_c \dot x_c + [c \in C]\, (x_c - m)\, \dot w_c, \quad
        \dot W = \sum_c [c \in C]\, \dot w_c

    (the shift and the count have no tangent: None). ``stats`` holds the row's full
    ``shift`` and ``lse``. The target is selected as ``where(c == y, .)`` summed over the
    row, so that its transpose is elementwise too (no scatter). A row outside ``rows`` gets
    exactly zero, whatever its logits.
    """
    dx, dweights = tangents
    mask, rows = masks
    zero = jnp.zeros((), x.dtype)
    rowmask = None if rows is None else _col(rows)

    def coef(c):  # a coefficient, exactly 0 in the rows the loss does not use
        c = jnp.broadcast_to(c, x.shape)
        return c if rowmask is None else jnp.where(rowmask, c, zero)

    def out(v):
        if v is None:
            return None
        return v if rows is None else jnp.where(rows, v, jnp.zeros((), v.dtype))

    onehot = None if labels is None else _onehot(labels, x)
    if dweights is not None:
        dweights = _row_weights(dweights, x)
    target = target_weight = None
    # The label's own logit, even where masked; its coefficient is 1 (finite), so masking the
    # output row is enough.
    if onehot is not None and dx is not None:
        target = jnp.sum(jnp.where(onehot, dx, zero), axis=-1)
    if onehot is not None and dweights is not None and weights is not None and not soft:
        target_weight = jnp.sum(jnp.where(onehot, dweights, zero), axis=-1)
    xm, wm = _masked(x, weights, mask, soft)
    if mask is not None:
        dx = None if dx is None else jnp.where(mask, dx, zero)
        if soft and dweights is not None:
            dweights = jnp.where(mask, dweights, zero)
    lse_dot = logit_sum = weight_sum = None
    if dx is not None:
        p = probs(xm, _col(stats.shift), _col(stats.lse))
        lse_dot = jnp.sum(coef(p) * dx, axis=-1)
    if sums:
        w, inc = _sum_weights(xm, wm, soft)
        parts = []
        if dx is not None:
            parts.append(jnp.sum(coef(w * inc) * dx, axis=-1))
        if dweights is not None:
            shifted = inc * _finite_shifted(xm, stats.shift)
            parts.append(jnp.sum(coef(shifted) * dweights, axis=-1))
            # s and W over included classes: a target on a -inf class (0, or the loss is
            # +inf) has no derivative, as the class is not in the softmax
            weight_sum = jnp.sum(coef(inc) * dweights, axis=-1)
        logit_sum = sum(parts[1:], parts[0]) if parts else None
    return Stats(
        None, out(lse_dot), out(target), out(logit_sum), out(weight_sum), out(target_weight)
    )


def loss_terms(
    stats: Stats,
    labels: jax.Array | None,
    *,
    num_classes,
    label_smoothing=0.0,
    z_loss=0.0,
    class_weighted: bool = False,
) -> tuple[jax.Array, jax.Array]:
    r"""(per-row loss, whether the row has a class) for integer labels.

    .. math::
        L = (1 - e)\, w_y\, (\ell - (t - m)) + \frac{e}{K} (W \ell - s) + z\, (m + \ell)^2

    with :math:`K = |C|` (the classes left after masking). A label outside
    ``[0, num_classes)`` gives NaN; a row without classes has loss 0 (the caller excludes
    it). ``label_smoothing`` and ``z_loss`` may be traced; a Python 0 leaves its term out.
    """
    has = stats.lse != -jnp.inf  # NaN rows count (and make the loss NaN)
    # Rows without classes: replaced before any arithmetic so that their (zero) cotangent
    # never meets an infinity (the label's logit is -inf there: w_y's would be 0 * inf).
    lse = jnp.where(has, stats.lse, 0)
    ce = jnp.where(has, lse - (stats.target - stats.shift), 0)
    tw = stats.target_weight if class_weighted else None
    smoothing = not checks.is_zero(label_smoothing)
    loss = ce if tw is None else tw * ce
    if smoothing:
        k = jnp.where(has & (stats.count > 0), stats.count, 1)
        smooth = (stats.weight_sum * lse - jnp.where(has, stats.logit_sum, 0)) / k
        loss = (1 - label_smoothing) * loss + label_smoothing * smooth
    if not checks.is_zero(z_loss):
        loss = loss + z_loss * jnp.square(stats.shift + lse)
    in_range = (labels >= 0) & (labels < num_classes)
    return jnp.where(in_range, loss, jnp.nan), has


def soft_terms(stats: Stats) -> tuple[jax.Array, jax.Array]:
    """(per-row soft-label loss ``W l - s = sum_c y_c (lse - x_c)``, whether the row has a
    class) for ``weights`` = the labels.

    A positive target on a ``-inf`` logit costs ``+inf``. A row whose every class is ``-inf``
    has loss 0 and is excluded by the caller, as a where-masked row is.
    """
    has = stats.lse != -jnp.inf  # NaN rows count (and make the loss NaN)
    zero = jnp.zeros((), stats.lse.dtype)
    lse, logit_sum = jnp.where(has, stats.lse, zero), jnp.where(has, stats.logit_sum, zero)
    return jnp.where(has, stats.weight_sum * lse - logit_sum, zero), has


def included(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Classes that take part in the softmax: not masked out and not ``-inf`` (NaN is included)."""
    inc = x != -jnp.inf
    return inc if mask is None else inc & mask
