r"""The tile math shared by the Pallas kernels of the fused linear cross-entropy.

Plain ``jnp`` on one ``[token_block, vocab_block]`` tile, written with the operations both
Pallas lowerings (Triton for GPUs, Mosaic for TPUs) and interpret mode accept: ``where``, row
``max``/``sum``, ``exp``, ``log``, ``tanh`` and ``iota`` comparisons (no gathers). The GPU and
TPU kernels (:mod:`jbce._linear.pallas_triton`, :mod:`jbce._linear.pallas_mosaic_tpu`) differ
only in how they walk the tiles; what each tile contributes is defined here once, and matches
:mod:`jbce._softmax.stats` (the statistics every jbce softmax loss is assembled from):

- forward, per row, running over the vocabulary blocks (an online log-sum-exp):
  :math:`m` (row max, 0 for a row without classes), :math:`\sigma = \sum_C e^{x - m}`
  (``lse = log sigma``), :math:`t = x_y`, and with label smoothing
  :math:`s = \sum_C w_c (x_c - m)`, :math:`W = \sum_C w_c` and :math:`|C|`, with class
  weights :math:`w` (without them :math:`w = 1`, so :math:`W = |C|` and the count is not
  kept apart) (:func:`update_stats`);
- backward, per tile, :math:`\partial L / \partial x_c = \bar\ell p_c + \bar t [c = y] +
  \bar s\, w_c [c \in C]` (:func:`logits_grad`, the formula of
  :func:`jbce._softmax.stats.logits_grad`), the class weights' share
  :math:`\partial L / \partial w_c = \sum_n [c \in C_n] (\bar s_n (x_{nc} - m_n) + \bar W_n)`
  (:func:`class_weights_grad`) and the soft-cap's chain rule (:func:`softcap_grad`).

Every per-row quantity is a ``[rows, 1]`` column so that it broadcasts against a tile.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jbce._core import sharding
from jbce._softmax import stats as _stats
from jbce._softmax.stats import softmax_grad


class Running(NamedTuple):
    """Per-row running statistics, ``[rows, 1]`` float32 each (``s``/``w`` None without sums,
    ``c`` None without class weights).

    ``m`` is the running max (``-inf`` until a class is seen), ``se`` the sum of
    ``exp(x - shift(m))``; ``t`` the label's logit; ``s`` the sum of ``w_c (x - shift(m))``
    and ``w`` that of ``w_c`` over the included classes (``w_c = 1`` without class weights:
    ``w`` is then their number), ``c`` the number of included classes.
    """

    m: jax.Array
    se: jax.Array
    t: jax.Array
    s: jax.Array | None = None
    w: jax.Array | None = None
    c: jax.Array | None = None


def shift(m):
    """The statistics' shift: the row max, or 0 for a row without classes."""
    return jnp.where(m == -jnp.inf, jnp.zeros((), m.dtype), m)


def empty(rows: int, sums: bool, weighted: bool = False) -> Running:
    """The statistics of no class; ``weighted``: with class weights (and ``sums``)."""
    col = (rows, 1)
    zero = jnp.zeros(col, jnp.float32)
    return Running(
        jnp.full(col, -jnp.inf, jnp.float32),
        zero,
        zero,
        zero if sums else None,
        zero if sums else None,
        zero if weighted else None,
    )


def fields(sums: bool, weighted: bool = False) -> int:
    """How many of :class:`Running`'s fields (and :func:`finish`'s outputs) are kept."""
    return 3 + 2 * sums + weighted


def matmul(a, b, *, transpose_a=False, transpose_b=False):
    """``a @ b`` (optionally transposed) with float32 accumulation; float32 inputs are
    multiplied at full precision (no TF32 / one-pass bf16)."""
    full = a.dtype == jnp.float32 or b.dtype == jnp.float32
    dims = (((0,) if transpose_a else (1,), (1,) if transpose_b else (0,)), ((), ()))
    return lax.dot_general(
        a,
        b,
        dims,
        precision=lax.Precision.HIGHEST if full else None,
        preferred_element_type=jnp.float32,
    )


