"""Vocabulary-parallel and data-parallel behaviour of the losses on 8 host CPU devices
(``tests/conftest.py`` forces them): ``shard_map``, ``pmap``, ``jit`` with ``NamedSharding``
and 2-D meshes, each compared with the unsharded loss on one device.

Every public loss runs under pmap, batch-sharded jit and shard_map with psum-ed partial sums,
and (the losses that reduce) with ``batch_axis_name`` and micro-batches with ``normalizer``.
The contrastive losses couple every row with every other; their ring is checked in
``tests/test_contrastive.py``. ``pytest tests/test_eight_devices.py -k pmap`` runs a part.
"""

from __future__ import annotations

import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jbce

pytestmark = pytest.mark.no_x64
N_DEV = 8


@pytest.fixture(autouse=True)
def _eight_devices():
    if jax.device_count() < N_DEV:  # only with JBCE_TEST_ONE_DEVICE=1 (tests/conftest.py)
        pytest.skip(f"needs {N_DEV} devices; tests/conftest.py forces them unless told not to")


def vocab_mesh():
    return Mesh(np.array(jax.devices()[:N_DEV]), ("vocab",))


def data_mesh():
    return Mesh(np.array(jax.devices()[:N_DEV]), ("data",))


def close(got, ref, rtol=1e-5, what=""):
    """float32 closeness: rtol per entry, atol relative to the largest reference entry."""
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        scale = max(1.0, float(np.max(np.abs(r), initial=0.0)))
        np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol * scale, err_msg=what)


B, K = 16, 64  # K_local = 8 on 8 shards


def int_ce_case(*, ignore=True, neg_inf=False, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, K)).astype(np.float32) * 3
    labels = rng.integers(0, K, size=B).astype(np.int32)
    if ignore:
        labels[[1, 5, 6]] = -100
    if neg_inf:
        logits[2, 10:50] = -np.inf
        labels[2] = 60  # its target stays possible
    cw = rng.uniform(0.5, 2.0, size=K).astype(np.float32)
    return jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(cw)


# ---------------------------------------------------------------------------------------
# 1. Vocabulary-parallel integer CE: value and gradients equal the unsharded loss.
# ---------------------------------------------------------------------------------------
OPTION_SETS = {
    "plain": {},
    "smoothing_class_weights": {"label_smoothing": 0.1, "class_weights": True},
    "z_loss_softcap": {"z_loss": 1e-2, "logit_softcap": 4.0},
    "everything": {
        "label_smoothing": 0.2,
        "z_loss": 1e-3,
        "logit_softcap": 5.0,
        "class_weights": True,
    },
    "no_ignore_index": {"ignore_index": None},
}


def vocab_parallel_vs_unsharded(opts, reduction, *, where_kind=None, neg_inf=False):
    logits, labels, cw = int_ce_case(
        neg_inf=neg_inf, ignore=opts.get("ignore_index", 0) is not None
    )
    opts = dict(opts)
    use_cw = opts.pop("class_weights", False)
    rng = np.random.default_rng(1)
    weights = jnp.asarray(rng.uniform(0.5, 1.5, size=B).astype(np.float32))
    ex_where = jnp.asarray(rng.uniform(size=B) > 0.2)
    logit_where = jnp.asarray(rng.uniform(size=(B, K)) > 0.3)
    extra = {}
    if where_kind == "example":
        extra = {"where": ex_where, "weights": weights}
    elif where_kind == "logit":
        extra = {"where": logit_where}

    def ref_loss(x, w):
        return jbce.softmax_cross_entropy_with_integer_labels(
            x, labels, class_weights=w if use_cw else None, reduction=reduction, **opts, **extra
        )

    logit_spec = P(None, "vocab")
    where_spec = logit_spec if where_kind == "logit" else P()

    @partial(
        jax.shard_map,
        mesh=vocab_mesh(),
        in_specs=(logit_spec, P("vocab"), P(), where_spec, P()),
        out_specs=P(),
    )
    def sharded(x, w, y, where, wts):
        kw = dict(opts)
        if where_kind is not None:
            kw["where"] = where
        if where_kind == "example":
            kw["weights"] = wts
        return jbce.softmax_cross_entropy_with_integer_labels(
            x, y, class_weights=w if use_cw else None, reduction=reduction,
            axis_name="vocab", **kw,
        )  # fmt: skip

    where_arg = logit_where if where_kind == "logit" else ex_where

    def sh_loss(x, w):
        return sharded(x, w, labels, where_arg, weights)

    def total(f):
        return lambda x, w: jnp.sum(f(x, w))

    argnums = (0, 1) if use_cw else 0
    ref = jax.jit(jax.value_and_grad(total(ref_loss), argnums=argnums))(logits, cw)
    got = jax.jit(jax.value_and_grad(total(sh_loss), argnums=argnums))(logits, cw)
    close(got, ref, what=f"{opts} {reduction} {where_kind}")
    assert np.all(np.isfinite(np.asarray(got[0]))), got[0]
    if reduction == "none":
        close(jax.jit(sh_loss)(logits, cw), ref_loss(logits, cw), what="per-example")


