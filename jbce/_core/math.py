"""Small arithmetic shared by the cores: products where a zero coefficient means "no term"."""

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
