"""The Pallas kernels of the fused linear cross-entropy, run in Pallas interpret mode on a CPU.

Both kernel sets (GPU: Triton-style loops inside the kernel; TPU: Mosaic-style sequential
grid with VMEM accumulators) run through ``jbce._linear.pallas.interpret`` with small block
caps, so that inputs of a few dozen tokens and classes span several ragged blocks (the GPU
kernels' overlapping last blocks, the TPU kernels' partial last blocks). Each is checked,
value and gradients w.r.t. hidden, weight and bias, against the materialised loss in
float64: float32 inputs within 1e-5 (relative to the largest entry), bfloat16 within 1e-2.
Every call is jitted (interpret mode is slow eagerly).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbce
from jbce._linear import pallas as _linear_pallas
from tests import reference as oracle

pytestmark = pytest.mark.jax_strict

F64 = jnp.float64
# Caps that make N=37, V=300 ragged: GPU (tn, tv, tk, td), TPU (tn, tv).
BLOCKS = {"gpu": (16, 64, 16, 16), "tpu": (16, 128)}
PLATFORMS = list(BLOCKS)
# The shared per-dtype tolerances, for sums over the V = 300 classes of make().
TOL = {dt: oracle.tolerance(dt, size=300) for dt in (jnp.float32, jnp.bfloat16)}


def make(n=37, d=32, v=300, *, dtype=jnp.float32, seed=0, ignore=(3, 11), bias=True):
    # NumPy's generator: jax.random compiles its kernels anew for every shape (seconds).
    r = np.random.default_rng(seed)
    h, w, b = r.normal(size=(n, d)), r.normal(size=(d, v)) * 0.7, r.normal(size=v)
    y = r.integers(0, v, size=n).astype(np.int32)
    y[[i for i in ignore if i < n]] = -100  # as jax's .at[i].set: out of range, dropped
    as_dtype = lambda a: jnp.asarray(np.asarray(a, np.float32).astype(jnp.dtype(dtype)))  # noqa: E731
    return as_dtype(h), as_dtype(w), as_dtype(b) if bias else None, jnp.asarray(y)


@functools.cache
def _reference(argnums, static):
    def loss(h, w, b, y, arrays):
        logits = h @ w if b is None else h @ w + b[None, :]
        out = jbce.softmax_cross_entropy_with_integer_labels(logits, y, **dict(static), **arrays)
        return jnp.sum(out)

    return jax.jit(jax.value_and_grad(loss, argnums))


def reference(h, w, b, y, **opts):
    """Value and gradients of the materialised loss, in float64 (jitted: op by op, each
    reference cost seconds)."""
    f64 = ("weights", "class_weights")
    arrays = {k: jnp.asarray(a, F64 if k in f64 else None) for k, a in opts.items()
              if isinstance(a, (np.ndarray, jax.Array))}  # fmt: skip
    static = tuple(sorted((k, a) for k, a in opts.items() if k not in arrays))
    args = tuple(None if a is None else jnp.asarray(a, F64) for a in (h, w, b))
    f = _reference((0, 1) if b is None else (0, 1, 2), static)
    return f(*args, y, arrays)


@functools.cache
def _value_and_grads(platform, argnums, gradient_filter, static):
    """One jitted value-and-gradients per platform and static options: the tests that share
    a structure (shapes, option values) share its compile; labels and array options are
    arguments."""

    def loss(h, w, b, y, arrays):
        out = jbce.linear_softmax_cross_entropy(
            h, w, y, bias=b, implementation="pallas", gradient_filter=gradient_filter,
            **dict(static), **arrays,
        )  # fmt: skip
        return jnp.sum(out)

    return jax.jit(jax.value_and_grad(loss, argnums))


def pallas(h, w, b, y, platform, *, gradient_filter=None, **opts):
    """Value and gradients of the fused loss with ``platform``'s kernels, interpreted."""
    arrays = {k: jnp.asarray(a) for k, a in opts.items() if isinstance(a, (np.ndarray, jax.Array))}
    static = tuple(sorted((k, a) for k, a in opts.items() if k not in arrays))
    argnums = (0, 1) if b is None else (0, 1, 2)
    f = _value_and_grads(platform, argnums, gradient_filter, static)
    with _linear_pallas.interpret(platform, block_sizes=BLOCKS[platform]):
        return f(h, w, b, y, arrays)


