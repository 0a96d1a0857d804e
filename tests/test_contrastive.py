"""CLIP's and SigLIP's contrastive losses (jbce.clip_loss, jbce.siglip_loss).

The value in every reduction, the gradients w.r.t. x, y, scale and bias and the Hessian
against the float64 dense reference of tests/reference.py (``ref_clip_loss``,
``ref_siglip_loss``: the ``[B, B]`` matrix, the textbook formulas) on random pairs, duplicate
ids, near-identical embeddings, one pair and no pairs, in one tile, in tiles not dividing the
batch and on 8 devices, are the conformance matrix's (tests/matrix.py, ``clip_loss`` and
``siglip_loss``). This file checks the rest against the same reference: float32 accuracy
bounds, dtypes, hyperparameter kinds, residuals, memory, errors. Float64 unless a test says
otherwise (conftest turns x64 on). The ring on 1, 4 and 8 of the 8 host devices that
tests/conftest.py forces is checked last.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jbce
from tests import reference

pytestmark = pytest.mark.jax_strict

ROOT = Path(__file__).resolve().parent.parent
F64 = jnp.float64
SCALE, BIAS = 3.0, -2.0


def clip(x, y, s, b, **kw):
    return jbce.clip_loss(x, y, scale=s, **kw)


def siglip(x, y, s, b, **kw):
    return jbce.siglip_loss(x, y, scale=s, bias=b, **kw)


def ref_clip(x, y, s, b, **kw):
    return reference.ref_clip_loss(x, y, scale=s, xp=jnp, **kw)


def ref_siglip(x, y, s, b, **kw):
    return reference.ref_siglip_loss(x, y, scale=s, bias=b, xp=jnp, **kw)


# name -> (loss, float64 reference, differentiable arguments among (x, y, scale, bias))
LOSSES = {"clip": (clip, ref_clip, (0, 1, 2)), "siglip": (siglip, ref_siglip, (0, 1, 2, 3))}


def make(b, d=5, *, dtype=F64, seed=0):
    # (NumPy's generator: jax.random op by op compiles its kernels for every shape)
    x, y = np.random.default_rng(seed).normal(size=(2, b, d))
    return jnp.asarray(x, dtype), jnp.asarray(y, dtype)


def jitted(fn):
    """``fn`` compiled as one program when called: op by op, each primitive would compile
    on its own (a loss and its reference's gradients: 4.5 s of CPU eagerly, 0.9 s jitted)."""
    return lambda *args, **kwargs: jax.jit(lambda: fn(*args, **kwargs))()


def duplicate_ids(b):
    """Ids with several pairs sharing one (duplicate captions) and some alone."""
    return jnp.asarray(np.random.default_rng(1).integers(0, max(1, b // 2), size=b), jnp.int32)


def assert_tree_close(got, want, rtol):
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        r = np.asarray(r, np.float64)
        scale = max(float(np.max(np.abs(r), initial=0.0)), 1e-300)
        np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=rtol, atol=rtol * scale)


def vag(f, argnums, *args):
    return jax.jit(jax.value_and_grad(f, argnums))(*args)


def test_duplicate_ids_share_the_target_mass_uniformly():
    # Pairs 0 and 1 share an id: with identical captions (y0 == y1) the image-to-text
    # targets put 1/2 on each, so row 0's CE is log-sum-exp minus the mean of two logits.
    x = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], F64)
    y = jnp.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]], F64)
    got = jitted(jbce.clip_loss)(x, y, scale=2.0, ids=jnp.array([7, 7, 3]), reduction="none")
    logits = 2.0 * x @ y.T
    lse_r, lse_c = jax.nn.logsumexp(logits, 1), jax.nn.logsumexp(logits, 0)
    row0 = lse_r[0] - (logits[0, 0] + logits[0, 1]) / 2
    col0 = lse_c[0] - (logits[0, 0] + logits[1, 0]) / 2
    np.testing.assert_allclose(got[0], (row0 + col0) / 2, rtol=1e-13)


