"""softmax_cross_entropy (probability labels) and softmax_cross_entropy_with_integer_labels
against float64 references, PyTorch, optax, numerical gradients and the spec's edge cases."""

from __future__ import annotations

import functools

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify
from jax.test_util import check_grads

import jbce
from tests import reference as ref

pytestmark = pytest.mark.jax_strict

REDUCTIONS = ("none", "sum", "mean")
ce_int = jbce.softmax_cross_entropy_with_integer_labels
ce_soft = jbce.softmax_cross_entropy

# (logits shape, axis): class axis last, torch-style (N, C, d), and a tuple of class axes
LAYOUTS = {
    "last": ((6, 5), -1),
    "torch_nc_d": ((3, 5, 2), 1),
    "tuple": ((4, 2, 3), (1, 2)),
}


def _classes(shape, axis):
    axes = ref.canonical_axes(axis, len(shape))
    batch = tuple(s for i, s in enumerate(shape) if i not in axes)
    k = int(np.prod([shape[a] for a in axes]))
    return batch, k


def _data(layout="last", seed=0, ignore=True):
    shape, axis = LAYOUTS[layout]
    batch, k = _classes(shape, axis)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 2
    labels = rng.integers(0, k, size=batch)
    if ignore:
        labels.reshape(-1)[1] = -100
    soft = ref.move_classes_back(rng.dirichlet(np.ones(k), size=batch), shape, axis)
    w = rng.uniform(0.2, 2.0, size=batch)
    cw = rng.uniform(0.3, 3.0, size=k)
    where_ex = rng.uniform(size=batch) < 0.7
    where_ex.reshape(-1)[0] = True
    where_logit = rng.uniform(size=shape) < 0.7
    return x, labels, soft, w, cw, where_ex, where_logit, axis


def _target_included(where_logit, labels, axis):
    """Makes every non-ignored target class included in a per-logit mask."""
    wl = ref.move_classes_last(where_logit, axis).copy()
    lab = labels.reshape(-1)
    flat = wl.reshape(lab.size, -1)
    for i, c in enumerate(lab):
        if c >= 0:
            flat[i, c] = True
    return flat.reshape(wl.shape)


INT_OPTIONS = {
    "plain": {},
    "weights": {"weights": True},
    "class_weights": {"class_weights": True},
    "smoothing": {"label_smoothing": 0.1},
    "smoothing_class_weights": {"label_smoothing": 0.2, "class_weights": True},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"logit_softcap": 3.0},
    "where_example": {"where": "example"},
    "where_logit": {"where": "logit"},
    "no_ignore_index": {"ignore_index": None},
    "all": {
        "weights": True,
        "class_weights": True,
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "logit_softcap": 4.0,
        "where": "example",
    },
}


def _int_kwargs(opts, labels, w, cw, where_ex, where_logit, axis):
    kw = {}
    for k, v in opts.items():
        if k == "weights":
            kw["weights"] = w
        elif k == "class_weights":
            kw["class_weights"] = cw
        elif k == "where":
            kw["where"] = where_ex if v == "example" else where_logit
        elif k == "ignore_index":
            kw["ignore_index"] = v
        else:
            kw[k] = v
    return kw


def _j(kw):
    return {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}


# ----------------------------------------------------------------------------- references
# Every log-sum-exp implementation (one pass: the GPU/TPU default; two passes: the CPU one)
# against the float64 reference, chosen explicitly with implementation=.
IMPLEMENTATIONS = ("one_pass", "two_pass")


def _int_case(opts, layout):
    """(logits, labels, axis, array keywords, static keywords) of one option set."""
    x, labels, _, w, cw, where_ex, where_logit, axis = _data(layout)
    if opts == "where_logit":
        # a per-logit mask in the classes-last layout of the logits
        where_logit = _target_included(where_logit, labels, axis)
        where_logit = np.asarray(where_logit).reshape(ref.move_classes_last(x, axis).shape)
        x = ref.move_classes_last(x, axis)
        axis = -1
    if opts == "no_ignore_index":
        labels = np.where(labels < 0, 0, labels)
    kw = _int_kwargs(INT_OPTIONS[opts], labels, w, cw, where_ex, where_logit, axis)
    static = {k: v for k, v in kw.items() if not isinstance(v, np.ndarray)}
    arrays = {k: v for k, v in kw.items() if isinstance(v, np.ndarray)}
    return x, labels, axis, arrays, static


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_integer_label_ce_matches_float64_reference(layout, implementation):
    # Every option set and reduction of one layout in one compiled program.
    cases = {opts: _int_case(opts, layout) for opts in INT_OPTIONS}

    def losses(inputs):
        return {
            opts: [ce_int(x, lab, axis=cases[opts][2], reduction=r, implementation=implementation,
                          **cases[opts][4], **arrays) for r in REDUCTIONS]
            for opts, (x, lab, arrays) in inputs.items()
        }  # fmt: skip

    gots = jax.jit(losses)(
        {o: (jnp.asarray(c[0]), jnp.asarray(c[1]), _j(c[3])) for o, c in cases.items()}
    )
    for opts, (x, labels, axis, arrays, static) in cases.items():
        for reduction, got in zip(REDUCTIONS, gots[opts]):
            want = ref.ref_softmax_cross_entropy_with_integer_labels(
                x, labels, axis=axis, reduction=reduction, **static, **arrays
            )
            assert got.dtype == jnp.float64, opts
            ref.assert_close(got, want, atol=1e-15)