def assert_close(got, want, rtol):
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == r.shape
        r = np.asarray(r, np.float64)
        scale = float(np.max(np.abs(r), initial=0.0))
        np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=rtol, atol=rtol * scale)


CLASS_WEIGHTS = np.linspace(0.2, 3.0, 300, dtype=np.float32)
# Reductions and per-token weights (no class weights) through the kernels are the matrix's
# pallas_{gpu,tpu}-{value,grad}-float32-random-plain cases (none, sum, mean; weighted mean's
# gradient); here the options in blocks spanning ragged tiles.
OPTIONS = {
    "plain": {},
    "smoothing_z_loss": {"label_smoothing": 0.2, "z_loss": 1e-2},
    "softcap": {"logit_softcap": 2.5},
    "all": {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 4.0},
    "no_ignore_index": {"ignore_index": None},
    # Class weights (no label smoothing): the PyTorch mean over the kept tokens' weights.
    "class_weights": {"class_weights": CLASS_WEIGHTS, "z_loss": 1e-3, "logit_softcap": 4.0},
    # With label smoothing too: the smoothing term sum_c w_c (lse - x_c) / K in the kernels;
    # the per-token losses of the class-weighted ones.
    "class_weights_smoothing": {
        "class_weights": CLASS_WEIGHTS, "label_smoothing": 0.2, "z_loss": 1e-3,
        "logit_softcap": 4.0,
    },
    "class_weights_smoothing_none": {
        "class_weights": CLASS_WEIGHTS, "label_smoothing": 0.1, "reduction": "none",
    },
    "class_weights_smoothing_sum": {
        "class_weights": CLASS_WEIGHTS, "label_smoothing": 0.3, "reduction": "sum",
        "ignore_index": None,
    },
}  # fmt: skip


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_matches_float64_materialised_loss(platform, name):
    opts = OPTIONS[name]
    h, w, b, y = make(ignore=() if "ignore_index" in opts else (3, 11))
    assert_close(pallas(h, w, b, y, platform, **opts), reference(h, w, b, y, **opts), 1e-5)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_without_bias_and_with_batch_axes(platform):
    h, w, _, y = make(n=36, bias=False)
    h3, y3 = h.reshape(2, 18, -1), y.reshape(2, 18)
    got = pallas(h3, w, None, y3, platform, label_smoothing=0.1)
    want = reference(h, w, None, y, label_smoothing=0.1)
    assert_close((got[0], got[1][0].reshape(h.shape), got[1][1]), want, 1e-5)


