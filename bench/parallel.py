"""Vocabulary-parallel softmax CE against gathering the logits: memory and time on 8 devices.

Usage (from the repository root; forces 8 CPU host devices unless ``--devices`` says
otherwise, so it runs anywhere)::

    python -m bench.parallel                 # 2048 tokens x 32768 classes, float32
    python -m bench.parallel --quick         # 1024 x 8192, a few seconds
    python -m bench.parallel --json out.json

The logits ``[N, V]`` are sharded over the class axis (``P(None, "vocab")``); each
implementation is ``jax.value_and_grad`` of the mean integer-label CE w.r.t. them:

- ``vocab_parallel``: ``shard_map`` of ``softmax_cross_entropy_with_integer_labels(...,
  axis_name="vocab")``: one ``pmax`` and one ``psum`` of ``O(N)`` per-example statistics.
- ``all_gather``: ``shard_map`` that ``all_gather``s the logits (every device then holds
  ``[N, V]``) and runs the unsharded loss; its gradient is sliced back.
- ``gspmd``: ``jax.jit`` of the unsharded loss on the sharded array, partitioned by XLA.

Memory is XLA's compiled per-device ``temp_size_in_bytes`` (``memory_analysis()``; the
sharded inputs and gradients are arguments/outputs, not temp). Time is the median of
interleaved rounds (``bench/timing.py``). On forced host devices all 8 "devices" share the
machine's cores, so time shows the work, not network cost; the collective ops column shows
what crosses devices.

Typical output (2-core CPU dev box, jax 0.10.2, ``python -m bench.parallel``)::

    8 cpu devices, jax 0.10.2; logits 2048 x 32768 float32 (256MiB total, 32MiB per device)
    impl             temp/device  time (median)  collectives
    --------------------------------------------------------
    vocab_parallel       40.1KiB          624ms  all-reduce x2
    all_gather            512MiB          11.5s  all-gather x1, reduce-scatter x1
    gspmd                34.1KiB          1.49s  all-reduce x2
    all agree: max |grad difference| 9.3e-10, loss 18.016705

XLA's own partitioner (``gspmd``) also avoids the gather for this simple layout; the
explicit ``axis_name`` path is what composes inside a ``shard_map`` model (and with the
fused linear loss, where there are no logits to partition).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/parallel.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(n: int, v: int, devices: int):
    """(name -> jitted value_and_grad, sharded logits, labels)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jbce

    mesh = Mesh(np.array(jax.devices()[:devices]), ("vocab",))
    key_x, key_y = jax.random.split(jax.random.key(0))
    logits = jax.device_put(
        jax.random.normal(key_x, (n, v), jnp.float32) * 4,
        NamedSharding(mesh, P(None, "vocab")),
    )
    labels = jax.device_put(
        jax.random.randint(key_y, (n,), 0, v, jnp.int32), NamedSharding(mesh, P())
    )
    ce = jbce.softmax_cross_entropy_with_integer_labels

    def vocab_parallel(x, y):
        return ce(x, y, axis_name="vocab")

    def all_gather(x, y):
        return ce(jax.lax.all_gather(x, "vocab", axis=1, tiled=True), y)

    def mapped(body, check_vma=True):
        return jax.shard_map(
            body, mesh=mesh, in_specs=(P(None, "vocab"), P()), out_specs=P(), check_vma=check_vma
        )

    fns = {
        "vocab_parallel": mapped(vocab_parallel),
        # all_gather's result is typed as varying, though every shard holds the same array.
        "all_gather": mapped(all_gather, check_vma=False),
        "gspmd": ce,
    }
    return {k: jax.jit(jax.value_and_grad(f)) for k, f in fns.items()}, logits, labels


def collectives(hlo: str) -> str:
    """The cross-device ops of a compiled program, counted: 'all-reduce x2, all-gather x1'."""
    ops = re.findall(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                     r"(?:-start)?\(", hlo)  # fmt: skip
    counts = {op: ops.count(op) for op in dict.fromkeys(ops)}
    return ", ".join(f"{op} x{c}" for op, c in counts.items()) or "none"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="1024 x 8192, fewer rounds")
    ap.add_argument("--budget", type=float, default=4.0, help="seconds of timed rounds")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.vocab, args.budget = 1024, 8192, 1.0

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np

    if jax.config.jax_platforms in (None, "", "cpu"):
        jax.config.update("jax_num_cpu_devices", args.devices)
    from bench.timing import fmt_bytes, fmt_time, measure, simple_runner

    fns, logits, labels = build(args.tokens, args.vocab, args.devices)
    print(f"{jax.device_count()} {jax.devices()[0].platform} devices, jax {jax.__version__}; "
          f"logits {args.tokens} x {args.vocab} float32 "
          f"({fmt_bytes(4 * args.tokens * args.vocab)} total, "
          f"{fmt_bytes(4 * args.tokens * args.vocab // args.devices)} per device)")  # fmt: skip
    rows, runners = [], {}
    ref = None
    for name, fn in fns.items():
        compiled = fn.lower(logits, labels).compile()
        mem = compiled.memory_analysis()
        value, grad = fn(logits, labels)
        if ref is None:
            ref = (float(value), np.asarray(grad))
        err = float(np.max(np.abs(np.asarray(grad) - ref[1])))
        rows.append({
            "impl": name,
            "temp_bytes_per_device": int(mem.temp_size_in_bytes),
            "collectives": collectives(compiled.as_text()),
            "loss": float(value),
            "max_grad_diff_vs_vocab_parallel": err,
        })  # fmt: skip
        runners[name] = simple_runner(lambda fn=fn: fn(logits, labels), jax.block_until_ready)
    times = measure(runners, budget_s=args.budget)
    for row in rows:
        row["median_s"] = times[row["impl"]]["median"]
        row["p25_s"] = times[row["impl"]]["p25"]
        row["p75_s"] = times[row["impl"]]["p75"]

    header = f"{'impl':<15} {'temp/device':>12} {'time (median)':>14}  collectives"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['impl']:<15} {fmt_bytes(r['temp_bytes_per_device']):>12} "
              f"{fmt_time(r['median_s']):>14}  {r['collectives']}")  # fmt: skip
    worst = max(r["max_grad_diff_vs_vocab_parallel"] for r in rows)
    print(f"all agree: max |grad difference| {worst:.1e}, loss {rows[0]['loss']:.6f}")
    if args.json:
        meta = {"tokens": args.tokens, "vocab": args.vocab, "devices": args.devices}
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
