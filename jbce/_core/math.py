"""Small arithmetic shared by the cores: products where a zero coefficient means "no term",
and the exact softplus and sigmoid pairs of a logit."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def xmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a * b`` with ``0 * inf = 0`` (and ``0 * nan = 0``): a zero coefficient switches a
    term off entirely, e.g. a zero label weight on a ``-inf`` logit, or an unused row's zero
    cotangent.

    Example:
      >>> import jax.numpy as jnp
      >>> from jbce._core.math import xmul
      >>> xmul(jnp.array([0.0, 2.0]), jnp.array([-jnp.inf, 3.0]))
      Array([0., 6.], dtype=float32)
    """
    return jnp.where(a == 0, jnp.zeros((), jnp.result_type(a, b)), a * b)


def log_ratio(lq: jax.Array, lp: jax.Array) -> jax.Array:
    """``log Q - log P`` per class, 0 where both are ``-inf`` (a class neither distribution has)."""
    both = (lq == -jnp.inf) & (lp == -jnp.inf)
    return jnp.where(both, jnp.zeros((), lq.dtype), lq - lp)


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
