"""The promises users rely on at the edges of the inputs, one test per promise.

Every expected value is computed independently of jbce (float64 numpy, optax, or the
formulas of ``tests/reference.py``). Sections:

1. bf16 logits computed under ``jit`` (``h @ W + b`` fused into the loss);
2. traced hyperparameters;
3. range checks of Python-float hyperparameters;
4. NaN in, NaN out; excluded rows contribute nothing, whatever they hold;
5. narrow integer label dtypes (uint8, int8, int16);
6. soft-capping with ``-inf`` classes and label smoothing;
7. large logit magnitudes;
8. strict dtype promotion, numpy-integer axes, empty class / hidden axes;
9. Python lists and tuples as inputs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbce
from tests.reference import (
    assert_close,
    ref_entropy,
    ref_kl_divergence,
    ref_sigmoid_binary_cross_entropy,
    ref_softmax_cross_entropy,
    ref_softmax_cross_entropy_with_integer_labels,
)

F32, BF16 = jnp.float32, jnp.bfloat16
CE = jbce.softmax_cross_entropy_with_integer_labels
SOFT_CE = jbce.softmax_cross_entropy
LINEAR_CE = jbce.linear_softmax_cross_entropy
REDUCTIONS = ("mean", "sum", "none")
# Strict dtype promotion; rank promotion allowed for the fused loss's `h @ W + b`.
STRICT_DTYPES = pytest.mark.jax_strict(rank_promotion=False)
BF16_EPS = 2.0**-8  # one bf16 ulp relative to the value (8 significand bits)


def f32(x):
    return jnp.asarray(x, F32)


def np64(x):
    return np.asarray(jnp.asarray(x).astype(F32), np.float64)


def kl(labels, logits, **kw):
    """``jbce.kl_divergence`` of the target ``labels`` and ``logits``, per example."""
    return jbce.kl_divergence(logits, labels, **{"reduction": "none", **kw})


def ce_value_and_grad(logits, labels, *, ignore_index=-100):
    """float64 per-example loss ``lse - x_y`` of the float32-rounded logits and
    d(sum loss)/dlogits (softmax - onehot), from :mod:`tests.reference`."""
    x = jnp.asarray(np64(logits))
    lab = jnp.asarray(np.asarray(labels).astype(np.int64))
    loss, grad = _ref_value_and_grad(x, lab, ignore_index=ignore_index)
    return np.asarray(loss), np.asarray(grad)


@functools.partial(jax.jit, static_argnames="ignore_index")
def _ref_value_and_grad(x, lab, *, ignore_index):
    """The reference's per-example loss and d(sum loss)/dx (compiled, not op by op)."""
    loss, vjp = jax.vjp(
        lambda a: ref_softmax_cross_entropy_with_integer_labels(
            a, lab, ignore_index=ignore_index, reduction="none", xp=jnp
        ),
        x,
    )
    (grad,) = vjp(jnp.ones_like(loss))
    return loss, grad


# =========================================================================================
# 1. bf16 logits computed inside jit
# =========================================================================================


