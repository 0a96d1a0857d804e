"""CLIP's and SigLIP's losses, tiled (jbce) against the dense ``[B, B]`` matrix: memory and time.

Usage (from the repository root)::

    python -m bench.contrastive                  # --memory --timing --devices
    python -m bench.contrastive --quick          # small shapes, a few seconds
    python -m bench.contrastive --timing --sizes 4096 16384 65536 --json out.json
    .venv-accel/bin/python -m bench.contrastive --accelerators   # deviceless H100 and TPU v5e

Both implementations are ``jax.value_and_grad`` w.r.t. ``x``, ``y`` and ``scale`` (and
``bias``) of the mean loss over ``B`` pairs of ``D``-dimensional float32 embeddings:

- ``jbce``: ``jbce.clip_loss(x, y, scale=s)`` / ``jbce.siglip_loss(x, y, scale=s, bias=b)``,
  the matrix in tiles (the default tile: ``B / 8`` a side, within [512, 4096]).
- ``dense``: the matrix ``s x y^T`` materialised, as open_clip's ``ClipLoss`` (optax's
  integer-label CE of the rows and of the columns) and big_vision's SigLIP loss
  (``-sum(log_sigmoid(z * logits)) / B``) compute it.

Sections:

- ``--memory``: compiled temp at B = 8192, D = 64 (the issue's target: jbce <= dense / 16).
- ``--timing``: temp and time at B in ``--sizes`` (default 4096, 16384, 65536), D = 256. The
  dense loss is compiled (its temp is exact) but not run where its temp exceeds
  ``--max-run-bytes`` (the 16 GiB matrix at 65536 does not fit the dev box). Time is the
  median of interleaved rounds (``bench/timing.py``), or a single call where one takes
  longer than ``--budget``; ``cpu_s`` is process CPU seconds per call.
- ``--devices``: the ring (``batch_axis_name`` inside ``shard_map``) on 1, 2, 4 and 8 host
  devices at a fixed per-device batch: per-device temp must not grow with the devices.
- ``--accelerators`` (in the accelerator environment of ``.ci/accelerators.sh``): deviceless
  compiles for an H100 and a TPU v5e: temp, kernels, ``conditional`` instructions and
  estimated HBM bytes (``bench.accelerators.compiled_stats``) against the dense loss, and
  the ring on 8 deviceless H100s: where XLA's scheduler puts each step's
  ``collective-permute-start``/``-done`` around the step's tile loop (overlap).

Memory is XLA's compiled ``temp_size_in_bytes`` (inputs and outputs, gradients included,
are not temp).

Typical output (``python -m bench.contrastive``, jax 0.10.2, on the 2-core CPU dev box
shared with 2-3 other developers' jobs, load average 9-14 while it ran, so wall times are
inflated: ``cpu_s``, this process's CPU seconds per call, is the steadier figure; the
65536 cases take about 12 minutes)::

    value_and_grad temp at B = 8192, D = 64 (float32):
    loss    B     D   jbce_temp  dense_temp  ratio
    clip    8192  64  30.7MiB    1GiB        33.4
    siglip  8192  64  18.8MiB    768MiB      40.7
      clip: dense / jbce = 33.4 (target >= 16): PASS
      siglip: dense / jbce = 40.7 (target >= 16): PASS

    value_and_grad, float32, D = 256:
    loss    B      D    impl   temp     time_s  cpu_s  note
    clip    4096   256  jbce   11.7MiB  1.76s   732ms  -
    clip    4096   256  dense  256MiB   2.41s   1.05s  -
    siglip  4096   256  jbce   9.55MiB  1.24s   593ms  -
    siglip  4096   256  dense  192MiB   1.44s   687ms  -
    clip    16384  256  jbce   131MiB   24.3s   12.6s  one call
    clip    16384  256  dense  4GiB     59.8s   30.3s  one call
    siglip  16384  256  jbce   86.2MiB  21.3s   10.3s  one call
    siglip  16384  256  dense  3GiB     24s     11.1s  one call
    clip    65536  256  jbce   519MiB   315s    205s   one call
    clip    65536  256  dense  64GiB    -       -      not run: temp 64.0 GiB
    siglip  65536  256  jbce   333MiB   396s    191s   one call
    siglip  65536  256  dense  48GiB    -       -      not run: temp 48.0 GiB

    the ring inside shard_map, 2048 pairs per device, D = 256 (float32):
    loss    devices  b_per_device  D    temp_per_device  collective_permutes  conditionals
    clip    1        2048          256  9.61MiB          0                    0
    clip    2        2048          256  16.7MiB          16                   0
    clip    4        2048          256  19.7MiB          29                   0
    clip    8        2048          256  19.7MiB          29                   0
    siglip  1        2048          256  7.52MiB          0                    0
    siglip  2        2048          256  14.5MiB          4                    0
    siglip  4        2048          256  18.5MiB          9                    0
    siglip  8        2048          256  18.5MiB          9                    0

``--accelerators`` (``.venv-accel/bin/python``; TPU compiles take most of its 10 minutes)::

    deviceless compiles, value_and_grad, float32:
    device   loss    B      D    impl   temp     kernels  conditionals  hbm_bytes
    H100     clip    8192   64   jbce   24.3MiB  2262     0             7.07GiB
    H100     clip    8192   64   dense  512MiB   23       0             3.3GiB
    H100     siglip  8192   64   jbce   16.8MiB  1525     0             3.31GiB
    H100     siglip  8192   64   dense  768MiB   11       0             2.04GiB
    H100     clip    16384  256  jbce   80.6MiB  2262     0             26.5GiB
    H100     clip    16384  256  dense  2GiB     21       0             13.1GiB
    H100     siglip  16384  256  jbce   54.2MiB  1525     0             11.4GiB
    H100     siglip  16384  256  dense  3GiB     9        0             8.09GiB
    TPU v5e  clip    8192   64   jbce   693KiB   2649     0             14MiB
    TPU v5e  clip    8192   64   dense  512MiB   29       0             2.01GiB
    TPU v5e  siglip  8192   64   jbce   315KiB   1911     0             8.01MiB
    TPU v5e  siglip  8192   64   dense  256MiB   12       0             782MiB
    TPU v5e  clip    16384  256  jbce   536KiB   2717     0             96MiB
    TPU v5e  clip    16384  256  dense  4GiB     35       0             8.06GiB
    TPU v5e  siglip  16384  256  jbce   410KiB   1920     0             64.1MiB
    TPU v5e  siglip  16384  256  dense  1GiB     8        0             3.06GiB

    the ring on 8 deviceless H100s, 4096 bf16 pairs per device, D = 256: ring transfers whose
    start/done enclose a tile loop
    device    loss    B      D    temp_per_device  steps  overlapped
    8 x H100  clip    32768  256  36.5MiB          8      6
    8 x H100  siglip  32768  256  36.3MiB          5      4

(The two ring transfers not overlapped are the ones home after the last step: CLIP's
column statistics and ``d y``, SigLIP's ``d y``.)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/contrastive.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MEMORY_SHAPE = (8192, 64)
MEMORY_RATIO = 16  # jbce temp <= dense temp / 16 at MEMORY_SHAPE
SIZES = (4096, 16384, 65536)
TIMING_D = 256
DEVICE_COUNTS = (1, 2, 4, 8)
LOSSES = ("clip", "siglip")
MIB = 1 << 20


def implementations(loss: str, b: int, chunk_size=None) -> dict:
    """name -> f(x, y, scale, bias) -> the mean loss."""
    import jax
    import jax.numpy as jnp
    import optax

    import jbce

    def dense_clip(x, y, s, t):
        logits = s * jnp.dot(x, y.T, preferred_element_type=jnp.float32)
        labels = jnp.arange(b)
        ce = optax.softmax_cross_entropy_with_integer_labels
        return (jnp.mean(ce(logits, labels)) + jnp.mean(ce(logits.T, labels))) / 2

    def dense_siglip(x, y, s, t):
        logits = s * jnp.dot(x, y.T, preferred_element_type=jnp.float32) + t
        z = 2 * jnp.eye(b, dtype=logits.dtype) - 1
        return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / b

    if loss == "clip":
        return {
            "jbce": lambda x, y, s, t: jbce.clip_loss(x, y, scale=s, chunk_size=chunk_size),
            "dense": dense_clip,
        }
    return {
        "jbce": lambda x, y, s, t: jbce.siglip_loss(x, y, scale=s, bias=t, chunk_size=chunk_size),
        "dense": dense_siglip,
    }


def _argnums(loss):
    return (0, 1, 2) if loss == "clip" else (0, 1, 2, 3)


def _specs(b, d, dtype="float32"):
    import jax
    import jax.numpy as jnp

    emb = jax.ShapeDtypeStruct((b, d), jnp.dtype(dtype))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    return emb, emb, scalar, scalar


def compile_vag(f, loss, b, d):
    import jax

    return jax.jit(jax.value_and_grad(f, _argnums(loss))).lower(*_specs(b, d)).compile()


def memory_section(shape=MEMORY_SHAPE) -> list[dict]:
    b, d = shape
    rows = []
    for loss in LOSSES:
        temps = {k: compile_vag(f, loss, b, d).memory_analysis().temp_size_in_bytes
                 for k, f in implementations(loss, b).items()}  # fmt: skip
        rows.append({"section": "memory", "loss": loss, "B": b, "D": d,
                     "jbce_temp": temps["jbce"], "dense_temp": temps["dense"],
                     "ratio": temps["dense"] / temps["jbce"]})  # fmt: skip
    return rows


def _inputs(b, d, seed=0):
    import jax
    import jax.numpy as jnp

    kx, ky = jax.random.split(jax.random.key(seed))
    unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    x = unit(jax.random.normal(kx, (b, d), jnp.float32))
    y = unit(x + 0.5 * jax.random.normal(ky, (b, d), jnp.float32))
    return x, y, jnp.float32(10.0), jnp.float32(-10.0)


def cpu_seconds_of(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of one synchronised call."""
    import jax

    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0, time.process_time() - c0


