r"""Softmax losses that sum a function of each class's log-probability, with a lean custom VJP.

The implementation behind :func:`jbce.softmax_focal_loss`, :func:`jbce.poly_loss_cross_entropy`
and :func:`jbce.kl_divergence` (plain XLA, every platform). For a row of logits :math:`x`
over its included classes (not ``-inf``, not masked out), with :math:`l_c = \log p_c =
(x_c - m) - \ell` (the shift :math:`m` and shifted log-sum-exp :math:`\ell` of
:mod:`jbce._softmax.stats`), :math:`q_c = 1 - p_c = -\mathrm{expm1}(l_c)` and a coefficient
:math:`a_c = \alpha_c y_c` per class, the row's loss is

.. math::
    L = \sum_c a_c\, \phi(l_c; \theta), \qquad
    \frac{\partial L}{\partial x_j} = u_j - p_j \sum_c u_c, \quad u_c = a_c\, \phi'(l_c; \theta)

for one of the terms of :data:`TERMS` (cross-entropy :math:`-l`, focal :math:`-q^\gamma l`,
Poly-1 :math:`-l + \epsilon q`, and KL divergence :math:`\log y_c - l`). The derivatives are a
tangent map linear in the tangents (:func:`jbce._core.autodiff.lean_jvp`): forward mode
evaluates it, reverse mode transposes it and recomputes :math:`l` from the logits and the two
floats per row the core returns beside its value (:math:`m, \ell`, with their own tangent so
that second derivatives are right), so the residuals are the inputs and :math:`m, \ell`.

:func:`focal_of_log_prob` is the focal term of one log-probability per row (the integer-label
focal loss builds it on :func:`jbce._softmax.xla.softmax_stats`), with the same finite
derivative for ``gamma < 1``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jbce._core import autodiff
from jbce._core.dtypes import to_compute
from jbce._core.math import safe_pow, xmul
from jbce._softmax import jsd, xla_cpu
from jbce._softmax import stats as _stats

TERMS = ("ce", "focal", "poly", "kl")


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
    return safe_pow(q, gamma), 1 - gamma * xmul(p, r), q


def _phi(kind, lg, theta, log_y=None):
    """phi(lg; theta) per class (``+inf`` at lg = -inf for every kind)."""
    if kind == "ce":
        return -lg
    if kind == "kl":
        return log_y - lg
    q = _one_minus_p(lg)
    if kind == "focal":
        return -xmul(safe_pow(q, theta), lg)
    return -lg + theta * q  # poly


def _phi_grads(kind, lg, theta):
    """(d phi / d lg, d phi / d theta or None) per class."""
    if kind in ("ce", "kl"):
        return -jnp.ones((), lg.dtype), None
    if kind == "focal":
        qg, bracket, q = _focal_parts(lg, theta)
        log_q = jnp.log(jnp.where(q > 0, q, 1))
        return -qg * bracket, -xmul(log_q, xmul(qg, lg))
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
    """The shift and shifted log-sum-exp of each row of ``x`` (compute dtype, classes last;
    the platform's log-sum-exp reduction is chosen when the program is lowered)."""
    return _stats.block_stats(x, None)


def _lse_tangent(x, shift, lse, dx, rows):
    """The tangent of the shifted log-sum-exp, ``sum_c p_c dx_c`` (None: zero)."""
    if dx is None:
        return None
    p = _stats.probs(x, shift[..., None], lse[..., None])
    return autodiff.keep_rows(rows, jnp.sum(autodiff.keep_rows(rows, p) * dx, axis=-1))


# A log-probability that stands in for -inf inside tangent maps: its probability is exactly 0
# (exp underflows below about -745 in float64) and every coefficient computed from it equals
# its limit at -inf, while no intermediate is infinite, so differentiating the map (second
# derivatives) never meets 0 * inf where a class is -inf or masked out.
_NEG_LOG = -1e4


def _finite_log_probs(lg):
    return jnp.where(lg == -jnp.inf, jnp.asarray(_NEG_LOG, lg.dtype), lg)


def _log_probs(x, shift, lse):
    lse = jnp.where(lse == -jnp.inf, 0, lse)  # a row without classes: every lg is -inf
    return (x - shift[..., None]) - lse[..., None]


@dataclasses.dataclass(frozen=True)
class Term:
    """The static options of :func:`term_loss`: which term (one of :data:`TERMS`), whether
    the labels are log-probabilities, the compute dtype, and the term's parameter if it is a
    Python number (``theta`` is then that number too)."""

    kind: str
    dtype: jnp.dtype
    log_labels: bool = False
    static_theta: float | None = None  # theta's value when known at trace time (the CPU
    # implementation then raises to a constant power: XLA turns q ** 2 into q * q)


def term_loss(logits, labels, alpha, theta, mask, rows, term: Term):
    r"""Per-row :math:`\sum_c a_c \phi(l_c; \theta)` of ``logits`` ``[..., K]`` (classes last),
    and whether each row has a class.

    Args:
      logits: float array in any float dtype, computed in ``term.dtype``.
      labels: ``[..., K]`` probability targets, or their logs with ``term.log_labels``.
      alpha: None, a scalar or a ``[K]`` class coefficient.
      theta: the term's scalar parameter (``gamma`` or ``epsilon``; ignored for ``"ce"``).
      mask: ``[..., K]`` boolean, False takes a class out of the softmax (and its target), or None.
      rows: ``[...]`` boolean, the rows the loss uses (others get zero derivatives), or None.
      term: :class:`Term`.

    A class with :math:`a_c = 0` contributes nothing (even at a ``-inf`` logit); a positive
    target on a ``-inf`` logit costs ``+inf``; a NaN logit makes its row NaN. A row whose
    every class is ``-inf`` or masked has loss 0 and no class: the caller excludes it.
    """
    loss, _, lse = _term_core(logits, labels, alpha, theta, mask, rows, term)
    has = lse != -jnp.inf  # NaN rows count (and stay NaN)
    return jnp.where(has, loss, jnp.zeros((), loss.dtype)), has


def _term_value(logits, labels, alpha, theta, mask, rows, term: Term):
    """(per-row loss, shift, shifted log-sum-exp)."""
    del rows  # masks the derivatives only
    if mask is None and not term.log_labels:
        # XLA:CPU gets the same numbers in fused kernels (jbce._softmax.xla_cpu), chosen when
        # the program is lowered: no logits-sized temporary instead of one or two.
        return jax.lax.platform_dependent(
            logits, labels, alpha, theta,
            cpu=functools.partial(_term_value_cpu, term=term),
            default=functools.partial(_term_value_formula, mask=None, term=term),
        )  # fmt: skip
    return _term_value_formula(logits, labels, alpha, theta, mask, term)


def _term_value_formula(logits, labels, alpha, theta, mask, term: Term):
    x, y, a, ly = _prepared(logits, labels, alpha, mask, term.dtype, term.log_labels)
    st = _row_stats(x)
    loss = _row_loss(term, x, y, a, ly, theta, st)
    return loss, st.shift, st.lse


def _term_value_cpu(logits, labels, alpha, theta, term: Term):
    dt = term.dtype
    st = _stats.block_stats(logits, None, to_x=lambda v: to_compute(v, dt))
    lse = jnp.where(st.lse == -jnp.inf, jnp.zeros((), dt), st.lse)  # as _log_probs reads it
    al = _class_coef(alpha, logits.shape, dt)
    th = None if theta is None else to_compute(theta, dt)
    if term.static_theta is not None:
        th = term.static_theta
    loss = xla_cpu.term_sum(term.kind, logits, labels, al, th, st.shift, lse, dt)
    return jnp.where(jnp.isnan(st.lse), jnp.nan, loss), st.shift, st.lse


def _log_y(y, ly):
    """log y (the given logs, or log of the probabilities with log 0 read as 0: a = 0 there)."""
    return ly if ly is not None else jnp.log(jnp.where(y == 0, jnp.ones((), y.dtype), y))


def _row_loss(term: Term, x, y, a, ly, theta, st: _stats.Stats):
    lg = _log_probs(x, st.shift, st.lse)
    th = None if theta is None else to_compute(theta, term.dtype)
    log_y = _log_y(y, ly) if term.kind == "kl" else None
    loss = jnp.sum(xmul(a, _phi(term.kind, lg, th, log_y)), axis=-1)
    lse = st.lse
    return jnp.where(jnp.isnan(lse), jnp.nan, loss)  # a NaN logit hides behind a = 0 otherwise


def _term_tangent(primals, saved, tangents, term: Term):
    kind, log_labels, dtype = term.kind, term.log_labels, term.dtype
    logits, labels, alpha, theta, mask, rows = primals
    dlogits, dlabels, dalpha, dtheta, _, _ = tangents
    shift, lse = saved
    x, y, a, ly = _prepared(logits, labels, alpha, mask, dtype, log_labels)
    lg = _finite_log_probs(_log_probs(x, shift, lse))
    p = jnp.exp(lg)
    th = None if theta is None else to_compute(theta, dtype)
    if term.static_theta is not None:  # a constant power: XLA turns q ** 2 into q * q
        th = term.static_theta
    dphi, dtheta_c = _phi_grads(kind, lg, th)
    coef = functools.partial(autodiff.keep_rows, rows)
    nrow = x.ndim - 1
    # a class outside the softmax (-inf or masked) has no term: 0 here and in d/da below,
    # so that no derivative of the map depends on its target or alpha
    inc = _stats.included(x, mask)
    u = jnp.where(inc, xmul(a, jnp.broadcast_to(dphi, lg.shape)), jnp.zeros((), dtype))
    # d/dx_j = u_j - p_j sum_c u_c (through l = x - m - lse)
    terms = [autodiff.contract(coef(u - p * jnp.sum(u, axis=-1, keepdims=True)), dlogits, nrow)]
    if dlabels is not None or dalpha is not None:
        # d/da = phi(lg), 0 on a class outside the softmax, not the +inf slope
        if kind == "kl":  # d/dy [y (log y - lg)] = log y - lg + 1, log y clamped at the tiny
            tiny = jnp.finfo(dtype).tiny
            log_y = ly if ly is not None else jnp.log(jnp.maximum(y, tiny))
            phi = log_y - lg + 1
        else:
            phi = _phi(kind, lg, th)
        phi = jnp.where(inc, phi, jnp.zeros((), dtype))
        if dlabels is not None:
            al = _class_coef(alpha, x.shape, dtype)
            dy = phi if al is None else al * phi
            if log_labels:
                dy = xmul(y, dy)  # through y = exp(log y)
            if mask is not None:
                dy = jnp.where(mask, dy, jnp.zeros((), dtype))
            terms.append(autodiff.contract(coef(dy), dlabels, nrow))
        if dalpha is not None:
            terms.append(autodiff.contract(coef(phi * y), dalpha, nrow))
    if dtheta is not None and dtheta_c is not None:
        terms.append(autodiff.contract(coef(xmul(a, dtheta_c)), dtheta, nrow))
    loss = autodiff.total(lse.shape, dtype, *terms)
    return loss, None, _lse_tangent(x, shift, lse, _cast(dlogits, dtype, mask), rows)


def _cast(t, dtype, mask=None):
    """A tangent in the compute dtype, 0 where ``mask`` is False (None: zero)."""
    if t is None:
        return None
    t = t.astype(dtype)
    return t if mask is None else jnp.where(mask, t, jnp.zeros((), dtype))


# Residuals in reverse mode: the inputs as given and two floats per row (the shift and the
# shifted log-sum-exp); the log-probabilities are recomputed in the backward pass.
_term_core = autodiff.lean_jvp(
    _term_value, _term_tangent, num_static=1, saved=lambda out: (out[1], out[2])
)


# --- the focal term of one log-probability per row (integer labels) ----------------------------
def _focal_of_log_prob(lg: jax.Array, gamma: jax.Array, keep: jax.Array | None) -> jax.Array:
    r""":math:`-(1 - e^l)^\gamma\, l` elementwise, with a finite derivative for every gamma >= 0.

    ``keep`` (``lg``'s shape, or None) marks the entries the loss uses: the others get
    exactly zero derivatives, whatever their value.
    """
    del keep
    return _phi("focal", lg, gamma)


def _focal_of_log_prob_tangent(primals, _, tangents):
    lg, gamma, keep = primals
    dlg, dgamma, _ = tangents
    # The coefficients at a stand-in log-probability where ``keep`` is False (a row without
    # classes: lg = -inf or NaN; a masked label class: its logit, so possibly lg > 0 and
    # q < 0), not only masked afterwards: differentiated (second derivatives), the masked
    # coefficient's zero cotangent would meet the NaN or infinite partials there (0 * NaN).
    if keep is not None:
        lg = jnp.where(keep, lg, -jnp.ones((), lg.dtype))
    dl, dg = _phi_grads("focal", lg, gamma)
    terms = [
        autodiff.contract(autodiff.keep_where(keep, dl), dlg, lg.ndim),
        autodiff.contract(autodiff.keep_where(keep, dg), dgamma, lg.ndim),
    ]
    return autodiff.total(lg.shape, lg.dtype, *terms)


# Residuals in reverse mode: the inputs (one value per row and the scalar gamma).
focal_of_log_prob = autodiff.lean_jvp(_focal_of_log_prob, _focal_of_log_prob_tangent)


# --- generalised Jensen-Shannon divergence between two softmaxes ----------------------------
def _two_log_softmax(logits, teacher, temperature, mask, dtype):
    """(log Q, log P, the per-row stats of each) at temperature T, classes masked out."""
    t = to_compute(temperature, dtype)
    z = to_compute(logits, dtype) / t
    w = to_compute(teacher, dtype) / t
    if mask is not None:
        z = jnp.where(mask, z, -jnp.inf)
        w = jnp.where(mask, w, -jnp.inf)
    return z, w


def _jsd_all(mode, lq, lp, beta):
    """(per-row value, d/dz, d/dw, d/dbeta per row): :mod:`jbce._softmax.jsd`'s formulas
    with the row sums taken over the whole row."""
    sums = tuple(jnp.sum(t, axis=-1) for t in jsd.class_terms(mode, lq, lp, beta))
    gz, gw = jsd.class_grads(mode, lq, lp, beta, tuple(s[..., None] for s in sums))
    return jsd.divergence(mode, sums, beta), gz, gw, jsd.beta_grad(mode, sums, beta)


def jsd_loss(logits, teacher_logits, beta, temperature, mask, rows, mode, dtype):
    r"""Per-row generalised JSD of ``Q = softmax(logits / T)`` and ``P = softmax(teacher / T)``.

    ``mode``: ``"forward"`` KL(P || Q) (beta = 0), ``"reverse"`` KL(Q || P) (beta = 1),
    ``"mix"`` :math:`\beta\,\mathrm{KL}(P\|M) + (1-\beta)\,\mathrm{KL}(Q\|M)` for
    0 < beta < 1, or ``"traced"`` (beta an array: each chosen by its value, with ``where``).
    ``rows`` (``[...]`` boolean or None): the rows the loss uses, the others get zero
    derivatives. Returns ``(per-row value, whether the row has a class in both softmaxes)``:
    a row where either distribution has no class left has value 0 and is excluded by the
    caller.
    """
    value, _, lz, _, lw = _jsd_core(
        logits, teacher_logits, beta, temperature, mask, rows, mode, dtype
    )
    has = (lz != -jnp.inf) & (lw != -jnp.inf)
    return jnp.where(has, value, jnp.zeros((), value.dtype)), has


def _jsd_value(mode, z, w, beta, sz, sw, dtype):
    lq = _log_probs(z, sz.shift, sz.lse)
    lp = _log_probs(w, sw.shift, sw.lse)
    b = to_compute(beta, dtype)
    parts = _jsd_all(mode, lq, lp, b)
    nan = jnp.isnan(sz.lse) | jnp.isnan(sw.lse)
    return lq, lp, parts, jnp.where(nan, jnp.nan, parts[0])


def _jsd_primal(logits, teacher_logits, beta, temperature, mask, rows, mode, dtype):
    """(per-row value, shift and shifted log-sum-exp of each of the two softmaxes)."""
    del rows  # masks the derivatives only
    z, w = _two_log_softmax(logits, teacher_logits, temperature, mask, dtype)
    sz, sw = _row_stats(z), _row_stats(w)
    *_, value = _jsd_value(mode, z, w, beta, sz, sw, dtype)
    return value, sz.shift, sz.lse, sw.shift, sw.lse


def _jsd_tangent(primals, saved, tangents, mode, dtype):
    logits, teacher, beta, temperature, mask, rows = primals
    dlogits, dteacher, dbeta, dtemp, _, _ = tangents
    mz, lz, mw, lw = saved
    z, w = _two_log_softmax(logits, teacher, temperature, mask, dtype)
    sz, sw = _stats.Stats(mz, lz, None), _stats.Stats(mw, lw, None)
    lq, lp, (_, gz, gw, gbeta), _ = _jsd_value(mode, z, w, beta, sz, sw, dtype)
    t = to_compute(temperature, dtype)
    coef = functools.partial(autodiff.keep_rows, rows)
    nrow = lz.ndim
    # z = x / T: d/dx = d/dz / T, and d/dT = -sum(d/dz z) / T (z read as log Q, which differs
    # by a per-row constant while d/dz sums to 0 over a row).
    dxz, dxw = _cast(dlogits, dtype, mask), _cast(dteacher, dtype, mask)
    value = autodiff.total(
        lz.shape, dtype,
        autodiff.contract(coef(gz / t), dxz, nrow),
        autodiff.contract(coef(gw / t), dxw, nrow),
        autodiff.contract(coef(gbeta), dbeta, nrow),
        autodiff.contract(
            coef(-(jnp.sum(xmul(gz, lq), -1) + jnp.sum(xmul(gw, lp), -1)) / t), dtemp, nrow
        ),
    )  # fmt: skip
    # The statistics of z = x / T: d lse = sum_c q_c (dx_c - z_c dT) / T.
    lse_z = _softmax_lse_tangent(z, lq, dxz, t, dtemp, rows)
    lse_w = _softmax_lse_tangent(w, lp, dxw, t, dtemp, rows)
    return value, None, lse_z, None, lse_w


def _softmax_lse_tangent(z, lg, dx, t, dt, rows):
    q = autodiff.keep_rows(rows, jnp.exp(lg))
    terms = [autodiff.contract(q / t, dx, z.ndim - 1)]
    if dt is not None:
        terms.append(autodiff.contract(-jnp.sum(xmul(q, z), -1) / t, dt, z.ndim - 1))
    return autodiff.keep_rows(rows, autodiff.total(lg.shape[:-1], lg.dtype, *terms))


# Residuals in reverse mode: the inputs as given and four floats per row (shift and shifted
# log-sum-exp of each softmax); the distributions are recomputed in the backward pass.
_jsd_core = autodiff.lean_jvp(_jsd_primal, _jsd_tangent, num_static=2, saved=lambda out: out[1:])
