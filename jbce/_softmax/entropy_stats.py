r"""Per-row statistics of a softmax's log-probability of the label and its entropy.

The few numbers per row behind :func:`jbce.linear_log_probs`, for a row of logits
:math:`x` over its included classes :math:`C` (not ``-inf``, not masked out) and label
:math:`y`: the shift, shifted log-sum-exp and target logit of :mod:`jbce._softmax.stats`, plus the
softmax mean of the shifted logits,

.. math::
    m = \max_{c \in C} x_c, \qquad
    \ell = \log \sum_{c \in C} e^{x_c - m}, \qquad
    t = x_y, \qquad
    a = \sum_{c \in C} p_c (x_c - m), \quad p_c = e^{x_c - m - \ell},

so that

.. math::
    \log p_y = (t - m) - \ell, \qquad
    H = -\sum_c p_c \log p_c = \ell - a

(both terms of :math:`H` are >= 0: no cancellation). Blocks of a row (vocabulary tiles,
shards) merge exactly: with a common shift :math:`m`, :math:`d_b = m_b - m` and block weights
:math:`\pi_b = e^{\ell_b + d_b - \ell}`,

.. math::
    \ell = \log \sum_b e^{\ell_b + d_b}, \qquad a = \sum_b \pi_b (a_b + d_b)

(:func:`merge`, :func:`combine_over_axis`): a convex combination of non-positive numbers,
the running sum of :math:`e^{x - m}(x - m)` rescaled when the running max changes. The
gradient w.r.t. the logits, for the cotangents :math:`\bar\ell, \bar t, \bar a` of the
statistics (:func:`logits_grad`), follows from
:math:`\partial p_c / \partial x_j = p_c([c = j] - p_j)`:

.. math::
    \frac{\partial}{\partial x_j}: \quad
    \bar\ell\, p_j + \bar t\, [j = y] + \bar a\, p_j \bigl(1 + (x_j - m) - a\bigr),

hence :math:`\partial \log p_y / \partial x_j = [j = y] - p_j` and
:math:`\partial H / \partial x_j = -p_j (x_j - \sum_c p_c x_c)`. The backward pass needs the
logits and three floats per row: :math:`m, \ell, a`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jbce._softmax import stats as _stats


class EntropyStats(NamedTuple):
    """Per-row statistics (see the module docstring).

    Attributes:
      shift: :math:`m` (0 for a row without classes); no gradient.
      lse: :math:`\\ell`; ``-inf`` for a row without classes.
      target: :math:`x_y` (0 if the label is not among these classes).
      mean: :math:`a = \\sum_C p (x - m)` (0 for a row without classes).
    """

    shift: jax.Array
    lse: jax.Array
    target: jax.Array | None
    mean: jax.Array


def empty(n: int, dtype) -> EntropyStats:
    """The statistics of ``n`` rows with no class yet (what a merge starts from)."""
    zero = jnp.zeros((n,), dtype)
    return EntropyStats(zero, jnp.full((n,), -jnp.inf, dtype), zero, zero)


def _col(v: jax.Array) -> jax.Array:
    return v[..., None]


def block_stats(x: jax.Array, labels: jax.Array, *, mask: jax.Array | None = None) -> EntropyStats:
    """:class:`EntropyStats` of a block ``x`` ``[..., k]`` of each row's classes.

    ``labels`` ``[...]`` index this block (outside ``[0, k)``: not here); ``mask`` (None or
    broadcastable boolean) takes classes out, as a ``-inf`` logit does.
    """
    st = _stats.block_stats(x, labels, mask=mask)
    if mask is not None:
        x = jnp.where(mask, x, -jnp.inf)
    p = _stats.probs(x, _col(st.shift), _col(st.lse))
    # A -inf class has p = 0: its (x - m) = -inf must not make 0 * -inf.
    mean = jnp.sum(jnp.where(p == 0, jnp.zeros((), x.dtype), p * (x - _col(st.shift))), axis=-1)
    return EntropyStats(st.shift, st.lse, st.target, mean)


def _share(lse_b, delta, lse):
    """A block's share :math:`\\pi_b = e^{\\ell_b + d_b - \\ell}` of the merged row (0 for
    an empty block, and in a row without classes)."""
    lse = jnp.where(lse == -jnp.inf, jnp.zeros((), lse.dtype), lse)
    return jnp.exp(lse_b + delta - lse)


def merge(a: EntropyStats, b: EntropyStats) -> EntropyStats:
    """The statistics of a row from those of two disjoint blocks of its classes (exact)."""
    base = _stats.merge(
        _stats.Stats(a.shift, a.lse, a.target), _stats.Stats(b.shift, b.lse, b.target)
    )
    da, db = a.shift - base.shift, b.shift - base.shift
    mean = _share(a.lse, da, base.lse) * (a.mean + da) + _share(b.lse, db, base.lse) * (b.mean + db)
    return EntropyStats(base.shift, base.lse, base.target, mean)


def combine_over_axis(local: EntropyStats, axis_name) -> EntropyStats:
    """The statistics of rows whose classes are sharded over ``axis_name``, from each shard's.

    One ``pmax`` and one ``psum``; the result is identical (replicated) on every shard. Not
    differentiable by design (the forward pass of a ``custom_vjp``).
    """
    inf = jnp.asarray(-jnp.inf, local.shift.dtype)
    m = jax.lax.pmax(jnp.where(local.lse == -jnp.inf, inf, local.shift), axis_name)
    m = jnp.where(m == -jnp.inf, jnp.zeros((), m.dtype), m)
    d = local.shift - m
    part = jnp.exp(local.lse + d)  # this shard's sum of exp(x - m)
    total, target, weighted = jax.lax.psum((part, local.target, part * (local.mean + d)), axis_name)
    mean = weighted / jnp.where(total == 0, jnp.ones((), total.dtype), total)
    return EntropyStats(m, jnp.log(total), target, mean)


def logits_grad(
    x: jax.Array,
    labels: jax.Array,
    saved: EntropyStats,
    g: EntropyStats,
    *,
    mask: jax.Array | None = None,
    rows: jax.Array | None = None,
) -> jax.Array:
    """``d x`` for the cotangents ``g`` of ``block_stats(x, labels, mask=mask)``.

    ``saved`` holds the row's full ``shift``, ``lse`` and ``mean`` (over all its classes), so
    ``p`` is this block's slice of the softmax; ``g.shift`` is ignored (every use is
    shift-invariant). ``rows`` (``[...]`` boolean) marks the rows that get a gradient: the
    others get exactly zero, whatever their logits (NaN included).
    """
    if mask is not None:
        x = jnp.where(mask, x, -jnp.inf)
    zero = jnp.zeros((), x.dtype)
    # The mean's term folds into the log-sum-exp's, per class: p_c (g_lse + g_a (1 + (x_c -
    # m) - a)); 0 on a -inf class (p = 0 there, and its slope would be -inf).
    slope = _col(g.lse) + _col(g.mean) * (1 + (x - _col(saved.shift)) - _col(saved.mean))
    slope = jnp.where(x == -jnp.inf, zero, slope)
    target = None
    if g.target is not None:
        cols = jax.lax.broadcasted_iota(labels.dtype, x.shape, x.ndim - 1)
        target = (cols == _col(labels), _col(g.target))
    dx, _ = _stats.softmax_grad(x, _col(saved.shift), _col(saved.lse), slope, target)
    if rows is not None:
        dx = jnp.where(_col(rows), dx, zero)
    return dx


def log_probs_and_entropy(st: EntropyStats) -> tuple[jax.Array, jax.Array]:
    """``(log p_y, H)`` per row; a row without classes gets ``-inf`` and 0."""
    has = st.lse != -jnp.inf  # NaN rows count (and stay NaN)
    zero = jnp.zeros((), st.lse.dtype)
    lse = jnp.where(has, st.lse, zero)
    log_p = jnp.where(has, (st.target - st.shift) - lse, -jnp.inf)
    return log_p, jnp.where(has, lse - st.mean, zero)
