r"""Contrastive losses over a batch of pairs: CLIP's softmax and SigLIP's sigmoid cross-entropy.

Both are cross-entropies over the ``[B, B]`` similarity matrix of two embedding batches. This
API validates the arguments, picks an implementation (:data:`IMPLEMENTATIONS`: the tiled
walk on one device, or the ring across the devices of ``batch_axis_name``) and builds the
loss from the per-row (and per-column) statistics they return (the soft-label
cross-entropy of :mod:`jbce._softmax.stats`) with the shared reductions
(:func:`jbce._core.reduce.reduce_loss`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jbce._contrastive import chunked_xla, ring
from jbce._core import checks
from jbce._core.dtypes import compute_dtype
from jbce._core.reduce import reduce_loss
from jbce._softmax import stats as _stats

# The custom_vjp cores: (x, y, ids, scale, bias, Config) -> statistics.
IMPLEMENTATIONS = {
    "chunked_xla": chunked_xla.similarity_stats,  # one device: the whole matrix in tiles
    "ring": ring.similarity_stats,  # the batch sharded on a mesh axis: blocks around a ring
}


def clip_loss(
    x: ArrayLike,
    y: ArrayLike,
    *,
    scale: float | ArrayLike,
    ids: ArrayLike | None = None,
    reduction: str = "mean",
    batch_axis_name: str | tuple[str, ...] | None = None,
    chunk_size: int | tuple[int, int] | None = None,
) -> jax.Array:
    r"""CLIP's symmetric contrastive loss, without the ``[B, B]`` similarity matrix.

    With the logits :math:`L = s\, x y^\top` (``scale`` :math:`s`) and targets :math:`q`
    (the identity, or with ``ids`` :math:`q_{ij} = [\mathrm{id}_i = \mathrm{id}_j] / n_i`,
    :math:`n_i` the number of pairs sharing pair :math:`i`'s id: duplicate captions share
    the target mass uniformly),

    .. math::
        \ell_i = \frac{1}{2} \Big[ \log \sum_j e^{L_{ij}} - \sum_j q_{ij} L_{ij}
                 + \log \sum_j e^{L_{ji}} - \sum_j q_{ji} L_{ji} \Big]

    (the image-to-text and text-to-image cross-entropies of pair :math:`i`) and the loss is
    the mean of :math:`\ell_i` over the (global) batch. Equals open_clip's ``ClipLoss``
    and the usual ``(CE(L, arange) + CE(L.T, arange)) / 2`` without ``ids``.

    The matrix only ever exists one ``[chunk, chunk]`` tile at a time: the forward pass keeps
    an online log-sum-exp for every row and every column (one matmul per tile for both), and
    the backward pass recomputes each tile from the two floats per row and per column it
    saved. Inside ``shard_map`` or ``pmap`` with the batch sharded on ``batch_axis_name``,
    the ``y`` blocks travel a ring of ``ppermute``\ s (``n - 1`` steps, each transfer issued
    before the step's tiles so that it can overlap them): per-device memory is
    ``O(B/n (D + chunk))`` on ``n`` devices, and the loss is the global batch's on every
    device.

    The loss does not normalise the embeddings: pass unit vectors for cosine similarities.
    open_clip's parameterisation: ``scale = exp(t)`` with a learnable ``t`` initialised to
    ``log(1 / 0.07)`` and clamped so that the scale stays at most 100::

        x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        y = y / jnp.linalg.norm(y, axis=-1, keepdims=True)
        loss = jbce.clip_loss(x, y, scale=jnp.exp(jnp.minimum(t, jnp.log(100.0))))

    Args:
      x: ``[B, D]`` float embeddings (images); bf16/fp16 are computed in float32.
      y: ``[B, D]`` float embeddings (texts), pair ``i`` being ``(x[i], y[i])``.
      scale: the logit scale :math:`s \geq 0` (inverse temperature): a Python number or a
        scalar array (a jit argument; differentiable).
      ids: optional ``[B]`` integers; pairs with equal ids are all positives of each other
        (duplicate captions). With ``batch_axis_name`` each device passes its shard of the
        global ids. Default: pair ``i`` alone (the diagonal).
      reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the ``B`` per-pair values
        :math:`\ell_i`, this device's with ``batch_axis_name``).
      batch_axis_name: optional mesh axis (inside ``shard_map`` or ``pmap``) the batch is
        sharded on: ``x``, ``y`` and ``ids`` are this device's ``[B / n, ...]`` shards and the
        loss is the global batch's (every device gets the same value). Gradients follow
        every jbce loss's ``batch_axis_name``: taken through the ``shard_map`` (or inside it
        with ``check_vma=True``) they are the global loss's, and a replicated ``scale`` gets
        the sum over the devices; taken inside ``pmap`` (or ``check_vma=False``) each
        device's gradient is ``n`` times its part of the global one (the transpose of the
        loss's ``psum`` is a ``psum``), which the usual ``pmean`` of the gradients over the
        axis turns back into the global gradient.
      chunk_size: rows and columns of a tile, or a pair ``(rows, columns)``. Default: an
        eighth of the (per-device) batch, at least 512 and at most 4096.

    Returns:
      A float32 scalar (float64 for float64 inputs), or ``[B]`` (``"none"``).

    References:
      Radford et al., `Learning Transferable Visual Models From Natural Language Supervision
      <https://arxiv.org/abs/2103.00020>`_, 2021 (CLIP). Cheng et al., `Breaking the Memory
      Barrier: Near Infinite Batch Size Scaling for Contrastive Loss
      <https://arxiv.org/abs/2410.17243>`_, 2024 (Inf-CL: tiles, ring, recomputation).

    Example:
      >>> import jax, jax.numpy as jnp, jbce
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
      >>> y = jnp.array([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
      >>> jbce.clip_loss(x, y, scale=10.0)
      Array(1.9838..., dtype=float32)
      >>> jbce.clip_loss(x, y, scale=10.0, ids=jnp.array([0, 1, 0]))  # pairs 0 and 2 match
      Array(1.0505..., dtype=float32)
      >>> dx, dscale = jax.grad(lambda x, s: jbce.clip_loss(x, y, scale=s), (0, 1))(x, 10.0)
      >>> dx.shape, dscale.shape
      ((3, 2), ())
    """
    return _loss("clip", x, y, scale, None, ids, reduction, batch_axis_name, chunk_size)


def siglip_loss(
    x: ArrayLike,
    y: ArrayLike,
    *,
    scale: float | ArrayLike,
    bias: float | ArrayLike,
    ids: ArrayLike | None = None,
    reduction: str = "mean",
    batch_axis_name: str | tuple[str, ...] | None = None,
    chunk_size: int | tuple[int, int] | None = None,
) -> jax.Array:
    r"""SigLIP's pairwise sigmoid loss, without the ``[B, B]`` similarity matrix.

    With the logits :math:`L_{ij} = s\, x_i \cdot y_j + b` (``scale`` :math:`s`, ``bias``
    :math:`b`) and :math:`z_{ij} = +1` for a true pair (the diagonal, or equal ``ids``) and
    :math:`-1` otherwise,

    .. math::
        \ell_i = -\sum_j \log \sigma(z_{ij} L_{ij}), \qquad
        \mathcal{L} = \frac{1}{B} \sum_i \ell_i

    with the exact log-sigmoid of :func:`jbce.sigmoid_binary_cross_entropy` (no overflow or
    cancellation at any logit). Equals big_vision's ``-sum(log_sigmoid(z * L)) / B``.

    Tiles of the matrix are computed, summed per row and dropped; the backward pass
    recomputes them from the inputs, which are all it saves. With ``batch_axis_name`` the
    ``y`` blocks travel a ring of ``ppermute``\ s as in :func:`clip_loss`.

    The loss does not normalise the embeddings. big_vision's parameterisation: unit vectors,
    ``scale = exp(t)`` with ``t`` initialised to ``log(10)`` and ``bias`` initialised to
    ``-10``, both learnt::

        loss = jbce.siglip_loss(x, y, scale=jnp.exp(t), bias=b)

    Args:
      x: ``[B, D]`` float embeddings; bf16/fp16 are computed in float32.
      y: ``[B, D]`` float embeddings, pair ``i`` being ``(x[i], y[i])``.
      scale: the logit scale :math:`s \geq 0`: a Python number or a scalar array
        (differentiable).
      bias: the logit bias :math:`b`: a Python number or a scalar array (differentiable).
      ids: optional ``[B]`` integers; pairs with equal ids are positives of each other.
      reduction: ``"mean"`` (the sum over the matrix divided by ``B``), ``"sum"`` or
        ``"none"`` (the ``B`` row sums :math:`\ell_i`).
      batch_axis_name: optional mesh axis the batch is sharded on, as in :func:`clip_loss`.
      chunk_size: rows and columns of a tile, or a pair ``(rows, columns)``; default as in
        :func:`clip_loss`.

    Returns:
      A float32 scalar (float64 for float64 inputs), or ``[B]`` (``"none"``).

    References:
      Zhai et al., `Sigmoid Loss for Language Image Pre-Training
      <https://arxiv.org/abs/2303.15343>`_, 2023 (SigLIP).

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> jbce.siglip_loss(x, x, scale=10.0, bias=-10.0)
      Array(0.6932..., dtype=float32)
    """
    return _loss("siglip", x, y, scale, bias, ids, reduction, batch_axis_name, chunk_size)


def _loss(name, x, y, scale, bias, ids, reduction, batch_axis_name, chunk_size):
    x, y, ids = _operands(x, y, ids)
    checks.check_reduction(reduction, batch_axis_name=batch_axis_name)
    checks.check_chunk_size(chunk_size)
    scale = checks.hyperparameter("scale", scale)
    if bias is not None:
        bias = checks.hyperparameter("bias", bias)
    dt = compute_dtype(x, y, scale, bias)
    b = x.shape[0]
    glob = {"reduction": reduction, "batch_axis_name": batch_axis_name}
    if b == 0:
        return reduce_loss(jnp.zeros((0,), dt), **glob)
    if ids is None:  # every pair its own id: its global index
        offset = 0 if batch_axis_name is None else lax.axis_index(batch_axis_name) * b
        ids = offset + jnp.arange(b, dtype=jnp.int32)
    rows, cols = chunked_xla.tile_sizes(b, chunk_size)
    implementation = "chunked_xla" if batch_axis_name is None else "ring"
    cfg = chunked_xla.Config(name, jnp.dtype(dt), rows, cols, batch_axis_name)
    scale = jnp.asarray(scale, dt)
    bias = None if bias is None else jnp.asarray(bias, dt)
    out = IMPLEMENTATIONS[implementation](x, y, ids, scale, bias, cfg)
    if name == "siglip":
        values = out
    else:
        values = 0.5 * (_ce(out[0]) + _ce(out[1]))
    return reduce_loss(values, **glob)


def _ce(st: _stats.Stats) -> jax.Array:
    """Each row's cross-entropy against its positives, uniformly weighted: ``l - s / W``,
    :func:`jbce._softmax.stats.soft_terms` ``(W l - s)`` over ``W``. Every row has ``W >= 1``
    positives (a pair is its own) and a finite log-sum-exp, so none of ``soft_terms``' cases
    of a row without classes arise. ``W`` counts positives (a function of the ids only): a
    constant, the one value per row the backward pass keeps here."""
    return st.lse - st.logit_sum / lax.stop_gradient(st.weight_sum)


def _operands(x, y, ids):
    """(x, y, ids) checked: float ``[B, D]`` embeddings of one shape and ``[B]`` integer ids
    (as int32) or None."""
    x = checks.as_array("x", x)
    y = checks.as_array("y", y)
    checks.check_float("x", x)
    checks.check_float("y", y)
    checks.check_rank("x", x, 2, "[B, D]")
    checks.check_same_shape("y", y, "x", x)
    if ids is not None:
        ids = checks.integer_ids("ids", ids)
        checks.check_shape("ids", ids, x.shape[:1], f"(one id per pair of x {x.shape})")
    return x, y, ids
