"""Fused linear + distillation loss: the JSD of two models' ``hidden @ weight`` without the logits.

Distilling a language model compares two ``[N, V]`` softmaxes, twice the memory of a fused
cross-entropy's logits. This API validates the arguments and reduces the per-token
divergences computed by the tiled implementation in :mod:`jbce._linear.distill_xla` (on the walk
of :mod:`jbce._linear.walk`), which uses the formulas of :func:`jbce.jensen_shannon_divergence`
(:mod:`jbce._softmax.jsd`), so every option means exactly what it means there.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jbce._core import checks, sharding
from jbce._core.dtypes import compute_dtype
from jbce._core.reduce import reduce_loss
from jbce._linear import walk as _walk
from jbce._linear.distill_xla import Distill, distillation_rows
from jbce._softmax.jsd import mode as jsd_mode

IMPLEMENTATIONS = ("xla",)


def linear_distillation_loss(
    hidden: ArrayLike,
    weight: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_weight: ArrayLike,
    *,
    labels: ArrayLike | None = None,
    beta: float | ArrayLike = 0.5,
    temperature: float | ArrayLike = 1.0,
    bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
    ignore_index: int | None = -100,
    weights: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: float | ArrayLike | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
    chunk_size: int | tuple[int, int] | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Generalised Jensen-Shannon divergence between a student's and a teacher's output
    layers, the ``[N, V]`` logits of neither ever materialised.

    Equals :func:`jbce.jensen_shannon_divergence` of the logits ``hidden @ weight + bias``
    (the student) and ``teacher_hidden @ teacher_weight + teacher_bias`` (the teacher) with
    the same ``beta`` and ``temperature``: with :math:`Q = \mathrm{softmax}((h W + b) / T)`
    and :math:`P = \mathrm{softmax}((h_t W_t + b_t) / T)` per token,

    .. math::
        \mathrm{JSD}_\beta = \beta\, \mathrm{KL}(P \,\|\, M)
            + (1 - \beta)\, \mathrm{KL}(Q \,\|\, M), \qquad M = \beta P + (1 - \beta) Q

    for :math:`0 < \beta < 1`, and the two KL directions at the ends (as in GKD):
    ``beta=0`` the forward :math:`\mathrm{KL}(P \,\|\, Q)` (teacher || student), ``beta=1``
    the reverse :math:`\mathrm{KL}(Q \,\|\, P)`. No :math:`T^2` factor is applied.

    The logits exist one tile at a time. The forward pass walks blocks of tokens (whole
    vocabulary rows by default, at most 2**23 logits per model): an online log-sum-exp of
    both models, then the divergence given both; each model's logits are computed once.
    The backward pass recomputes the tiles and accumulates the gradients; it saves the
    inputs and at most eight floats per token. Gradients flow to every differentiated
    input: the student's ``hidden``, ``weight`` and ``bias`` as usual, and the teacher's
    only if they are differentiated too (an argument of ``jax.grad`` or a closed-over
    variable that is). A teacher that is not (a constant, or wrapped in
    ``jax.lax.stop_gradient``) costs no gradient work: the teacher is not differentiated
    unless asked. ``beta`` and ``temperature`` get their gradients when they are arrays
    that are differentiated.

    A bias of ``-inf`` removes that class from its model (vocabulary padding) exactly, as a
    ``-inf`` logit does in :func:`jbce.jensen_shannon_divergence`; a class ``-inf`` in both
    drops out.

    Args:
      hidden: the student's float array ``[..., D]``.
      weight: the student's ``[D, V]`` (a Flax ``Dense`` kernel).
      teacher_hidden: the teacher's ``[..., D_t]`` (``hidden``'s batch shape; ``D_t`` may
        differ from ``D``).
      teacher_weight: the teacher's ``[D_t, V]``.
      labels: optional integer array of ``hidden``'s batch shape, used only to mark ignored
        tokens (those equal to ``ignore_index``).
      beta: weight in [0, 1] of the teacher's term; a Python number or a scalar array.
      temperature: T > 0 dividing both models' logits; a Python number or a scalar array.
      bias: optional ``[V]`` of the student.
      teacher_bias: optional ``[V]`` of the teacher.
      ignore_index: label value of ignored tokens (``None``: none ignored).
      weights: optional per-token multiplier, broadcastable to the batch shape.
      reduction: ``"mean"`` (over tokens that are not ignored; weights multiply, as in every
        jbce loss), ``"sum"`` or ``"none"`` (per-token divergences, 0 for ignored tokens).
      normalizer: optional denominator of ``"mean"`` in place of the count of tokens that
        are not ignored (gradient accumulation: the whole batch's count, so the
        micro-batch losses and their gradients add up to the whole batch's mean).
      batch_axis_name: optional mesh axis the tokens are sharded on (data parallelism,
        inside ``shard_map`` or ``pmap``): ``"sum"`` and ``"mean"`` are then over the
        global batch. Independent of ``axis_name``, the vocabulary's axis.
      chunk_size: vocabulary columns per tile (default: whole rows forward, 2048 backward),
        or a pair ``(token_chunk, vocab_chunk)`` for both passes. Without a token chunk a
        tile holds at most 2**23 logits.
      axis_name: mesh axis over which both weights' (and biases') vocabulary axis is
        sharded: each shard passes its ``[D, V / n]`` and ``[D_t, V / n]`` columns (shard
        ``i`` owning classes ``[i V / n, (i+1) V / n)``) and the loss comes out replicated.
        Inside ``shard_map`` the gradient of a replicated ``hidden`` is summed over the
        shards; under ``pmap``/``vmap`` each shard returns its classes' share.

    Returns:
      A float32 scalar (float64 for float64 inputs), or the per-token divergences for
      ``"none"``.

    References:
      Agarwal et al., "On-Policy Distillation of Language Models: Learning from
      Self-Generated Mistakes" (GKD), ICLR 2024.

    Example:
      >>> import jax, jax.numpy as jnp, jbce
      >>> hidden = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> weight = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> teacher_hidden = jnp.array([[1.0], [2.0]])
      >>> teacher_weight = jnp.array([[1.0, 0.0, -1.0]])
      >>> jbce.linear_distillation_loss(hidden, weight, teacher_hidden, teacher_weight)
      Array(0.1281..., dtype=float32)
      >>> jbce.linear_distillation_loss(hidden, weight, teacher_hidden, teacher_weight,
      ...                               beta=0.0, labels=jnp.array([3, -100]))
      Array(0.0766..., dtype=float32)
      >>> grads = jax.grad(jbce.linear_distillation_loss, (0, 1))(
      ...     hidden, weight, teacher_hidden, teacher_weight)
      >>> [g.shape for g in grads]
      [(2, 2), (2, 3)]
    """
    hidden, weight, teacher_hidden, teacher_weight, bias, teacher_bias, bshape = (
        checks.distillation_operands(
            hidden, weight, teacher_hidden, teacher_weight, bias, teacher_bias
        )
    )
    checks.check_reduction(reduction)
    d, v = weight.shape
    dt_ = teacher_hidden.shape[-1]
    checks.check_chunk_size(chunk_size)
    ignore_index = checks.check_ignore_index(ignore_index)
    rows = None
    if labels is not None:
        labels = checks.integer_labels("labels", labels)
        checks.check_shape("labels", labels, bshape, f"to match hidden {hidden.shape} without D")
        if ignore_index is not None:
            rows = labels != ignore_index
    b = checks.hyperparameter("beta", beta)
    temp = checks.hyperparameter("temperature", temperature)
    dt = compute_dtype(hidden, weight, teacher_hidden, teacher_weight, bias, teacher_bias,
                       weights, b, temp)  # fmt: skip
    if weights is not None:
        checks.check_broadcastable("weights", weights, "hidden's batch shape", bshape)
        weights = checks.as_array("weights", weights).astype(dt)
    mode = jsd_mode(b)
    glob = {"normalizer": normalizer, "batch_axis_name": batch_axis_name}
    n = math.prod(bshape)
    if n == 0:
        loss = jnp.zeros(bshape, dt)
        return reduce_loss(loss, reduction=reduction, weights=weights, where=rows, **glob)
    tiles = _walk.tile_sizes(n, v, chunk_size, "distillation")
    opts = Distill(mode, _walk.Walk(dt, tiles, axis_name))
    core = distillation_rows
    if sharding.varying_like(
        hidden, weight, teacher_hidden, teacher_weight, bias, teacher_bias
    ).axes:
        # Inside shard_map: under jit (inlined into a caller's jit), as shard_map's eager mode
        # does not support the custom VJP's symbolic zeros (which tell which inputs are
        # differentiated, so that a frozen teacher costs no gradient work).
        core = jax.jit(core, static_argnums=(4,))
    loss = core(
        _walk.Model(hidden.reshape(n, d), weight, bias),
        _walk.Model(teacher_hidden.reshape(n, dt_), teacher_weight, teacher_bias),
        jnp.asarray(b, dt), jnp.asarray(temp, dt), opts,
    )  # fmt: skip
    loss = loss.reshape(bshape)
    return reduce_loss(loss, reduction=reduction, weights=weights, where=rows, **glob)
