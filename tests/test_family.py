"""The rest of the cross-entropy family against float64 references and their peers.

``nll_loss`` (torch ``F.nll_loss``), ``categorical_cross_entropy`` (a float64 reference and the
Keras ``CategoricalCrossentropy(from_logits=False)`` formula), ``softmax_focal_loss`` and its
integer-label form (the Keras 3 ``CategoricalFocalCrossentropy(from_logits=True)`` formula),
``poly_loss_cross_entropy`` (optax), ``kl_divergence`` (optax, torch ``F.kl_div``) and
``jensen_shannon_divergence`` (a float64 GKD/TRL-formula reference). Each: every reduction,
``weights``/``where``, the gradients of the options against the float64 reference, lean
residuals, no conditional in the compiled program, bf16 computed in float32, hyperparameters
as Python numbers (range-checked) or traced arrays.

The value, gradient and Hessian w.r.t. the logits (and soft labels) on random and edge inputs
(-inf classes, masked classes, NaN rows, no rows) against the float64 references are the
conformance matrix's (tests/matrix.py, one row per loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jbce
from tests import reference as ref

pytestmark = pytest.mark.jax_strict

N, K = 5, 4
RNG = np.random.default_rng(12)
X = RNG.normal(size=(N, K)) * 2  # logits
T = RNG.normal(size=(N, K)) * 2  # teacher logits
Y = RNG.dirichlet(np.ones(K), size=N)  # soft labels
Y[0] = [0.0, 1.0, 0.0, 0.0]
LAB = np.array([1, 0, 3, 2, 1])
W = RNG.uniform(0.5, 2.0, size=N)  # per-example weights
CW = np.array([1.0, 2.0, 0.5, 3.0])  # class weights
ROWS = np.array([True, False, True, True, True])  # per-example where
REDUCTIONS = ["none", "sum", "mean"]


def j(a):
    return jnp.asarray(a)


def jitted(fn):
    """``fn`` compiled as one program when called: op by op, each primitive would compile
    on its own (measured: a loss and its reference's gradients, 4.5 s of CPU eagerly, 0.9 s
    jitted)."""
    return lambda *args, **kwargs: jax.jit(lambda: fn(*args, **kwargs))()


# --- float64 references (numpy or jax.numpy via xp) --------------------------------------------
def log_softmax(x, mask=None, xp=np):
    x = xp.asarray(x, dtype=xp.float64)
    if mask is not None:
        x = xp.where(mask, x, -xp.inf)
    m = xp.max(x, axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)
    return x - m - xp.log(xp.sum(xp.exp(x - m), axis=-1, keepdims=True))


def grads_of(f, r, argnums, *args):
    """(the gradients of ``f``, those of the reference ``r``), compiled together."""
    return jax.jit(lambda *a: (jax.grad(f, argnums)(*a), jax.grad(r, argnums)(*a)))(*args)


def reduce(values, reduction, weights=None, where=None, den=None, xp=np):
    if weights is not None:
        values = values * weights
    return ref.reduce(values, reduction, where=where, den=den, xp=xp)


def keras_cce(p, y, label_smoothing=0.0):
    """Keras' CategoricalCrossentropy(from_logits=False) per example (float64)."""
    y = y * (1 - label_smoothing) + label_smoothing / y.shape[-1]
    p = p / np.sum(p, -1, keepdims=True)
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return -np.sum(y * np.log(p), -1)


def keras_focal(x, y, alpha=0.25, gamma=2.0):
    """Keras 3 CategoricalFocalCrossentropy(from_logits=True) per example (float64)."""
    p = np.exp(log_softmax(x))
    p = p / np.sum(p, -1, keepdims=True)
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.sum(-y * np.log(p) * (1 - p) ** gamma * alpha, -1)


# --- nll_loss ------------------------------------------------------------------------------------
def torch_nll(lp, t, *, weight=None, ignore_index=-100, reduction="mean"):
    """``F.nll_loss`` in float64: (loss, gradient of its sum w.r.t. ``lp``)."""
    import torch
    import torch.nn.functional as F

    tl = torch.tensor(np.asarray(lp, np.float64), requires_grad=True)
    out = F.nll_loss(
        tl,
        torch.as_tensor(np.asarray(t, np.int64)),
        weight=None if weight is None else torch.as_tensor(np.asarray(weight, np.float64)),
        ignore_index=ignore_index,
        reduction=reduction,
    )
    out.sum().backward()
    return out.detach().numpy(), tl.grad.numpy()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("class_weights", [None, CW], ids=["plain", "cw"])
