"""Independent float64 references and PyTorch oracles for every jbce loss.

This module is the one oracle harness shared by the core, fused-linear and
vocabulary-parallel tests. It is written from the specification (issue 6 and
``/work/notes/API.md``), not from jbce's code, and uses the plain textbook
formulas in float64:

* ``ref_*`` functions: numpy (or ``jax.numpy`` via ``xp=jnp``, so a reference can be
  differentiated with ``jax.grad`` in float64 to get reference gradients and
  Hessians). Every option of the public API is implemented here.
* ``torch_*`` functions: the matching ``torch.nn.functional`` call, in float64,
  returning numpy values (and gradients on request). They import torch lazily;
  callers should ``pytest.importorskip("torch")`` first.
* :func:`assert_close` with per-dtype tolerances (:data:`RTOL`).

Conventions shared by every reference (the spec's semantics):

* ``weights`` multiply each term and do not enter the mean's denominator;
* ``where`` (False = excluded) removes a term from numerator and denominator;
* ``"mean"`` over nothing is 0; ``"none"`` returns 0 where excluded/ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Relative tolerance per compute dtype, for values compared against a float64 reference
# computed from the *same* (rounded) inputs.
RTOL = {
    np.dtype("float64"): 1e-12,
    np.dtype("float32"): 4 * float(np.finfo(np.float32).eps),  # a few ulps
}


def rtol_for(dtype) -> float:
    """Relative tolerance for a result computed in ``dtype`` (bf16/fp16 compute in float32)."""
    dt = np.dtype(dtype)
    return RTOL.get(dt, RTOL[np.dtype("float32")])


def assert_close(actual, expected, *, rtol: float | None = None, atol: float = 0.0, dtype=None):
    """``actual`` equals the float64 ``expected`` to ``rtol`` (default: per ``dtype``).

    Infinities and NaNs must match exactly in position and sign. ``dtype`` defaults to
    ``actual``'s dtype. A small ``atol`` is scaled by the largest magnitude of
    ``expected`` when ``atol`` is not given, so sums of cancelling terms compare fairly.
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


def reduce(values, reduction: str, *, where=None, den=None, xp=np):
    """Applies ``where`` and the reduction; ``den`` is the mean's denominator (default count)."""
    if where is not None:
        where = xp.broadcast_to(xp.asarray(where, dtype=bool), values.shape)
        values = xp.where(where, values, xp.zeros_like(values))
    if reduction == "none":
        return values
    total = xp.sum(values)
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(reduction)
    if den is None:
        den = float(values.size) if where is None else xp.sum(where, dtype=xp.float64)
    return xp.where(den == 0, 0.0 * total, total / xp.where(den == 0, 1.0, den))


def _broadcast_opt(v, shape, xp, default=None):
    if v is None:
        return default
    return xp.broadcast_to(xp.asarray(v, dtype=xp.float64), shape)


# --------------------------------------------------------------------------------------
# Binary losses
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
    xp=np,
):
    r"""-(pw y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))), y -> y (1 - e) + e / 2.

    Matches ``torch.nn.functional.binary_cross_entropy_with_logits`` (``weight`` =
    ``weights``, ``pos_weight``). Infinite logits give 0 where a hard label agrees with
    the sign and +inf where it disagrees.
    """
    x = xp.asarray(logits, dtype=xp.float64)
    y = xp.broadcast_to(xp.asarray(labels, dtype=xp.float64), x.shape)
    if label_smoothing:
        y = y * (1 - label_smoothing) + label_smoothing / 2
    pw = _broadcast_opt(pos_weight, x.shape, xp, default=1.0)
    # -log sigmoid(x) = softplus(-x); -log(1 - sigmoid(x)) = softplus(x)
    loss = xlogy(pw * y, softplus(-x, xp), xp) + xlogy(1 - y, softplus(x, xp), xp)
    w = _broadcast_opt(weights, x.shape, xp)
    if w is not None:
        loss = loss * w
    return reduce(loss, reduction, where=where, xp=xp)