softcap = _stats.softcap


def softcap_grad(z, cap, dx):
    """(d z, per-row d cap ``[rows, 1]``) for ``x = softcap(z, cap)`` and ``dx``, with the
    coefficients of :func:`jbce._softmax.stats.softcap_coefficients`."""
    if cap is None:
        return dx, None
    slope, cap_coef = _stats.softcap_coefficients(z, cap)
    return dx * slope, jnp.sum(dx * cap_coef, axis=1, keepdims=True)


def update_stats(acc: Running, x, valid, target_hit, cw=None) -> Running:
    """``acc`` merged with one tile of logits ``x`` ``[rows, cols]``.

    ``valid`` (broadcastable to ``x``) marks the columns this tile contributes (real
    classes not counted by an earlier tile); ``target_hit`` the label's column (valid or
    not: the label's own logit counts even for a ``-inf`` class, as in the materialised
    loss); ``cw`` the tile's class weights ``[1, cols]`` (with ``acc.c`` kept), or None.
    Columns outside ``valid`` may hold anything in ``x`` and ``cw``.
    """
    neg = jnp.full((), -jnp.inf, x.dtype)
    xm = jnp.where(valid, x, neg)
    m = jnp.maximum(acc.m, jnp.max(xm, axis=1, keepdims=True))
    base, old = shift(m), shift(acc.m)
    se = acc.se * jnp.exp(acc.m - base) + jnp.sum(jnp.exp(xm - base), axis=1, keepdims=True)
    t = acc.t + jnp.sum(jnp.where(target_hit, x, jnp.zeros((), x.dtype)), axis=1, keepdims=True)
    if acc.s is None:
        return Running(m, se, t, None, None)
    zero = jnp.zeros((), x.dtype)
    inc = xm != neg  # NaN logits are included
    count = jnp.sum(inc.astype(x.dtype), axis=1, keepdims=True)
    shifted = xm - base
    if cw is not None:  # where, not a product with inc: cw may be garbage outside valid
        shifted = cw * shifted
    s_tile = jnp.sum(jnp.where(inc, shifted, zero), axis=1, keepdims=True)
    moved = jnp.where(acc.w == 0, zero, acc.w * (old - base))
    s = acc.s + moved + s_tile
    if cw is None:
        return Running(m, se, t, s, acc.w + count)
    w = acc.w + jnp.sum(jnp.where(inc, cw, zero), axis=1, keepdims=True)
    return Running(m, se, t, s, w, acc.c + count)


def finish(acc: Running) -> tuple[jax.Array, ...]:
    """(shift, lse, target[, logit_sum, weight_sum[, count]]) columns from the running
    statistics."""
    out = (shift(acc.m), jnp.log(acc.se), acc.t)
    if acc.s is None:
        return out
    out = (*out, acc.s, acc.w)
    return out if acc.c is None else (*out, acc.c)


class Rows(NamedTuple):
    """The backward kernels' per-row inputs, ``[rows, 1]`` columns (:func:`row_columns`):
    the rows the loss uses (``keep``, boolean), the saved shift ``m`` and log-sum-exp
    ``lse``, and the cotangents of lse, target, logit_sum (``g_s``, None without sums) and
    weight_sum (``g_w``, None without class weights in the sums)."""

    keep: jax.Array
    m: jax.Array
    lse: jax.Array
    g_lse: jax.Array
    g_t: jax.Array
    g_s: jax.Array | None = None
    g_w: jax.Array | None = None