SOFT_OPTIONS = {
    "plain": {},
    "weights": {"weights": True},
    "smoothing": {"label_smoothing": 0.1},
    "where_example": {"where": "example"},
    "where_logit": {"where": "logit"},
    "all": {"weights": True, "label_smoothing": 0.2, "where": "example"},
}


def _soft_kwargs(opts, w, where_ex, where_logit):
    arrays, static = {}, {}
    for k, v in SOFT_OPTIONS[opts].items():
        if k == "weights":
            arrays["weights"] = w
        elif k == "where":
            arrays["where"] = where_ex if v == "example" else where_logit
        else:
            static[k] = v
    return arrays, static


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_soft_label_ce_matches_float64_reference(layout, implementation):
    # Every option set and reduction of one layout in one compiled program.
    x, _, soft, w, _, where_ex, where_logit, axis = _data(layout, seed=1)
    kwargs = {o: _soft_kwargs(o, w, where_ex, where_logit) for o in SOFT_OPTIONS}

    def losses(a, b, arrays):
        return {
            opts: [ce_soft(a, b, axis=axis, reduction=r, implementation=implementation,
                           **kwargs[opts][1], **arrays[opts]) for r in REDUCTIONS]
            for opts in SOFT_OPTIONS
        }  # fmt: skip

    gots = jax.jit(losses)(
        jnp.asarray(x), jnp.asarray(soft), {o: _j(kw[0]) for o, kw in kwargs.items()}
    )
    for opts, (arrays, static) in kwargs.items():
        for reduction, got in zip(REDUCTIONS, gots[opts]):
            want = ref.ref_softmax_cross_entropy(
                x, soft, axis=axis, reduction=reduction, **static, **arrays
            )
            ref.assert_close(got, want, atol=1e-15)


def test_default_reduction_is_mean():
    x, labels, soft, *_ = _data(ignore=False)
    ref.assert_close(
        ce_int(jnp.asarray(x), jnp.asarray(labels)),
        ref.ref_softmax_cross_entropy_with_integer_labels(x, labels, reduction="none").mean(),
    )
    ref.assert_close(
        ce_soft(jnp.asarray(x), jnp.asarray(soft)),
        ref.ref_softmax_cross_entropy(x, soft, reduction="none").mean(),
    )


def test_one_hot_soft_labels_equal_integer_labels():
    x, labels, *_ = _data(ignore=False)
    one_hot = np.eye(x.shape[-1])[labels]
    a = ce_soft(jnp.asarray(x), jnp.asarray(one_hot), label_smoothing=0.1, reduction="none")
    b = ce_int(jnp.asarray(x), jnp.asarray(labels), label_smoothing=0.1, reduction="none")
    ref.assert_close(a, np.asarray(b))


def test_ignored_tokens_do_not_count_in_mean():
    x, labels, *_ = _data()
    per = ref.ref_softmax_cross_entropy_with_integer_labels(x, labels, reduction="none")
    got = ce_int(jnp.asarray(x), jnp.asarray(labels))
    keep = labels != -100
    ref.assert_close(got, per[keep].mean())
    none = ce_int(jnp.asarray(x), jnp.asarray(labels), reduction="none")
    assert np.all(np.asarray(none)[~keep] == 0)


def test_class_weighted_mean_divides_by_summed_target_class_weights():
    x, labels, _, _, cw, *_ = _data()
    keep = labels != -100
    per = ref.ref_softmax_cross_entropy_with_integer_labels(x, labels, reduction="none")
    got = ce_int(jnp.asarray(x), jnp.asarray(labels), class_weights=jnp.asarray(cw))
    wt = cw[np.where(keep, labels, 0)]
    ref.assert_close(got, np.sum((wt * per)[keep]) / np.sum(wt[keep]))


def test_example_weights_scale_terms_but_not_the_mean_denominator():
    x, labels, _, w, *_ = _data(ignore=False)
    per = ref.ref_softmax_cross_entropy_with_integer_labels(x, labels, reduction="none")
    got = ce_int(jnp.asarray(x), jnp.asarray(labels), weights=jnp.asarray(w))
    ref.assert_close(got, np.sum(w * per) / per.size)


def test_z_loss_adds_z_times_logsumexp_squared():
    x, labels, *_ = _data(ignore=False)
    lse = np.log(np.sum(np.exp(x), -1))
    a = ce_int(jnp.asarray(x), jnp.asarray(labels), z_loss=0.5, reduction="none")
    b = ce_int(jnp.asarray(x), jnp.asarray(labels), reduction="none")
    ref.assert_close(np.asarray(a) - np.asarray(b), 0.5 * lse**2, rtol=1e-12, atol=1e-14)


def test_logit_softcap_equals_loss_of_capped_logits():
    x, labels, *_ = _data(ignore=False)
    capped = 2.0 * np.tanh(x * 10 / 2.0)
    a = ce_int(jnp.asarray(x * 10), jnp.asarray(labels), logit_softcap=2.0, reduction="none")
    b = ce_int(jnp.asarray(capped), jnp.asarray(labels), reduction="none")
    ref.assert_close(a, np.asarray(b))


# ----------------------------------------------------------------------------- torch oracle

