"""The one float64 reference of every jbce loss, its tolerances, and PyTorch oracles.

Every public loss ``jbce.<name>`` has exactly one reference here, ``ref_<name>``, taking the
same arguments and keyword options (the implementation options ``implementation``,
``chunk_size``, ``axis_name``, ``batch_axis_name`` and ``gradient_filter`` aside) plus
``xp``. It is written from the documented formulas, not from jbce's code, in float64:

* numpy by default, or ``jax.numpy`` with ``xp=jnp``: then the reference is differentiable
  to any order, and the reference gradients, JVPs and Hessians are ``jax.grad``/``jax.jvp``/
  ``jax.hessian`` of it. Every mask is a double ``where`` so that excluded entries get exactly
  zero derivatives (no ``inf * 0``), and ``(1 - p) ** gamma`` is taken as 0 with zero
  derivative where ``1 - p`` is exactly 0 (the limit of every focal term there).
* ``torch_*`` functions: the matching ``torch.nn.functional`` call in float64 (imported
  lazily).
* :data:`TOLERANCE` / :func:`tolerance` / :func:`assert_close`: one tolerance per dtype.

The semantics every reference shares:

* A softmax runs over the **included** classes only: a class is included unless its logit
  is ``-inf`` or a logits-shaped ``where`` is False there. A NaN logit is included (NaN in
  gives NaN out); a ``+inf`` logit makes its row NaN (the softmax is undefined).
* A row with no included class (all ``-inf``, or all masked by ``where``) is excluded like a
  row that a per-example ``where`` excludes: 0 in ``"none"``, left out of every mean.
* A target on a class that ``where`` masks is dropped; a positive target on a ``-inf``
  class (that ``where`` keeps) gives ``+inf``.
* ``weights`` multiply each example and are not in the mean's denominator; ``where`` False
  removes an example from numerator and denominator; ``"mean"`` over nothing is 0;
  ``normalizer`` replaces the mean's denominator; ``"batchmean"`` divides the sum by the
  size of the first batch axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

# --------------------------------------------------------------------------------------
# Tolerances: one per dtype, for a result computed from the *same* (rounded) inputs as the
# float64 reference, scaled with the size of the reduced axis (tokamax's test_base).
# --------------------------------------------------------------------------------------

TOLERANCE = {
    np.dtype("float64"): 1e-12,
    np.dtype("float32"): 4 * float(np.finfo(np.float32).eps),  # a few ulps
    np.dtype(ml_dtypes.bfloat16): 1e-2,  # one bf16 rounding of an output or a gradient
    np.dtype("float16"): 2e-3,
}
RTOL = {dt: TOLERANCE[np.dtype(dt)] for dt in ("float64", "float32")}


def tolerance(dtype, size: int = 1) -> float:
    """Relative (and, for O(1) data, absolute) tolerance of a result in ``dtype`` whose
    computation sums over ``size`` terms: the compute dtype's few ulps times sqrt(size),
    plus for bf16/fp16 (computed in float32) one rounding to ``dtype``."""
    dt = np.dtype(dtype)
    compute = np.dtype("float64") if dt == np.float64 else np.dtype("float32")
    accumulated = TOLERANCE[compute] * max(1.0, float(np.sqrt(size)))
    return accumulated if dt == compute else TOLERANCE[dt] + accumulated


def rtol_for(dtype) -> float:
    """Tolerance for a result computed in ``dtype`` (bf16/fp16 inputs compute in float32)."""
    dt = np.dtype(dtype)
    return TOLERANCE[dt if dt == np.float64 else np.dtype("float32")]


def assert_close(actual, expected, *, rtol: float | None = None, atol: float = 0.0, dtype=None):
    """``actual`` equals the float64 ``expected`` to ``rtol`` (default: per ``dtype``).

    Infinities and NaNs must match exactly in position and sign. ``dtype`` defaults to
    ``actual``'s dtype.
    """
    actual_np = np.asarray(actual)
    if rtol is None:
        rtol = rtol_for(dtype if dtype is not None else actual_np.dtype)
    a = actual_np.astype(np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, equal_nan=True)


# --------------------------------------------------------------------------------------
# Elementary float64 functions (numpy or jax.numpy through ``xp``)
# --------------------------------------------------------------------------------------


def softplus(x, xp=np):
    """log(1 + exp(x)), exact for every finite and infinite x."""
    return xp.logaddexp(xp.zeros_like(x), x)


def sigmoid(x, xp=np):
    """1 / (1 + exp(-x)) without overflow."""
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


def xlogy(a, b, xp=np):
    """a * b with the term switched off (0) where a == 0, even if b is infinite.

    Differentiable in ``a`` at a == 0 (the derivative is b) wherever b is finite.
    """
    b_safe = xp.where((a == 0) & xp.isinf(b), xp.zeros_like(b), b)
    return a * b_safe


def power(u, gamma, xp=np):
    """u ** gamma for u >= 0, with 0 ** 0 = 1 and, where u == 0 exactly, zero derivatives.

    A focal factor (1 - p) ** gamma multiplies log p (or a BCE term) that vanishes at least
    as fast as 1 - p, so every derivative of the product tends to 0 there, also for
    gamma < 1 where the factor's own derivative is infinite.
    """
    zero = u == 0
    safe = xp.where(zero, xp.ones_like(u), u)
    return xp.where(zero, xp.where(gamma == 0, 1.0, 0.0) + 0.0 * u, safe**gamma)


@jax.custom_jvp
def _clamped_log_jnp(p):
    return jnp.maximum(jnp.log(p), -100.0)


@_clamped_log_jnp.defjvp
def _clamped_log_jvp(primals, tangents):
    (p,), (t,) = primals, tangents
    return _clamped_log_jnp(p), t / jnp.maximum(p, 1e-12)


def clamped_log(p, xp=np):
    """max(log p, -100) (PyTorch's BCE clamp), whose derivative is 1 / max(p, 1e-12) (PyTorch's
    backward): finite at p = 0, and the derivative of the clamp is not 0 below e^-100."""
    if xp is np:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.maximum(np.log(p), -100.0)
    return _clamped_log_jnp(p)


@jax.custom_jvp
def _bce_jnp(p, y):
    return -(y * _clamped_log_jnp(p) + (1 - y) * _clamped_log_jnp(1 - p))


@_bce_jnp.defjvp
def _bce_jvp(primals, tangents):
    """PyTorch's gradient (p - y) / max(p (1 - p), 1e-12) in p (0 where p = y = 0 or 1)."""
    (p, y), (tp, ty) = primals, tangents
    dp = (p - y) / jnp.maximum(p * (1 - p), 1e-12)
    dy = _clamped_log_jnp(1 - p) - _clamped_log_jnp(p)
    return _bce_jnp(p, y), dp * tp + dy * ty