def _bf16_problem():
    """h [256, 64], W [64, 10], b [10] in bf16; labels the argmax (confident: margins ~5)."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(256, 64)), BF16)
    w = jnp.asarray(rng.normal(size=(64, 10)) * 1.5, BF16)
    b = jnp.asarray(rng.normal(size=(10,)), BF16)
    y = jnp.asarray(np.argmax(np64(h @ w + b), axis=-1), jnp.int32)
    return h, w, b, y


def _bf16_losses(kind):
    """(jbce per-example loss, optax per-example loss) of (logits, integer labels y)."""
    if kind == "integer":
        return (
            lambda lg, y: CE(lg, y, reduction="none").astype(F32),
            lambda lg, y: optax.softmax_cross_entropy_with_integer_labels(lg, y).astype(F32),
        )
    return (
        lambda lg, y: SOFT_CE(lg, jax.nn.one_hot(y, 10, dtype=BF16), reduction="none").astype(F32),
        lambda lg, y: optax.softmax_cross_entropy(lg, jax.nn.one_hot(y, 10, dtype=BF16)).astype(
            F32
        ),
    )


BF16_KINDS = ("integer", "soft")


@functools.cache
def _bf16_runs(kind, library):
    """(per-example loss, dL/dh) of ``library``'s loss of ``h @ W + b``, jitted and eager.

    Jitted: one ``jax.jit`` around ``h @ W + b`` and the loss. Eager, as op-by-op
    execution runs it: the logits are rounded to bf16, the loss sees them as given, and
    dL/dh = dL/dlogits @ W^T in bf16; the loss itself runs behind a jit boundary (the same
    values as op by op, far faster).
    """
    h, w, b, y = _bf16_problem()
    loss = _bf16_losses(kind)[0 if library == "jbce" else 1]
    with_aux = lambda f: jax.value_and_grad(lambda a: (jnp.sum(f(a)), f(a)), has_aux=True)
    (_, jit_loss), jit_dh = jax.jit(with_aux(lambda h: loss(h @ w + b, y)))(h)
    (_, eager_loss), g_logits = jax.jit(with_aux(lambda lg: loss(lg, y)))(h @ w + b)
    return np64(jit_loss), np64(jit_dh), np64(eager_loss), np64(g_logits @ w.T)


@STRICT_DTYPES
@pytest.mark.parametrize("kind", BF16_KINDS)
def test_bf16_loss_under_jit_is_never_negative(kind):
    jit_loss, _, _, _ = _bf16_runs(kind, "jbce")
    assert float(np.min(jit_loss)) >= 0.0


@STRICT_DTYPES
@pytest.mark.parametrize("kind", BF16_KINDS)
def test_bf16_mean_under_jit_matches_eager_to_bf16_rounding(kind):
    h, w, b, y = _bf16_problem()
    jit_loss, _, eager_loss, _ = _bf16_runs(kind, "jbce")
    jitted, eager = float(np.mean(jit_loss)), float(np.mean(eager_loss))
    # First-order effect of moving every logit by one bf16 ulp: sum_c |dL/dx_c| |x_c| eps.
    logits = h @ w + b
    _, g = ce_value_and_grad(logits, y)
    bound = float(np.mean(np.sum(np.abs(g) * np.abs(np64(logits)), axis=-1))) * BF16_EPS
    assert abs(jitted - eager) <= bound, (jitted, eager, bound)


@STRICT_DTYPES
@pytest.mark.parametrize("kind", BF16_KINDS)
def test_bf16_logit_gradient_rows_sum_to_zero_under_jit(kind):
    """dL_n/dlogits_n = softmax - onehot sums to 0 over the classes (to bf16 rounding of
    each entry). dL_n/db is exactly dL_n/dlogits_n, taken inside the jit with h @ W + b."""
    h, w, b, y = _bf16_problem()
    loss, _ = _bf16_losses(kind)
    jac = jax.jit(jax.jacrev(lambda b: loss(h @ w + b, y)))(b)  # [256, 10]
    jac = np64(jac)
    row_sum = np.abs(jac.sum(axis=-1))
    bound = BF16_EPS * np.abs(jac).sum(axis=-1) + 1e-5
    assert np.all(row_sum <= bound), float(np.max(row_sum - bound))


@STRICT_DTYPES
@pytest.mark.parametrize("kind", BF16_KINDS)
def test_bf16_hidden_gradient_under_jit_is_as_close_to_eager_as_optax(kind):
    def gap(library):
        _, jit_dh, _, eager_dh = _bf16_runs(kind, library)
        return float(np.max(np.abs(jit_dh - eager_dh))), float(np.max(np.abs(eager_dh)))

    jbce_gap, scale = gap("jbce")
    optax_gap, _ = gap("optax")
    assert jbce_gap <= 2 * optax_gap + 4 * BF16_EPS * scale, (jbce_gap, optax_gap, scale)


def _digits_split():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(x))
    tr, te = perm[:1347], perm[1347:]
    return x[tr], y[tr].astype(np.int32), x[te], y[te].astype(np.int32)


def _train_bf16_mlp(loss_fn, data, *, steps=300, lr=2e-2, batch=128):
    """A 64-128-10 MLP computed in bf16 (float32 master weights), minibatch Adam.

    Returns (final train loss, train accuracy, test accuracy), the loss by optax in float32.
    """
    x_tr, y_tr, x_te, y_te = (jnp.asarray(a) for a in data)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {
        "w1": jax.random.normal(k1, (64, 128), F32) / 8,
        "b1": jnp.zeros((128,), F32),
        "w2": jax.random.normal(k2, (128, 10), F32) / math.sqrt(128),
        "b2": jnp.zeros((10,), F32),
    }

    def logits_fn(p, x):
        p = jax.tree.map(lambda a: a.astype(BF16), p)
        hid = jax.nn.relu(x.astype(BF16) @ p["w1"] + p["b1"])
        return hid @ p["w2"] + p["b2"]

    tx = optax.adam(lr)

    def train_step(state, batch_idx):
        params, opt_state = state
        xb, yb = x_tr[batch_idx], y_tr[batch_idx]
        objective = lambda p: jnp.mean(loss_fn(logits_fn(p, xb), yb).astype(F32))
        grads = jax.grad(objective)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    idx = np.random.default_rng(1).integers(0, x_tr.shape[0], size=(steps, batch))
    run = jax.jit(lambda state, idx: jax.lax.scan(train_step, state, idx)[0])
    params, _ = run((params, tx.init(params)), jnp.asarray(idx, jnp.int32))
    lg = logits_fn(params, x_tr).astype(F32)
    train_loss = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(lg, y_tr)))
    train_acc = float(jnp.mean(jnp.argmax(lg, -1) == y_tr))
    test_acc = float(jnp.mean(jnp.argmax(logits_fn(params, x_te), -1) == y_te))
    return train_loss, train_acc, test_acc


def test_bf16_mlp_training_with_jbce_tracks_optax():
    data = _digits_split()
    ours = _train_bf16_mlp(lambda lg, y: CE(lg, y, reduction="none"), data)
    theirs = _train_bf16_mlp(optax.softmax_cross_entropy_with_integer_labels, data)
    (loss_j, acc_j, test_j), (loss_o, acc_o, test_o) = ours, theirs
    assert loss_j <= 2 * loss_o + 5e-3, (ours, theirs)
    assert abs(acc_j - acc_o) <= 0.01, (ours, theirs)
    assert abs(test_j - test_o) <= 0.03, (ours, theirs)


# =========================================================================================
# 2. Traced hyperparameters
# =========================================================================================


def np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _binary_inputs():
    rng = np.random.default_rng(1)
    x = f32(rng.normal(size=(4, 5)) * 3)
    y = f32(rng.uniform(size=(4, 5)) > 0.5)
    p = f32(rng.uniform(0.02, 0.98, size=(4, 5)))
    return x, y, p


def _softmax_inputs():
    rng = np.random.default_rng(2)
    x = f32(rng.normal(size=(6, 7)) * 3)
    y = jnp.asarray(rng.integers(0, 7, size=6), jnp.int32)
    soft = f32(np_softmax(rng.normal(size=(6, 7))))
    return x, y, soft


def _linear_inputs():
    rng = np.random.default_rng(3)
    h = f32(rng.normal(size=(6, 4)))
    w = f32(rng.normal(size=(4, 7)) * 2)
    y = jnp.asarray(rng.integers(0, 7, size=6), jnp.int32)
    return h, w, y


def _call(entry, **kw):
    """Calls one entry point on its fixed small inputs with the options ``kw``."""
    if entry in ("sigmoid_focal_loss", "sigmoid_binary_cross_entropy", "binary_cross_entropy"):
        x, y, p = _binary_inputs()
        return getattr(jbce, entry)(p if entry == "binary_cross_entropy" else x, y, **kw)
    if entry == "softmax_cross_entropy":
        x, _, soft = _softmax_inputs()
        return SOFT_CE(x, soft, **kw)
    if entry == "softmax_cross_entropy_with_integer_labels":
        x, y, _ = _softmax_inputs()
        return CE(x, y, **kw)
    if entry == "linear_softmax_cross_entropy":
        h, w, y = _linear_inputs()
        return LINEAR_CE(h, w, y, **kw)
    raise AssertionError(entry)


def ramp(lo, hi, n):
    """n float32 values from lo to hi (float32: strict promotion against float32 inputs)."""
    return np.linspace(lo, hi, n, dtype=np.float32)


TRACED = [
    ("sigmoid_focal_loss", "gamma", 1.5),
    ("sigmoid_focal_loss", "alpha", 0.25),
    ("softmax_cross_entropy_with_integer_labels", "z_loss", 1e-2),
    ("softmax_cross_entropy_with_integer_labels", "logit_softcap", 5.0),
    (
        "softmax_cross_entropy_with_integer_labels",
        "class_weights",
        ramp(0.5, 2, 7),
    ),
    (
        "softmax_cross_entropy_with_integer_labels",
        "weights",
        ramp(0.5, 2, 6),
    ),
    ("softmax_cross_entropy", "label_smoothing", 0.1),
    ("softmax_cross_entropy", "weights", ramp(0.5, 2, 6)),
    ("linear_softmax_cross_entropy", "z_loss", 1e-2),
    ("linear_softmax_cross_entropy", "logit_softcap", 5.0),
    ("linear_softmax_cross_entropy", "weights", ramp(0.5, 2, 6)),
    ("sigmoid_binary_cross_entropy", "pos_weight", ramp(0.5, 3, 5)),
    ("sigmoid_binary_cross_entropy", "weights", ramp(0.5, 2, 5)),
    ("sigmoid_binary_cross_entropy", "label_smoothing", 0.1),
    ("binary_cross_entropy", "weights", ramp(0.5, 2, 5)),
    ("binary_cross_entropy", "label_smoothing", 0.1),
]


# The label smoothing of the integer-label and the fused CE, traced under jit: the matrix's
# {softmax_cross_entropy_with_integer_labels,linear_softmax_cross_entropy}-label_smoothing-
# {traced,python} cases (each against the float64 reference).
TRACED_ENTRIES = sorted({e for e, _, _ in TRACED})


@pytest.mark.jax_strict
@pytest.mark.parametrize("entry", TRACED_ENTRIES)
def test_traced_hyperparameter_gives_the_untraced_value(entry):
    # Every traced hyperparameter of the entry point in one compiled program.
    cases = [(name, value) for e, name, value in TRACED if e == entry]
    both = lambda vs: [
        (
            _call(entry, reduction="none", **{name: v}),
            _call(entry, reduction="none", **{name: value}),
        )
        for (name, value), v in zip(cases, vs)
    ]
    out = jax.jit(both)([f32(value) for _, value in cases])
    for traced, expected in out:
        assert_close(traced, np.asarray(expected, np.float64), rtol=1e-5, atol=1e-6)


# =========================================================================================
# 3. Range checks of Python-float hyperparameters
# =========================================================================================


@pytest.mark.parametrize("cap", (0.0, -2.0))
def test_vocabulary_parallel_loss_rejects_non_positive_softcap(cap):
    x, y, _ = _softmax_inputs()
    shards = jnp.stack([x[:, :3], x[:, 3:6]])  # two shards of 3 classes (classes 0..5)
    y = jnp.minimum(y, 5)
    f = jax.vmap(lambda s: CE(s, y, axis_name="v", logit_softcap=cap), axis_name="v")
    with pytest.raises(ValueError, match="logit_softcap"):
        f(shards)


# =========================================================================================
# 4. NaN in, NaN out; excluded rows contribute nothing
# =========================================================================================

NAN = float("nan")


def _with_nan(x, index):
    return jnp.asarray(x).at[index].set(NAN)


# (entry, builder returning the loss for a given reduction with a NaN in one input)
def _nan_case(entry, size):
    """(loss(x, reduction), x with one NaN, the index of the NaN's entry in ``"none"``)."""
    rng = np.random.default_rng(4)
    if entry in ("softmax_cross_entropy_with_integer_labels", "softmax_cross_entropy"):
        n, k = size
        x = _with_nan(f32(rng.normal(size=(n, k))), (1, 2))
        y = jnp.asarray(rng.integers(0, k, size=n), jnp.int32).at[1].set(0)  # not the NaN class
        if entry == "softmax_cross_entropy":
            soft = f32(np.eye(k)[np.asarray(y)])
            return (lambda x, r: SOFT_CE(x, soft, reduction=r)), x, 1
        return (lambda x, r: CE(x, y, reduction=r)), x, 1
    y = f32(rng.uniform(size=(3, 4)) > 0.5)
    if entry == "binary_cross_entropy":
        p = _with_nan(f32(rng.uniform(0.1, 0.9, size=(3, 4))), (1, 2))
        return (lambda p, r: jbce.binary_cross_entropy(p, y, reduction=r)), p, (1, 2)
    x = _with_nan(f32(rng.normal(size=(3, 4))), (1, 2))
    fn = getattr(jbce, entry)
    return (lambda x, r: fn(x, y, reduction=r)), x, (1, 2)


# The large-input path (small inputs of every loss: the conformance matrix's "nan" edge).
NAN_ENTRIES = [
    ("softmax_cross_entropy_with_integer_labels", (64, 1024)),
    ("softmax_cross_entropy", (64, 1024)),
]


def _all_reductions(f, *args):
    """{reduction: f(*args, reduction)} for every reduction, in one compiled call."""
    return jax.jit(lambda *a: {r: f(*a, r) for r in REDUCTIONS})(*args)


@pytest.mark.jax_strict
@pytest.mark.parametrize(("entry", "size"), NAN_ENTRIES, ids=[f"{e}-{s}" for e, s in NAN_ENTRIES])
def test_nan_input_gives_nan_loss_for_every_reduction(entry, size):
    f, x, bad = _nan_case(entry, size)
    losses = {r: np.asarray(v) for r, v in _all_reductions(f, x).items()}
    assert np.isnan(losses["mean"]) and np.isnan(losses["sum"]), losses
    assert np.isnan(losses["none"][bad]), losses
    assert np.sum(np.isnan(losses["none"])) == 1, losses


@pytest.mark.jax_strict
def test_nan_logit_gives_nan_integer_label_loss_with_logits_shaped_where():
    rng = np.random.default_rng(5)
    x = _with_nan(f32(rng.normal(size=(4, 5))), (1, 2))
    y = jnp.asarray([0, 0, 3, 4], jnp.int32)
    all_true = jnp.ones((4, 5), bool)
    partial = all_true.at[1, 4].set(False).at[3, 1].set(False)  # the NaN's class 2 is kept
    # One compiled program for both masks (the mask is data).
    run = jax.jit(lambda x, where: {r: CE(x, y, where=where, reduction=r) for r in REDUCTIONS})
    for where in (partial, all_true):
        losses = run(x, where)
        assert np.isnan(np.asarray(losses["mean"])) and np.isnan(np.asarray(losses["sum"])), losses
        assert np.isnan(np.asarray(losses["none"])[1]), losses


@pytest.mark.jax_strict
def test_nan_hidden_gives_nan_linear_loss():
    # Small inputs: the matrix's linear_softmax_cross_entropy-*-value-float32-nan-* cases.
    n, d, v = 64, 16, 1024
    rng = np.random.default_rng(6)
    h = _with_nan(f32(rng.normal(size=(n, d))), (1, 0))
    w = f32(rng.normal(size=(d, v)))
    y = jnp.asarray(rng.integers(0, v, size=n), jnp.int32)
    losses = _all_reductions(lambda h, r: LINEAR_CE(h, w, y, reduction=r), h)
    losses = {r: np.asarray(v) for r, v in losses.items()}
    assert np.isnan(losses["mean"]) and np.isnan(losses["sum"]), losses
    assert np.isnan(losses["none"][1]) and np.sum(np.isnan(losses["none"])) == 1, losses


def test_nan_logit_gives_nan_vocabulary_parallel_loss():
    """Four vocabulary shards simulated with ``jax.vmap(..., axis_name=...)``; the NaN in the
    target's shard, then in another (one compiled program for both)."""
    rng = np.random.default_rng(7)
    shards, n, k_local = 4, 6, 5
    clean = f32(rng.normal(size=(shards, n, k_local)))
    y = jnp.asarray(rng.integers(0, shards * k_local, size=n), jnp.int32)
    y = y.at[2].set(1)  # row 2's target is class 1, held by shard 0

    def per_shard(s, reduction):
        return CE(s, y, axis_name="v", reduction=reduction)

    run = jax.jit(
        lambda x: {r: jax.vmap(lambda s, r=r: per_shard(s, r), axis_name="v")(x)
                   for r in REDUCTIONS}
    )  # fmt: skip
    for shard in (0, 3):
        losses = {r: np.asarray(v) for r, v in run(clean.at[shard, 2, 3].set(NAN)).items()}
        assert np.all(np.isnan(losses["mean"])) and np.all(np.isnan(losses["sum"])), losses
        assert np.all(np.isnan(losses["none"][:, 2])), losses
        assert not np.any(np.isnan(np.delete(losses["none"], 2, axis=1))), losses


BAD_VALUES = (NAN, float("inf"))


def _excluded_row_problem(entry, bad):
    """(loss(x, reduction), clean x, x with ``bad`` all over the excluded row/element)."""
    rng = np.random.default_rng(8)
    if entry in ("softmax_cross_entropy_with_integer_labels", "softmax_cross_entropy"):
        x = f32(rng.normal(size=(4, 5)))
        where = jnp.asarray([True, False, True, True])
        y = jnp.asarray([0, 2, 4, 1], jnp.int32)
        x_bad = x.at[1].set(bad)
        if entry == "softmax_cross_entropy":
            soft = f32(np_softmax(rng.normal(size=(4, 5))))
            f = lambda x, r: SOFT_CE(x, soft, where=where, reduction=r)
        else:
            f = lambda x, r: CE(x, y, where=where, reduction=r)
        return f, x, x_bad, ~np.asarray(where)[:, None] & np.ones((4, 5), bool)
    x = f32(rng.normal(size=(3, 4)))
    y = f32(rng.uniform(size=(3, 4)) > 0.5)
    where = jnp.ones((3, 4), bool).at[1, 2].set(False)
    excluded = ~np.asarray(where)
    if entry == "binary_cross_entropy":
        p = f32(rng.uniform(0.1, 0.9, size=(3, 4)))
        f = lambda p, r: jbce.binary_cross_entropy(p, y, where=where, reduction=r)
        return f, p, p.at[1, 2].set(bad), excluded
    fn = getattr(jbce, entry)
    f = lambda x, r: fn(x, y, where=where, reduction=r)
    return f, x, x.at[1, 2].set(bad), excluded


EXCLUDABLE = (
    "softmax_cross_entropy_with_integer_labels",
    "softmax_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "binary_cross_entropy",
)


@pytest.mark.jax_strict
@pytest.mark.parametrize("entry", EXCLUDABLE)
def test_row_excluded_by_where_contributes_nothing_to_value_or_gradient(entry):
    f, x, _, excluded = _excluded_row_problem(entry, NAN)

    def values_and_grads(x):
        out = {}
        for r in REDUCTIONS:
            total = lambda x, r=r: (jnp.sum(f(x, r)), f(x, r))
            out[r] = jax.value_and_grad(total, has_aux=True)(x)
        return out

    run = jax.jit(values_and_grads)  # one compiled program for the clean and bad inputs
    clean = run(x)
    for bad in BAD_VALUES:
        _, _, x_bad, _ = _excluded_row_problem(entry, bad)
        got = run(x_bad)
        for r in REDUCTIONS:
            _check_excluded(got[r], clean[r], excluded, (bad, r))


def _check_excluded(got, clean, excluded, what):
    (value, loss), grad = got
    (clean_value, clean_loss), clean_grad = clean
    assert_close(loss, np.asarray(clean_loss, np.float64), rtol=1e-6)
    assert_close(value, float(clean_value), rtol=1e-6)
    grad, clean_grad = np.asarray(grad), np.asarray(clean_grad)
    assert np.all(np.isfinite(grad)), (what, grad)
    assert np.all(grad[excluded] == 0), (what, grad)
    np.testing.assert_allclose(grad[~excluded], clean_grad[~excluded], rtol=1e-6, atol=1e-7)


def test_row_excluded_by_where_matches_optax_gradient():
    """optax's ``where`` is the model: NaN logits in a masked-out row leave no trace."""
    rng = np.random.default_rng(9)
    x = f32(rng.normal(size=(4, 5))).at[1].set(NAN)
    y = jnp.asarray([0, 2, 4, 1], jnp.int32)
    where = jnp.asarray([True, False, True, True])
    ours = jax.jit(jax.grad(lambda x: CE(x, y, where=where, reduction="sum")))(x)
    theirs = jax.grad(
        lambda x: jnp.sum(
            optax.softmax_cross_entropy(x, jax.nn.one_hot(y, 5, dtype=F32), where=where[:, None])
        )
    )(x)
    assert np.all(np.isfinite(np.asarray(theirs)))  # the oracle itself
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-6, atol=1e-7)