def test_nll_loss_equals_torch_nll_loss(reduction, class_weights):
    lp = log_softmax(X)
    t = LAB.copy()
    t[1] = -100  # ignored
    want, want_g = torch_nll(lp, t, weight=class_weights, reduction=reduction)
    f = lambda a: jbce.nll_loss(
        a, j(t), class_weights=None if class_weights is None else j(class_weights),
        reduction=reduction,
    )  # fmt: skip
    got = f(j(lp))
    g = jitted(jax.grad(lambda a: jnp.sum(f(a))))(j(lp))
    ref.assert_close(got, want)
    ref.assert_close(g, want_g)


def test_nll_loss_class_axis_one_as_torch_dim_one():
    import torch
    import torch.nn.functional as F

    lp = np.moveaxis(log_softmax(RNG.normal(size=(2, 3, K))), -1, 1)  # [N, C, H]
    t = RNG.integers(0, K, size=(2, 3))
    t[0, 1] = 7  # ignore_index=7
    want = F.nll_loss(
        torch.as_tensor(lp), torch.as_tensor(t), weight=torch.as_tensor(CW), ignore_index=7
    ).numpy()
    got = jitted(jbce.nll_loss)(j(lp), j(t), axis=1, class_weights=j(CW), ignore_index=7)
    ref.assert_close(got, want)


def test_nll_loss_weights_and_where_follow_the_shared_semantics():
    lp = log_softmax(X)
    per = -lp[np.arange(N), LAB] * CW[LAB]
    got = jitted(jbce.nll_loss)(j(lp), j(LAB), class_weights=j(CW), weights=j(W), where=j(ROWS))
    want = np.sum((per * W)[ROWS]) / np.sum(CW[LAB][ROWS])
    ref.assert_close(got, want)


def test_nll_loss_gives_nan_for_a_bad_label_and_checkify_reports_it():
    # NaN read only at the label: the matrix's nll_loss-materialised-*-float32-nan-plain
    lp = log_softmax(X)
    bad = np.asarray(jitted(jbce.nll_loss)(j(lp), j([0, 1, 2, 3, K]), reduction="none"))
    assert np.isnan(bad[-1]) and np.all(np.isfinite(bad[:-1]))
    err, _ = checkify.checkify(jax.jit(lambda a: jbce.nll_loss(a, j([0, 1, 2, 3, K]))))(j(lp))
    assert err.get() is not None


def test_nll_of_log_softmax_is_the_integer_label_cross_entropy():
    x = j(X)
    ce = jitted(jbce.softmax_cross_entropy_with_integer_labels)(x, j(LAB), class_weights=j(CW))
    ref.assert_close(jitted(jbce.nll_loss)(jax.nn.log_softmax(x), j(LAB), class_weights=j(CW)), ce)


# --- categorical_cross_entropy ------------------------------------------------------------------
P = np.exp(log_softmax(X))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("e", [0.0, 0.1])
def test_categorical_cross_entropy_matches_reference_and_keras_on_normalised_rows(reduction, e):
    got = jitted(jbce.categorical_cross_entropy)(
        j(P), j(Y), label_smoothing=e, weights=j(W), where=j(ROWS), reduction=reduction
    )
    ref.assert_close(
        got,
        reduce(
            ref.ref_categorical_cross_entropy(P, Y, label_smoothing=e, reduction="none"),
            reduction,
            W,
            ROWS,
        ),
    )
    # rows that sum to 1 with every p in [1e-7, 1 - 1e-7]: Keras' formula gives the same
    keras = keras_cce(P, Y, e)
    ref.assert_close(jitted(jbce.categorical_cross_entropy)(j(P), j(Y), label_smoothing=e,
                                                            reduction="none"), keras)  # fmt: skip