def ref_binary_cross_entropy(
    probs, labels, *, weights=None, label_smoothing=0.0, where=None, reduction="mean", xp=np
):
    """-(y max(log p, -100) + (1 - y) max(log(1 - p), -100)), as torch's binary_cross_entropy."""
    p = xp.asarray(probs, dtype=xp.float64)
    y = xp.broadcast_to(xp.asarray(labels, dtype=xp.float64), p.shape)
    if label_smoothing:
        y = y * (1 - label_smoothing) + label_smoothing / 2
    with np.errstate(divide="ignore"):
        logp = xp.maximum(xp.log(p), -100.0)
        log1mp = xp.maximum(xp.log1p(-p), -100.0)
    loss = -(y * logp + (1 - y) * log1mp)
    w = _broadcast_opt(weights, p.shape, xp)
    if w is not None:
        loss = loss * w
    return reduce(loss, reduction, where=where, xp=xp)


def ref_sigmoid_focal_loss(
    logits, labels, *, alpha=None, gamma=2.0, weights=None, where=None, reduction="mean", xp=np
):
    """Lin et al. (2017): alpha_t (1 - p_t)^gamma BCE(x, y), p_t = p y + (1 - p)(1 - y)."""
    x = xp.asarray(logits, dtype=xp.float64)
    y = xp.broadcast_to(xp.asarray(labels, dtype=xp.float64), x.shape)
    ce = ref_sigmoid_binary_cross_entropy(x, y, reduction="none", xp=xp)
    one_minus_pt = y * sigmoid(-x, xp) + (1 - y) * sigmoid(x, xp)
    loss = ce * one_minus_pt**gamma
    if alpha is not None:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    w = _broadcast_opt(weights, x.shape, xp)
    if w is not None:
        loss = loss * w
    return reduce(loss, reduction, where=where, xp=xp)


def ref_discriminator_loss(real_logits, fake_logits, xp=np):
    """mean(-log sigmoid(real)) + mean(-log(1 - sigmoid(fake)))."""
    r = xp.asarray(real_logits, dtype=xp.float64)
    f = xp.asarray(fake_logits, dtype=xp.float64)
    return reduce(softplus(-r, xp), "mean", xp=xp) + reduce(softplus(f, xp), "mean", xp=xp)


def ref_generator_loss(fake_logits, xp=np):
    """Non-saturating generator loss: mean(-log sigmoid(fake))."""
    f = xp.asarray(fake_logits, dtype=xp.float64)
    return reduce(softplus(-f, xp), "mean", xp=xp)


# --------------------------------------------------------------------------------------
# Softmax losses
# --------------------------------------------------------------------------------------