# =========================================================================================
# 5. Narrow integer label dtypes
# =========================================================================================

NARROW = [
    # (label dtype, number of classes, labels that must count as written)
    ("uint8", 200, (156, 3, 199, 0)),  # 156 is -100 wrapped to uint8
    ("int8", 200, (127, 3, 100, 0)),
    ("int16", 40_000, (32_767, 3, 20_000, 0)),
    ("uint8", 300, (255, 44, 12, 0)),  # classes 256.. must not alias label - 256
]
NARROW_IDS = [f"{d}-K{k}" for d, k, _ in NARROW]


def _narrow_problem(dtype, k, labels):
    rng = np.random.default_rng(10)
    x = f32(rng.normal(size=(len(labels), k)) * 2)
    return x, jnp.asarray(np.asarray(labels, dtype))


@pytest.mark.jax_strict
@pytest.mark.parametrize(("dtype", "k", "labels"), NARROW, ids=NARROW_IDS)
def test_narrow_integer_labels_count_as_written(dtype, k, labels):
    x, y = _narrow_problem(dtype, k, labels)
    ref_loss, ref_grad = ce_value_and_grad(x, np.asarray(labels), ignore_index=-(10**9))
    per_example, mean, grad = jax.jit(
        lambda x: (
            CE(x, y, reduction="none"),
            CE(x, y),
            jax.grad(lambda x: CE(x, y, reduction="sum"))(x),
        )
    )(x)
    assert_close(per_example, ref_loss, rtol=1e-5, atol=1e-6)
    assert_close(mean, ref_loss.mean(), rtol=1e-5)
    assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.jax_strict