def logits_grad(x, valid, target_hit, rows: Rows, cw=None):
    """``(d x, filter measure)`` of one tile for the cotangents in ``rows`` (whose ``keep``
    zeroes the rows the loss does not use), ``valid`` the columns this tile owns (the others
    are 0 in both outputs); ``cw`` the tile's class weights ``[1, cols]`` (the smoothing
    term's ``w_c``), or None (1).

    The filter measure of an entry is its softmax share of the gradient, ``|g_lse| p``,
    relative to its token's label term ``|g_t|`` (``w_y |g|`` for the token loss's cotangent
    ``g``): what gradient filtering compares with its threshold (:func:`small`), so that an
    entry it drops is below ``threshold * w_y |g|`` whatever the class weights or the z-loss
    (which scale ``g_lse``). ``inf`` where ``g_t`` is 0 and the entry is not: never dropped.
    """
    zero = jnp.zeros((), x.dtype)
    xm = jnp.where(valid, x, jnp.full((), -jnp.inf, x.dtype))
    sums = None
    if rows.g_s is not None:  # the smoothing sums' weight: w_c (1) on included classes, else 0
        sums = (rows.g_s, jnp.where(xm != -jnp.inf, 1.0 if cw is None else cw, zero))
    dx, p = softmax_grad(xm, rows.m, rows.lse, rows.g_lse, (target_hit, rows.g_t), sums)
    used = rows.keep & valid
    label = jnp.abs(rows.g_t)
    scale = jnp.where(label > 0, jnp.abs(rows.g_lse) / jnp.where(label > 0, label, 1.0), jnp.inf)
    measure = jnp.where(p == 0, zero, scale * p)
    return jnp.where(used, dx, zero), jnp.where(used, measure, zero)


def class_weights_grad(x, valid, rows: Rows):
    """``[1, cols]``: this tile's rows' share of ``d class_weights`` through the smoothing
    sums, ``sum_rows [c in C] (g_s (x_c - shift) + g_w)`` (``g_s``, ``g_w`` the cotangents of
    logit_sum and weight_sum); rows outside ``rows.keep`` and columns outside ``valid`` add 0,
    whatever their logits."""
    zero = jnp.zeros((), x.dtype)
    inc = rows.keep & valid & (x != -jnp.inf)
    return jnp.sum(jnp.where(inc, rows.g_s * (x - rows.m) + rows.g_w, zero), axis=0, keepdims=True)


def small(measure, target_hit, threshold):
    """Whether a tile may be skipped by gradient filtering: every entry's filter measure (of
    the rows and columns it owns, as :func:`logits_grad` returns it) below ``threshold`` and
    no row's label in it."""
    # max of a float 0/1 rather than any(): Triton has no boolean reduction
    hits = jnp.max(jnp.where(target_hit, 1.0, 0.0).astype(jnp.float32))
    return (jnp.max(measure) < threshold) & (hits == 0)


def row_columns(cols) -> Rows:
    """The backward kernels' per-row inputs, loaded (``[rows, 1]`` each: keep as int32, then
    shift, lse, g_lse, g_t[, g_s[, g_w]]), as :class:`Rows`."""
    return Rows(cols[0] != 0, *cols[1:])


class Operands(NamedTuple):
    """The kernels' operands in the layout both kernel sets take (None: absent)."""

    hidden: jax.Array  # [N, D]
    weight: jax.Array  # [D, V]
    bias: jax.Array | None  # [1, V]
    labels: jax.Array  # [N, 1] int32
    cap: jax.Array | None  # [1, 1] float32
    cw: jax.Array | None  # [1, V] float32: the class weights of the smoothing sums

    def present(self) -> list:
        """The operands passed to a kernel, in :class:`Refs`' order, without the absent ones."""
        return [a for a in self if a is not None]


@dataclasses.dataclass(frozen=True)
class Call:
    """The static options of the kernels' wrappers.

    Attributes:
      sums: the smoothing sums too (``logit_sum``, ``weight_sum``[, ``count``]).
      threshold: gradient filtering (None: off).
      interpret: Pallas interpret mode.
      blocks: caps on the block sizes (:func:`jbce._linear.pallas.interpret`), or None.
      v: the number of real classes (GPU: the operands may be padded past it), or None.
    """

    sums: bool
    threshold: float | None = None
    interpret: bool = False
    blocks: tuple | None = None
    v: int | None = None


