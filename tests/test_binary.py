"""sigmoid_binary_cross_entropy and binary_cross_entropy against float64 references,
PyTorch, optax, numerical gradients, and the edge cases of the spec."""

from __future__ import annotations

import contextlib

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st
from jax.experimental import checkify
from jax.test_util import check_grads

import jbce
from tests import reference as ref
from tests.reference import saved_residuals

pytestmark = pytest.mark.jax_strict

REDUCTIONS = ("none", "sum", "mean")
F64 = jnp.float64


def _data(shape=(4, 5), seed=0, soft=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 3
    y = rng.uniform(size=shape) if soft else rng.integers(0, 2, size=shape).astype(float)
    w = rng.uniform(0.2, 2.0, size=shape)
    pw = rng.uniform(0.5, 3.0, size=shape[-1:])
    where = rng.uniform(size=shape) < 0.7
    return x, y, w, pw, where


OPTION_SETS = {
    "plain": {},
    "weights": {"weights": True},
    "weights_row": {"weights_row": True},
    "pos_weight": {"pos_weight": True},
    "smoothing": {"label_smoothing": 0.1},
    "where": {"where": True},
    "all": {"weights": True, "pos_weight": True, "label_smoothing": 0.2, "where": True},
}


def _kwargs(opts, w, pw, where, pos_weight_ok=True):
    kw = {}
    if opts.get("weights"):
        kw["weights"] = w
    if opts.get("weights_row"):
        kw["weights"] = w[0]  # broadcast along the leading axis, as torch's weight allows
    if opts.get("pos_weight") and pos_weight_ok:
        kw["pos_weight"] = pw
    if "label_smoothing" in opts:
        kw["label_smoothing"] = opts["label_smoothing"]
    if opts.get("where"):
        kw["where"] = where
    return kw


# Core bug 2 (/work/notes/core_bugs.md): broadcast (lower-rank) weights / pos_weight rely on
# implicit rank promotion inside jbce. Set to True once fixed, so every test runs strict.
STRICT_BROADCAST_FIXED = True


def _maybe_allow_rank_promotion(opts=None):
    """Allows implicit rank promotion for option sets with broadcast arrays (core bug 2)."""
    if STRICT_BROADCAST_FIXED or opts in ("plain", "weights", "smoothing", "where"):
        return contextlib.nullcontext()
    return jax.numpy_rank_promotion("allow")


def jitted(fn):
    """``fn`` compiled as one program when called: op by op, each primitive would compile
    on its own (a loss and its reference's gradients: 4.5 s of CPU eagerly, 0.9 s jitted)."""
    return lambda *args, **kwargs: jax.jit(lambda: fn(*args, **kwargs))()


def _j(kw):
    return {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}


# ----------------------------------------------------------------------------- references
# Every reduction of the plain loss, with elementwise weights, with an elementwise where, and
# (binary_cross_entropy) with label smoothing, against the float64 references: the matrix's
# {sigmoid_,}binary_cross_entropy-materialised-value-float32-{random,masked_classes}-plain and
# binary_cross_entropy-materialised-value-float32-random-smoothed. Here: the other options.
SIGMOID_OPTIONS = ["weights_row", "pos_weight", "smoothing", "all"]
PROBS_OPTIONS = ["weights_row", "all"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", SIGMOID_OPTIONS)
def test_sigmoid_bce_matches_float64_reference(opts, reduction):
    x, y, w, pw, where = _data()
    kw = _kwargs(OPTION_SETS[opts], w, pw, where)
    with _maybe_allow_rank_promotion(opts):
        got = jitted(jbce.sigmoid_binary_cross_entropy)(
            jnp.asarray(x), jnp.asarray(y), reduction=reduction, **_j(kw)
        )
    want = ref.ref_sigmoid_binary_cross_entropy(x, y, reduction=reduction, **kw)
    assert got.dtype == F64
    ref.assert_close(got, want)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", PROBS_OPTIONS)
def test_bce_from_probs_matches_float64_reference(opts, reduction):
    x, y, w, pw, where = _data(seed=1)
    p = ref.sigmoid(x)
    kw = _kwargs(OPTION_SETS[opts], w, pw, where, pos_weight_ok=False)
    with _maybe_allow_rank_promotion(opts):
        got = jitted(jbce.binary_cross_entropy)(
            jnp.asarray(p), jnp.asarray(y), reduction=reduction, **_j(kw)
        )
    want = ref.ref_binary_cross_entropy(p, y, reduction=reduction, **kw)
    ref.assert_close(got, want)


def test_default_reduction_is_mean():
    x, y, *_ = _data()
    got = jitted(jbce.sigmoid_binary_cross_entropy)(jnp.asarray(x), jnp.asarray(y))
    ref.assert_close(got, np.mean(ref.ref_sigmoid_binary_cross_entropy(x, y, reduction="none")))


def test_binary_label_smoothing_maps_y_to_y_times_one_minus_e_plus_half_e():
    x, y, *_ = _data(soft=False)
    e = 0.3
    a = jitted(jbce.sigmoid_binary_cross_entropy)(jnp.asarray(x), jnp.asarray(y), label_smoothing=e)
    b = jitted(jbce.sigmoid_binary_cross_entropy)(jnp.asarray(x), jnp.asarray(y * (1 - e) + e / 2))
    ref.assert_close(a, np.asarray(b))


def test_weights_scale_terms_but_not_the_mean_denominator():
    x, y, w, *_ = _data()
    per = ref.ref_sigmoid_binary_cross_entropy(x, y, reduction="none")
    got = jitted(jbce.sigmoid_binary_cross_entropy)(
        jnp.asarray(x), jnp.asarray(y), weights=jnp.asarray(w)
    )
    ref.assert_close(got, np.sum(per * w) / per.size)


def test_where_excludes_elements_from_numerator_and_denominator():
    x, y, _, _, where = _data()
    per = ref.ref_sigmoid_binary_cross_entropy(x, y, reduction="none")
    got = jitted(jbce.sigmoid_binary_cross_entropy)(
        jnp.asarray(x), jnp.asarray(y), where=jnp.asarray(where)
    )
    ref.assert_close(got, per[where].mean())
    none = jitted(jbce.sigmoid_binary_cross_entropy)(
        jnp.asarray(x), jnp.asarray(y), where=jnp.asarray(where), reduction="none"
    )
    assert np.all(np.asarray(none)[~where] == 0)


@pytest.mark.parametrize("fn", ["sigmoid", "probs"])
def test_mean_over_nothing_is_zero_with_zero_gradient(fn):
    x, y, *_ = _data()
    nowhere = jnp.zeros(x.shape, bool)
    if fn == "sigmoid":
        f = lambda a: jbce.sigmoid_binary_cross_entropy(a, jnp.asarray(y), where=nowhere)
        arg = jnp.asarray(x)
    else:
        f = lambda a: jbce.binary_cross_entropy(a, jnp.asarray(y), where=nowhere)
        arg = jnp.asarray(ref.sigmoid(x))
    val, g = jitted(jax.value_and_grad(f))(arg)
    assert float(val) == 0.0
    assert np.all(np.asarray(g) == 0)


# ----------------------------------------------------------------------------- torch oracle


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", ["plain", "weights", "weights_row", "pos_weight"])
def test_sigmoid_bce_equals_torch_values_and_gradients(opts, reduction):
    x, y, w, pw, _ = _data(seed=3)
    kw = _kwargs({**OPTION_SETS[opts], "weights": opts in ("weights",)}, w, pw, None)
    if opts == "pos_weight":
        kw["weights"] = w  # weight and pos_weight together
    names = ("logits",) + tuple(kw)

    def f(*args):
        d = dict(zip(names, args))
        return jbce.sigmoid_binary_cross_entropy(
            d.pop("logits"), jnp.asarray(y), reduction=reduction, **d
        )

    args = [jnp.asarray(x)] + [jnp.asarray(v) for v in kw.values()]
    argnums = tuple(range(len(args)))

    def r(*args):
        d = dict(zip(names, args))
        return jnp.sum(
            ref.ref_sigmoid_binary_cross_entropy(
                d.pop("logits"), y, reduction=reduction, xp=jnp, **d
            )
        )

    with _maybe_allow_rank_promotion(opts):  # the loss, its gradients and the reference's
        got, grads, rgrads = jax.jit(
            lambda *a: (
                f(*a),
                jax.grad(lambda *a: jnp.sum(f(*a)), argnums)(*a),
                jax.grad(r, argnums)(*a),
            )
        )(*args)
    # torch differentiates only w.r.t. the logits; weight / pos_weight gradients are checked
    # against jax.grad of the float64 reference
    want, (tg,) = ref.torch_sigmoid_binary_cross_entropy(
        x, y, reduction=reduction, grad_of=("logits",), **kw
    )
    ref.assert_close(got, want, rtol=1e-12)
    ref.assert_close(grads[0], tg, rtol=1e-10, atol=1e-15)
    for g, rg in zip(grads, rgrads):
        ref.assert_close(g, np.asarray(rg), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("use_pw", [False, True])
def test_sigmoid_bce_label_gradient_equals_torch(use_pw):
    x, y, w, pw, _ = _data(shape=(5,), seed=15)
    kw = {"pos_weight": pw} if use_pw else {}
    g = jitted(
        jax.grad(
            lambda b: jbce.sigmoid_binary_cross_entropy(
                jnp.asarray(x), b, reduction="sum", **_j(kw)
            )
        )
    )(jnp.asarray(y))
    _, (tg,) = ref.torch_sigmoid_binary_cross_entropy(
        x, y, reduction="sum", grad_of=("labels",), **kw
    )
    ref.assert_close(g, tg, rtol=1e-12)


@pytest.mark.parametrize("fn", ["sigmoid", "probs"])
def test_broadcast_weights_work_under_strict_rank_promotion(fn):
    x, y, w, *_ = _data()
    loss = jbce.sigmoid_binary_cross_entropy if fn == "sigmoid" else jbce.binary_cross_entropy
    a = jnp.asarray(x) if fn == "sigmoid" else jnp.asarray(ref.sigmoid(x))
    rfn = ref.ref_sigmoid_binary_cross_entropy if fn == "sigmoid" else ref.ref_binary_cross_entropy
    got = jitted(loss)(a, jnp.asarray(y), weights=jnp.asarray(w[0]))
    ref.assert_close(got, rfn(np.asarray(a), y, weights=w[0]))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_bce_from_probs_equals_torch_including_clamped_logs(weighted, reduction):
    x, y, w, *_ = _data(seed=4)
    p = ref.sigmoid(x)
    p[0, :3] = [0.0, 1.0, 1e-50]  # log clamped at -100 by torch
    y[0, :3] = [0.7, 0.2, 0.5]
    kw = {"weights": w} if weighted else {}
    got = jitted(jbce.binary_cross_entropy)(
        jnp.asarray(p), jnp.asarray(y), reduction=reduction, **_j(kw)
    )
    want = ref.torch_binary_cross_entropy(p, y, reduction=reduction, **kw)
    ref.assert_close(got, want, rtol=1e-12)
    ref.assert_close(got, ref.ref_binary_cross_entropy(p, y, reduction=reduction, **kw))


def test_bce_from_probs_gradient_equals_torch_in_the_interior():
    x, y, w, *_ = _data(seed=5)
    p = ref.sigmoid(x)
    g = jitted(
        jax.grad(
            lambda a, b, c: jbce.binary_cross_entropy(a, b, weights=c, reduction="sum"), (0, 1, 2)
        )
    )(jnp.asarray(p), jnp.asarray(y), jnp.asarray(w))
    _, tg = ref.torch_binary_cross_entropy(p, y, weights=w, reduction="sum", grad_of=("probs",))
    ref.assert_close(g[0], tg[0], rtol=1e-9)
    # torch cannot differentiate w.r.t. labels/weight here: use the float64 reference
    rg = jitted(
        jax.grad(
            lambda a, b, c: ref.ref_binary_cross_entropy(a, b, weights=c, reduction="sum", xp=jnp),
            (0, 1, 2),
        )
    )(jnp.asarray(p), jnp.asarray(y), jnp.asarray(w))
    for a, b in zip(g, rg):
        ref.assert_close(a, np.asarray(b), rtol=1e-12)


def test_bce_from_probs_gradient_is_finite_at_zero_and_one():
    p = jnp.asarray([0.0, 1.0, 0.0, 1.0, 0.5])
    y = jnp.asarray([0.0, 1.0, 1.0, 0.0, 0.3])
    val, g = jitted(jax.value_and_grad(lambda a: jbce.binary_cross_entropy(a, y, reduction="sum")))(
        p
    )
    assert np.isfinite(float(val))
    ref.assert_close(
        val, ref.ref_binary_cross_entropy(np.asarray(p), np.asarray(y), reduction="sum")
    )
    assert np.all(np.isfinite(np.asarray(g)))


# ----------------------------------------------------------------------------- optax


def test_sigmoid_bce_none_is_a_drop_in_for_optax():
    import optax

    x, y, *_ = _data(shape=(3, 4, 5), seed=6)
    got = jitted(jbce.sigmoid_binary_cross_entropy)(
        jnp.asarray(x), jnp.asarray(y), reduction="none"
    )
    ref.assert_close(got, np.asarray(optax.sigmoid_binary_cross_entropy(x, y)), rtol=1e-12)


# ----------------------------------------------------------------------------- gradients


def test_sigmoid_bce_gradients_check_numerically_to_second_order():
    # in the labels, the weights and a per-class pos_weight, with smoothing and where (the
    # plain loss's second derivatives in the logits and labels against the float64
    # reference: the matrix's sigmoid_binary_cross_entropy-materialised-hessian-float32-*-plain)
    x, y, w, pw, where = _data(shape=(3, 4), seed=7)
    smoothing = OPTION_SETS["all"]["label_smoothing"]
    m = jnp.asarray(where)
    y = np.clip(y, 0.05, 0.95)  # finite differences stay inside [0, 1]

    def f(a, b, c, d):
        return jbce.sigmoid_binary_cross_entropy(
            a, b, weights=c, pos_weight=d, label_smoothing=smoothing, where=m, reduction="mean"
        )

    with _maybe_allow_rank_promotion():
        check_grads(jax.jit(f), tuple(map(jnp.asarray, (x, y, w, pw))), order=2, modes=["rev"])


def test_bce_from_probs_gradients_check_numerically_to_second_order():
    x, y, w, *_ = _data(shape=(3, 4), seed=8)
    p = np.clip(ref.sigmoid(x), 0.05, 0.95)
    f = lambda a, b, c: jbce.binary_cross_entropy(a, b, weights=c, label_smoothing=0.1)
    check_grads(jax.jit(f), tuple(map(jnp.asarray, (p, y, w))), order=2, modes=["rev"])


def test_sigmoid_bce_hessian_equals_reference_reverse_over_reverse():
    x, y, w, pw, _ = _data(shape=(6,), seed=9)
    kw = {"weights": w, "pos_weight": pw, "label_smoothing": 0.1, "reduction": "sum"}

    def f(a):
        return jbce.sigmoid_binary_cross_entropy(a, jnp.asarray(y), **_j(kw))

    def r(a):
        return ref.ref_sigmoid_binary_cross_entropy(a, jnp.asarray(y), xp=jnp, **_j(kw))

    h = jax.jit(jax.jacrev(jax.grad(f)))(jnp.asarray(x))
    hr = jax.jit(jax.jacrev(jax.grad(r)))(jnp.asarray(x))
    ref.assert_close(h, np.asarray(hr), rtol=1e-12, atol=1e-15)
    # mixed second derivative d2/(dx dpos_weight)
    g2 = jax.jit(
        jax.jacrev(
            jax.grad(
                lambda a, b: jbce.sigmoid_binary_cross_entropy(a, jnp.asarray(y), pos_weight=b)
            ),
            argnums=1,
        )
    )(jnp.asarray(x), jnp.asarray(pw))
    g2r = jax.jit(
        jax.jacrev(
            jax.grad(
                lambda a, b: ref.ref_sigmoid_binary_cross_entropy(
                    a, jnp.asarray(y), pos_weight=b, xp=jnp
                )
            ),
            argnums=1,
        )
    )(jnp.asarray(x), jnp.asarray(pw))
    ref.assert_close(g2, np.asarray(g2r), rtol=1e-12, atol=1e-15)


def test_sigmoid_bce_saves_no_residual_larger_than_its_inputs():
    x, y, *_ = _data(shape=(64, 32), seed=10)
    f = lambda a: jbce.sigmoid_binary_cross_entropy(a, jnp.asarray(y))
    res = saved_residuals(f, jnp.asarray(x))
    # at most logits and labels (the inputs) are kept at full size; nothing else
    full = [r for r in res if np.prod(r[0].shape) >= x.size]
    assert len(full) <= 2, res


# ----------------------------------------------------------------------------- numerics


EXTREME = np.array([-1e30, -1e4, -100.0, -20.0, -1.0, 0.0, 1.0, 20.0, 100.0, 1e4, 1e30])


@pytest.mark.parametrize("label", [0.0, 1.0, 0.3])
def test_float32_extreme_logits_within_a_few_ulps_of_float64(label):
    x32 = EXTREME.astype(np.float32)
    y32 = np.full_like(x32, label)
    got = jitted(jbce.sigmoid_binary_cross_entropy)(
        jnp.asarray(x32),
        jnp.asarray(y32),
        pos_weight=jnp.asarray(2.0, jnp.float32),
        reduction="none",
    )
    assert got.dtype == jnp.float32
    want = ref.ref_sigmoid_binary_cross_entropy(
        x32.astype(np.float64), y32.astype(np.float64), pos_weight=2.0, reduction="none"
    )
    tiny = float(np.finfo(np.float32).tiny)
    ref.assert_close(got, want, atol=tiny)


def test_float32_gradient_at_extreme_logits_is_sigmoid_minus_label():
    x32 = EXTREME.astype(np.float32)
    y32 = np.tile(np.float32([0.0, 1.0, 0.3]), 4)[: x32.size]
    g = jitted(
        jax.grad(lambda a: jbce.sigmoid_binary_cross_entropy(a, jnp.asarray(y32), reduction="sum"))
    )(jnp.asarray(x32))
    assert g.dtype == jnp.float32
    want = ref.sigmoid(x32.astype(np.float64)) - y32.astype(np.float64)
    ref.assert_close(g, want, atol=float(np.finfo(np.float32).tiny))


def test_infinite_logits_give_zero_or_inf_loss_and_finite_gradient():
    x = jnp.asarray([np.inf, -np.inf, np.inf, -np.inf, np.inf, -np.inf])
    y = jnp.asarray([1.0, 0.0, 0.0, 1.0, 0.25, 0.25])
    loss = jitted(jbce.sigmoid_binary_cross_entropy)(x, y, reduction="none")
    np.testing.assert_array_equal(np.asarray(loss), [0, 0, np.inf, np.inf, np.inf, np.inf])
    g = jitted(jax.grad(lambda a: jbce.sigmoid_binary_cross_entropy(a, y, reduction="sum")))(x)
    np.testing.assert_array_equal(np.asarray(g), [0.0, 0.0, 1.0, -1.0, 0.75, -0.25])
    gp = jitted(
        jax.grad(
            lambda a: jbce.sigmoid_binary_cross_entropy(
                a, y, pos_weight=jnp.asarray(3.0), reduction="sum"
            )
        )
    )(x)
    # d/dx = (1 - y) sigmoid(x) - pw y sigmoid(-x)
    np.testing.assert_array_equal(np.asarray(gp), [0.0, 0.0, 1.0, -3.0, 0.75, -0.75])


def test_infinite_logits_agreeing_with_hard_labels_keep_the_mean_finite():
    x = jnp.asarray([np.inf, -np.inf, 0.5])
    y = jnp.asarray([1.0, 0.0, 1.0])
    val, g = jitted(jax.value_and_grad(lambda a: jbce.sigmoid_binary_cross_entropy(a, y)))(x)
    ref.assert_close(val, ref.ref_sigmoid_binary_cross_entropy(np.asarray(x), np.asarray(y)))
    assert np.all(np.isfinite(np.asarray(g)))


def test_large_input_with_infinite_logits_matches_float64():
    # 2^15 float32 logits with agreeing infinite logits among them: value and gradient
    # match the float64 reference (no term is 0 * inf), "sum" and "mean", with and without
    # pos_weight, in one compiled function.
    n = 2**15
    rng = np.random.default_rng(5)
    x = (rng.normal(size=n) * 4).astype(np.float32)
    y = rng.integers(0, 2, size=n).astype(np.float32)
    x[:4], y[:4] = [np.inf, -np.inf, 1e30, -1e30], [1.0, 0.0, 1.0, 0.0]
    cases = [(r, pw) for r in ("sum", "mean") for pw in (None, 1.5)]

    def losses(a):
        return [
            jax.value_and_grad(
                lambda a, r=r, pw=pw: jbce.sigmoid_binary_cross_entropy(
                    a,
                    jnp.asarray(y),
                    reduction=r,
                    **({} if pw is None else {"pos_weight": jnp.asarray(pw, jnp.float32)}),
                )
            )(a)
            for r, pw in cases
        ]

    for (reduction, pw), (val, g) in zip(cases, jax.jit(losses)(jnp.asarray(x)), strict=True):
        want = ref.ref_sigmoid_binary_cross_entropy(
            x.astype(np.float64), y.astype(np.float64), pos_weight=pw, reduction=reduction
        )
        ref.assert_close(val, want, rtol=1e-5)
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_array_equal(np.asarray(g[:4]), [0.0, 0.0, 0.0, 0.0])


def test_loss_keeps_relative_accuracy_for_soft_labels_near_zero_and_one():
    # relu(x) (1 - y) + relu(-x) y has no cancellation, unlike relu(x) - x y: check each term.
    x = np.array([30.0, -30.0, 1e4, -1e4], np.float32)
    y = np.array([1 - 2**-20, 2**-20, 1 - 2**-20, 2**-20], np.float32)
    got = jitted(jbce.sigmoid_binary_cross_entropy)(
        jnp.asarray(x), jnp.asarray(y), reduction="none"
    )
    want = ref.ref_sigmoid_binary_cross_entropy(
        x.astype(np.float64), y.astype(np.float64), reduction="none"
    )
    ref.assert_close(got, want, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("fn", ["sigmoid", "probs"])
def test_half_precision_inputs_compute_in_float32_and_return_input_dtype_grads(dtype, fn):
    x, y, w, *_ = _data(seed=11)
    if fn == "probs":
        x = np.clip(ref.sigmoid(x), 0.01, 0.99)
        loss = jbce.binary_cross_entropy
        rfn = ref.ref_binary_cross_entropy
    else:
        loss = jbce.sigmoid_binary_cross_entropy
        rfn = ref.ref_sigmoid_binary_cross_entropy
    xl, yl = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    val, g = jitted(jax.value_and_grad(lambda a: loss(a, yl)))(xl)
    assert val.dtype == jnp.float32
    assert g.dtype == dtype
    want = rfn(np.asarray(xl, np.float64), np.asarray(yl, np.float64))
    ref.assert_close(val, want, rtol=1e-6)
    gref = jax.jit(jax.grad(lambda a: rfn(a, jnp.asarray(yl, F64), xp=jnp)))(jnp.asarray(xl, F64))
    ref.assert_close(g, np.asarray(gref), rtol=1e-2, atol=1e-4)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("fn", [jbce.sigmoid_binary_cross_entropy, jbce.binary_cross_entropy])
def test_empty_inputs_give_empty_none_zero_sum_and_zero_mean(fn):
    x = jnp.zeros((0, 3))
    y = jnp.zeros((0, 3))
    assert fn(x, y, reduction="none").shape == (0, 3)
    assert float(fn(x, y, reduction="sum")) == 0.0
    val, g = jitted(jax.value_and_grad(lambda a: fn(a, y)))(x)
    assert float(val) == 0.0 and g.shape == (0, 3)


def test_rank0_inputs():
    x, y = 0.7, 0.2
    want = ref.ref_sigmoid_binary_cross_entropy(np.float64(x), np.float64(y), reduction="none")
    for red in REDUCTIONS:
        got = jitted(jbce.sigmoid_binary_cross_entropy)(
            jnp.asarray(x), jnp.asarray(y), reduction=red
        )
        assert got.shape == ()
        ref.assert_close(got, want)


def test_vmap_of_mean_equals_per_row_means():
    x, y, w, *_ = _data(shape=(5, 7), seed=12)
    f = lambda a, b, c: jbce.sigmoid_binary_cross_entropy(a, b, weights=c)
    got = jitted(jax.vmap(f))(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w))
    want = [ref.ref_sigmoid_binary_cross_entropy(x[i], y[i], weights=w[i]) for i in range(5)]
    ref.assert_close(got, np.asarray(want))
    gp = jitted(jax.vmap(lambda a, b: jbce.binary_cross_entropy(a, b, reduction="sum")))(
        jnp.asarray(ref.sigmoid(x)), jnp.asarray(y)
    )
    ref.assert_close(gp, ref.ref_binary_cross_entropy(ref.sigmoid(x), y, reduction="none").sum(1))


def test_training_step_writes_the_logits_gradient_in_place():
    # logits = h @ w inside the differentiated function: the backward pass is their last
    # reader, so XLA gives their gradient the same buffer.
    n, d, k = 64, 16, 2048
    h, w, y = (jnp.zeros(s, jnp.float32) for s in ((n, d), (d, k), (n, k)))
    step = jax.value_and_grad(
        lambda h, w, y: jbce.sigmoid_binary_cross_entropy(h @ w, y), argnums=(0, 1)
    )
    temp = jax.jit(step).lower(h, w, y).compile().memory_analysis().temp_size_in_bytes
    assert temp < 1.25 * n * k * 4, temp / (n * k * 4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "vag"])
def test_compiled_program_keeps_no_logits_sized_temporary(dtype, grad):
    # XLA:CPU: the forward is one fused reduction and the backward one elementwise kernel,
    # bf16 read inside them (no float32 copy); optax keeps two or three N-element buffers.
    n = 2**14
    x, y = jnp.zeros((n,), dtype), jnp.zeros((n,), dtype)
    f = jbce.sigmoid_binary_cross_entropy
    temp = jax.jit(jax.value_and_grad(f) if grad else f).lower(x, y).compile()
    temp = temp.memory_analysis().temp_size_in_bytes
    assert temp <= 64, temp  # a few scalars at most


# The XLA:CPU core (jbce._binary.xla_cpu) against the formula the other platforms compile, on
# every edge value: the same numbers (bit for bit, both compiled as elementwise kernels).
_EDGE_X = np.float32(
    [np.inf, -np.inf, 1e30, -1e30, 3.4028235e38, -3.4028235e38, 100.0, -100.0, 20.0, -20.0,
     1.0, -1.0, 1e-45, -1e-45, 0.0, -0.0, np.nan]
)  # fmt: skip
_EDGE_Y = np.float32([0.0, 1.0, 0.3, 1e-40, 1 - 2**-24, 0.5, np.nan])


@pytest.mark.parametrize("pw", [None, 2.5, 0.0], ids=["no_pos_weight", "pos_weight", "zero_pw"])
def test_cpu_core_gives_the_formulas_values_on_edge_inputs(pw):
    from jbce._binary import api, xla_cpu

    x, y = (jnp.asarray(v) for v in np.meshgrid(_EDGE_X, _EDGE_Y, indexing="ij"))
    p = None if pw is None else jnp.full(x.shape, pw, jnp.float32)
    got = jax.jit(xla_cpu.bce_logits_value, static_argnums=3)(x, y, p, jnp.float32)
    want = jax.jit(api._bce_logits_formula)(x, y, p)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_vmapped_value_and_grad_equal_each_members_own_call():
    x, y, *_ = _data(shape=(3, 16), seed=13)
    x[1, 3] = np.inf  # an agreeing infinite logit in one member only
    y[1, 3] = 1.0
    vag = jax.value_and_grad(jbce.sigmoid_binary_cross_entropy)
    v, g = jax.jit(jax.vmap(vag))(jnp.asarray(x), jnp.asarray(y))
    want = [ref.ref_sigmoid_binary_cross_entropy(x[i], y[i]) for i in range(3)]
    ref.assert_close(v, np.asarray(want))
    for i in range(3):
        gi = vag(jnp.asarray(x[i]), jnp.asarray(y[i]))[1]
        np.testing.assert_array_equal(np.asarray(g[i]), np.asarray(gi))


# ----------------------------------------------------------------------------- checkify


def test_checkify_reports_soft_labels_outside_unit_interval():
    f = checkify.checkify(
        jax.jit(lambda a, b: jbce.sigmoid_binary_cross_entropy(a, b)), errors=checkify.user_checks
    )
    err, _ = f(jnp.zeros(3), jnp.asarray([0.0, 1.5, 1.0]))
    assert err.get() is not None and "labels" in err.get()
    err, _ = f(jnp.zeros(3), jnp.asarray([0.0, 0.5, 1.0]))
    assert err.get() is None


def test_checkify_reports_probabilities_outside_unit_interval():
    f = checkify.checkify(lambda a, b: jbce.binary_cross_entropy(a, b))
    err, _ = f(jnp.asarray([0.2, -0.1]), jnp.asarray([0.0, 1.0]))
    assert err.get() is not None and "probs" in err.get()
    err, _ = f(jnp.asarray([0.2, 0.9]), jnp.asarray([0.0, 1.0]))
    assert err.get() is None


# ----------------------------------------------------------------------------- variants


class JitVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*REDUCTIONS)
    def test_sigmoid_bce_same_with_and_without_jit(self, reduction):
        x, y, w, pw, where = _data(seed=13)
        f = self.variant(
            lambda a, b, c, d, m: jbce.sigmoid_binary_cross_entropy(
                a, b, weights=c, pos_weight=d, where=m, label_smoothing=0.1, reduction=reduction
            )
        )
        with _maybe_allow_rank_promotion():
            got = f(*map(jnp.asarray, (x, y, w, pw, where)))
        want = ref.ref_sigmoid_binary_cross_entropy(
            x, y, weights=w, pos_weight=pw, where=where, label_smoothing=0.1, reduction=reduction
        )
        ref.assert_close(got, want)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bce_from_probs_same_with_and_without_jit(self):
        x, y, w, *_ = _data(seed=14)
        p = ref.sigmoid(x)
        f = self.variant(lambda a, b, c: jbce.binary_cross_entropy(a, b, weights=c))
        ref.assert_close(
            f(*map(jnp.asarray, (p, y, w))), ref.ref_binary_cross_entropy(p, y, weights=w)
        )


# ----------------------------------------------------------------------------- properties

_shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
_logit = st.one_of(
    st.floats(-50, 50),
    st.sampled_from([-1e30, -1e4, -88.0, 0.0, 88.0, 1e4, 1e30]),
)


@given(
    shape=_shapes,
    dtype=st.sampled_from([np.float32, np.float64]),
    smoothing=st.sampled_from([0.0, 0.1]),
    use_pw=st.booleans(),
    use_w=st.booleans(),
    use_where=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS),
    data=st.data(),
)
def test_property_sigmoid_bce_matches_reference(
    shape, dtype, smoothing, use_pw, use_w, use_where, reduction, data
):
    x = data.draw(hnp.arrays(dtype, shape, elements=_logit))
    y = data.draw(hnp.arrays(dtype, shape, elements=st.sampled_from([0.0, 1.0, 0.25, 0.5])))
    kw = {}
    if use_pw:
        kw["pos_weight"] = np.asarray(2.0, dtype)
    if use_w:
        kw["weights"] = data.draw(hnp.arrays(dtype, shape, elements=st.sampled_from([0.5, 1.0])))
    if use_where:
        kw["where"] = data.draw(hnp.arrays(np.bool_, shape))
    got = jax.jit(
        lambda a, b, k: jbce.sigmoid_binary_cross_entropy(
            a, b, label_smoothing=smoothing, reduction=reduction, **k
        )
    )(jnp.asarray(x), jnp.asarray(y), _j(kw))
    assert got.dtype == dtype
    want = ref.ref_sigmoid_binary_cross_entropy(
        x,
        y,
        label_smoothing=smoothing,
        reduction=reduction,
        **{k: (np.asarray(v, np.float64) if k != "where" else v) for k, v in kw.items()},
    )
    # float32 smoothing constants are rounded: compare to a few ulps of the result scale
    rtol = 1e-12 if dtype == np.float64 else 2e-6
    ref.assert_close(got, want, rtol=rtol, atol=float(np.finfo(dtype).tiny))
    assert not np.any(np.isnan(np.asarray(got)))