TORCH_INT = {
    "plain": {},
    "weight": {"class_weights": True},
    "smoothing": {"label_smoothing": 0.15},
    "weight_smoothing": {"class_weights": True, "label_smoothing": 0.15},
    "ignore_other": {"ignore_index": 2},
}


@pytest.mark.parametrize("layout", ["last", "torch_nc_d"])
@pytest.mark.parametrize("opts", list(TORCH_INT))
def test_integer_label_ce_equals_torch_values_and_logit_gradients(opts, layout):
    x, labels, _, _, cw, _, _, axis = _data(layout, seed=2)
    o = TORCH_INT[opts]
    ignore_index = o.get("ignore_index", -100)
    smoothing = o.get("label_smoothing", 0.0)
    weight = cw if o.get("class_weights") else None
    torch_labels = labels.copy()
    if ignore_index != -100:
        torch_labels = np.where(labels < 0, ignore_index, labels)

    def f(a, reduction):
        return ce_int(
            a,
            jnp.asarray(torch_labels),
            axis=axis,
            class_weights=None if weight is None else jnp.asarray(weight),
            ignore_index=ignore_index,
            label_smoothing=smoothing,
            reduction=reduction,
        )

    reductions = ("none", "mean")  # "sum" = sum of "none"
    out = jax.jit(
        lambda a: [(f(a, r), jax.grad(lambda b, r=r: jnp.sum(f(b, r)))(a)) for r in reductions]
    )(jnp.asarray(x))
    for reduction, (got, g) in zip(reductions, out):
        want, (tg,) = ref.torch_cross_entropy(
            x,
            torch_labels,
            axis=axis,
            weight=weight,
            ignore_index=ignore_index,
            label_smoothing=smoothing,
            reduction=reduction,
            grad_of=("logits",),
        )
        ref.assert_close(got, want, rtol=1e-12, atol=1e-15)
        ref.assert_close(g, tg, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("layout", ["last", "torch_nc_d"])
def test_soft_label_ce_equals_torch_probability_targets(layout):
    # Both smoothings and both reductions in one compiled program.
    x, _, soft, *_, axis = _data(layout, seed=3)
    settings = [(s, r) for s in (0.0, 0.2) for r in ("none", "mean")]
    f = lambda a, s, r: ce_soft(a, jnp.asarray(soft), axis=axis, label_smoothing=s, reduction=r)
    out = jax.jit(
        lambda a: [(f(a, s, r), jax.grad(lambda b, s=s, r=r: jnp.sum(f(b, s, r)))(a))
                   for s, r in settings]
    )(jnp.asarray(x))  # fmt: skip
    for (smoothing, reduction), (got, g) in zip(settings, out):
        want, (tg,) = ref.torch_cross_entropy(
            x, soft, axis=axis, label_smoothing=smoothing, reduction=reduction,
            grad_of=("logits",),
        )  # fmt: skip
        ref.assert_close(got, want, rtol=1e-12, atol=1e-15)
        ref.assert_close(g, tg, rtol=1e-10, atol=1e-15)


# ----------------------------------------------------------------------------- optax


@pytest.mark.parametrize("where", [None, "example", "logit"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_none_reduction_is_a_drop_in_for_optax(layout, where):
    import optax

    x, labels, soft, _, _, where_ex, where_logit, axis = _data(layout, seed=4, ignore=False)
    if where == "logit":
        wl = _target_included(where_logit, labels, axis)  # (batch..., K)
        wl.reshape(-1, wl.shape[-1])[-1] = False  # one example with every class masked
        m = ref.move_classes_back(wl, x.shape, axis)  # back to the logits' layout
    else:
        m = None if where is None else where_ex
    jm = None if m is None else jnp.asarray(m)
    if where == "logit":
        # optax's soft-label CE needs the labels' mass inside the mask to be well defined
        soft = np.where(m, soft, 0.0)

    def both(x, labels, soft):  # jbce's and optax's, in one compiled program
        return (
            ce_int(x, labels, axis=axis, where=jm, reduction="none"),
            optax.softmax_cross_entropy_with_integer_labels(x, labels, axis=axis, where=jm),
            ce_soft(x, soft, axis=axis, where=jm, reduction="none"),
            optax.softmax_cross_entropy(x, soft, axis=axis, where=jm),
        )

    got_i, want_i, got_s, want_s = jax.jit(both)(
        jnp.asarray(x), jnp.asarray(labels), jnp.asarray(soft)
    )
    ref.assert_close(got_i, np.asarray(want_i), rtol=1e-12, atol=1e-15)
    ref.assert_close(got_s, np.asarray(want_s), rtol=1e-12, atol=1e-15)


def test_optax_positional_order_logits_then_labels():
    import optax

    x, labels, *_ = _data(ignore=False)
    ref.assert_close(
        ce_int(jnp.asarray(x), jnp.asarray(labels), reduction="none"),
        np.asarray(optax.softmax_cross_entropy_with_integer_labels(x, labels)),
        rtol=1e-12,
    )


# ----------------------------------------------------------------------------- gradients


def test_integer_label_ce_gradients_check_numerically_to_second_order():
    x, labels, _, w, cw, where_ex, *_ = _data(seed=5)

    def f(a, c):
        return ce_int(
            a,
            jnp.asarray(labels),
            weights=c,
            class_weights=jnp.asarray(cw),
            label_smoothing=0.1,
            z_loss=1e-2,
            logit_softcap=5.0,
            where=jnp.asarray(where_ex),
        )

    check_grads(jax.jit(f), (jnp.asarray(x), jnp.asarray(w)), order=2, modes=["rev"])


def test_soft_label_ce_gradients_check_numerically_to_second_order():
    x, _, soft, w, _, where_ex, where_logit, _ = _data(seed=6)

    def f(a, b, c):
        return ce_soft(a, b, weights=c, label_smoothing=0.1, where=jnp.asarray(where_ex))

    args = (jnp.asarray(x), jnp.asarray(soft), jnp.asarray(w))
    check_grads(jax.jit(f), args, order=2, modes=["rev"])
    g = lambda a, b: ce_soft(a, b, where=jnp.asarray(where_logit), reduction="sum")
    check_grads(jax.jit(g), args[:2], order=2, modes=["rev"])


@pytest.mark.parametrize("kind", ["int", "soft"])
def test_hessian_equals_reference_reverse_over_reverse(kind):
    x, labels, soft, _, cw, *_ = _data(seed=7)
    x = x[:3]
    if kind == "int":
        kw = dict(
            class_weights=jnp.asarray(cw),
            label_smoothing=0.1,
            z_loss=1e-2,
            logit_softcap=4.0,
            reduction="mean",
        )
        lab = jnp.asarray(labels[:3])
        f = lambda a: ce_int(a, lab, **kw)
        r = lambda a: ref.ref_softmax_cross_entropy_with_integer_labels(a, lab, xp=jnp, **kw)
    else:
        lab = jnp.asarray(soft[:3])
        f = lambda a: ce_soft(a, lab, label_smoothing=0.1, reduction="sum")
        r = lambda a: ref.ref_softmax_cross_entropy(
            a, lab, label_smoothing=0.1, reduction="sum", xp=jnp
        )
    h = jax.jit(jax.jacrev(jax.grad(f)))(jnp.asarray(x))
    hr = jax.jit(jax.jacrev(jax.grad(r)))(jnp.asarray(x))
    ref.assert_close(h, np.asarray(hr), rtol=1e-11, atol=1e-14)


def test_soft_label_gradient_w_r_t_labels_equals_reference():
    x, _, soft, *_ = _data(seed=8)
    g = jax.grad(
        lambda b: ce_soft(jnp.asarray(x), b, label_smoothing=0.1),
    )(jnp.asarray(soft))
    gr = jax.grad(
        lambda b: ref.ref_softmax_cross_entropy(jnp.asarray(x), b, label_smoothing=0.1, xp=jnp)
    )(jnp.asarray(soft))
    ref.assert_close(g, np.asarray(gr), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", ["int", "soft"])
def test_residuals_are_the_logits_and_per_example_values_only(kind):
    n, k = 64, 48
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(n, k)))
    if kind == "int":
        lab = jnp.asarray(rng.integers(0, k, size=n))
        f = lambda a: ce_int(a, lab, label_smoothing=0.1, z_loss=1e-3)
    else:
        lab = jnp.asarray(rng.dirichlet(np.ones(k), size=n))
        f = lambda a: ce_soft(a, lab)
    res = ref.saved_residuals(f, x)
    big = [r for r in res if np.prod(r[0].shape) >= n * k]
    # the logits (the argument) and, for soft labels, the labels; nothing else N x K
    assert len(big) == (1 if kind == "int" else 2), res
    assert any("argument" in r[1] for r in big), res
    small = [r for r in res if np.prod(r[0].shape) < n * k]
    assert all(np.prod(r[0].shape) <= n for r in small), res


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "vag"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["int", "soft"])
def test_compiled_program_keeps_no_logits_sized_temporary(kind, dtype, grad):
    # What XLA allocates, not what JAX saves: a broadcast lse, a probability matrix or an f32
    # copy of bf16 logits shows up here even when the residuals are right (compile only).
    n, k = 256, 4096
    x = jnp.zeros((n, k), dtype)
    if kind == "int":
        lab = jnp.zeros((n,), jnp.int32)
        f = lambda a, b: ce_int(a, b)
    else:
        lab = jnp.zeros((n, k), dtype)
        f = lambda a, b: ce_soft(a, b)
    fn = jax.value_and_grad(f) if grad else f
    temp = jax.jit(fn).lower(x, lab).compile().memory_analysis().temp_size_in_bytes
    assert temp <= 16 * n * 4, temp  # a few per-example vectors at most


@pytest.mark.parametrize("kind", ["int", "soft"])
def test_training_step_writes_the_logits_gradient_in_place(kind):
    # logits = h @ w inside the differentiated function, as in a model's last layer: the
    # backward pass is the logits' last reader, so XLA can give their gradient the same
    # buffer. One logits-sized temp (optax: 2 for integer labels, 3 for soft labels).
    n, d, k = 64, 16, 2048
    h, w = jnp.zeros((n, d), jnp.float32), jnp.zeros((d, k), jnp.float32)
    lab = jnp.zeros((n,), jnp.int32) if kind == "int" else jnp.zeros((n, k), jnp.float32)
    loss = ce_int if kind == "int" else ce_soft
    step = jax.value_and_grad(lambda h, w, y: loss(h @ w, y), argnums=(0, 1))
    temp = jax.jit(step).lower(h, w, lab).compile().memory_analysis().temp_size_in_bytes
    assert temp < 1.25 * n * k * 4, temp / (n * k * 4)


# ----------------------------------------------------------------------------- edge cases


def test_minus_inf_non_target_logits_give_finite_loss_and_exactly_zero_gradient():
    x = np.array([[2.0, -np.inf, 0.5, -np.inf], [-np.inf, 1.0, -np.inf, 3.0]])
    labels = np.array([0, 3])
    options = ({}, {"label_smoothing": 0.2}, {"class_weights": np.array([1.0, 2.0, 0.5, 1.5])})
    soft = np.array([[0.7, 0.0, 0.3, 0.0], [0.0, 0.4, 0.0, 0.6]])
    f = lambda a, kw: ce_int(a, jnp.asarray(labels), reduction="sum", **_j(kw))
    outs = jax.jit(  # one compiled program: every option, then the soft labels
        lambda a: (
            [jax.value_and_grad(f)(a, kw) for kw in options]
            + [jax.value_and_grad(lambda b: ce_soft(b, jnp.asarray(soft), reduction="sum"))(a)]
        )
    )(jnp.asarray(x))
    for kw, (val, g) in zip(options, outs):
        assert np.isfinite(float(val))
        ref.assert_close(
            val, ref.ref_softmax_cross_entropy_with_integer_labels(x, labels, reduction="sum", **kw)
        )
        g = np.asarray(g)
        assert np.all(g[np.isinf(x)] == 0) and np.all(np.isfinite(g))
    val, g = outs[-1]
    ref.assert_close(val, ref.ref_softmax_cross_entropy(x, soft, reduction="sum"))
    g = np.asarray(g)
    assert np.all(g[np.isinf(x)] == 0) and np.all(np.isfinite(g))


@pytest.mark.parametrize("class_weights", [False, True])
def test_all_ignored_batch_has_zero_mean_and_zero_gradient(class_weights):
    x, _, _, _, cw, *_ = _data()
    labels = jnp.full(x.shape[:1], -100)
    kw = {"class_weights": jnp.asarray(cw)} if class_weights else {}
    val, g = jax.value_and_grad(lambda a: ce_int(a, labels, label_smoothing=0.1, **kw))(
        jnp.asarray(x)
    )
    assert float(val) == 0.0
    assert np.all(np.asarray(g) == 0)


def test_all_masked_examples_have_zero_mean_and_zero_gradient():
    x, labels, soft, *_ = _data(ignore=False)
    for where in (np.zeros(x.shape[:1], bool), np.zeros(x.shape, bool)):
        for f in (
            lambda a, m=where: ce_int(a, jnp.asarray(labels), where=jnp.asarray(m)),
            lambda a, m=where: ce_soft(a, jnp.asarray(soft), where=jnp.asarray(m)),
        ):
            val, g = jax.value_and_grad(f)(jnp.asarray(x))
            assert float(val) == 0.0
            assert np.all(np.asarray(g) == 0)


def test_fully_masked_example_under_per_logit_where_has_zero_loss_and_finite_zero_grad():
    x, labels, soft, *_ = _data(ignore=False)
    where = np.ones(x.shape, bool)
    where[2] = False
    g = jax.grad(
        lambda a: ce_int(a, jnp.asarray(labels), where=jnp.asarray(where), reduction="sum")
    )(jnp.asarray(x))
    none = ce_int(jnp.asarray(x), jnp.asarray(labels), where=jnp.asarray(where), reduction="none")
    assert float(none[2]) == 0.0 and np.all(np.asarray(g)[2] == 0)
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("bad", [-1, 5, 7])
def test_out_of_range_label_gives_nan_for_that_example_only(bad):
    x, labels, *_ = _data(ignore=False)
    labels = labels.copy()
    labels[3] = bad
    got = np.asarray(ce_int(jnp.asarray(x), jnp.asarray(labels), reduction="none"))
    assert np.isnan(got[3])
    ok = np.arange(len(labels)) != 3
    ref.assert_close(
        got[ok], ref.ref_softmax_cross_entropy_with_integer_labels(x, labels, reduction="none")[ok]
    )
    assert np.isnan(float(ce_int(jnp.asarray(x), jnp.asarray(labels))))


def test_checkify_reports_out_of_range_labels():
    x, labels, *_ = _data(ignore=True)
    f = checkify.checkify(jax.jit(lambda a, b: ce_int(a, b)), errors=checkify.user_checks)
    err, _ = f(jnp.asarray(x), jnp.asarray(labels))
    assert err.get() is None  # ignore_index is in range
    bad = labels.copy()
    bad[0] = 5
    err, _ = f(jnp.asarray(x), jnp.asarray(bad))
    assert err.get() is not None and "labels" in err.get()


def test_checkify_reports_soft_labels_outside_unit_interval():
    x, _, soft, *_ = _data()
    f = checkify.checkify(lambda a, b: ce_soft(a, b))
    bad = soft.copy()
    bad[0, 0] = -0.5
    err, _ = f(jnp.asarray(x), jnp.asarray(bad))
    assert err.get() is not None and "labels" in err.get()
    err, _ = f(jnp.asarray(x), jnp.asarray(soft))
    assert err.get() is None


ROWS = np.array(
    [[1e4, 0.0, -1e4], [-1e4, 1e4, 0.0], [1e30, -1e30, 0.0], [-1e30, 0.0, 1e30], [3.0, 2.0, 1.0]]
)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_float32_extreme_logits_within_a_few_ulps_of_float64(implementation):
    x32 = ROWS.astype(np.float32)
    ce_int = functools.partial(
        jbce.softmax_cross_entropy_with_integer_labels, implementation=implementation
    )
    ce_soft = functools.partial(jbce.softmax_cross_entropy, implementation=implementation)
    # One compiled program, every target class in turn (the labels are data).
    run = jax.jit(lambda x, lab, soft: (ce_int(x, lab, reduction="none"),
                                        ce_soft(x, soft, reduction="none")))  # fmt: skip
    for target in (0, 1, 2):
        labels = np.full(len(ROWS), target)
        soft = np.eye(3, dtype=np.float32)[labels]
        got, got_s = run(jnp.asarray(x32), jnp.asarray(labels), jnp.asarray(soft))
        assert got.dtype == jnp.float32
        want = ref.ref_softmax_cross_entropy_with_integer_labels(
            x32.astype(np.float64), labels, reduction="none"
        )
        ref.assert_close(got, want, atol=float(np.finfo(np.float32).tiny))
        ref.assert_close(got_s, want, atol=float(np.finfo(np.float32).tiny))


def test_row_pieces_cut_long_rows_into_equal_pieces_xla_gpu_reduces_in_one_kernel():
    from jbce._softmax.stats import GPU_ROW_BOUND, row_pieces

    assert row_pieces(GPU_ROW_BOUND) == 1 and row_pieces(1000) == 1
    assert row_pieces(32768) == 2 and row_pieces(40000) == 4 and row_pieces(128256) == 8
    assert row_pieces(48000) == 3 and row_pieces(50257) == 29  # GPT-2's 50257 = 29 x 1733
    assert row_pieces(2 * 16411) == 1  # 16411 is prime: no divisor fits, left to XLA


@pytest.mark.parametrize("kind", ["int", "soft"])
def test_one_pass_over_rows_cut_into_pieces_matches_float64(kind):
    # K = 40000: four pieces of 10000. One row's last piece is all -inf, another's whole
    # first half; a -inf class carries label weight in a third (an impossible target).
    rng = np.random.default_rng(11)
    n, k = 4, 40000
    x = (rng.normal(size=(n, k)) * 3).astype(np.float32)
    x[0, 30000:] = -np.inf
    x[1, :20000] = -np.inf
    x[2, 5] = 1e4
    if kind == "int":
        lab = np.array([3, 25000, 5, 39999])
        f = lambda a: ce_int(a, jnp.asarray(lab), label_smoothing=0.1, reduction="none",
                             implementation="one_pass")  # fmt: skip
        r = lambda a, xp=np: ref.ref_softmax_cross_entropy_with_integer_labels(
            a, lab, label_smoothing=0.1, reduction="none", xp=xp
        )
    else:
        lab = rng.dirichlet(np.ones(k), size=n).astype(np.float32)
        lab[0, 30000:] = 0.0
        lab[1, :20000] = 0.0
        f = lambda a: ce_soft(a, jnp.asarray(lab), reduction="none", implementation="one_pass")
        r = lambda a, xp=np: ref.ref_softmax_cross_entropy(
            a, xp.asarray(lab, a.dtype), reduction="none", xp=xp
        )
    two = ce_int if kind == "int" else ce_soft
    kw = {"label_smoothing": 0.1} if kind == "int" else {}
    # One compiled program: the one-pass value and gradient, the reference's gradient and the
    # two-pass value.
    got, g, gref, two_pass = jax.jit(
        lambda a: (
            f(a),
            jax.grad(lambda b: jnp.sum(f(b)))(a),
            jax.grad(lambda b: jnp.sum(r(b, jnp)))(a.astype(jnp.float64)),
            two(a, jnp.asarray(lab), reduction="none", implementation="two_pass", **kw),
        )
    )(jnp.asarray(x))
    ref.assert_close(got, r(x.astype(np.float64)), rtol=2e-6)
    gref = np.where(np.isneginf(x), 0.0, np.asarray(gref))
    # float32 sums over 40000 classes: ~1e-5 relative on each probability (~2.5e-5 here)
    ref.assert_close(g, gref, rtol=1e-4, atol=2e-9)
    np.testing.assert_allclose(np.asarray(got), np.asarray(two_pass), rtol=1e-6)


@jax.jit
def _offset_run(x, labels, soft):
    """jbce's value and gradient of both losses and the float64 reference's gradients: one
    compiled program for every offset."""
    x64, soft64 = x.astype(jnp.float64), soft.astype(jnp.float64)
    return (
        jax.value_and_grad(lambda a: ce_int(a, labels))(x),
        jax.value_and_grad(lambda a: ce_soft(a, soft))(x),
        jax.grad(lambda a: ref.ref_softmax_cross_entropy_with_integer_labels(a, labels, xp=jnp))(
            x64
        ),
        jax.grad(lambda a: ref.ref_softmax_cross_entropy(a, soft64, xp=jnp))(x64),
    )


@pytest.mark.parametrize("offset", [0.0, 30.0, 100.0, -60.0, -90.0])
def test_one_pass_log_sum_exp_and_its_fallback_match_float64(offset):
    # The one-pass lse (sum of unshifted exps) serves offsets 0 and 30; at +100 the sums
    # overflow, at -90 every term underflows and at -60 the sums fall below K tiny 2^30:
    # those batches are recomputed with the max-shifted two passes. Same results either way.
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(6, 50)) * 2 + offset).astype(np.float32)
    labels = rng.integers(0, 50, size=6)
    soft = rng.dirichlet(np.ones(50), size=6).astype(np.float32)
    (vi, gi), (vs, gs), gref_i, gref_s = _offset_run(
        jnp.asarray(x), jnp.asarray(labels), jnp.asarray(soft)
    )
    for val, g, gref, r, lab in (
        (vi, gi, gref_i, ref.ref_softmax_cross_entropy_with_integer_labels, labels),
        (vs, gs, gref_s, ref.ref_softmax_cross_entropy, soft.astype(np.float64)),
    ):
        ref.assert_close(val, r(x.astype(np.float64), lab), rtol=2e-6)
        # float32 rounding of lse (~|lse| eps) moves every probability by that much
        ref.assert_close(g, np.asarray(gref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "rows, labels, kw",
    [
        # overflowing rows, an ignored one, z-loss: d(z lse^2)/d lse needs the repaired lse
        ([[205.5, 209.8, 196.4], [207.7, 223.9, 183.1]], [1, -100], {"z_loss": 1e-3}),
        # one class, a row with no class left: excluded from the mean, zero gradient
        ([[-1774.1], [821.8], [-np.inf], [1696.0]], [0, 0, 0, 0], {}),
        ([[-np.inf, 1.0, 2.0], [-np.inf, -np.inf, -np.inf]], [1, 0], {"label_smoothing": 0.1}),
    ],
)
def test_hard_rows_match_float64_value_and_gradient(rows, labels, kw):
    # Overflowing rows with z-loss and rows with no class left: value and gradient against
    # float64. A row with no class left is excluded from the mean, with zero gradient.
    x = np.asarray(rows, np.float32)
    t = np.asarray(labels)
    has = np.isfinite(x).any(axis=-1)
    r = ref.ref_softmax_cross_entropy_with_integer_labels
    sub = jnp.asarray(t[has])
    (v, g), gref = jax.jit(  # one compiled program: jbce's and the reference's derivatives
        lambda a, kept: (
            jax.value_and_grad(lambda b: ce_int(b, jnp.asarray(t), **kw))(a),
            jax.grad(lambda b: r(b, sub, xp=jnp, **kw))(kept),
        )
    )(jnp.asarray(x), jnp.asarray(x[has], jnp.float64))
    ref.assert_close(v, r(x[has].astype(np.float64), t[has], **kw), rtol=1e-6)
    gref = np.where(np.isneginf(x[has]), 0.0, np.asarray(gref))
    np.testing.assert_allclose(np.asarray(g)[has], gref, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(g)[~has] == 0) and np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("kind", ["int", "soft"])
def test_vmapped_value_and_grad_equal_each_members_own_call(kind):
    # One member has an overflowing row and another an all -inf row: every member's value
    # and gradient must equal its own unbatched call.
    rng = np.random.default_rng(21)
    x = np.asarray(rng.normal(size=(3, 4, 6)) * 3, np.float32)
    x[1, 2] += 100.0
    x[2, 0] = -np.inf
    if kind == "int":
        lab = jnp.asarray(rng.integers(0, 6, size=(3, 4)))
        f = lambda a, b: ce_int(a, b, z_loss=1e-3)
    else:
        lab = jnp.asarray(rng.dirichlet(np.ones(6), size=(3, 4)), jnp.float32)
        f = lambda a, b: ce_soft(a, b)
    vag = jax.value_and_grad(f)
    v, g = jax.jit(jax.vmap(vag))(jnp.asarray(x), lab)
    one = jax.jit(vag)  # each member's own call: one compiled program for the three
    for i in range(3):
        vi, gi = one(jnp.asarray(x[i]), lab[i])
        ref.assert_close(v[i], np.asarray(vi), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(g[i]), np.asarray(gi), rtol=1e-6, atol=1e-12)
    # the row with no class left is excluded from the mean, with integer and soft labels alike
    assert np.isfinite(v[2])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_computes_in_float32_and_returns_input_dtype_grads(dtype):
    x, labels, soft, *_ = _data(ignore=True)
    xl = jnp.asarray(x, dtype)
    for f, r in (
        (
            lambda a: ce_int(a, jnp.asarray(labels), label_smoothing=0.1),
            lambda a: ref.ref_softmax_cross_entropy_with_integer_labels(
                a, jnp.asarray(labels), label_smoothing=0.1, xp=jnp
            ),
        ),
        (
            lambda a: ce_soft(a, jnp.asarray(soft, dtype)),
            lambda a: ref.ref_softmax_cross_entropy(
                a, jnp.asarray(jnp.asarray(soft, dtype), jnp.float64), xp=jnp
            ),
        ),
    ):
        xf = jnp.asarray(xl, jnp.float64)
        (val, g), want, gref = jax.jit(
            lambda a, b, f=f, r=r: (jax.value_and_grad(f)(a), r(b), jax.grad(r)(b))
        )(xl, xf)
        assert val.dtype == jnp.float32 and g.dtype == dtype
        ref.assert_close(val, np.asarray(want), rtol=1e-6)
        ref.assert_close(g, np.asarray(gref), rtol=2e-2, atol=2e-3)


def test_empty_batch_and_rank1_logits():
    x = jnp.zeros((0, 4))
    lab = jnp.zeros((0,), jnp.int32)
    assert ce_int(x, lab, reduction="none").shape == (0,)
    assert float(ce_int(x, lab)) == 0.0 and float(ce_int(x, lab, reduction="sum")) == 0.0
    assert float(ce_soft(x, jnp.zeros((0, 4)))) == 0.0
    # a single example: rank-1 logits, rank-0 label
    x1 = np.array([0.3, -1.0, 2.0])
    want = ref.ref_softmax_cross_entropy_with_integer_labels(
        x1[None], np.array([2]), reduction="none"
    )[0]
    got = ce_int(jnp.asarray(x1), jnp.asarray(2), reduction="none")
    assert got.shape == ()
    ref.assert_close(got, want)


def test_vmap_equals_per_row_calls():
    x, labels, soft, w, cw, *_ = _data(layout="torch_nc_d", seed=10, ignore=False)
    f = lambda a, b: ce_int(a, b, axis=0, class_weights=jnp.asarray(cw))
    got = jax.jit(jax.vmap(f))(jnp.asarray(x), jnp.asarray(labels))
    want = [
        ref.ref_softmax_cross_entropy_with_integer_labels(x[i], labels[i], axis=0, class_weights=cw)
        for i in range(x.shape[0])
    ]
    ref.assert_close(got, np.asarray(want))
    gs = jax.jit(jax.vmap(lambda a, b: ce_soft(a, b, axis=0)))(jnp.asarray(x), jnp.asarray(soft))
    ref.assert_close(
        gs,
        np.asarray(
            [ref.ref_softmax_cross_entropy(x[i], soft[i], axis=0) for i in range(x.shape[0])]
        ),
    )


class JitVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*REDUCTIONS)
    def test_integer_label_ce_same_with_and_without_jit(self, reduction):
        x, labels, _, w, cw, where_ex, _, axis = _data("tuple", seed=11)
        f = self.variant(
            lambda a, b, c, d, m: ce_int(
                a,
                b,
                axis=axis,
                weights=c,
                class_weights=d,
                where=m,
                label_smoothing=0.1,
                z_loss=1e-3,
                logit_softcap=5.0,
                reduction=reduction,
            )
        )
        got = f(*map(jnp.asarray, (x, labels, w, cw, where_ex)))
        want = ref.ref_softmax_cross_entropy_with_integer_labels(
            x,
            labels,
            axis=axis,
            weights=w,
            class_weights=cw,
            where=where_ex,
            label_smoothing=0.1,
            z_loss=1e-3,
            logit_softcap=5.0,
            reduction=reduction,
        )
        ref.assert_close(got, want, atol=1e-15)

    @chex.variants(with_jit=True, without_jit=True)
    def test_soft_label_ce_same_with_and_without_jit(self):
        x, _, soft, w, _, _, where_logit, axis = _data("tuple", seed=12)
        f = self.variant(lambda a, b, c, m: ce_soft(a, b, axis=axis, weights=c, where=m))
        got = f(*map(jnp.asarray, (x, soft, w, where_logit)))
        want = ref.ref_softmax_cross_entropy(x, soft, axis=axis, weights=w, where=where_logit)
        ref.assert_close(got, want, atol=1e-15)