@pytest.mark.no_x64
@pytest.mark.parametrize("name", list(LOSSES))
def test_scale_100_with_near_identical_embeddings_is_as_exact_as_float32_allows(name):
    # Unit vectors 1e-3 apart: every logit is within 0.1 of 100, the loss is ~log B and its
    # gradient made of differences of nearly equal softmax terms. The float32 loss is within
    # twice the error of the dense float32 loss (float32 logits near 100 are rounded to 4e-6)
    # of the float64 one.
    b = 24
    base = jnp.asarray(np.random.default_rng(0).normal(size=(1, 16)), jnp.float32)
    noise = 1e-3 * jnp.asarray(np.random.default_rng(1).normal(size=(2, b, 16)), jnp.float32)
    unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    x, y = unit(base + noise[0]), unit(base + noise[1])
    loss, ref, argnums = LOSSES[name]
    got = vag(lambda *a: loss(*a, chunk_size=(7, 5)), argnums, x, y, 100.0, -10.0)
    with warnings.catch_warnings():  # without x64: the dense loss in float32
        warnings.simplefilter("ignore", UserWarning)
        dense32 = vag(ref, argnums, x, y, 100.0, -10.0)
    with jax.enable_x64(True):
        want = vag(ref, argnums, x.astype(F64), y.astype(F64), 100.0, -10.0)
    assert got[0].dtype == jnp.float32 and want[0].dtype == F64  # float64 in float64
    for g, d, w in zip(*(jax.tree.leaves(t) for t in (got, dense32, want)), strict=True):
        g, d, w = (np.asarray(a, np.float64) for a in (g, d, w))
        assert np.all(np.isfinite(g))
        bound = 2 * np.max(np.abs(d - w)) + 1e-6 * np.max(np.abs(w))
        assert np.max(np.abs(g - w)) <= bound, (np.max(np.abs(g - w)), bound)


@pytest.mark.no_x64
@pytest.mark.parametrize("name", list(LOSSES))
def test_bfloat16_embeddings_give_a_float32_loss_and_bfloat16_gradients(name):
    x, y = make(40, 16, dtype=jnp.bfloat16)
    loss, ref, argnums = LOSSES[name]
    scale, bias = jnp.float32(SCALE), jnp.float32(BIAS)
    f = lambda *a: loss(*a, ids=duplicate_ids(40), chunk_size=16)
    got = vag(f, argnums, x, y, scale, bias)
    assert got[0].dtype == jnp.float32
    assert [g.dtype for g in got[1]] == [jnp.bfloat16] * 2 + [jnp.float32] * (len(argnums) - 2)
    with jax.enable_x64(True):  # the float64 result of the same (rounded) inputs, jitted
        r = lambda *a: ref(*a, ids=duplicate_ids(40))
        want = vag(r, argnums, x.astype(F64), y.astype(F64), SCALE, BIAS)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert_tree_close(got[1], want[1], 1e-2)

    # bf16 made inside the same jit (XLA could keep a bf16 product in float32): same numbers.
    def both(x, y, x32, y32, s, t):
        made_here = ((x32 * 1.0).astype(jnp.bfloat16), (y32 * 1.0).astype(jnp.bfloat16))
        return f(*made_here, s, t), f(x, y, s, t)

    inside, given = jax.jit(both)(x, y, x.astype(jnp.float32), y.astype(jnp.float32), scale, bias)
    np.testing.assert_array_equal(inside, given)
    np.testing.assert_allclose(f(x, y, scale, bias), given, rtol=1e-6)  # eager


