"""Fused linear distillation loss against the materialised jbce.jensen_shannon_divergence.

The reference is ``jbce.jensen_shannon_divergence(hidden @ weight + bias, teacher_hidden @
teacher_weight + teacher_bias, ...)`` (itself checked against float64 oracles in
tests/test_family.py); the fused loss must agree with it, value and gradients w.r.t. all
six arrays (and beta, temperature), for every option, tile shape and odd size. Float64
unless a test says otherwise (conftest turns x64 on).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jbce
from tests import DEVICE_COUNT_FLAG, reference

pytestmark = pytest.mark.jax_strict

F64 = jnp.float64
ROOT = Path(__file__).resolve().parent.parent
ARGNUMS = (0, 1, 2, 3, 4, 5)  # hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias


def make(n, d, dt, v, *, dtype=F64, seed=0, bias=True):
    """(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias), drawn by NumPy:
    jax.random's eager ops compile for every new shape (about 1.5 CPU-s per call here)."""
    r = np.random.default_rng(seed)
    h = jnp.asarray(r.normal(size=(n, d)), dtype)
    w = jnp.asarray(r.normal(size=(d, v)) * 1.2, dtype)
    ht = jnp.asarray(r.normal(size=(n, dt)), dtype)
    wt = jnp.asarray(r.normal(size=(dt, v)) * 1.5, dtype)
    b = jnp.asarray(r.normal(size=v), dtype) if bias else None
    bt = jnp.asarray(r.normal(size=v), dtype) if bias else None
    return h, w, b, ht, wt, bt


def labels_with(n, ignore=()):
    y = jnp.arange(n, dtype=jnp.int32)
    for i in ignore:
        y = y.at[i].set(-100)
    return y


def fused_and_ref(labels=None, **opts):
    """(fused, materialised) as functions of the six arrays, summed to a scalar."""
    cs = opts.pop("chunk_size", None)
    weights = opts.get("weights")
    rows = None if labels is None else labels != -100

    def fused(h, w, b, ht, wt, bt):
        out = jbce.linear_distillation_loss(
            h, w, ht, wt, bias=b, teacher_bias=bt, labels=labels, chunk_size=cs, **opts
        )
        return jnp.sum(out)

    def ref(h, w, b, ht, wt, bt):
        x = h @ w if b is None else h @ w + b[None, :]
        t = ht @ wt if bt is None else ht @ wt + bt[None, :]
        ref_opts = {k: o for k, o in opts.items() if k != "weights"}
        out = jbce.jensen_shannon_divergence(x, t, where=rows, weights=weights, **ref_opts)
        return jnp.sum(out)

    return fused, ref


def value_and_grads(f, *args, argnums=ARGNUMS):
    return values_and_grads([f], *args, argnums=argnums)[0]


def values_and_grads(fs, *args, argnums=ARGNUMS):
    """[value_and_grad of each f] in one compiled function (one compile, not one per f)."""
    argnums = tuple(i for i in argnums if args[i] is not None)
    return jax.jit(lambda *a: [jax.value_and_grad(f, argnums)(*a) for f in fs])(*args)


def assert_tree_close(got, want, rtol):
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = float(np.max(np.abs(np.asarray(r, np.float64)), initial=0.0))
        np.testing.assert_allclose(
            np.asarray(g, np.float64), np.asarray(r, np.float64), rtol=rtol, atol=rtol * scale
        )


# One beta per form of the divergence (jbce._softmax.jsd.mode: 0 forward KL, 1 reverse KL,
# inside (0, 1) the mixture; 0.3 and 0.5 take the same code).
BETAS = [0.0, 0.3, 1.0]
CHUNKS = [None, 4, (5, 4)]  # whole rows; 3 vocabulary chunks, the last overlapping; token chunks


