"""Softmax cross-entropy with probability targets and with integer class labels.

Both losses reduce the logits to a few per-example statistics inside a
``jax.custom_vjp`` whose only residuals are the logits (in their own dtype) and one
log-sum-exp per example; softmax probabilities are recomputed in the backward pass.
Options (smoothing, z-loss, class weights, reductions) are assembled from those
statistics in plain ``jnp``, so they differentiate for free and the fused linear and
vocabulary-parallel losses can share the assembly (:func:`loss_from_stats`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jbce import _checks, _reduce
from jbce._reduce import fast_or_exact, has_nan, reduce_loss, safe_divide
from jbce._vma import pvary_like


# --- layout: move the class axes last and flatten them -----------------------------------------
def _to_rows(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """[..batch.., ..classes..] with the class axes flattened into one last axis."""
    batch = tuple(i for i in range(x.ndim) if i not in axes)
    if axes != (x.ndim - 1,):
        x = jnp.transpose(x, batch + axes)
    k = math.prod(x.shape[len(batch) :])
    return x.reshape(tuple(x.shape[: len(batch)]) + (k,))


def _batch_shape(shape: Sequence[int], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n for i, n in enumerate(shape) if i not in axes)


def _split_where(where, shape, axes, batch_shape):
    """Returns (per-logit mask in row layout or None, per-example mask or None)."""
    if where is None:
        return None, None
    where = jnp.asarray(where, bool)
    if where.ndim == len(shape):
        _checks.check_broadcastable("where", where, "logits", shape)
        logit_mask = _to_rows(jnp.broadcast_to(where, shape), axes)
        return logit_mask, None
    _checks.check_broadcastable("where", where, "the logits' batch shape", batch_shape)
    return None, jnp.broadcast_to(where, batch_shape)


def _included(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Classes that take part in the softmax: not masked out and logit > -inf."""
    inc = x > -jnp.inf
    return inc if mask is None else inc & mask


def _masked_lse(x: jax.Array, inc: jax.Array) -> jax.Array:
    """log sum_{c included} exp(x_c) over the last axis; -inf for a row with no class."""
    xm = jnp.where(inc, x, -jnp.inf)
    m = jnp.max(xm, axis=-1, keepdims=True, initial=-jnp.inf)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0))
    return m[..., 0] + jnp.log(jnp.sum(jnp.exp(xm - m), axis=-1))


def _softmax_from_lse(x: jax.Array, lse: jax.Array, inc: jax.Array) -> jax.Array:
    z = jnp.where(inc, x - lse[..., None], -jnp.inf)
    return jnp.exp(z)


# Without a mask the compare/select of _masked_lse is not needed (exp(-inf - m) is already 0)
# and is expensive: on XLA:CPU it splits the max and the exp-sum into separate kernels with
# an N x K temporary between them. These two keep every pass select-free.
def _lse_unmasked(x: jax.Array, raw: jax.Array | None = None) -> jax.Array:
    """log sum_c exp(x_c) over the last axis; -inf logits drop out, -inf for an all -inf row.

    ``raw``: the logits before their (exact) cast to ``x.dtype``; the max is taken on them so
    that the cast copy is read by one pass only and never materialised (bf16 inputs).
    """
    m = jnp.max(x if raw is None else raw, axis=-1, keepdims=True).astype(x.dtype)
    # Clamped into the finite range (an all -inf row gets lse -inf, a +inf logit lse +inf)
    # with max and negation only: XLA turns min(max(.)) into a clamp, which YNNPACK cannot
    # fuse, and a select would also split the loss into per-row kernels and buffers.
    fmin = jnp.finfo(x.dtype).min
    m = jax.lax.stop_gradient(-jnp.maximum(-jnp.maximum(m, fmin), fmin))
    return m[..., 0] + jnp.log(jnp.sum(jnp.exp(x - m), axis=-1))


