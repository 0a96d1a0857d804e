r"""The generalised Jensen-Shannon divergence class by class: the one formula behind
:func:`jbce.jensen_shannon_divergence` (materialised, :mod:`jbce._softmax.terms`) and
:func:`jbce.linear_distillation_loss` (tiled, :mod:`jbce._linear.distill_xla`).

For log-probabilities :math:`\log Q` (student) and :math:`\log P` (teacher) of a row,
:math:`d = \log Q - \log P` (:func:`jbce._core.math.log_ratio`) and the mixture
:math:`M = \beta P + (1 - \beta) Q` (:func:`jbce._core.math.mixture_logs`), the divergence
is a function of a few row sums of per-class terms (:data:`SUMS`, :func:`class_terms`):

.. math::
    \mathrm{KL}(P\|Q) = \sum_c p_c (-d_c), \quad \mathrm{KL}(Q\|P) = \sum_c q_c d_c, \quad
    \mathrm{KL}(P\|M) = \sum_c p_c \log\frac{p_c}{m_c}, \quad
    \mathrm{KL}(Q\|M) = \sum_c q_c \log\frac{q_c}{m_c}

(:func:`divergence`), and so is its gradient with respect to each distribution's logits,
given the row's full sums (:func:`class_grads`): a tiled caller sums the terms over its
tiles, then computes the gradient of each tile from the totals.

``mode`` (:func:`mode`) is what ``beta`` selects: ``"forward"`` KL(P || Q) (beta = 0),
``"reverse"`` KL(Q || P) (beta = 1), ``"mix"`` :math:`\beta\,\mathrm{KL}(P\|M) +
(1-\beta)\,\mathrm{KL}(Q\|M)` inside (0, 1), ``"traced"`` for an array (each row picks by
value, with ``where``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jbce._core import checks
from jbce._core.math import log_ratio, mixture_logs, xmul

MODES = ("forward", "reverse", "mix", "traced")
# The row sums each mode needs: KL(P||Q), KL(Q||P), KL(P||M), KL(Q||M). KL(P||M) and
# KL(Q||M) share the mixture's log1p(expm1): adjacent, so that the fused loss reduces them as
# one pair on CUDA (jbce._linear.distill_xla._row_sums).
SUMS = {
    "forward": ("kl_pq",),
    "reverse": ("kl_qp",),
    "mix": ("kl_pm", "kl_qm"),
    "traced": ("kl_pq", "kl_qp", "kl_pm", "kl_qm"),
}


def mode(beta) -> str:
    """Which form of the generalised JSD ``beta`` selects (see the module docstring)."""
    b = checks.static_number(beta)
    if b is None:
        return "traced"
    return "forward" if b == 0 else "reverse" if b == 1 else "mix"


def safe_beta(mode: str, beta):
    """beta, with a traced beta at 0 or 1 replaced by 0.5 in the mixture's (unused) branch."""
    if mode != "traced":
        return beta
    return jnp.where((beta == 0) | (beta == 1), jnp.full((), 0.5, beta.dtype), beta)


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


def _end_ratios(mode: str, beta, d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``d`` as the two KL ends read it (KL(P || Q), KL(Q || P)): with a traced beta, 0 in
    the one that beta does not select.

    An end is infinite in a row where one distribution lacks a class the other has (``d``
    is ``+-inf`` there). ``where`` discards the unselected end's value, but computed from
    ``d`` it would hold NaN partials, which a second derivative multiplies by the zero
    cotangent that ``where`` sends it (0 x NaN); computed from 0 they stay finite.
    """
    if mode != "traced":
        return d, d
    zero = jnp.zeros((), d.dtype)
    return jnp.where(beta == 0, d, zero), jnp.where(beta == 1, d, zero)


def class_terms(mode: str, lq: jax.Array, lp: jax.Array, beta) -> tuple[jax.Array, ...]:
    """The per-class terms whose row sums are :data:`SUMS` ``[mode]``, in that order."""
    q, p = jnp.exp(lq), jnp.exp(lp)
    d = log_ratio(lq, lp)
    d_pq, d_qp = _end_ratios(mode, beta, d)
    out = {}
    if mode in ("forward", "traced"):
        out["kl_pq"] = xmul(p, -d_pq)
    if mode in ("reverse", "traced"):
        out["kl_qp"] = xmul(q, d_qp)
    if mode in ("mix", "traced"):
        e, f = mixture_logs(d, safe_beta(mode, beta))
        out["kl_pm"] = xmul(p, e)
        out["kl_qm"] = xmul(q, f)
    return tuple(out[k] for k in SUMS[mode])


def divergence(mode: str, sums, beta) -> jax.Array:
    """The generalised JSD per row from its sums (:data:`SUMS` ``[mode]``)."""
    s = dict(zip(SUMS[mode], sums, strict=True))
    b = safe_beta(mode, beta)
    return _select(
        mode,
        beta,
        lambda: s["kl_pq"],
        lambda: s["kl_qp"],
        lambda: b * s["kl_pm"] + (1 - b) * s["kl_qm"],
    )


def class_grads(mode: str, lq, lp, beta, sums) -> tuple[jax.Array, jax.Array]:
    """(d JSD / d z, d JSD / d w) per class, for ``lq``, ``lp`` the log-softmaxes of the
    logits ``z`` and ``w`` and ``sums`` the rows' full sums (:data:`SUMS` ``[mode]``, each
    shaped to broadcast against ``lq``: a column)."""
    s = dict(zip(SUMS[mode], sums, strict=True))
    q, p = jnp.exp(lq), jnp.exp(lp)
    d = log_ratio(lq, lp)
    d_pq, d_qp = _end_ratios(mode, beta, d)

    def forward():  # KL(P || Q)
        return q - p, xmul(p, -d_pq - s["kl_pq"])

    def reverse():  # KL(Q || P)
        return xmul(q, d_qp - s["kl_qp"]), p - q

    def mix():
        b = safe_beta(mode, beta)
        e, f = mixture_logs(d, b)
        return (1 - b) * xmul(q, f - s["kl_qm"]), b * xmul(p, e - s["kl_pm"])

    if mode != "traced":
        return {"forward": forward, "reverse": reverse, "mix": mix}[mode]()
    lo, hi = beta == 0, beta == 1
    parts = forward(), reverse(), mix()
    return tuple(
        jnp.where(lo, parts[0][k], jnp.where(hi, parts[1][k], parts[2][k])) for k in (0, 1)
    )


def beta_grad(mode: str, sums, beta) -> jax.Array:
    """d JSD / d beta per row: KL(P||M) - KL(Q||M) inside (0, 1), 0 at the ends."""
    if mode in ("forward", "reverse"):
        return jnp.zeros_like(sums[0])
    s = dict(zip(SUMS[mode], sums, strict=True))
    gb = s["kl_pm"] - s["kl_qm"]
    if mode == "traced":
        gb = jnp.where((beta == 0) | (beta == 1), jnp.zeros((), gb.dtype), gb)
    return gb
