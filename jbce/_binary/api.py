"""Binary cross-entropy losses: from logits, from probabilities, and focal loss.

Each loss has an elementwise core with hand-written derivatives
(:func:`jbce._core.autodiff.lean_jvp`: forward mode, and reverse mode as its transpose). The
cores save only their inputs for reverse mode (no sigmoid or log-probability tensors are kept
for the backward pass), stay exact for any finite logit, and give finite gradients for infinite
logits. Options that are plain arithmetic on the result (label smoothing, ``alpha``) are applied
outside the cores, so they may be traced and differentiate for free. Weights, masks and
reductions are applied by :mod:`jbce._core.reduce`. On XLA:CPU the sigmoid BCE core's value
comes from :mod:`jbce._binary.xla_cpu` (the same numbers, fused into one kernel), chosen when
the program is lowered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jbce._binary import xla_cpu
from jbce._core import autodiff, checks
from jbce._core.dtypes import compute_dtype, to_compute
from jbce._core.math import (
    GRAD_EPS,
    clamped_log,
    clamped_log1p,
    neg_abs,
    pow_slope_times,
    safe_pow,
    sigmoid_pair,
    softplus_pair,
    xmul,
)
from jbce._core.reduce import reduce_loss
from jbce._core.sharding import pvary_like


# --- sigmoid BCE core: l = a softplus(-x) + b softplus(x), a = pw y, b = 1 - y -------------
def _bce_logits_value(x, y, pw, keep, dtype):
    """The loss per element (compute dtype) for inputs of one shape in any float dtypes.

    With ``softplus(+-x) = relu(+-x) + log1p(exp(-|x|))``: one exp/log1p pair per element,
    no cancellation (each linear term is nonzero for one sign of ``x`` only), and a zero
    coefficient switches its term off, so an infinite logit whose hard label agrees costs 0.
    ``keep`` (the elements the loss uses, or None) only masks the derivatives.
    """
    del keep
    # XLA:CPU gets the same numbers without a select (jbce._binary.xla_cpu), chosen when the
    # program is lowered: one fused kernel and no temporary instead of three and two.
    return jax.lax.platform_dependent(
        x, y, pw,
        cpu=lambda *a: xla_cpu.bce_logits_value(*a, dtype),
        default=lambda *a: _bce_logits_formula(*_inputs(dtype, *a)),
    )  # fmt: skip


def _bce_logits_formula(x, y, pw):
    """The loss per element for ``x, y, pw`` in the compute dtype, on GPU and TPU."""
    a = y if pw is None else pw * y
    b = 1 - y
    t = jnp.log1p(jnp.exp(-jnp.abs(x)))
    return xmul(a, jnp.maximum(-x, 0)) + xmul(b, jnp.maximum(x, 0)) + (a + b) * t


def _inputs(dtype, *xs):
    """The core's inputs in the compute ``dtype``, cast inside the core so that its residuals
    are the caller's arrays (a bf16 -> f32 copy of the logits is never saved)."""
    return tuple(None if x is None else to_compute(x, dtype) for x in xs)


def _elementwise_tangent(keep, pairs, ndim):
    """``sum_i c_i * dot a_i`` for the (coefficient, tangent) ``pairs`` of an elementwise core,
    the coefficients exactly 0 outside ``keep``."""
    terms = [autodiff.contract(autodiff.keep_where(keep, c), t, ndim) for c, t in pairs]
    c0 = pairs[0][0]
    return autodiff.total(c0.shape, c0.dtype, *terms)