@pytest.mark.parametrize("kind", ["python", "numpy", "jax", "jit_argument"])
def test_scale_and_bias_may_be_python_numpy_or_jax_scalars_and_jit_arguments(kind):
    x, y = make(6)
    want = reference.ref_siglip_loss(x, y, scale=SCALE, bias=BIAS)
    wrap = {"python": float, "numpy": np.float64, "jax": jnp.float64, "jit_argument": float}[kind]
    s, b = wrap(SCALE), wrap(BIAS)
    if kind == "jit_argument":
        f = jax.jit(lambda x, y, s, b: jbce.siglip_loss(x, y, scale=s, bias=b))
    else:  # passed as is into a jitted call (a Python or NumPy value stays one)
        f = jitted(lambda x, y, s, b: jbce.siglip_loss(x, y, scale=s, bias=b))
    reference.assert_close(f(x, y, s, b), want, rtol=1e-12)
    want = reference.ref_clip_loss(x, y, scale=SCALE)
    reference.assert_close(jitted(jbce.clip_loss)(x, y, scale=s), want, rtol=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
def test_forward_over_reverse_hessian_is_refused(name):
    # A custom VJP: JAX refuses forward mode with its own TypeError (jbce leaves it as is).
    # The JVP's refusal and the Hessian by jax.jacrev(jax.grad(f)) against the float64
    # dense one are the matrix's (<loss>-materialised-jvp-float32-random-plain,
    # <loss>-materialised-hessian-float32-*-plain).
    x, y = make(4)
    loss, _, _ = LOSSES[name]
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jit(jax.hessian(lambda a: loss(a, y, SCALE, BIAS)))(x)


@pytest.mark.parametrize("name", list(LOSSES))
def test_backward_saves_the_inputs_and_per_row_and_column_statistics_only(name):
    b, d = 16, 4
    x, y = make(b, d)
    loss, _, _ = LOSSES[name]
    f = lambda x, y, s, t: loss(x, y, s, t, chunk_size=4)
    res = reference.saved_residuals(f, x, y, jnp.float64(SCALE), jnp.float64(BIAS))
    shapes = [aval.shape for aval, _ in res]
    assert all(s in ((b, d), (b,), ()) for s in shapes), shapes  # nothing [B, B] or tiled
    core = [s for (aval, what), s in zip(res, shapes, strict=True) if "custom_vjp" in what]
    # CLIP: the shift and log-sum-exp of each row and each column, and the loss's assembly
    # the number of positives of each (a constant); SigLIP: nothing but the inputs.
    assert core == ([(b,)] * 4 if name == "clip" else []), res
    counts = [s for (aval, what), s in zip(res, shapes, strict=True) if "stop_gradient" in what]
    assert counts == ([(b,)] * 2 if name == "clip" else [])
    assert sum(s == (b, d) for s in shapes) == 2  # x and y themselves
    assert all("argument" in what for aval, what in res if aval.shape == (b, d))


@pytest.mark.no_x64
@pytest.mark.parametrize("name", list(LOSSES))
def test_value_and_grad_temp_is_at_most_a_sixteenth_of_the_dense_loss(name):
    # The benchmark's shape and dense losses (open_clip's and big_vision's), compiled only.
    from bench import contrastive as bench

    b, d = bench.MEMORY_SHAPE
    temps = {}
    for impl, f in bench.implementations(name, b).items():
        c = bench.compile_vag(f, name, b, d)
        temps[impl] = c.memory_analysis().temp_size_in_bytes
        assert "conditional" not in c.as_text()
    assert temps["jbce"] * bench.MEMORY_RATIO <= temps["dense"], temps


def test_the_ring_schedule_reader_tells_overlapped_from_exposed_transfers():
    from bench.contrastive import permute_order

    hlo = """%body (p: f32[4]) -> f32[4] {
  %s = (f32[4], f32[4]) collective-permute-start(%p), source_target_pairs={{0,1},{1,0}}
  %w = (s32[], f32[4]) while(%t), condition=%c, body=%b
  %d = f32[4] collective-permute-done(%s)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %s2 = (f32[4], f32[4]) collective-permute-start(%a), source_target_pairs={{0,1},{1,0}}
  %d2 = f32[4] collective-permute-done(%s2)
  %w2 = (s32[], f32[4]) while(%t2), condition=%c, body=%body
}
"""
    assert permute_order(hlo) == ["overlapped", "exposed"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"y": jnp.zeros((5, 4))}, r"y must have the shape of x \(6, 4\); got \(5, 4\)"),
        ({"x": jnp.zeros((6,)), "y": jnp.zeros((6,))}, r"x must have shape \[B, D\]"),
        ({"x": jnp.zeros((6, 4), jnp.int32)}, "x must be a floating-point array"),
        ({"ids": jnp.zeros((5,), jnp.int32)}, r"ids must have shape \(6,\)"),
        ({"ids": jnp.zeros((6,))}, "ids must be integers"),
        ({"scale": -1.0}, "scale must be >= 0"),
        ({"reduction": "avg"}, "reduction must be one of"),
        ({"chunk_size": 0}, "chunk_size must be a positive int"),
        ({"batch_axis_name": 3}, "batch_axis_name must be a mesh axis name"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    args = {"x": jnp.zeros((6, 4)), "y": jnp.zeros((6, 4)), "scale": 1.0}
    args.update(kwargs)
    x, y = args.pop("x"), args.pop("y")
    for loss in (jbce.clip_loss, lambda *a, **k: jbce.siglip_loss(*a, bias=0.0, **k)):
        with pytest.raises((ValueError, TypeError), match=match):
            loss(x, y, **args)


@pytest.mark.no_x64
def test_retrieval_example_trains_both_losses_and_its_ring_run_repeats_one_device(tmp_path):
    import subprocess

    out = tmp_path / "retrieval"
    args = ["--steps", "6", "--eval-every", "3", "--dim", "16", "--batch-size", "32",
            "--cpu-devices", "2", "--no-progress", "--out", str(out)]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "examples.retrieval", *args], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "BM25" in proc.stdout and "beat" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["table"]) == {"random", "BM25", "CLIP", "SigLIP"}
    for row in metrics["table"].values():
        for by_k in row.values():
            assert 0 <= by_k["R@1"] <= by_k["R@5"] <= by_k["R@10"] <= 1
    assert metrics["data_parallel"]["devices"] == 2
    assert metrics["data_parallel"]["max_loss_difference"] < 1e-4
    assert (out / "retrieval.png").read_bytes()[:4] == b"\x89PNG"