def _lse_flagged(x: jax.Array) -> jax.Array:
    """log sum_c exp(x_c) in one unshifted exp-sum pass; NaN for a row it cannot serve.

    Without the max shift the lse costs what ``sum(exp(x))`` costs (on XLA:CPU the max pass
    and the shift ``x - m`` are each about as expensive again), and it fuses with the rest of
    the loss into one kernel. The unshifted sum is exact to rounding while it is finite and
    at least ``K * tiny * 2^30`` (terms lost to underflow then weigh < 2^-30 of it): in
    float32, logits up to ~80 with a row maximum above ~-55. Other rows (huge or tiny logits,
    an all -inf row, a NaN) get NaN through ``0 * log(s - s_min)``. The integer-label
    statistics repair it at once with :func:`_repair_lse`; the soft-label loss lets the NaN
    reach its reduced value, recomputes that with :func:`_lse_unmasked`
    (:func:`jbce._reduce.fast_or_exact`), and repairs the lse in its backward pass.
    """
    s = jnp.sum(jnp.exp(x), axis=-1)
    s_min = x.shape[-1] * float(jnp.finfo(x.dtype).tiny) * 2.0**30
    return jnp.log(s) + 0 * jnp.log(s - s_min)


def _repair_lse(lse: jax.Array, logits: jax.Array, dtype, cap: float | None = None):
    """``lse`` from :func:`_lse_flagged`, recomputed with two passes if any row is NaN."""
    # A flagged lse is finite or NaN, so its sum is NaN exactly when a row is.
    return jax.lax.cond(
        has_nan(lse),
        lambda raw, lse: _lse_unmasked(
            _softcap(raw.astype(dtype), cap), raw if cap is None else None
        ),
        lambda raw, lse: lse,
        logits,
        lse,
    )


def _softmax_unmasked(x: jax.Array, lse: jax.Array) -> jax.Array:
    # A row of -inf logits has lse = -inf; use -FLT_MAX there so its probabilities are
    # exp(-inf) = 0 rather than exp(nan) (that row's cotangent is 0 and must stay 0). A max,
    # not a select, so that XLA:CPU fuses it into the pass over the logits.
    lse = jnp.maximum(lse, jnp.finfo(lse.dtype).min)
    return jnp.exp(x - lse[..., None])


def _class_row(w: jax.Array, x: jax.Array) -> jax.Array:
    """Per-class weights [K] shaped to broadcast against [..., K] without rank promotion."""
    return w if w.ndim == 0 else w.reshape((1,) * (x.ndim - 1) + w.shape)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


def _softcap_grad(x: jax.Array, cap: float | None) -> jax.Array | None:
    if cap is None:
        return None
    t = jnp.tanh(x / cap)
    return 1 - t * t


# --- integer labels: per-example statistics with a custom VJP ----------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _int_stats(logits, labels, class_weights, mask, cap, dtype, with_s=True, fast=False):
    """(lse, target logit, sum_c w_c x_c) over included classes; logits [B, K] any float dtype.

    With ``with_s=False`` (no label smoothing) the third statistic is a constant 0 and the
    backward pass skips its term, which XLA cannot drop by itself (0 * x is not 0 for IEEE).
    With ``fast`` (no mask) the lse is :func:`_lse_flagged`'s: NaN for rows it cannot serve.
    """
    x = _softcap(logits.astype(dtype), cap)
    inc = _included(x, mask)
    # The target logit is gathered before the cast (exact), so the cast copy has one reader;
    # labels are already clipped into range, so the gather needs no out-of-bounds select.
    # The barrier keeps XLA from materialising the cast (a bf16 -> f32 copy of the logits,
    # 512 MiB at 4096 x 32768) when the gather sits next to the exp-sum kernel.
    src = jax.lax.optimization_barrier(logits) if cap is None else x
    xt = jnp.take_along_axis(src, labels[..., None], axis=-1, mode="clip")[..., 0].astype(dtype)
    if mask is not None:
        lse = _masked_lse(x, inc)
    elif fast:
        # Repaired here, on the per-example vector, rather than after the reduction as the
        # soft-label loss does: the integer-label assembly decides from the lse which rows
        # count (a row with no class left) and differentiates z lse^2, so its gradient would
        # differ if it saw a flagged NaN.
        lse = _repair_lse(_lse_flagged(x), logits, dtype, cap)
    else:
        lse = _lse_unmasked(x, logits if cap is None else None)
    if not with_s:
        return lse, xt, jnp.zeros_like(lse)
    w = jnp.ones((), dtype) if class_weights is None else _class_row(class_weights, x)
    s = jnp.sum(jnp.where(inc, x * w, 0), axis=-1)
    return lse, xt, s