def test_categorical_cross_entropy_does_not_renormalise_as_keras_does():
    p = np.array([[0.2, 0.2, 0.2]])  # sums to 0.6
    y = np.array([[1.0, 0.0, 0.0]])
    got = float(jitted(jbce.categorical_cross_entropy)(j(p), j(y)))
    ref.assert_close(got, -np.log(0.2))
    assert abs(got - keras_cce(p, y)[0]) > 0.5  # Keras: -log(1/3)


def test_categorical_cross_entropy_is_finite_at_zero_probability():
    p = j([[0.0, 1.0], [1.0, 0.0]])
    y = j([[1.0, 0.0], [1.0, 0.0]])
    loss, g = jitted(
        jax.value_and_grad(lambda a: jbce.categorical_cross_entropy(a, y, reduction="sum"))
    )(p)
    ref.assert_close(loss, 100.0)
    assert np.all(np.isfinite(np.asarray(g))) and float(g[0, 0]) == -1e12
    assert float(g[0, 1]) == 0.0  # y = 0: no gradient, even at p = 1


def test_categorical_cross_entropy_class_mask_drops_terms_and_counts_k():
    mask = np.ones((N, K), bool)
    mask[:, 0] = False
    p = P.copy()
    p[2, 0] = np.nan  # masked: does not reach the loss
    got = jitted(jbce.categorical_cross_entropy)(j(p), j(Y), where=j(mask), label_smoothing=0.2,
                                                 reduction="none")  # fmt: skip
    ref.assert_close(
        got,
        ref.ref_categorical_cross_entropy(
            np.where(mask, p, 1.0), Y, label_smoothing=0.2, where=mask, reduction="none"
        ),
    )


def test_categorical_cross_entropy_reports_probabilities_outside_unit_interval():
    f = checkify.checkify(jax.jit(lambda a: jbce.categorical_cross_entropy(a, j(Y))))
    assert f(j(P * 2))[0].get() is not None
    assert f(j(P))[0].get() is None
    assert np.isnan(
        float(jitted(jbce.categorical_cross_entropy)(j(np.full((1, K), np.nan)), j(Y[:1])))
    )


# --- softmax focal ------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,gamma", [(None, 0.0), (0.25, 2.0), ("vector", 0.5)])
def test_softmax_focal_loss_matches_reference_and_keras(alpha, gamma):
    al = RNG.uniform(0.1, 1.0, size=K) if alpha == "vector" else alpha
    got = jitted(jbce.softmax_focal_loss)(
        j(X), j(Y), alpha=None if al is None else j(al), gamma=gamma, reduction="none"
    )
    ref.assert_close(got, ref.ref_softmax_focal_loss(X, Y, alpha=al, gamma=gamma, reduction="none"))
    # Keras clips p to [1e-7, 1 - 1e-7]: equal where no probability is that close to 0 or 1
    ref.assert_close(got, keras_focal(X, Y, 1.0 if al is None else al, gamma), rtol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softmax_focal_loss_reductions_weights_where(reduction):
    got = jitted(jbce.softmax_focal_loss)(
        j(X), j(Y), weights=j(W), where=j(ROWS), reduction=reduction
    )
    ref.assert_close(
        got, reduce(ref.ref_softmax_focal_loss(X, Y, reduction="none"), reduction, W, ROWS)
    )


def test_softmax_focal_loss_logit_mask_takes_classes_out():
    mask = np.ones((N, K), bool)
    mask[:, 2] = False
    got = jitted(jbce.softmax_focal_loss)(j(X), j(Y), where=j(mask), reduction="none")
    ref.assert_close(got, ref.ref_softmax_focal_loss(X, Y, where=mask, reduction="none"))


def test_softmax_focal_gradients_in_alpha_and_gamma_match_reference():
    # (the logits' and labels' gradients and the logits' Hessian: the matrix's
    # softmax_focal_loss-materialised-{grad,hessian}-float32-random-gamma0.5)
    al = j(RNG.uniform(0.1, 1.0, size=K))
    f = lambda x, y, a, g: jbce.softmax_focal_loss(x, y, alpha=a, gamma=g, reduction="sum")
    r = lambda x, y, a, g: jnp.sum(
        ref.ref_softmax_focal_loss(x, y, alpha=a, gamma=g, reduction="none", xp=jnp)
    )
    args = (j(X), j(Y), al, j(1.5))
    grads, wants = grads_of(f, r, (0, 1, 2, 3), *args)
    for got, want in zip(grads, wants, strict=True):
        ref.assert_close(got, want, rtol=1e-10)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.99])
