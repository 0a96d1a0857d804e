"""Fused linear + softmax cross-entropy against the materialised jbce loss.

The reference is ``jbce.softmax_cross_entropy_with_integer_labels(hidden @ weight + bias)``
(itself checked against the float64 oracle in tests/reference.py); the fused loss must
agree with it, value and gradients w.r.t. hidden, weight and bias, for every option, tile
shape and odd size. Float64 unless a test says otherwise (conftest turns x64 on).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbce
from tests import reference

pytestmark = pytest.mark.jax_strict

F64 = jnp.float64


def make(n, d, v, *, dtype=F64, seed=0, ignore=(), bias=True):
    # NumPy's generator: jax.random compiles its kernels anew for every shape (seconds).
    r = np.random.default_rng(seed)
    h, w, b = r.normal(size=(n, d)), r.normal(size=(d, v)) * 1.5, r.normal(size=v)
    y = r.integers(0, v, size=n).astype(np.int32)
    y[list(ignore)] = -100
    as_dtype = lambda a: jnp.asarray(np.asarray(a, jnp.dtype(dtype)))  # noqa: E731
    return as_dtype(h), as_dtype(w), as_dtype(b) if bias else None, jnp.asarray(y)


def fused_and_ref(y, **opts):
    """(fused, materialised) as functions of (hidden, weight, bias), summed to a scalar."""
    cs = opts.pop("chunk_size", None)

    def fused(h, w, b):
        out = jbce.linear_softmax_cross_entropy(h, w, y, bias=b, chunk_size=cs, **opts)
        return jnp.sum(out)

    def ref(h, w, b):
        logits = h @ w if b is None else h @ w + b[None, :]
        return jnp.sum(jbce.softmax_cross_entropy_with_integer_labels(logits, y, **opts))

    return fused, ref


def assert_tree_close(got, want, rtol):
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == r.dtype or rtol > 1e-6
        scale = float(np.max(np.abs(np.asarray(r, np.float64)), initial=0.0))
        # An exactly-zero reference (one class: every gradient is 0) is met to rtol absolute:
        # the backward pass recomputes the tile's logits, equal to the forward's to rounding.
        scale = scale if scale > 0 else 1.0
        np.testing.assert_allclose(
            np.asarray(g, np.float64), np.asarray(r, np.float64), rtol=rtol, atol=rtol * scale
        )


def value_and_grads(f, h, w, b):
    argnums = (0, 1) if b is None else (0, 1, 2)
    return jax.jit(jax.value_and_grad(f, argnums))(h, w, b)


def all_value_and_grads(fs, h, w, b):
    """``value_and_grads`` of each function of ``fs``, in one compile."""
    argnums = (0, 1) if b is None else (0, 1, 2)
    vags = [jax.value_and_grad(f, argnums) for f in fs]
    return jax.jit(lambda h, w, b: [vag(h, w, b) for vag in vags])(h, w, b)


# The plain loss, per-token weights and the reductions (with an ignored row, one tile and
# ragged 5-class tiles) are the matrix's linear_softmax_cross_entropy-{materialised,tiled_v5}-
# {value,grad}-float32-random-plain cases (every reduction's value, the weighted mean's
# gradient, against the float64 reference): here the options (label smoothing and the
# z-loss alone: in "all", and smoothing without the others in "full_smoothing").
OPTIONS = {
    "softcap": {"logit_softcap": 2.5},
    "all": {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 4.0},
    "full_smoothing": {"label_smoothing": 1.0},
    "no_ignore_index": {"ignore_index": None},
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_matches_materialised_loss_float64(name):
    h, w, b, y = make(37, 6, 23, ignore=(3, 30))
    _, ref = fused_and_ref(y, **OPTIONS[name])
    # one tile; 5 tiles, the last overlapping the fourth
    fused = [fused_and_ref(y, chunk_size=cs, **OPTIONS[name])[0] for cs in (None, 5)]
    want, *got = all_value_and_grads([ref, *fused], h, w, b)
    for g in got:
        assert_tree_close(g, want, 1e-12)


def test_token_chunks_with_an_overlapping_last_chunk_count_each_token_once():
    # N=37 tokens in token chunks of 1 and 7 rows, the last 7 overlapping its predecessor,
    # and 5-column vocabulary chunks (an overlapping last chunk of 3 of N = 8 tokens, without
    # options: the matrix's linear_softmax_cross_entropy-tiled_t3_v5-*-plain).
    h, w, b, y = make(37, 6, 23, ignore=(0, 36))
    opts = {"label_smoothing": 0.1, "logit_softcap": 3.0}
    _, ref = fused_and_ref(y, **opts)
    fused = [fused_and_ref(y, chunk_size=(t, 5), **opts)[0] for t in (1, 7)]
    want, *got = all_value_and_grads([ref, *fused], h, w, b)
    for g in got:
        assert_tree_close(g, want, 1e-12)


@pytest.mark.parametrize(
    "n,v,chunk_size",
    [(1, 23, 5), (1, 1, None), (5, 7, 1), (4, 7, 7), (4, 7, 100), (3, 64, 16)],
)
def test_odd_sizes_match_materialised_loss(n, v, chunk_size):
    h, w, b, y = make(n, 4, v)
    fused, ref = fused_and_ref(y, chunk_size=chunk_size, label_smoothing=0.1)
    got, want = all_value_and_grads([fused, ref], h, w, b)
    assert_tree_close(got, want, 1e-12)


def test_without_bias_matches_materialised_loss():
    h, w, _, y = make(9, 5, 11, bias=False)
    fused, ref = fused_and_ref(y, chunk_size=4, z_loss=1e-2)
    got, want = all_value_and_grads([fused, ref], h, w, None)
    assert_tree_close(got, want, 1e-12)


def test_matches_independent_float64_reference():
    h, w, b, y = make(10, 3, 9, ignore=(2,))
    opts = {"label_smoothing": 0.15, "z_loss": 1e-2, "logit_softcap": 3.0}
    f = lambda h, w, b: jbce.linear_softmax_cross_entropy(h, w, y, bias=b, chunk_size=4, **opts)
    got = jax.jit(f)(h, w, b)
    want = reference.ref_softmax_cross_entropy_with_integer_labels(
        np.asarray(h @ w + b[None, :]), np.asarray(y), **opts
    )
    reference.assert_close(got, want, rtol=1e-12)


def test_leading_batch_dims_and_per_token_losses():
    h, w, b, y = make(12, 4, 9, ignore=(5,))
    h3, y3 = h.reshape(3, 4, 4), y.reshape(3, 4)

    def both(h3, w, b):
        fused = jbce.linear_softmax_cross_entropy(h3, w, y3, bias=b, reduction="none", chunk_size=4)
        ref = jbce.softmax_cross_entropy_with_integer_labels(
            h3 @ w + b[None, None, :], y3, reduction="none"
        )
        return fused, ref

    got, want = jax.jit(both)(h3, w, b)
    assert got.shape == (3, 4)
    assert float(got[1, 1]) == 0.0  # the ignored token
    reference.assert_close(got, np.asarray(want), rtol=1e-12)


def test_all_ignored_tokens_give_zero_loss_and_zero_gradient():
    h, w, b, y = make(6, 4, 9)
    y = jnp.full_like(y, -100)
    f = lambda h, w, b: jbce.linear_softmax_cross_entropy(h, w, y, bias=b, chunk_size=4)
    loss, grads = value_and_grads(f, h, w, b)
    assert float(loss) == 0.0
    for g in grads:
        assert not np.any(np.asarray(g))


def test_minus_inf_bias_removes_classes_like_minus_inf_logits():
    # Vocabulary padding: classes with a -inf bias leave the softmax and the smoothing term.
    h, w, b, y = make(8, 4, 10)
    b = b.at[jnp.array([2, 7, 9])].set(-jnp.inf)
    y = jnp.where((y == 2) | (y == 7) | (y == 9), 0, y)
    fused, ref = fused_and_ref(y, chunk_size=3, label_smoothing=0.2)
    (v1, g1), (v2, g2) = all_value_and_grads([fused, ref], h, w, b)
    assert_tree_close((v1, g1[:2]), (v2, g2[:2]), 1e-12)
    assert_tree_close(g1[2][jnp.isfinite(b)], g2[2][jnp.isfinite(b)], 1e-12)
    assert not np.any(np.asarray(g1[2])[~np.isfinite(np.asarray(b))])


def test_out_of_range_label_gives_nan_like_materialised_loss():
    h, w, b, y = make(4, 3, 5)
    y = y.at[1].set(5)
    f = lambda h, w, b: jbce.linear_softmax_cross_entropy(h, w, y, bias=b, reduction="none")
    got = jax.jit(f)(h, w, b)
    assert np.isnan(np.asarray(got)[1]) and np.all(np.isfinite(np.asarray(got)[[0, 2, 3]]))


@pytest.mark.no_x64
def test_float32_gradients_within_1e_5_of_float64():
    h, w, b, y = make(64, 16, 300, dtype=jnp.float32, ignore=(1,))
    fused, _ = fused_and_ref(y, chunk_size=128, label_smoothing=0.1)
    got = value_and_grads(fused, h, w, b)
    with jax.enable_x64(True):
        h64, w64, b64 = (a.astype(F64) for a in (h, w, b))
        _, ref = fused_and_ref(y.astype(jnp.int32), label_smoothing=0.1)
        want = value_and_grads(ref, h64, w64, b64)
        assert [g.dtype for g in got[1]] == [jnp.float32] * 3
        assert got[0].dtype == jnp.float32
        assert_tree_close(got, want, 1e-5)


@pytest.mark.no_x64
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    h, w, b, y = make(64, 16, 300, dtype=dtype)
    fused, _ = fused_and_ref(y, chunk_size=128, z_loss=1e-3)
    loss, grads = value_and_grads(fused, h, w, b)
    assert loss.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.dtype(dtype)] * 3
    with jax.enable_x64(True):
        # The float64 result of the same (rounded) inputs: within 1e-2 relative.
        h64, w64, b64 = (a.astype(F64) for a in (h, w, b))
        _, ref = fused_and_ref(y, z_loss=1e-3)
        want = value_and_grads(ref, h64, w64, b64)
        assert_tree_close((loss, grads), want, 1e-2)


def test_grad_composes_with_vmap_over_batches():
    h, w, b, y = make(11, 4, 13, ignore=(4,))
    fused, _ = fused_and_ref(y, chunk_size=4, label_smoothing=0.1)
    vag = jax.value_and_grad(fused, (0, 1, 2))
    batched_grad = jax.vmap(jax.grad(fused, (0, 1)), in_axes=(0, None, None))
    f = jax.jit(lambda h, w, b: (vag(h, w, b), vag(2 * h, w, b), batched_grad(
        jnp.stack([h, 2 * h]), w, b)))  # fmt: skip
    (_, (gh, gw, gb)), (_, (gh2, _, _)), batched = f(h, w, b)
    assert_tree_close((batched[0][0], batched[1][0]), (gh, gw), 1e-13)
    assert_tree_close(batched[0][1], gh2, 1e-13)


def test_backward_saves_inputs_and_one_lse_per_token_only():
    n, d, v = 16, 4, 40
    h, w, b, y = make(n, d, v)
    fused, ref = fused_and_ref(y, chunk_size=8)
    shapes = [aval.shape for aval, _ in reference.saved_residuals(fused, h, w, b)]
    assert (n, v) not in shapes, shapes  # the materialised loss keeps these logits
    assert (n, v) in [aval.shape for aval, _ in reference.saved_residuals(ref, h, w, b)]
    assert all(int(np.prod(s)) <= d * v for s in shapes), shapes
    assert (n,) in shapes  # the per-token log-sum-exp


@pytest.mark.no_x64
def test_compiled_temp_memory_is_far_below_the_logits():
    n, d, v = 1024, 32, 8192
    spec = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    f = lambda h, w, y: jbce.linear_softmax_cross_entropy(h, w, y, chunk_size=256)
    c = jax.jit(jax.value_and_grad(f, (0, 1))).lower(*spec).compile()
    logits_bytes = n * v * 4
    assert c.memory_analysis().temp_size_in_bytes < logits_bytes / 8


def test_vocabulary_parallel_under_vmap_matches_unsharded():
    shards, n, d, v = 3, 7, 4, 12
    h, w, b, y = make(n, d, v, ignore=(2,))
    b = b.at[5].set(-jnp.inf)
    y = jnp.where(y == 5, 0, y)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3}
    fused, ref = fused_and_ref(y, **opts)

    def sharded(h, w_local, b_local):
        out = jbce.linear_softmax_cross_entropy(
            h, w_local, y, bias=b_local, chunk_size=3, axis_name="v", **opts
        )
        return jnp.sum(out)

    w_sh = jnp.moveaxis(w.reshape(d, shards, v // shards), 1, 0)
    b_sh = b.reshape(shards, v // shards)
    vag = jax.vmap(jax.value_and_grad(sharded, (0, 1, 2)), in_axes=(None, 0, 0), axis_name="v")
    ref_vag = jax.value_and_grad(ref, (0, 1, 2))
    f = jax.jit(lambda h, w, b, w_sh, b_sh: (ref_vag(h, w, b), vag(h, w_sh, b_sh)))
    (want_v, (gh, gw, gb)), (val, (dh, dw, db)) = f(h, w, b, w_sh, b_sh)
    assert_tree_close(val, jnp.full((shards,), want_v), 1e-12)
    assert_tree_close(jnp.sum(dh, axis=0), gh, 1e-12)  # each shard's share of d hidden
    assert_tree_close(jnp.moveaxis(dw, 0, 1).reshape(d, v), gw, 1e-12)
    fin = np.isfinite(np.asarray(b))
    assert_tree_close(db.reshape(v)[fin], gb[fin], 1e-12)


# Every reduction's value with class weights (and label smoothing, z-loss, soft-cap) is the
# matrix's linear_softmax_cross_entropy-materialised-value-float32-*-options; here d
# class_weights too, and the tiles.
CLASS_WEIGHT_OPTIONS = {
    "plain": {},
    "smoothing_z_loss_softcap": {"label_smoothing": 0.1, "z_loss": 1e-2, "logit_softcap": 3.0},
    "weights": {"weights": np.linspace(0.0, 2.0, 37), "label_smoothing": 0.1},
    "no_ignore_index": {"ignore_index": None, "label_smoothing": 0.3},
}


def class_weighted(y, cs=None, **opts):
    """(fused, materialised) as functions of (hidden, weight, bias, class_weights)."""

    def fused(h, w, b, cw):
        out = jbce.linear_softmax_cross_entropy(
            h, w, y, bias=b, class_weights=cw, chunk_size=cs, **opts
        )
        return jnp.sum(out)

    def ref(h, w, b, cw):
        logits = h @ w + b[None, :]
        return jnp.sum(
            jbce.softmax_cross_entropy_with_integer_labels(logits, y, class_weights=cw, **opts)
        )

    return fused, ref


def class_weights_for(v, seed=1):
    return jnp.asarray(np.random.default_rng(seed).uniform(0.2, 3.0, v))


@pytest.mark.parametrize("name", list(CLASS_WEIGHT_OPTIONS))
def test_class_weights_match_materialised_loss_value_and_all_gradients(name):
    opts = CLASS_WEIGHT_OPTIONS[name]
    h, w, b, y = make(37, 6, 23, ignore=() if "ignore_index" in opts else (3, 30))
    cw = class_weights_for(23)
    # one tile; overlapping last vocabulary and token chunks
    fs = [class_weighted(y, **opts)[1]] + [class_weighted(y, cs, **opts)[0]
                                           for cs in (None, 5, (7, 5))]  # fmt: skip
    vags = [jax.value_and_grad(f, (0, 1, 2, 3)) for f in fs]
    want, *got = jax.jit(lambda *a: [vag(*a) for vag in vags])(h, w, b, cw)
    for g in got:
        assert_tree_close(g, want, 1e-12)


def test_class_weighted_mean_divides_by_the_kept_tokens_class_weights_like_pytorch():
    h, w, b, y = make(12, 4, 9, ignore=(2, 7))
    cw = class_weights_for(9)
    got = jax.jit(
        lambda h, w, b, cw: jbce.linear_softmax_cross_entropy(
            h, w, y, bias=b, class_weights=cw, label_smoothing=0.15, chunk_size=4
        )
    )(h, w, b, cw)
    want = reference.torch_cross_entropy(
        np.asarray(h @ w + b[None, :]), np.asarray(y), weight=np.asarray(cw),
        label_smoothing=0.15,
    )  # fmt: skip
    reference.assert_close(got, want, rtol=1e-12)


def test_class_weights_with_all_tokens_ignored_give_zero_loss_and_gradient():
    h, w, b, y = make(6, 4, 9)
    y = jnp.full_like(y, -100)
    cw = class_weights_for(9)
    fused, _ = class_weighted(y, 4, label_smoothing=0.1)
    loss, grads = jax.jit(jax.value_and_grad(fused, (0, 1, 2, 3)))(h, w, b, cw)
    assert float(loss) == 0.0
    for g in grads:
        assert not np.any(np.asarray(g))


def test_class_weights_with_minus_inf_bias_classes():
    h, w, b, y = make(8, 4, 10, ignore=(1,))
    b = b.at[jnp.array([2, 7])].set(-jnp.inf)
    y = jnp.where((y == 2) | (y == 7), 0, y)
    cw = class_weights_for(10)
    fused, ref = class_weighted(y, 3, label_smoothing=0.2)
    vag = lambda f: jax.value_and_grad(f, (0, 1, 3))(h, w, b, cw)
    got, want = jax.jit(lambda: (vag(fused), vag(ref)))()
    assert_tree_close(got, want, 1e-12)


def test_class_weights_vocabulary_parallel_under_vmap_match_unsharded():
    shards, n, d, v = 3, 7, 4, 12
    h, w, b, y = make(n, d, v, ignore=(2,))
    cw = class_weights_for(v)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3}
    _, ref = class_weighted(y, **opts)

    def sharded(h, w_local, b_local, cw_local):
        out = jbce.linear_softmax_cross_entropy(
            h, w_local, y, bias=b_local, class_weights=cw_local, chunk_size=3,
            axis_name="v", **opts,
        )  # fmt: skip
        return jnp.sum(out)

    w_sh = jnp.moveaxis(w.reshape(d, shards, v // shards), 1, 0)
    b_sh, cw_sh = b.reshape(shards, -1), cw.reshape(shards, -1)
    vag = jax.vmap(jax.value_and_grad(sharded, (0, 1, 3)), in_axes=(None, 0, 0, 0), axis_name="v")
    ref_vag = jax.value_and_grad(ref, (0, 1, 3))
    f = jax.jit(lambda *a: (ref_vag(*a[:4]), vag(a[0], *a[4:])))
    (want_v, (gh, gw, gcw)), (val, (dh, dw, dcw)) = f(h, w, b, cw, w_sh, b_sh, cw_sh)
    assert_tree_close(val, jnp.full((shards,), want_v), 1e-12)
    assert_tree_close(jnp.sum(dh, axis=0), gh, 1e-12)
    assert_tree_close(jnp.moveaxis(dw, 0, 1).reshape(d, v), gw, 1e-12)
    assert_tree_close(dcw.reshape(v), gcw, 1e-12)


@pytest.mark.no_x64
def test_class_weights_in_bfloat16_keep_their_dtype_and_accuracy():
    h, w, b, y = make(64, 16, 300, dtype=jnp.bfloat16, ignore=(5,))
    cw = jnp.asarray(np.random.default_rng(3).uniform(0.5, 2.0, 300), jnp.float32)
    fused, _ = class_weighted(y, 128, label_smoothing=0.1)
    loss, grads = jax.jit(jax.value_and_grad(fused, (0, 1, 3)))(h, w, b, cw)
    assert loss.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]
    with jax.enable_x64(True):
        _, ref = class_weighted(y, label_smoothing=0.1)
        args64 = [a.astype(F64) for a in (h, w, b, cw)]
        want = jax.jit(jax.value_and_grad(ref, (0, 1, 3)))(*args64)
        assert_tree_close((loss, grads), want, 1e-2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"weight": jnp.zeros((5, 9))}, r"weight must have shape \(4, V\)"),
        ({"labels": jnp.zeros((3,), jnp.int32)}, r"labels must have shape \(6,\)"),
        ({"labels": jnp.zeros((6,))}, "labels must be integer"),
        ({"bias": jnp.zeros((8,))}, r"bias must have shape \(9,\)"),
        ({"chunk_size": 0}, "chunk_size must be a positive int"),
        ({"logit_softcap": 0.0}, "logit_softcap must be > 0"),
        ({"reduction": "avg"}, "reduction must be one of"),
        ({"class_weights": jnp.ones((8,))}, r"class_weights must have shape \(9,\)"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    args = {"hidden": jnp.zeros((6, 4)), "weight": jnp.zeros((4, 9)),
            "labels": jnp.zeros((6,), jnp.int32)}  # fmt: skip
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises((ValueError, TypeError), match=match):
        jbce.linear_softmax_cross_entropy(args["hidden"], args["weight"], args["labels"], **kwargs)


def _shard_map_check():
    """(jbce's value and gradients on a 2 x 2 data x vocab mesh, the materialised ones)."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    k = jax.random.split(jax.random.key(0), 4)
    n, d, v = 10, 5, 24
    h = jax.random.normal(k[0], (n, d), F64)
    w = jax.random.normal(k[1], (d, v), F64)
    b = jax.random.normal(k[2], (v,), F64)
    y = jax.random.randint(k[3], (n,), 0, v).at[3].set(-100)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0, reduction="sum")

    def ref(h, w, b):
        return jbce.softmax_cross_entropy_with_integer_labels(h @ w + b[None, :], y, **opts)

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "vocab"))

    def local(h, w, b, y):  # tokens over "data", vocabulary over "vocab"
        out = jbce.linear_softmax_cross_entropy(
            h, w, y, bias=b, chunk_size=5, axis_name="vocab", **opts
        )
        return jax.lax.psum(out, "data")

    specs = (P("data"), P(None, "vocab"), P("vocab"), P("data"))
    f = jax.shard_map(local, mesh=mesh, out_specs=P(), in_specs=specs)
    vag = lambda f: jax.value_and_grad(f, (0, 1, 2))  # noqa: E731
    return jax.jit(lambda h, w, b: (vag(lambda h, w, b: f(h, w, b, y))(h, w, b),
                                    vag(ref)(h, w, b)))(h, w, b)  # fmt: skip


SHARD_MAP_SCRIPT = r"""
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
from tests.test_linear import _shard_map_check
got, want = _shard_map_check()
for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-12, atol=1e-12)
print("OK")
"""


def test_vocabulary_parallel_under_shard_map_on_a_data_by_vocab_mesh():
    # In this process on 4 of the 8 host devices that tests/conftest.py makes; with one
    # device (JBCE_TEST_ONE_DEVICE=1) in a fresh interpreter given 4 (fixed before jax starts).
    if jax.device_count() >= 4:
        got, want = _shard_map_check()
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-12, atol=1e-12)
        return
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    proc = subprocess.run(
        [sys.executable, "-c", SHARD_MAP_SCRIPT], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