def _int_stats_fwd(logits, labels, class_weights, mask, cap, dtype, with_s, fast):
    out = _int_stats(logits, labels, class_weights, mask, cap, dtype, with_s, fast)
    # Residuals: the logits as given (bf16 stays bf16) and one lse per example; the softmax
    # is recomputed in the backward pass rather than stored.
    return out, (logits, labels, class_weights, mask, out[0])


def _int_stats_bwd(cap, dtype, with_s, fast, res, g):
    del fast  # the saved lse is exact either way
    logits, labels, class_weights, mask, lse = res
    # A cast of the logits shared with the forward pass would be materialised (bf16 inputs),
    # and so would the lse broadcast to [B, K] if CSE merged it with the forward's.
    logits, lse = jax.lax.optimization_barrier((logits, lse))
    g_lse, g_xt, g_s = g
    x = _softcap(logits.astype(dtype), cap)
    inc = _included(x, mask)
    p = _softmax_unmasked(x, lse) if mask is None else _softmax_from_lse(x, lse, inc)
    onehot = jax.lax.broadcasted_iota(labels.dtype, x.shape, x.ndim - 1) == labels[..., None]
    w = jnp.ones((), dtype) if class_weights is None else _class_row(class_weights, x)
    dx = g_lse[..., None] * p + jnp.where(onehot, g_xt[..., None], 0)
    if with_s:
        dx = dx + jnp.where(inc, g_s[..., None] * w, 0)
    dcap = _softcap_grad(logits.astype(dtype), cap)
    if dcap is not None:
        dx = dx * dcap
    dw = None
    if class_weights is not None and not with_s:
        dw = jnp.zeros_like(class_weights)  # the weights enter only through the constant s = 0
    elif class_weights is not None:
        dw = jnp.sum(jnp.where(inc, g_s[..., None] * x, 0).reshape(-1, x.shape[-1]), axis=0)
        dw = dw.astype(class_weights.dtype)
    dmask = None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0)
    dlabels = jnp.zeros(labels.shape, jax.dtypes.float0)
    return dx.astype(logits.dtype), dlabels, dw, dmask


_int_stats.defvjp(_int_stats_fwd, _int_stats_bwd)