def test_softmax_focal_gradient_is_finite_for_small_gamma_at_extreme_logits(gamma):
    x = j([[1e4, 0.0, -1e4], [0.0, -jnp.inf, 30.0], [40.0, 0.0, 0.0]])
    soft = lambda a: jbce.softmax_focal_loss(a, j(np.eye(3)[[0, 2, 0]]), gamma=gamma)
    hard = lambda a: jbce.softmax_focal_loss_with_integer_labels(a, j([0, 2, 0]), gamma=gamma)
    both, g32 = jax.jit(  # one compiled program
        lambda a, a32: ([jax.value_and_grad(f)(a) for f in (soft, hard)], jax.grad(soft)(a32))
    )(x, x.astype(jnp.float32))
    for loss, g in both:
        assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(g))), (loss, g)
    assert g32.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(g32)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_integer_label_focal_is_the_one_hot_focal_with_class_weights_denominator(reduction):
    lab = LAB.copy()
    lab[3] = -100
    al = RNG.uniform(0.1, 1.0, size=K)
    got = jitted(jbce.softmax_focal_loss_with_integer_labels)(
        j(X), j(lab), alpha=j(al), gamma=1.5, class_weights=j(CW), weights=j(W), where=j(ROWS),
        reduction=reduction,
    )  # fmt: skip
    keep = ROWS & (lab != -100)
    safe = np.clip(lab, 0, K - 1)
    per = (
        ref.ref_softmax_focal_loss(X, np.eye(K)[safe], alpha=al, gamma=1.5, reduction="none")
        * CW[safe]
    )
    ref.assert_close(got, reduce(per, reduction, W, keep, den=np.sum(CW[safe][keep])))


def test_integer_label_focal_gradients_match_reference():
    # (second order in the logits: the matrix's
    # softmax_focal_loss_with_integer_labels-materialised-hessian-float32-*-gamma0.5)
    al = j(RNG.uniform(0.1, 1.0, size=K))
    oh = j(np.eye(K)[LAB])
    f = lambda x, a, g, c: jbce.softmax_focal_loss_with_integer_labels(
        x, j(LAB), alpha=a, gamma=g, class_weights=c, reduction="sum"
    )
    r = lambda x, a, g, c: jnp.sum(
        ref.ref_softmax_focal_loss(x, oh, alpha=a, gamma=g, reduction="none", xp=jnp) * c[j(LAB)]
    )
    args = (j(X), al, j(0.7), j(CW))
    grads, wants = grads_of(f, r, (0, 1, 2, 3), *args)
    for got, want in zip(grads, wants, strict=True):
        ref.assert_close(got, want, rtol=1e-10)


# --- poly loss ----------------------------------------------------------------------------------
@pytest.mark.parametrize("epsilon", [2.0, -1.0])
@pytest.mark.parametrize("masked", [False, True])
def test_poly_loss_equals_optax(epsilon, masked):
    import optax

    mask = None
    if masked:
        mask = np.ones((N, K), bool)
        mask[:, 1] = False
    where = None if mask is None else j(mask)
    want = jitted(optax.losses.poly_loss_cross_entropy)(j(X), j(Y), epsilon=epsilon, where=where)
    got = jitted(jbce.poly_loss_cross_entropy)(
        j(X), j(Y), epsilon=epsilon, where=where, reduction="none"
    )
    ref.assert_close(got, want, rtol=1e-11)
    f = lambda a: jnp.sum(jbce.poly_loss_cross_entropy(a, j(Y), epsilon=epsilon, reduction="none"))
    g = lambda a: jnp.sum(optax.losses.poly_loss_cross_entropy(a, j(Y), epsilon=epsilon))
    ref.assert_close(jitted(jax.grad(f))(j(X)), jitted(jax.grad(g))(j(X)), rtol=1e-11, atol=1e-15)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_poly_loss_reductions_weights_where(reduction):
    got = jitted(jbce.poly_loss_cross_entropy)(j(X), j(Y), weights=j(W), where=j(ROWS),
                                               reduction=reduction)  # fmt: skip
    ref.assert_close(
        got,
        reduce(
            ref.ref_poly_loss_cross_entropy(X, Y, epsilon=2.0, reduction="none"), reduction, W, ROWS
        ),
    )