def test_vocab_parallel_options_match_unsharded():
    for name, opts in OPTION_SETS.items():
        for reduction in ("mean", "none") if name == "everything" else ("mean",):
            try:
                vocab_parallel_vs_unsharded(opts, reduction)
            except AssertionError as e:
                raise AssertionError(f"option set {name}, reduction {reduction}") from e


def test_vocab_parallel_masks_and_weights_match_unsharded():
    vocab_parallel_vs_unsharded({}, "mean", where_kind="example", neg_inf=True)
    opts = {"label_smoothing": 0.1, "class_weights": True}
    vocab_parallel_vs_unsharded(opts, "sum", where_kind="logit", neg_inf=True)


def test_vocab_parallel_row_without_classes_has_zero_loss_and_gradient():
    # Checked against the documented behaviour rather than the unsharded path.
    logits, labels, _ = int_ce_case()
    logits = logits.at[3].set(-jnp.inf)
    where = jnp.ones((B, K), bool).at[4].set(False)  # row 4: every class masked out

    def loss(x, reduction):
        f = jax.shard_map(
            lambda x, m: jbce.softmax_cross_entropy_with_integer_labels(
                x, labels, where=m, label_smoothing=0.1, reduction=reduction, axis_name="vocab"
            ),
            mesh=vocab_mesh(), in_specs=(P(None, "vocab"), P(None, "vocab")), out_specs=P(),
        )  # fmt: skip
        return f(x, where)

    per = np.asarray(jax.jit(loss, static_argnums=1)(logits, "none"))
    g = np.asarray(jax.jit(jax.grad(loss), static_argnums=1)(logits, "mean"))
    assert per[3] == 0 and per[4] == 0, per
    assert np.all(g[3:5] == 0), g[3:5]
    assert np.all(np.isfinite(per)) and np.all(np.isfinite(g))
    kept = np.asarray((labels != -100).at[3].set(False).at[4].set(False))
    rows = np.flatnonzero(kept)
    ref = jbce.softmax_cross_entropy_with_integer_labels(
        logits[rows], labels[rows], label_smoothing=0.1, reduction="none"
    )
    close(per[rows], ref)


def test_vocab_parallel_out_of_range_label_is_nan_like_unsharded():
    logits, labels, _ = int_ce_case()
    labels = labels.at[0].set(K)  # out of the global range: NaN for that example
    f = jax.shard_map(
        lambda x, y: jbce.softmax_cross_entropy_with_integer_labels(
            x, y, reduction="none", axis_name="vocab"
        ),
        mesh=vocab_mesh(), in_specs=(P(None, "vocab"), P()), out_specs=P(),
    )  # fmt: skip
    got = np.asarray(jax.jit(f)(logits, labels))
    ref = np.asarray(
        jbce.softmax_cross_entropy_with_integer_labels(logits, labels, reduction="none")
    )
    assert np.isnan(got[0]) and np.isnan(ref[0]), (got[0], ref[0])
    close(got[1:], ref[1:])


def test_vocab_parallel_never_gathers_logits():
    logits, labels, _ = int_ce_case()

    def loss(x):
        f = jax.shard_map(
            lambda x, y: jbce.softmax_cross_entropy_with_integer_labels(x, y, axis_name="vocab"),
            mesh=vocab_mesh(), in_specs=(P(None, "vocab"), P()), out_specs=P(),
        )  # fmt: skip
        return f(x, labels)

    hlo = jax.jit(jax.value_and_grad(loss)).lower(logits).compile().as_text()
    assert "all-gather" not in hlo, "the vocabulary-parallel loss gathers something"
    assert "all-reduce" in hlo, "expected the statistics to be all-reduced"


