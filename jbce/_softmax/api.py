"""Softmax cross-entropy with probability targets and with integer class labels: the API.

Validates the arguments, lays the logits out with the classes last, and builds the loss
from per-row softmax statistics (:mod:`jbce._softmax.stats`) computed by the implementation in
:mod:`jbce._softmax.xla` (plain XLA, every platform). Weights, masks and reductions are
applied by :mod:`jbce._core.reduce`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jbce._core import checks
from jbce._core.reduce import reduce_loss
from jbce._core.sharding import pvary_like
from jbce._softmax import inputs, xla
from jbce._softmax import stats as _stats


def _options(label_smoothing, z_loss=0.0, logit_softcap=None):
    """The scalar options, range-checked (:func:`jbce._core.checks.hyperparameter`)."""
    e = checks.hyperparameter("label_smoothing", label_smoothing)
    z = checks.hyperparameter("z_loss", z_loss)
    cap = None
    if logit_softcap is not None:
        cap = checks.hyperparameter("logit_softcap", logit_softcap)
    return e, z, cap


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | Sequence[int] = -1,
    weights: ArrayLike | None = None,
    class_weights: ArrayLike | None = None,
    ignore_index: int | None = -100,
    label_smoothing: float | ArrayLike = 0.0,
    z_loss: float | ArrayLike = 0.0,
    logit_softcap: float | ArrayLike | None = None,
    where: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: float | ArrayLike | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
    axis_name: str | None = None,
    implementation: str | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy with integer class labels, as ``torch.nn.functional.cross_entropy``.

    With :math:`\ell_n = \log\sum_c e^{x_{nc}}` (the log-sum-exp), :math:`w` the class
    weights and :math:`e` the label smoothing over :math:`K` classes:

    .. math::
        L_n = (1 - e)\, w_{y_n} (\ell_n - x_{n y_n})
              + \frac{e}{K} \sum_c w_c (\ell_n - x_{nc}) + z\, \ell_n^2

    ``reduction="mean"`` divides the sum by the number of non-ignored examples, or by
    :math:`\sum_n w_{y_n}` with ``class_weights``, exactly as PyTorch does. With
    ``logit_softcap=c`` the logits are first replaced by :math:`c \tanh(x / c)`, except
    that ``-inf`` stays ``-inf`` (the class stays removed; ``+inf`` becomes ``c``).

    A logit of ``-inf`` (or False in a logits-shaped ``where``) removes that class from
    the softmax and from the smoothing term (K counts the remaining classes); its
    gradient is exactly 0. An example with no class left has loss 0 and zero gradient.
    A label outside ``[0, K)`` that is not ``ignore_index`` makes that example's loss NaN;
    under ``jax.experimental.checkify`` it is reported as an error.

    The backward pass saves only the inputs and two floats per example (the row max and
    the shifted log-sum-exp); the softmax is recomputed from them.

    Args:
      logits: float array ``[..., K, ...]``; bf16/fp16 computed in float32.
      labels: integer array of the logits' shape without the class axes (any integer
        dtype; compared as int32).
      axis: the class axis, or a tuple of axes flattened (row-major) into one class axis.
      weights: optional per-example multiplier, broadcastable to ``labels``.
      class_weights: optional ``[K]`` weight per class (PyTorch's ``weight``).
      ignore_index: label value whose examples are excluded (``None`` for none).
      label_smoothing: e in [0, 1]; a Python number or a scalar array (a jit argument).
      z_loss: coefficient >= 0 of the :math:`\ell^2` auxiliary loss (PaLM); number or array.
      logit_softcap: optional c > 0 for Gemma-style soft-capping; number or array.
      where: optional boolean mask, per example (labels' shape) or per logit (logits' shape).
      reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-example losses).
      axis_name: mesh axis over which the class axis is sharded (vocabulary parallel).
      implementation: how the log-sum-exp is reduced: ``"one_pass"`` (one variadic
        max/sum-exp reduction, the logits read once; the default on GPU and TPU),
        ``"two_pass"`` (max, then sum of exps; the default on CPU) or ``None`` (picked
        for the platform the program is lowered for).
      normalizer: optional denominator of ``"mean"`` in place of the included count (for
        gradient accumulation: the whole batch's count, so the micro-batch losses and
        their gradients add up to the whole batch's mean; see :ref:`gradient-accumulation`).
      batch_axis_name: optional mesh axis the batch is sharded on, inside ``shard_map``
        or ``pmap``: ``"sum"`` and ``"mean"`` are then over the global batch.

    Returns:
      A float32 scalar, or the per-example losses for ``"none"``.

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> logits = jnp.array([[2.0, 0.0, -jnp.inf], [0.0, 1.0, 0.0]])
      >>> jbce.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, -100]))
      Array(0.126928..., dtype=float32)
    """
    checks.implementation(implementation, _stats.LSE_METHODS)
    e, z, cap = _options(label_smoothing, z_loss, logit_softcap)
    shards = 1 if axis_name is None else checks.axis_size("axis_name", axis_name)
    checks.check_reduction(reduction)
    inp = inputs.integer_inputs(
        logits, labels, axis=axis, where=where, options=(e, z, cap), shards=shards,
        label_options=inputs.LabelOptions(weights, class_weights, ignore_index),
    )  # fmt: skip
    x, labels, dt, rows = inp.x, inp.labels, inp.dtype, inp.rows
    num_classes = x.shape[-1] * shards
    cw = None if inp.class_weights is None else pvary_like(inp.class_weights, x)
    opts = xla.Options(dt, sums=not checks.is_zero(e), axis_name=axis_name, method=implementation)
    st = xla.softmax_stats(x, labels, cw, inp.mask, _scalar(cap, dt), rows, opts)
    loss, has = _stats.loss_terms(
        st, labels, num_classes=num_classes, label_smoothing=e, z_loss=z,
        class_weighted=cw is not None,
    )  # fmt: skip
    return reduce_loss(
        loss,
        reduction=reduction,
        weights=inp.weights,
        where=checks.both(rows, has),
        denominator_weights=None if cw is None else st.target_weight,
        normalizer=normalizer,
        batch_axis_name=batch_axis_name,
    )