def test_poly_loss_epsilon_gradient():
    f = lambda a, e: jbce.poly_loss_cross_entropy(a, j(Y), epsilon=e, reduction="sum")
    r = lambda a, e: jnp.sum(
        ref.ref_poly_loss_cross_entropy(a, j(Y), epsilon=e, reduction="none", xp=jnp)
    )
    for got, want in zip(*grads_of(f, r, (0, 1), j(X), j(0.5)), strict=True):
        ref.assert_close(got, want, rtol=1e-11)


# --- KL divergence --------------------------------------------------------------------------------
def test_kl_divergence_equals_optax_kl_divergence_on_log_predictions():
    import optax

    logq = j(log_softmax(X))
    want = jitted(optax.losses.kl_divergence)(logq, j(Y))
    ref.assert_close(jitted(jbce.kl_divergence)(logq, j(Y), reduction="none"), want, rtol=1e-11)
    ref.assert_close(
        jitted(jbce.kl_divergence)(j(X), j(Y), reduction="none"),
        ref.ref_kl_divergence(X, Y, reduction="none"),
        rtol=1e-11,
    )


def test_kl_divergence_with_log_labels_equals_optax_and_torch():
    import optax
    import torch
    import torch.nn.functional as F

    logq, logy = log_softmax(X), log_softmax(T)
    want = jitted(optax.losses.kl_divergence_with_log_targets)(j(logq), j(logy))
    got = jitted(jbce.kl_divergence)(j(logq), j(logy), log_labels=True, reduction="none")
    ref.assert_close(got, want, rtol=1e-11)
    tq = torch.tensor(logq, requires_grad=True)
    ty = torch.tensor(logy, requires_grad=True)
    out = F.kl_div(tq, ty, reduction="batchmean", log_target=True)
    out.backward()
    f = lambda a, b: jbce.kl_divergence(a, b, log_labels=True, reduction="batchmean")
    ref.assert_close(f(j(logq), j(logy)), out.detach().numpy(), rtol=1e-11)
    ga, gb = jitted(jax.grad(f, (0, 1)))(j(logq), j(logy))
    # torch's gradient w.r.t. the input treats it as free log-probabilities; through our
    # softmax it is that gradient projected: equal up to a per-row constant times q.
    ref.assert_close(gb, ty.grad.numpy(), rtol=1e-10, atol=1e-15)
    q = np.exp(logq)
    proj = tq.grad.numpy() - q * np.sum(tq.grad.numpy(), -1, keepdims=True)
    ref.assert_close(ga, proj, rtol=1e-10, atol=1e-15)


def test_kl_divergence_minus_inf_log_labels_contribute_nothing():
    logy = np.array([[np.log(0.5), np.log(0.5), -np.inf]])
    got, g = jitted(
        jax.value_and_grad(
            lambda b: jbce.kl_divergence(j([[0.0, 1.0, -jnp.inf]]), b, log_labels=True)
        )
    )(j(logy))
    ref.assert_close(
        got,
        ref.ref_kl_divergence(np.array([[0.0, 1.0, -np.inf]]), np.exp(logy), reduction="none")[0],
    )
    assert np.all(np.isfinite(np.asarray(g))) and float(g[0, 2]) == 0.0