@pytest.mark.parametrize(("dtype", "k", "labels"), NARROW, ids=NARROW_IDS)
def test_narrow_integer_labels_count_as_written_in_linear_loss(dtype, k, labels):
    rng = np.random.default_rng(11)
    h = f32(rng.normal(size=(len(labels), 3)))
    w = f32(rng.normal(size=(3, k)))
    y = jnp.asarray(np.asarray(labels, dtype))
    logits = np64(h) @ np64(w)
    ref_loss, ref_grad = ce_value_and_grad(logits, np.asarray(labels), ignore_index=-(10**9))
    per_example, mean, grad_h = jax.jit(
        lambda h: (
            LINEAR_CE(h, w, y, reduction="none"),
            LINEAR_CE(h, w, y),
            jax.grad(lambda h: LINEAR_CE(h, w, y, reduction="sum"))(h),
        )
    )(h)
    assert_close(per_example, ref_loss, rtol=1e-4, atol=1e-5)
    assert_close(mean, ref_loss.mean(), rtol=1e-4)
    assert_close(grad_h, ref_grad @ np64(w).T, rtol=1e-4, atol=1e-5)


@pytest.mark.jax_strict
def test_uint8_labels_still_honour_an_explicit_ignore_index():
    x, y = _narrow_problem("uint8", 200, (156, 3, 199, 0))
    ref_loss, _ = ce_value_and_grad(x, np.asarray([156, 3, 199, 0]), ignore_index=3)
    per_example, mean = jax.jit(
        lambda x: (CE(x, y, ignore_index=3, reduction="none"), CE(x, y, ignore_index=3))
    )(x)
    assert_close(per_example, ref_loss, rtol=1e-5, atol=1e-6)
    assert_close(mean, ref_loss.sum() / 3, rtol=1e-5)