def test_vocab_parallel_under_pmap_gives_unsharded_gradients():
    # pmap transposes psum differently from shard_map; the custom VJP must not care.
    logits, labels, cw = int_ce_case()
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3}
    shards = logits.reshape(B, N_DEV, K // N_DEV).transpose(1, 0, 2)
    cw_shards = cw.reshape(N_DEV, K // N_DEV)

    def local(x, w):
        return jbce.softmax_cross_entropy_with_integer_labels(
            x, labels, class_weights=w, axis_name="vocab", **opts
        )

    val, (gx, gw) = jax.pmap(jax.value_and_grad(local, argnums=(0, 1)), axis_name="vocab")(
        shards, cw_shards
    )
    ref, (rx, rw) = jax.jit(
        jax.value_and_grad(
            lambda x, w: jbce.softmax_cross_entropy_with_integer_labels(
                x, labels, class_weights=w, **opts
            ),
            argnums=(0, 1),
        )
    )(logits, cw)
    close(val, np.full(N_DEV, ref))
    close(gx.transpose(1, 0, 2).reshape(B, K), rx)
    close(gw.reshape(K), rw)


def test_vocab_parallel_bf16_logits_keep_dtype():
    logits, labels, _ = int_ce_case()
    x16 = logits.astype(jnp.bfloat16)
    f = jax.shard_map(
        lambda x: jbce.softmax_cross_entropy_with_integer_labels(x, labels, axis_name="vocab"),
        mesh=vocab_mesh(), in_specs=P(None, "vocab"), out_specs=P(),
    )  # fmt: skip
    val, g = jax.jit(jax.value_and_grad(f))(x16)
    ref, rg = jax.jit(jax.value_and_grad(jbce.softmax_cross_entropy_with_integer_labels))(
        x16, labels
    )
    assert val.dtype == jnp.float32 and g.dtype == jnp.bfloat16, (val.dtype, g.dtype)
    close(val, ref, rtol=1e-5)
    close(g.astype(jnp.float32), rg.astype(jnp.float32), rtol=1e-2)


def test_vocab_parallel_over_a_tuple_of_axes_matches_unsharded():
    # Classes sharded over two mesh axes at once: P(None, ("x", "y")), axis_name=("x", "y").
    logits, labels, cw = int_ce_case()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))
    axes = ("x", "y")
    kw = {"label_smoothing": 0.1, "z_loss": 1e-3}
    f = jax.shard_map(
        lambda x, w: jbce.softmax_cross_entropy_with_integer_labels(
            x, labels, class_weights=w, axis_name=axes, **kw
        ),
        mesh=mesh, in_specs=(P(None, axes), P(axes)), out_specs=P(),
    )  # fmt: skip
    got = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(logits, cw)
    ref = jax.jit(
        jax.value_and_grad(
            lambda x, w: jbce.softmax_cross_entropy_with_integer_labels(
                x, labels, class_weights=w, **kw
            ),
            argnums=(0, 1),
        )
    )(logits, cw)
    close(got, ref)


def test_linear_vocab_parallel_matches_unsharded():
    # The fused linear loss with the weight's vocabulary axis sharded: value and the
    # gradients of hidden (replicated over "vocab") and of the weight shards.
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(B, 12)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(12, K)) / 3, jnp.float32)
    _, labels, _ = int_ce_case()
    kw = {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 6.0}
    f = jax.shard_map(
        lambda h, w: jbce.linear_softmax_cross_entropy(h, w, labels, axis_name="vocab", **kw),
        mesh=vocab_mesh(), in_specs=(P(), P(None, "vocab")), out_specs=P(),
    )  # fmt: skip
    got = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, w)
    ref = jax.jit(
        jax.value_and_grad(
            lambda h, w: jbce.softmax_cross_entropy_with_integer_labels(h @ w, labels, **kw),
            argnums=(0, 1),
        )
    )(h, w)
    close(got, ref)