def test_kl_batchmean_is_pytorchs_for_a_class_axis_in_the_middle():
    import torch
    import torch.nn.functional as F

    x = RNG.normal(size=(2, K, 3))
    y = np.moveaxis(RNG.dirichlet(np.ones(K), size=(2, 3)), -1, 1)
    want = F.kl_div(
        F.log_softmax(torch.as_tensor(x), 1), torch.as_tensor(y), reduction="batchmean"
    ).numpy()
    ref.assert_close(jitted(jbce.kl_divergence)(j(x), j(y), axis=1, reduction="batchmean"), want)
    ref.assert_close(
        jitted(jbce.kl_divergence)(j(x), j(y), axis=1, reduction="mean"), want / 3, rtol=1e-12
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kl_reductions_weights_where(reduction):
    got = jitted(jbce.kl_divergence)(j(X), j(Y), weights=j(W), where=j(ROWS), reduction=reduction)
    ref.assert_close(
        got, reduce(ref.ref_kl_divergence(X, Y, reduction="none"), reduction, W, ROWS), atol=1e-15
    )


def test_kl_gradients_match_reference():
    # (the logits' Hessian: the matrix's kl_divergence-materialised-hessian-float32-*-plain)
    f = lambda x, y: jbce.kl_divergence(x, y, reduction="sum")
    r = lambda x, y: jnp.sum(ref.ref_kl_divergence(x, y, reduction="none", xp=jnp))
    y = j(0.5 * Y + 0.5 / K)
    grads, wants = grads_of(f, r, (0, 1), j(X), y)
    for got, want in zip(grads, wants, strict=True):
        ref.assert_close(got, want, rtol=1e-11, atol=1e-15)


# --- Jensen-Shannon -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "beta,temperature", [(0.0, 1.0), (0.1, 2.5), (0.5, 1.0), (0.9, 1.0), (1.0, 2.5)]
)
def test_jsd_matches_the_gkd_formula_with_kl_limits(beta, temperature):
    got = jitted(jbce.jensen_shannon_divergence)(j(X), j(T), beta=beta, temperature=temperature,
                                                 reduction="none")  # fmt: skip
    ref.assert_close(
        got,
        ref.ref_jensen_shannon_divergence(
            X, T, beta=beta, temperature=temperature, reduction="none"
        ),
        rtol=1e-11,
        atol=1e-15,
    )
    traced = _traced_jsd(j(X), j(T), j(beta), j(temperature))
    ref.assert_close(traced, got, rtol=1e-12, atol=1e-15)


@jax.jit
def _traced_jsd(x, t, beta, temperature):  # one compile for every (beta, temperature)
    return jbce.jensen_shannon_divergence(
        x, t, beta=beta, temperature=temperature, reduction="none"
    )


def test_jsd_limits_are_the_two_kl_directions():
    fwd = jitted(jbce.jensen_shannon_divergence)(j(X), j(T), beta=0.0, reduction="none")
    rev = jitted(jbce.jensen_shannon_divergence)(j(X), j(T), beta=1.0, reduction="none")
    p, q = np.exp(log_softmax(T)), np.exp(log_softmax(X))
    ref.assert_close(fwd, jitted(jbce.kl_divergence)(j(X), j(p), reduction="none"), rtol=1e-11)
    ref.assert_close(rev, jitted(jbce.kl_divergence)(j(T), j(q), reduction="none"), rtol=1e-11)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_gradients_match_reference(beta):
    # (the logits' Hessian: the matrix's
    # jensen_shannon_divergence-materialised-hessian-float32-*-beta0.5)
    f = lambda x, t, tt: jbce.jensen_shannon_divergence(
        x, t, beta=beta, temperature=tt, reduction="sum"
    )
    r = lambda x, t, tt: jnp.sum(
        ref.ref_jensen_shannon_divergence(x, t, beta=beta, temperature=tt, reduction="none", xp=jnp)
    )
    args = (j(X), j(T), j(1.7))
    grads, wants = grads_of(f, r, (0, 1, 2), *args)
    for got, want in zip(grads, wants, strict=True):
        ref.assert_close(got, want, rtol=1e-10, atol=1e-15)


def test_jsd_beta_gradient_when_traced():
    f = lambda b: jbce.jensen_shannon_divergence(j(X), j(T), beta=b, reduction="sum")
    r = lambda b: jnp.sum(
        ref.ref_jensen_shannon_divergence(j(X), j(T), beta=b, reduction="none", xp=jnp)
    )
    g = jax.jit(jax.grad(f))
    ref.assert_close(g(j(0.3)), jax.jit(jax.grad(r))(j(0.3)), rtol=1e-10)
    assert float(g(j(0.0))) == 0.0


def test_jsd_of_disjoint_supports_is_log_2():
    # (-inf classes in the student, the teacher or both, value and gradients: the matrix's
    # jensen_shannon_divergence-materialised-*-float32-neg_inf_classes-beta*)
    half = jitted(jbce.jensen_shannon_divergence)(j([[0.0, -jnp.inf]]), j([[-jnp.inf, 0.0]]))
    ref.assert_close(half, np.log(2.0))