# =========================================================================================
# 6. Soft-capping with -inf classes and label smoothing
# =========================================================================================


def _softcap_problem():
    rng = np.random.default_rng(12)
    h = f32(rng.normal(size=(6, 4)))
    w = f32(rng.normal(size=(4, 7)) * 3)
    b = f32(rng.normal(size=(7,))).at[5].set(-jnp.inf)
    y = jnp.asarray([0, 1, 2, 3, 4, 6], jnp.int32)
    return h, w, b, y


SOFTCAP_OPTIONS = [
    dict(logit_softcap=3.0),
    dict(logit_softcap=3.0, label_smoothing=0.2),
    dict(logit_softcap=3.0, label_smoothing=0.2, z_loss=1e-2),
]


@STRICT_DTYPES
@pytest.mark.parametrize("options", SOFTCAP_OPTIONS, ids=lambda o: "-".join(o))
def test_softcap_with_minus_inf_class_materialised_equals_fused(options):
    """A -inf bias entry (vocabulary padding) under soft-capping: h @ W + b through the
    materialised loss and the fused loss are one loss, in value and gradient."""
    h, w, b, y = _softcap_problem()

    def values_and_grads(h):
        out = {}
        for r in REDUCTIONS:
            for name, loss in (
                ("materialised", lambda h, r=r: CE(h @ w + b, y, reduction=r, **options)),
                ("fused", lambda h, r=r: LINEAR_CE(h, w, y, bias=b, reduction=r, **options)),
            ):
                f = lambda h, loss=loss: (jnp.sum(loss(h)), loss(h))
                out[r, name] = jax.value_and_grad(f, has_aux=True)(h)
        return out

    out = jax.jit(values_and_grads)(h)
    for r in REDUCTIONS:
        (_, materialised), g_m = out[r, "materialised"]
        (_, fused), g_f = out[r, "fused"]
        assert np.all(np.isfinite(np.asarray(materialised))), r
        assert_close(materialised, np.asarray(fused, np.float64), rtol=1e-5, atol=1e-6)
        assert_close(g_m, np.asarray(g_f, np.float64), rtol=1e-5, atol=1e-6)


