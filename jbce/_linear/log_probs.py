"""Fused per-token log-probabilities and entropies of ``softmax((hidden @ weight + bias) / T)``.

What policy-gradient objectives (PPO, GRPO) need of a language model's head, without the
``[N, V]`` logits: this API validates the arguments and assembles both outputs from per-token
statistics (:mod:`jbce._softmax.entropy_stats`) computed by the tiled loop that
:func:`jbce.linear_softmax_cross_entropy` uses (:mod:`jbce._linear.chunked_xla`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jbce._core import checks
from jbce._core.dtypes import compute_dtype
from jbce._linear import chunked_xla
from jbce._linear import walk as _walk
from jbce._softmax import entropy_stats as _entropy_stats


def linear_log_probs(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    chunk_size: int | tuple[int, int] | None = None,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Per-token log-probability of the label and entropy, of logits never materialised.

    With the logits at temperature :math:`T` (the bias is part of the logits, so this is
    the distribution a sampler at temperature :math:`T` draws from),

    .. math::
        x_{nc} = (h_n \cdot W_{:c} + b_c) / T, \qquad
        \log p_{n y_n} = x_{n y_n} - \log\sum_c e^{x_{nc}}, \qquad
        H_n = -\sum_c p_{nc} \log p_{nc} = \log\sum_c e^{x_{nc}} - \sum_c p_{nc} x_{nc},

    equal to ``jax.nn.log_softmax(x)[n, y_n]`` and the entropy of ``jax.nn.softmax(x)``,
    both differentiable (reverse mode). As in :func:`jbce.linear_softmax_cross_entropy`, the
    ``[N, V]`` logits only ever exist one ``[token_chunk, vocab_chunk]`` tile at a time: the
    forward pass keeps an online log-sum-exp and the running softmax mean of the logits, the
    backward pass recomputes each tile, with

    .. math::
        \frac{\partial \log p_{ny}}{\partial x_{nj}} = [j = y] - p_{nj}, \qquad
        \frac{\partial H_n}{\partial x_{nj}} = -p_{nj} \Bigl(x_{nj} - \sum_c p_{nc} x_{nc}\Bigr).

    The backward pass saves the inputs and three floats per token (the shift, the shifted
    log-sum-exp and the softmax mean of the shifted logits). Computed in float32 (float64
    for float64 inputs) from bf16/fp16 inputs; gradients come back in each input's dtype.

    There is no ``ignore_index`` and no reduction: per-token masks (padding, prompt tokens)
    and the objective's mean are the caller's, e.g. ``jnp.where(mask, log_probs, 0)``. A
    label outside ``[0, V)`` makes that token's log-probability NaN (padding labels must be
    replaced by any valid id before the call); under ``jax.experimental.checkify`` it is
    reported as an error. A bias of ``-inf`` removes that class (vocabulary padding): it
    has probability 0, adds nothing to the entropy and gets zero gradient; a token whose
    every class is removed gets log-probability ``-inf`` and entropy 0.

    Args:
      hidden: float array ``[..., D]``.
      weight: float array ``[D, V]`` (the layout of a Flax ``Dense`` kernel).
      labels: integer array ``[...]`` (``hidden``'s shape without ``D``): the sampled tokens.
      bias: optional ``[V]``.
      temperature: T > 0; a Python number or a scalar array (a jit argument, differentiable).
      chunk_size: vocabulary columns per tile (default ``min(V, 2048)``), or a pair
        ``(token_chunk, vocab_chunk)``, as in :func:`jbce.linear_softmax_cross_entropy`.
      axis_name: mesh axis over which ``weight``'s (and ``bias``'s) vocabulary axis is
        sharded: each shard passes its ``[D, V / n]`` columns (shard ``i`` owning classes
        ``[i V / n, (i+1) V / n)``), the labels are global class ids and both outputs come
        out replicated. Inside ``shard_map`` the gradient of a replicated ``hidden`` is
        summed over the shards; under ``pmap``/``vmap`` each shard returns its classes' share.

    Returns:
      ``(log_probs, entropy)``, each of ``labels``' shape, float32 (float64 for float64
      inputs).

    Example:
      >>> import jax, jax.numpy as jnp, jbce
      >>> hidden = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> weight = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> log_probs, entropy = jbce.linear_log_probs(hidden, weight, jnp.array([0, 1]))
      >>> log_probs
      Array([-0.2395..., -0.5514...], dtype=float32)
      >>> entropy
      Array([0.6655..., 0.9753...], dtype=float32)
      >>> def objective(hidden, weight):  # a policy-gradient step with an entropy bonus
      ...     y = jnp.array([0, 1])
      ...     lp, h = jbce.linear_log_probs(hidden, weight, y, temperature=0.7)
      ...     return -jnp.mean(lp * jnp.array([1.0, -0.5]) + 0.01 * h)
      >>> [g.shape for g in jax.grad(objective, (0, 1))(hidden, weight)]
      [(2, 2), (2, 3)]
    """
    hidden, weight, labels, bias, bshape = checks.linear_operands(hidden, weight, labels, bias)
    checks.check_chunk_size(chunk_size)
    t = checks.hyperparameter("temperature", temperature)
    dt = compute_dtype(hidden, weight, bias, t)
    (n, _), v = hidden.shape, weight.shape[1]
    num_classes = v if axis_name is None else v * checks.axis_size("axis_name", axis_name)
    checks.debug_check_labels("labels", labels, num_classes, None)
    if n == 0:
        return jnp.zeros(bshape, dt), jnp.zeros(bshape, dt)
    tiles = _walk.tile_sizes(n, v, chunk_size, "log_probs")
    walk = _walk.Walk(dt, tiles, axis_name)
    temp = None if checks.static_number(t) == 1 else jnp.asarray(t, dt)
    st = chunked_xla.linear_entropy_stats(hidden, weight, bias, labels.reshape(n), temp, walk)
    log_p, entropy = _entropy_stats.log_probs_and_entropy(
        _entropy_stats.EntropyStats(*(f.reshape(bshape) for f in st))
    )
    in_range = (labels >= 0) & (labels < num_classes)
    return jnp.where(in_range, log_p, jnp.nan), entropy