def test_jsd_of_nearly_equal_distributions_is_accurate_in_float32():
    t = np.array([[0.3, -1.2, 2.0, 0.1]], np.float32)
    x = t + np.float32(1e-3) * np.array([[1.0, -1.0, 0.5, 0.0]], np.float32)
    got = float(jitted(jbce.jensen_shannon_divergence)(j(x), j(t)))
    want = float(
        ref.ref_jensen_shannon_divergence(
            x.astype(np.float64), t.astype(np.float64), reduction="none"
        )[0]
    )
    assert abs(got - want) < 1e-3 * want, (got, want)


@pytest.mark.parametrize("reduction", REDUCTIONS + ["batchmean"])
def test_jsd_reductions_weights_where(reduction):
    got = jitted(jbce.jensen_shannon_divergence)(j(X), j(T), weights=j(W), where=j(ROWS),
                                                 reduction=reduction)  # fmt: skip
    per = ref.ref_jensen_shannon_divergence(X, T, reduction="none")
    if reduction == "batchmean":
        want = np.sum((per * W)[ROWS]) / N
    else:
        want = reduce(per, reduction, W, ROWS)
    ref.assert_close(got, want, rtol=1e-11, atol=1e-15)


# --- shared contract: every new loss ------------------------------------------------------------
def _soft(name):
    return {
        "focal": lambda x, y, **kw: jbce.softmax_focal_loss(x, y, **kw),
        "poly": lambda x, y, **kw: jbce.poly_loss_cross_entropy(x, y, **kw),
        "kl": lambda x, y, **kw: jbce.kl_divergence(x, y, **kw),
        "kl_log": lambda x, y, **kw: jbce.kl_divergence(x, jnp.log(y), log_labels=True, **kw),
        "jsd": lambda x, y, **kw: jbce.jensen_shannon_divergence(x, jnp.log(y) + 1.0, **kw),
        "cce": lambda x, y, **kw: jbce.categorical_cross_entropy(jax.nn.softmax(x), y, **kw),
    }[name]


CASES = {
    "nll_loss": lambda x, y: jbce.nll_loss(x, y),
    "categorical_cross_entropy": lambda x, y: jbce.categorical_cross_entropy(x, y),
    "softmax_focal_loss": lambda x, y: jbce.softmax_focal_loss(x, y, gamma=0.5),
    "softmax_focal_loss_with_integer_labels": lambda x, y: (
        jbce.softmax_focal_loss_with_integer_labels(
            x, y, gamma=0.5, class_weights=jnp.linspace(0.5, 2.0, x.shape[-1], dtype=jnp.float32)
        )
    ),
    "poly_loss_cross_entropy": lambda x, y: jbce.poly_loss_cross_entropy(x, y),
    "kl_divergence": lambda x, y: jbce.kl_divergence(x, y),
    "kl_divergence_log_labels": lambda x, y: jbce.kl_divergence(x, y, log_labels=True),
    "jensen_shannon_divergence": lambda x, y: jbce.jensen_shannon_divergence(x, y),
}