@STRICT_DTYPES
@pytest.mark.parametrize("with_minus_inf", (False, True))
@pytest.mark.parametrize("options", SOFTCAP_OPTIONS, ids=lambda o: "-".join(o))
def test_all_true_logits_shaped_where_does_not_change_softcapped_loss(options, with_minus_inf):
    h, w, b, y = _softcap_problem()
    b = b if with_minus_inf else jnp.nan_to_num(b, neginf=0.0)
    logits = h @ w + b
    everywhere = jnp.ones(logits.shape, bool)

    def losses(h, logits):
        return (
            CE(logits, y, reduction="none", **options),
            CE(logits, y, where=everywhere, reduction="none", **options),
            LINEAR_CE(h, w, y, bias=b, reduction="none", **options),
        )

    plain, masked, fused = jax.jit(losses)(h, logits)
    assert_close(masked, np.asarray(plain, np.float64), rtol=1e-6, atol=1e-7)
    # and both are the fused loss's value (the -inf bias entry included)
    assert_close(masked, np.asarray(fused, np.float64), rtol=1e-5, atol=1e-6)


@STRICT_DTYPES
def test_softcap_of_finite_logits_follows_the_formula():
    """Without -inf classes there is no ambiguity: cap tanh(x / cap), then the loss."""
    h, w, b, y = _softcap_problem()
    b = jnp.nan_to_num(b, neginf=0.0)
    logits = h @ w + b
    losses = jax.jit(
        lambda h, logits: [
            (CE(logits, y, **o), LINEAR_CE(h, w, y, bias=b, **o)) for o in SOFTCAP_OPTIONS
        ]
    )(h, logits)
    for options, (materialised, fused) in zip(SOFTCAP_OPTIONS, losses):
        expected = ref_softmax_cross_entropy_with_integer_labels(np64(logits), y, **options)
        assert_close(materialised, expected, rtol=1e-5)
        assert_close(fused, expected, rtol=1e-5)


