"""Fused linear + softmax cross-entropy: the loss of ``hidden @ weight + bias`` without the logits.

For a language model the ``[N, V]`` logits dominate training memory. This API validates the
arguments and builds the loss from per-token softmax statistics (:mod:`jbce._softmax.stats`, the
same assembly as the materialised loss, so every option means exactly what it means there)
computed by the tiled implementation in :mod:`jbce._linear.chunked_xla` (on the walk of
:mod:`jbce._linear.walk`) or the Pallas kernels (:mod:`jbce._linear.pallas`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jbce._core import checks
from jbce._core.dtypes import compute_dtype
from jbce._core.reduce import reduce_loss
from jbce._linear import chunked_xla, walk
from jbce._softmax import stats as _stats


@dataclasses.dataclass(frozen=True)
class Fused:
    """The static options an implementation of the fused statistics takes."""

    dtype: jnp.dtype
    chunk_size: int | tuple[int, int] | None
    smoothing: bool
    axis_name: str | None
    gradient_filter: float | None


def _xla(hidden, weight, bias, labels, class_weights, cap, rows, fused: Fused):
    tiles = walk.tile_sizes(hidden.shape[0], weight.shape[1], fused.chunk_size, "cross_entropy")
    ce = chunked_xla.CrossEntropy(walk.Walk(fused.dtype, tiles, fused.axis_name), fused.smoothing)
    return chunked_xla.linear_stats(hidden, weight, bias, labels, class_weights, cap, rows, ce)


def _pallas(hidden, weight, bias, labels, class_weights, cap, rows, fused: Fused):
    # Imported here: Pallas costs about a quarter of a second to import, for every user of
    # jbce, and only this implementation needs it.
    from jbce._linear import pallas

    kernels = pallas.Kernels(
        fused.smoothing, fused.gradient_filter, fused.axis_name, pallas.interpreting()
    )
    return pallas.linear_stats(hidden, weight, bias, labels, class_weights, cap, rows, kernels)


# The implementations of the per-token statistics, by ``implementation=`` name.
IMPLEMENTATIONS = {
    # The tiled XLA loop (chunked_xla), on every platform.
    "xla": _xla,
    # Pallas kernels: Triton on CUDA GPUs, Mosaic on TPUs; on a CPU (no compiled Pallas
    # backend) the XLA loop, chosen when the program is lowered.
    "pallas": _pallas,
}
# What implementation=None picks, on every platform: the XLA loop, until the Pallas kernels
# are measured faster on hardware.
DEFAULT = "xla"


def linear_softmax_cross_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    weights: ArrayLike | None = None,
    class_weights: ArrayLike | None = None,
    ignore_index: int | None = -100,
    label_smoothing: float | ArrayLike = 0.0,
    z_loss: float | ArrayLike = 0.0,
    logit_softcap: float | ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: float | ArrayLike | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
    chunk_size: int | tuple[int, int] | None = None,
    axis_name: str | None = None,
    implementation: str | None = None,
    gradient_filter: float | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy of the logits ``hidden @ weight + bias``, never materialised.

    Equals :func:`jbce.softmax_cross_entropy_with_integer_labels` applied to
    ``hidden @ weight + bias`` with the same options: with
    :math:`x_{nc} = h_n \cdot W_{:c} + b_c` (soft-capped to :math:`c \tanh(x/c)` with
    ``logit_softcap``; a ``-inf`` bias stays ``-inf``), :math:`\ell_n = \log\sum_c e^{x_{nc}}`,
    class weights :math:`w` (1 without ``class_weights``) and label smoothing :math:`e` over
    :math:`V` classes,

    .. math::
        L_n = (1 - e)\, w_{y_n} (\ell_n - x_{n y_n})
              + \frac{e}{V} \sum_c w_c (\ell_n - x_{nc}) + z\, \ell_n^2

    ``reduction="mean"`` divides the sum by the number of non-ignored tokens, or with
    ``class_weights`` by :math:`\sum_n w_{y_n}` over them (times ``weights``), as PyTorch's
    ``cross_entropy(weight=...)`` does.

    The ``[N, V]`` logits only ever exist one ``[token_chunk, vocab_chunk]`` tile at a
    time: the forward pass keeps an online log-sum-exp, and the backward pass recomputes
    each tile and accumulates the gradients (in float32 for bf16/fp16 inputs; the logits
    of a tile are computed in float32 from bf16 inputs, not rounded to bf16). The backward
    pass saves the inputs and two floats per token (the shift and the shifted log-sum-exp).
    Use it when the logits would not fit, or would dominate memory (large vocabularies); it
    does one more ``hidden @ weight``-sized matmul than the materialised loss.

    A bias of ``-inf`` removes that class (vocabulary padding), as a ``-inf`` logit does in
    the materialised loss.

    Args:
      hidden: float array ``[..., D]``.
      weight: float array ``[D, V]`` (the layout of a Flax ``Dense`` kernel).
      labels: integer array ``[...]`` (``hidden``'s shape without ``D``).
      bias: optional ``[V]``.
      weights: optional per-token multiplier, broadcastable to ``labels``.
      class_weights: optional ``[V]`` weight per class (PyTorch's ``weight``); with
        ``axis_name`` each shard passes the slice of its own classes, like ``weight``'s
        columns. Differentiable.
      ignore_index: label value whose tokens are excluded (``None`` for none).
      label_smoothing: e in [0, 1]; a Python number or a scalar array (a jit argument).
      z_loss: coefficient >= 0 of the :math:`\ell^2` auxiliary loss (PaLM); number or array.
      logit_softcap: optional c > 0 for Gemma-style soft-capping; number or array.
      reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-token losses, ``labels``' shape).
      normalizer: optional denominator of ``"mean"`` in place of the count of included
        tokens (for gradient accumulation: the whole batch's count, so the micro-batch
        losses and their gradients add up to the whole batch's mean; see
        :ref:`gradient-accumulation`).
      batch_axis_name: optional mesh axis the tokens are sharded on (data parallelism,
        inside ``shard_map`` or ``pmap``): ``"sum"`` and ``"mean"`` are then over the
        global batch. Independent of ``axis_name``, the vocabulary's axis.
      chunk_size: vocabulary columns per tile (default ``min(V, 2048)``), or a pair
        ``(token_chunk, vocab_chunk)``. Without a token chunk it is
        ``min(N, 2**23 // vocab_chunk)``, so a tile holds at most 2**23 logits.
      implementation: ``"xla"`` (the tiled loop; also what ``None``, the default, picks
        on every platform today) or ``"pallas"``: Pallas kernels that keep each logits
        tile on chip (Triton on GPUs, Mosaic on TPUs; on other platforms the tiled loop).
        The kernels compute in float32 (float64 inputs are refused) and choose their own
        block sizes (``chunk_size`` must be None).
        Not the default until measured faster on hardware. First-order derivatives only:
        its second derivatives raise an error naming it (``"xla"``'s are exact).
      gradient_filter: ``"pallas"`` only: skip, in the backward pass, a tile that holds no
        token's label and whose every gradient entry :math:`|\partial L / \partial x_{nc}|`
        is below this threshold times its token's label term :math:`w_{y_n} |\bar g_n|`
        (:math:`\bar g_n` the cotangent of the token's loss; the size of the label's own
        gradient entry). So each entry it drops is below ``gradient_filter`` times
        :math:`w_{y_n} |\bar g_n|`, whatever the class weights or z-loss; without them the
        test is Cut Cross-Entropy's :math:`p_{nc}` < threshold (its default is
        ``jnp.finfo(dtype).eps / 32`` for the inputs' dtype: 2**-12 for bfloat16). A token
        whose label has class weight 0 is never filtered. ``None`` (the default) filters
        nothing: the gradient is exact. With label smoothing no tile is skipped (every class
        has a gradient).
      axis_name: mesh axis over which ``weight``'s (and ``bias``'s) vocabulary axis is
        sharded: each shard passes its ``[D, V / n]`` columns (and ``[V / n]`` of ``bias`` and
        ``class_weights``; shard ``i`` owning classes
        ``[i V / n, (i+1) V / n)``), the labels are global class ids and the loss comes out
        replicated. Inside ``shard_map`` the gradient of a replicated ``hidden`` is summed
        over the shards; under ``pmap``/``vmap`` each shard returns its classes' share.

    Returns:
      A float32 scalar (float64 for float64 inputs), or the per-token losses for ``"none"``.

    Example:
      >>> import jax, jax.numpy as jnp, jbce
      >>> hidden = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> weight = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> jbce.linear_softmax_cross_entropy(hidden, weight, jnp.array([0, -100]))
      Array(0.2395..., dtype=float32)
      >>> grads = jax.grad(jbce.linear_softmax_cross_entropy, (0, 1))(
      ...     hidden, weight, jnp.array([0, 1]))
      >>> [g.shape for g in grads]
      [(2, 2), (2, 3)]
    """
    hidden, weight, labels, bias, bshape = checks.linear_operands(hidden, weight, labels, bias)
    checks.check_reduction(reduction)
    checks.implementation(implementation, IMPLEMENTATIONS)
    checks.check_chunk_size(chunk_size)
    ignore_index = checks.check_ignore_index(ignore_index)
    e = checks.hyperparameter("label_smoothing", label_smoothing)
    z = checks.hyperparameter("z_loss", z_loss)
    cap = None
    if logit_softcap is not None:
        cap = checks.hyperparameter("logit_softcap", logit_softcap)
    dt = compute_dtype(hidden, weight, bias, weights, class_weights, e, z, cap)
    (n, _), v = hidden.shape, weight.shape[1]
    num_classes = v if axis_name is None else v * checks.axis_size("axis_name", axis_name)
    weights, cw, rows = checks.integer_label_options(
        labels, bshape, v, weights=weights, class_weights=class_weights,
        ignore_index=ignore_index, num_classes=num_classes, dtype=dt,
    )  # fmt: skip
    checks.pallas_options(implementation, chunk_size, gradient_filter, dt)
    glob = {"normalizer": normalizer, "batch_axis_name": batch_axis_name}
    if n == 0:
        loss = jnp.zeros(bshape, dt)
        return reduce_loss(loss, reduction=reduction, weights=weights, **glob)
    threshold = checks.static_number(gradient_filter)
    fused = Fused(dt, chunk_size, not checks.is_zero(e), axis_name, threshold)
    st = IMPLEMENTATIONS[implementation or DEFAULT](
        hidden, weight, bias, labels.reshape(n), cw,
        None if cap is None else jnp.asarray(cap, dt),
        None if rows is None else rows.reshape(n), fused,
    )  # fmt: skip
    st = _stats.Stats(*(None if f is None else f.reshape(bshape) for f in st))
    loss, has = _stats.loss_terms(
        st, labels, num_classes=num_classes, label_smoothing=e, z_loss=z,
        class_weighted=cw is not None,
    )  # fmt: skip
    keep = has if rows is None else has & rows
    return reduce_loss(
        loss,
        reduction=reduction,
        weights=weights,
        where=keep,
        denominator_weights=None if cw is None else st.target_weight,
        **glob,
    )