def loss_from_stats(
    lse: jax.Array,
    target_logit: jax.Array,
    weighted_logit_sum: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    num_included: jax.Array | int,
    included_weight_sum: jax.Array | int,
    target_weight: jax.Array | None,
    ignore_index: int | None,
    label_smoothing: float,
    z_loss: float,
    weights: jax.Array | None,
    where: jax.Array | None,
    reduction: str,
) -> jax.Array:
    """Assembles the integer-label loss from per-example softmax statistics.

    ``loss = (1-e) w_y (lse - x_y) + (e / K_eff) (W lse - sum_c w_c x_c) + z lse^2``, then
    ignore_index, out-of-range labels (NaN), ``where``, ``weights`` and the reduction.
    Shared by the materialised, fused-linear and vocabulary-parallel losses.
    """

    def kept(lse):
        has_classes = (jnp.asarray(num_included) > 0) & (lse > -jnp.inf)
        keep = has_classes
        if ignore_index is not None:
            keep = keep & (labels != ignore_index)
        if where is not None:
            keep = keep & where
        return has_classes, keep

    has_classes, keep = kept(lse)
    count = None
    if reduction == "mean" and target_weight is None and jnp.ndim(lse):
        # The mean's denominator first. Adding 0 * count (a finite number of rows) changes no
        # lse but makes the loss terms wait for the count, and recomputing the row masks from
        # that lse keeps them out of CSE: XLA then needs one per-example buffer at a time
        # (the count's, then the terms'), not three alive together.
        count = jnp.sum(keep, dtype=lse.dtype)
        lse = lse + 0 * jax.lax.stop_gradient(count)
        has_classes, keep = kept(lse)
    in_range = (labels >= 0) & (labels < num_classes)
    # Rows with no class have lse = -inf: replace before any arithmetic so that their
    # (zero) cotangent never meets an infinity.
    lse = jnp.where(has_classes, lse, 0)
    tw = jnp.ones((), lse.dtype) if target_weight is None else target_weight
    loss = (1 - label_smoothing) * tw * (lse - target_logit) if label_smoothing != 1 else 0.0
    if label_smoothing:
        k = jnp.where(has_classes, num_included, 1).astype(lse.dtype)
        smooth = (included_weight_sum * lse - weighted_logit_sum) / k
        loss = loss + label_smoothing * smooth
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = jnp.where(keep, loss, 0)
    nan = jnp.asarray(jnp.nan, lse.dtype)
    loss = jnp.where(in_range | ~keep, loss, nan)
    if count is not None:  # reduce_loss's mean, with the count taken above
        return safe_divide(reduce_loss(loss, reduction="sum", weights=weights, where=keep), count)
    return reduce_loss(
        loss,
        reduction=reduction,
        weights=weights,
        where=keep,
        denominator_weights=target_weight,
    )