# (The temperature is data in the fused loss, not a static switch: one T per beta.)
@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.3, 2.5), (1.0, 2.5)])
def test_matches_materialised_jsd_value_and_all_gradients_float64(beta, temperature):
    # Float64 to 1e-12 and all six gradients (the matrix: float32; not the teacher's weight
    # and bias): the materialised JSD, then each chunking, in one compile.
    args = make(13, 5, 3, 11)
    _, ref = fused_and_ref(beta=beta, temperature=temperature)
    fused = [fused_and_ref(beta=beta, temperature=temperature, chunk_size=cs)[0] for cs in CHUNKS]
    want, *got = values_and_grads([ref, *fused], *args)
    for g in got:  # one per chunking
        assert_tree_close(g, want, 1e-12)


# The reduction is applied to the fused per-token losses (jbce/_linear/distill.py): every
# reduction on one form of the divergence, "mean" on the others.
@pytest.mark.parametrize(
    "beta,reductions", [(0.0, ["mean"]), (0.3, ["mean", "sum", "none"]), (1.0, ["mean"])]
)
def test_ignored_tokens_weights_and_every_reduction(beta, reductions):
    # Each reduction's value and six gradients in float64, in one compile.
    args = make(9, 4, 6, 10, seed=1)
    y = labels_with(9, ignore=(0, 4))
    wts = jnp.linspace(0.2, 2.0, 9, dtype=F64)
    pairs = [fused_and_ref(y, beta=beta, weights=wts, reduction=r, chunk_size=(4, 3))
             for r in reductions]  # fmt: skip
    results = values_and_grads([f for pair in pairs for f in pair], *args)
    for got, want in zip(results[::2], results[1::2], strict=True):
        assert_tree_close(got, want, 1e-12)


def test_ignored_tokens_lose_exactly_zero():
    h, w, _, ht, wt, _ = make(9, 4, 6, 10, seed=1)
    y = labels_with(9, ignore=(0, 4))
    per_token = jax.jit(
        lambda h, w, ht, wt: jbce.linear_distillation_loss(h, w, ht, wt, labels=y, reduction="none")
    )(h, w, ht, wt)
    assert per_token.shape == (9,) and float(per_token[0]) == float(per_token[4]) == 0.0


def test_mean_is_over_tokens_that_are_not_ignored():
    h, w, _, ht, wt, _ = make(6, 3, 3, 7, seed=2)
    y = labels_with(6, ignore=(1, 2, 5))

    @jax.jit
    def losses(h, w, ht, wt):
        loss = functools.partial(jbce.linear_distillation_loss, h, w, ht, wt)
        return (loss(labels=y), loss(reduction="none"), loss(labels=y, ignore_index=None))

    mean, per, none_ignored = losses(h, w, ht, wt)
    np.testing.assert_allclose(float(mean), float(np.mean(np.asarray(per)[[0, 3, 4]])), rtol=1e-14)
    np.testing.assert_allclose(float(none_ignored), float(np.mean(np.asarray(per))), rtol=1e-14)


def test_micro_batches_with_normalizer_add_up_to_the_full_batch():
    # Gradient accumulation with unequal valid-token counts (the first micro-batch has none):
    # micro-batches of one shape, so that one compile serves them all.
    args = make(9, 4, 3, 9, seed=13)
    y = labels_with(9, ignore=(0, 1, 2, 5))
    full, _ = fused_and_ref(y, beta=0.3, chunk_size=4)
    want = value_and_grads(full, *args, argnums=(0, 1))
    count = float(jnp.sum(y != -100))
    h, w, b, ht, wt, bt = args

    @jax.jit
    def part(h, w, ht, y):
        def f(h, w):
            return jbce.linear_distillation_loss(
                h, w, ht, wt, bias=b, teacher_bias=bt, labels=y, beta=0.3, chunk_size=4,
                normalizer=count,
            )  # fmt: skip

        return jax.value_and_grad(f, (0, 1))(h, w)

    got = [part(h[lo : lo + 3], w, ht[lo : lo + 3], y[lo : lo + 3]) for lo in (0, 3, 6)]
    total = sum(v for v, _ in got)
    gw = sum(g for _, (_, g) in got)
    assert_tree_close((total, (jnp.concatenate([gh for _, (gh, _) in got]), gw)), want, 1e-12)