@jax.custom_jvp
def _plogp_jnp(p, tiny):
    return p * jnp.log(jnp.where(p == 0, 1.0, p))


@_plogp_jnp.defjvp
def _plogp_jvp(primals, tangents):
    """d(p log p) = log max(p, tiny) + 1: finite at p = 0 (the documented clamp)."""
    (p, tiny), (t, _) = primals, tangents
    return _plogp_jnp(p, tiny), (jnp.log(jnp.maximum(p, tiny)) + 1) * t


def canonical_axes(axis, ndim: int) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(a % ndim for a in axes)


def move_classes_last(x, axis, xp=np):
    """Moves the class axes to the end (keeping their order) and flattens them: (..., K)."""
    nd = x.ndim
    axes = canonical_axes(axis, nd)
    batch = tuple(i for i in range(nd) if i not in axes)
    xt = xp.transpose(x, batch + axes)
    k = int(np.prod([x.shape[i] for i in axes]))
    return xp.reshape(xt, tuple(x.shape[i] for i in batch) + (k,))


def move_classes_back(flat, shape, axis, xp=np):
    """Inverse of :func:`move_classes_last`: (..., K) back to ``shape`` with classes at ``axis``."""
    nd = len(shape)
    axes = canonical_axes(axis, nd)
    batch = tuple(i for i in range(nd) if i not in axes)
    perm = batch + axes
    x = xp.reshape(flat, tuple(shape[i] for i in perm))
    return xp.transpose(x, tuple(int(i) for i in np.argsort(perm)))


def reduce(values, reduction: str, *, where=None, den=None, normalizer=None, xp=np):
    """Applies ``where`` and the reduction; ``den`` is the mean's denominator (default count).

    ``normalizer`` replaces the mean's denominator; ``"batchmean"`` divides the sum by the
    size of the first batch axis (``values.shape[0]``, 1 for a scalar).
    """
    if where is not None:
        where = xp.broadcast_to(xp.asarray(where, dtype=bool), values.shape)
        values = xp.where(where, values, xp.zeros_like(values))
    if reduction == "none":
        return values
    total = xp.sum(values)
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(values.shape[0] if values.ndim else 1, 1)
    if reduction != "mean":
        raise ValueError(reduction)
    if normalizer is not None:
        return total / normalizer
    if den is None:
        den = float(values.size) if where is None else xp.sum(where, dtype=xp.float64)
    return xp.where(den == 0, 0.0 * total, total / xp.where(den == 0, 1.0, den))


def _f64(x, xp):
    return None if x is None else xp.asarray(x, dtype=xp.float64)


def _times(loss, factor, xp):
    """loss * factor (broadcast to loss' shape), or loss when factor is None."""
    if factor is None:
        return loss
    return loss * xp.broadcast_to(_f64(factor, xp), loss.shape)


# --------------------------------------------------------------------------------------
# Binary losses (elementwise; ``where`` is elementwise)
# --------------------------------------------------------------------------------------


def ref_sigmoid_binary_cross_entropy(
    logits,
    labels,
    *,
    weights=None,
    pos_weight=None,
    label_smoothing=0.0,
    where=None,
    reduction="mean",
    normalizer=None,
    xp=np,
):
    r"""-(pw y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))), y -> y (1 - e) + e / 2.

    Matches ``torch.nn.functional.binary_cross_entropy_with_logits`` (``weight`` =
    ``weights``, ``pos_weight``). Infinite logits give 0 where a hard label agrees with
    the sign and +inf where it disagrees.
    """
    x = _f64(logits, xp)
    y = xp.broadcast_to(_f64(labels, xp), x.shape)
    y = y * (1 - label_smoothing) + label_smoothing / 2
    pw = 1.0 if pos_weight is None else xp.broadcast_to(_f64(pos_weight, xp), x.shape)
    # -log sigmoid(x) = softplus(-x); -log(1 - sigmoid(x)) = softplus(x)
    loss = xlogy(pw * y, softplus(-x, xp), xp) + xlogy(1 - y, softplus(x, xp), xp)
    loss = _times(loss, weights, xp)
    return reduce(loss, reduction, where=where, normalizer=normalizer, xp=xp)


