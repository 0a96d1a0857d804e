"""Vocabulary-parallel, data-parallel and multi-host behaviour of the losses.

Three kinds of tests:

* in this process: the vocabulary-parallel loss simulated with
  ``jax.vmap(..., axis_name=...)`` over shards, its residuals, and its argument checks;
* the data-parallel example and the parallel benchmark, as a user runs them, on 8 devices
  (the shard_map, pmap and NamedSharding checks of every loss are
  ``tests/test_eight_devices.py``);
* multi-host: ``examples/multihost.py`` launched as 2 processes x 4 CPU devices talking over
  gloo on 127.0.0.1, compared with the same training run on one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbce
from jbce._core.sharding import psum_to_like
from jbce._softmax.stats import block_stats, combine_over_axis

pytestmark = pytest.mark.no_x64


def strict():
    """Strict dtype and rank promotion, for the sharded code path only (see the report on
    the unsharded reference path, which does not pass it yet with class weights)."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(jax.numpy_rank_promotion("raise"))
    stack.enter_context(jax.numpy_dtype_promotion("strict"))
    return stack


ROOT = Path(__file__).resolve().parent.parent
CE = jbce.softmax_cross_entropy_with_integer_labels
SHARDS, B, K = 4, 6, 20


def rtol_close(got, ref, rtol=1e-5):
    """float32 closeness: rtol per entry, atol relative to the largest reference entry."""
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        scale = max(1.0, float(np.max(np.abs(r), initial=0.0)))
        np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol * scale)


def to_shards(x):
    """[..., K] -> [SHARDS, ..., K / SHARDS]: shard i holds classes [i K_l, (i+1) K_l)."""
    return jnp.moveaxis(x.reshape(x.shape[:-1] + (SHARDS, -1)), -2, 0)


def from_shards(x):
    return jnp.moveaxis(x, 0, -2).reshape(x.shape[1:-1] + (-1,))


def problem(seed=0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(B, K)) * 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, K, size=B), jnp.int32).at[1].set(-100)
    cw = jnp.asarray(rng.uniform(0.5, 2, size=K), jnp.float32)
    return logits, labels, cw


def vmapped(labels, **kw):
    """The loss with logits [SHARDS, B, K_l] and class weights [SHARDS, K_l], via vmap."""

    def f(x, w):
        return CE(x, labels, class_weights=w, axis_name="v", **kw)

    return jax.vmap(f, axis_name="v")


OPTIONS = [
    {},
    {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 5.0, "reduction": "sum"},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_simulated_shards_match_unsharded_value_and_grads(opts):
    logits, labels, cw = problem()
    f = vmapped(labels, **opts)
    with strict():
        val, (gx, gw) = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(f(x, w)), argnums=(0, 1)))(
            to_shards(logits), to_shards(cw)
        )
        values = jax.jit(f)(to_shards(logits), to_shards(cw))
    ref, (rx, rw) = jax.jit(
        jax.value_and_grad(lambda x, w: CE(x, labels, class_weights=w, **opts), argnums=(0, 1))
    )(logits, cw)
    rtol_close(values, jnp.full((SHARDS,), ref))  # replicated: every shard holds the loss
    rtol_close(val / SHARDS, ref)
    # Each shard's loss is the whole loss; its gradient reaches only that shard's logits,
    # so the gradient of the sum over shards' (identical) losses is SHARDS times the true one.
    rtol_close(from_shards(gx) / SHARDS, rx)
    rtol_close(from_shards(gw) / SHARDS, rw)


def test_per_logit_where_and_empty_shard_match_unsharded():
    logits, labels, _ = problem(1)
    labels = labels.at[0].set(7)
    logits = logits.at[0, 10:].set(-jnp.inf)  # shards 2 and 3 have nothing for example 0
    where = jnp.asarray(np.random.default_rng(2).uniform(size=(B, K)) > 0.3).at[0].set(True)
    kw = {"label_smoothing": 0.2, "reduction": "none"}

    def f(x, m):
        return CE(x, labels, where=m, axis_name="v", **kw)

    with strict():
        got = jax.vmap(f, axis_name="v")(to_shards(logits), to_shards(where))
    ref = CE(logits, labels, where=where, **kw)
    rtol_close(got, jnp.broadcast_to(ref, got.shape))
    assert np.all(np.isfinite(np.asarray(got)))