def test_all_ignored_batch_gives_zero_loss_and_zero_gradients():
    args = make(6, 4, 3, 9)
    y = jnp.full((6,), -100, jnp.int32)
    fused = [fused_and_ref(y, beta=beta, chunk_size=4)[0] for beta in BETAS]
    for loss, grads in values_and_grads(fused, *args):
        assert float(loss) == 0.0
        for g in grads:
            assert not np.any(np.asarray(g))


# (V = 1 is the matrix's one_class edge: linear_distillation_loss-materialised-{value,grad}-
# float32-one_class-beta0.5; tokens and classes both ragged, with labels, are
# test_ignored_tokens_weights_and_every_reduction's chunks (4, 3).)
@pytest.mark.parametrize(
    "n,v,chunk_size",
    [(1, 23, 5), (5, 7, 1), (4, 7, 7), (4, 7, 100), (3, 64, 16), (37, 23, (12, 23)),
     (8, 16, (4, 8))],
)  # fmt: skip
def test_ragged_sizes_against_chunk_sizes(n, v, chunk_size):
    args = make(n, 4, 6, v, seed=3)
    y = labels_with(n, ignore=(0,) if n > 2 else ())
    fused, ref = fused_and_ref(y, beta=0.4, temperature=1.5, chunk_size=chunk_size)
    got, want = values_and_grads([fused, ref], *args)
    assert_tree_close(got, want, 1e-12)


def test_without_biases_and_with_one_bias():
    h, w, b, ht, wt, bt = make(9, 5, 2, 11, seed=4)
    fused, ref = fused_and_ref(beta=0.7, chunk_size=4)

    @jax.jit
    def each(h, w, b, ht, wt, bt):
        out = []
        for biases in ((None, None), (b, None), (None, bt)):
            a = (h, w, biases[0], ht, wt, biases[1])
            argnums = tuple(i for i in ARGNUMS if a[i] is not None)
            out.append([jax.value_and_grad(f, argnums)(*a) for f in (fused, ref)])
        return out

    for got, want in each(h, w, b, ht, wt, bt):
        assert_tree_close(got, want, 1e-12)


def test_leading_batch_dims_and_different_hidden_sizes():
    h, w, b, ht, wt, bt = make(12, 4, 7, 9, seed=5)
    h3, ht3 = h.reshape(3, 4, 4), ht.reshape(3, 4, 7)

    @jax.jit
    def both(h3, w, b, ht3, wt, bt):
        return jbce.linear_distillation_loss(
            h3, w, ht3, wt, bias=b, teacher_bias=bt, reduction="none", chunk_size=4
        ), jbce.jensen_shannon_divergence(
            h3 @ w + b[None, None, :], ht3 @ wt + bt[None, None, :], reduction="none"
        )

    got, want = both(h3, w, b, ht3, wt, bt)
    assert got.shape == (3, 4)
    reference.assert_close(got, np.asarray(want), rtol=1e-12)


@pytest.mark.parametrize("beta", BETAS)
def test_minus_inf_bias_classes_shared_by_both_models_drop_out(beta):
    # Vocabulary padding in both models: the divergence of the other classes, exactly.
    h, w, b, ht, wt, bt = make(8, 4, 3, 10, seed=6)
    pad = jnp.array([2, 7, 9])
    b, bt = b.at[pad].set(-jnp.inf), bt.at[pad].set(-jnp.inf)
    keep = np.setdiff1d(np.arange(10), np.asarray(pad))
    fused, _ = fused_and_ref(beta=beta, chunk_size=3)
    _, ref = fused_and_ref(beta=beta)

    @jax.jit
    def both(h, w, b, ht, wt, bt):
        small = (h, w[:, keep], b[keep], ht, wt[:, keep], bt[keep])
        vag = functools.partial(jax.value_and_grad, argnums=ARGNUMS)
        return vag(fused)(h, w, b, ht, wt, bt), vag(ref)(*small)

    (v1, g1), (v2, g2) = both(h, w, b, ht, wt, bt)
    assert_tree_close(v1, v2, 1e-12)
    for got, want in zip(g1, g2):
        if got.shape[-1] == 10:  # the padded classes get exactly zero gradient
            assert not np.any(np.asarray(got)[..., np.asarray(pad)])
            got = got[..., keep]
        assert_tree_close(got, want, 1e-12)


