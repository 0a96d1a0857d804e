"""sigmoid_focal_loss against a float64 reference, optax, and closed-form gradients at
extreme logits for every gamma >= 0."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.test_util import check_grads

import jbce
from tests import reference as ref

pytestmark = pytest.mark.jax_strict

REDUCTIONS = ("none", "sum", "mean")
GAMMAS = (0.0, 0.5, 1.0, 2.0)
focal = jbce.sigmoid_focal_loss


def jitted(fn):
    """``fn`` compiled as one program when called: op by op, each primitive would compile
    on its own (a loss and its reference's gradients: 4.5 s of CPU eagerly, 0.9 s jitted)."""
    return lambda *args, **kwargs: jax.jit(lambda: fn(*args, **kwargs))()


def _data(shape=(4, 6), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 3
    y = rng.uniform(size=shape)
    y.reshape(-1)[::3] = np.round(y.reshape(-1)[::3])  # mix hard and soft labels
    w = rng.uniform(0.2, 2.0, size=shape)
    where = rng.uniform(size=shape) < 0.7
    return x, y, w, where


@pytest.mark.parametrize("extras", ["plain", "weights_where"])
def test_focal_matches_float64_reference(extras):
    # every gamma, alpha and reduction in one compiled function
    x, y, w, where = _data()
    kw = {"weights": w, "where": where} if extras == "weights_where" else {}
    cases = [(g, a, r) for g in GAMMAS for a in (None, 0.25) for r in REDUCTIONS]
    gots = jax.jit(
        lambda a, b, k: [focal(a, b, alpha=al, gamma=g, reduction=r, **k) for g, al, r in cases]
    )(jnp.asarray(x), jnp.asarray(y), {k: jnp.asarray(v) for k, v in kw.items()})
    for (gamma, alpha, reduction), got in zip(cases, gots, strict=True):
        want = ref.ref_sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma, reduction=reduction, **kw)
        assert got.dtype == jnp.float64
        ref.assert_close(got, want, atol=1e-300)


def test_default_gamma_is_two_and_reduction_mean():
    x, y, *_ = _data()
    ref.assert_close(
        jitted(focal)(jnp.asarray(x), jnp.asarray(y)), ref.ref_sigmoid_focal_loss(x, y, gamma=2.0)
    )


def test_gamma_zero_without_alpha_is_sigmoid_bce():
    x, y, *_ = _data(seed=1)
    a = jitted(focal)(jnp.asarray(x), jnp.asarray(y), gamma=0.0, reduction="none")
    b = jitted(jbce.sigmoid_binary_cross_entropy)(jnp.asarray(x), jnp.asarray(y), reduction="none")
    ref.assert_close(a, np.asarray(b))


@pytest.mark.parametrize("alpha", [None, 0.25])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_none_reduction_is_a_drop_in_for_optax(gamma, alpha):
    import optax

    x, y, *_ = _data(seed=2)
    got = jitted(focal)(jnp.asarray(x), jnp.asarray(y), alpha=alpha, gamma=gamma, reduction="none")
    want = jitted(optax.sigmoid_focal_loss)(
        jnp.asarray(x), jnp.asarray(y), alpha=alpha, gamma=gamma
    )
    ref.assert_close(got, np.asarray(want), rtol=1e-11, atol=1e-300)


EXTREME = np.array([-1e30, -1e4, -100.0, -30.0, -1.0, 0.0, 1.0, 30.0, 100.0, 1e4, 1e30])


def _closed_form_grad(x, y, gamma):
    """d/dx of the focal loss for hard labels, in float64 without cancellation."""
    s_pos, s_neg = ref.sigmoid(x), ref.sigmoid(-x)
    with np.errstate(divide="ignore", invalid="ignore"):
        # y = 1: l = s(-x)^g softplus(-x);  y = 0: l = s(x)^g softplus(x)
        g1 = -(s_neg**gamma) * (gamma * s_pos * ref.softplus(-x) + s_neg)
        g0 = s_pos**gamma * (gamma * s_neg * ref.softplus(x) + s_pos)
    return np.where(y == 1, g1, g0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_focal_gradient_is_finite_and_exact_at_extreme_logits(dtype):
    x = np.concatenate([EXTREME, EXTREME]).astype(dtype)
    y = np.concatenate([np.ones_like(EXTREME), np.zeros_like(EXTREME)]).astype(dtype)
    results = jax.jit(  # every gamma in one compiled program
        lambda a: [
            jax.value_and_grad(lambda a, g=g: focal(a, jnp.asarray(y), gamma=g, reduction="sum"))(a)
            for g in GAMMAS
        ]
    )(jnp.asarray(x))
    for gamma, (val, g) in zip(GAMMAS, results, strict=True):
        assert np.isfinite(float(val)), gamma
        g = np.asarray(g)
        assert g.dtype == dtype and np.all(np.isfinite(g)), (gamma, g)
        want = _closed_form_grad(x.astype(np.float64), y.astype(np.float64), gamma)
        tol = 1e-12 if dtype == np.float64 else 2e-6
        ref.assert_close(g, want, rtol=tol, atol=float(np.finfo(dtype).tiny))


def test_focal_gradient_is_finite_for_soft_labels_and_infinite_logits():
    x = jnp.asarray([np.inf, -np.inf, 1e30, -1e30, np.inf, -np.inf])
    y = jnp.asarray([0.3, 0.3, 0.7, 0.7, 1.0, 0.0])
    results = jax.jit(  # every gamma in one compiled program
        lambda a: [
            (
                jax.grad(lambda a, g=g: focal(a, y, gamma=g, reduction="sum"))(a),
                focal(a, y, gamma=g, reduction="none"),
            )
            for g in GAMMAS
        ]
    )(x)
    for gamma, (g, loss) in zip(GAMMAS, results, strict=True):
        assert np.all(np.isfinite(np.asarray(g))), (gamma, g)
        loss = np.asarray(loss)
        assert loss[4] == 0 and loss[5] == 0, gamma  # infinite logits agreeing with hard labels


def test_float32_extreme_logits_within_a_few_ulps_of_float64():
    x32 = np.concatenate([EXTREME, EXTREME]).astype(np.float32)
    y32 = np.concatenate([np.ones_like(EXTREME), np.zeros_like(EXTREME)]).astype(np.float32)
    gots = jax.jit(  # every gamma in one compiled program
        lambda a, b: [focal(a, b, gamma=g, alpha=0.25, reduction="none") for g in GAMMAS]
    )(jnp.asarray(x32), jnp.asarray(y32))
    for gamma, got in zip(GAMMAS, gots, strict=True):
        assert got.dtype == jnp.float32
        want = ref.ref_sigmoid_focal_loss(
            x32.astype(np.float64),
            y32.astype(np.float64),
            gamma=gamma,
            alpha=0.25,
            reduction="none",
        )
        ref.assert_close(
            got, want, rtol=8 * np.finfo(np.float32).eps, atol=float(np.finfo(np.float32).tiny)
        )


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_gradients_check_numerically_to_second_order(gamma):
    x, y, w, where = _data(shape=(3, 4), seed=3)
    yc = np.clip(y, 0.05, 0.95)

    def f(a, b, c):
        return focal(a, b, alpha=0.25, gamma=gamma, weights=c, where=jnp.asarray(where))

    check_grads(jax.jit(f), tuple(map(jnp.asarray, (x, yc, w))), order=2, modes=["rev"])


# The Hessian in the logits and labels and the labels' gradient against the float64
# reference: the matrix's sigmoid_focal_loss-materialised-{hessian,grad}-float32-*-gamma0.5.


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_computes_in_float32_and_returns_input_dtype_grads(dtype):
    x, y, *_ = _data(seed=5)
    xl, yl = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    val, g = jitted(jax.value_and_grad(lambda a: focal(a, yl)))(xl)
    assert val.dtype == jnp.float32 and g.dtype == dtype
    xf, yf = np.asarray(xl, np.float64), np.asarray(yl, np.float64)
    ref.assert_close(val, ref.ref_sigmoid_focal_loss(xf, yf), rtol=1e-6)
    gr = jitted(jax.grad(lambda a: ref.ref_sigmoid_focal_loss(a, jnp.asarray(yf), xp=jnp)))(
        jnp.asarray(xf)
    )
    ref.assert_close(g, np.asarray(gr), rtol=2e-2, atol=1e-4)


def test_mean_over_nothing_and_empty_input_are_zero():
    x, y, *_ = _data()
    val, g = jitted(
        jax.value_and_grad(lambda a: focal(a, jnp.asarray(y), where=jnp.zeros(x.shape, bool)))
    )(jnp.asarray(x))
    assert float(val) == 0.0 and np.all(np.asarray(g) == 0)
    assert float(jitted(focal)(jnp.zeros((0,)), jnp.zeros((0,)))) == 0.0


def test_checkify_reports_labels_outside_unit_interval():
    f = checkify.checkify(lambda a, b: focal(a, b))
    err, _ = f(jnp.zeros(2), jnp.asarray([0.5, 2.0]))
    assert err.get() is not None and "labels" in err.get()


def test_negative_gamma_is_refused():
    with pytest.raises(ValueError, match="gamma"):
        focal(jnp.zeros(2), jnp.zeros(2), gamma=-1.0)


def test_vmap_equals_per_row_calls():
    x, y, w, _ = _data(seed=6)
    got = jitted(jax.vmap(lambda a, b, c: focal(a, b, weights=c, gamma=0.5)))(
        *map(jnp.asarray, (x, y, w))
    )
    want = [ref.ref_sigmoid_focal_loss(x[i], y[i], weights=w[i], gamma=0.5) for i in range(4)]
    ref.assert_close(got, np.asarray(want))


class JitVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_focal_same_with_and_without_jit(self):
        x, y, w, where = _data(seed=7)
        f = self.variant(lambda a, b, c, m: focal(a, b, alpha=0.25, gamma=0.5, weights=c, where=m))
        ref.assert_close(
            f(*map(jnp.asarray, (x, y, w, where))),
            ref.ref_sigmoid_focal_loss(x, y, alpha=0.25, gamma=0.5, weights=w, where=where),
        )