def timing_section(sizes, d, *, budget_s, max_run_bytes) -> list[dict]:
    import jax

    from bench import timing

    rows = []
    for b in sizes:
        args = _inputs(b, d)
        for loss in LOSSES:
            compiled, row = {}, {}
            for k, f in implementations(loss, b).items():
                c = compile_vag(f, loss, b, d)
                temp = c.memory_analysis().temp_size_in_bytes
                row[k] = {"section": "timing", "loss": loss, "B": b, "D": d, "impl": k,
                          "temp": temp, "time_s": None, "cpu_s": None}  # fmt: skip
                if temp <= max_run_bytes:
                    compiled[k] = c
                else:
                    row[k]["note"] = f"not run: temp {temp / 2**30:.1f} GiB"
            call = {k: (lambda c=c, a=args: c(*a)) for k, c in compiled.items()}
            first = {k: cpu_seconds_of(fn) for k, fn in call.items()}
            if all(w < budget_s for w, _ in first.values()) and compiled:
                runners = {k: timing.simple_runner(fn, jax.block_until_ready)
                           for k, fn in call.items()}  # fmt: skip
                stats = timing.measure(runners, warmup=0, min_rounds=3, max_rounds=7,
                                       budget_s=budget_s)  # fmt: skip
                for k, fn in call.items():
                    row[k]["time_s"] = stats[k]["median"]
                    row[k]["cpu_s"] = cpu_seconds_of(fn)[1]
            else:  # one call each (the first call, after compiling, is timed as it ran)
                for k, (wall, cpu) in first.items():
                    row[k]["time_s"], row[k]["cpu_s"] = wall, cpu
                    row[k]["note"] = "one call"
            rows.extend(row.values())
            print(f"  {loss} B={b}: " + ", ".join(
                f"{k} {_fmt(r['time_s'], 'time_s')}" for k, r in row.items()),
                file=sys.stderr, flush=True)  # fmt: skip
    return rows