def test_a_class_minus_inf_in_one_model_only_is_finite_and_exact():
    # M keeps the other model's mass: finite divergence and gradients inside (0, 1) (one beta:
    # every beta inside (0, 1) takes the same code, jbce._softmax.jsd.mode).
    args = list(make(7, 4, 3, 9, seed=7))
    args[2] = args[2].at[jnp.array([0, 5])].set(-jnp.inf)  # student's bias
    args[5] = args[5].at[jnp.array([3, 5])].set(-jnp.inf)  # teacher's bias
    fused, ref = fused_and_ref(beta=0.3, chunk_size=4)
    got, want = values_and_grads([fused, ref], *args)
    for g in jax.tree.leaves(got):
        assert np.all(np.isfinite(np.asarray(g)))
    assert_tree_close(got, want, 1e-12)


@pytest.mark.parametrize("beta", [0.3, "traced"])
def test_the_complex_pair_sums_of_cuda_give_the_materialised_jsd(monkeypatch, beta):
    # On CUDA the forward tile's sums are one reduction over complex pairs (so that XLA:GPU
    # fuses the mixture's shared expm1/log1p instead of writing it out): forced here on CPU,
    # the same values and gradients, a class -inf in one model, in both, and NaN included.
    from jbce._linear import distill_xla

    seen = []

    def pairs(terms):
        seen.append(len(terms))
        return distill_xla._complex_pair_sums(*terms)

    monkeypatch.setattr(distill_xla, "_row_sums", pairs)
    args = list(make(7, 4, 3, 9, seed=7))
    args[2] = args[2].at[jnp.array([0, 5, 8])].set(-jnp.inf)
    args[5] = args[5].at[jnp.array([3, 5, 8])].set(-jnp.inf)
    b = jnp.asarray(0.3, F64) if beta == "traced" else beta
    fused, ref = fused_and_ref(beta=b, chunk_size=4)
    got, want = values_and_grads([fused, ref], *args)
    assert_tree_close(got, want, 1e-12)
    assert set(seen) == {2 if beta == 0.3 else 4}
    h = args[0].at[2, 1].set(jnp.nan)
    per = jax.jit(
        lambda h, w, bias, ht, wt, t_bias: jbce.linear_distillation_loss(
            h, w, ht, wt, bias=bias, teacher_bias=t_bias, beta=b, reduction="none"
        )
    )(h, *args[1:])
    per = np.asarray(per)
    assert np.isnan(per[2]) and np.all(np.isfinite(np.delete(per, 2)))


@pytest.mark.parametrize("dtype", [jnp.float32, F64])
def test_complex_pair_sums_are_the_float_sums_of_each_term(dtype):
    from jbce._linear.distill_xla import _complex_pair_sums, _separate_sums

    counts = (2, 3, 4)
    xs = []
    for count in counts:
        x = jax.random.normal(jax.random.key(3), (count, 6, 37), dtype)
        x = x.at[0, 1, 4].set(jnp.nan).at[1, 2, 0].set(jnp.inf).at[count - 1, 3, 5].set(-jnp.inf)
        xs.append(x)
    results = jax.jit(lambda xs: [(_complex_pair_sums(*x), _separate_sums(*x)) for x in xs])(xs)
    for count, (got, want) in zip(counts, results, strict=True):
        assert [g.dtype for g in got] == [dtype] * count
        for g, w in zip(got, want, strict=True):
            rtol = 1e-6 if dtype == jnp.float32 else 1e-14
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol)


