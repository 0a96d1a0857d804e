"""Information measures behind cross-entropy: entropy, KL divergence (CE = H + KL) and the
generalised Jensen-Shannon divergence used for distillation.

The divergences are built on the cores of :mod:`jbce._softmax.terms`, whose derivatives
(forward and reverse mode, :mod:`jbce._core.autodiff`) save the inputs and a few floats per row,
never a distribution; weights, masks and
reductions are applied by :mod:`jbce._core.reduce`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jbce._core import autodiff, checks
from jbce._core.dtypes import compute_dtype, to_compute
from jbce._core.reduce import reduce_loss
from jbce._softmax.inputs import batch_shape, soft_inputs, to_rows
from jbce._softmax.jsd import mode as jsd_mode
from jbce._softmax.terms import Term, jsd_loss, term_loss


def _neg_xlogx_value(p: jax.Array) -> jax.Array:
    """-p log p elementwise, with 0 log 0 = 0."""
    # 0 where p == 0; NaN stays NaN.
    return -jnp.where(p == 0, 0, p * jnp.log(jnp.where(p == 0, 1, p)))


def _neg_xlogx_tangent(primals, _, tangents):
    (p,), (dp,) = primals, tangents
    # d/dp (-p log p) = -(log p + 1); at p = 0 the log is taken of the smallest normal
    # number instead of 0, so the derivative is large but finite.
    tiny = jnp.finfo(p.dtype).tiny
    coef = -(jnp.log(jnp.maximum(p, tiny)) + 1)
    return autodiff.total(p.shape, p.dtype, autodiff.contract(coef, dp, p.ndim))


# Residual in reverse mode: the input only.
_neg_xlogx = autodiff.lean_jvp(_neg_xlogx_value, _neg_xlogx_tangent)


def entropy(probs: ArrayLike, *, axis: int | Sequence[int] = -1) -> jax.Array:
    r"""Shannon entropy (in nats) of distributions along ``axis``.

    .. math:: H(p) = -\sum_c p_c \log p_c, \qquad 0 \log 0 = 0

    Args:
      probs: float array of probabilities; bf16/fp16 computed in float32.
      axis: the class axis, or a tuple of class axes.

    Returns:
      float32 entropies with the class axes removed. The gradient ``-(log p + 1)`` is
      finite at ``p = 0`` (the log is clamped at the smallest normal float).

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> jbce.entropy(jnp.array([0.5, 0.5, 0.0]))
      Array(0.693147..., dtype=float32)
    """
    probs = checks.as_array("probs", probs)
    checks.check_float("probs", probs)
    axes = checks.canonical_axes(axis, probs.ndim, "probs")
    p = to_rows(to_compute(probs, compute_dtype(probs)), axes)
    checks.debug_check_unit_interval("probs", p)
    h = jnp.sum(_neg_xlogx(p), axis=-1)
    return h.reshape(batch_shape(probs.shape, axes))


def _reduce(loss, has, inp, reduction, normalizer, batch_axis_name):
    """``reduce_loss`` over the rows with a class, with ``"batchmean"``: the sum over the size
    of the first batch axis."""
    return reduce_loss(
        loss, reduction=reduction, weights=inp.weights, where=checks.both(inp.rows, has),
        normalizer=normalizer, batch_axis_name=batch_axis_name,
        batch_size=inp.bshape[0] if inp.bshape else 1,
    )  # fmt: skip


def kl_divergence(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | Sequence[int] = -1,
    log_labels: bool = False,
    weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: float | ArrayLike | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""KL divergence of ``softmax(logits)`` from the target distribution ``labels``.

    .. math::
        \mathrm{KL}(y \,\|\, q) = \sum_c y_c \left(\log y_c - \log q_c\right), \qquad
        q = \mathrm{softmax}(x), \quad 0 \log 0 = 0

    So cross-entropy = entropy + KL: minimising either in ``logits`` is the same. Logits
    first, as in every other jbce loss (since 0.2; it was ``kl_divergence(labels, logits)``).
    With normalised log-probabilities as ``logits`` (``softmax(log q) = q``) this equals
    optax's ``kl_divergence(log_predictions, targets)``; with ``log_labels=True`` (``labels``
    are :math:`\log y`, ``-inf`` for 0) optax's ``kl_divergence_with_log_targets`` and
    PyTorch's ``F.kl_div(log_q, log_y, log_target=True)``. A ``-inf``
    logit under a zero label contributes nothing; under a positive label the divergence is
    ``+inf``. A row whose every class is ``-inf`` (or masked) is excluded from the mean, as a
    where-masked row is.

    For normalised targets the divergence is :math:`\ge 0`, up to rounding: it is a sum of
    terms of both signs, so matching distributions give a few ulps of the terms either side
    of 0 (e.g. :math:`-10^{-7}` in float32), never clamped, so that the value and its
    derivatives stay those of the same smooth function.

    Reductions: ``"none"`` (per example), ``"sum"``, ``"mean"`` (over included examples) and
    ``"batchmean"``, PyTorch's: the sum divided by the size of the first batch axis (the
    number of rows for ``[N, K]`` logits, where it equals ``"mean"``; for ``[N, K, H]``
    logits with ``axis=1``, the sum over ``N`` as ``F.kl_div(..., reduction="batchmean")``
    of ``[N, K, H]`` input gives), whatever ``where`` excludes. PyTorch's own
    ``reduction="mean"`` averages over every element, classes included, which is not a KL.

    Args:
      logits: float array ``[..., K, ...]`` of unnormalised log-probabilities.
      labels: target distributions (or their logs with ``log_labels``), the logits' shape.
      axis: the class axis, or a tuple of class axes.
      log_labels: ``labels`` are log-probabilities.
      weights: optional per-example multiplier (the logits' batch shape).
      where: optional boolean mask, per example or per logit (False takes a class out of
        the softmax and drops its target).
      reduction: ``"mean"``, ``"sum"``, ``"none"`` or ``"batchmean"``.
      normalizer: optional denominator of ``"mean"`` in place of the included count (for
        gradient accumulation: the whole batch's count, so the micro-batch losses and
        their gradients add up to the whole batch's mean; see :ref:`gradient-accumulation`).
      batch_axis_name: optional mesh axis the batch is sharded on, inside ``shard_map``
        or ``pmap``: ``"sum"`` and ``"mean"`` are then over the global batch.

    Returns:
      A float32 scalar (float64 for float64 inputs), or the per-example divergences (>= 0 to
      rounding) for ``"none"``.

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> y = jnp.array([[0.5, 0.5, 0.0]])
      >>> jbce.kl_divergence(jnp.log(jnp.array([[0.25, 0.5, 0.25]])), y)
      Array(0.346573..., dtype=float32)
      >>> jbce.kl_divergence(jnp.zeros((1, 3)), jnp.log(y), log_labels=True)
      Array(0.405465..., dtype=float32)
    """
    inp = soft_inputs(
        logits, labels, axis=axis, weights=weights, where=where,
        kind="log_labels" if log_labels else "labels",
    )  # fmt: skip
    term = Term("kl", inp.dtype, bool(log_labels))
    loss, has = term_loss(inp.x, inp.labels, None, None, inp.mask, inp.rows, term)
    return _reduce(loss, has, inp, reduction, normalizer, batch_axis_name)