# ----------------------------------------------------------------------------- properties


@given(
    batch=hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4),
    k=st.integers(1, 6),
    dtype=st.sampled_from([np.float32, np.float64]),
    smoothing=st.sampled_from([0.0, 0.1]),
    z=st.sampled_from([0.0, 1e-2]),
    use_cw=st.booleans(),
    use_w=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS),
    data=st.data(),
)
@settings(max_examples=12)
def test_property_integer_label_ce_matches_reference(
    batch, k, dtype, smoothing, z, use_cw, use_w, reduction, data
):
    x = data.draw(
        hnp.arrays(
            dtype,
            batch + (k,),
            elements=st.one_of(st.floats(-30, 30, width=32), st.sampled_from([-1e4, 1e4])),
        )
    )
    labels = data.draw(
        hnp.arrays(np.int32, batch, elements=st.sampled_from(list(range(k)) + [-100]))
    )
    arrays = {}
    if use_cw:
        arrays["class_weights"] = data.draw(
            hnp.arrays(dtype, (k,), elements=st.sampled_from([0.5, 1.0, 2.0]))
        )
    if use_w:
        arrays["weights"] = data.draw(
            hnp.arrays(dtype, batch, elements=st.sampled_from([0.0, 1.0, 3.0]))
        )
    got = jax.jit(
        lambda a, b, o: ce_int(a, b, label_smoothing=smoothing, z_loss=z, reduction=reduction, **o)
    )(jnp.asarray(x), jnp.asarray(labels), _j(arrays))
    assert got.dtype == dtype
    want = ref.ref_softmax_cross_entropy_with_integer_labels(
        x, labels, label_smoothing=smoothing, z_loss=z, reduction=reduction, **arrays
    )
    if dtype == np.float64:
        ref.assert_close(got, want, atol=1e-12)
    else:
        # float32: lse - x_t cancels; compare at the scale of the logits
        scale = 1.0 + (np.max(np.abs(x)) if x.size else 0.0)
        ref.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale * max(1, np.size(labels)))