def test_class_axis_not_last_and_batch_of_rank_two():
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.normal(size=(2, K, 3)), jnp.float32)  # classes on axis 1
    labels = jnp.asarray(rng.integers(0, K, size=(2, 3)), jnp.int32).at[0, 1].set(-100)
    shards = jnp.stack(jnp.split(logits, SHARDS, axis=1))  # [SHARDS, 2, K_l, 3]

    def f(x):
        return CE(x, labels, axis=1, z_loss=1e-2, reduction="none", axis_name="v")

    def value_and_vjp(f, x):
        out, vjp = jax.vjp(f, x)
        return out, vjp(jnp.ones_like(out))[0]

    with strict():
        got, g = jax.jit(lambda x: value_and_vjp(jax.vmap(f, axis_name="v"), x))(shards)
    ref, rg = jax.jit(
        lambda x: value_and_vjp(lambda x: CE(x, labels, axis=1, z_loss=1e-2, reduction="none"), x)
    )(logits)
    rtol_close(got, jnp.broadcast_to(ref, got.shape))
    rtol_close(jnp.concatenate(list(g), axis=1) / SHARDS, rg)


def test_combined_stats_give_neg_inf_for_rows_without_classes():
    x = jnp.array([[[-jnp.inf, -jnp.inf]], [[-jnp.inf, -jnp.inf]]], jnp.float32)

    def combined(x):
        return combine_over_axis(block_stats(x, None, sums=True), "v")

    st = jax.vmap(combined, axis_name="v")(x)
    assert np.all(np.isneginf(np.asarray(st.lse))), st.lse
    np.testing.assert_array_equal(np.asarray(st.count), 0.0)


def test_combined_stats_equal_those_of_the_whole_row():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, 8)) * 30, jnp.float32).at[1, :5].set(-jnp.inf)
    whole = block_stats(x, jnp.array([0, 6, 3]), sums=True)
    shards = x.reshape(3, 2, 4).transpose(1, 0, 2)
    local = jnp.array([[0, 6, 3], [-4, 2, -1]])  # labels relative to each shard

    def combined(x, y):
        return combine_over_axis(block_stats(x, y, sums=True), "v")

    st = jax.jit(jax.vmap(combined, axis_name="v"))(shards, local)
    for got, want in zip(st, whole):
        if want is not None:
            np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want), rtol=1e-6)