def _scalar(v, dt):
    return None if v is None else jnp.asarray(v, dt)


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | Sequence[int] = -1,
    weights: ArrayLike | None = None,
    label_smoothing: float | ArrayLike = 0.0,
    where: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: float | ArrayLike | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
    implementation: str | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy against probability targets (soft labels).

    .. math::
        L_n = -\sum_c \tilde y_{nc} \log \mathrm{softmax}(x_n)_c, \qquad
        \tilde y = (1 - e)\, y + e / K

    Equals ``torch.nn.functional.cross_entropy`` with probability targets (and its
    ``label_smoothing``), and with ``reduction="none"`` optax's
    ``softmax_cross_entropy`` (including ``axis`` tuples and a logits-shaped ``where``,
    which takes classes out of the softmax). A ``-inf`` logit whose label is 0 contributes
    nothing and gets exactly zero gradient. ``"mean"`` divides by the number of included
    examples: an example whose every class is ``-inf`` or masked is not one (as with
    integer labels).

    Args:
      logits: float array ``[..., K, ...]``; bf16/fp16 computed in float32.
      labels: target distributions, same shape as ``logits``.
      axis: class axis or tuple of class axes.
      weights: optional per-example multiplier (the logits' batch shape).
      label_smoothing: e in [0, 1], spread uniformly over the included classes; a Python
        number or a scalar array (a jit argument).
      where: optional boolean mask, per example or per logit.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      implementation: ``"one_pass"``, ``"two_pass"`` or ``None``, as in
        :func:`softmax_cross_entropy_with_integer_labels`.
      normalizer: optional denominator of ``"mean"`` in place of the included count (for
        gradient accumulation: the whole batch's count, so the micro-batch losses and
        their gradients add up to the whole batch's mean; see :ref:`gradient-accumulation`).
      batch_axis_name: optional mesh axis the batch is sharded on, inside ``shard_map``
        or ``pmap``: ``"sum"`` and ``"mean"`` are then over the global batch.

    Returns:
      A float32 scalar, or the per-example losses for ``"none"``.

    Example:
      >>> import jax.numpy as jnp, jbce
      >>> jbce.softmax_cross_entropy(jnp.array([[2.0, 0.0]]), jnp.array([[0.75, 0.25]]))
      Array(0.626928..., dtype=float32)
    """
    checks.implementation(implementation, _stats.LSE_METHODS)
    e, _, _ = _options(label_smoothing)
    checks.check_reduction(reduction)
    inp = inputs.soft_inputs(logits, labels, axis=axis, weights=weights, where=where, options=(e,))
    x, y, dt, rows = inp.x, inp.labels, inp.dtype, inp.rows
    if not checks.is_zero(e):
        inc = _stats.included(x, inp.mask)
        k = jnp.maximum(jnp.sum(inc, axis=-1, keepdims=True), 1).astype(dt)
        y = jnp.where(inc, y.astype(dt) * (1 - e) + e / k, y.astype(dt))
    y = pvary_like(y, x)
    opts = xla.Options(dt, sums=True, soft=True, method=implementation)
    st = xla.softmax_stats(x, None, y, inp.mask, None, rows, opts)
    loss, has = _stats.soft_terms(st)
    return reduce_loss(
        loss, reduction=reduction, weights=inp.weights, where=checks.both(rows, has),
        normalizer=normalizer, batch_axis_name=batch_axis_name,
    )  # fmt: skip