def ref_binary_cross_entropy(
    probs,
    labels,
    *,
    weights=None,
    label_smoothing=0.0,
    where=None,
    reduction="mean",
    normalizer=None,
    xp=np,
):
    """-(y max(log p, -100) + (1 - y) max(log(1 - p), -100)), as torch's binary_cross_entropy,
    with torch's gradient (p - y) / max(p (1 - p), 1e-12) in p."""
    p = _f64(probs, xp)
    y = xp.broadcast_to(_f64(labels, xp), p.shape)
    y = y * (1 - label_smoothing) + label_smoothing / 2
    if xp is np:
        loss = -(y * clamped_log(p) + (1 - y) * clamped_log(1 - p))
    else:
        loss = _bce_jnp(p, y)
    loss = _times(loss, weights, xp)
    return reduce(loss, reduction, where=where, normalizer=normalizer, xp=xp)


def ref_sigmoid_focal_loss(
    logits,
    labels,
    *,
    alpha=None,
    gamma=2.0,
    weights=None,
    where=None,
    reduction="mean",
    normalizer=None,
    xp=np,
):
    """Lin et al. (2017): alpha_t (1 - p_t)^gamma BCE(x, y), p_t = p y + (1 - p)(1 - y)."""
    x = _f64(logits, xp)
    y = xp.broadcast_to(_f64(labels, xp), x.shape)
    ce = ref_sigmoid_binary_cross_entropy(x, y, reduction="none", xp=xp)
    one_minus_pt = y * sigmoid(-x, xp) + (1 - y) * sigmoid(x, xp)
    loss = ce * power(one_minus_pt, gamma, xp)
    if alpha is not None:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    loss = _times(loss, weights, xp)
    return reduce(loss, reduction, where=where, normalizer=normalizer, xp=xp)


def ref_discriminator_loss(real_logits, fake_logits, *, xp=np):
    """mean(-log sigmoid(real)) + mean(-log(1 - sigmoid(fake)))."""
    r, f = _f64(real_logits, xp), _f64(fake_logits, xp)
    return reduce(softplus(-r, xp), "mean", xp=xp) + reduce(softplus(f, xp), "mean", xp=xp)


def ref_generator_loss(fake_logits, *, xp=np):
    """Non-saturating generator loss: mean(-log sigmoid(fake))."""
    return reduce(softplus(-_f64(fake_logits, xp), xp), "mean", xp=xp)


# --------------------------------------------------------------------------------------
# The softmax over the included classes, shared by every softmax reference
# --------------------------------------------------------------------------------------


def _rows(logits, where, axis, xp):
    """(x (..., K) float64, class mask (..., K), per-example mask of the batch shape or None).

    ``where`` is per example (the batch shape) or per logit (the logits' shape).
    """
    x = move_classes_last(_f64(logits, xp), axis, xp)
    if where is None:
        return x, xp.ones(x.shape, bool), None
    w = xp.asarray(where, dtype=bool)
    if w.ndim == np.ndim(logits):
        return x, move_classes_last(xp.broadcast_to(w, np.shape(logits)), axis, xp), None
    return x, xp.ones(x.shape, bool), xp.broadcast_to(w, x.shape[:-1])


def log_softmax(x, include, xp=np):
    """The softmax over the included classes of each row of ``x`` (..., K).

    Returns ``(logp, lse, alive)``: log-probabilities (0 outside ``include``, so that
    they can be differentiated), the log-sum-exp of the included logits (NaN in a row
    with an included ``+inf``) and whether the row has any included class.
    """
    xs = xp.where(include, x, 0.0)
    m = xp.max(xp.where(include, xs, -np.inf), axis=-1, keepdims=True)
    plus_inf = m == np.inf
    m = xp.where(xp.isfinite(m), m, 0.0)
    e = xp.where(include, xp.exp(xp.where(include, xs - m, 0.0)), 0.0)
    s = xp.sum(e, axis=-1, keepdims=True)
    alive = xp.any(include, axis=-1, keepdims=True)
    lse = xp.log(xp.where(alive, s, 1.0)) + m
    lse = lse * xp.where(plus_inf, np.nan, 1.0)  # NaN in every derivative too
    logp = xp.where(include, xs - lse, 0.0)
    return logp, lse[..., 0], alive[..., 0]


def _soft_rows(logits, labels, where, axis, xp):
    """(targets, classes kept by ``where``, included classes, log-softmax over those, rows
    with a class, kept examples) of a soft-label loss, classes last."""
    x, cls, ex = _rows(logits, where, axis, xp)
    y = xp.where(cls, move_classes_last(_f64(labels, xp), axis, xp), 0.0)
    include = cls & (x != -np.inf)
    logp, _, alive = log_softmax(x, include, xp)
    return y, cls, include, logp, alive, ex