def class_weighted_case(seed, d):
    """(hidden [B, d], weight [d, K], labels, class weights, ("data", "vocab") = (2, 4) mesh)
    for the fused loss with class weights: the first data shard keeps a single token."""
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(B, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, K)) / 3, jnp.float32)
    _, labels, cw = int_ce_case()
    labels = labels.at[: B // 2].set(-100).at[B // 2].set(3)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "vocab"))
    return h, w, labels, cw, mesh


def class_weighted_reference(h, w, labels, cw, kw):
    """Value and (d hidden, d weight, d class weights) of the materialised loss."""
    return jax.jit(
        jax.value_and_grad(
            lambda h, w, c: jbce.softmax_cross_entropy_with_integer_labels(
                h @ w, labels, class_weights=c, **kw
            ),
            (0, 1, 2),
        )
    )(h, w, cw)


def _linear_pallas_under_shard_map(h, w, labels, cw, mesh, kw):
    """Both kernel sets (interpreted) in shard_map against the materialised loss, with ``kw``."""
    from jbce._linear import pallas as _linear_pallas

    def local(h, w, y, c):
        return jbce.linear_softmax_cross_entropy(
            h, w, y, class_weights=c, axis_name="vocab", batch_axis_name="data",
            implementation="pallas", **kw,
        )  # fmt: skip

    @partial(
        jax.shard_map, mesh=mesh, check_vma=False,
        in_specs=(P("data"), P(None, "vocab"), P("data"), P("vocab")),
        out_specs=(P(), P("data"), P(None, "vocab"), P("vocab")),
    )  # fmt: skip
    def value_and_grads(h, w, y, c):
        # Differentiated inside (the pmap convention): the transpose of the mean's psum over
        # "data" is a psum, so each device holds 2x its share; d hidden is summed over the
        # vocabulary shards' contributions.
        val, (dh, dw, dc) = jax.value_and_grad(local, (0, 1, 3))(h, w, y, c)
        dh = jax.lax.psum(dh, "vocab") / 2
        return val, dh, jax.lax.pmean(dw, "data"), jax.lax.pmean(dc, "data")

    ref = class_weighted_reference(h, w, labels, cw, kw)
    for platform, blocks in (("gpu", (16, 16, 16, 16)), ("tpu", (8, 128))):
        with _linear_pallas.interpret(platform, block_sizes=blocks):
            val, *grads = jax.jit(value_and_grads)(h, w, labels, cw)
        close((val, tuple(grads)), ref, what=f"{platform} {kw}")


def test_linear_pallas_kernels_under_shard_map_match_unsharded():
    # implementation="pallas", both kernel sets in interpret mode, inside shard_map on a
    # ("data", "vocab") = (2, 4) mesh: class weights over "vocab", the global PyTorch mean
    # over "data" through batch_axis_name; value and d hidden, d weight, d class_weights,
    # with class weights alone (w_y) and with label smoothing (the kernels' weighted sums,
    # merged over "vocab").
    # check_vma=False: Pallas' interpret mode evaluates the kernel with replicated block
    # indices against varying refs, which JAX's type check refuses; compiled, the kernels
    # take check_vma=True (tests/test_accelerators.py compiles that for H100 and TPU).
    h, w, labels, cw, mesh = class_weighted_case(8, 16)
    for kw in ({"z_loss": 1e-3, "logit_softcap": 6.0}, {"label_smoothing": 0.2, "z_loss": 1e-3}):
        _linear_pallas_under_shard_map(h, w, labels, cw, mesh, kw)


def _lp_objective(lp, ent):
    """A per-token mix of both outputs (as a policy-gradient loss with an entropy bonus)."""
    a = jnp.linspace(-1.0, 2.0, lp.shape[0], dtype=jnp.float32)
    return jnp.sum(a * lp) + 0.1 * jnp.sum(ent)


def _materialised_log_probs(h, w, b, y, t):
    ls = jax.nn.log_softmax((h @ w + b) / t)
    p = jnp.exp(ls)
    ent = -jnp.sum(p * jnp.where(p == 0, 0, ls), axis=-1)
    return jnp.take_along_axis(ls, y[:, None], axis=-1)[:, 0], ent


def test_linear_log_probs_vocab_parallel_matches_unsharded():
    # linear_log_probs with the weight's (and bias') vocabulary axis sharded over 8 devices,
    # a -inf bias class and a traced temperature: both outputs and the gradients of hidden
    # (replicated), weight and bias shards and temperature.
    rng = np.random.default_rng(5)
    h = jnp.asarray(rng.normal(size=(B, 12)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(12, K)) / 3, jnp.float32)
    b = jnp.asarray(rng.normal(size=K), jnp.float32).at[9].set(-jnp.inf)
    labels = jnp.asarray(rng.integers(0, K, size=B), jnp.int32)
    labels = jnp.where(labels == 9, 0, labels)
    t = jnp.asarray(0.8, jnp.float32)
    sharded = jax.shard_map(
        lambda h, w, b, t: jbce.linear_log_probs(
            h, w, labels, bias=b, temperature=t, chunk_size=3, axis_name="vocab"
        ),
        mesh=vocab_mesh(), in_specs=(P(), P(None, "vocab"), P("vocab"), P()), out_specs=P(),
    )  # fmt: skip
    close(jax.jit(sharded)(h, w, b, t), _materialised_log_probs(h, w, b, labels, t))
    got = jax.jit(jax.value_and_grad(lambda *a: _lp_objective(*sharded(*a)), (0, 1, 2, 3)))(
        h, w, b, t
    )
    # (-1e30 for the reference: d(-inf / T)/dT is NaN there, though its cotangent is 0.)
    b_ref = jnp.where(jnp.isfinite(b), b, -1e30)
    ref = jax.jit(
        jax.value_and_grad(
            lambda h, w, b, t: _lp_objective(*_materialised_log_probs(h, w, b, labels, t)),
            (0, 1, 2, 3),
        )
    )(h, w, b_ref, t)
    close(got, ref)
    hlo = jax.jit(jax.grad(lambda *a: _lp_objective(*sharded(*a)))).lower(h, w, b, t)
    assert "all-gather" not in hlo.compile().as_text(), "linear_log_probs gathers something"


def test_linear_class_weights_data_and_vocab_parallel_give_global_mean():
    # The fused loss with class weights on a ("data", "vocab") = (2, 4) mesh: tokens over
    # "data", weight columns and class weights over "vocab"; the global PyTorch mean is
    # psum(sum) / psum(the class weights of the kept tokens' labels).
    h, w, labels, cw, mesh = class_weighted_case(6, 12)
    kw = {"label_smoothing": 0.1, "z_loss": 1e-3}

    @partial(
        jax.shard_map, mesh=mesh,
        in_specs=(P("data"), P(None, "vocab"), P("data"), P("vocab")), out_specs=P(),
    )  # fmt: skip
    def loss(h, w, y, c):
        total = jbce.linear_softmax_cross_entropy(
            h, w, y, class_weights=c, reduction="sum", axis_name="vocab", **kw
        )
        # The mean's denominator: the class weight of each kept token's label, which lives
        # on one "vocab" shard.
        local = y - jax.lax.axis_index("vocab") * c.shape[0]
        here = (y != -100) & (local >= 0) & (local < c.shape[0])
        den = jnp.sum(jnp.where(here, c[jnp.clip(local, 0, c.shape[0] - 1)], 0))
        return jax.lax.psum(total, "data") / jax.lax.psum(den, ("data", "vocab"))

    got = jax.jit(jax.value_and_grad(loss, (0, 1, 3)))(h, w, labels, cw)
    ref = class_weighted_reference(h, w, labels, cw, kw)
    close(got, ref)
    # On one "vocab" axis alone the mean comes out of the loss itself.
    mean = jax.shard_map(
        lambda h, w, c: jbce.linear_softmax_cross_entropy(
            h, w, labels, class_weights=c, axis_name="vocab", **kw
        ),
        mesh=vocab_mesh(), in_specs=(P(), P(None, "vocab"), P("vocab")), out_specs=P(),
    )  # fmt: skip
    close(jax.jit(jax.value_and_grad(mean, (0, 1, 2)))(h, w, cw), ref)


def test_data_and_vocab_parallel_2d_mesh_gives_global_mean():
    # Batch over "data" (2), classes over "vocab" (4): per-shard sums and counts are
    # psum-ed over "data"; ignored tokens are counted globally.
    logits, labels, cw = int_ce_case()
    labels = labels.at[: B // 2].set(-100).at[B // 2].set(3)  # first data shard: 1 token
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "vocab"))

    @partial(
        jax.shard_map, mesh=mesh,
        in_specs=(P("data", "vocab"), P("data"), P("vocab")), out_specs=P(),
    )  # fmt: skip
    def loss(x, y, w):
        total = jbce.softmax_cross_entropy_with_integer_labels(
            x, y, class_weights=w, reduction="sum", axis_name="vocab"
        )
        # The mean's denominator: the summed class weight of the kept targets; each
        # "vocab" shard holds a slice of the weights, so psum over both axes.
        local = jnp.clip(y - jax.lax.axis_index("vocab") * w.shape[0], 0, w.shape[0] - 1)
        on = (y != -100) & (y - jax.lax.axis_index("vocab") * w.shape[0] == local)
        den = jax.lax.psum(jnp.sum(jnp.where(on, w[local], 0)), ("data", "vocab"))
        return jax.lax.psum(total, "data") / den

    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 2)))(logits, labels, cw)
    ref = jax.jit(
        jax.value_and_grad(
            lambda x, w: jbce.softmax_cross_entropy_with_integer_labels(x, labels, class_weights=w),
            argnums=(0, 1),
        )
    )(logits, cw)
    close(got, ref)