def _case_inputs(name, n, k, dtype=jnp.float32):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(n, k)), dtype)
    if name.endswith("integer_labels") or name == "nll_loss":
        return x, jnp.asarray(np.arange(n) % k, jnp.int32)
    if name == "categorical_cross_entropy":
        return jax.nn.softmax(x.astype(jnp.float32)).astype(dtype), jnp.full((n, k), 1 / k, dtype)
    if name in ("kl_divergence_log_labels", "jensen_shannon_divergence"):
        return x, jnp.asarray(np.random.default_rng(2).normal(size=(n, k)), dtype)
    return x, jnp.full((n, k), 1 / k, dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_residuals_are_the_inputs_and_per_row_values(name):
    n, k = 8, 16
    x, y = _case_inputs(name, n, k)
    float_y = jnp.issubdtype(y.dtype, jnp.floating)
    f = lambda a, b: CASES[name](a, b)
    res = ref.saved_residuals(f, x, y) if float_y else ref.saved_residuals(lambda a: f(a, y), x)
    big = [r for r in res if np.prod(r[0].shape) >= n * k]
    assert len(big) <= (2 if float_y else 1), res
    assert all("argument" in r[1] for r in big), res
    small = [r for r in res if np.prod(r[0].shape) < n * k]
    assert all(np.prod(r[0].shape) <= max(n, k) for r in small), res


@pytest.mark.parametrize("name", list(CASES))
def test_no_conditional_in_the_program_forward_or_backward(name):
    x, y = _case_inputs(name, 4, 8)
    f = lambda a: CASES[name](a, y)
    vag = jax.value_and_grad(f)
    # (a jaxpr may hold a platform_dependent cond, resolved when lowering: check the program)
    hlo = jax.jit(vag).lower(x).compile().as_text()
    assert " conditional(" not in hlo and " while(" not in hlo


@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16_is_computed_in_float32(name):
    x, y = _case_inputs(name, 4, 8, jnp.bfloat16)
    x64 = jnp.asarray(np.asarray(x, np.float64))
    y64 = y if not jnp.issubdtype(y.dtype, jnp.floating) else jnp.asarray(np.asarray(y, np.float64))
    (loss, g), want = jax.jit(  # bf16 and its float64 result in one compiled program
        lambda x, y, x64, y64: (jax.value_and_grad(CASES[name])(x, y), CASES[name](x64, y64))
    )(x, y, x64, y64)
    assert loss.dtype == jnp.float32 and g.dtype == jnp.bfloat16
    ref.assert_close(loss, want, rtol=2e-6)


# The other losses' NaN rows: the matrix's <loss>-materialised-*-float32-nan-<setting>.
@pytest.mark.parametrize("name", ["kl_divergence_log_labels"])
def test_nan_in_gives_nan_out(name):
    x, y = _case_inputs(name, 3, 4)
    x = x.at[1, :].set(jnp.nan)
    out = np.asarray(jax.jit(jax.vmap(lambda a, b: CASES[name](a[None], b[None])))(x, y))
    assert np.isnan(out[1]) and np.all(np.isfinite(out[[0, 2]])), out


HYPER = [
    ("gamma", lambda v: jbce.softmax_focal_loss(j(X), j(Y), gamma=v), -0.5, 1.5),
    ("alpha", lambda v: jbce.softmax_focal_loss(j(X), j(Y), alpha=v), -0.1, 0.25),
    (
        "gamma",
        lambda v: jbce.softmax_focal_loss_with_integer_labels(j(X), j(LAB), gamma=v),
        -1.0,
        0.5,
    ),  # fmt: skip
    ("epsilon", lambda v: jbce.poly_loss_cross_entropy(j(X), j(Y), epsilon=v), -2.0, 1.0),
    ("beta", lambda v: jbce.jensen_shannon_divergence(j(X), j(T), beta=v), 1.5, 0.3),
    (
        "temperature",
        lambda v: jbce.jensen_shannon_divergence(j(X), j(T), temperature=v),
        0.0,
        2.0,
    ),  # fmt: skip
    (
        "label_smoothing",
        lambda v: jbce.categorical_cross_entropy(j(P), j(Y), label_smoothing=v),
        1.5,
        0.2,
    ),  # fmt: skip
]


@pytest.mark.parametrize("name,f,bad,good", HYPER, ids=[h[0] for h in HYPER])
def test_hyperparameters_are_checked_numbers_or_traced_arrays(name, f, bad, good):
    with pytest.raises(ValueError, match=name):
        f(bad)
    traced, number = jax.jit(lambda v: (f(v), f(good)))(j(good))  # one compiled program
    ref.assert_close(traced, number, rtol=1e-12)
    err, _ = checkify.checkify(jax.jit(f))(j(bad))
    assert err.get() is not None and name in err.get()


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="labels must have shape"):
        jbce.nll_loss(j(X), j(LAB[:3]))
    with pytest.raises(ValueError, match="alpha must have shape"):
        jbce.softmax_focal_loss(j(X), j(Y), alpha=j([0.1, 0.2]))
    with pytest.raises(ValueError, match="teacher_logits must have shape"):
        jbce.jensen_shannon_divergence(j(X), j(T[:, :2]))
    with pytest.raises(ValueError, match="reduction"):
        jbce.kl_divergence(j(X), j(Y), reduction="batchsum")
    with pytest.raises(TypeError, match="teacher_logits must be a floating-point"):
        jbce.jensen_shannon_divergence(j(X), j(LAB[:, None] * np.ones((1, K), int)))