@dataclasses.dataclass(frozen=True)
class Static:
    """What a kernel body knows statically: ``n`` tokens, ``v`` real classes, ``d``, the
    token and class blocks ``tn`` x ``tv``, which operands are present (:class:`Operands`),
    the smoothing sums, the number of inputs (:func:`split_refs`) and the gradient filter's
    threshold (None: off). GPU: ``vp`` classes after padding, D in ``tk`` slices per dot
    and ``td`` per backward program; TPU: ``steps``, the blocks of the sequential grid axis.
    """

    n: int
    v: int
    d: int
    tn: int
    tv: int
    has_bias: bool
    has_cap: bool
    has_cw: bool
    sums: bool
    n_in: int
    thr: float | None = None
    vp: int = 0
    tk: int = 0
    td: int = 0
    steps: int = 1


def static(ops: Operands, call: Call, n_in: int, blocks: dict) -> Static:
    """:class:`Static` of a call on ``ops`` with ``n_in`` inputs and the block sizes
    ``blocks`` (``tn``, ``tv`` and the platform's others)."""
    n, d = ops.hidden.shape
    vp = ops.weight.shape[1]
    return Static(
        n, vp if call.v is None else call.v, d, has_bias=ops.bias is not None,
        has_cap=ops.cap is not None, has_cw=ops.cw is not None, sums=call.sums, n_in=n_in,
        thr=call.threshold, vp=vp, **blocks,
    )  # fmt: skip


def backward_outputs(dh, dw, s: Static) -> tuple:
    """(d hidden, d weight, d bias, per-row d cap, d class weights; None where absent) from
    the outputs of the d hidden kernel (d hidden[, d cap]) and the d weight kernel (d
    weight[, d bias][, d class weights])."""
    return (
        dh[0],
        dw[0],
        dw[1] if s.has_bias else None,
        dh[1] if s.has_cap else None,
        dw[-1] if s.has_cw else None,
    )


class Refs(NamedTuple):
    """A kernel's refs in the layout both kernel sets pass (None for an absent operand)."""

    h: object
    w: object
    b: object  # bias [1, V]
    y: object  # labels [N, 1]
    cap: object  # [1, 1]
    cw: object  # class weights [1, V]
    inputs: list  # the other inputs ([N, 1] row columns)
    outs: list  # the outputs and scratch


def split_refs(refs, layout) -> Refs:
    """A kernel's refs (:meth:`Operands.present`, the other inputs up to ``layout.n_in``, then
    outputs and scratch) as :class:`Refs`; ``layout`` has ``has_bias``, ``has_cap``,
    ``has_cw`` and ``n_in``."""
    refs = list(refs)
    it = iter(refs[: layout.n_in])
    h_ref, w_ref = next(it), next(it)
    b_ref = next(it) if layout.has_bias else None
    y_ref = next(it)
    cap_ref = next(it) if layout.has_cap else None
    cw_ref = next(it) if layout.has_cw else None
    return Refs(h_ref, w_ref, b_ref, y_ref, cap_ref, cw_ref, list(it), refs[layout.n_in :])


def pallas_call(kernel, *, out_shape, **kwargs):
    """``pl.pallas_call`` that also works inside ``shard_map`` with ``check_vma=True``: the
    operands are marked varying over every mesh axis one of them varies on, and the outputs
    (``out_shape``, a list of structs) are typed as varying over the same axes. Elsewhere
    the plain call."""

    def call(*args):
        vary = sharding.varying_like(*args)
        args = [vary(a) for a in args]
        mat = getattr(jax.typeof(args[0]), "manual_axis_type", None)
        outs = [jax.ShapeDtypeStruct(o.shape, o.dtype, manual_axis_type=mat) for o in out_shape]
        return pl.pallas_call(kernel, out_shape=outs, **kwargs)(*args)

    return call