def devices_section(b, d, counts=DEVICE_COUNTS) -> list[dict]:
    """Per-device temp of the ring at ``b`` pairs per device on each device count."""
    import jax
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import jbce

    rows = []
    for loss in LOSSES:
        for n in counts:
            mesh = Mesh(np.array(jax.devices()[:n]), ("data",))

            def local(x, y, s, t, loss=loss):
                if loss == "clip":
                    return jbce.clip_loss(x, y, scale=s, batch_axis_name="data")
                return jbce.siglip_loss(x, y, scale=s, bias=t, batch_axis_name="data")

            f = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P(), P()),
                              out_specs=P())  # fmt: skip
            c = compile_vag(f, loss, n * b, d)
            text = c.as_text()
            rows.append({"section": "devices", "loss": loss, "devices": n, "B": n * b,
                         "b_per_device": b, "D": d,
                         "temp_per_device": c.memory_analysis().temp_size_in_bytes,
                         "collective_permutes": len(re.findall(
                             r"collective-permute(?:-start)?\(", text)),
                         "conditionals": text.count(" conditional(")})  # fmt: skip
    return rows


# --- deviceless accelerators ---------------------------------------------------------------------
def accelerator_section(shapes, ring_b, ring_d, platforms) -> list[dict]:
    """Deviceless H100 / TPU v5e compiles: fused against dense, and the ring's schedule."""
    import jax

    from bench import accelerators as acc

    rows = []
    for platform in platforms:
        for b, d in shapes:
            for loss in LOSSES:
                for k, f in implementations(loss, b).items():
                    specs = [((b, d), "float32"), ((b, d), "float32"), ((), "float32"),
                             ((), "float32")]  # fmt: skip
                    vag = jax.value_and_grad(f, _argnums(loss))
                    c = acc.compile_for(vag, specs, platform)
                    st = acc.compiled_stats(c)
                    rows.append({"section": "accelerators", "device": acc.DEVICE_NAMES[platform],
                                 "loss": loss, "B": b, "D": d, "impl": k,
                                 "temp": st["temp_bytes"], "kernels": st["kernels"],
                                 "conditionals": st["conditionals"],
                                 "hbm_bytes": st["hbm_bytes"]})  # fmt: skip
                    print(f"  {platform} {loss} B={b} {k}", file=sys.stderr, flush=True)
    if "gpu" in platforms:
        for loss in LOSSES:
            rows.append(ring_schedule(loss, ring_b, ring_d))
    return rows