def test_backward_saves_only_logits_and_one_lse_per_example():
    from tests.reference import saved_residuals

    logits, labels, _ = problem()

    def loss(x):
        return jnp.sum(jax.vmap(lambda x: CE(x, labels, axis_name="v"), axis_name="v")(x))

    shapes = [r[0].shape for r in saved_residuals(loss, to_shards(logits))]
    big = [s for s in shapes if len(s) and np.prod(s) >= B * K // SHARDS]
    assert big == [(SHARDS, B, K // SHARDS)], shapes  # the logits, nothing else of that size


def test_class_weights_are_the_local_shard():
    logits, labels, cw = problem()
    with pytest.raises(ValueError, match=r"class_weights must have shape \(5,\)"):
        jax.vmap(lambda x: CE(x, labels, class_weights=cw, axis_name="v"), axis_name="v")(
            to_shards(logits)
        )


def test_psum_to_like_is_identity_outside_shard_map():
    g = jnp.arange(3.0, dtype=jnp.float32)
    assert psum_to_like(g, g) is g


# --- the examples and benchmark on 8 devices, in subprocesses -----------------------------
def test_data_parallel_example_matches_single_device(tmp_path):
    out = tmp_path / "metrics.json"
    proc = subprocess.run(
        [sys.executable, "-m", "examples.data_parallel", "--cpu-devices", "8", "--steps", "20",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    metrics = json.loads(out.read_text())
    assert metrics["devices"] == 8
    rtol_close(metrics["losses"], metrics["single_device_losses"])
    assert metrics["max_param_difference"] < 1e-5
    assert metrics["losses"][-1] < metrics["losses"][0]


def test_parallel_bench_runs_and_vocab_parallel_does_not_gather(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.parallel", "--tokens", "64", "--vocab", "512",
         "--budget", "0.05", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"vocab_parallel", "all_gather", "gspmd"}
    assert "all-gather" not in rows["vocab_parallel"]["collectives"]
    assert "all-gather" in rows["all_gather"]["collectives"]
    gathered = rows["all_gather"]["temp_bytes_per_device"]
    assert rows["vocab_parallel"]["temp_bytes_per_device"] < gathered / 4
    assert all(r["max_grad_diff_vs_vocab_parallel"] < 1e-6 for r in rows.values())


# --- two processes on 127.0.0.1 ---------------------------------------------------------------
def test_two_process_run_matches_single_process(tmp_path):
    from examples import multihost

    steps, lr = 3, 0.5
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "examples.multihost", "--local-processes", "2",
         "--cpu-devices", "4", "--steps", str(steps), "--lr", str(lr), "--out", str(out),
         "--timeout", "240"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["mesh"] == {"data": 2, "vocab": 4}
    h, labels, w0 = multihost.make_problem()
    losses, grad0 = multihost.reference_losses(h, labels, w0, steps=steps, lr=lr)
    rtol_close(result["losses"], losses)
    rtol_close(np.asarray(result["grad0"]), grad0)
    assert losses[-1] < losses[0]


def test_two_process_fused_class_weights_log_probs_and_distillation_match_one_device(tmp_path):
    # tests/_two_process_fused.py: 2 processes x 1 CPU device over gloo, a ("data", "vocab")
    # mesh; compared with the materialised losses here.
    from tests import _two_process_fused as two

    out = tmp_path / "fused.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_two_process_fused.py"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    got = json.loads(out.read_text())
    assert got["mesh"] == {"data": 2, "vocab": two.LOCAL_DEVICES}
    h, w, b, y, cw, t = (jnp.asarray(a) for a in two.problem())
    y_ce, a = jnp.asarray(two.ignored(np.asarray(y))), jnp.asarray(two.coefficients())

    def ce(h, w, c):
        return CE(h @ w, y_ce, class_weights=c, label_smoothing=two.SMOOTHING)

    ref, ref_grads = jax.value_and_grad(ce, (0, 1, 2))(h, w, cw)
    rtol_close(got["ce"], ref)
    rtol_close([jnp.asarray(g) for g in got["ce_grads"]], list(ref_grads))

    def materialised(h, w, b, t):
        ls = jax.nn.log_softmax((h @ w + b) / t)
        ent = -jnp.sum(jnp.exp(ls) * ls, axis=-1)
        return jnp.take_along_axis(ls, y[:, None], axis=-1)[:, 0], ent

    rtol_close([jnp.asarray(o) for o in got["log_probs"]], list(materialised(h, w, b, t)))

    def objective(h, w, b, t):
        lp, ent = materialised(h, w, b, t)
        return jnp.sum(a * lp) + 0.1 * jnp.sum(ent)

    ref, ref_grads = jax.value_and_grad(objective, (0, 1, 2, 3))(h, w, b, t)
    rtol_close(got["lp_objective"], ref)
    rtol_close([jnp.asarray(g) for g in got["lp_grads"]], list(ref_grads))

    ht, wt = (jnp.asarray(a) for a in two.teacher())

    def distill(h, w):
        return jbce.jensen_shannon_divergence(h @ w, ht @ wt, beta=two.BETA, where=y_ce != -100)

    ref, ref_grads = jax.value_and_grad(distill, (0, 1))(h, w)
    rtol_close(got["distill"], ref)
    rtol_close([jnp.asarray(g) for g in got["distill_grads"]], list(ref_grads))
