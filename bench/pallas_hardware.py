"""The fused linear cross-entropy's implementations timed on the machine it runs on.

The prepared script for a lent GPU (or TPU): ``value_and_grad`` w.r.t. ``hidden`` and
``weight`` of

- ``pallas``: ``jbce.linear_softmax_cross_entropy(..., implementation="pallas")``
- ``xla``: ``jbce.linear_softmax_cross_entropy(..., implementation="xla")`` (the tiled loop)
- ``optax``: ``optax.softmax_cross_entropy_with_integer_labels(hidden @ weight, y).mean()``

at N x D x V = 4096 x 512 x 32768 and 16384 x 2048 x 131072, float32 and bfloat16. Per
case: the median of interleaved rounds (``bench/timing.py``), XLA's compiled temp bytes,
the device's peak bytes in use after the case (``memory_stats()``, where the backend has
it; a process-wide high-water mark, so the implementations run from the smallest footprint
up and the float32 reference after them), and the largest relative error of the loss and
gradients against optax's in float32 at ``"highest"`` matmul precision (a check of the
compiled kernels themselves: the tests run them only in Pallas interpret mode). Matmuls
run at ``--precision`` (default ``highest``: the Pallas kernels multiply float32 at full
precision, so all three compute the same products).

Usage::

    python -m bench.pallas_hardware --json pallas_hw.json      # on the GPU, ~5-10 min
    python -m bench.pallas_hardware --quick                    # small shapes, any machine

On a CPU ``"pallas"`` runs the XLA tiled loop (Pallas has no compiled CPU backend), so
only the ``--quick`` smoke run means anything there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/pallas_hardware.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jbce  # noqa: E402
from bench import timing  # noqa: E402
from bench.linear import make_inputs, memory  # noqa: E402

SHAPES = {
    "lm_4096x512x32768": (4096, 512, 32768),
    "lm_16384x2048x131072": (16384, 2048, 131072),
}
QUICK_SHAPES = {"lm_256x64x1000": (256, 64, 1000)}
IMPLS = ("pallas", "xla", "optax")  # smallest footprint first: see peak_bytes


def losses() -> dict:
    import optax

    def fused(impl):
        return lambda h, w, y: jbce.linear_softmax_cross_entropy(h, w, y, implementation=impl)

    return {
        "pallas": fused("pallas"),
        "xla": fused("xla"),
        "optax": lambda h, w, y: optax.losses.softmax_cross_entropy_with_integer_labels(
            jnp.matmul(h, w), y
        ).mean(),
    }


def _peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _rel_err(got, want) -> float:
    """max |got - want| / max |want| over the loss and both gradients (float32)."""
    out = 0.0
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = jnp.asarray(g, jnp.float32), jnp.asarray(w, jnp.float32)
        out = max(out, float(jnp.max(jnp.abs(g - w)) / jnp.maximum(jnp.max(jnp.abs(w)), 1e-30)))
    return out


def run_case(name, n, d, v, dtype, *, budget_s: float) -> list[dict]:
    fns = losses()
    h, w, y = make_inputs(n, d, v, dtype)
    rows, outs = [], {}
    for impl in IMPLS:
        t0 = time.perf_counter()
        compiled = jax.jit(jax.value_and_grad(fns[impl], (0, 1))).lower(h, w, y).compile()
        compile_s = time.perf_counter() - t0
        outs[impl] = jax.block_until_ready(compiled(h, w, y))
        runner = timing.simple_runner(lambda c=compiled: c(h, w, y), jax.block_until_ready)
        st = timing.measure({impl: runner}, warmup=1, min_rounds=5, max_rounds=21,
                            budget_s=budget_s)[impl]  # fmt: skip
        rows.append({
            "case": name, "dtype": jnp.dtype(dtype).name, "impl": impl, "mode": "vag",
            "median_s": st["median"], "p25_s": st["p25"], "p75_s": st["p75"], "rounds": st["n"],
            "compile_s": compile_s, "peak_bytes": _peak_bytes(), **memory(compiled),
        })  # fmt: skip
        del compiled
    # The float32 reference last, so that its logits are not in the peaks above.
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(jax.value_and_grad(fns["optax"], (0, 1)))(
            h.astype(jnp.float32), w.astype(jnp.float32), y
        )
    for row in rows:
        row["rel_err_vs_optax_f32"] = _rel_err(outs.pop(row["impl"]), ref)
        print(_format(row), flush=True)
    return rows


def _format(r: dict) -> str:
    peak = "-" if r["peak_bytes"] is None else timing.fmt_bytes(r["peak_bytes"])
    return (
        f"{r['case']:<22} {r['dtype']:<9} {r['impl']:<7} median {timing.fmt_time(r['median_s'])}"
        f"  temp {timing.fmt_bytes(r['temp_bytes'])}  peak {peak}"
        f"  rel.err {r['rel_err_vs_optax_f32']:.1e}  compile {r['compile_s']:.1f}s"
    )


def ratios(rows: list[dict]) -> list[str]:
    """optax / pallas and xla / pallas per (case, dtype): the issue's bars (> 1 is faster)."""
    by = {(r["case"], r["dtype"], r["impl"]): r["median_s"] for r in rows}
    out = []
    for case, dtype in dict.fromkeys((r["case"], r["dtype"]) for r in rows):
        p = by.get((case, dtype, "pallas"))
        if not p:
            continue
        o, x = by.get((case, dtype, "optax")), by.get((case, dtype, "xla"))
        out.append(f"{case} {dtype}: optax / pallas = {o / p:.2f}, xla / pallas = {x / p:.2f}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.pallas_hardware", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="one small shape (smoke run)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--precision", default="highest", help="jax_default_matmul_precision")
    p.add_argument("--budget-s", type=float, default=10.0, help="timing budget per case")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, {dev.platform} ({dev.device_kind}), matmul precision "
          f"{args.precision}", flush=True)  # fmt: skip
    rows = []
    with jax.default_matmul_precision(args.precision):
        for name, (n, d, v) in (QUICK_SHAPES if args.quick else SHAPES).items():
            for dt in args.dtypes.split(","):
                rows += run_case(name, n, d, v, jnp.dtype(dt), budget_s=args.budget_s)
    for line in ratios(rows):
        print(line)
    if args.json:
        doc = {"jax": jax.__version__, "platform": dev.platform, "device": dev.device_kind,
               "precision": args.precision, "rows": rows}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
