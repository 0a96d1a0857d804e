"""Small arithmetic shared by the cores: products where a zero coefficient means "no term",
the exact softplus and sigmoid pairs of a logit, and the log-ratios of a two-distribution
mixture."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def xmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a * b`` with ``0 * inf = 0`` (and ``0 * nan = 0``): a zero coefficient switches a
    term off entirely, e.g. a zero label weight on a ``-inf`` logit, or an unused row's zero
    cotangent.

    Differentiable to any order without NaN: where ``a == 0`` and ``b`` is not finite, ``b``
    is replaced by 0 before the product, so neither factor's derivative meets ``0 * inf``
    (the derivative in ``a`` there is 0, the convention of a term that is switched off);
    elsewhere the derivatives are the product's.

    Example:
      >>> import jax.numpy as jnp
      >>> from jbce._core.math import xmul
      >>> xmul(jnp.array([0.0, 2.0]), jnp.array([-jnp.inf, 3.0]))
      Array([0., 6.], dtype=float32)
    """
    off = (a == 0) & ~jnp.isfinite(b)
    return a * jnp.where(off, jnp.zeros((), jnp.result_type(b)), b)


# PyTorch's convention for losses on probabilities (binary_cross_entropy, and jbce's
# categorical_cross_entropy): logs clamped at -100, so p = 0 costs 100 rather than inf, and
# gradients divided by at least 1e-12.
LOG_CLAMP = -100.0
GRAD_EPS = 1e-12


# The clamped logs' derivative is PyTorch's convention for these losses, 1 / max(p, 1e-12),
# not the clamp's slope (0 below e^-100, so at p = 0): the same rule as the losses' gradient
# (p - y) / max(p (1 - p), 1e-12), so that their second derivatives, which differentiate the
# logs in the label terms, are finite at p = 0 and 1 and the Hessian stays symmetric there.
@jax.custom_jvp
def clamped_log(p: jax.Array) -> jax.Array:
    """``max(log p, -100)`` (NaN stays NaN), with the derivative ``1 / max(p, 1e-12)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jbce._core.math import clamped_log
      >>> p = jnp.array([0.0, 0.5])
      >>> clamped_log(p)
      Array([-100.        ,   -0.6931472], dtype=float32)
      >>> jax.vmap(jax.grad(clamped_log))(p)  # finite at 0, and differentiable again
      Array([1.e+12, 2.e+00], dtype=float32)
    """
    return jnp.maximum(jnp.log(p), LOG_CLAMP)


@clamped_log.defjvp
def _clamped_log_jvp(primals, tangents):
    (p,), (dp,) = primals, tangents
    return clamped_log(p), dp / jnp.maximum(p, GRAD_EPS)


@jax.custom_jvp
def clamped_log1p(x: jax.Array) -> jax.Array:
    """``max(log1p(x), -100)``: ``log(1 - p)`` as ``clamped_log1p(-p)``, exact for small p;
    the derivative is ``1 / max(1 + x, 1e-12)``, as :func:`clamped_log`'s."""
    return jnp.maximum(jnp.log1p(x), LOG_CLAMP)


@clamped_log1p.defjvp
def _clamped_log1p_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return clamped_log1p(x), dx / jnp.maximum(1 + x, GRAD_EPS)


def log_ratio(lq: jax.Array, lp: jax.Array) -> jax.Array:
    """``log Q - log P`` per class, 0 where both are ``-inf`` (a class neither distribution has)."""
    both = (lq == -jnp.inf) & (lp == -jnp.inf)
    zero = jnp.zeros((), lq.dtype)
    return jnp.where(both, zero, jnp.where(both, zero, lq) - jnp.where(both, zero, lp))


def mixture_logs(d: jax.Array, beta) -> tuple[jax.Array, jax.Array]:
    r"""``(log P - log M, log Q - log M)`` for :math:`M = \beta P + (1 - \beta) Q`, from
    ``d = log Q - log P`` (:func:`log_ratio`).

    :math:`\log P - \log M = -\log(\beta + (1 - \beta) e^d)`, evaluated as
    ``-log1p((1 - beta) expm1(d))`` for ``d <= 0`` and ``-d - log1p(beta expm1(-d))`` above:
    one ``expm1`` and one ``log1p`` per class, no overflow, and relative accuracy where the
    two distributions nearly agree (``d`` near 0). The branch is chosen with ``where`` on the
    sign of ``d`` (never through ``abs``), so every derivative at ``d = 0`` is that of the
    smooth function.

    Example:
      >>> import jax.numpy as jnp
      >>> from jbce._core.math import mixture_logs
      >>> mixture_logs(jnp.array([0.0, -jnp.inf]), 0.5)  # equal; Q without the class
      (Array([0.       , 0.6931472], dtype=float32), Array([  0., -inf], dtype=float32))
    """
    neg = d <= 0
    coef = jnp.where(neg, 1 - beta, beta)
    lg = jnp.log1p(coef * jnp.expm1(jnp.where(neg, d, -d)))
    zero = jnp.zeros((), d.dtype)
    return jnp.where(neg, zero, -d) - lg, jnp.where(neg, d, zero) - lg