# --- 8 host devices (tests/conftest.py): shard_map (check_vma on and off), pmap, 1/4/8 devices,
# memory; the ring against the float64 dense reference, value and gradients in x, y, scale, bias
D = 5


@pytest.fixture
def eight_devices():
    if jax.device_count() < 8:  # only with JBCE_TEST_ONE_DEVICE=1 (tests/conftest.py)
        pytest.skip("needs 8 devices; tests/conftest.py forces them unless told not to")


def device_problem(b_total, ids=True, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(b_total, D)))
    y = jnp.asarray(rng.normal(size=(b_total, D)))
    pair_ids = jnp.asarray(rng.integers(0, max(1, b_total // 2), size=b_total)) if ids else None
    return x, y, pair_ids


def ring_losses(name, ids, chunk_size):
    """(ring loss of this device's shards, float64 dense reference of the whole batch)."""
    if name == "clip":

        def local(x, y, s, b, i):
            return jbce.clip_loss(x, y, scale=s, ids=i, batch_axis_name="d", chunk_size=chunk_size)

        def ref(x, y, s, b):
            return reference.ref_clip_loss(x, y, scale=s, ids=ids, xp=jnp)
    else:

        def local(x, y, s, b, i):
            return jbce.siglip_loss(
                x, y, scale=s, bias=b, ids=i, batch_axis_name="d", chunk_size=chunk_size
            )

        def ref(x, y, s, b):
            return reference.ref_siglip_loss(x, y, scale=s, bias=b, ids=ids, xp=jnp)

    return local, ref


def close_f64(got, want, what):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = max(1e-300, float(np.max(np.abs(w), initial=0.0)))
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12 * scale, err_msg=what)


def through_shard_map(name, devices, b_total, *, ids=True, chunk_size=None, check_vma=True):
    """value_and_grad of the shard_map-ed ring loss equals the unsharded reference's."""
    x, y, pair_ids = device_problem(b_total, ids)
    local, ref = ring_losses(name, pair_ids, chunk_size)
    mesh = Mesh(np.array(jax.devices()[:devices]), ("d",))
    specs = (P("d"), P("d"), P(), P(), None if pair_ids is None else P("d"))
    f = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=check_vma)
    vag = jax.value_and_grad(lambda x, y, s, b: f(x, y, s, b, pair_ids), (0, 1, 2, 3))
    got = jax.jit(vag)(x, y, SCALE, BIAS)
    want = jax.value_and_grad(ref, (0, 1, 2, 3))(x, y, SCALE, BIAS)
    if name == "clip":  # no bias
        got, want = (got[0], got[1][:3]), (want[0], want[1][:3])
    close_f64(got, want, f"{name} on {devices} devices")


@pytest.mark.usefixtures("eight_devices")
def test_clip_8_devices_duplicate_ids_overlapping_tiles():
    through_shard_map("clip", 8, 24, chunk_size=2)  # 3 rows a device, tiles of 2 overlap


@pytest.mark.usefixtures("eight_devices")
def test_siglip_8_devices_duplicate_ids_overlapping_tiles():
    through_shard_map("siglip", 8, 24, chunk_size=2)


@pytest.mark.usefixtures("eight_devices")
def test_clip_4_devices_diagonal_check_vma_false():
    through_shard_map("clip", 4, 20, ids=False, check_vma=False)


@pytest.mark.usefixtures("eight_devices")
def test_siglip_1_device_mesh():
    through_shard_map("siglip", 1, 7)


@pytest.mark.usefixtures("eight_devices")
def test_siglip_one_row_per_device():
    through_shard_map("siglip", 8, 8)


@pytest.mark.usefixtures("eight_devices")
def test_siglip_pmap_gradients_are_n_times_their_share_and_pmean_gives_the_global_ones():
    n, b = 8, 2
    x, y, pair_ids = device_problem(n * b)
    local, ref = ring_losses("siglip", pair_ids, None)

    def step(x, y, s, t, i):
        loss, grads = jax.value_and_grad(local, (0, 1, 2, 3))(x, y, s, t, i)
        return loss, grads, jax.lax.pmean(grads[2:], "d")

    shard = lambda a: a.reshape(n, b, *a.shape[1:])
    loss, (gx, gy, _, _), params_mean = jax.pmap(step, "d", in_axes=(0, 0, None, None, 0))(
        shard(x), shard(y), SCALE, BIAS, shard(pair_ids)
    )
    want, (rx, ry, rs, rb) = jax.value_and_grad(ref, (0, 1, 2, 3))(x, y, SCALE, BIAS)
    close_f64(loss, np.full(n, want), "the global loss on every device")
    # Under pmap the transpose of the loss's psum is a psum: each device gets n times the
    # global loss's gradient for its rows (and n times its share of d scale and d bias).
    close_f64((gx.reshape(-1, D) / n, gy.reshape(-1, D) / n), (rx, ry), "d x, d y")
    close_f64(params_mean, (np.full(n, rs), np.full(n, rb)), "pmean of d scale, d bias")


@pytest.mark.usefixtures("eight_devices")
def test_temp_per_device_does_not_grow_with_devices():
    b, d = 512, 32
    temps = {}
    for devices in (4, 8):
        mesh = Mesh(np.array(jax.devices()[:devices]), ("d",))
        f = jax.shard_map(
            lambda x, y, s: jbce.clip_loss(x, y, scale=s, batch_axis_name="d"),
            mesh=mesh, in_specs=(P("d"), P("d"), P()), out_specs=P(),
        )  # fmt: skip
        spec = [jax.ShapeDtypeStruct((devices * b, d), jnp.float32)] * 2
        spec.append(jax.ShapeDtypeStruct((), jnp.float32))
        c = jax.jit(jax.value_and_grad(f, (0, 1, 2))).lower(*spec).compile()
        temps[devices] = c.memory_analysis().temp_size_in_bytes
        assert "conditional" not in c.as_text()
    assert temps[8] <= temps[4], temps