def ring_schedule(loss, b, d, n=8) -> dict:
    """The ring on ``n`` deviceless H100s, bf16 embeddings: per ring step (the loop bodies),
    whether each ``collective-permute-start`` comes before the step's tile loop and its
    ``-done`` after it (the transfer overlapped with the tiles)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jbce
    from bench import accelerators as acc

    topo = topologies.get_topology_desc(
        platform="cuda", topology=f"1x1x{n}", target_config=acc.H100_TARGET_CONFIG
    )
    mesh = Mesh(np.array(topo.devices[:n]), ("data",))

    def local(x, y, s, t):
        if loss == "clip":
            return jbce.clip_loss(x, y, scale=s, batch_axis_name="data")
        return jbce.siglip_loss(x, y, scale=s, bias=t, batch_axis_name="data")

    f = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P(), P()), out_specs=P())
    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    specs = [jax.ShapeDtypeStruct((n * b, d), jnp.bfloat16, sharding=rows)] * 2
    specs += [jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)] * 2
    c = jax.jit(jax.value_and_grad(f, _argnums(loss))).lower(*specs).compile()
    order = permute_order(c.as_text())
    return {"section": "ring_schedule", "device": f"{n} x H100", "loss": loss, "B": n * b,
            "D": d, "temp_per_device": c.memory_analysis().temp_size_in_bytes,
            "steps": len(order), "overlapped": sum(o == "overlapped" for o in order),
            "order": order}  # fmt: skip


def permute_order(text: str) -> list[str]:
    """For each ``collective-permute-start``/``-done`` pair of the scheduled HLO, whether a
    ``while`` (a tile loop) runs between them ("overlapped") or not ("exposed")."""
    out = []
    for comp in re.split(r"\n(?=\S)", text):
        ops = re.findall(r"\b(collective-permute-start|collective-permute-done|while)\(", comp)
        open_starts = 0
        loop_since = False
        for op in ops:
            if op == "collective-permute-start":
                open_starts += 1
                loop_since = False
            elif op == "while" and open_starts:
                loop_since = True
            elif op == "collective-permute-done" and open_starts:
                open_starts -= 1
                out.append("overlapped" if loop_since else "exposed")
    return out


# --- output --------------------------------------------------------------------------------------
def _fmt(v, key):
    from bench.timing import fmt_bytes, fmt_time

    if v is None:
        return "-"
    if key in ("temp", "jbce_temp", "dense_temp", "temp_per_device", "hbm_bytes"):
        return fmt_bytes(int(v))
    if key in ("time_s", "cpu_s"):
        return fmt_time(v)
    if key == "ratio":
        return f"{v:.1f}"
    return str(v)


MEMORY_COLUMNS = ("loss", "B", "D", "jbce_temp", "dense_temp", "ratio")
TIMING_COLUMNS = ("loss", "B", "D", "impl", "temp", "time_s", "cpu_s", "note")
DEVICE_COLUMNS = ("loss", "devices", "b_per_device", "D", "temp_per_device",
                  "collective_permutes", "conditionals")  # fmt: skip
ACCEL_COLUMNS = ("device", "loss", "B", "D", "impl", "temp", "kernels", "conditionals",
                 "hbm_bytes")  # fmt: skip
RING_COLUMNS = ("device", "loss", "B", "D", "temp_per_device", "steps", "overlapped")


def format_rows(rows, columns, header=True) -> str:
    cells = [[_fmt(r.get(c), c) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))] if header else []
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory", action="store_true")
    p.add_argument("--timing", action="store_true")
    p.add_argument("--devices", action="store_true")
    p.add_argument("--accelerators", action="store_true")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed rounds a case")
    p.add_argument("--max-run-bytes", type=float, default=12 * 2**30,
                   help="run an implementation only if its temp is at most this")  # fmt: skip
    p.add_argument("--device-batch", type=int, default=2048, help="pairs per device (--devices)")
    p.add_argument("--platforms", nargs="+", default=["gpu", "tpu"])
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not (args.memory or args.timing or args.devices or args.accelerators):
        args.memory = args.timing = args.devices = True
    if args.accelerators:
        from bench import accelerators as acc

        acc.setup_environment()
    import jax

    if args.devices and not args.accelerators:
        jax.config.update("jax_num_cpu_devices", max(DEVICE_COUNTS))
    print(f"jax {jax.__version__}, {jax.default_backend()}")
    rows = []
    mem_shape = (1024, 64) if args.quick else MEMORY_SHAPE
    if args.memory:
        got = memory_section(mem_shape)
        rows += got
        print(f"\nvalue_and_grad temp at B = {mem_shape[0]}, D = {mem_shape[1]} (float32):")
        print(format_rows(got, MEMORY_COLUMNS))
        for r in got:
            ok = r["ratio"] >= MEMORY_RATIO
            verdict = "PASS" if ok else "FAIL"
            if args.quick:
                verdict = "(the target is for B = 8192)"
            print(f"  {r['loss']}: dense / jbce = {r['ratio']:.1f} (target >= {MEMORY_RATIO}): "
                  f"{verdict}")  # fmt: skip
    if args.timing:
        sizes = [512, 1024] if args.quick else args.sizes
        d = 32 if args.quick else TIMING_D
        got = timing_section(sizes, d, budget_s=args.budget, max_run_bytes=args.max_run_bytes)
        rows += got
        print(f"\nvalue_and_grad, float32, D = {d}:")
        print(format_rows(got, TIMING_COLUMNS))
    if args.devices:
        b = 256 if args.quick else args.device_batch
        d = 32 if args.quick else TIMING_D
        got = devices_section(b, d)
        rows += got
        print(f"\nthe ring inside shard_map, {b} pairs per device, D = {d} (float32):")
        print(format_rows(got, DEVICE_COLUMNS))
    if args.accelerators:
        shapes = [(1024, 64)] if args.quick else [MEMORY_SHAPE, (16384, 256)]
        ring_b, ring_d = (512, 64) if args.quick else (4096, 256)
        got = accelerator_section(shapes, ring_b, ring_d, args.platforms)
        rows += got
        print("\ndeviceless compiles, value_and_grad, float32:")
        print(format_rows([r for r in got if r["section"] == "accelerators"], ACCEL_COLUMNS))
        ring = [r for r in got if r["section"] == "ring_schedule"]
        if ring:
            print(f"\nthe ring on 8 deviceless H100s, {ring_b} bf16 pairs per device, D = "
                  f"{ring_d}: ring transfers whose start/done enclose a tile loop")  # fmt: skip
            print(format_rows(ring, RING_COLUMNS))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