# ---------------------------------------------------------------------------------------
# 2. Every public loss, data parallel: pmap, jit + NamedSharding, shard_map + psum.
# ---------------------------------------------------------------------------------------
# The contrastive losses couple every row with every other (a B x B similarity matrix): per-shard
# sums do not add up to them. Their ring on 1, 4 and 8 devices is checked against the float64
# dense reference in tests/test_contrastive.py.
BATCH_COUPLED = frozenset({"clip_loss", "siglip_loss"})
# Every public loss but the batch-coupled ones; and those of them that reduce (entropy and
# linear_log_probs return per-row values: nothing to reduce, no batch_axis_name).
EACH_LOSS = [name for name in jbce.__all__ if name not in BATCH_COUPLED]
REDUCED_LOSSES = [name for name in EACH_LOSS if name not in ("entropy", "linear_log_probs")]


@functools.cache
def loss_cases():
    """name -> (loss(*args, **kw), args with batch axis 0, kwargs, where for the count or None).

    ``args[0]`` is differentiated. ``where`` masks (unevenly spread over the 8 shards) are
    passed only to losses that take them; the list below is every public loss.
    """
    n, rng = B, np.random.default_rng(2)
    x = rng.normal(size=(n, 5)).astype(np.float32) * 2
    y = (rng.uniform(size=(n, 5)) > 0.5).astype(np.float32)
    probs = rng.uniform(0.01, 0.99, size=(n, 5)).astype(np.float32)
    where = rng.uniform(size=(n, 5)) > 0.3
    where[:4] = False  # two whole shards contribute nothing
    logits = rng.normal(size=(n, 7)).astype(np.float32)
    soft = rng.dirichlet(np.ones(7), size=n).astype(np.float32)
    ex_where = rng.uniform(size=n) > 0.3
    ex_where[:3] = False  # and the first micro-batch of MICRO neither
    labels = rng.integers(0, 7, size=n).astype(np.int32)
    labels[[0, 1, 2, 3, 5, 9]] = -100  # uneven: shards 0 and 1 are fully ignored
    cases = {
        "sigmoid_binary_cross_entropy": (
            jbce.sigmoid_binary_cross_entropy, (x, y), {"label_smoothing": 0.1}, where),
        "binary_cross_entropy": (jbce.binary_cross_entropy, (probs, y), {}, where),
        "sigmoid_focal_loss": (jbce.sigmoid_focal_loss, (x, y), {"alpha": 0.25}, where),
        "softmax_cross_entropy": (jbce.softmax_cross_entropy, (logits, soft), {}, ex_where),
        "softmax_cross_entropy_with_integer_labels": (
            jbce.softmax_cross_entropy_with_integer_labels, (logits, labels),
            {"label_smoothing": 0.1}, labels != -100),
        "discriminator_loss": (jbce.discriminator_loss, (x[:, 0], x[:, 1]), None, None),
        "generator_loss": (jbce.generator_loss, (x[:, 0],), None, None),
        "entropy": (jbce.entropy, (soft,), None, None),
        "kl_divergence": (jbce.kl_divergence, (logits, soft), {}, ex_where),
        "jensen_shannon_divergence": (
            jbce.jensen_shannon_divergence, (logits, logits[::-1]), {"beta": 0.3}, ex_where),
        "nll_loss": (jbce.nll_loss, (np.asarray(jax.nn.log_softmax(logits)), labels), {},
                     labels != -100),
        "categorical_cross_entropy": (
            jbce.categorical_cross_entropy, (np.asarray(jax.nn.softmax(logits)), soft), {},
            ex_where),
        "softmax_focal_loss": (jbce.softmax_focal_loss, (logits, soft), {"gamma": 1.5}, ex_where),
        "softmax_focal_loss_with_integer_labels": (
            jbce.softmax_focal_loss_with_integer_labels, (logits, labels), {"gamma": 1.5},
            labels != -100),
        "poly_loss_cross_entropy": (
            jbce.poly_loss_cross_entropy, (logits, soft), {"epsilon": 1.0}, ex_where),
    }  # fmt: skip
    if hasattr(jbce, "linear_softmax_cross_entropy"):
        h = rng.normal(size=(n, 6)).astype(np.float32)
        w = rng.normal(size=(6, 7)).astype(np.float32)
        cases["linear_softmax_cross_entropy"] = (
            lambda hh, yy, **kw: jbce.linear_softmax_cross_entropy(hh, jnp.asarray(w), yy, **kw),
            (h, labels), {"label_smoothing": 0.1}, labels != -100,
        )  # fmt: skip
    if hasattr(jbce, "linear_log_probs"):  # per-token outputs: no reduction, valid labels
        h = rng.normal(size=(n, 6)).astype(np.float32)
        w = rng.normal(size=(6, 7)).astype(np.float32)
        cases["linear_log_probs"] = (
            lambda hh, yy: (lambda lp, ent: lp + 0.5 * ent)(
                *jbce.linear_log_probs(hh, jnp.asarray(w), yy)
            ),
            (h, np.maximum(labels, 0)), None, None,
        )  # fmt: skip
    if hasattr(jbce, "linear_distillation_loss"):
        hs, hts = rng.normal(size=(n, 6)), rng.normal(size=(n, 4))
        ws, wts = rng.normal(size=(6, 7)) / 2, rng.normal(size=(4, 7)) / 2
        cases["linear_distillation_loss"] = (
            lambda hh, tt, yy, **kw: jbce.linear_distillation_loss(
                hh, jnp.asarray(ws, jnp.float32), tt, jnp.asarray(wts, jnp.float32), labels=yy,
                **kw),
            (hs.astype(np.float32), hts.astype(np.float32), labels), {"beta": 0.3},
            labels != -100,
        )  # fmt: skip
    assert set(jbce.__all__) - BATCH_COUPLED <= set(cases), set(jbce.__all__) - set(cases)
    return {
        k: (f, tuple(jnp.asarray(a) for a in args), kw, wh)
        for k, (f, args, kw, wh) in cases.items()
    }


