"""Cross-entropy from log-probabilities (``nll_loss``) and from probabilities: the API.

Neither takes a softmax: ``nll_loss`` gathers one log-probability per example (its gradient
is a scatter of one value per row; autodiff saves only the labels), and
``categorical_cross_entropy`` sums ``-y log p`` with an elementwise core whose
derivatives (:mod:`jbce._core.autodiff`) save its inputs, as :func:`jbce.binary_cross_entropy`
does. Weights, masks and reductions are applied by :mod:`jbce._core.reduce`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jbce._core import autodiff, checks
from jbce._core.dtypes import compute_dtype, to_compute
from jbce._core.math import GRAD_EPS, clamped_log, xmul
from jbce._core.reduce import reduce_loss
from jbce._softmax.inputs import batch_shape, to_rows


def _row_where(where, bshape):
    if where is None:
        return None
    checks.check_broadcastable("where", where, "labels", bshape)
    return jnp.broadcast_to(checks.as_array("where", where).astype(bool), bshape)


def nll_loss(
    log_probs: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | Sequence[int] = -1,
    weights: ArrayLike | None = None,
    class_weights: ArrayLike | None = None,
    ignore_index: int | None = -100,
    where: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: float | ArrayLike | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""Negative log-likelihood of integer labels, as ``torch.nn.functional.nll_loss``.

    .. math::
        L_n = -w_{y_n}\, \log p_{n y_n}

    where :math:`\log p` are the given ``log_probs`` (typically ``jax.nn.log_softmax``
    output; nothing is normalised here) and :math:`w` the class weights. ``"mean"`` divides
    by :math:`\sum_n w_{y_n}` over the non-ignored (and ``where``-included) examples, the
    count of them without class weights, exactly as PyTorch does. ``nll_loss(
    jax.nn.log_softmax(x), t)`` equals :func:`softmax_cross_entropy_with_integer_labels`
    ``(x, t)``; prefer the latter on logits, which never materialises the log-probabilities.

    Only the labelled entry of each row is read: a NaN elsewhere in the row does not reach
    the loss (as in PyTorch), a NaN at the label does. A label outside ``[0, K)`` that is not
    ``ignore_index`` gives NaN (PyTorch raises); ``checkify`` reports it.

    Args:
      log_probs: float array ``[..., K, ...]`` of log-probabilities; bf16/fp16 computed in
        float32.
      labels: integer array of ``log_probs``' shape without the class axes.
      axis: the class axis (PyTorch's ``dim=1`` of ``[N, C, d1, ...]`` is ``axis=1``), or a
        tuple of axes flattened into one.
      weights: optional per-example multiplier, broadcastable to ``labels``.
      class_weights: optional ``[K]`` weight per class (PyTorch's ``weight``).
      ignore_index: label value whose examples are excluded (``None`` for none).
      where: optional boolean mask broadcastable to ``labels``; False excludes an example.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      normalizer: optional denominator of ``"mean"`` in place of the included count (for
        gradient accumulation: the whole batch's count, so the micro-batch losses and
        their gradients add up to the whole batch's mean; see :ref:`gradient-accumulation`).
      batch_axis_name: optional mesh axis the batch is sharded on, inside ``shard_map``
        or ``pmap``: ``"sum"`` and ``"mean"`` are then over the global batch.

    Returns:
      A float32 scalar (float64 for float64 inputs), or the per-example losses for ``"none"``.

    Example:
      >>> import jax, jax.numpy as jnp, jbce
      >>> log_p = jax.nn.log_softmax(jnp.array([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
      >>> cw = jnp.array([1.0, 3.0, 1.0])
      >>> jbce.nll_loss(log_p, jnp.array([0, 1]), class_weights=cw)
      Array(0.5154..., dtype=float32)
    """
    lp, labels, axes, k, bshape = checks.with_integer_labels("log_probs", log_probs, labels, axis)
    checks.check_reduction(reduction)
    ignore_index = checks.check_ignore_index(ignore_index)
    dt = compute_dtype(lp, weights, class_weights)
    rows = _row_where(where, bshape)
    weights, cw, kept = checks.integer_label_options(
        labels, bshape, k, weights=weights, class_weights=class_weights,
        ignore_index=ignore_index, num_classes=k, dtype=dt,
    )  # fmt: skip
    rows = checks.both(rows, kept)
    in_range = (labels >= 0) & (labels < k)
    safe = jnp.clip(labels, 0, k - 1)
    x = to_rows(lp, axes)
    # One gather per row in the input dtype, then the cast: no K-wide float32 copy.
    picked = jnp.take_along_axis(x, safe[..., None], axis=-1)[..., 0]
    loss = -to_compute(picked, dt)
    tw = None
    if cw is not None:
        tw = jnp.take(cw, safe)
        loss = tw * loss
    loss = jnp.where(in_range, loss, jnp.nan)
    return reduce_loss(
        loss,
        reduction=reduction,
        weights=weights,
        where=rows,
        denominator_weights=tw,
        normalizer=normalizer,
        batch_axis_name=batch_axis_name,
    )


