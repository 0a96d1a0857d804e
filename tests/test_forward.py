"""Forward-mode derivatives (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) of every public loss.

Each case differentiates a loss with respect to every float input it has (logits, labels,
weights and traced hyperparameters) and compares, in float64 on small shapes, against the
plain-``jnp`` reference formula differentiated by JAX: the JVP, ``jacfwd == jacrev``, the
Hessian, and ``check_grads`` to second order in both modes (finite differences). Then
excluded rows (zero tangent whatever their logits) and the residuals of reverse mode (the
inputs and per-row values only: forward mode costs reverse mode nothing). Edge inputs and
the fused losses' second derivatives: the conformance matrix (tests/test_matrix.py).
``linear_softmax_cross_entropy`` (the fused loss) has reverse mode only and is not here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jbce
from tests import reference as ref

pytestmark = pytest.mark.jax_strict(rank_promotion=False)

N, K = 4, 5
RNG = np.random.default_rng(1212)
X = RNG.normal(size=(N, K)) * 1.5
T = RNG.normal(size=(N, K)) * 1.5
Y = RNG.dirichlet(np.ones(K), size=N)
P = RNG.uniform(0.1, 0.9, size=(N, K))  # probabilities (elementwise)
YB = RNG.uniform(0.1, 0.9, size=(N, K))  # soft binary labels
LAB = np.array([1, 0, 4, -100])  # the last one ignored
LAB_ALL = np.array([1, 0, 4, 2])
W = RNG.uniform(0.5, 2.0, size=N)
WB = RNG.uniform(0.5, 2.0, size=(N, K))
CW = np.array([1.0, 2.0, 0.5, 3.0, 1.5])
ROWS = np.array([True, False, True, True])
WHERE_B = RNG.uniform(size=(N, K)) > 0.3


def j(a):
    return jnp.asarray(a)


def f64(v):
    return jnp.asarray(v, jnp.float64)


# --- the cases: (jbce function of the float args, its tests/reference.py twin, the float args) --
def pair(name, argnames, **options):
    """``jbce.<name>`` and ``reference.ref_<name>`` (in jnp) as functions of the float args
    ``argnames`` (passed by keyword), with the same ``options``."""
    loss, twin = getattr(jbce, name), getattr(ref, f"ref_{name}")
    return (
        lambda *a: loss(**dict(zip(argnames, a)), **options),
        lambda *a: twin(**dict(zip(argnames, a)), **options, xp=jnp),
    )


def _cases():
    cases = {}
    rows = {"weights": j(W), "where": j(ROWS)}
    for r in ("none", "sum", "mean"):
        cases[f"sigmoid_bce-{r}"] = (
            *pair("sigmoid_binary_cross_entropy", ("logits", "labels", "pos_weight", "weights"),
                  label_smoothing=0.1, where=j(WHERE_B), reduction=r),
            (X, YB, CW, WB),
        )  # fmt: skip
        cases[f"bce_probs-{r}"] = (
            *pair("binary_cross_entropy", ("probs", "labels"), weights=j(WB),
                  label_smoothing=0.2, where=j(WHERE_B), reduction=r),
            (P, YB),
        )  # fmt: skip
        cases[f"sigmoid_focal-{r}"] = (
            *pair("sigmoid_focal_loss", ("logits", "labels", "gamma"), alpha=0.25,
                  weights=j(WB), where=j(WHERE_B), reduction=r),
            (X, YB, np.float64(1.5)),
        )  # fmt: skip
        cases[f"ce_int-{r}"] = (
            *pair("softmax_cross_entropy_with_integer_labels",
                  ("logits", "class_weights", "label_smoothing", "z_loss", "logit_softcap"),
                  labels=j(LAB), reduction=r, **rows),
            (X, CW, np.float64(0.1), np.float64(1e-2), np.float64(4.0)),
        )  # fmt: skip
        cases[f"ce_soft-{r}"] = (
            *pair("softmax_cross_entropy", ("logits", "labels"), reduction=r, **rows),
            (X, Y),
        )
        cases[f"ce_soft_smoothed-{r}"] = (
            *pair("softmax_cross_entropy", ("logits", "labels"), label_smoothing=0.1, reduction=r),
            (X, Y),
        )
        cases[f"softmax_focal-{r}"] = (
            *pair("softmax_focal_loss", ("logits", "labels", "alpha", "gamma"), reduction=r,
                  **rows),
            (X, Y, CW / 2, np.float64(2.0)),
        )  # fmt: skip
        cases[f"softmax_focal_int-{r}"] = (
            *pair("softmax_focal_loss_with_integer_labels",
                  ("logits", "alpha", "gamma", "class_weights"), labels=j(LAB), reduction=r,
                  **rows),
            (X, CW / 2, np.float64(0.7), CW),
        )  # fmt: skip
        cases[f"poly-{r}"] = (
            *pair("poly_loss_cross_entropy", ("logits", "labels", "epsilon"), where=j(ROWS),
                  reduction=r),
            (X, Y, np.float64(2.0)),
        )  # fmt: skip
        cases[f"nll-{r}"] = (
            *pair("nll_loss", ("log_probs", "class_weights"), labels=j(LAB), reduction=r,
                  **rows),
            (X, CW),
        )  # fmt: skip
        cases[f"cce-{r}"] = (
            *pair("categorical_cross_entropy", ("probs", "labels"), label_smoothing=0.1,
                  reduction=r, **rows),
            (P, Y),
        )  # fmt: skip
    for r in ("none", "sum", "mean", "batchmean"):
        cases[f"kl-{r}"] = (
            *pair("kl_divergence", ("logits", "labels"), reduction=r, **rows),
            (X, Y),
        )
        cases[f"kl_log_labels-{r}"] = (
            *pair("kl_divergence", ("logits", "labels"), log_labels=True, reduction=r),
            (X, np.log(Y)),
        )
        for mode, beta in (("mix", 0.3), ("forward", 0.0), ("reverse", 1.0)):
            cases[f"jsd_{mode}-{r}"] = (
                *pair("jensen_shannon_divergence", ("logits", "teacher_logits", "temperature"),
                      beta=beta, reduction=r, **rows),
                (X, T, np.float64(1.7)),
            )  # fmt: skip
        cases[f"jsd_traced_beta-{r}"] = (
            *pair("jensen_shannon_divergence", ("logits", "teacher_logits", "beta"), reduction=r),
            (X, T, np.float64(0.6)),
        )
    cases["entropy"] = (*pair("entropy", ("probs",)), (P,))
    cases["discriminator"] = (*pair("discriminator_loss", ("real_logits", "fake_logits")), (X, T))
    cases["generator"] = (*pair("generator_loss", ("fake_logits",)), (X,))
    return cases


CASES = _cases()
IDS = sorted(CASES)
# The reductions are the same arithmetic for every loss (checked by the JVPs of all of them);
# the costlier checks take one reduction each: per-example outputs for the Jacobians, the mean
# for the Hessian and the numerical check.
PER_EXAMPLE = [n for n in IDS if n.endswith("-none") or "-" not in n]
MEANS = [n for n in IDS if n.endswith("-mean") or "-" not in n]
# The JVP test takes every reduction of a loss in one compiled program (one per loss).
GROUPS = sorted({n.split("-")[0] for n in IDS})


def _case(name):
    f, r, args = CASES[name]
    return f, r, tuple(f64(a) for a in args)


def _tangents(args, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(f64(rng.normal(size=np.shape(a))) for a in args)


def _close(got, want, rtol=1e-9, atol=1e-11):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


@pytest.mark.parametrize("group", GROUPS)
def test_jvp_matches_the_float64_reference(group):
    # Every reduction of the loss, jbce's and the reference's JVPs, in one compiled program.
    names = [n for n in IDS if n.split("-")[0] == group]
    cases = {n: _case(n) for n in names}
    args = {n: c[2] for n, c in cases.items()}
    tans = {n: _tangents(a) for n, a in args.items()}

    def both(a, t):
        return {n: (jax.jvp(f, a[n], t[n]), jax.jvp(r, a[n], t[n]))
                for n, (f, r, _) in cases.items()}  # fmt: skip

    out = jax.jit(both)(args, tans)
    for n in names:
        (value, tangent), (want_value, want_tangent) = out[n]
        _close(value, want_value)
        _close(tangent, want_tangent)


@pytest.mark.parametrize("name", PER_EXAMPLE)
def test_jacfwd_equals_jacrev_and_the_reference(name):
    f, r, args = _case(name)
    argnums = tuple(range(len(args)))
    fwd, rev, want = jax.jit(
        lambda *a: tuple(jac(fn, argnums=argnums)(*a)
                         for jac, fn in ((jax.jacfwd, f), (jax.jacrev, f), (jax.jacrev, r)))
    )(*args)  # fmt: skip
    _close(fwd, rev, rtol=1e-12, atol=1e-14)
    _close(fwd, want)


@pytest.mark.parametrize("name", MEANS)
def test_hessian_matches_the_reference(name):
    f, r, args = _case(name)
    argnums = tuple(range(len(args)))
    scalar = lambda fn: lambda *a: jnp.sum(fn(*a))  # "none" and entropy: sum the output
    got, want = jax.jit(
        lambda *a: tuple(jax.hessian(scalar(fn), argnums=argnums)(*a) for fn in (f, r))
    )(*args)
    _close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", MEANS)
def test_check_grads_to_second_order_in_both_modes(name):
    f, _, args = _case(name)
    # Jitted: each derivative is one compiled program (eager dispatch costs ~7x the time).
    check_grads(jax.jit(f), args, order=2, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


BAD = [np.nan, np.inf]


@pytest.mark.parametrize(
    "name",
    ["ce_int", "ce_soft", "softmax_focal", "softmax_focal_int", "poly", "kl", "jsd", "cce"],
)
def test_row_excluded_by_where_has_zero_tangent_and_gradient(name):
    where = j(ROWS)
    fns = {
        "ce_int": lambda x: jbce.softmax_cross_entropy_with_integer_labels(
            x, j(LAB_ALL), where=where, z_loss=1e-3
        ),
        "ce_soft": lambda x: jbce.softmax_cross_entropy(x, j(Y), where=where),
        "softmax_focal": lambda x: jbce.softmax_focal_loss(x, j(Y), gamma=0.5, where=where),
        "softmax_focal_int": lambda x: jbce.softmax_focal_loss_with_integer_labels(
            x, j(LAB_ALL), gamma=0.5, where=where
        ),
        "poly": lambda x: jbce.poly_loss_cross_entropy(x, j(Y), where=where),
        "kl": lambda x: jbce.kl_divergence(x, j(Y), where=where),
        "jsd": lambda x: jbce.jensen_shannon_divergence(x, j(T), where=where),
        "cce": lambda p: jbce.categorical_cross_entropy(p, j(Y), where=where),
    }
    f = fns[name]
    clean = f64(P if name == "cce" else X)
    tan = _tangents((clean,))[0]
    # One compiled program for every bad value (row 1, the excluded one, holds it).
    run = jax.jit(
        lambda x, clean: (jax.jvp(f, (x,), (tan,))[1],
                          jax.jvp(f, (clean,), (tan.at[1].set(0.0),))[1], jax.grad(f)(x))
    )  # fmt: skip
    for bad in BAD:
        t_bad, t_clean, g = run(clean.at[1].set(bad), clean)
        np.testing.assert_allclose(float(t_bad), float(t_clean), rtol=1e-12)
        g = np.asarray(g)
        assert np.all(np.isfinite(g)) and np.all(g[1] == 0), (bad, g)


def test_hessian_of_sigmoid_losses_at_zero_logits_is_the_smooth_value():
    # Zero-initialised logits: the formulas' |x| must not turn the curvature at 0 into 0.
    x = jnp.zeros((3,), jnp.float64)
    y = f64([1.0, 0.0, 0.3])
    for f, r in (
        (jbce.sigmoid_binary_cross_entropy, ref.ref_sigmoid_binary_cross_entropy),
        (jbce.sigmoid_focal_loss, ref.ref_sigmoid_focal_loss),
    ):
        got, want = jax.jit(lambda a, f=f, r=r: (
            jax.hessian(lambda a: f(a, y, reduction="sum"))(a),
            jax.hessian(lambda a: r(a, y, reduction="sum", xp=jnp))(a),
        ))(x)  # fmt: skip
        _close(got, want, rtol=1e-12, atol=1e-14)


def test_bf16_tangent_is_computed_in_float32():
    x = jnp.asarray(X, jnp.bfloat16)
    tan = jnp.ones_like(x)
    f = lambda a: jbce.softmax_cross_entropy_with_integer_labels(a, j(LAB_ALL))
    value, tangent = jax.jit(lambda a, t: jax.jvp(f, (a,), (t,)))(x, tan)
    assert value.dtype == tangent.dtype == jnp.float32
    # shifting every logit of a row leaves the loss unchanged: the tangent is 0
    np.testing.assert_allclose(float(tangent), 0.0, atol=1e-6)


def test_traced_hyperparameters_under_jit_have_forward_derivatives():
    f = lambda e, z: jbce.softmax_cross_entropy_with_integer_labels(
        f64(X), j(LAB_ALL), label_smoothing=e, z_loss=z
    )
    r = lambda e, z: ref.ref_softmax_cross_entropy_with_integer_labels(
        f64(X), j(LAB_ALL), label_smoothing=e, z_loss=z, xp=jnp
    )
    args = (f64(0.2), f64(1e-3))
    got, want = jax.jit(
        lambda *a: (jax.jacfwd(f, argnums=(0, 1))(*a), jax.jacfwd(r, argnums=(0, 1))(*a))
    )(*args)
    _close(got, want)


# --- reverse mode keeps its lean residuals -----------------------------------------------------
RESIDUAL_CASES = {
    "ce_int": lambda x: jbce.softmax_cross_entropy_with_integer_labels(
        x, j(LAB), label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0
    ),
    "ce_int_class_weights": lambda x: jbce.softmax_cross_entropy_with_integer_labels(
        x, j(LAB), class_weights=j(CW), where=j(ROWS)
    ),
    "ce_soft": lambda x: jbce.softmax_cross_entropy(x, j(Y), label_smoothing=0.1),
    "softmax_focal": lambda x: jbce.softmax_focal_loss(x, j(Y), alpha=0.25),
    "softmax_focal_int": lambda x: jbce.softmax_focal_loss_with_integer_labels(x, j(LAB)),
    "poly": lambda x: jbce.poly_loss_cross_entropy(x, j(Y)),
    "kl": lambda x: jbce.kl_divergence(x, j(Y)),
    "jsd": lambda x: jbce.jensen_shannon_divergence(x, j(T)),
    "sigmoid_bce": lambda x: jbce.sigmoid_binary_cross_entropy(x, j(YB), where=j(WHERE_B)),
    "sigmoid_focal": lambda x: jbce.sigmoid_focal_loss(x, j(YB)),
}


CORES = ("autodiff.py", "_stats.py", "_softmax_xla.py", "_softmax_terms.py", "_binary.py")


@pytest.mark.parametrize("name", sorted(RESIDUAL_CASES))
def test_reverse_mode_saves_the_inputs_and_per_row_values_only(name):
    x = f64(X)
    res = ref.saved_residuals(RESIDUAL_CASES[name], x)
    big = [(r, d) for r, d in res if np.prod(r.shape) >= N * K]
    assert any("argument" in d for _, d in big), res  # the logits themselves
    # nothing N x K computed by a core (a softmax, a sigmoid, log-probabilities)
    # (the binary losses' inputs broadcast to the logits' shape, _like_logits, are inputs)
    computed = [(r, d) for r, d in big if any(c in d for c in CORES) and "_like_logits" not in d]
    assert not computed, computed
    assert all(np.prod(r.shape) <= N for r, _ in res if np.prod(r.shape) < N * K), res


FUSED = {
    "linear_softmax_cross_entropy": lambda h, w, y: jbce.linear_softmax_cross_entropy(h, w, y),
    "linear_log_probs": lambda h, w, y: jnp.sum(jbce.linear_log_probs(h, w, y)[0]),
    "linear_distillation_loss": lambda h, w, y: jbce.linear_distillation_loss(h, w, h, w[:, ::-1]),
}


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_losses_have_no_forward_over_reverse(name):
    # Custom VJPs: JAX refuses forward mode with its own TypeError (jbce does not rewrite
    # JAX's messages), forward over reverse (jax.hessian) included; the distillation loss's
    # derivative rules raise jbce's error when differentiated again, in either mode. The
    # first-order JVP's TypeError, the gradient and jacrev(grad) against the float64
    # reference are the matrix's <loss>-materialised-{jvp,grad,hessian}-float32-random-*.
    h = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    w = jnp.linspace(-2.0, 2.0, 15).reshape(3, 5)
    y = jnp.array([0, 1, 2, 4])
    f = lambda a: FUSED[name](a, w, y)
    if name == "linear_distillation_loss":  # its backward pass is not differentiable
        for second in (jax.hessian(f), jax.jacrev(jax.grad(f))):
            with pytest.raises(TypeError, match=rf"jbce\.{name} has first-order derivatives"):
                jax.jit(second)(h)
        return
    with pytest.raises(TypeError, match="forward-mode"):  # forward over reverse
        jax.jit(jax.hessian(f))(h)