def per_example_sum(f, kw):
    """A loss whose value is the sum over the batch (so shards add up exactly)."""
    if kw is None:  # losses without a reduction option: a mean, or per-example values
        return lambda *a: jnp.sum(f(*a)) * (a[0].shape[0] if jnp.ndim(f(*a)) == 0 else 1)
    return lambda *a: f(*a, reduction="sum", **kw)


@pytest.mark.parametrize("name", EACH_LOSS)
def test_loss_under_pmap_matches_unsharded(name):
    f, args, kw, _ = loss_cases()[name]
    total = per_example_sum(f, kw)
    ref, rg = jax.jit(jax.value_and_grad(total))(*args)
    split = [a.reshape((N_DEV, -1) + a.shape[1:]) for a in args]
    val, g = jax.pmap(jax.value_and_grad(total), axis_name="d")(*split)
    close(jnp.sum(val), ref, what=name)
    close(g.reshape(rg.shape), rg, what=name)


@pytest.mark.parametrize("name", EACH_LOSS)
def test_loss_under_jit_with_batch_sharding_matches_unsharded(name):
    f, args, kw, _ = loss_cases()[name]
    loss = (lambda *a: jnp.mean(f(*a))) if kw is None else partial(f, **kw)
    ref, rg = jax.jit(jax.value_and_grad(loss))(*args)
    sharded = [
        jax.device_put(a, NamedSharding(data_mesh(), P("data", *([None] * (a.ndim - 1)))))
        for a in args
    ]
    val, g = jax.jit(jax.value_and_grad(loss))(*sharded)
    assert len(sharded[0].sharding.device_set) == N_DEV
    close(val, ref, what=name)
    close(g, rg, what=name)
    assert g.sharding.is_equivalent_to(sharded[0].sharding, g.ndim), (name, g.sharding)