@pytest.mark.parametrize("class_weights", [False, True], ids=["plain", "class_weights"])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_bfloat16_inputs_within_1e_2(platform, class_weights):
    h, w, b, y = make(dtype=jnp.bfloat16)
    opts = {"label_smoothing": 0.1, "logit_softcap": 5.0}
    if class_weights:  # the weighted smoothing sums' extra kernel operand, from bfloat16
        opts["class_weights"] = jnp.asarray(CLASS_WEIGHTS, jnp.bfloat16)
    got = pallas(h, w, b, y, platform, **opts)
    assert all(g.dtype == jnp.bfloat16 for g in got[1])
    assert_close(got, reference(h, w, b, y, **opts), 1e-2)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_minus_inf_bias_removes_classes(platform):
    h, w, b, y = make()
    b = b.at[250:].set(-jnp.inf).at[::7].set(-jnp.inf)  # padding columns and holes
    y = jnp.where((y >= 250) | (y % 7 == 0), 1, y)
    # under the soft-cap too: -inf stays -inf (docs/numerics.md), it does not become -c
    for opts in ({}, OPTIONS["smoothing_z_loss"], OPTIONS["all"]):  # compiled for those tests
        got = pallas(h, w, b, y, platform, **opts)
        assert np.all(np.asarray(got[1][2])[250:] == 0)
        want = reference(h, w, b, y, **opts)
        # the reference's bias gradient is NaN-free zero on -inf classes too
        assert_close(got, want, 1e-5)
        h64, w64, b64 = (np.asarray(a, np.float64) for a in (h, w, b))  # the spec's value
        spec = oracle.ref_linear_softmax_cross_entropy(h64, w64, np.asarray(y), bias=b64, **opts)
        np.testing.assert_allclose(float(got[0]), spec, rtol=1e-5)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_second_derivatives_raise_the_first_order_error(platform):
    # The backward kernels are not derived for them: jbce's error, not one from inside JAX.
    h, w, b, y = make(n=8, v=20)

    def loss(h):
        return jbce.linear_softmax_cross_entropy(h, w, y, bias=b, implementation="pallas")

    first_order = r"jbce\.linear_softmax_cross_entropy has first-order derivatives only"
    with _linear_pallas.interpret(platform, block_sizes=BLOCKS[platform]):
        with pytest.raises(TypeError, match=first_order):
            jax.jit(jax.jacrev(jax.grad(loss)))(h)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_sizes_below_and_at_one_block(platform):
    # Inputs below one block (N = 8, V = 12) are the matrix's pallas_{gpu,tpu} cases.
    for n, d, v in ((16, 16, 64), (1, 4, 1)):
        h, w, b, y = make(n, d, v, ignore=())
        assert_close(pallas(h, w, b, y, platform), reference(h, w, b, y), 1e-5)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_overlapping_last_blocks_are_summed_once(platform):
    # 17 tokens and 65 classes: the last token block (16) and class block (64) are moved
    # back to overlap their predecessor in all but one row / column; no gradient (d hidden,
    # d weight, d bias, d class weights, d softcap) may count the overlap twice.
    h, w, b, y = make(17, 32, 65, ignore=(2,))
    cw = np.linspace(0.5, 2.0, 65, dtype=np.float32)
    opts = dict(label_smoothing=0.1)

    def fused(h, w, b, cw, cap):
        out = jbce.linear_softmax_cross_entropy(
            h, w, y, bias=b, class_weights=cw, logit_softcap=cap, implementation="pallas",
            **opts,
        )  # fmt: skip
        return jnp.sum(out)

    def materialised(h, w, b, cw, cap):
        out = jbce.softmax_cross_entropy_with_integer_labels(
            h @ w + b[None, :], y, class_weights=cw, logit_softcap=cap, **opts
        )
        return jnp.sum(out)

    with _linear_pallas.interpret(platform, block_sizes=BLOCKS[platform]):
        got = jax.jit(jax.value_and_grad(fused, range(5)))(h, w, b, cw, jnp.float32(3.0))
    args = (jnp.asarray(a, F64) for a in (h, w, b, cw, 3.0))
    assert_close(got, jax.jit(jax.value_and_grad(materialised, range(5)))(*args), 1e-5)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_all_ignored_tokens_give_zero_loss_and_gradient(platform):
    h, w, b, _ = make()
    y = jnp.full((37,), -100, jnp.int32)
    value, grads = pallas(h, w, b, y, platform)
    assert float(value) == 0.0
    assert all(not np.any(np.asarray(g)) for g in grads)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_nan_in_an_ignored_hidden_row_gives_nan_weight_grad_only(platform):
    # A NaN in a kept row: the matrix's pallas_{gpu,tpu}-{value,grad}-float32-nan-plain.
    h, w, b, y = make()
    ignored_nan = h.at[3].set(jnp.nan)  # token 3 is ignored
    value, (dh, dw, db) = pallas(ignored_nan, w, b, y, platform)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(dh)))  # d logits of an ignored row are exactly 0
    # d weight = hidden.T @ d logits meets 0 * NaN, as the materialised loss's does.
    _, (_, want_dw, want_db) = reference(ignored_nan, w, b, y)
    np.testing.assert_array_equal(np.isnan(np.asarray(dw)), np.isnan(np.asarray(want_dw)))
    np.testing.assert_array_equal(np.isnan(np.asarray(db)), np.isnan(np.asarray(want_db)))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_traced_hyperparameters_under_jit(platform):
    h, w, b, y = make()

    def loss(h, w, e, z, c):
        return jbce.linear_softmax_cross_entropy(
            h, w, y, bias=b, label_smoothing=e, z_loss=z, logit_softcap=c, implementation="pallas"
        )

    with _linear_pallas.interpret(platform, block_sizes=BLOCKS[platform]):
        f = jax.jit(jax.value_and_grad(loss, (0, 1, 4)))
        got = f(h, w, jnp.float32(0.1), jnp.float32(1e-3), jnp.float32(3.0))

    def ref(h, w, c):
        logits = h @ w + b.astype(F64)[None, :]
        return jbce.softmax_cross_entropy_with_integer_labels(
            logits, y, label_smoothing=0.1, z_loss=1e-3, logit_softcap=c
        )

    want = jax.jit(jax.value_and_grad(ref, (0, 1, 2)))(h.astype(F64), w.astype(F64), F64(3.0))
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_gradient_filter_off_is_the_unfiltered_gradient_exactly(platform):
    h, w, b, y = make()
    # A threshold of 0 compiles the filtering branch but never skips a tile.
    off = pallas(h, w, b, y, platform)
    zero = pallas(h, w, b, y, platform, gradient_filter=0.0)
    for a, c in zip(jax.tree.leaves(off), jax.tree.leaves(zero), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_gradient_filter_drops_only_tiny_probabilities(platform):
    h, w, b, y = make()
    # The first 64 classes (and every label) favoured by e**30: the tiles of the others hold
    # tiny probabilities only, and no label.
    b = b.at[:64].add(30.0)
    y = jnp.where(y >= 0, y % 64, y)
    exact = pallas(h, w, b, y, platform)
    thr = 1e-3
    filtered = pallas(h, w, b, y, platform, gradient_filter=thr)
    assert float(filtered[0]) == float(exact[0])  # the forward pass is not filtered
    diffs = [np.asarray(f, np.float64) - np.asarray(e, np.float64)
             for f, e in zip(filtered[1], exact[1], strict=True)]  # fmt: skip
    assert np.any(diffs[1] != 0)  # some tile was skipped: d weight of rare classes is 0
    assert not np.any(np.asarray(filtered[1][1])[:, 192:])  # every tile there skipped
    # Each d logits entry dropped is < thr / 35 (the mean over 35 tokens), so an entry of
    # d hidden moves by < 300 of them times |w|, of d weight by < 37 times |h|.
    bound = thr / 35 * 300 * max(float(jnp.max(jnp.abs(w))), float(jnp.max(jnp.abs(h))), 1.0)
    assert max(float(np.max(np.abs(dd))) for dd in diffs) < bound
    # with label smoothing every class has a gradient: nothing is skipped
    smooth = pallas(h, w, b, y, platform, **OPTIONS["all"])
    smooth_f = pallas(h, w, b, y, platform, **OPTIONS["all"], gradient_filter=thr)
    for a, c in zip(jax.tree.leaves(smooth), jax.tree.leaves(smooth_f), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["plain", "class_weights_smoothing"])
def test_pallas_on_cpu_runs_the_tiled_loop(smoothing):
    # With class weights and label smoothing the fallback's d class_weights (the smoothing
    # sums' share from the tiled loop, w_y's scattered outside) is the XLA implementation's.
    h, w, b, y = make()
    cw = jnp.asarray(CLASS_WEIGHTS) if smoothing else None

    def loss(implementation):
        def f(h, w, c):
            return jbce.linear_softmax_cross_entropy(
                h, w, y, bias=b, class_weights=c, label_smoothing=smoothing,
                implementation=implementation,
            )  # fmt: skip

        return jax.jit(jax.value_and_grad(f, (0, 1) if cw is None else (0, 1, 2)))

    assert_close(loss("pallas")(h, w, cw), loss("xla")(h, w, cw), 1e-6)


def test_residuals_are_the_inputs_and_two_floats_per_token():
    h, w, b, y = make()

    def loss(h, w, b):
        return jbce.linear_softmax_cross_entropy(h, w, y, bias=b, implementation="pallas")

    with _linear_pallas.interpret("tpu", block_sizes=BLOCKS["tpu"]):
        res = oracle.saved_residuals(loss, h, w, b)
    shapes = [tuple(aval.shape) for aval, _ in res]
    assert (37, 300) not in shapes, shapes  # no logits, probabilities or their gradient
    assert all(int(np.prod(s)) <= 32 * 300 for s in shapes), shapes
    assert {(37, 32), (32, 300), (300,), (37,)} <= set(shapes)  # inputs, per-token floats


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"implementation": "pallas", "chunk_size": 128}, "chunk_size must be None"),
        ({"gradient_filter": 1e-3}, 'implementation="pallas" only'),
        ({"implementation": "pallas", "gradient_filter": -1.0}, "gradient_filter must be"),
        ({"implementation": "pallas", "gradient_filter": True}, "gradient_filter must be"),
        ({"implementation": "triton"}, "implementation must be"),
    ],
)
def test_bad_options_name_the_argument(opts, match):
    h, w, b, y = make()
    with pytest.raises(ValueError, match=match):
        jbce.linear_softmax_cross_entropy(h, w, y, bias=b, **opts)


