"""Binary cross-entropy losses: from logits, from probabilities, and focal loss.

Each loss has an elementwise core with a hand-written ``jax.custom_vjp``. The cores
take and save only their inputs (no sigmoid or log-probability tensors are kept for
the backward pass), stay exact for any finite logit, and give finite gradients for
infinite logits. Weights, masks and reductions are applied by :mod:`jbce._reduce`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jbce import _checks
from jbce._reduce import reduce_fast_or_exact, reduce_loss
from jbce._vma import pvary_like


def _xmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a * b with 0 * inf = 0: a zero coefficient switches a term off entirely."""
    return jnp.where(a == 0, jnp.zeros((), b.dtype), a * b)


def _softplus_pair(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(softplus(x), softplus(-x)) = (-log sigmoid(-x), -log sigmoid(x)), one exp/log1p pair."""
    t = jnp.log1p(jnp.exp(-jnp.abs(x)))
    return jnp.maximum(x, 0) + t, jnp.maximum(-x, 0) + t


def _sigmoid_pair(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sigmoid(x), sigmoid(-x)), each accurate to the last bit in its own tail."""
    e = jnp.exp(-jnp.abs(x))
    big = 1 / (1 + e)
    small = e * big
    pos = x >= 0
    return jnp.where(pos, big, small), jnp.where(pos, small, big)


# --- sigmoid BCE core: l = pw * y * softplus(-x) + (1 - y) * softplus(x) -----------------------
# With t = log1p(exp(-|x|)) and softplus(+-x) = relu(+-x) + t this is
#   l = c |x| + (pw y + 1 - y) t,   c = (1 - y) for x > 0 and pw y for x < 0,
# one exp/log1p pair per element. The cores use no compare/select: XLA:CPU then fuses the
# whole elementwise chain with the reduction into one YNNPACK kernel (a select splits it
# into several kernels and materialises N-element temporaries). Branches are blended with
# h = step(x) in {0, 1/2, 1}, and 0 * inf = 0 (an infinite logit whose hard label agrees)
# is obtained by multiplying a clamped |x| and adding u / (1 - u), which is +inf exactly
# where |x| = inf and c > 0 (u = 1) and 0 elsewhere (u = 0).
def _step(x: jax.Array) -> jax.Array:
    """1 for x > 0, 0 for x < 0, 1/2 at 0 (without a select)."""
    return 0.5 + 0.5 * jnp.sign(x)


def _bce_exact(x: jax.Array, y: jax.Array, pw: jax.Array | None) -> jax.Array:
    """The loss per element (in the compute dtype), right for every logit, +-inf included."""
    # `one` is 1 hidden from XLA's CSE: a literal 1 here would be shared with the backward
    # pass of value_and_grad and materialised as an N-element broadcast.
    one = jax.lax.optimization_barrier(jnp.ones((), x.dtype))
    ax = jnp.abs(x)
    t = jnp.log1p(jnp.exp(-ax))
    a = y if pw is None else pw * y
    b = one - y
    h = _step(x)
    c = h * b + (one - h) * a  # exactly b for x > 0 and a for x < 0
    fmax = jnp.finfo(x.dtype).max
    u = jnp.sign(c) * jnp.sign(jnp.maximum(ax - fmax, 0))
    lin = c * jnp.minimum(ax, fmax) + u / (one - u)
    return lin + (t if pw is None else (a + b) * t)


def _bce_fast(x: jax.Array, y: jax.Array, pw: jax.Array | None) -> jax.Array:
    """The same loss in about half the operations; NaN for an infinite logit.

    ``relu(x) (1 - y) + relu(-x) a + (a + 1 - y) t``: each linear term is nonzero for one sign
    only, so both keep full relative accuracy (no ``relu(x) - x y`` cancellation), but an
    infinite logit whose hard label agrees gives 0 * inf = NaN. Callers detect the NaN in the
    reduced loss and recompute it with :func:`_bce_exact` (``_reduce.reduce_fast_or_exact``).
    """
    # 1 and 0 hidden from CSE, as in _bce_exact (the backward's `x >= 0` has a 0 too).
    one, zero = jax.lax.optimization_barrier((jnp.ones((), x.dtype), jnp.zeros((), x.dtype)))
    nx = -x  # shared: -|x| = min(x, -x) and relu(-x) = max(-x, 0) (one op fewer each)
    t = jnp.log1p(jnp.exp(jnp.minimum(x, nx)))
    a = y if pw is None else pw * y
    b = one - y
    lin = jnp.maximum(x, zero) * b + jnp.maximum(nx, zero) * a
    return lin + (t if pw is None else (a + b) * t)


def _bce_inputs(x, y, pw, e, dt):
    """The core's inputs in the compute dtype ``dt``, labels smoothed by ``e``.

    The casts and the smoothing happen inside the core (and again in its backward pass) so
    that its residuals are the caller's arrays: a bf16 -> f32 convert or a smoothed copy of
    the labels shared by the forward and backward kernels would be materialised.
    """
    x, y = x.astype(dt), _smooth(y.astype(dt), e)
    return x, y, (None if pw is None else pw.astype(dt))


def _bce_logits_bwd(e, dt, res, g):
    # The barrier keeps XLA from sharing subexpressions between this pass and the forward
    # pass in value_and_grad (shared ones would be materialised as N-element temporaries).
    x0, y0, pw0 = jax.lax.optimization_barrier(res)
    x, y, pw = _bce_inputs(x0, y0, pw0, e, dt)
    # d/dx = (1 - y) sigmoid(x) - a sigmoid(-x), a = pw y. With s = sigmoid(-|x|) (one
    # logistic, accurate in the tail) and k = 1 - y + a this is (1 - y) - k s for x >= 0 and
    # k s - a for x < 0: each form is exact where the gradient is tiny (an agreeing label),
    # and exactly 1 - y or -a for x = +-inf. (A select is free here: this elementwise
    # kernel ends in no reduction.)
    s = jax.nn.sigmoid(-jnp.abs(x))
    a = y if pw is None else pw * y
    k = s if pw is None else (1 - y + a) * s
    dx = g * jnp.where(x >= 0, (1 - y) - k, k - a)
    sp_pos, sp_neg = _softplus_pair(x)
    # d/dy = pw softplus(-x) - softplus(x), times dy/dy0 = 1 - e for smoothed labels
    dy = g * ((sp_neg if pw is None else pw * sp_neg) - sp_pos)
    dy = dy * (1 - e) if e else dy
    dpw = None if pw is None else _unbroadcast(g * _xmul(y, sp_neg), pw0)
    return dx.astype(x0.dtype), _unbroadcast(dy, y0), dpw


def _bce_core(value: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """``core(x, y, pw, e, dt)``: ``value`` on :func:`_bce_inputs`, with the shared backward.

    ``x``, ``y`` and ``pw`` (or None) have one shape and any float dtypes; ``e`` (label
    smoothing) and ``dt`` (compute dtype) are static. Residuals are the inputs only.
    """

    def primal(x, y, pw, e, dt):
        return value(*_bce_inputs(x, y, pw, e, dt))

    core = jax.custom_vjp(primal, nondiff_argnums=(3, 4))
    core.defvjp(lambda x, y, pw, e, dt: (primal(x, y, pw, e, dt), (x, y, pw)), _bce_logits_bwd)
    return core


_bce_logits = _bce_core(_bce_exact)
_bce_logits_fast = _bce_core(_bce_fast)


def _unbroadcast(g: jax.Array, like: jax.Array) -> jax.Array:
    """Sums a broadcast (or replicated) cotangent back to the shape and dtype of ``like``."""
    if g.shape != like.shape:
        lead = g.ndim - like.ndim
        axes = tuple(range(lead)) + tuple(
            i + lead for i, n in enumerate(like.shape) if n == 1 and g.shape[i + lead] != 1
        )
        g = jnp.sum(g, axis=axes).reshape(like.shape)
    return g.astype(like.dtype)


def _like_logits(x: jax.Array, *args: jax.Array | None) -> tuple[jax.Array | None, ...]:
    """Marks the core's other inputs as varying over the mesh axes ``x`` varies on.

    Inside ``shard_map`` an input replicated over an axis (a scalar gamma, the constant labels
    of the GAN losses) gets a per-shard cotangent from the core's backward pass; casting it to
    varying first lets autodiff sum those cotangents (the transpose of the cast). A no-op
    outside ``shard_map``.
    """
    return tuple(None if a is None else pvary_like(a, x) for a in args)


def _smooth(labels: jax.Array, label_smoothing: float) -> jax.Array:
    if label_smoothing:
        return labels * (1 - label_smoothing) + label_smoothing / 2
    return labels


def _prepare(name_x, x, labels, weights, where, extra=()):
    _checks.check_float(name_x, x)
    dt = _checks.compute_dtype(x, labels, weights, *extra)
    shape = jnp.shape(x)
    _checks.check_broadcastable("labels", labels, name_x, shape)
    if weights is not None:
        _checks.check_broadcastable("weights", weights, name_x, shape)
        weights = _checks.as_float(weights, dt)
    if where is not None:
        _checks.check_broadcastable("where", where, name_x, shape)
        where = jnp.asarray(where, bool)
    return dt, weights, where


def sigmoid_binary_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    where: ArrayLike | None = None,
    reduction: str = "mean",
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
      label_smoothing: e in [0, 1].
      where: optional boolean mask; False excludes an element from numerator and denominator.
      reduction: ``"mean"`` (over included elements), ``"sum"`` or ``"none"``.

    Returns:
      A float32 (float64 for float64 input) scalar, or ``logits``'s shape for ``"none"``.

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> jbce.sigmoid_binary_cross_entropy(jnp.array([2.0, -1e30]), jnp.array([1.0, 0.0]))
      Array(0.06346..., dtype=float32)
    """
    dt, _, where = _prepare("logits", logits, labels, weights, where, (pos_weight,))
    if pos_weight is not None:
        _checks.check_broadcastable("pos_weight", pos_weight, "logits", jnp.shape(logits))
    _checks.debug_check_unit_interval("labels", _checks.as_float(labels, dt))

    def prepare(x, y, pw):
        y = jnp.broadcast_to(y, x.shape)
        pw = None if pw is None else jnp.broadcast_to(pw, x.shape)
        return (x, *_like_logits(x, y, pw), label_smoothing, jnp.dtype(dt))

    raw = (
        jnp.asarray(logits),
        _raw(labels, dt),
        None if pos_weight is None else _raw(pos_weight, dt),
    )
    return reduce_fast_or_exact(
        _bce_logits_fast,
        _bce_logits,
        raw,
        prepare=prepare,
        reduction=reduction,
        weights=None if weights is None else _raw(weights, dt),
        where=where,
    )


def _raw(a: ArrayLike, dt) -> jax.Array:
    """An array input as it is (converted later, inside the loss kernel); scalars in ``dt``."""
    a = jnp.asarray(a)
    return a.astype(dt) if a.ndim == 0 or not jnp.issubdtype(a.dtype, jnp.floating) else a


# --- BCE from probabilities, PyTorch semantics (log clamped at -100) --------------------------
_LOG_CLAMP = -100.0
_GRAD_EPS = 1e-12


@jax.custom_vjp
def _bce_probs(p: jax.Array, y: jax.Array) -> jax.Array:
    log_p = jnp.maximum(jnp.log(p), _LOG_CLAMP)
    log_q = jnp.maximum(jnp.log1p(-p), _LOG_CLAMP)
    return -(y * log_p + (1 - y) * log_q)


def _bce_probs_fwd(p, y):
    # Residuals: the inputs only.
    return _bce_probs(p, y), (p, y)


def _bce_probs_bwd(res, g):
    p, y = res
    # PyTorch's rule: (p - y) / max(p (1 - p), eps), finite at p = 0 and p = 1.
    dp = g * (p - y) / jnp.maximum(p * (1 - p), _GRAD_EPS)
    log_p = jnp.maximum(jnp.log(p), _LOG_CLAMP)
    log_q = jnp.maximum(jnp.log1p(-p), _LOG_CLAMP)
    dy = g * (log_q - log_p)
    return dp.astype(p.dtype), dy.astype(y.dtype)


_bce_probs.defvjp(_bce_probs_fwd, _bce_probs_bwd)


def binary_cross_entropy(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    where: ArrayLike | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Binary cross-entropy from probabilities, as ``torch.nn.functional.binary_cross_entropy``.

    .. math::
        \ell = -w \left[ y \max(\log p, -100) + (1 - y) \max(\log(1 - p), -100) \right]

    The log terms are clamped at -100 as in PyTorch, so p = 0 or 1 gives a finite loss;
    the gradient is PyTorch's ``w (p - y) / max(p (1 - p), 1e-12)``, finite at p = 0 and 1.
    Prefer :func:`sigmoid_binary_cross_entropy` on logits when you have them: it is exact
    where probabilities have already rounded to 0 or 1.

    Args:
      probs: probabilities in [0, 1], float array of any shape.
      labels: targets in [0, 1], broadcastable to ``probs``.
      weights: optional multiplier of each element's loss.
      label_smoothing: e in [0, 1]; labels become ``y (1 - e) + e / 2``.
      where: optional boolean mask; False excludes an element entirely.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
      A float32 scalar, or ``probs``'s shape for ``"none"``.

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> jbce.binary_cross_entropy(jnp.array([0.9, 0.0]), jnp.array([1.0, 1.0]), reduction="none")
      Array([  0.10536...,  100.   ], dtype=float32)
    """
    dt, weights, where = _prepare("probs", probs, labels, weights, where)
    p = _checks.as_float(probs, dt)
    y = _checks.as_float(labels, dt)
    _checks.debug_check_unit_interval("probs", p)
    _checks.debug_check_unit_interval("labels", y)
    y = jnp.broadcast_to(_smooth(y, label_smoothing), p.shape)
    (y,) = _like_logits(p, y)
    loss = _bce_probs(p, y)
    return reduce_loss(loss, reduction=reduction, weights=weights, where=where)


# --- focal loss: l = ce(x, y) * m^gamma, m = 1 - p_t = y sigmoid(-x) + (1 - y) sigmoid(x) ------
def _focal_parts(x, y):
    s_pos, s_neg = _sigmoid_pair(x)
    sp_pos, sp_neg = _softplus_pair(x)
    ce = _xmul(y, sp_neg) + _xmul(1 - y, sp_pos)
    m = y * s_neg + (1 - y) * s_pos
    return s_pos, s_neg, ce, m


@jax.custom_vjp
def _focal(x: jax.Array, y: jax.Array, gamma: jax.Array) -> jax.Array:
    _, _, ce, m = _focal_parts(x, y)
    return _xmul(ce, m**gamma)


def _focal_fwd(x, y, gamma):
    # Residuals: the inputs only.
    return _focal(x, y, gamma), (x, y, gamma)


def _focal_bwd(res, g):
    x, y, gamma = res
    s_pos, s_neg, ce, m = _focal_parts(x, y)
    mg = m**gamma
    # dm/dx = (1 - 2y) sigmoid(x) sigmoid(-x); use (dm/dx) / m, which stays bounded, so the
    # gamma * ce * m^(gamma-1) * dm/dx term is finite for every gamma >= 0 (gamma < 1 too).
    dm = (1 - 2 * y) * s_pos * s_neg
    ratio = jnp.where(m > 0, dm / jnp.where(m > 0, m, 1), jnp.zeros((), m.dtype))
    dce = (1 - y) * s_pos - y * s_neg
    dx = g * (dce * mg + _xmul(gamma * ratio, _xmul(ce, mg)))
    # d/dy: ce' = softplus(-x) - softplus(x) = -x, m' = sigmoid(-x) - sigmoid(x).
    dmy = s_neg - s_pos
    ratio_y = jnp.where(m > 0, dmy / jnp.where(m > 0, m, 1), jnp.zeros((), m.dtype))
    dy = g * (_xmul(mg, -x) + _xmul(gamma * ratio_y, _xmul(ce, mg)))
    log_m = jnp.log(jnp.where(m > 0, m, 1))
    dgamma = g * _xmul(_xmul(ce, mg), log_m)
    return dx.astype(x.dtype), _unbroadcast(dy, y), _unbroadcast(dgamma, gamma)


_focal.defvjp(_focal_fwd, _focal_bwd)


def sigmoid_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: float | None = None,
    gamma: float = 2.0,
    weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Sigmoid focal loss (Lin et al., 2017), the form of torchvision's ``sigmoid_focal_loss``.

    .. math::
        \ell = \alpha_t\, (1 - p_t)^{\gamma}\, \mathrm{BCE}(x, y), \quad
        1 - p_t = y\,\sigma(-x) + (1 - y)\,\sigma(x), \quad
        \alpha_t = \alpha y + (1 - \alpha)(1 - y)

    :math:`1 - p_t` is computed from both sigmoid tails, never as ``1 - sigmoid``, and the
    gradient stays finite for every ``gamma >= 0`` (``gamma < 1`` included) at extreme logits.
    ``alpha=None`` means no class balancing (torchvision's ``alpha=-1``).

    Args:
      logits: float array of any shape.
      labels: targets in [0, 1], broadcastable to ``logits``.
      alpha: optional weight of the positive class in [0, 1].
      gamma: focusing exponent >= 0; 0 gives plain BCE.
      weights: optional multiplier of each element's loss.
      where: optional boolean mask; False excludes an element entirely.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
      A float32 scalar, or ``logits``'s shape for ``"none"``.

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> jbce.sigmoid_focal_loss(jnp.array([3.0, -2.0]), jnp.array([1.0, 1.0]), alpha=0.25)
      Array(0.2062..., dtype=float32)
    """
    dt, weights, where = _prepare("logits", logits, labels, weights, where)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0; got {gamma}")
    x = _checks.as_float(logits, dt)
    y = _checks.as_float(labels, dt)
    _checks.debug_check_unit_interval("labels", y)
    y = jnp.broadcast_to(y, x.shape)
    y, g = _like_logits(x, y, jnp.asarray(gamma, dt))
    loss = _focal(x, y, g)
    if alpha is not None:
        loss = loss * (alpha * y + (1 - alpha) * (1 - y))
    return reduce_loss(loss, reduction=reduction, weights=weights, where=where)