def _targets(y, logp, include, in_sum, xp, positive=None):
    """-sum_c y_c log p_c over ``in_sum`` classes: +inf for a positive target (``positive``,
    default y > 0) on an excluded (-inf) one, whose derivatives are 0 (the class is not in
    the softmax)."""
    on_minus_inf = in_sum & ~include
    positive = y > 0 if positive is None else positive
    inf_terms = xp.where(on_minus_inf & positive, np.inf, 0.0)
    return xp.where(include, -y * logp, inf_terms)


def _soft_finish(loss, alive, ex_mask, weights, reduction, normalizer, xp):
    loss = xp.where(alive, loss, 0.0)
    loss = _times(loss, weights, xp)
    keep = alive if ex_mask is None else alive & ex_mask
    return reduce(loss, reduction, where=keep, normalizer=normalizer, xp=xp)


def _smooth(y, include, label_smoothing, xp):
    """(1 - e) y + e / K over the K included classes of each row."""
    k = xp.sum(include, axis=-1, keepdims=True, dtype=xp.float64)
    return (1 - label_smoothing) * y + xp.where(include, label_smoothing / xp.maximum(k, 1), 0.0)


# --------------------------------------------------------------------------------------
# Softmax losses with soft labels
# --------------------------------------------------------------------------------------


def ref_softmax_cross_entropy(
    logits,
    labels,
    *,
    axis=-1,
    weights=None,
    label_smoothing=0.0,
    where=None,
    reduction="mean",
    normalizer=None,
    xp=np,
):
    r"""-\sum_c \tilde y_c log softmax(x)_c over the included classes (see the module doc).

    Label smoothing maps y to (1 - e) y + e / K over the K included classes. Matches
    torch's ``cross_entropy`` with probability targets, and optax's with ``"none"``.
    """
    y, cls, include, logp, alive, ex = _soft_rows(logits, labels, where, axis, xp)
    y = xp.where(cls, _smooth(y, include, label_smoothing, xp), 0.0)
    loss = xp.sum(_targets(y, logp, include, cls, xp), axis=-1)
    return _soft_finish(loss, alive, ex, weights, reduction, normalizer, xp)


def _focal_terms(y, logp, include, cls, alpha, gamma, xp):
    """-alpha_c y_c (1 - p_c)^gamma log p_c per class (+inf for y > 0 on a -inf class)."""
    a = y if alpha is None else y * xp.broadcast_to(_f64(alpha, xp), y.shape)
    one_minus_p = -xp.expm1(logp)
    return _targets(a * power(one_minus_p, gamma, xp), logp, include, cls, xp, positive=a > 0)


def ref_softmax_focal_loss(
    logits,
    labels,
    *,
    alpha=None,
    gamma=2.0,
    axis=-1,
    weights=None,
    where=None,
    reduction="mean",
    normalizer=None,
    xp=np,
):
    r"""-\sum_c \alpha_c y_c (1 - p_c)^\gamma \log p_c (Lin et al.; Keras without clipping)."""
    y, cls, include, logp, alive, ex = _soft_rows(logits, labels, where, axis, xp)
    loss = xp.sum(_focal_terms(y, logp, include, cls, alpha, gamma, xp), axis=-1)
    return _soft_finish(loss, alive, ex, weights, reduction, normalizer, xp)


def ref_poly_loss_cross_entropy(
    logits,
    labels,
    *,
    epsilon=2.0,
    axis=-1,
    weights=None,
    where=None,
    reduction="mean",
    normalizer=None,
    xp=np,
):
    r"""Poly-1: -\sum_c y_c \log p_c + \epsilon \sum_c y_c (1 - p_c) (Leng et al.)."""
    y, cls, include, logp, alive, ex = _soft_rows(logits, labels, where, axis, xp)
    ce = xp.sum(_targets(y, logp, include, cls, xp), axis=-1)
    # a -inf class has no term (its positive target makes the loss +inf): no derivative
    poly = xp.sum(y * xp.where(include, -xp.expm1(logp), 0.0), axis=-1)
    return _soft_finish(ce + epsilon * poly, alive, ex, weights, reduction, normalizer, xp)


def ref_kl_divergence(
    logits,
    labels,
    *,
    axis=-1,
    log_labels=False,
    weights=None,
    where=None,
    reduction="mean",
    normalizer=None,
    xp=np,
):
    r"""KL(y || softmax(x)) = \sum_c y_c (\log y_c - \log q_c), with 0 log 0 = 0.

    With ``log_labels`` the labels are log y (``-inf`` for 0).
    """
    x, cls, ex = _rows(logits, where, axis, xp)
    lab = move_classes_last(_f64(labels, xp), axis, xp)
    if log_labels:
        y = xp.exp(lab)
        logy = xp.where(y == 0, 0.0, lab)
    else:
        y = lab
        logy = xp.log(xp.where(y == 0, 1.0, y))
    y = xp.where(cls, y, 0.0)
    include = cls & (x != -np.inf)
    logp, _, alive = log_softmax(x, include, xp)
    terms = y * logy + _targets(y, logp, include, cls, xp)
    return _soft_finish(xp.sum(terms, axis=-1), alive, ex, weights, reduction, normalizer, xp)