def safe_pow(q: jax.Array, gamma) -> jax.Array:
    """``q ** gamma`` for ``q >= 0`` whose derivatives are finite at ``q = 0`` for every
    ``gamma >= 0``: there the value is ``0 ** gamma`` and its slope in ``q`` is taken as 0.

    The focal losses' modulating factor: where ``q = 1 - p_t`` rounds to 0 (a confident
    prediction) the focal term ``q^gamma * CE`` vanishes like ``q^(1 + gamma)`` and so do all
    its derivatives, while ``gamma q^(gamma - 1)`` alone would be ``inf`` (and ``inf * 0``
    NaN) for ``gamma < 1``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jbce._core.math import safe_pow
      >>> q = jnp.array(0.0)
      >>> float(jax.grad(safe_pow)(q, 0.5)), float(safe_pow(q, 0.0))
      (0.0, 1.0)
    """
    pos = q > 0
    q_safe = jnp.where(pos, q, jnp.ones((), q.dtype))
    at_zero = jnp.where(q == 0, jnp.zeros((), q.dtype) ** gamma, jnp.nan)  # NaN in, NaN out
    return jnp.where(pos, q_safe**gamma, at_zero)


@jax.custom_jvp
def pow_slope_times(c: jax.Array, log_q: jax.Array, gamma) -> jax.Array:
    r"""``gamma * c * q^(gamma - 1)`` (``c`` times the slope of ``q^gamma``) from ``log q``,
    for ``q`` at least the smallest normal float, with derivatives that stay finite.

    The focal losses' term in the modulating factor's slope (``c`` a cross-entropy that
    vanishes like ``q``). Its derivative is written out, in the order that keeps every
    intermediate no larger than the result:

    .. math::
        d\,[\gamma c q^{\gamma-1}] = (\gamma q^{\gamma-1})\, dc
          + \gamma c q^{\gamma-1} (\gamma - 1)\, d\log q
          + c q^{\gamma-1} (1 + \gamma \log q)\, d\gamma

    Autodiff of the formula would form ``dc / c`` or ``q^(gamma - 2)`` along the way (forward
    mode), which overflow float32 where ``q`` is ~1e-37 while the products above do not, and
    a ``gamma = 0`` times that infinity would be NaN.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jbce._core.math import pow_slope_times
      >>> f32 = jnp.float32
      >>> pow_slope_times(f32(2.0), jnp.log(f32(0.25)), f32(0.5))  # 0.5 * 2 * 0.25^-0.5
      Array(2., dtype=float32)
      >>> primals = f32(1e-37), jnp.log(f32(1e-37)), f32(0.0)  # gamma = 0: no 0 x inf
      >>> jax.jvp(pow_slope_times, primals, (f32(90.0), f32(1e37), f32(0.0)))[1]
      Array(0., dtype=float32)
    """
    return gamma * (c * jnp.exp((gamma - 1) * log_q))


@pow_slope_times.defjvp
def _pow_slope_times_jvp(primals, tangents):
    c, log_q, gamma = primals
    dc, dlog_q, dgamma = tangents
    pw = jnp.exp((gamma - 1) * log_q)  # q^(gamma - 1) <= 1 / q: finite for a normal q
    c_pw = c * pw
    out = gamma * c_pw
    d_gamma = c_pw * (1 + gamma * log_q)
    return out, (gamma * pw) * dc + (out * (gamma - 1)) * dlog_q + d_gamma * dgamma


def neg_abs(x: jax.Array) -> jax.Array:
    """``-|x|``, with the slope of the ``x >= 0`` side at 0 (so that the derivative of the
    tails below, which are smooth at 0, is right there too: a zero-initialised logit)."""
    return jnp.where(x >= 0, -x, x)


def softplus_pair(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(softplus(x), softplus(-x)) = (-log sigmoid(-x), -log sigmoid(x)), one exp/log1p pair.

    Exact for every logit: no intermediate overflows, and each linear term is nonzero for one
    sign of ``x`` only, so nothing cancels (the exact log-sigmoid of the binary losses and of
    :func:`jbce.siglip_loss`).

    Example:
      >>> import jax.numpy as jnp
      >>> from jbce._core.math import softplus_pair
      >>> softplus_pair(jnp.array([0.0, 30.0]))[1]  # -log sigmoid(30) = 9.4e-14, not 0
      Array([6.931472e-01, 9.357623e-14], dtype=float32)
    """
    # Both sides of x = 0 written with the x >= 0 side's slope (not relu's and |x|'s tie
    # rules), so that their derivatives, which differentiate these, are right at 0 too.
    t = jnp.log1p(jnp.exp(neg_abs(x)))
    zero = jnp.zeros((), x.dtype)
    pos = x >= 0
    return jnp.where(pos, x, zero) + t, jnp.where(pos, zero, -x) + t


def sigmoid_pair(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sigmoid(x), sigmoid(-x)), each accurate to the last bit in its own tail."""
    e = jnp.exp(neg_abs(x))
    big = 1 / (1 + e)
    small = e * big
    pos = x >= 0
    return jnp.where(pos, big, small), jnp.where(pos, small, big)