# =========================================================================================
# 7. Large magnitudes
# =========================================================================================


@pytest.mark.jax_strict
@pytest.mark.parametrize("dtype", (F32, jnp.float64))
def test_row_of_huge_negative_logits_is_uniform(dtype):
    x = jnp.full((2, 3), -1e30, dtype)
    y = jnp.asarray([0, 2], jnp.int32)
    onehot = jnp.asarray(np.eye(3)[[0, 2]], dtype)
    log3 = np.full((2,), math.log(3))
    loss_int, loss_soft, grad_int, grad_soft = jax.jit(  # one compiled program
        lambda x: (
            CE(x, y, reduction="none"),
            SOFT_CE(x, onehot, reduction="none"),
            jax.grad(lambda x: CE(x, y, reduction="sum"))(x),
            jax.grad(lambda x: SOFT_CE(x, onehot, reduction="sum"))(x),
        )
    )(x)
    assert_close(loss_int, log3, rtol=1e-6)
    assert_close(loss_soft, log3, rtol=1e-6)
    expected = np.full((2, 3), 1 / 3) - np.eye(3)[[0, 2]]
    assert_close(grad_int, expected, rtol=1e-6, atol=1e-7)
    assert_close(grad_soft, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.jax_strict
@pytest.mark.parametrize("kind", ("integer", "soft"))
@pytest.mark.parametrize("shape", ((8, 10), (64, 1024)), ids=("small", "large"))
def test_offset_logits_get_probabilities_as_accurate_as_optax(shape, kind):
    rng = np.random.default_rng(13)
    x = f32(rng.normal(size=shape) * 2 + 1e4)
    y = jnp.asarray(rng.integers(0, shape[1], size=shape[0]), jnp.int32)
    onehot = jax.nn.one_hot(y, shape[1], dtype=F32)
    _, ref_grad = ce_value_and_grad(x, y)  # from the float32 inputs, in float64
    ref_p = ref_grad + np64(onehot)
    if kind == "integer":
        ours = jax.jit(jax.grad(lambda x: CE(x, y, reduction="sum")))(x)
    else:
        ours = jax.jit(jax.grad(lambda x: SOFT_CE(x, onehot, reduction="sum")))(x)
    theirs = jax.jit(jax.grad(lambda x: jnp.sum(optax.softmax_cross_entropy(x, onehot))))(x)

    def rel_err(g):
        p = np64(g) + np64(onehot)
        big = ref_p > 1e-3
        return float(np.max(np.abs(p - ref_p)[big] / ref_p[big]))

    # optax's own float32 error here is a few 1e-6 (its softmax is exp(x - m - lse) too);
    # jbce's must be no worse (a rounded lse reused for the probabilities gives ~1e-3).
    assert rel_err(ours) <= max(rel_err(theirs), 1e-6), (rel_err(ours), rel_err(theirs))


# =========================================================================================
# 8. Strict promotion, numpy-integer axes, empty axes
# =========================================================================================


def test_kl_divergence_mixed_float_dtypes_under_strict_promotion():
    rng = np.random.default_rng(14)
    labels = f32(np_softmax(rng.normal(size=(3, 4))))
    logits = jnp.asarray(rng.normal(size=(3, 4)), jnp.float64)
    with jax.numpy_dtype_promotion("strict"):
        kl_values = kl(labels, logits)
    assert_close(
        kl_values, ref_kl_divergence(np.asarray(logits), np64(labels), reduction="none"), rtol=1e-5
    )


def _axis_entries():
    rng = np.random.default_rng(15)
    x = f32(rng.normal(size=(3, 4)))
    y = jnp.asarray([0, 3, 1], jnp.int32)
    p = f32(np_softmax(rng.normal(size=(3, 4))))
    return {
        "softmax_cross_entropy_with_integer_labels": lambda ax: CE(x, y, axis=ax),
        "softmax_cross_entropy": lambda ax: SOFT_CE(x, p, axis=ax),
        "entropy": lambda ax: jbce.entropy(p, axis=ax),
        "kl_divergence": lambda ax: kl(p, x, axis=ax),
    }


@pytest.mark.jax_strict
@pytest.mark.parametrize("entry", list(_axis_entries()))
@pytest.mark.parametrize("axis", (np.int64(-1), np.int32(1)), ids=repr)
def test_numpy_integer_axis_works_like_python_int(entry, axis):
    f = _axis_entries()[entry]
    assert_close(f(axis), np.asarray(f(int(axis)), np.float64), rtol=1e-7)


@pytest.mark.parametrize(
    "entry", ("softmax_cross_entropy_with_integer_labels", "softmax_cross_entropy")
)
def test_zero_classes_raise_value_error_naming_logits(entry):
    x = jnp.zeros((3, 0), F32)
    with pytest.raises(ValueError, match="logits"):
        if entry == "softmax_cross_entropy":
            SOFT_CE(x, jnp.zeros((3, 0), F32))
        else:
            CE(x, jnp.zeros((3,), jnp.int32))


@pytest.mark.parametrize("with_bias", (False, True))
def test_linear_loss_with_zero_hidden_size_is_value_error_or_defined(with_bias):
    h = jnp.zeros((3, 0), F32)
    w = jnp.zeros((0, 5), F32)
    b = f32([0.0, 1.0, 2.0, 3.0, 4.0]) if with_bias else None
    y = jnp.asarray([0, 1, 4], jnp.int32)
    try:
        loss = LINEAR_CE(h, w, y, bias=b)
    except ValueError:
        return
    # No error: then it must be the materialised loss of the logits 0 + bias.
    logits = np.zeros((3, 5)) + (0.0 if b is None else np64(b))
    assert_close(loss, ref_softmax_cross_entropy_with_integer_labels(logits, y), rtol=1e-6)


# =========================================================================================
# 9. Python lists and tuples as inputs
# =========================================================================================

LOGITS = [[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]]
PROBS = [[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]
BINARY = [[0.3, 0.9, 0.1], [0.6, 0.2, 0.7]]
HARD = [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]


def _list_case(entry, convert):
    """(jbce result, float64 reference) with inputs passed through ``convert``."""
    c = convert
    if entry == "softmax_cross_entropy_with_integer_labels":
        return CE(c(LOGITS), c([0, 2])), ref_softmax_cross_entropy_with_integer_labels(
            np.asarray(LOGITS), np.asarray([0, 2])
        )
    if entry == "softmax_cross_entropy":
        return SOFT_CE(c(LOGITS), c(PROBS)), ref_softmax_cross_entropy(LOGITS, PROBS)
    if entry == "sigmoid_binary_cross_entropy":
        return jbce.sigmoid_binary_cross_entropy(c(LOGITS), c(HARD)), (
            ref_sigmoid_binary_cross_entropy(LOGITS, HARD)
        )
    if entry == "binary_cross_entropy":
        p, y = np.asarray(BINARY), np.asarray(HARD)
        ref = -np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))
        return jbce.binary_cross_entropy(c(BINARY), c(HARD)), ref
    if entry == "sigmoid_focal_loss":
        x, y = np.asarray(LOGITS), np.asarray(HARD)
        s = 1 / (1 + np.exp(-x))
        pt = s * y + (1 - s) * (1 - y)
        return jbce.sigmoid_focal_loss(c(LOGITS), c(HARD)), np.mean(-np.log(pt) * (1 - pt) ** 2)
    if entry == "entropy":
        return jbce.entropy(c(PROBS)), ref_entropy(PROBS)
    if entry == "kl_divergence":
        return kl(c(PROBS), c(LOGITS)), ref_kl_divergence(LOGITS, PROBS, reduction="none")
    if entry == "linear_softmax_cross_entropy":
        hid, w = [[1.0, -1.0], [0.5, 2.0]], [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]
        ref = ref_softmax_cross_entropy_with_integer_labels(
            np.asarray(hid) @ np.asarray(w), np.asarray([2, 0])
        )
        return LINEAR_CE(c(hid), c(w), c([2, 0])), ref
    if entry == "discriminator_loss":
        r, f = [1.0, -2.0], [0.5, 3.0]
        sp = lambda v: np.logaddexp(0, v)
        return jbce.discriminator_loss(c(r), c(f)), np.mean(sp(-np.asarray(r))) + np.mean(
            sp(np.asarray(f))
        )
    if entry == "generator_loss":
        f = [0.5, 3.0]
        return jbce.generator_loss(c(f)), np.mean(np.logaddexp(0, -np.asarray(f)))
    raise AssertionError(entry)


LIST_ENTRIES = (
    "softmax_cross_entropy_with_integer_labels",
    "softmax_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "binary_cross_entropy",
    "sigmoid_focal_loss",
    "entropy",
    "kl_divergence",
    "linear_softmax_cross_entropy",
    "discriminator_loss",
    "generator_loss",
)


def _to_tuple(v):
    return tuple(_to_tuple(e) for e in v) if isinstance(v, list) else v


SEQUENCE_CASES = [(e, "list") for e in LIST_ENTRIES] + [
    ("softmax_cross_entropy_with_integer_labels", "tuple"),
    ("sigmoid_binary_cross_entropy", "tuple"),
]


@pytest.mark.parametrize(("entry", "container"), SEQUENCE_CASES)
def test_python_sequences_are_accepted_like_arrays(entry, container):
    convert = (lambda v: v) if container == "list" else _to_tuple
    got, ref = _list_case(entry, convert)
    as_array, _ = _list_case(entry, jnp.asarray)
    assert_close(got, np.asarray(as_array, np.float64), rtol=1e-12)
    assert_close(got, np.asarray(ref, np.float64), rtol=1e-6)