@pytest.mark.parametrize("name", EACH_LOSS)
def test_shard_map_psum_of_partial_sums_gives_global_mean(name):
    # Each shard returns (sum, count); psum of both gives the global "mean", with masked
    # and ignored terms counted globally. The mean of per-shard means does not.
    f, args, kw, where = loss_cases()[name]
    integer = "integer" in name or "linear" in name  # the ignored labels are the mask
    if kw is None:  # no reduction option: per-example values or a mean of equal shards
        loss = lambda *a: jnp.mean(f(*a))
        sm = jax.shard_map(
            lambda *a: jax.lax.pmean(loss(*a), "data"),
            mesh=data_mesh(), in_specs=tuple(P("data") for _ in args), out_specs=P(),
        )  # fmt: skip
        got = jax.jit(jax.value_and_grad(sm))(*args)
        close(got, jax.jit(jax.value_and_grad(loss))(*args), what=name)
        return
    where = jnp.asarray(where)

    def local_mean(*a):
        *a, wh = a
        extra = {} if integer else {"where": wh}
        s = f(*a, reduction="sum", **kw, **extra)
        c = jnp.sum(jnp.broadcast_to(wh, a[0].shape[: wh.ndim]).astype(jnp.float32))
        naive = jax.lax.pmean(f(*a, reduction="mean", **kw, **extra), "data")
        return jax.lax.psum(s, "data") / jax.lax.psum(c, "data"), naive

    specs = tuple(P("data") for _ in (*args, where))
    sm = jax.shard_map(local_mean, mesh=data_mesh(), in_specs=specs, out_specs=(P(), P()))
    wkw = {} if integer else {"where": where}
    ref, rg = jax.jit(jax.value_and_grad(lambda *a: f(*a, **kw, **wkw)))(*args)
    (got, naive), g = jax.jit(jax.value_and_grad(lambda *a: sm(*a, where), has_aux=True))(*args)
    close(got, ref, what=name)
    close(g, rg, what=name)
    assert abs(float(naive) - float(ref)) > 1e-3, (name, "uneven masks should matter")


# ---------------------------------------------------------------------------------------
# 3. Global means: batch_axis_name (sharded batch) and normalizer (micro-batches).
# ---------------------------------------------------------------------------------------


def _masked_call(name, f, kw):
    """``f`` with its mask passed as a last positional argument (ignored labels mask themselves)."""
    integer = "integer" in name or "linear" in name or name == "nll_loss"
    if kw is None:  # the GAN losses: no reduction, no mask
        return lambda *a, **extra: f(*a[:-1], **extra)
    return lambda *a, **extra: f(*a[:-1], **kw, **({} if integer else {"where": a[-1]}), **extra)


def _with_mask(args, where):
    mask = jnp.ones(args[0].shape[:1], bool) if where is None else jnp.asarray(where)
    return (*args, mask)


def _masked_case(name):
    """(the loss taking its mask last, its arguments with the mask, kwargs, the case's
    ``where``, the unsharded value and gradient)."""
    f, args, kw, where = loss_cases()[name]
    call = _masked_call(name, f, kw)
    args = _with_mask(args, where)
    return call, args, kw, where, jax.jit(jax.value_and_grad(call))(*args)


