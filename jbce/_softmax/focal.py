"""Softmax focal loss (soft and integer labels) and the Poly-1 cross-entropy: the API.

Validates the arguments, lays the logits out with the classes last
(:mod:`jbce._softmax.inputs`) and builds each loss on a core with lean derivatives
(:mod:`jbce._core.autodiff`): per-class terms of the log-probabilities
(:func:`jbce._softmax.terms.term_loss`) for probability labels, and the softmax statistics
(:func:`jbce._softmax.xla.softmax_stats`) with a per-row focal term for integer labels. Weights,
masks and reductions are applied by :mod:`jbce._core.reduce`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jbce._core import checks
from jbce._core.reduce import reduce_loss
from jbce._softmax import xla
from jbce._softmax.inputs import LabelOptions, integer_inputs, soft_inputs
from jbce._softmax.terms import Term, focal_of_log_prob, term_loss


def _alpha(alpha, k, dt):
    """``alpha``: None, a number >= 0, or an array of shape () or (K,) (checked under checkify)."""
    if alpha is None:
        return None
    a = checks.hyperparameter("alpha", alpha, scalar=False)
    a = checks.as_array("alpha", a)
    if a.ndim:
        checks.check_shape("alpha", a, (k,), "(a scalar or one value per class)")
    return a.astype(dt) if not jnp.issubdtype(a.dtype, jnp.floating) or a.ndim == 0 else a


def _gamma(gamma, dt):
    return jnp.asarray(checks.hyperparameter("gamma", gamma), dt)


def softmax_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: float | ArrayLike | None = None,
    gamma: float | ArrayLike = 2.0,
    axis: int | Sequence[int] = -1,
    weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: float | ArrayLike | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""Softmax focal loss against probability targets, as Keras' ``CategoricalFocalCrossentropy``.

    With :math:`p = \mathrm{softmax}(x)` over the included classes:

    .. math::
        L_n = -\sum_c \alpha_c\, y_{nc}\, (1 - p_{nc})^{\gamma} \log p_{nc}

    Equals Keras 3 ``CategoricalFocalCrossentropy(alpha=a, gamma=g, from_logits=True)`` per
    example, except that Keras clips :math:`p` to :math:`[10^{-7}, 1 - 10^{-7}]` and jbce does
    not: jbce is exact for confident predictions and gives ``+inf`` for a positive target on a
    ``-inf`` logit. Keras' default ``alpha=0.25`` is ``alpha=0.25`` here; ``alpha=None`` (the
    default) means 1. ``gamma=0`` gives :func:`softmax_cross_entropy` (times ``alpha``).

    :math:`\log p` is computed as :math:`(x - m) - \ell` and :math:`1 - p` as
    :math:`-\mathrm{expm1}(\log p)` (no cancellation near :math:`p = 1`). The gradient is
    finite for every ``gamma >= 0``, ``gamma < 1`` included, at any logits: the factor
    :math:`\gamma \log p\,(1 - p)^{\gamma - 1}` is evaluated as
    :math:`\gamma (1 - p)^\gamma \cdot \log p / (1 - p)`, whose ratio tends to -1. The backward
    pass saves the inputs and two floats per example.

    Args:
      logits: float array ``[..., K, ...]``; bf16/fp16 computed in float32.
      labels: target distributions (one-hot or soft), the logits' shape.
      alpha: optional class weight: a number >= 0, or a ``[K]`` array (one per class).
      gamma: focusing exponent >= 0; a Python number or a scalar array (a jit argument).
      axis: the class axis, or a tuple of class axes.
      weights: optional per-example multiplier (the logits' batch shape).
      where: optional boolean mask, per example or per logit (False takes a class out of
        the softmax and drops its target).
      reduction: ``"mean"`` (over included examples), ``"sum"`` or ``"none"``.
      normalizer: optional denominator of ``"mean"`` in place of the included count (for
        gradient accumulation: the whole batch's count, so the micro-batch losses and
        their gradients add up to the whole batch's mean; see :ref:`gradient-accumulation`).
      batch_axis_name: optional mesh axis the batch is sharded on, inside ``shard_map``
        or ``pmap``: ``"sum"`` and ``"mean"`` are then over the global batch.

    Returns:
      A float32 scalar (float64 for float64 inputs), or the per-example losses for ``"none"``.

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.

    Example:
      >>> import jax, jax.numpy as jnp, jbce
      >>> probs = jnp.array([[0.05, 0.9, 0.05], [0.1, 0.85, 0.05]])
      >>> y = jnp.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
      >>> jbce.softmax_focal_loss(jnp.log(probs), y, alpha=0.25, reduction="none")
      Array([2.634...e-04, 6.759...e-01], dtype=float32)
    """
    checks.check_reduction(reduction)
    inp = soft_inputs(
        logits, labels, axis=axis, weights=weights, where=where, options=(alpha, gamma)
    )
    a = _alpha(alpha, inp.x.shape[-1], inp.dtype)
    g = _gamma(gamma, inp.dtype)
    term = Term("focal", inp.dtype, static_theta=checks.static_number(gamma))
    loss, has = term_loss(inp.x, inp.labels, a, g, inp.mask, inp.rows, term)
    return reduce_loss(
        loss,
        reduction=reduction,
        weights=inp.weights,
        where=checks.both(inp.rows, has),
        normalizer=normalizer,
        batch_axis_name=batch_axis_name,
    )


