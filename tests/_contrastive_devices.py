"""The contrastive losses on 8 host devices, run in a subprocess by tests/test_contrastive.py.

The XLA flag forcing 8 CPU devices must be set before jax is imported, and the pytest process
keeps its one device, hence a separate interpreter. Each check compares the ring
(``batch_axis_name``) against the float64 dense reference of tests/reference.py, value and
gradients w.r.t. x, y, scale and bias. Prints one JSON object ``{check: {"ok", "detail"}}`` on
its last stdout line. By hand: ``python tests/_contrastive_devices.py``.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jbce  # noqa: E402
from tests import reference  # noqa: E402

if __name__ == "__main__":  # not when pytest imports this file to collect its doctests
    jax.config.update("jax_enable_x64", True)
RESULTS: dict[str, dict] = {}
D, SCALE, BIAS = 5, 3.0, -2.0


def check(fn):
    if __name__ == "__main__":
        t0 = time.perf_counter()
        try:
            fn()
            RESULTS[fn.__name__] = {"ok": True, "detail": ""}
        except Exception:  # noqa: BLE001 - every failure is reported, not raised
            RESULTS[fn.__name__] = {"ok": False, "detail": traceback.format_exc()[-3000:]}
        RESULTS[fn.__name__]["seconds"] = round(time.perf_counter() - t0, 2)
    return fn


def problem(b_total, ids=True, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(b_total, D)))
    y = jnp.asarray(rng.normal(size=(b_total, D)))
    pair_ids = jnp.asarray(rng.integers(0, max(1, b_total // 2), size=b_total)) if ids else None
    return x, y, pair_ids


def losses(name, ids, chunk_size):
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


def close(got, want, what):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = max(1e-300, float(np.max(np.abs(w), initial=0.0)))
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12 * scale, err_msg=what)


def through_shard_map(name, devices, b_total, *, ids=True, chunk_size=None, check_vma=True):
    """value_and_grad of the shard_map-ed ring loss equals the unsharded reference's."""
    x, y, pair_ids = problem(b_total, ids)
    local, ref = losses(name, pair_ids, chunk_size)
    mesh = Mesh(np.array(jax.devices()[:devices]), ("d",))
    specs = (P("d"), P("d"), P(), P(), None if pair_ids is None else P("d"))
    f = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=check_vma)
    vag = jax.value_and_grad(lambda x, y, s, b: f(x, y, s, b, pair_ids), (0, 1, 2, 3))
    got = jax.jit(vag)(x, y, SCALE, BIAS)
    want = jax.value_and_grad(ref, (0, 1, 2, 3))(x, y, SCALE, BIAS)
    if name == "clip":  # no bias
        got, want = (got[0], got[1][:3]), (want[0], want[1][:3])
    close(got, want, f"{name} on {devices} devices")


@check
def clip_8_devices_duplicate_ids_overlapping_tiles():
    through_shard_map("clip", 8, 24, chunk_size=2)  # 3 rows a device, tiles of 2 overlap


@check
def siglip_8_devices_duplicate_ids_overlapping_tiles():
    through_shard_map("siglip", 8, 24, chunk_size=2)


@check
def clip_4_devices_diagonal_check_vma_false():
    through_shard_map("clip", 4, 20, ids=False, check_vma=False)


@check
def siglip_1_device_mesh():
    through_shard_map("siglip", 1, 7)


@check
def siglip_one_row_per_device():
    through_shard_map("siglip", 8, 8)


@check
def siglip_pmap_gradients_are_n_times_their_share_and_pmean_gives_the_global_ones():
    n, b = 8, 2
    x, y, pair_ids = problem(n * b)
    local, ref = losses("siglip", pair_ids, None)

    def step(x, y, s, t, i):
        loss, grads = jax.value_and_grad(local, (0, 1, 2, 3))(x, y, s, t, i)
        return loss, grads, jax.lax.pmean(grads[2:], "d")

    shard = lambda a: a.reshape(n, b, *a.shape[1:])
    loss, (gx, gy, _, _), params_mean = jax.pmap(step, "d", in_axes=(0, 0, None, None, 0))(
        shard(x), shard(y), SCALE, BIAS, shard(pair_ids)
    )
    want, (rx, ry, rs, rb) = jax.value_and_grad(ref, (0, 1, 2, 3))(x, y, SCALE, BIAS)
    close(loss, np.full(n, want), "the global loss on every device")
    # Under pmap the transpose of the loss's psum is a psum: each device gets n times the
    # global loss's gradient for its rows (and n times its share of d scale and d bias).
    close((gx.reshape(-1, D) / n, gy.reshape(-1, D) / n), (rx, ry), "d x, d y")
    close(params_mean, (np.full(n, rs), np.full(n, rb)), "pmean of d scale, d bias")


@check
def temp_per_device_does_not_grow_with_devices():
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


if __name__ == "__main__":
    print(json.dumps(RESULTS))