def _check_logits_labels(logits, labels, axes, integer: bool, axis):
    shape = jnp.shape(logits)
    axis_txt = axis if isinstance(axis, int) else tuple(axis)
    if integer:
        bshape = _batch_shape(shape, axes)
        _checks.check_shape(
            "labels", labels, bshape, f"to match logits {tuple(shape)} without axis {axis_txt}"
        )
    else:
        _checks.check_shape("labels", labels, shape, f"to match logits {tuple(shape)}")


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | Sequence[int] = -1,
    weights: ArrayLike | None = None,
    class_weights: ArrayLike | None = None,
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    where: ArrayLike | None = None,
    reduction: str = "mean",
    axis_name: str | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy with integer class labels, as ``torch.nn.functional.cross_entropy``.

    With :math:`\ell_n = \log\sum_c e^{x_{nc}}` (the log-sum-exp), :math:`w` the class
    weights and :math:`e` the label smoothing over :math:`K` classes:

    .. math::
        L_n = (1 - e)\, w_{y_n} (\ell_n - x_{n y_n})
              + \frac{e}{K} \sum_c w_c (\ell_n - x_{nc}) + z\, \ell_n^2

    ``reduction="mean"`` divides the sum by the number of non-ignored examples, or by
    :math:`\sum_n w_{y_n}` with ``class_weights``, exactly as PyTorch does. With
    ``logit_softcap=c`` the logits are first replaced by :math:`c \tanh(x / c)`.

    A logit of ``-inf`` (or False in a logits-shaped ``where``) removes that class from
    the softmax and from the smoothing term (K counts the remaining classes); its
    gradient is exactly 0. An example with no class left has loss 0 and zero gradient.
    A label outside ``[0, K)`` that is not ``ignore_index`` makes that example's loss NaN;
    under ``jax.experimental.checkify`` it is reported as an error.

    The backward pass saves only the logits and one log-sum-exp per example.

    Args:
      logits: float array ``[..., K, ...]``; bf16/fp16 computed in float32.
      labels: integer array of the logits' shape without the class axes.
      axis: the class axis, or a tuple of axes flattened (row-major) into one class axis.
      weights: optional per-example multiplier, broadcastable to ``labels``.
      class_weights: optional ``[K]`` weight per class (PyTorch's ``weight``).
      ignore_index: label value whose examples are excluded (``None`` for none).
      label_smoothing: e in [0, 1].
      z_loss: coefficient of the :math:`\ell^2` auxiliary loss (PaLM).
      logit_softcap: optional c > 0 for Gemma-style soft-capping.
      where: optional boolean mask, per example (labels' shape) or per logit (logits' shape).
      reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-example losses).
      axis_name: mesh axis over which the class axis is sharded (vocabulary parallel).

    Returns:
      A float32 scalar, or the per-example losses for ``"none"``.

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> logits = jnp.array([[2.0, 0.0, -jnp.inf], [0.0, 1.0, 0.0]])
      >>> jbce.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, -100]))
      Array(0.126928..., dtype=float32)
    """
    _checks.check_float("logits", logits)
    _checks.check_integer_labels("labels", labels)
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    axes = _checks.canonical_axes(axis, logits.ndim)
    _check_logits_labels(logits, labels, axes, integer=True, axis=axis)
    bshape = labels.shape
    dt = _checks.compute_dtype(logits, weights, class_weights)
    logit_mask, ex_where = _split_where(where, logits.shape, axes, bshape)
    x = _to_rows(logits, axes)
    k = x.shape[-1]
    if weights is not None:
        _checks.check_broadcastable("weights", weights, "labels", bshape)
        weights = _checks.as_float(weights, dt)
    cw = None
    if class_weights is not None:
        _checks.check_shape("class_weights", class_weights, (k,), "(one weight per class)")
        cw = _checks.as_float(class_weights, dt)
    if axis_name is not None:
        # Labels are global class ids: K = K_local x the axis size.
        from jbce import _parallel

        num_shards = jax.lax.psum(1, axis_name)
        _checks.debug_check_labels("labels", labels, k * num_shards, ignore_index)
        return _parallel.sharded_integer_ce(
            x, labels, axis_name=axis_name, class_weights=cw, mask=logit_mask,
            cap=logit_softcap, dtype=dt, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss, weights=weights,
            where=ex_where, reduction=reduction,
        )  # fmt: skip
    _checks.debug_check_labels("labels", labels, k, ignore_index)
    if cw is not None:
        cw = pvary_like(cw, x)
    safe_labels = jnp.clip(labels, 0, max(k - 1, 0))
    # The fast path's lse is repaired inside _int_stats, so no check after the reduction.
    fast = logit_mask is None and x.size >= _reduce.SOFTMAX_FAST_PATH_MIN_SIZE
    lse, xt, s = _int_stats(
        x, safe_labels, cw, logit_mask, logit_softcap, dt, bool(label_smoothing), fast
    )
    num_inc, w_sum = _included_counts(x, logit_mask, cw, label_smoothing, dt)
    target_w = None if cw is None else cw[safe_labels]
    ex_mask = ex_where
    if logit_mask is not None:
        has = jnp.any(logit_mask, axis=-1)
        ex_mask = has if ex_mask is None else ex_mask & has
    return loss_from_stats(
        lse, xt, s, labels,
        num_classes=k, num_included=num_inc, included_weight_sum=w_sum,
        target_weight=target_w, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, weights=weights,
        where=ex_mask, reduction=reduction,
    )  # fmt: skip


def _included_counts(x, mask, cw, label_smoothing, dt):
    """(K_eff, W) per example: classes left after masking, and their summed class weight."""
    k = x.shape[-1]
    if not label_smoothing and mask is None:
        # Only needed to tell rows with no class left; -inf logits alone cannot empty a row
        # unless every logit is -inf, which the lse already reports.
        return jnp.full(x.shape[:-1], k), k
    inc = _included(x.astype(dt), mask)
    num = jnp.sum(inc, axis=-1)
    if cw is None:
        return num, num.astype(dt)
    return num, jnp.sum(jnp.where(inc, _class_row(cw, x), 0), axis=-1)


# --- probability targets -----------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _soft_ce(logits, labels, mask, dtype, fast=False):
    """sum_c y_c (lse - x_c) over included classes; logits [B, K], labels [B, K].

    With ``fast`` (no mask): the flagged one-pass lse and the plain ``y (lse - x)``, fused
    by XLA into one kernel with the reduction; NaN for a row the flagged lse cannot serve
    and for a zero label on a -inf logit (0 * inf), to be recomputed by the caller.
    """
    return _soft_ce_and_lse(logits, labels, mask, dtype, fast)[0]


def _soft_ce_and_lse(logits, labels, mask, dtype, fast):
    """(per-example loss, lse): the forward computation shared by the primal and its rule.

    ``labels`` may be in another float dtype than ``dtype``; they are cast here, inside the
    kernels that read them, so no cast copy is materialised. The exp-sum and the y pass
    each cast the logits themselves: when XLA runs them as two kernels (as it does when the
    lse is also a residual, or for some shapes) one cast read by both would be materialised.
    """
    x = logits.astype(dtype)
    y = labels.astype(dtype)
    if mask is not None:
        inc = _included(x, mask)
        lse = _masked_lse(x, inc)
        return _soft_ce_from_lse(x, y, mask, inc, lse), lse
    if fast:
        lse = _lse_flagged(x)
        x = jax.lax.optimization_barrier(logits).astype(dtype)
        return jnp.sum(y * (lse[..., None] - x), axis=-1), lse
    lse = _lse_unmasked(x, logits)
    # The y pass casts its own copy: one cast read by two passes would be materialised.
    x2 = jax.lax.optimization_barrier(logits).astype(dtype)
    return _soft_ce_unmasked(x2, y, lse), lse


def _soft_ce_unmasked(x, y, lse):
    """_soft_ce_from_lse without a mask and without compare/select on the N x K path.

    A -inf logit enters as -FLT_MAX (so a zero label gives exactly 0) and u / (1 - u) adds
    +inf exactly where a label is positive on a -inf logit (u = 1) and 0 elsewhere (u = 0).
    """
    one = jax.lax.optimization_barrier(jnp.ones((), x.dtype))  # not CSE'd with the backward
    fmax = jnp.finfo(x.dtype).max
    lse_r = jnp.maximum(lse, -fmax)  # an all -inf row: -fmax, which its -fmax logits cancel
    u = jnp.sign(y) * jnp.sign(jnp.maximum(-x - fmax, 0))
    term = y * (lse_r[..., None] - jnp.maximum(x, -fmax)) + u / (one - u)
    return jnp.sum(term, axis=-1)


def _soft_ce_from_lse(x, y, mask, inc, lse):
    # Included classes: y (lse - x). A -inf logit that is not masked contributes 0 when its
    # label is 0 and +inf otherwise (a target on an impossible class).
    term = jnp.where(inc, y * (lse[..., None] - x), 0)
    impossible = (x == -jnp.inf) & (y != 0)
    if mask is not None:
        impossible = impossible & mask
    loss = jnp.sum(term, axis=-1)
    return jnp.where(jnp.any(impossible, axis=-1), jnp.inf, loss)


def _soft_ce_fwd(logits, labels, mask, dtype, fast):
    loss, lse = _soft_ce_and_lse(logits, labels, mask, dtype, fast)
    # Residuals: the logits, the labels (inputs) and one lse per example.
    return loss, (logits, labels, mask, lse)


def _soft_ce_bwd(dtype, fast, res, g):
    logits, labels, mask, lse = res
    # Casts shared with the forward pass would be materialised (bf16 inputs), and so would
    # the lse broadcast to [B, K] if CSE merged it with the forward's.
    logits, labels, lse = jax.lax.optimization_barrier((logits, labels, lse))
    if fast:
        lse = _repair_lse(lse, logits, dtype)
    x = logits.astype(dtype)
    y = labels.astype(dtype)
    inc = _included(x, mask)
    gx = g[..., None]
    if mask is None:
        # Select-free: exp(-inf - lse) is 0, so a -inf logit with label 0 gets exactly 0
        # (_softmax_unmasked already replaces the lse of an all -inf row by -FLT_MAX).
        p = _softmax_unmasked(x, lse)
        dx = gx * (jnp.sum(y, axis=-1, keepdims=True) * p - y)
    else:
        p = _softmax_from_lse(x, lse, inc)
        ysum = jnp.sum(jnp.where(inc, y, 0), axis=-1, keepdims=True)
        dx = jnp.where(inc, gx * (ysum * p - y), 0)
    has = jnp.isfinite(lse)[..., None]
    dy = jnp.where(inc & has, gx * (jnp.where(has, lse[..., None], 0) - x), 0)
    dmask = None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0)
    return dx.astype(logits.dtype), dy.astype(labels.dtype), dmask


_soft_ce.defvjp(_soft_ce_fwd, _soft_ce_bwd)


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | Sequence[int] = -1,
    weights: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    where: ArrayLike | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Softmax cross-entropy against probability targets (soft labels).

    .. math::
        L_n = -\sum_c \tilde y_{nc} \log \mathrm{softmax}(x_n)_c, \qquad
        \tilde y = (1 - e)\, y + e / K

    Equals ``torch.nn.functional.cross_entropy`` with probability targets (and its
    ``label_smoothing``), and with ``reduction="none"`` optax's
    ``softmax_cross_entropy`` (including ``axis`` tuples and a logits-shaped ``where``,
    which takes classes out of the softmax). A ``-inf`` logit whose label is 0 contributes
    nothing and gets exactly zero gradient. ``"mean"`` divides by the number of included
    examples.

    Args:
      logits: float array ``[..., K, ...]``; bf16/fp16 computed in float32.
      labels: target distributions, same shape as ``logits``.
      axis: class axis or tuple of class axes.
      weights: optional per-example multiplier (the logits' batch shape).
      label_smoothing: e in [0, 1], spread uniformly over the included classes.
      where: optional boolean mask, per example or per logit.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
      A float32 scalar, or the per-example losses for ``"none"``.

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> jbce.softmax_cross_entropy(jnp.array([[2.0, 0.0]]), jnp.array([[0.75, 0.25]]))
      Array(0.626928..., dtype=float32)
    """
    _checks.check_float("logits", logits)
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    axes = _checks.canonical_axes(axis, logits.ndim)
    _check_logits_labels(logits, labels, axes, integer=False, axis=axis)
    bshape = _batch_shape(logits.shape, axes)
    dt = _checks.compute_dtype(logits, labels, weights)
    logit_mask, ex_where = _split_where(where, logits.shape, axes, bshape)
    x = _to_rows(logits, axes)
    # Float labels keep their dtype: the core casts them inside its kernels.
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = _checks.as_float(labels, dt)
    y = _to_rows(labels, axes)
    _checks.debug_check_unit_interval("labels", y.astype(dt))
    if weights is not None:
        _checks.check_broadcastable("weights", weights, "the logits' batch shape", bshape)
        weights = _checks.as_float(weights, dt)
    if label_smoothing:
        inc = _included(x.astype(dt), logit_mask)
        k = jnp.maximum(jnp.sum(inc, axis=-1, keepdims=True), 1).astype(dt)
        y = y.astype(dt)
        y = jnp.where(inc, y * (1 - label_smoothing) + label_smoothing / k, y)
    y = pvary_like(y, x)

    def total(fast, x, y, logit_mask, weights, ex_where):
        loss = _soft_ce(x, y, logit_mask, dt, fast).reshape(bshape)
        if logit_mask is not None:
            has = jnp.any(logit_mask, axis=-1).reshape(bshape)
            ex_where = has if ex_where is None else ex_where & has
        return reduce_loss(loss, reduction=reduction, weights=weights, where=ex_where)

    operands = (x, y, logit_mask, weights, ex_where)
    use_fast = logit_mask is None and x.size >= _reduce.SOFTMAX_FAST_PATH_MIN_SIZE
    return fast_or_exact(total, operands, use_fast=use_fast)
