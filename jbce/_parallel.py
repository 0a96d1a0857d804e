r"""Vocabulary-parallel losses: the class axis sharded over a named mesh axis.

Inside ``jax.shard_map`` (or ``jax.pmap``, or ``jax.vmap`` with an ``axis_name``) each
shard holds the logits of ``K_local`` consecutive classes, shard ``i`` owning the global
classes ``[i K_local, (i+1) K_local)``. The softmax needs only a few numbers per example
from each shard, combined with one ``pmax`` and one ``psum``:

.. math::
    M = \max_i m_i, \qquad
    \ell = M + \log \sum_i e^{m_i - M} \sum_{c \in i} e^{x_c - m_i}

plus the target logit, the (class-weighted) logit sum, the target's class weight, the
summed weight and the count of included classes, each a ``psum`` of per-shard partial
sums. The logits are never gathered: communication is ``O(batch)``, not ``O(batch x K)``.
The per-example statistics come out identical (replicated) on every shard, so the reduced
loss is replicated too and ``shard_map(..., out_specs=P())`` passes the replication check.

The gradient is a ``custom_vjp`` whose backward pass needs no communication: each shard
recomputes its own softmax slice from its logits and the global log-sum-exp. This gives
the unsharded gradient under ``shard_map`` and under ``pmap`` alike (a plain ``psum``
would transpose differently in the two).

``axis_name`` may be a tuple of mesh axes (classes sharded as ``P(None, ("x", "y"))``);
shards are then numbered in that order, as ``jax.lax.axis_index`` does.

``class_weights`` are passed *sharded*, ``[K_local]`` per shard, laid out like the
logits' class axis (``in_specs=P(axis_name)`` for a ``[K]`` array); labels are *global*
class ids, replicated over ``axis_name``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jbce._softmax import (
    _class_row,
    _included,
    _softcap,
    _softcap_grad,
    loss_from_stats,
)
from jbce._vma import psum_to_like, pvary_like  # noqa: F401  (re-exported for _linear)


def combine_stats(
    local_max: jax.Array,
    local_sumexp: jax.Array,
    *sums: jax.Array,
    axis_name,
) -> tuple[jax.Array, ...]:
    r"""Merges per-shard softmax statistics into global ones over ``axis_name``.

    .. math::
        M = \operatorname{pmax}(m), \qquad
        \ell = M + \log \operatorname{psum}\!\big(S\, e^{m - M}\big)

    where each shard passes its own max ``m`` and ``S = sum_c exp(x_c - m)`` over its
    included classes (``m = -inf``, ``S = 0`` for a shard with none). Any further arrays
    (target logit, weighted logit sum, counts...) are partial sums, returned ``psum``-ed in
    the same all-reduce. A row with no class on any shard gets ``lse = -inf``.

    Not differentiable by design (it is meant for the forward pass of a ``custom_vjp``,
    whose backward pass needs only the returned log-sum-exp). Reused by the fused linear
    loss's ``axis_name`` path.

    Args:
      local_max: ``[B]`` per-shard max over included classes (``-inf`` if none).
      local_sumexp: ``[B]`` per-shard ``sum exp(x - local_max)``.
      *sums: further per-shard partial sums, any shapes.
      axis_name: the mesh axis (or tuple of axes) the classes are sharded over.

    Returns:
      ``(lse, *psum(sums))``, identical on every shard.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jbce._parallel import combine_stats
      >>> x = jnp.array([[1.0, 2.0], [3.0, -1.0]])  # 2 shards of one example, 2 classes each
      >>> m, s = x.max(-1), jnp.exp(x - x.max(-1, keepdims=True)).sum(-1)
      >>> lse, n = jax.vmap(lambda m, s: combine_stats(m, s, 2.0, axis_name="v"),
      ...                   axis_name="v")(m, s)
      >>> bool(jnp.allclose(lse, jax.nn.logsumexp(x))), n.tolist()
      (True, [4.0, 4.0])
    """
    m = jax.lax.pmax(local_max, axis_name)
    m_safe = jnp.where(jnp.isfinite(m), m, 0)
    scaled = local_sumexp * jnp.exp(local_max - m_safe)
    total, *rest = jax.lax.psum((scaled, *sums), axis_name)
    return (m_safe + jnp.log(total), *rest)


def _local_labels(labels: jax.Array, k_local: int, axis_name):
    """(label - shard offset clipped into [0, K_local), whether the label is on this shard)."""
    local = labels - jax.lax.axis_index(axis_name) * k_local
    on_shard = (local >= 0) & (local < k_local)
    return jnp.clip(local, 0, k_local - 1), on_shard


# --- per-example statistics across shards, with a communication-free backward pass -----------
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _sharded_stats(logits, labels, class_weights, mask, cap, dtype, axis_name):
    """Global (lse, x_y, sum w x, w_y, sum w, K_eff) from a [B, K_local] shard."""
    x = _softcap(logits.astype(dtype), cap)
    k_local = x.shape[-1]
    inc = _included(x, mask)
    xm = jnp.where(inc, x, -jnp.inf)
    m = jnp.max(xm, axis=-1, initial=-jnp.inf)
    m_safe = jnp.where(jnp.isfinite(m), m, 0)
    sumexp = jnp.sum(jnp.exp(xm - m_safe[..., None]), axis=-1)
    local, on_shard = _local_labels(labels, k_local, axis_name)
    xt = jnp.where(on_shard, jnp.take_along_axis(x, local[..., None], axis=-1)[..., 0], 0)
    cnt = jnp.sum(inc, axis=-1).astype(dtype)
    if class_weights is None:
        s = jnp.sum(jnp.where(inc, x, 0), axis=-1)
        tw = on_shard.astype(dtype)
        wsum = cnt
    else:
        w = _class_row(class_weights, x)
        s = jnp.sum(jnp.where(inc, x * w, 0), axis=-1)
        tw = jnp.where(on_shard, class_weights[local], 0)
        wsum = jnp.sum(jnp.where(inc, w, 0), axis=-1)
    return combine_stats(m, sumexp, xt, s, tw, wsum, cnt, axis_name=axis_name)


def _sharded_stats_fwd(logits, labels, class_weights, mask, cap, dtype, axis_name):
    out = _sharded_stats(logits, labels, class_weights, mask, cap, dtype, axis_name)
    # Residuals: this shard's logits as given and the global lse (one float per example);
    # the softmax slice is recomputed in the backward pass.
    return out, (logits, labels, class_weights, mask, out[0])


def _sharded_stats_bwd(cap, dtype, axis_name, res, g):
    logits, labels, class_weights, mask, lse = res
    g_lse, g_xt, g_s, g_tw, g_wsum, _ = g
    x = _softcap(logits.astype(dtype), cap)
    k_local = x.shape[-1]
    inc = _included(x, mask)
    p = jnp.exp(jnp.where(inc, x - lse[..., None], -jnp.inf))
    local, on_shard = _local_labels(labels, k_local, axis_name)
    onehot = (local[..., None] == _class_row(jnp.arange(k_local), x)) & on_shard[..., None]
    w = jnp.ones((), dtype) if class_weights is None else _class_row(class_weights, x)
    dx = g_lse[..., None] * p + jnp.where(onehot, g_xt[..., None], 0)
    dx = dx + jnp.where(inc, g_s[..., None] * w, 0)
    dcap = _softcap_grad(logits.astype(dtype), cap)
    if dcap is not None:
        dx = dx * dcap
    dw = None
    if class_weights is not None:
        per = jnp.where(inc, g_s[..., None] * x + g_wsum[..., None], 0)
        per = per + jnp.where(onehot, g_tw[..., None], 0)
        dw = jnp.sum(per.reshape(-1, k_local), axis=0).astype(class_weights.dtype)
        dw = psum_to_like(dw, class_weights)
    dmask = None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0)
    dlabels = jnp.zeros(labels.shape, jax.dtypes.float0)
    return psum_to_like(dx.astype(logits.dtype), logits), dlabels, dw, dmask


_sharded_stats.defvjp(_sharded_stats_fwd, _sharded_stats_bwd)


def sharded_integer_ce(
    x: jax.Array,
    labels: jax.Array,
    *,
    axis_name,
    class_weights: jax.Array | None,
    mask: jax.Array | None,
    cap: float | None,
    dtype,
    ignore_index: int | None,
    label_smoothing: float,
    z_loss: float,
    weights: jax.Array | None,
    where: jax.Array | None,
    reduction: str,
) -> jax.Array:
    r"""Integer-label softmax CE with the class axis sharded over ``axis_name``.

    The body of ``softmax_cross_entropy_with_integer_labels(..., axis_name=...)``: the same
    loss as the unsharded call on the concatenated logits, with :math:`K = K_{local}
    \times` the axis size. Every option (ignore_index, smoothing, z-loss, softcap, class
    weights, per-logit ``where``) works sharded; the ``"mean"`` denominator is global
    because every shard sees the whole batch.

    Args:
      x: ``[..., K_local]`` this shard's logits, classes last.
      labels: ``[...]`` global class ids, the same on every shard.
      axis_name: mesh axis the classes are sharded over.
      class_weights: ``[K_local]`` this shard's slice of the class weights, or None.
      mask: ``[..., K_local]`` per-logit inclusion mask, or None.
      cap: logit soft-cap, or None.
      dtype: the compute dtype.
      ignore_index, label_smoothing, z_loss, weights, where, reduction: as in
        :func:`jbce.softmax_cross_entropy_with_integer_labels` (``where`` per example).

    Returns:
      The loss, replicated over ``axis_name``: a scalar, or per-example for ``"none"``.

    Example:
      >>> import jax, jax.numpy as jnp, jbce
      >>> logits = jnp.array([[2.0, 0.0, 1.0, -1.0], [0.5, 0.0, 0.0, 3.0]])
      >>> labels = jnp.array([2, 3])
      >>> shards = logits.reshape(2, 2, 2).transpose(1, 0, 2)   # [shard, B, K_local]
      >>> ce = jbce.softmax_cross_entropy_with_integer_labels
      >>> jax.vmap(lambda x: ce(x, labels, axis_name="v"), axis_name="v")(shards)
      Array([0.803..., 0.803...], dtype=float32)
      >>> ce(logits, labels)
      Array(0.803..., dtype=float32)
    """
    k = x.shape[-1] * jax.lax.axis_size(axis_name)
    lse, xt, s, tw, wsum, cnt = _sharded_stats(
        x, labels, class_weights, mask, cap, dtype, axis_name
    )
    ex_mask = where
    if mask is not None:
        has = cnt > 0
        ex_mask = has if ex_mask is None else ex_mask & has
    counted = mask is not None or label_smoothing
    return loss_from_stats(
        lse, xt, s, labels,
        num_classes=k,
        num_included=cnt if counted else k,
        included_weight_sum=wsum if class_weights is not None else cnt,
        target_weight=tw if class_weights is not None else None,
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        weights=weights, where=ex_mask, reduction=reduction,
    )  # fmt: skip