def softmax_focal_loss_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: float | ArrayLike | None = None,
    gamma: float | ArrayLike = 2.0,
    axis: int | Sequence[int] = -1,
    weights: ArrayLike | None = None,
    class_weights: ArrayLike | None = None,
    ignore_index: int | None = -100,
    where: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: float | ArrayLike | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""Softmax focal loss with integer class labels.

    With :math:`p_n = \mathrm{softmax}(x_n)_{y_n}`, :math:`w` the class weights and
    :math:`\alpha` a scalar or per-class weight:

    .. math::
        L_n = -w_{y_n}\, \alpha_{y_n}\, (1 - p_n)^{\gamma} \log p_n

    the one-hot case of :func:`softmax_focal_loss`. ``class_weights`` and ``ignore_index``
    behave as in :func:`softmax_cross_entropy_with_integer_labels`: ``"mean"`` divides by the
    number of non-ignored examples, or by :math:`\sum_n w_{y_n}` with ``class_weights``;
    ``alpha`` multiplies the loss only (it is not part of the denominator). A logit of
    ``-inf`` (or False in a logits-shaped ``where``) removes that class from the softmax; a
    label outside ``[0, K)`` that is not ``ignore_index`` gives NaN (reported under
    checkify). A label whose own class ``where`` takes out has no target left, as in the
    soft one-hot form: its loss is 0 and the example still counts in the mean. The gradient
    is finite for every ``gamma >= 0`` at any logits, to second order. The backward pass
    saves the inputs and a few floats per example.

    Args:
      logits: float array ``[..., K, ...]``; bf16/fp16 computed in float32.
      labels: integer array of the logits' shape without the class axes.
      alpha: optional class weight: a number >= 0, or a ``[K]`` array.
      gamma: focusing exponent >= 0; a Python number or a scalar array (a jit argument).
      axis: the class axis, or a tuple of class axes.
      weights: optional per-example multiplier, broadcastable to ``labels``.
      class_weights: optional ``[K]`` weight per class, part of the mean's denominator.
      ignore_index: label value whose examples are excluded (``None`` for none).
      where: optional boolean mask, per example (labels' shape) or per logit.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      normalizer: optional denominator of ``"mean"`` in place of the included count (for
        gradient accumulation: the whole batch's count, so the micro-batch losses and
        their gradients add up to the whole batch's mean; see :ref:`gradient-accumulation`).
      batch_axis_name: optional mesh axis the batch is sharded on, inside ``shard_map``
        or ``pmap``: ``"sum"`` and ``"mean"`` are then over the global batch.

    Returns:
      A float32 scalar, or the per-example losses for ``"none"``.

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> logits = jnp.log(jnp.array([[0.05, 0.9, 0.05], [0.1, 0.85, 0.05]]))
      >>> labels = jnp.array([1, 2])
      >>> jbce.softmax_focal_loss_with_integer_labels(logits, labels, reduction="none")
      Array([0.0010536..., 2.7036...], dtype=float32)
    """
    checks.check_reduction(reduction)
    inp = integer_inputs(
        logits, labels, axis=axis, where=where, options=(alpha, gamma),
        label_options=LabelOptions(weights, class_weights, ignore_index),
    )  # fmt: skip
    x, labels, logit_mask, rows, dt = inp.x, inp.labels, inp.mask, inp.rows, inp.dtype
    k = x.shape[-1]
    a = _alpha(alpha, k, dt)
    g = _gamma(gamma, dt)
    # method None: the platform's log-sum-exp reduction, chosen when the program is lowered
    opts = xla.Options(dt)
    st = xla.softmax_stats(x, labels, None, logit_mask, None, rows, opts)
    has = st.lse != -jnp.inf  # a row with no class left is excluded (NaN rows count)
    log_p = (st.target - st.shift) - jnp.where(has, st.lse, 0)
    in_range = (labels >= 0) & (labels < k)
    safe = jnp.clip(labels, 0, k - 1)
    # A label whose class the mask takes out has no target left, as in the soft one-hot
    # form: loss 0, the row still counted.
    target = None
    if logit_mask is not None:
        target = jnp.take_along_axis(logit_mask, safe[..., None], axis=-1)[..., 0]
    loss = focal_of_log_prob(log_p, g, checks.both(checks.both(rows, has), target))
    if target is not None:
        loss = jnp.where(target, loss, jnp.zeros((), loss.dtype))
    if a is not None and a.ndim:
        loss = loss * jnp.take(a.astype(dt), safe)
    elif a is not None:
        loss = loss * a.astype(dt)
    tw = None
    if inp.class_weights is not None:
        tw = jnp.take(inp.class_weights, safe)
        loss = tw * loss
    loss = jnp.where(in_range, loss, jnp.nan)
    return reduce_loss(
        loss,
        reduction=reduction,
        weights=inp.weights,
        where=checks.both(rows, has),
        denominator_weights=tw,
        normalizer=normalizer,
        batch_axis_name=batch_axis_name,
    )


def poly_loss_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    epsilon: float | ArrayLike = 2.0,
    axis: int | Sequence[int] = -1,
    weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: float | ArrayLike | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""Poly-1 loss: softmax cross-entropy plus :math:`\epsilon` times the first polynomial term.

    .. math::
        L_n = -\sum_c y_{nc} \log p_{nc} + \epsilon \sum_c y_{nc} (1 - p_{nc}),
        \qquad p_n = \mathrm{softmax}(x_n)

    With ``reduction="none"`` it equals optax's ``poly_loss_cross_entropy(logits, labels,
    epsilon, axis=axis, where=where)`` (a logits-shaped ``where`` takes classes out of the
    softmax). :math:`1 - p` is computed as :math:`-\mathrm{expm1}(\log p)`. The backward pass
    saves the inputs and two floats per example.

    Args:
      logits: float array ``[..., K, ...]``; bf16/fp16 computed in float32.
      labels: target distributions, the logits' shape.
      epsilon: coefficient of the polynomial term, >= -1 (2 for ImageNet classification,
        -1 for detection in the paper); a Python number or a scalar array. Below -1 the loss
        is no longer non-negative.
      axis: the class axis, or a tuple of class axes.
      weights: optional per-example multiplier (the logits' batch shape).
      where: optional boolean mask, per example or per logit.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      normalizer: optional denominator of ``"mean"`` in place of the included count (for
        gradient accumulation: the whole batch's count, so the micro-batch losses and
        their gradients add up to the whole batch's mean; see :ref:`gradient-accumulation`).
      batch_axis_name: optional mesh axis the batch is sharded on, inside ``shard_map``
        or ``pmap``: ``"sum"`` and ``"mean"`` are then over the global batch.

    Returns:
      A float32 scalar, or the per-example losses for ``"none"``.

    References:
      Leng et al., "PolyLoss: A Polynomial Expansion Perspective of Classification Loss
      Functions", ICLR 2022.

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> logits = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
      >>> jbce.poly_loss_cross_entropy(logits, jnp.array([[1.0, 0.0, 0.0]]), epsilon=2.0)
      Array(1.693147..., dtype=float32)
    """
    checks.check_reduction(reduction)
    inp = soft_inputs(logits, labels, axis=axis, weights=weights, where=where, options=(epsilon,))
    eps = jnp.asarray(checks.hyperparameter("epsilon", epsilon), inp.dtype)
    term = Term("poly", inp.dtype)
    loss, has = term_loss(inp.x, inp.labels, None, eps, inp.mask, inp.rows, term)
    return reduce_loss(
        loss,
        reduction=reduction,
        weights=inp.weights,
        where=checks.both(inp.rows, has),
        normalizer=normalizer,
        batch_axis_name=batch_axis_name,
    )