@pytest.mark.parametrize("name", REDUCED_LOSSES)
def test_batch_axis_name_gives_global_mean(name):
    # Shards hold unequal numbers of included terms (two hold none); with batch_axis_name
    # every shard returns the global mean, and the gradients are the unsharded ones under
    # shard_map (with and without check_vma). Under pmap, differentiated on each device,
    # psum transposes to psum: each device's gradient is N_DEV times its share, and the
    # pmean of the usual data-parallel step gives the unsharded gradient.
    call, args, kw, _, (ref, rg) = _masked_case(name)
    specs = tuple(P("data") for _ in args)
    for check_vma in (True, False):
        sm = jax.shard_map(
            lambda *a: call(*a, batch_axis_name="data"),
            mesh=data_mesh(), in_specs=specs, out_specs=P(), check_vma=check_vma,
        )  # fmt: skip
        got, g = jax.jit(jax.value_and_grad(sm))(*args)
        close(got, ref, what=f"{name} check_vma={check_vma}")
        close(g, rg, what=f"{name} check_vma={check_vma}")
    split = [a.reshape((N_DEV, -1) + a.shape[1:]) for a in args]
    val, g = jax.pmap(jax.value_and_grad(lambda *a: call(*a, batch_axis_name="d")), axis_name="d")(
        *split
    )
    close(val, jnp.broadcast_to(ref, val.shape), what=f"{name} pmap")
    close(g.reshape(rg.shape) / N_DEV, rg, what=f"{name} pmap")
    if kw is not None:  # "sum" is the global sum
        got = jax.jit(
            jax.shard_map(
                lambda *a: call(*a, batch_axis_name="data", reduction="sum"),
                mesh=data_mesh(),
                in_specs=specs,
                out_specs=P(),
            )  # fmt: skip
        )(*args)
        close(got, call(*args, reduction="sum"), what=f"{name} sum")


# Unequal micro-batches; the first holds no included term for any loss (see loss_cases).
MICRO = ((0, 3), (3, 4), (4, 11), (11, B))


def _included_count(name, args, where):
    """The whole batch's mean denominator: included terms (elements, rows or tokens)."""
    if where is None:
        return args[0].size
    return jnp.sum(jnp.broadcast_to(jnp.asarray(where), args[0].shape[: jnp.ndim(where)]))


@pytest.mark.parametrize("name", REDUCED_LOSSES)
def test_micro_batches_with_normalizer_add_up_to_full_batch(name):
    # Gradient accumulation: each micro-batch's loss with normalizer = the whole batch's
    # count; the losses and the gradients add up to the whole batch's mean and gradient.
    call, args, kw, where, (ref, rg) = _masked_case(name)
    parts = [tuple(a[lo:hi] for a in args) for lo, hi in MICRO]
    if kw is None:  # GAN losses take no normalizer: equal micro-batches, mean of means
        parts = [tuple(a[i::4] for a in args) for i in range(4)]
        vals = [jax.value_and_grad(call)(*p) for p in parts]
        close(sum(v for v, _ in vals) / 4, ref, what=name)
        return
    assert not bool(jnp.any(parts[0][-1])), (name, "the first micro-batch includes nothing")
    count = _included_count(name, args[:-1], where)
    step = jax.jit(jax.value_and_grad(lambda *a: call(*a[:-1], normalizer=a[-1])))
    vals = [step(*p, count) for p in parts]
    close(sum(v for v, _ in vals), ref, what=name)
    close(jnp.concatenate([g for _, g in vals]), rg, what=name)
    # A traced normalizer works as a jit argument; a Python number too.
    close(call(*args, normalizer=float(count)), ref, what=name)


def test_micro_batches_with_class_weights_use_the_summed_target_weight():
    logits, labels, cw = int_ce_case()
    full = partial(jbce.softmax_cross_entropy_with_integer_labels, class_weights=cw)
    ref, rg = jax.jit(jax.value_and_grad(full))(logits, labels)
    den = jnp.sum(jnp.where(labels != -100, cw[jnp.maximum(labels, 0)], 0.0))
    step = jax.jit(jax.value_and_grad(lambda x, y, n: full(x, y, normalizer=n)))
    total, grads = 0.0, []
    for lo, hi in ((0, 2), (2, 7), (7, B)):
        v, g = step(logits[lo:hi], labels[lo:hi], den)
        total, grads = total + v, [*grads, g]
    close(total, ref)
    close(jnp.concatenate(grads), rg)


def test_kl_batchmean_with_batch_axis_name_divides_by_the_global_batch():
    f, args, _, _ = loss_cases()["kl_divergence"]
    loss = partial(f, reduction="batchmean")
    ref, rg = jax.value_and_grad(loss)(*args)
    sm = jax.shard_map(
        lambda *a: loss(*a, batch_axis_name="data"),
        mesh=data_mesh(), in_specs=(P("data"), P("data")), out_specs=P(),
    )  # fmt: skip
    got, g = jax.jit(jax.value_and_grad(sm))(*args)
    close(got, ref)
    close(g, rg)