def ref_jensen_shannon_divergence(
    logits,
    teacher_logits,
    *,
    beta=0.5,
    temperature=1.0,
    axis=-1,
    weights=None,
    where=None,
    reduction="mean",
    normalizer=None,
    xp=np,
):
    r"""beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q (GKD).

    Q = softmax(x / T) the student, P = softmax(x_t / T) the teacher, each over its own
    included classes (a class ``-inf`` in one model keeps the other's mass in M; ``-inf``
    in both drops out). The ends are the two KL directions: beta = 0 KL(P || Q), beta = 1
    KL(Q || P). A row where neither model has a class is excluded.
    """
    x, cls, ex = _rows(logits, where, axis, xp)
    t = move_classes_last(_f64(teacher_logits, xp), axis, xp)
    inc_q = cls & (x != -np.inf)
    inc_p = cls & (t != -np.inf)
    lq, _, alive_q = log_softmax(x / temperature, inc_q, xp)
    lp, _, alive_p = log_softmax(t / temperature, inc_p, xp)
    q = xp.where(inc_q, xp.exp(lq), 0.0)
    p = xp.where(inc_p, xp.exp(lp), 0.0)
    at_end = (beta == 0) | (beta == 1)
    b = xp.where(at_end, 0.5, beta)
    both = inc_p & inc_q
    lm = xp.where(
        both,
        xp.logaddexp(lp + xp.log(b), lq + xp.log1p(-b)),
        xp.where(inc_p, lp + xp.log(b), xp.where(inc_q, lq + xp.log1p(-b), 0.0)),
    )
    jsd = b * xp.sum(xp.where(inc_p, p * (lp - lm), 0.0), -1) + (1 - b) * xp.sum(
        xp.where(inc_q, q * (lq - lm), 0.0), -1
    )

    def kl(pa, la, inc_a, lb, inc_b):  # KL(A || B): +inf where A has mass and B none
        inf = xp.where(inc_a & ~inc_b & (pa > 0), np.inf, 0.0)
        return xp.sum(xp.where(inc_a & inc_b, pa * (la - lb), inf), -1)

    fwd = kl(p, lp, inc_p, lq, inc_q)
    rev = kl(q, lq, inc_q, lp, inc_p)
    loss = xp.where(beta == 0, fwd, xp.where(beta == 1, rev, jsd))
    alive = alive_p | alive_q
    return _soft_finish(loss, alive, ex, weights, reduction, normalizer, xp)


def ref_categorical_cross_entropy(
    probs,
    labels,
    *,
    axis=-1,
    weights=None,
    label_smoothing=0.0,
    where=None,
    reduction="mean",
    normalizer=None,
    xp=np,
):
    r"""-\sum_c \tilde y_c \max(\log p_c, -100), \tilde y = (1 - e) y + e / K (not renormalised).

    A logits-shaped ``where`` drops a class's term and takes it out of K; a row with no
    class left is excluded.
    """
    p, cls, ex = _rows(probs, where, axis, xp)
    y = move_classes_last(_f64(labels, xp), axis, xp)
    y = xp.where(cls, _smooth(y, cls, label_smoothing, xp), 0.0)
    logp = clamped_log(xp.where(cls, p, 1.0), xp)
    loss = -xp.sum(xp.where(cls, y * logp, 0.0), axis=-1)
    return _soft_finish(loss, xp.any(cls, -1), ex, weights, reduction, normalizer, xp)


def ref_entropy(probs, *, axis=-1, tiny=None, xp=np):
    r"""H(p) = -\sum_c p_c log p_c over ``axis`` (int or tuple), with 0 log 0 = 0.

    The derivative is the documented -(log max(p, tiny) + 1), ``tiny`` the smallest normal
    number of the dtype computed in (float32's by default).
    """
    p = move_classes_last(_f64(probs, xp), axis, xp)
    tiny = float(np.finfo(np.float32).tiny) if tiny is None else tiny
    if xp is np:
        return -np.sum(p * np.log(np.where(p == 0, 1.0, p)), axis=-1)
    return -xp.sum(_plogp_jnp(p, jnp.asarray(tiny, p.dtype)), axis=-1)


# --------------------------------------------------------------------------------------
# Softmax losses with integer labels
# --------------------------------------------------------------------------------------


def _one_hot(labels, k, xp):
    """labels[..., None] == arange(k), without rank promotion."""
    classes = xp.arange(k, dtype=xp.asarray(labels).dtype)
    return xp.expand_dims(labels, -1) == xp.broadcast_to(classes, labels.shape + (k,))


def _integer_rows(logits, labels, where, axis, ignore_index, xp):
    """(x, class mask, include, label picked safely, one-hot of it, valid, kept rows)."""
    x, cls, ex = _rows(logits, where, axis, xp)
    lab = xp.asarray(labels)
    k = x.shape[-1]
    ignored = (lab == ignore_index) if ignore_index is not None else xp.zeros(lab.shape, bool)
    valid = (lab >= 0) & (lab < k)
    safe = xp.where(valid, lab, 0)
    onehot = _one_hot(safe, k, xp)
    keep = ~ignored if ex is None else ~ignored & ex
    return x, cls, safe, onehot, valid, ignored, keep