# --- -y log p from probabilities, logs clamped at -100 (PyTorch's BCE convention) -----------
def _cce_value(p: jax.Array, y: jax.Array, mask, rows) -> jax.Array:
    """``-y max(log p, -100)`` elementwise, in the compute dtype of its (same-shaped) inputs.

    ``mask`` (``[..., K]``) and ``rows`` (``[...]``), each None or boolean, mark the terms the
    loss uses: the others get exactly zero derivatives, whatever their inputs.
    """
    del mask, rows
    p, y = _inputs(p, y)
    return -y * clamped_log(p)


def _inputs(p, y):
    dt = compute_dtype(p, y)
    return to_compute(p, dt), to_compute(y, dt)


def _cce_tangent(primals, _, tangents):
    p0, y0, mask, rows = primals
    dp, dy, _, _ = tangents
    p, y = _inputs(p0, y0)

    def coef(c):
        return autodiff.keep_rows(rows, autodiff.keep_where(mask, c))

    # d/dp = -y / max(p, 1e-12): PyTorch's BCE rule restricted to the log p term, finite at
    # p = 0 (where the clamped log itself would have slope 0 and stop all learning).
    terms = [autodiff.contract(coef(-xmul(y, 1 / jnp.maximum(p, GRAD_EPS))), dp, p.ndim)]
    if dy is not None:
        terms.append(autodiff.contract(coef(-clamped_log(p)), dy, p.ndim))
    return autodiff.total(p.shape, p.dtype, *terms)


# Residuals in reverse mode: the inputs only.
_cce_terms = autodiff.lean_jvp(_cce_value, _cce_tangent)