def jensen_shannon_divergence(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    beta: float | ArrayLike = 0.5,
    temperature: float | ArrayLike = 1.0,
    axis: int | Sequence[int] = -1,
    weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: float | ArrayLike | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""Generalised Jensen-Shannon divergence between a student and a teacher (distillation).

    With :math:`Q = \mathrm{softmax}(x / T)` (the student, ``logits``) and
    :math:`P = \mathrm{softmax}(x_t / T)` (the teacher, ``teacher_logits``):

    .. math::
        \mathrm{JSD}_\beta = \beta\, \mathrm{KL}(P \,\|\, M)
            + (1 - \beta)\, \mathrm{KL}(Q \,\|\, M), \qquad M = \beta P + (1 - \beta) Q

    for :math:`0 < \beta < 1` (``beta=0.5`` is the symmetric JSD, at most :math:`\log 2`).
    The formula tends to 0 at both ends; as in GKD (and TRL's ``generalized_jsd_loss``) the
    ends are defined as the two KL directions instead:

    - ``beta=0``: the **forward** KL :math:`\mathrm{KL}(P \,\|\, Q)` (teacher || student,
      ``kl_divergence(logits / T, softmax(teacher_logits / T))``, mean-seeking);
    - ``beta=1``: the **reverse** KL :math:`\mathrm{KL}(Q \,\|\, P)` (student || teacher,
      mode-seeking).

    A traced ``beta`` picks the same branch by value (with ``where``: no conditional), and
    its gradient is :math:`\mathrm{KL}(P\|M) - \mathrm{KL}(Q\|M)` inside (0, 1), 0 at the ends.
    No :math:`T^2` factor is applied (multiply by ``temperature ** 2`` for Hinton's scaling).
    :math:`\log P - \log M` is evaluated from :math:`d = \log Q - \log P` as
    :math:`-\log(\beta + (1 - \beta) e^d)` with ``log1p``/``expm1``: finite and exact for a
    class that is ``-inf`` in one of the two (``M`` keeps the other's mass), and accurate
    where the two nearly agree. A class ``-inf`` in both drops out. Gradients flow to both
    logits (wrap the teacher in ``jax.lax.stop_gradient`` to freeze it), ``beta`` and
    ``temperature``; the backward pass saves the inputs and four floats per example.

    Args:
      logits: float array ``[..., K, ...]``, the student's logits.
      teacher_logits: float array, the logits' shape.
      beta: weight in [0, 1] of the teacher's term; a Python number or a scalar array.
      temperature: T > 0 dividing both logits; a Python number or a scalar array.
      axis: the class axis, or a tuple of class axes.
      weights: optional per-example multiplier (the logits' batch shape).
      where: optional boolean mask, per example or per logit (a class out of both softmaxes).
      reduction: ``"mean"``, ``"sum"``, ``"none"`` or ``"batchmean"`` (see
        :func:`kl_divergence`).
      normalizer: optional denominator of ``"mean"`` in place of the included count (for
        gradient accumulation: the whole batch's count, so the micro-batch losses and
        their gradients add up to the whole batch's mean; see :ref:`gradient-accumulation`).
      batch_axis_name: optional mesh axis the batch is sharded on, inside ``shard_map``
        or ``pmap``: ``"sum"`` and ``"mean"`` are then over the global batch.

    Returns:
      A float32 scalar (float64 for float64 inputs), or the per-example divergences for
      ``"none"``.

    References:
      Agarwal et al., "On-Policy Distillation of Language Models: Learning from
      Self-Generated Mistakes" (GKD), ICLR 2024.

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> student = jnp.array([[0.0, -jnp.inf]])
      >>> teacher = jnp.array([[-jnp.inf, 0.0]])
      >>> jbce.jensen_shannon_divergence(student, teacher)  # disjoint supports: log 2
      Array(0.693147..., dtype=float32)
    """
    checks.check_float("teacher_logits", checks.as_array("teacher_logits", teacher_logits))
    inp = soft_inputs(
        logits, teacher_logits, axis=axis, weights=weights, where=where,
        options=(beta, temperature), kind="teacher_logits",
    )  # fmt: skip
    b = checks.hyperparameter("beta", beta)
    temp = checks.hyperparameter("temperature", temperature)
    b_, t_ = jnp.asarray(b, inp.dtype), jnp.asarray(temp, inp.dtype)
    loss, has = jsd_loss(inp.x, inp.labels, b_, t_, inp.mask, inp.rows, jsd_mode(b), inp.dtype)
    return _reduce(loss, has, inp, reduction, normalizer, batch_axis_name)