def _integer_finish(loss, w_t, valid, ignored, keep, weights, reduction, normalizer, xp):
    """NaN for a bad label, weights, ignored/excluded rows out, mean over sum of w_y."""
    loss = xp.where(valid | ignored, loss, np.nan)
    loss = _times(loss, weights, xp)
    loss = xp.where(keep, loss, 0.0)
    den = xp.sum(xp.where(keep, w_t, 0.0))
    return reduce(loss, reduction, den=den, normalizer=normalizer, xp=xp)


def ref_softmax_cross_entropy_with_integer_labels(
    logits,
    labels,
    *,
    axis=-1,
    weights=None,
    class_weights=None,
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    logit_softcap=None,
    where=None,
    reduction="mean",
    normalizer=None,
    xp=np,
):
    r"""Integer-label softmax CE with every jbce option, written from the spec.

    Per example n over the included classes C_n, with class weights w (1 without them),
    K_n = |C_n|, lse_n over C_n:

    .. math::
       \ell_n = (1-\epsilon) w_{y_n} (\mathrm{lse}_n - x_{n y_n})
              + \frac{\epsilon}{K_n} \sum_{c \in C_n} w_c (\mathrm{lse}_n - x_{nc})
              + z\, \mathrm{lse}_n^2

    after ``x -> c tanh(x / c)`` for ``logit_softcap=c`` (a ``-inf`` logit stays
    excluded). ``x_{n y_n}`` is the label's logit even where ``where`` masks the label's
    class (optax's behaviour). ``weights`` multiply ``\ell_n``. Examples with ``label ==
    ignore_index``, ``where`` False or no included class are 0 and leave the mean, which
    divides by the summed class weight of the rest (torch's ``cross_entropy(weight=...)``).
    A label outside [0, K) that is not ``ignore_index`` gives NaN for that example.
    """
    x, cls, safe, onehot, valid, ignored, keep = _integer_rows(
        logits, labels, where, axis, ignore_index, xp
    )
    include = cls & (x != -np.inf)
    if logit_softcap is not None:
        finite = x != -np.inf
        x = xp.where(finite, logit_softcap * xp.tanh(xp.where(finite, x, 0.0) / logit_softcap), x)
    k = x.shape[-1]
    cw = xp.ones((k,), xp.float64) if class_weights is None else _f64(class_weights, xp)
    logp, lse, alive = log_softmax(x, include, xp)
    xs = xp.where(include, x, 0.0)
    x_y = xp.sum(xp.where(onehot, xp.where(onehot & ~include, x, xs), 0.0), axis=-1)
    w_t = cw[safe]
    nll = w_t * xp.where(alive, lse - x_y, 0.0)  # a row without classes: no 0 * inf for w_t
    k_eff = xp.maximum(xp.sum(include, axis=-1, dtype=xp.float64), 1.0)
    smooth = xp.sum(xp.where(include, -xp.broadcast_to(cw, x.shape) * logp, 0.0), axis=-1)
    smooth = smooth / k_eff
    loss = (1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse**2
    loss = xp.where(alive, loss, 0.0)
    return _integer_finish(
        loss, w_t, valid, ignored, keep & alive, weights, reduction, normalizer, xp
    )


def ref_softmax_focal_loss_with_integer_labels(
    logits,
    labels,
    *,
    alpha=None,
    gamma=2.0,
    axis=-1,
    weights=None,
    class_weights=None,
    ignore_index=-100,
    where=None,
    reduction="mean",
    normalizer=None,
    xp=np,
):
    r"""-w_{y} \alpha_{y} (1 - p_y)^\gamma \log p_y: the one-hot :func:`ref_softmax_focal_loss`.

    As in the soft one-hot form, a label whose class ``where`` masks gives 0 (the row still
    counts in the mean); the mean divides by the summed class weight of the kept rows.
    """
    x, cls, safe, onehot, valid, ignored, keep = _integer_rows(
        logits, labels, where, axis, ignore_index, xp
    )
    k = x.shape[-1]
    cw = xp.ones((k,), xp.float64) if class_weights is None else _f64(class_weights, xp)
    include = cls & (x != -np.inf)
    logp, _, alive = log_softmax(x, include, xp)
    y = xp.where(cls & onehot, 1.0, 0.0)
    loss = xp.sum(_focal_terms(y, logp, include, cls, alpha, gamma, xp), axis=-1)
    w_t = cw[safe]
    loss = xp.where(alive, w_t * loss, 0.0)
    return _integer_finish(
        loss, w_t, valid, ignored, keep & alive, weights, reduction, normalizer, xp
    )


def ref_nll_loss(
    log_probs,
    labels,
    *,
    axis=-1,
    weights=None,
    class_weights=None,
    ignore_index=-100,
    where=None,
    reduction="mean",
    normalizer=None,
    xp=np,
):
    r"""-w_{y} \log p_{y} of the given log-probabilities (torch's ``nll_loss``); only the
    label's entry is read. ``where`` is per example."""
    lp = move_classes_last(_f64(log_probs, xp), axis, xp)
    lab = xp.asarray(labels)
    k = lp.shape[-1]
    ignored = (lab == ignore_index) if ignore_index is not None else xp.zeros(lab.shape, bool)
    valid = (lab >= 0) & (lab < k)
    safe = xp.where(valid, lab, 0)
    onehot = _one_hot(safe, k, xp)
    cw = xp.ones((k,), xp.float64) if class_weights is None else _f64(class_weights, xp)
    picked = xp.sum(xp.where(onehot, lp, 0.0), axis=-1)
    w_t = cw[safe]
    keep = ~ignored
    if where is not None:
        keep = keep & xp.broadcast_to(xp.asarray(where, dtype=bool), keep.shape)
    return _integer_finish(-w_t * picked, w_t, valid, ignored, keep, weights, reduction,
                           normalizer, xp)  # fmt: skip


# --------------------------------------------------------------------------------------
# The fused linear losses: the references of the materialised logits h @ W + b
# --------------------------------------------------------------------------------------


def _linear_logits(hidden, weight, bias, xp):
    x = xp.matmul(_f64(hidden, xp), _f64(weight, xp))
    return x if bias is None else x + xp.broadcast_to(_f64(bias, xp), x.shape)


def ref_linear_softmax_cross_entropy(hidden, weight, labels, *, bias=None, xp=np, **options):
    """:func:`ref_softmax_cross_entropy_with_integer_labels` of ``hidden @ weight + bias``."""
    return ref_softmax_cross_entropy_with_integer_labels(
        _linear_logits(hidden, weight, bias, xp), labels, xp=xp, **options
    )


def ref_linear_log_probs(hidden, weight, labels, *, bias=None, temperature=1.0, xp=np):
    r"""(log p_y, H) per token of softmax((h W + b) / T) over the classes whose bias is not
    ``-inf``: a label on a removed class has log-probability ``-inf`` (derivatives: those of
    ``-lse``), a token without any class ``-inf`` and entropy 0."""
    x = _linear_logits(hidden, weight, bias, xp) / temperature
    include = x != -np.inf
    logp, lse, alive = log_softmax(x, include, xp)
    lab = xp.asarray(labels)
    k = x.shape[-1]
    valid = (lab >= 0) & (lab < k)
    onehot = _one_hot(xp.where(valid, lab, 0), k, xp)
    x_y = xp.sum(xp.where(onehot & include, x, 0.0), axis=-1)
    y_in = xp.any(onehot & include, axis=-1)
    log_p = xp.where(y_in, x_y, -np.inf) - xp.where(alive, lse, 0.0)
    log_p = xp.where(valid, log_p, np.nan)
    p = xp.where(include, xp.exp(logp), 0.0)
    ent = xp.where(alive, -xp.sum(p * logp, axis=-1), 0.0)
    return log_p, ent


def ref_linear_distillation_loss(
    hidden,
    weight,
    teacher_hidden,
    teacher_weight,
    *,
    labels=None,
    beta=0.5,
    temperature=1.0,
    bias=None,
    teacher_bias=None,
    ignore_index=-100,
    weights=None,
    reduction="mean",
    normalizer=None,
    xp=np,
):
    """:func:`ref_jensen_shannon_divergence` of the two models' logits; tokens whose label is
    ``ignore_index`` are excluded."""
    where = None
    if labels is not None and ignore_index is not None:
        where = xp.asarray(labels) != ignore_index
    return ref_jensen_shannon_divergence(
        _linear_logits(hidden, weight, bias, xp),
        _linear_logits(teacher_hidden, teacher_weight, teacher_bias, xp),
        beta=beta, temperature=temperature, weights=weights, where=where,
        reduction=reduction, normalizer=normalizer, xp=xp,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# PyTorch oracles (float64); torch is imported when one is called.
# --------------------------------------------------------------------------------------


def _t(x, *, dtype=None, grad=False):
    import torch

    if x is None:
        return None
    t = torch.as_tensor(np.array(x, dtype=dtype if dtype is not None else np.float64))
    if grad:
        t.requires_grad_(True)
    return t


def _finish(out, leaves, grad_of: Sequence[str]):
    """Loss (numpy float64) and, if ``grad_of`` names inputs, their gradients of sum(loss)."""
    value = out.detach().numpy().astype(np.float64)
    if not grad_of:
        return value
    out.sum().backward()
    grads = tuple(leaves[name].grad.numpy().astype(np.float64) for name in grad_of)
    return value, grads


def torch_sigmoid_binary_cross_entropy(
    logits, labels, *, weights=None, pos_weight=None, reduction="mean", grad_of=()
):
    """``F.binary_cross_entropy_with_logits`` in float64.

    ``grad_of`` may name ``"logits"``, ``"labels"``, ``"weights"``, ``"pos_weight"``;
    then returns ``(loss, grads)`` with the gradients of ``sum(loss)``.
    """
    import torch.nn.functional as F

    leaves = {
        "logits": _t(logits, grad="logits" in grad_of),
        "labels": _t(labels, grad="labels" in grad_of),
        "weights": _t(weights, grad="weights" in grad_of),
        "pos_weight": _t(pos_weight, grad="pos_weight" in grad_of),
    }
    out = F.binary_cross_entropy_with_logits(
        leaves["logits"],
        leaves["labels"].expand_as(leaves["logits"]),
        weight=leaves["weights"],
        pos_weight=leaves["pos_weight"],
        reduction=reduction,
    )
    return _finish(out, leaves, grad_of)


def torch_binary_cross_entropy(probs, labels, *, weights=None, reduction="mean", grad_of=()):
    """``F.binary_cross_entropy`` (log terms clamped at -100) in float64."""
    import torch.nn.functional as F

    leaves = {
        "probs": _t(probs, grad="probs" in grad_of),
        "labels": _t(labels, grad="labels" in grad_of),
        "weights": _t(weights, grad="weights" in grad_of),
    }
    w = leaves["weights"]
    if w is not None:
        w = w.expand_as(leaves["probs"])
    out = F.binary_cross_entropy(
        leaves["probs"],
        leaves["labels"].expand_as(leaves["probs"]),
        weight=w,
        reduction=reduction,
    )
    return _finish(out, leaves, grad_of)


def torch_cross_entropy(
    logits,
    target,
    *,
    axis: int = -1,
    weight=None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    grad_of=(),
):
    """``F.cross_entropy`` in float64, with the class axis at ``axis`` (moved to torch's dim 1).

    ``target`` is an integer array of class indices (batch shape) or a float array of
    probabilities (logits' shape). ``grad_of`` may name ``"logits"`` (and ``"target"``
    for probability targets). ``reduction="none"`` returns the batch shape in jbce's
    order (class axis removed).
    """
    import torch
    import torch.nn.functional as F

    x = np.moveaxis(np.asarray(logits, dtype=np.float64), axis, 1 if np.ndim(logits) > 1 else 0)
    tgt = np.asarray(target)
    is_index = np.issubdtype(tgt.dtype, np.integer)
    if not is_index:
        tgt = np.moveaxis(tgt.astype(np.float64), axis, 1 if tgt.ndim > 1 else 0)
    leaves = {
        "logits": _t(x, grad="logits" in grad_of),
        "target": torch.as_tensor(tgt.astype(np.int64))
        if is_index
        else _t(tgt, grad="target" in grad_of),
    }
    out = F.cross_entropy(
        leaves["logits"],
        leaves["target"],
        weight=_t(weight),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    res = _finish(out, leaves, grad_of)
    if not grad_of:
        return res
    value, grads = res
    back = 1 if np.ndim(logits) > 1 else 0
    grads = tuple(np.moveaxis(g, back, axis) for g in grads)
    return value, grads


def torch_kl_divergence(labels, logits, *, grad_of=()):
    """KL(labels || softmax(logits)) along the last axis via ``F.kl_div`` (float64)."""
    import torch.nn.functional as F

    leaves = {"logits": _t(logits, grad="logits" in grad_of), "labels": _t(labels)}
    out = F.kl_div(F.log_softmax(leaves["logits"], dim=-1), leaves["labels"], reduction="none").sum(
        -1
    )
    return _finish(out, leaves, grad_of)


def saved_residuals(f, *args):
    """``jax.ad_checkpoint.saved_residuals``: (aval, description) of what ``grad(f)`` keeps."""
    try:
        from jax.ad_checkpoint import saved_residuals as impl
    except ImportError:  # jax >= 0.8 keeps it private; print_saved_residuals is public
        from jax._src.ad_checkpoint import saved_residuals as impl
    return impl(f, *args)


# --------------------------------------------------------------------------------------
# Contrastive losses: the dense [B, B] similarity matrix (jbce.clip_loss, jbce.siglip_loss)
# --------------------------------------------------------------------------------------


def _similarity(x, y, scale, ids, xp):
    """(logits scale x y^T, true pairs [B, B] as 0/1) in float64; ``ids`` None: the diagonal."""
    x = xp.asarray(x, dtype=xp.float64)
    y = xp.asarray(y, dtype=xp.float64)
    logits = xp.asarray(scale, dtype=xp.float64) * (x @ y.T)
    ids = xp.arange(x.shape[0]) if ids is None else xp.asarray(ids)
    return logits, xp.asarray(ids[:, None] == ids[None, :], xp.float64)


def ref_clip_loss(x, y, *, scale, ids=None, reduction="mean", xp=np):
    """Radford et al. (2021): the mean of (CE(L_i., q_i.) + CE(L_.i, q_.i)) / 2, L = s x y^T,
    targets q uniform over each pair's positives (equal ids)."""
    if np.shape(x)[0] == 0:  # no pairs
        return reduce(xp.zeros((0,)), reduction, xp=xp)
    logits, pos = _similarity(x, y, scale, ids, xp)
    q = pos / xp.sum(pos, axis=1, keepdims=True)
    rows = ref_softmax_cross_entropy(logits, q, reduction="none", xp=xp)
    cols = ref_softmax_cross_entropy(logits.T, q.T, reduction="none", xp=xp)
    return reduce((rows + cols) / 2, reduction, xp=xp)


def ref_siglip_loss(x, y, *, scale, bias, ids=None, reduction="mean", xp=np):
    """Zhai et al. (2023): -(1/B) sum_ij log sigmoid(z_ij (s x_i.y_j + b)), z = +1 on true
    pairs and -1 elsewhere; ``"none"``: the row sums."""
    if np.shape(x)[0] == 0:  # no pairs
        return reduce(xp.zeros((0,)), reduction, xp=xp)
    logits, pos = _similarity(x, y, scale, ids, xp)
    logits = logits + xp.asarray(bias, dtype=xp.float64)
    bce = ref_sigmoid_binary_cross_entropy(logits, pos, reduction="none", xp=xp)
    return reduce(xp.sum(bce, axis=1), reduction, xp=xp)