def test_nan_in_gives_nan_out_for_that_token_only():
    h, w, b, ht, wt, bt = make(5, 3, 3, 8)

    @jax.jit
    def losses(h, b, ht):  # per token for each beta; the mean with a bias only
        per = [jbce.linear_distillation_loss(
                   h, w, ht, wt, bias=b, teacher_bias=bt, beta=beta, reduction="none",
                   chunk_size=3,
               ) for beta in BETAS]  # fmt: skip
        return per, jbce.linear_distillation_loss(h, w, ht, wt, bias=b)

    for hs, hts in ((h.at[2, 1].set(jnp.nan), ht), (h, ht.at[2, 0].set(jnp.nan))):
        for beta, per in zip(BETAS, losses(hs, b, hts)[0], strict=True):
            per = np.asarray(per)
            assert np.isnan(per[2]) and np.all(np.isfinite(per[[0, 1, 3, 4]])), (beta, per)
    bad_bias = b.at[4].set(jnp.nan)
    assert np.isnan(float(losses(h, bad_bias, ht)[1]))


def test_gradient_check_numerically_with_and_without_the_teacher():
    # Finite differences of jitted losses (one compile each, not one per evaluation).
    h, w, b, ht, wt, bt = make(5, 3, 2, 7, seed=8)
    y = labels_with(5, ignore=(3,))
    opts = {"labels": y, "temperature": 1.7, "chunk_size": (2, 3)}

    def student_and_teacher(beta):
        return jax.jit(lambda h, w, b, ht, wt, bt: jbce.linear_distillation_loss(
            h, w, ht, wt, bias=b, teacher_bias=bt, beta=beta, **opts))  # fmt: skip

    @jax.jit
    def student_only(h, w, b):
        return jbce.linear_distillation_loss(h, w, ht, wt, bias=b, teacher_bias=bt, beta=0.35,
                                             **opts)  # fmt: skip

    def frozen_teacher(h, w, b, ht, wt, bt):
        sg = jax.lax.stop_gradient
        return jbce.linear_distillation_loss(
            h, w, sg(ht), sg(wt), bias=b, teacher_bias=sg(bt), beta=0.35, **opts
        )

    check_grads(student_only, (h, w, b), order=1, modes=["rev"])
    teacher_grads = jax.jit(jax.grad(frozen_teacher, (3, 4, 5)))(h, w, b, ht, wt, bt)
    for g in teacher_grads:
        assert not np.any(np.asarray(g))
    # (beta 0 and 1: their six gradients are test_matches_materialised_jsd_value_and_all_
    # gradients_float64's, against the materialised JSD, which the matrix checks against
    # float64 references: jensen_shannon_divergence-materialised-grad-float32-*-beta{0,1}.)
    check_grads(student_and_teacher(0.35), (h, w, b, ht, wt, bt), order=1, modes=["rev"])


