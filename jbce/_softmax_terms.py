r"""Softmax losses that sum a function of each class's log-probability, with a lean custom VJP.

The implementation behind :func:`jbce.softmax_focal_loss`, :func:`jbce.poly_loss_cross_entropy`
and :func:`jbce.kl_divergence` (plain XLA, every platform). For a row of logits :math:`x`
over its included classes (not ``-inf``, not masked out), with :math:`l_c = \log p_c =
(x_c - m) - \ell` (the shift :math:`m` and shifted log-sum-exp :math:`\ell` of
:mod:`jbce._stats`), :math:`q_c = 1 - p_c = -\mathrm{expm1}(l_c)` and a coefficient
:math:`a_c = \alpha_c y_c` per class, the row's loss is

.. math::
    L = \sum_c a_c\, \phi(l_c; \theta), \qquad
    \frac{\partial L}{\partial x_j} = u_j - p_j \sum_c u_c, \quad u_c = a_c\, \phi'(l_c; \theta)

for one of the terms of :data:`TERMS` (cross-entropy :math:`-l`, focal :math:`-q^\gamma l`,
Poly-1 :math:`-l + \epsilon q`, and KL divergence :math:`\log y_c - l`). The backward pass
recomputes :math:`l` from the logits and the two saved floats per row, so the residuals are the
inputs and :math:`m, \ell`.

:func:`focal_of_log_prob` is the focal term of one log-probability per row (the integer-label
focal loss builds it on :func:`jbce._softmax_xla.softmax_stats`), with the same finite
derivative for ``gamma < 1``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jbce import _stats
from jbce._dtypes import to_compute
from jbce._softmax_xla import softmax_stats
from jbce._vma import psum_to_like

TERMS = ("ce", "focal", "poly", "kl")


def _xmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a * b with 0 * inf = 0: a zero coefficient switches a term off entirely."""
    return jnp.where(a == 0, jnp.zeros((), b.dtype), a * b)


def _one_minus_p(lg: jax.Array) -> jax.Array:
    """1 - exp(lg), exact where p is close to 1 (no cancellation)."""
    return -jnp.expm1(lg)


def _focal_parts(lg, gamma):
    """(q^gamma, phi'(lg) / -q^gamma, the bounded ratio lg / q) of phi = -q^gamma lg."""
    q = _one_minus_p(lg)
    p = jnp.exp(lg)
    # lg / q -> -1 as p -> 1; keeping the ratio bounded keeps gamma * lg * q^(gamma-1) finite
    # for gamma < 1 (it would be 0 * inf at q = 0).
    r = jnp.where(q > 0, lg / jnp.where(q > 0, q, 1), -jnp.ones((), lg.dtype))
    qg = q**gamma
    return qg, 1 - gamma * _xmul(p, r), q


def _phi(kind, lg, theta, log_y=None):
    """phi(lg; theta) per class (``+inf`` at lg = -inf for every kind)."""
    if kind == "ce":
        return -lg
    if kind == "kl":
        return log_y - lg
    q = _one_minus_p(lg)
    if kind == "focal":
        return -_xmul(q**theta, lg)
    return -lg + theta * q  # poly


def _phi_grads(kind, lg, theta):
    """(d phi / d lg, d phi / d theta or None) per class."""
    if kind in ("ce", "kl"):
        return -jnp.ones((), lg.dtype), None
    if kind == "focal":
        qg, bracket, q = _focal_parts(lg, theta)
        log_q = jnp.log(jnp.where(q > 0, q, 1))
        return -qg * bracket, -_xmul(log_q, _xmul(qg, lg))
    p = jnp.exp(lg)
    return -1 - theta * p, _one_minus_p(lg)  # poly


def _class_coef(alpha, shape, dtype):
    """alpha (None, a scalar or ``[k]``) shaped to broadcast against ``shape`` ``[..., k]``."""
    if alpha is None:
        return None
    a = to_compute(alpha, dtype)
    return a if a.ndim == 0 else a.reshape((1,) * (len(shape) - 1) + (shape[-1],))


def _prepared(logits, labels, alpha, mask, dtype, log_labels):
    """(x, y, coefficients a, log y or None), classes masked out; all in the compute dtype."""
    x = to_compute(logits, dtype)
    ly = None
    if log_labels:
        ly = to_compute(labels, dtype)
        y = jnp.exp(ly)
    else:
        y = to_compute(labels, dtype)
    if mask is not None:
        x = jnp.where(mask, x, -jnp.inf)
        y = jnp.where(mask, y, jnp.zeros((), dtype))
        if ly is not None:
            ly = jnp.where(mask, ly, -jnp.inf)
    al = _class_coef(alpha, x.shape, dtype)
    a = y if al is None else al * y
    return x, y, a, ly