def test_float64_inputs_are_refused():
    h, w, b, y = make()
    with pytest.raises(ValueError, match="computes in float32"):
        jbce.linear_softmax_cross_entropy(h.astype(F64), w, y, implementation="pallas")


def test_interpret_names_its_platform():
    with pytest.raises(ValueError, match="platform must be one of"):
        with _linear_pallas.interpret("cuda"):
            pass


@pytest.mark.parametrize("platform", PLATFORMS)
def test_vocabulary_parallel_under_vmap_matches_unsharded(platform):
    shards, v = 3, 150
    h, w, b, y = make(v=v)
    b = b.at[5].set(-jnp.inf)
    y = jnp.where(y == 5, 0, y)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3}
    want_v, (gh, gw, gb) = reference(h, w, b, y, **opts)

    def sharded(h, w_local, b_local):
        out = jbce.linear_softmax_cross_entropy(
            h, w_local, y, bias=b_local, axis_name="v", implementation="pallas", **opts
        )
        return jnp.sum(out)

    d = h.shape[1]
    w_sh = jnp.moveaxis(w.reshape(d, shards, v // shards), 1, 0)
    b_sh = b.reshape(shards, v // shards)
    vag = jax.vmap(jax.value_and_grad(sharded, (0, 1, 2)), in_axes=(None, 0, 0), axis_name="v")
    with _linear_pallas.interpret(platform, block_sizes=BLOCKS[platform]):
        val, (dh, dw, db) = jax.jit(vag)(h, w_sh, b_sh)
    assert_close(val, jnp.full((shards,), want_v), 1e-5)
    assert_close(jnp.sum(dh, axis=0), gh, 1e-5)  # each shard's share of d hidden
    assert_close(jnp.moveaxis(dw, 0, 1).reshape(d, v), gw, 1e-5)
    fin = np.isfinite(np.asarray(b))
    assert_close(db.reshape(v)[fin], gb[fin], 1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.2], ids=["w_y_only", "smoothing"])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_class_weights_gradient_unsharded_and_vocabulary_parallel(platform, smoothing):
    # d class_weights against the float64 materialised loss, on one device and with the
    # classes over 3 shards (vmap with an axis name): through w_y alone (taken outside the
    # kernels), and with label smoothing through the kernels' weighted sums too. Class 5 is
    # removed by a -inf bias (its weight gets no smoothing gradient). Unsharded with label
    # smoothing (and a soft-cap): test_overlapping_last_blocks_are_summed_once.
    shards, v = 3, 150
    h, w, b, y = make(v=v)
    b = b.at[5].set(-jnp.inf)
    y = jnp.where(y == 5, 0, y)
    cw = jnp.linspace(0.5, 2.0, v, dtype=jnp.float32)
    opts = {"label_smoothing": smoothing, "logit_softcap": 3.0} if smoothing else {}

    def ref(cw):
        logits = jnp.asarray(h, F64) @ jnp.asarray(w, F64) + jnp.asarray(b, F64)[None, :]
        return jbce.softmax_cross_entropy_with_integer_labels(logits, y, class_weights=cw, **opts)

    want_v, want_g = jax.jit(jax.value_and_grad(ref))(jnp.asarray(cw, F64))

    def fused(cw, w=w, b=b, axis_name=None):
        return jbce.linear_softmax_cross_entropy(
            h, w, y, bias=b, class_weights=cw, axis_name=axis_name, implementation="pallas",
            **opts,
        )  # fmt: skip

    d = h.shape[1]
    w_sh = jnp.moveaxis(w.reshape(d, shards, v // shards), 1, 0)
    vag = jax.vmap(
        jax.value_and_grad(lambda c, w, b: fused(c, w, b, "v")), in_axes=(0, 0, 0), axis_name="v"
    )
    with _linear_pallas.interpret(platform, block_sizes=BLOCKS[platform]):
        if not smoothing:
            got = jax.jit(jax.value_and_grad(fused))(cw)
            assert_close(got, (want_v, want_g), 1e-5)
        val, dcw = jax.jit(vag)(cw.reshape(shards, -1), w_sh, b.reshape(shards, -1))
    assert_close((val, dcw.reshape(v)), (jnp.full((shards,), want_v), want_g), 1e-5)
