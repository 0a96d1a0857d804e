"""Fused per-token log-probabilities and entropies against the materialised softmax.

The reference is ``jax.nn.log_softmax((hidden @ weight + bias) / T)`` (its label entry, and
``-sum(p log p)``) in float64, and an independent numpy computation; the fused op must agree
in value and in the gradients w.r.t. hidden, weight, bias and temperature for every tile
shape and odd size. Float64 unless a test says otherwise (conftest turns x64 on).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jbce
from tests import reference
from tests.test_linear import assert_tree_close

pytestmark = pytest.mark.jax_strict

F64 = jnp.float64
LP = jbce.linear_log_probs


def make(n, d, v, *, dtype=F64, seed=0, bias=True):
    """(hidden, weight, bias, labels), drawn by NumPy: jax.random's eager ops compile for
    every new shape (about 1 CPU-s per call here)."""
    r = np.random.default_rng(seed)
    h = jnp.asarray(r.normal(size=(n, d)), dtype)
    w = jnp.asarray(r.normal(size=(d, v)) * 1.5, dtype)
    b = jnp.asarray(r.normal(size=v), dtype) if bias else None
    return h, w, b, jnp.asarray(r.integers(0, v, size=n), jnp.int32)


def materialised(h, w, b, y, temperature=1.0):
    """(log p_y, entropy) of the materialised logits, by jax.nn.log_softmax."""
    x = h @ w if b is None else h @ w + b[None, :]
    ls = jax.nn.log_softmax(x / temperature)
    lp = jnp.take_along_axis(ls, y[:, None], axis=-1)[:, 0]
    p = jnp.exp(ls)
    ent = -jnp.sum(p * jnp.where(p == 0, 0, ls), axis=-1)  # (a -inf class: 0, also in grad)
    return lp, ent


def objective(op, y, n):
    """A scalar mixing both outputs with unequal per-token coefficients (as PPO does)."""
    a = np.linspace(-1.0, 2.0, n)
    c = np.cos(np.arange(n))

    def f(h, w, b, t):
        lp, ent = op(h, w, b, y, t)
        return jnp.sum(lp * jnp.asarray(a, lp.dtype)) + jnp.sum(ent * jnp.asarray(c, ent.dtype))

    return f


@functools.cache
def fused_op(chunk_size=None):
    return lambda h, w, b, y, t: LP(h, w, y, bias=b, temperature=t, chunk_size=chunk_size)


def vag(f, h, w, b, t, argnums=(0, 1, 2)):
    return jax.jit(jax.value_and_grad(f, argnums))(h, w, b, t)


# One tile; 5-column vocabulary chunks (the last overlapping); token chunks of 1 too;
# one-column chunks. Temperatures (traced: one compile per chunking) below, at and above 1.
# (Tokens and classes both ragged are the matrix's linear_log_probs-tiled_t3_v5-{value,grad}-
# float32-*-t1; in float64 with the temperature's gradient, by finite differences,
# test_check_grads_reverse_mode_including_temperature's (4, 3) tiles.)
CASES = [(None, 0.7), (5, 1.0), (5, 2.5), ((1, 5), 1.3), ((37, 1), 0.5)]


@functools.cache
def outputs_and_gradients(op):
    """jit((h, w, b, y, t) -> (op's outputs, the objective's value and 4 gradients)): one
    compile per op, shared by the temperatures (traced) of the cases."""

    def f(h, w, b, y, t):
        g = jax.value_and_grad(objective(op, y, y.shape[0]), (0, 1, 2, 3))(h, w, b, t)
        return op(h, w, b, y, t), g

    return jax.jit(f)


@pytest.mark.parametrize("chunk_size,temperature", CASES, ids=str)
def test_values_and_gradients_match_materialised_float64(chunk_size, temperature):
    # N=37 and V=23 are no multiple of the chunks: the last chunks overlap their predecessors.
    h, w, b, y = make(37, 6, 23)
    t = jnp.asarray(temperature, F64)
    got_out, got = outputs_and_gradients(fused_op(chunk_size))(h, w, b, y, t)
    want_out, want = outputs_and_gradients(materialised)(h, w, b, y, t)
    assert_tree_close(got_out, want_out, 1e-12)
    assert_tree_close(got, want, 1e-11)


# The tests below reuse the compiled functions of the cases above (same shapes, a traced
# temperature) where they only need other input values.


def test_matches_independent_numpy_reference():
    h, w, b, y = make(37, 6, 23)
    x = (np.asarray(h) @ np.asarray(w) + np.asarray(b)) / 1.7
    lse = np.log(np.sum(np.exp(x), -1))
    want_lp = x[np.arange(37), np.asarray(y)] - lse
    p = np.exp(x - lse[:, None])
    want_h = -np.sum(p * np.log(p), -1)
    (got_lp, got_h), _ = outputs_and_gradients(fused_op(5))(h, w, b, y, jnp.asarray(1.7, F64))
    reference.assert_close(got_lp, want_lp, rtol=1e-12)
    reference.assert_close(got_h, want_h, rtol=1e-12)


def test_check_grads_reverse_mode_including_temperature():
    # jax.test_util.check_grads(order=1, modes=["rev"])'s comparison (a central difference of
    # the objective along random directions against the reverse-mode gradient's projection,
    # atol = rtol = 1e-6) through the compiled function of the (1, 5)-tile case: no compile.
    h, w, b, y = make(37, 6, 23)
    f = outputs_and_gradients(fused_op((1, 5)))
    args = (h, w, b, jnp.asarray(0.8, F64))
    _, (_, grads) = f(*args[:3], y, args[3])
    rng = np.random.default_rng(0)
    eps = 1e-4
    for _ in range(3):
        v = [jnp.asarray(rng.normal(size=np.shape(a)), F64) for a in args]
        plus, minus = ([a + s * eps * t for a, t in zip(args, v, strict=True)] for s in (1, -1))
        numerical = (f(*plus[:3], y, plus[3])[1][0] - f(*minus[:3], y, minus[3])[1][0]) / (2 * eps)
        analytic = sum(jnp.vdot(g, t) for g, t in zip(grads, v, strict=True))
        np.testing.assert_allclose(float(numerical), float(analytic), rtol=1e-6, atol=1e-6)


def test_without_bias_and_with_leading_batch_dims():
    h, w, _, y = make(12, 4, 9, bias=False)
    ref = objective(lambda h, w, b, y, t: materialised(h, w, None, y), y, 12)

    def f(h, w):  # the objective of the flattened outputs, and the outputs shaped [3, 4]
        out = LP(h.reshape(3, 4, 4), w, y.reshape(3, 4), chunk_size=(5, 4))
        flat = [o.reshape(12) for o in out]
        return objective(lambda *_: flat, y, 12)(h, w, None, 1.0), out

    @jax.jit
    def everything(h, w):
        (val, got), grads = jax.value_and_grad(f, (0, 1), has_aux=True)(h, w)
        ref_g = jax.value_and_grad(ref, (0, 1))(h, w, None, 1.0)
        return got, materialised(h, w, None, y), (val, grads), ref_g

    got, want, got_g, want_g = everything(h, w)
    assert [g.shape for g in got] == [(3, 4), (3, 4)]
    assert_tree_close([g.reshape(12) for g in got], want, 1e-12)
    assert_tree_close(got_g, want_g, 1e-12)


def test_minus_inf_bias_classes_have_no_probability_entropy_or_gradient():
    # Vocabulary padding: classes with a -inf bias leave the softmax.
    h, w, b, y = make(8, 4, 10)
    pad = jnp.array([2, 7, 9], jnp.int32)
    b = b.at[pad].set(-jnp.inf)
    y = jnp.where(jnp.isin(y, pad), 0, y)
    f = objective(fused_op(3), y, 8)
    ref = objective(materialised, y, 8)

    @jax.jit
    def everything(h, w, b):  # temperature 1.0: a Python number, the path without T
        vag = functools.partial(jax.value_and_grad, argnums=(0, 1, 2))
        outs = LP(h, w, y, bias=b, chunk_size=3), materialised(h, w, b, y)
        return outs, vag(f)(h, w, b, 1.0), vag(ref)(h, w, b, 1.0)

    ((lp, ent), want), (v1, (gh, gw, gb)), (v2, (rh, rw, rb)) = everything(h, w, b)
    assert np.all(np.isfinite(np.asarray(ent))) and np.all(np.isfinite(np.asarray(lp)))
    assert_tree_close((lp, ent), want, 1e-12)
    assert_tree_close((v1, gh, gw), (v2, rh, rw), 1e-12)
    fin = np.isfinite(np.asarray(b))
    assert_tree_close(gb[fin], rb[fin], 1e-12)
    assert not np.any(np.asarray(gb)[~fin]) and not np.any(np.asarray(gw)[:, ~fin])


def test_label_on_a_minus_inf_class_has_log_prob_minus_inf_and_finite_gradient():
    h, w, b, y = make(4, 3, 6)
    b = b.at[1].set(-jnp.inf)
    y = y.at[2].set(1)

    # d log p_y / d x = onehot - p stays finite; the other tokens are unaffected.
    def f(h):  # (the other tokens' summed log-probabilities, the outputs)
        out = LP(h, w, y, bias=b, chunk_size=4)
        return jnp.sum(jnp.where(y == 1, 0.0, out[0])), out

    g, (lp, ent) = jax.jit(jax.grad(f, has_aux=True))(h)
    assert np.isneginf(np.asarray(lp)[2]) and np.all(np.isfinite(np.asarray(ent)))
    assert np.all(np.isfinite(np.asarray(g)))


def test_token_without_any_class_gets_minus_inf_and_zero_entropy():
    h, w, b, y = make(3, 2, 4)
    b = jnp.full_like(b, -jnp.inf)

    def f(h):  # (the summed entropies, the outputs)
        out = LP(h, w, y, bias=b, chunk_size=3)
        return jnp.sum(out[1]), out

    g, (lp, ent) = jax.jit(jax.grad(f, has_aux=True))(h)
    assert np.all(np.isneginf(np.asarray(lp))) and not np.any(np.asarray(ent))
    assert not np.any(np.asarray(g))


def test_nan_hidden_gives_nan_for_that_token_only():
    h, w, b, y = make(6, 3, 7)
    h = h.at[2, 1].set(jnp.nan)
    mask = jnp.arange(6) != 2

    @jax.jit
    def everything(h):  # the outputs; one forward pass, two cotangents:
        out, vjp = jax.vjp(lambda h, w: LP(h, w, y, bias=b, chunk_size=(4, 3)), h, w)
        m = jnp.where(mask, 1.0, 0.0)
        gh, _ = vjp((m, m))  # of sum(where(mask, lp + ent, 0)) w.r.t. hidden
        _, gw = vjp((jnp.zeros(6), jnp.ones(6)))  # of sum(ent) w.r.t. the weight
        return out, gh, gw

    (lp, ent), gh, gw = everything(h)
    for out in (np.asarray(lp), np.asarray(ent)):
        assert np.isnan(out[2]) and np.all(np.isfinite(np.delete(out, 2)))
    # Masked out, the token's own gradient is exactly 0 and the others' are unaffected.
    assert not np.any(np.asarray(gh)[2])
    assert_tree_close(gh, everything(h.at[2].set(0.0))[1], 1e-12)
    # Used, the NaN reaches the weight's gradient: NaN in, NaN out.
    assert np.any(np.isnan(np.asarray(gw)))


def test_huge_logits_keep_full_precision():
    # Logits offset by 1e4: the shift keeps the rounding at the scale of |x - m|.
    h, w, b, y = make(37, 6, 23)
    t = jnp.asarray(1.0, F64)
    got, _ = outputs_and_gradients(fused_op(5))(h, 3 * w, b + 1e4, y, t)
    want, _ = outputs_and_gradients(materialised)(h, 3 * w, b + 1e4, y, t)
    assert_tree_close(got, want, 1e-11)


def test_out_of_range_labels_give_nan_log_prob_and_are_reported_under_checkify():
    h, w, b, y = make(4, 3, 5)
    y = y.at[1].set(5).at[3].set(-100)
    f = checkify.checkify(jax.jit(lambda h, y: LP(h, w, y, bias=b)), errors=checkify.user_checks)
    err, (lp, ent) = f(h, y)
    assert np.all(np.isnan(np.asarray(lp)[[1, 3]])) and np.all(np.isfinite(np.asarray(lp)[[0, 2]]))
    assert np.all(np.isfinite(np.asarray(ent)))  # the entropy does not depend on the label
    with pytest.raises(checkify.JaxRuntimeError, match=r"labels must lie in \[0, 5\)"):
        err.throw()
    err, _ = f(h, jnp.zeros_like(y))
    err.throw()  # valid labels: no error


def test_traced_temperature_under_jit_matches_python_number():
    h, w, b, y = make(7, 3, 9)
    f = jax.jit(lambda t: LP(h, w, y, bias=b, temperature=t, chunk_size=4))
    f = checkify.checkify(f, errors=checkify.user_checks)  # (one compile, outputs and error)
    temperatures = (0.3, 1.0, 4.0)
    python = jax.jit(lambda: [LP(h, w, y, bias=b, temperature=t) for t in temperatures])()
    for t, want in zip(temperatures, python, strict=True):
        err, got = f(jnp.asarray(t, F64))
        err.throw()  # a valid temperature: no error
        assert_tree_close(got, want, 1e-13)
    # A traced temperature <= 0 is reported under checkify.
    err, _ = f(jnp.asarray(0.0, F64))
    with pytest.raises(checkify.JaxRuntimeError, match="temperature must be > 0"):
        err.throw()


def test_vocabulary_parallel_under_vmap_matches_unsharded():
    shards, n, d, v = 3, 7, 4, 12
    h, w, b, y = make(n, d, v)
    b = b.at[5].set(-jnp.inf)
    y = jnp.where(y == 5, 0, y)
    t = jnp.asarray(0.9, F64)
    # (-1e30 for the reference: d(-inf / T)/dT is NaN there, though its cotangent is 0.)
    b_ref = jnp.where(jnp.isfinite(b), b, -1e30)
    ref = outputs_and_gradients(materialised)  # one compile, called with both biases
    want, _ = ref(h, w, b, y, t)
    _, (want_v, (gh, gw, gb, gt)) = ref(h, w, b_ref, y, t)

    def sharded(h, w_local, b_local, t):
        return LP(h, w_local, y, bias=b_local, temperature=t, chunk_size=3, axis_name="v")

    w_sh = jnp.moveaxis(w.reshape(d, shards, v // shards), 1, 0)
    b_sh = b.reshape(shards, v // shards)

    def f(*a):  # (the objective, the outputs)
        out = sharded(*a)
        return objective(lambda *_: out, y, n)(*a), out

    vag = jax.value_and_grad(f, (0, 1, 2, 3), has_aux=True)
    in_axes = (None, 0, 0, None)
    (val, outs), (dh, dw, db, dt) = jax.jit(jax.vmap(vag, in_axes, axis_name="v"))(h, w_sh, b_sh, t)
    assert_tree_close(outs, [jnp.broadcast_to(o, (shards, n)) for o in want], 1e-12)
    assert_tree_close(val, jnp.full((shards,), want_v), 1e-12)
    assert_tree_close(jnp.sum(dh, axis=0), gh, 1e-12)  # each shard's share of d hidden
    assert_tree_close(jnp.moveaxis(dw, 0, 1).reshape(d, v), gw, 1e-12)
    fin = np.isfinite(np.asarray(b))
    assert_tree_close(db.reshape(v)[fin], gb[fin], 1e-12)
    assert_tree_close(jnp.sum(dt), gt, 1e-12)


def test_backward_saves_inputs_and_per_token_vectors_only():
    n, d, v = 16, 4, 40
    h, w, b, y = make(n, d, v)
    f = objective(fused_op(8), y, n)
    ref = objective(materialised, y, n)
    t = jnp.asarray(0.7, F64)
    res = reference.saved_residuals(f, h, w, b, t)
    shapes = [aval.shape for aval, _ in res]
    assert (n, v) in [aval.shape for aval, _ in reference.saved_residuals(ref, h, w, b, t)]
    allowed = {(n, d), (d, v), (v,), (n,), ()}  # the inputs, per-token vectors, scalars
    assert set(shapes) <= allowed, shapes
    # Of the fused op's own: its three statistics per token (the rest are the objective's
    # and the output assembly's per-token vectors).
    own = [aval.shape for aval, why in res if "custom_vjp" in why]
    assert own == [(n,)] * 3, res


@pytest.mark.no_x64
def test_float32_within_1e_5_of_float64():
    h, w, b, y = make(64, 16, 300, dtype=jnp.float32)
    t = jnp.asarray(0.8, jnp.float32)
    got_out, got = outputs_and_gradients(fused_op(128))(h, w, b, y, t)
    assert got_out[0].dtype == jnp.float32 and [g.dtype for g in got[1]] == [jnp.float32] * 4
    with jax.enable_x64(True):
        h, w, b, t = (a.astype(F64) for a in (h, w, b, t))
        want_out, want = outputs_and_gradients(materialised)(h, w, b, y, t)
        assert_tree_close(got_out, want_out, 1e-5)
        assert_tree_close(got, want, 1e-5)


@pytest.mark.no_x64
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs_within_1e_2_of_float64(dtype):
    h, w, b, y = make(64, 16, 300, dtype=dtype)
    f = objective(fused_op(128), y, 64)
    val, grads = vag(f, h, w, b, 1.5)
    assert val.dtype == jnp.float32 and [g.dtype for g in grads] == [jnp.dtype(dtype)] * 3
    with jax.enable_x64(True):
        args = [a.astype(F64) for a in (h, w, b)]
        want = _half_precision_reference()(*args, y)
        assert_tree_close((val, grads), want, 1e-2)


@functools.cache
def _half_precision_reference():
    """The float64 reference of the half-precision test (compiled once for both dtypes)."""
    return jax.jit(lambda h, w, b, y: vag(objective(materialised, y, y.shape[0]), h, w, b, 1.5))


@pytest.mark.no_x64
def test_compiled_temp_memory_is_far_below_the_logits():
    n, d, v = 1024, 32, 8192
    spec = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def f(h, w, y):
        lp, ent = LP(h, w, y, chunk_size=256)
        return jnp.mean(lp) + jnp.mean(ent)

    c = jax.jit(jax.value_and_grad(f, (0, 1))).lower(*spec).compile()
    assert c.memory_analysis().temp_size_in_bytes < n * v * 4 / 8


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"temperature": jnp.ones((2,))}, "temperature must be a scalar"),
        ({"weight": jnp.zeros((5, 9))}, r"weight must have shape \(4, V\)"),
        ({"labels": jnp.zeros((3,), jnp.int32)}, r"labels must have shape \(6,\)"),
        ({"labels": jnp.zeros((6,))}, "labels must be integer"),
        ({"hidden": jnp.zeros((6, 4), jnp.int32)}, "hidden must be a floating-point array"),
        ({"bias": jnp.zeros((8,))}, r"bias must have shape \(9,\)"),
        ({"chunk_size": 0}, "chunk_size must be a positive int"),
        ({"chunk_size": (2, 3, 4)}, "chunk_size must be a positive int"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    args = {"hidden": jnp.zeros((6, 4)), "weight": jnp.zeros((4, 9)),
            "labels": jnp.zeros((6,), jnp.int32)}  # fmt: skip
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises((ValueError, TypeError), match=match):
        LP(args["hidden"], args["weight"], args["labels"], **kwargs)


def test_options_are_keyword_only():
    h, w, b, y = make(2, 2, 3)
    with pytest.raises(TypeError):
        LP(h, w, y, b)