def _bce_logits_tangent(primals, _, tangents, dtype):
    x0, y0, pw0, keep = primals
    dx, dy, dpw, _ = tangents
    x, y, pw = _inputs(dtype, x0, y0, pw0)
    # d/dx = (1 - y) sigmoid(x) - a sigmoid(-x), a = pw y. With s = sigmoid(-|x|) (one
    # logistic, accurate in the tail) and k = 1 - y + a this is (1 - y) - k s for x >= 0 and
    # k s - a for x < 0: each form is exact where the gradient is tiny (an agreeing label),
    # and exactly 1 - y or -a for x = +-inf.
    s = jax.nn.sigmoid(neg_abs(x))
    a = y if pw is None else pw * y
    k = (1 - y + a) * s
    cx = jnp.where(x >= 0, (1 - y) - k, k - a)
    pairs = [(cx, dx)]
    if dy is not None or dpw is not None:
        sp_pos, sp_neg = softplus_pair(x)
        # d/dy = pw softplus(-x) - softplus(x); d/dpw = y softplus(-x)
        pairs.append(((sp_neg if pw is None else pw * sp_neg) - sp_pos, dy))
        if pw is not None:
            pairs.append((xmul(y, sp_neg), dpw))
    return _elementwise_tangent(keep, pairs, x.ndim)


# Residuals in reverse mode: the inputs only.
_bce_logits = autodiff.lean_jvp(_bce_logits_value, _bce_logits_tangent, num_static=1)


def _like_logits(x: jax.Array, *args: jax.Array | None) -> tuple[jax.Array | None, ...]:
    """The core's other inputs broadcast to ``x``'s shape and marked as varying over the
    mesh axes ``x`` varies on.

    Inside ``shard_map`` an input replicated over an axis (a scalar gamma, the constant labels
    of the GAN losses) gets a per-shard cotangent from the core's backward pass; casting it to
    varying first lets autodiff sum those cotangents (the transpose of the cast). A no-op
    outside ``shard_map``.
    """
    return tuple(None if a is None else pvary_like(jnp.broadcast_to(a, x.shape), x) for a in args)


def _smooth(labels: jax.Array, label_smoothing) -> jax.Array:
    if checks.is_zero(label_smoothing):
        return labels
    return labels * (1 - label_smoothing) + label_smoothing / 2


def _prepare(name_x, x, labels, weights, where, extra=()):
    """(x, labels, weights, where, compute dtype) as arrays, with shapes checked."""
    x = checks.as_array(name_x, x)
    checks.check_float(name_x, x)
    dt = compute_dtype(x, labels, weights, *extra)  # before Python scalars become arrays
    labels = checks.as_array("labels", labels)
    if not jnp.issubdtype(labels.dtype, jnp.floating) or labels.ndim == 0:
        labels = labels.astype(dt)
    shape = x.shape
    checks.check_broadcastable("labels", labels, name_x, shape)
    if weights is not None:
        checks.check_broadcastable("weights", weights, name_x, shape)
        weights = checks.as_array("weights", weights).astype(dt)
    if where is not None:
        checks.check_broadcastable("where", where, name_x, shape)
        where = checks.as_array("where", where).astype(bool)
    return x, labels, weights, where, dt


def _label_smoothing(label_smoothing):
    return checks.hyperparameter("label_smoothing", label_smoothing)