def _logsumexp_masked(x, mask, xp):
    """log sum_{c: mask} exp(x_c) along the last axis; -inf where nothing is included."""
    neg = xp.full_like(x, -np.inf)
    xm = xp.where(mask, x, neg)
    m = xp.max(xm, axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    s = xp.sum(xp.where(mask, xp.exp(xm - m), xp.zeros_like(x)), axis=-1)
    with np.errstate(divide="ignore"):
        return xp.log(s) + m[..., 0]


def _split_where(where, logits_shape, axis, xp):
    """(per-example mask of the batch shape or None, per-class mask (..., K) or None)."""
    if where is None:
        return None, None
    w = xp.asarray(where, dtype=bool)
    if w.ndim == len(logits_shape):
        wl = move_classes_last(xp.broadcast_to(w, logits_shape), axis, xp)
        return None, wl
    return w, None


def ref_softmax_cross_entropy(
    logits,
    labels,
    *,
    axis=-1,
    weights=None,
    label_smoothing=0.0,
    where=None,
    reduction="mean",
    xp=np,
):
    r"""-\sum_c y_c log softmax(x)_c over the class axes (an int or a tuple).

    ``where`` is per example (the batch shape) or per logit (the logits' shape; masked
    classes leave the softmax and the sum). Label smoothing maps y to
    (1 - e) y + e / K over the K included classes. Logits of -inf leave the softmax
    (their probability is 0, and a zero label there contributes nothing).
    Matches torch's ``cross_entropy`` with probability targets.
    """
    x = move_classes_last(xp.asarray(logits, dtype=xp.float64), axis, xp)
    y = move_classes_last(xp.asarray(labels, dtype=xp.float64), axis, xp)
    ex_mask, cls_mask = _split_where(where, np.shape(logits), axis, xp)
    include = x > -np.inf if cls_mask is None else cls_mask & (x > -np.inf)
    if label_smoothing:
        k_eff = xp.sum(include, axis=-1, keepdims=True, dtype=xp.float64)
        y = (1 - label_smoothing) * y + label_smoothing / k_eff
    lse = _logsumexp_masked(x, include, xp)
    logp = x - lse[..., None]
    terms = xp.where(include, -xlogy(y, logp, xp), xp.zeros_like(x))
    loss = xp.sum(terms, axis=-1)
    any_included = xp.any(include, axis=-1)
    if cls_mask is not None:
        loss = xp.where(xp.any(cls_mask, axis=-1), loss, xp.zeros_like(loss))
    if weights is not None:
        loss = loss * xp.broadcast_to(xp.asarray(weights, dtype=xp.float64), loss.shape)
    mask = ex_mask
    if cls_mask is not None:
        mask = xp.any(cls_mask, axis=-1)
    del any_included
    return reduce(loss, reduction, where=mask, xp=xp)


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
    xp=np,
):
    r"""Integer-label softmax CE with every jbce option, written from the spec.

    Per example n over the included classes C_n (where-mask true and logit > -inf),
    with class weights w (1 without them), K_n = |C_n|, W_n = sum_{c in C_n} w_c:

    .. math::
       \ell_n = (1-\epsilon) w_{y_n} (\mathrm{lse}_n - x_{n y_n})
              + \frac{\epsilon}{K_n} \sum_{c \in C_n} w_c (\mathrm{lse}_n - x_{nc})
              + z\, \mathrm{lse}_n^2

    after ``x -> c tanh(x / c)`` for ``logit_softcap=c``. ``weights`` multiply
    ``\ell_n``. Examples with ``label == ignore_index`` or ``where`` False (per example),
    or with no included class (per-logit ``where``), are 0 and leave the mean. The mean
    divides by the summed class weight of the remaining targets (their count without
    class weights), as torch's ``cross_entropy(weight=..., reduction='mean')``. A label
    outside [0, K) that is not ``ignore_index`` gives NaN for that example.
    """
    x = move_classes_last(xp.asarray(logits, dtype=xp.float64), axis, xp)
    lab = xp.asarray(labels)
    if logit_softcap is not None:
        x = logit_softcap * xp.tanh(x / logit_softcap)
    k = x.shape[-1]
    ex_mask, cls_mask = _split_where(where, np.shape(logits), axis, xp)
    include = x > -np.inf if cls_mask is None else cls_mask & (x > -np.inf)
    cw = (
        xp.ones((k,), xp.float64)
        if class_weights is None
        else xp.asarray(class_weights, dtype=xp.float64)
    )
    ignored = lab == ignore_index
    valid = (lab >= 0) & (lab < k)
    safe = xp.where(valid, lab, xp.zeros_like(lab))
    lse = _logsumexp_masked(x, include, xp)
    xt = xp.take_along_axis(x, safe[..., None], axis=-1)[..., 0]
    w_t = cw[safe]
    nll = w_t * (lse - xt)
    k_eff = xp.sum(include, axis=-1, dtype=xp.float64)
    cwb = xp.broadcast_to(cw, x.shape)
    # sum_c w_c (lse - x_c) over included classes, written without inf - inf
    zero = xp.zeros_like(x)
    diff = xp.where(include, lse[..., None] - xp.where(include, x, zero), zero)
    smooth = xp.sum(xp.where(include, cwb * diff, xp.zeros_like(x)), axis=-1)
    smooth = smooth / xp.where(k_eff == 0, 1.0, k_eff)
    loss = (1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse**2
    loss = xp.where(valid | ignored, loss, xp.full_like(loss, np.nan))
    if weights is not None:
        loss = loss * xp.broadcast_to(xp.asarray(weights, dtype=xp.float64), loss.shape)
    keep = ~ignored
    if ex_mask is not None:
        keep = keep & ex_mask
    if cls_mask is not None:
        keep = keep & xp.any(cls_mask, axis=-1)
    loss = xp.where(keep, loss, xp.zeros_like(loss))
    den = xp.sum(xp.where(keep, w_t, xp.zeros_like(w_t)))
    return reduce(loss, reduction, den=den, xp=xp)


# --------------------------------------------------------------------------------------
# Information quantities
# --------------------------------------------------------------------------------------


def ref_entropy(probs, *, axis=-1, xp=np):
    r"""H(p) = -\sum_c p_c log p_c over ``axis`` (int or tuple), with 0 log 0 = 0."""
    p = xp.asarray(probs, dtype=xp.float64)
    with np.errstate(divide="ignore"):
        return -xp.sum(xlogy(p, xp.log(p), xp), axis=canonical_axes(axis, p.ndim))


def ref_log_softmax(logits, *, axis=-1, xp=np):
    x = xp.asarray(logits, dtype=xp.float64)
    axes = canonical_axes(axis, x.ndim)
    m = xp.max(x, axis=axes, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    return x - (xp.log(xp.sum(xp.exp(x - m), axis=axes, keepdims=True)) + m)


def ref_kl_divergence(labels, logits, *, axis=-1, xp=np):
    r"""KL(y || softmax(x)) = \sum_c y_c (log y_c - log softmax(x)_c), with 0 log 0 = 0."""
    y = xp.asarray(labels, dtype=xp.float64)
    logq = ref_log_softmax(logits, axis=axis, xp=xp)
    with np.errstate(divide="ignore"):
        terms = xlogy(y, xp.log(y), xp) - xlogy(y, logq, xp)
    return xp.sum(terms, axis=canonical_axes(axis, y.ndim))


# --------------------------------------------------------------------------------------
# PyTorch oracles (float64). Call ``pytest.importorskip("torch")`` before using them.
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


def move_classes_back(flat, shape, axis, xp=np):
    """Inverse of :func:`move_classes_last`: (..., K) back to ``shape`` with classes at ``axis``."""
    nd = len(shape)
    axes = canonical_axes(axis, nd)
    batch = tuple(i for i in range(nd) if i not in axes)
    perm = batch + axes
    x = xp.reshape(flat, tuple(shape[i] for i in perm))
    return xp.transpose(x, tuple(int(i) for i in np.argsort(perm)))


# --------------------------------------------------------------------------------------
# Contrastive losses: the dense [B, B] similarity matrix (jbce.clip_loss, jbce.siglip_loss)
# --------------------------------------------------------------------------------------


def _similarity(x, y, scale, ids, xp):
    """(logits scale x y^T, true pairs [B, B]) in float64; ``ids`` None: the diagonal."""
    x = xp.asarray(x, dtype=xp.float64)
    y = xp.asarray(y, dtype=xp.float64)
    logits = xp.asarray(scale, dtype=xp.float64) * (x @ y.T)
    ids = np.arange(x.shape[0]) if ids is None else np.asarray(ids)
    return logits, ids[:, None] == ids[None, :]


def ref_clip_loss(x, y, *, scale, ids=None, reduction="mean", xp=np):
    """Radford et al. (2021): the mean of (CE(L_i., q_i.) + CE(L_.i, q_.i)) / 2, L = s x y^T,
    targets q uniform over each pair's positives (equal ids)."""
    logits, pos = _similarity(x, y, scale, ids, xp)
    q = pos / pos.sum(axis=1, keepdims=True)
    rows = ref_softmax_cross_entropy(logits, q, reduction="none", xp=xp)
    cols = ref_softmax_cross_entropy(logits.T, q.T, reduction="none", xp=xp)
    return reduce((rows + cols) / 2, reduction, xp=xp)


def ref_siglip_loss(x, y, *, scale, bias, ids=None, reduction="mean", xp=np):
    """Zhai et al. (2023): -(1/B) sum_ij log sigmoid(z_ij (s x_i.y_j + b)), z = +1 on true
    pairs and -1 elsewhere; ``"none"``: the row sums."""
    logits, pos = _similarity(x, y, scale, ids, xp)
    logits = logits + xp.asarray(bias, dtype=xp.float64)
    bce = ref_sigmoid_binary_cross_entropy(logits, pos.astype(np.float64), reduction="none", xp=xp)
    return reduce(xp.sum(bce, axis=1), reduction, xp=xp)