def _dots(jaxpr) -> int:
    """dot_general equations in a jaxpr and every jaxpr nested in it."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "dot_general"
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _dots(sub)
    return count


def test_a_frozen_teacher_costs_no_teacher_gradient_matmuls():
    h, w, b, ht, wt, bt = make(8, 4, 3, 12)

    def f(h, w, b, ht, wt, bt):
        return jbce.linear_distillation_loss(h, w, ht, wt, bias=b, teacher_bias=bt)

    student = jax.make_jaxpr(jax.grad(f, (0, 1, 2)))(h, w, b, ht, wt, bt).jaxpr
    both = jax.make_jaxpr(jax.grad(f, ARGNUMS))(h, w, b, ht, wt, bt).jaxpr
    # Forward: one tile per model; backward: both tiles recomputed, and 2 matmuls per
    # differentiated model (d hidden, d weight).
    assert (_dots(student), _dots(both)) == (2 + 2 + 2, 2 + 2 + 4)
    weight_only = jax.make_jaxpr(jax.grad(f, 1))(h, w, b, ht, wt, bt).jaxpr
    assert _dots(weight_only) == 2 + 2 + 1


def test_traced_beta_and_temperature_under_jit_match_python_numbers():
    # One compile for the traced options (every beta), one for the Python numbers, one for the
    # materialised reference.
    args = make(7, 3, 4, 9, seed=9)
    y = labels_with(7, ignore=(2,))
    h, w, b, ht, wt, bt = args
    rows = y != -100

    def loss(bb, tt, h, w, b):
        return jbce.linear_distillation_loss(
            h, w, ht, wt, bias=b, teacher_bias=bt, labels=y, beta=bb, temperature=tt,
            chunk_size=4,
        )  # fmt: skip

    def ref(bb, tt):
        return jbce.jensen_shannon_divergence(
            h @ w + b[None, :], ht @ wt + bt[None, :], beta=bb, temperature=tt, where=rows
        )

    traced = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3, 4)))
    ref_vag = jax.jit(jax.value_and_grad(ref, (0, 1)))
    python = jax.jit(
        lambda h, w, b: [jax.value_and_grad(loss, (2, 3, 4))(bb, 2.0, h, w, b) for bb in BETAS]
    )(h, w, b)
    for beta, (p_val, p_grads) in zip(BETAS, python, strict=True):
        bb, tt = jnp.asarray(beta, F64), jnp.asarray(2.0, F64)
        val, (dbeta, dtemp, *grads) = traced(bb, tt, h, w, b)
        assert_tree_close(val, p_val, 1e-13)
        assert_tree_close((val, (dbeta, dtemp)), ref_vag(bb, tt), 1e-11)
        # The student's gradients with traced options equal those with Python numbers.
        assert_tree_close(grads, p_grads, 1e-13)


def test_backward_saves_inputs_and_a_few_floats_per_token_only():
    n, d, dt, v = 16, 4, 3, 40
    args = make(n, d, dt, v)
    fused, ref = fused_and_ref(beta=0.5, chunk_size=8)
    shapes = [aval.shape for aval, _ in reference.saved_residuals(fused, *args)]
    assert (n, v) not in shapes, shapes
    assert (n, v) in [aval.shape for aval, _ in reference.saved_residuals(ref, *args)]
    assert all(int(np.prod(s)) <= max(d, dt) * v for s in shapes), shapes
    per_token = [s for s in shapes if s == (n,)]
    assert 4 <= len(per_token) <= 8, shapes  # 2 statistics per model and the divergence sums


@pytest.mark.no_x64
def test_compiled_temp_memory_is_far_below_the_logits():
    n, d, v = 1024, 32, 8192
    spec = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((n, d), (d, v), (n, d), (d, v))]
    f = lambda h, w, ht, wt: jbce.linear_distillation_loss(h, w, ht, wt, chunk_size=(256, 1024))
    mat = lambda h, w, ht, wt: jbce.jensen_shannon_divergence(h @ w, ht @ wt)
    fused, materialised = (
        jax.jit(jax.value_and_grad(g, (0, 1))).lower(*spec).compile().memory_analysis()
        for g in (f, mat)
    )
    assert fused.temp_size_in_bytes < n * v * 4 / 2  # under half of one model's logits
    assert fused.temp_size_in_bytes * 8 < materialised.temp_size_in_bytes


@pytest.mark.no_x64
def test_float32_gradients_within_1e_5_of_float64():
    # Each beta's fused float32 loss in one compile, their float64 references in another.
    args = make(64, 16, 24, 300, dtype=jnp.float32, seed=10)
    y = labels_with(64, ignore=(1,))
    betas = [0.0, 0.5, 1.0]
    fused = [fused_and_ref(y, beta=beta, temperature=1.5, chunk_size=128)[0] for beta in betas]
    got = values_and_grads(fused, *args)
    for g in got:
        assert g[0].dtype == jnp.float32 and {x.dtype for x in g[1]} == {jnp.dtype(jnp.float32)}
    with jax.enable_x64(True):
        refs = [fused_and_ref(y, beta=beta, temperature=1.5)[1] for beta in betas]
        want = values_and_grads(refs, *(a.astype(F64) for a in args))
        for g, r in zip(got, want, strict=True):
            assert_tree_close(g, r, 1e-5)


@functools.cache
def _half_precision_reference():
    """The float64 materialised reference of the half-precision test (compiled once)."""
    _, ref = fused_and_ref(beta=0.5)
    return jax.jit(jax.value_and_grad(ref, ARGNUMS))


@pytest.mark.no_x64
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    args = make(64, 16, 24, 300, dtype=dtype, seed=11)
    fused, _ = fused_and_ref(beta=0.5, chunk_size=128)
    loss, grads = value_and_grads(fused, *args)
    assert loss.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.dtype(dtype)] * 6
    with jax.enable_x64(True):
        # The float64 result of the same (rounded) inputs: within 1e-2 relative.
        want = _half_precision_reference()(*(a.astype(F64) for a in args))
        assert_tree_close((loss, grads), want, 1e-2)


def test_vocabulary_parallel_under_vmap_matches_unsharded():
    shards, n, d, dt, v = 3, 7, 4, 5, 12
    h, w, b, ht, wt, bt = make(n, d, dt, v, seed=12)
    b, bt = b.at[5].set(-jnp.inf), bt.at[5].set(-jnp.inf)
    y = labels_with(n, ignore=(2,))
    opts = {"beta": 0.3, "temperature": 1.5}
    _, ref = fused_and_ref(y, **opts)

    def sharded(h, w_l, b_l, ht, wt_l, bt_l):
        out = jbce.linear_distillation_loss(
            h, w_l, ht, wt_l, bias=b_l, teacher_bias=bt_l, labels=y, chunk_size=(3, 3),
            axis_name="v", **opts,
        )  # fmt: skip
        return jnp.sum(out)

    def split(x):
        return jnp.moveaxis(x.reshape(x.shape[:-1] + (shards, v // shards)), -2, 0)

    vag = jax.vmap(
        jax.value_and_grad(sharded, ARGNUMS), in_axes=(None, 0, 0, None, 0, 0), axis_name="v"
    )
    both = jax.jit(
        lambda *a: (
            jax.value_and_grad(ref, ARGNUMS)(*a),
            vag(a[0], split(a[1]), split(a[2]), a[3], split(a[4]), split(a[5])),
        )
    )
    (want_v, want_g), (val, grads) = both(h, w, b, ht, wt, bt)
    assert_tree_close(val, jnp.full((shards,), want_v), 1e-12)
    fin = np.isfinite(np.asarray(b))
    for k, (g, r) in enumerate(zip(grads, want_g)):
        if k in (0, 3):  # hidden: each shard's share
            assert_tree_close(jnp.sum(g, axis=0), r, 1e-12)
        else:
            full = jnp.moveaxis(g, 0, -2).reshape(r.shape)
            if full.ndim == 1:
                full, r = full[fin], r[fin]
            assert_tree_close(full, r, 1e-12)


def _args():
    return {"hidden": jnp.zeros((6, 4)), "weight": jnp.zeros((4, 9)),
            "teacher_hidden": jnp.zeros((6, 3)), "teacher_weight": jnp.zeros((3, 9))}  # fmt: skip


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"beta": 1.5}, r"beta must be in \[0, 1\]; got 1.5"),
        ({"beta": -0.1}, r"beta must be in \[0, 1\]"),
        ({"temperature": 0.0}, "temperature must be > 0; got 0.0"),
        ({"temperature": -2}, "temperature must be > 0"),
        ({"beta": jnp.ones(2)}, r"beta must be a scalar; got shape \(2,\)"),
        ({"weight": jnp.zeros((5, 9))}, r"weight must have shape \(4, V\)"),
        ({"teacher_weight": jnp.zeros((3, 8))}, r"teacher_weight must have shape \(3, 9\)"),
        ({"teacher_weight": jnp.zeros((4, 9))}, r"teacher_weight must have shape \(3, 9\)"),
        ({"teacher_hidden": jnp.zeros((5, 3))}, r"teacher_hidden must have shape \(6, 'D_t'\)"),
        ({"labels": jnp.zeros((3,), jnp.int32)}, r"labels must have shape \(6,\)"),
        ({"labels": jnp.zeros((6,))}, "labels must be integer"),
        ({"bias": jnp.zeros((8,))}, r"bias must have shape \(9,\)"),
        ({"teacher_bias": jnp.zeros((9, 1))}, r"teacher_bias must have shape \(9,\)"),
        ({"weights": jnp.zeros((5,))}, "weights must broadcast"),
        ({"hidden": jnp.zeros((6, 4), jnp.int32)}, "hidden must be a floating-point array"),
        ({"chunk_size": 0}, "chunk_size must be a positive int"),
        ({"reduction": "batchmean"}, "reduction must be one of"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    args = _args()
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises((ValueError, TypeError), match=match):
        jbce.linear_distillation_loss(
            args["hidden"], args["weight"], args["teacher_hidden"], args["teacher_weight"],
            **kwargs,
        )  # fmt: skip


def test_traced_beta_out_of_range_is_reported_under_checkify():
    from jax.experimental import checkify

    a = _args()

    def f(beta):
        return jbce.linear_distillation_loss(
            a["hidden"], a["weight"], a["teacher_hidden"], a["teacher_weight"], beta=beta
        )

    err, _ = checkify.checkify(jax.jit(f), errors=checkify.user_checks)(jnp.asarray(1.5))
    with pytest.raises(checkify.JaxRuntimeError, match=r"beta must be in \[0, 1\]"):
        err.throw()


def _shard_map_cases():
    """The loss in shard_map on a 2 x 4 mesh (tokens x vocabulary) against the materialised
    JSD in float64: every form of the divergence, tiles and whole rows, a padded class,
    psum-ed sums and the mean over both axes (batch_axis_name). A 1-D vocabulary mesh is the
    matrix's: linear_distillation_loss-vocab_shard_map-{value,grad}-float32-*-beta0.5."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    n, d, dt, v = 10, 5, 3, 24
    h, w, b, ht, wt, bt = make(n, d, dt, v)
    b, bt = b.at[7].set(-jnp.inf), bt.at[7].set(-jnp.inf)
    y = jnp.arange(n, dtype=jnp.int32).at[3].set(-100)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "vocab"))
    cases = [(0.0, (3, 2), "sum"), (1.0, None, "sum"),
             (0.3, (3, 2), "mean")]  # mean: batch_axis_name="data"  # fmt: skip
    for beta, chunk, reduction in cases:
        opts = dict(beta=beta, temperature=1.3, reduction=reduction)
        mean = reduction == "mean"  # the data shards hold 4 and 5 tokens that count

        def ref(h, w, b, ht, wt, bt, opts=opts):
            return jbce.jensen_shannon_divergence(
                h @ w + b[None, :], ht @ wt + bt[None, :], where=y != -100, **opts
            )

        def local(h, w, b, ht, wt, bt, y, opts=opts, chunk=chunk, mean=mean):
            out = jbce.linear_distillation_loss(
                h, w, ht, wt, bias=b, teacher_bias=bt, labels=y, chunk_size=chunk,
                axis_name="vocab", **opts, **({"batch_axis_name": "data"} if mean else {}),
            )  # fmt: skip
            return out if mean else jax.lax.psum(out, "data")

        col, tok = P(None, "vocab"), P("data")
        f = jax.shard_map(local, mesh=mesh, out_specs=P(),
                          in_specs=(tok, col, P("vocab"), tok, col, P("vocab"), tok))  # fmt: skip
        vag = functools.partial(jax.value_and_grad, argnums=ARGNUMS)
        both = jax.jit(lambda *a, f=f, ref=ref, vag=vag: (vag(lambda *a: f(*a, y))(*a),
                                                         vag(ref)(*a)))  # fmt: skip
        got, want = both(h, w, b, ht, wt, bt)
        fin = np.isfinite(np.asarray(b))
        for i, (a, r) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want))):
            a, r = np.asarray(a), np.asarray(r)
            if i in (3, 6):  # the biases: the padded class has no gradient to compare
                assert not np.any(a[~fin]), (beta, i)
                a, r = a[fin], r[fin]
            np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-12, err_msg=f"{beta} {i}")


def test_vocabulary_parallel_under_shard_map_on_8_devices():
    # tests/conftest.py gives this process 8 host devices; with JBCE_TEST_ONE_DEVICE=1 (one
    # device) the cases run in a fresh interpreter that has 8.
    if jax.device_count() >= 8:
        _shard_map_cases()
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_COUNT_FLAG}"}  # fmt: skip
    script = "from tests.test_linear_distill import _shard_map_cases as c; c(); print('OK')"
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
