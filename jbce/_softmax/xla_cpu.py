r"""The softmax row sums tuned for XLA:CPU: the numbers of the two-pass formula
(:func:`jbce._softmax.stats.row_reduce`), in kernels XLA:CPU fuses.

XLA:CPU compiles an elementwise chain that ends in a reduction into one YNNPACK kernel only if
every operation in it is supported; a compare, a select or a bool -> float convert is not, and
costs an extra kernel and an ``N x K`` temporary, and so does an ``N x K`` subexpression two
reductions share (XLA materialises it for both). The formula flags a positive weight on a
``-inf`` logit (an impossible soft target: ``s = -inf``) with a separate reduction of
``w * (x == -inf)``; here the flag is the bound of the weighted sum's clamp,

.. math::
    s = \sum_c w_c \max\left(x_c - m, -F (1 + |w_c| F)\right)

with :math:`F` the largest float: the bound is ``-F`` where ``w = 0`` (a ``-inf`` logit adds
``0 * -F = 0``, the formula's ``0 * inf = 0``) and ``-inf`` where ``w > 0`` (``w * -inf =
-inf``, the row flagged), and a finite ``x - m >= -F`` is never clamped, whatever the sign
of ``w``: 7 operations per element, where a 0/1 flag made of ``sign``s cost 6 more and a
``log1p`` (``bench/NOTES.md``, section 25). The passes that read the logits a second time
read them through an ``optimization_barrier``, so that XLA does not merge their ``x - m`` (or
a broadcast of ``m``) with the exp-sum's and materialise it.

What it buys (4096 x 32768 float32 soft labels on the 2-core dev box; ``python -m bench --only
ce_soft_4096 --dtypes float32``): the forward's temp from 1 GiB to 64 KiB (``bench/NOTES.md``,
section 25). Not the speed there: 0.55x optax's forward (three merged runs, NOTES section 28),
whose loss XLA:CPU fuses into one kernel at 4096 rows and more.
"""

from __future__ import annotations

import jax.numpy as jnp

from jbce._core import xla_cpu as cpu
from jbce._core.dtypes import to_compute


def two_pass(logits, to_x, weights, to_w):
    """``(m, sum_c exp(x_c - m'), W, s)`` as :func:`jbce._softmax.stats.row_reduce` returns
    them for ``x = to_x(logits)`` and ``w = to_w(weights)`` (``W, s`` None without weights).

    Each reduction reads the inputs as given, through its own barrier with the constants it
    uses (:mod:`jbce._core.xla_cpu`), bfloat16 rounded by :func:`jbce._core.xla_cpu.upcast`.
    """
    m = to_x(jnp.max(logits, axis=-1))  # on the raw logits: monotone, so max and cast commute
    big = jnp.finfo(m.dtype).max
    # The shift m' of the sums: the formula's (0 for an all -inf row) gives the same sums,
    # exp(-inf) = 0 and max(-inf, -F) = -F, whatever a row of -inf is shifted by.
    shift = jnp.maximum(m, -big)[..., None]
    v, k = cpu.apart(logits, cpu.constants(m.dtype))
    sumexp = jnp.sum(jnp.exp(to_x(cpu.upcast(v, k)) - shift), axis=-1)
    if weights is None:
        return m, sumexp, None, None
    one = jnp.ones((), m.dtype)
    v, w, shift, one, k = cpu.apart(logits, weights, shift, one, cpu.constants(m.dtype))
    x = to_x(cpu.upcast(v, k))
    w = jnp.broadcast_to(to_w(cpu.upcast(w, k, probabilities=True)), x.shape)
    s = jnp.sum(w * jnp.maximum(x - shift, _floor(w, one)), axis=-1)
    w_sum, k = cpu.apart(weights, cpu.constants(m.dtype))
    return (
        m,
        sumexp,
        jnp.sum(jnp.broadcast_to(to_w(cpu.upcast(w_sum, k, probabilities=True)), x.shape), -1),
        s,
    )


def term_sum(kind, logits, labels, alpha, theta, shift, lse, dtype):
    r"""``sum_c a_c phi(l_c)`` per row: :func:`jbce._softmax.terms.term_loss`'s value for
    probability labels without a mask, in one reduction XLA:CPU fuses.

    ``l = (x - shift) - lse`` (``lse`` already 0 in a row without classes), ``a = alpha y``
    (``alpha`` shaped to broadcast, or None) and ``phi`` the term ``kind`` of
    :data:`jbce._softmax.terms.TERMS`, written without a select: the focal factor
    ``(1 - p)^gamma`` is ``pow`` itself (``safe_pow`` differs from it in its derivatives
    only), the KL divergence's ``log y`` is ``log(y + 1 - sign(y))`` (0 where ``y = 0``, where
    the formula reads 1). The formula's ``xmul(a, phi(l))`` (``0 * inf = 0``) is
    ``a phi(max(l, floor(a)))`` (:func:`_floor`): the same products where ``l`` is finite, 0
    where ``a = 0`` (``phi(-F)`` is finite) and ``+inf`` where ``a > 0`` and ``l = -inf``.
    """
    one = jnp.ones((), dtype)
    static = isinstance(theta, (int, float))
    v, y, alpha, dyn, shift, lse, one, k = cpu.apart(
        logits, labels, alpha, None if static else theta, shift, lse, one, cpu.constants(dtype)
    )
    theta = theta if static else dyn
    x = to_compute(cpu.upcast(v, k), dtype)
    y = to_compute(cpu.upcast(y, k, probabilities=True), dtype)
    a = y if alpha is None else alpha * y
    lg = (x - shift[..., None]) - lse[..., None]
    g = jnp.maximum(lg, _floor(a, one))
    if kind == "ce":
        phi = -g
    elif kind == "kl":
        phi = jnp.log(y + (one - jnp.sign(y))) - g
    elif kind == "focal":  # a Python theta is a constant power: q * q for 2
        phi = -(jnp.power(-jnp.expm1(g), theta) * g)
    else:  # poly
        phi = -g + theta * -jnp.expm1(g)
    return jnp.sum(a * phi, axis=-1)


def _floor(w, one):
    """Where a term ``w t`` clamps ``t`` from below: at ``-F`` for ``w = 0`` (so a ``-inf``
    logit gives ``0 * -F = 0``, the formula's ``0 * inf = 0``) and at ``-inf`` for ``w != 0``
    (``-F (1 + |w| F)`` overflows for any ``w`` XLA:CPU does not flush to 0), where the
    formula's ``w * -inf`` is ``-inf`` (``+inf`` for a negative weight, as a finite-difference
    check makes); a finite ``t >= -F`` is never clamped, whatever the sign of ``w``."""
    big = jnp.finfo(w.dtype).max
    return -big * (one + jnp.abs(w) * big)