def sigmoid_binary_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    label_smoothing: float | ArrayLike = 0.0,
    where: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: float | ArrayLike | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""Binary cross-entropy from logits, exact for every logit.

    .. math::
        \ell = w \left[ p\, y \log(1 + e^{-x}) + (1 - y) \log(1 + e^{x}) \right]
             = w \left[ -p\, y \log\sigma(x) - (1 - y)\log\sigma(-x) \right]

    with :math:`p` = ``pos_weight``, computed as ``max(x, 0) + log1p(exp(-|x|))``
    so no intermediate overflows. Equals
    ``torch.nn.functional.binary_cross_entropy_with_logits(x, y, weight=w, pos_weight=p)``.
    Infinite logits give loss 0 where a hard label agrees with the sign and ``+inf``
    where it disagrees, with a finite gradient (``sigmoid(x) - y`` evaluated as 0 or +-1).
    With ``label_smoothing`` e, labels become ``y (1 - e) + e / 2``.

    Args:
      logits: float array of any shape; bf16/fp16 are computed in float32.
      labels: targets in [0, 1] (hard or soft), broadcastable to ``logits``.
      weights: optional multiplier of each element's loss, broadcastable to ``logits``.
      pos_weight: optional weight of the positive term (PyTorch's ``pos_weight``),
        broadcastable to ``logits`` (typically one value per class, shape ``(C,)``).
      label_smoothing: e in [0, 1]; a Python number or a scalar array (a jit argument).
      where: optional boolean mask; False excludes an element from numerator and denominator.
      reduction: ``"mean"`` (over included elements), ``"sum"`` or ``"none"``.
      normalizer: optional denominator of ``"mean"`` in place of the included count (for
        gradient accumulation: the whole batch's count, so the micro-batch losses and
        their gradients add up to the whole batch's mean; see :ref:`gradient-accumulation`).
      batch_axis_name: optional mesh axis the batch is sharded on, inside ``shard_map``
        or ``pmap``: ``"sum"`` and ``"mean"`` are then over the global batch.

    Returns:
      A float32 (float64 for float64 input) scalar, or ``logits``'s shape for ``"none"``.

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> x, y = jnp.array([2.0, -1e30]), jnp.array([1.0, 0.0])
      >>> jbce.sigmoid_binary_cross_entropy(x, y)
      Array(0.06346..., dtype=float32)
    """
    x, y, weights, where, dt = _prepare("logits", logits, labels, weights, where, (pos_weight,))
    checks.check_reduction(reduction)
    e = _label_smoothing(label_smoothing)
    pw = None
    if pos_weight is not None:
        pw = checks.as_array("pos_weight", pos_weight)
        checks.check_broadcastable("pos_weight", pw, "logits", x.shape)
        if pw.ndim == 0 or not jnp.issubdtype(pw.dtype, jnp.floating):
            pw = pw.astype(dt)
    checks.debug_check_unit_interval("labels", y)
    y, pw = _like_logits(x, _smooth(y, e), pw)
    loss = _bce_logits(x, y, pw, where, jnp.dtype(dt))
    return reduce_loss(
        loss,
        reduction=reduction,
        weights=weights,
        where=where,
        normalizer=normalizer,
        batch_axis_name=batch_axis_name,
    )


# --- BCE from probabilities, PyTorch semantics (log clamped at -100) --------------------------
def _clamped_logs(p):
    return clamped_log(p), clamped_log1p(-p)


def _bce_probs_value(p, y, keep):
    del keep  # masks the derivatives only
    log_p, log_q = _clamped_logs(p)
    return -(y * log_p + (1 - y) * log_q)


def _bce_probs_tangent(primals, _, tangents):
    p, y, keep = primals
    dp, dy, _ = tangents
    # PyTorch's rule: (p - y) / max(p (1 - p), eps), finite at p = 0 and p = 1.
    pairs = [((p - y) / jnp.maximum(p * (1 - p), GRAD_EPS), dp)]
    if dy is not None:
        log_p, log_q = _clamped_logs(p)
        pairs.append((log_q - log_p, dy))
    return _elementwise_tangent(keep, pairs, p.ndim)


# Residuals in reverse mode: the inputs only.
_bce_probs = autodiff.lean_jvp(_bce_probs_value, _bce_probs_tangent)


def binary_cross_entropy(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    label_smoothing: float | ArrayLike = 0.0,
    where: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: float | ArrayLike | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""Binary cross-entropy from probabilities, as ``torch.nn.functional.binary_cross_entropy``.

    .. math::
        \ell = -w \left[ y \max(\log p, -100) + (1 - y) \max(\log(1 - p), -100) \right]

    The log terms are clamped at -100 as in PyTorch, so p = 0 or 1 gives a finite loss;
    the gradient is PyTorch's ``w (p - y) / max(p (1 - p), 1e-12)``, finite at p = 0 and 1,
    and the clamped logs differentiate as ``1 / max(p, 1e-12)`` by the same convention, so
    the second derivatives (the ``labels`` x ``probs`` terms) are finite there too.
    Prefer :func:`sigmoid_binary_cross_entropy` on logits when you have them: it is exact
    where probabilities have already rounded to 0 or 1.

    Args:
      probs: probabilities in [0, 1], float array of any shape.
      labels: targets in [0, 1], broadcastable to ``probs``.
      weights: optional multiplier of each element's loss.
      label_smoothing: e in [0, 1]; labels become ``y (1 - e) + e / 2``.
      where: optional boolean mask; False excludes an element entirely.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      normalizer: optional denominator of ``"mean"`` in place of the included count (for
        gradient accumulation: the whole batch's count, so the micro-batch losses and
        their gradients add up to the whole batch's mean; see :ref:`gradient-accumulation`).
      batch_axis_name: optional mesh axis the batch is sharded on, inside ``shard_map``
        or ``pmap``: ``"sum"`` and ``"mean"`` are then over the global batch.

    Returns:
      A float32 scalar, or ``probs``'s shape for ``"none"``.

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> p, y = jnp.array([0.9, 0.0]), jnp.array([1.0, 1.0])
      >>> jbce.binary_cross_entropy(p, y, reduction="none")
      Array([  0.10536...,  100.   ], dtype=float32)
    """
    p, y, weights, where, dt = _prepare("probs", probs, labels, weights, where)
    checks.check_reduction(reduction)
    e = _label_smoothing(label_smoothing)
    p = to_compute(p, dt)
    y = to_compute(y, dt)
    checks.debug_check_unit_interval("probs", p)
    checks.debug_check_unit_interval("labels", y)
    (y,) = _like_logits(p, _smooth(y, e))
    loss = _bce_probs(p, y, where)
    return reduce_loss(
        loss,
        reduction=reduction,
        weights=weights,
        where=where,
        normalizer=normalizer,
        batch_axis_name=batch_axis_name,
    )


# --- focal loss: l = ce(x, y) * m^gamma, m = 1 - p_t = y sigmoid(-x) + (1 - y) sigmoid(x) ------
def _focal_parts(x, y):
    s_pos, s_neg = sigmoid_pair(x)
    sp_pos, sp_neg = softplus_pair(x)
    ce = xmul(y, sp_neg) + xmul(1 - y, sp_pos)
    m = y * s_neg + (1 - y) * s_pos
    return s_pos, s_neg, sp_pos, sp_neg, ce, m


def _focal_value(x, y, gamma, keep, dtype):
    del keep  # masks the derivatives only
    x, y, gamma = _inputs(dtype, x, y, gamma)
    *_, ce, m = _focal_parts(x, y)
    return xmul(ce, safe_pow(m, gamma))


def _focal_tangent(primals, _, tangents, dtype):
    x0, y0, gamma0, keep = primals
    dx0, dy0, dgamma0, _ = tangents
    x, y, gamma = _inputs(dtype, x0, y0, gamma0)
    s_pos, s_neg, sp_pos, sp_neg, ce, m = _focal_parts(x, y)
    # d/dx = ce_x m^g + g ce m^g (m_x / m) and d/dy = -x m^g + g ce m^(g-1) m_y, with m^g,
    # m_x / m (bounded by 1) and ce m^(g-1) written from log m, never as quotients by m: the
    # derivatives of these coefficients (the loss's second derivatives) are then O(1 / m)
    # at most, where a quotient's derivative would hold 1 / m^2, which overflows float32 for
    # 1 - p_t ~ 1e-22 (|x| = 50, gamma < 1: NaN). Where m is below the smallest normal float
    # (a hard label agreeing with |x| > 87 in float32, or an infinite logit) it is taken as
    # its limit 0: m^g is 0^g and the terms in g m^(g-1) vanish.
    zero = jnp.zeros((), m.dtype)
    ok = m >= jnp.finfo(m.dtype).tiny  # False for NaN
    log_m = jnp.log(jnp.where(ok, m, 1))
    mg = jnp.where(ok, jnp.exp(gamma * log_m), safe_pow(jnp.where(ok, 1, m * 0), gamma))
    # m_x / m = (1 - 2y) sigmoid(x) sigmoid(-x) / m
    ratio = jnp.where(ok, (1 - 2 * y) * jnp.exp(-(sp_pos + sp_neg) - log_m), zero)
    dce = (1 - y) * s_pos - y * s_neg
    pairs = [(dce * mg + xmul(gamma * ratio, xmul(ce, mg)), dx0)]
    if dy0 is not None:
        # d/dy: ce' = softplus(-x) - softplus(x) = -x, m' = sigmoid(-x) - sigmoid(x).
        c = ok & jnp.isfinite(ce)  # an infinite ce (infinite logit) is in the -x m^g term
        slope = jnp.where(c, pow_slope_times(jnp.where(c, ce, 0), log_m, gamma), zero)
        pairs.append((xmul(mg, -x) + (s_neg - s_pos) * slope, dy0))
    if dgamma0 is not None:
        pairs.append((xmul(xmul(ce, mg), log_m), dgamma0))
    return _elementwise_tangent(keep, pairs, x.ndim)


# Residuals in reverse mode: the inputs only.
_focal = autodiff.lean_jvp(_focal_value, _focal_tangent, num_static=1)


def sigmoid_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: float | ArrayLike | None = None,
    gamma: float | ArrayLike = 2.0,
    weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: float | ArrayLike | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""Sigmoid focal loss (Lin et al., 2017), the form of torchvision's ``sigmoid_focal_loss``.

    .. math::
        \ell = \alpha_t\, (1 - p_t)^{\gamma}\, \mathrm{BCE}(x, y), \quad
        1 - p_t = y\,\sigma(-x) + (1 - y)\,\sigma(x), \quad
        \alpha_t = \alpha y + (1 - \alpha)(1 - y)

    :math:`1 - p_t` is computed from both sigmoid tails, never as ``1 - sigmoid``, and the
    gradient and the second derivatives stay finite for every ``gamma >= 0`` (``gamma < 1``
    included) at extreme logits; where :math:`1 - p_t` is below the smallest normal float
    (a hard label agreeing with a logit beyond about 87 in float32) it is taken as 0.
    ``alpha=None`` means no class balancing (torchvision's ``alpha=-1``).

    Args:
      logits: float array of any shape.
      labels: targets in [0, 1], broadcastable to ``logits``.
      alpha: optional weight of the positive class in [0, 1]; a number or a scalar array.
      gamma: focusing exponent >= 0 (0 gives plain BCE); a number or a scalar array.
      weights: optional multiplier of each element's loss.
      where: optional boolean mask; False excludes an element entirely.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      normalizer: optional denominator of ``"mean"`` in place of the included count (for
        gradient accumulation: the whole batch's count, so the micro-batch losses and
        their gradients add up to the whole batch's mean; see :ref:`gradient-accumulation`).
      batch_axis_name: optional mesh axis the batch is sharded on, inside ``shard_map``
        or ``pmap``: ``"sum"`` and ``"mean"`` are then over the global batch.

    Returns:
      A float32 scalar, or ``logits``'s shape for ``"none"``.

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> x, y = jnp.array([3.0, -2.0]), jnp.array([1.0, 1.0])
      >>> jbce.sigmoid_focal_loss(x, y, alpha=0.25)
      Array(0.2062..., dtype=float32)
    """
    x, y, weights, where, dt = _prepare("logits", logits, labels, weights, where)
    checks.check_reduction(reduction)
    gamma = checks.hyperparameter("gamma", gamma)
    if alpha is not None:
        alpha = checks.hyperparameter("sigmoid_focal_loss:alpha", alpha)
    checks.debug_check_unit_interval("labels", y)
    y, g = _like_logits(x, y, jnp.asarray(gamma, dt))
    loss = _focal(x, y, g, where, jnp.dtype(dt))
    if alpha is not None:
        y = to_compute(y, dt)
        loss = loss * (alpha * y + (1 - alpha) * (1 - y))
    return reduce_loss(
        loss,
        reduction=reduction,
        weights=weights,
        where=where,
        normalizer=normalizer,
        batch_axis_name=batch_axis_name,
    )