def _row_stats(x: jax.Array) -> _stats.Stats:
    """The shift and shifted log-sum-exp of each row of ``x`` (compute dtype, classes last).

    Through :func:`jbce._softmax_xla.softmax_stats`, whose own lean VJP differentiates them
    when a higher derivative differentiates this module's forward passes (the platform's
    log-sum-exp reduction is chosen when the program is lowered).
    """
    return softmax_stats(x, None, None, None, None, None, x.dtype, False, False, None, None)


def _log_probs(x, shift, lse):
    lse = jnp.where(lse == -jnp.inf, 0, lse)  # a row without classes: every lg is -inf
    return (x - shift[..., None]) - lse[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def term_loss(logits, labels, alpha, theta, mask, kind, log_labels, dtype):
    r"""Per-row :math:`\sum_c a_c \phi(l_c; \theta)` of ``logits`` ``[..., K]`` (classes last).

    Args:
      logits: float array in any float dtype, computed in ``dtype``.
      labels: ``[..., K]`` probability targets, or their logs with ``log_labels``.
      alpha: None, a scalar or a ``[K]`` class coefficient.
      theta: the term's scalar parameter (``gamma`` or ``epsilon``; ignored for ``"ce"``).
      mask: ``[..., K]`` boolean, False takes a class out of the softmax (and its target), or None.
      kind: one of :data:`TERMS`.
      log_labels: ``labels`` are log-probabilities.
      dtype: the compute dtype.

    A class with :math:`a_c = 0` contributes nothing (even at a ``-inf`` logit); a positive
    target on a ``-inf`` logit costs ``+inf``; a NaN logit makes its row NaN.
    """
    x, y, a, ly = _prepared(logits, labels, alpha, mask, dtype, log_labels)
    st = _row_stats(x)
    return _row_loss(kind, x, y, a, ly, theta, st.shift, st.lse, dtype)


def _log_y(y, ly):
    """log y (the given logs, or log of the probabilities with log 0 read as 0: a = 0 there)."""
    return ly if ly is not None else jnp.log(jnp.where(y == 0, jnp.ones((), y.dtype), y))


def _row_loss(kind, x, y, a, ly, theta, shift, lse, dtype):
    lg = _log_probs(x, shift, lse)
    th = None if theta is None else to_compute(theta, dtype)
    log_y = _log_y(y, ly) if kind == "kl" else None
    loss = jnp.sum(_xmul(a, _phi(kind, lg, th, log_y)), axis=-1)
    return jnp.where(jnp.isnan(lse), jnp.nan, loss)  # a NaN logit hides behind a = 0 otherwise


def _term_loss_fwd(logits, labels, alpha, theta, mask, kind, log_labels, dtype):
    x, y, a, ly = _prepared(logits, labels, alpha, mask, dtype, log_labels)
    st = _row_stats(x)
    # Residuals: the inputs as given and two floats per row (the shift and the shifted
    # log-sum-exp); the log-probabilities are recomputed in the backward pass.
    loss = _row_loss(kind, x, y, a, ly, theta, st.shift, st.lse, dtype)
    return loss, (logits, labels, alpha, theta, mask, st.shift, st.lse)


def _scaled(g, d):
    """``g * d`` with exactly 0 where ``g`` is 0 (an unused row gets no gradient)."""
    return jnp.where(g == 0, jnp.zeros((), d.dtype), g * d)


def _term_loss_bwd(kind, log_labels, dtype, res, g):
    logits, labels, alpha, theta, mask, shift, lse = res
    x, y, a, ly = _prepared(logits, labels, alpha, mask, dtype, log_labels)
    lg = _log_probs(x, shift, lse)
    p = jnp.exp(lg)
    th = None if theta is None else to_compute(theta, dtype)
    dphi, dtheta_c = _phi_grads(kind, lg, th)
    u = _xmul(a, jnp.broadcast_to(dphi, lg.shape))
    g = g[..., None]
    dx = _scaled(g, u - p * jnp.sum(u, axis=-1, keepdims=True))
    # d/da = phi(lg); a class outside the softmax (-inf or masked) gets 0, not the +inf slope.
    inc = _stats.included(x, mask)
    if kind == "kl":  # d/dy [y (log y - lg)] = log y - lg + 1, log y clamped at the tiny float
        tiny = jnp.finfo(dtype).tiny
        log_y = ly if ly is not None else jnp.log(jnp.maximum(y, tiny))
        phi = log_y - lg + 1
    else:
        phi = _phi(kind, lg, th)
    phi = jnp.where(inc, phi, jnp.zeros((), dtype))
    da = _scaled(g, phi)
    al = _class_coef(alpha, x.shape, dtype)
    dy = da if al is None else al * da
    if log_labels:
        dy = _xmul(y, dy)  # through y = exp(log y)
    if mask is not None:
        dy = jnp.where(mask, dy, jnp.zeros((), dtype))
    dalpha = None
    if alpha is not None:
        dalpha = jnp.sum((da * y).reshape(-1, x.shape[-1]), axis=0)
        dalpha = (dalpha if alpha.ndim else jnp.sum(dalpha)).astype(alpha.dtype)
    dtheta = None
    if theta is not None:
        dt = jnp.zeros((), dtype) if dtheta_c is None else jnp.sum(_scaled(g, _xmul(a, dtheta_c)))
        dtheta = dt.astype(theta.dtype)
    # Inside shard_map a replicated input (a scalar gamma, say) collects the sum of the
    # shards' cotangents (psum_to_like; a no-op elsewhere).
    return (
        psum_to_like(dx.astype(logits.dtype), logits),
        psum_to_like(dy.astype(labels.dtype), labels),
        None if dalpha is None else psum_to_like(dalpha, alpha),
        None if dtheta is None else psum_to_like(dtheta, theta),
        _zero_cotangent(mask),
    )


def _zero_cotangent(a):
    return None if a is None else jnp.zeros(a.shape, jax.dtypes.float0)


term_loss.defvjp(_term_loss_fwd, _term_loss_bwd)


# --- the focal term of one log-probability per row (integer labels) ----------------------------
@jax.custom_vjp
def focal_of_log_prob(lg: jax.Array, gamma: jax.Array) -> jax.Array:
    r""":math:`-(1 - e^l)^\gamma\, l` elementwise, with a finite derivative for every gamma >= 0."""
    return _phi("focal", lg, gamma)


def _focal_of_log_prob_fwd(lg, gamma):
    # Residuals: the inputs (one value per row and the scalar gamma).
    return focal_of_log_prob(lg, gamma), (lg, gamma)


def _focal_of_log_prob_bwd(res, g):
    lg, gamma = res
    dl, dgamma = _phi_grads("focal", lg, gamma)
    dgamma = jnp.sum(_scaled(g, dgamma)).reshape(jnp.shape(gamma))
    return psum_to_like(_scaled(g, dl), lg), psum_to_like(
        dgamma.astype(jnp.result_type(gamma)), gamma
    )


focal_of_log_prob.defvjp(_focal_of_log_prob_fwd, _focal_of_log_prob_bwd)


# --- generalised Jensen-Shannon divergence between two softmaxes ----------------------------
JSD_MODES = ("forward", "reverse", "mix", "traced")


def _two_log_softmax(logits, teacher, temperature, mask, dtype):
    """(log Q, log P, the per-row stats of each) at temperature T, classes masked out."""
    t = to_compute(temperature, dtype)
    z = to_compute(logits, dtype) / t
    w = to_compute(teacher, dtype) / t
    if mask is not None:
        z = jnp.where(mask, z, -jnp.inf)
        w = jnp.where(mask, w, -jnp.inf)
    return z, w


def _log_ratio(lq, lp):
    """d = log Q - log P per class, 0 where both are -inf (a class neither distribution has)."""
    both = (lq == -jnp.inf) & (lp == -jnp.inf)
    return jnp.where(both, jnp.zeros((), lq.dtype), lq - lp)


def _mixture_logs(d, beta):
    r"""(log P - log M, log Q - log M) for M = beta P + (1 - beta) Q, from d = log Q - log P.

    :math:`\log P - \log M = -\log(\beta + (1 - \beta) e^d)`, evaluated as
    ``-log1p((1 - beta) expm1(d))`` for d <= 0 and ``-d - log1p(beta expm1(-d))`` for d > 0:
    no overflow, and relative accuracy where the distributions nearly agree (d near 0).
    """
    neg = d <= 0
    dn = jnp.minimum(d, 0)
    dp = jnp.maximum(d, 0)
    a = jnp.log1p((1 - beta) * jnp.expm1(dn))
    b = jnp.log1p(beta * jnp.expm1(-dp))
    e = jnp.where(neg, -a, -dp - b)
    f = jnp.where(neg, dn - a, -b)
    return e, f


def _jsd_parts(mode, lq, lp, beta):
    """(per-row value, d/dz, d/dw, d/dbeta per row) for one mode (not "traced")."""
    q, p = jnp.exp(lq), jnp.exp(lp)
    d = _log_ratio(lq, lp)
    if mode == "forward":  # KL(P || Q)
        kl = jnp.sum(_xmul(p, -d), axis=-1)
        return kl, q - p, _xmul(p, -d - kl[..., None]), jnp.zeros_like(kl)
    if mode == "reverse":  # KL(Q || P)
        kl = jnp.sum(_xmul(q, d), axis=-1)
        return kl, _xmul(q, d - kl[..., None]), p - q, jnp.zeros_like(kl)
    e, f = _mixture_logs(d, beta)
    kl_p = jnp.sum(_xmul(p, e), axis=-1)  # KL(P || M)
    kl_q = jnp.sum(_xmul(q, f), axis=-1)  # KL(Q || M)
    value = beta * kl_p + (1 - beta) * kl_q
    gz = (1 - beta) * _xmul(q, f - kl_q[..., None])
    gw = beta * _xmul(p, e - kl_p[..., None])
    return value, gz, gw, kl_p - kl_q


def _jsd_all(mode, lq, lp, beta):
    if mode != "traced":
        return _jsd_parts(mode, lq, lp, beta)
    lo, hi = beta == 0, beta == 1
    safe = jnp.where(lo | hi, jnp.full((), 0.5, beta.dtype), beta)
    parts = [_jsd_parts(m, lq, lp, safe) for m in ("forward", "reverse", "mix")]
    pick = lambda i: jnp.where(lo, parts[0][i], jnp.where(hi, parts[1][i], parts[2][i]))
    return tuple(pick(i) for i in range(4))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def jsd_loss(logits, teacher_logits, beta, temperature, mask, mode, dtype):
    r"""Per-row generalised JSD of ``Q = softmax(logits / T)`` and ``P = softmax(teacher / T)``.

    ``mode``: ``"forward"`` KL(P || Q) (beta = 0), ``"reverse"`` KL(Q || P) (beta = 1),
    ``"mix"`` :math:`\beta\,\mathrm{KL}(P\|M) + (1-\beta)\,\mathrm{KL}(Q\|M)` for
    0 < beta < 1, or ``"traced"`` (beta an array: each chosen by its value, with ``where``).
    """
    value, _ = _jsd_fwd(logits, teacher_logits, beta, temperature, mask, mode, dtype)
    return value


def _jsd_value(mode, z, w, beta, sz, sw, dtype):
    lq = _log_probs(z, sz.shift, sz.lse)
    lp = _log_probs(w, sw.shift, sw.lse)
    b = to_compute(beta, dtype)
    parts = _jsd_all(mode, lq, lp, b)
    nan = jnp.isnan(sz.lse) | jnp.isnan(sw.lse)
    return lq, lp, parts, jnp.where(nan, jnp.nan, parts[0])


def _jsd_fwd(logits, teacher_logits, beta, temperature, mask, mode, dtype):
    z, w = _two_log_softmax(logits, teacher_logits, temperature, mask, dtype)
    sz, sw = _row_stats(z), _row_stats(w)
    *_, value = _jsd_value(mode, z, w, beta, sz, sw, dtype)
    # Residuals: the inputs as given and four floats per row (shift and shifted log-sum-exp
    # of each softmax); the distributions are recomputed in the backward pass.
    return value, (
        logits,
        teacher_logits,
        beta,
        temperature,
        mask,
        sz.shift,
        sz.lse,
        sw.shift,
        sw.lse,
    )


def _jsd_bwd(mode, dtype, res, g):
    logits, teacher, beta, temperature, mask, mz, lz, mw, lw = res
    z, w = _two_log_softmax(logits, teacher, temperature, mask, dtype)
    sz, sw = _stats.Stats(mz, lz, None), _stats.Stats(mw, lw, None)
    lq, lp, (_, gz, gw, gbeta), _ = _jsd_value(mode, z, w, beta, sz, sw, dtype)
    t = to_compute(temperature, dtype)
    gc = g[..., None]
    dz, dw = _scaled(gc, gz), _scaled(gc, gw)
    # z = x / T: d/dx = d/dz / T, and d/dT = -sum(d/dz z) / T (z read as log Q, which differs
    # by a per-row constant while d/dz sums to 0 over a row).
    dt = -(jnp.sum(_xmul(dz, lq)) + jnp.sum(_xmul(dw, lp))) / t
    return (
        psum_to_like((dz / t).astype(logits.dtype), logits),
        psum_to_like((dw / t).astype(teacher.dtype), teacher),
        psum_to_like(jnp.sum(_scaled(g, gbeta)).astype(beta.dtype), beta),
        psum_to_like(dt.astype(temperature.dtype), temperature),
        _zero_cotangent(mask),
    )


jsd_loss.defvjp(_jsd_fwd, _jsd_bwd)