def categorical_cross_entropy(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | Sequence[int] = -1,
    weights: ArrayLike | None = None,
    label_smoothing: float | ArrayLike = 0.0,
    where: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: float | ArrayLike | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""Categorical cross-entropy from probabilities, with probability-vector labels.

    .. math::
        L_n = -\sum_c \tilde y_{nc}\, \max(\log p_{nc}, -100), \qquad
        \tilde y = (1 - e)\, y + e / K

    The logs are clamped at -100 as in :func:`binary_cross_entropy` (PyTorch's convention),
    so :math:`p = 0` gives a finite loss, and the gradient
    :math:`-\tilde y / \max(p, 10^{-12})` is finite there too; by the same convention the
    clamped log's slope is :math:`1 / \max(p, 10^{-12})`, so the second derivatives (in
    ``labels`` and ``probs``) are finite as well. The probabilities are used as given: rows
    are **not** renormalised, and values outside ``[0, 1]`` (or NaN) are reported under
    ``jax.experimental.checkify``. Prefer :func:`softmax_cross_entropy` on
    logits when you have them: it is exact where probabilities have rounded to 0.

    Compared with Keras' ``CategoricalCrossentropy(from_logits=False)``: Keras divides each
    row by its sum and clips the probabilities to :math:`[10^{-7}, 1 - 10^{-7}]` first. The
    two agree on rows that sum to 1 with every probability in that range; on a row that
    does not sum to 1 jbce returns :math:`-\sum y \log p` of the numbers given, and
    :math:`p = 0` under a positive label costs 100 here, about 16.1 in Keras.

    Args:
      probs: float array ``[..., K, ...]`` of probabilities; bf16/fp16 computed in float32.
      labels: target distributions (one-hot or soft), ``probs``' shape.
      axis: the class axis, or a tuple of class axes.
      weights: optional per-example multiplier (the batch shape).
      label_smoothing: e in [0, 1], spread uniformly over the K classes (as Keras does); a
        Python number or a scalar array.
      where: optional boolean mask, per example (batch shape) or per probability (``probs``'
        shape: False drops that class's term and it does not count in K).
      reduction: ``"mean"`` (over included examples), ``"sum"`` or ``"none"``.
      normalizer: optional denominator of ``"mean"`` in place of the included count (for
        gradient accumulation: the whole batch's count, so the micro-batch losses and
        their gradients add up to the whole batch's mean; see :ref:`gradient-accumulation`).
      batch_axis_name: optional mesh axis the batch is sharded on, inside ``shard_map``
        or ``pmap``: ``"sum"`` and ``"mean"`` are then over the global batch.

    Returns:
      A float32 scalar (float64 for float64 inputs), or the per-example losses for ``"none"``.

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> p = jnp.array([[0.91, 0.04, 0.05], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6],
      ...                [0.25, 0.25, 0.5]])
      >>> y = jnp.eye(3)[jnp.array([0, 1, 2, 0])]
      >>> jbce.categorical_cross_entropy(p, y, reduction="none")
      Array([0.0943..., 0.2231..., 0.5108..., 1.3862...], dtype=float32)
      >>> jbce.categorical_cross_entropy(p, y)
      Array(0.5536..., dtype=float32)
    """
    p, axes, _ = checks.class_axes("probs", probs, axis)
    labels = checks.as_array("labels", labels)
    checks.check_shape("labels", labels, p.shape, f"to match probs {p.shape}")
    checks.check_reduction(reduction)
    e = checks.hyperparameter("label_smoothing", label_smoothing)
    bshape = batch_shape(p.shape, axes)
    dt = compute_dtype(p, labels, weights, e)
    class_mask = rows = None
    if where is not None:
        w = checks.as_array("where", where).astype(bool)
        if w.ndim == p.ndim and p.ndim > len(bshape):
            checks.check_broadcastable("where", w, "probs", p.shape)
            class_mask = to_rows(jnp.broadcast_to(w, p.shape), axes)
        else:
            rows = _row_where(w, bshape)
    x = to_rows(p, axes)
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(dt)
    y = to_rows(labels, axes)
    checks.debug_check_unit_interval("probs", x)
    checks.debug_check_unit_interval("labels", y)
    if weights is not None:
        checks.check_broadcastable("weights", weights, "the batch shape", bshape)
        weights = checks.as_array("weights", weights).astype(dt)
    if not checks.is_zero(e):
        y = to_compute(y, dt)
        k = x.shape[-1] if class_mask is None else jnp.sum(class_mask, -1, keepdims=True)
        k = jnp.maximum(jnp.asarray(k, dt), 1)
        y = y * (1 - e) + e / k
    terms = _cce_terms(x, y, class_mask, rows)
    if class_mask is not None:  # a masked-out class's term is dropped, NaN or not
        terms = jnp.where(class_mask, terms, jnp.zeros((), terms.dtype))
        rows = checks.both(rows, jnp.any(class_mask, axis=-1))
    loss = jnp.sum(terms, axis=-1)
    return reduce_loss(
        loss,
        reduction=reduction,
        weights=weights,
        where=rows,
        normalizer=normalizer,
        batch_axis_name=batch_axis_name,
    )
