"""Speed and memory of jbce against optax and PyTorch, with a floor measured in the same run.

Usage (from the repository root)::

    python -m bench                      # full run (every shape, float32 and bfloat16)
    python -m bench --quick              # smoke run of a few seconds
    python bench/run.py --json out.json --markdown out.md
    python -m bench --only ce_int --dtypes float32 --modes vag

For every case (shape x dtype x mode) jbce, optax, PyTorch (CPU threads matched to XLA's,
when installed) and the floor kernels are timed interleaved in one process after warm-up;
the table shows medians, ``optax/jbce`` and ``torch/jbce`` speedups (> 1: jbce is faster),
``jbce/floor`` (>= 1; 1 is as fast as touching the bytes allows) and XLA's temp bytes.

Typical output (excerpt; 2-core CPU dev box shared with other jobs, jax 0.10.2, optax 0.2.8,
torch 2.13.0 with 2 threads; ``python -m bench``, 40 cases in about 190 s)::

    case               dtype    mode  jbce    optax   torch   floor             optax/jbce  ...
    bce_2^24           float32  fwd   43.3ms  113ms   131ms   10.3ms (traffic)  2.62        ...
    bce_2^24           float32  vag   94.2ms  207ms   196ms   54.8ms (traffic)  2.20        ...
    ce_int_4096x32768  float32  fwd   75.7ms  78.2ms  297ms   43.2ms (exp)      1.03        ...
    ce_int_4096x32768  float32  vag   380ms   357ms   909ms   300ms (exp)       0.94        ...

``--quick`` runs the three smallest shapes in a few seconds (numbers there are dominated
by dispatch and are noisy; it exists so the harness cannot rot).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` and `jbce` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import impls, shapes, timing  # noqa: E402

# Issue 23's CPU targets, checked on every run (on the cases it measured): no case slower than
# optax (the median ratio of 3 full runs is what counts; one run is noisier), sigmoid BCE at
# 2^24 float32 at least 2x optax forward and value_and_grad, and XLA's temp at most optax's
# plus one input-sized buffer (the case's inputs, logits and labels).
MIN_VS_OPTAX = 0.95
TARGETS = {
    ("bce_2^24", "float32", "fwd"): {"vs_optax": 2.0},
    ("bce_2^24", "float32", "vag"): {"vs_optax": 2.0},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 'quick' shapes, few rounds")
    p.add_argument("--json", metavar="PATH", help="write machine-readable results here")
    p.add_argument("--markdown", metavar="PATH", help="write the Markdown table here")
    p.add_argument("--only", action="append", default=[], help="keep shapes whose name contains")
    p.add_argument("--dtypes", nargs="+", default=list(shapes.DTYPES), choices=shapes.DTYPES)
    p.add_argument("--modes", nargs="+", default=list(shapes.MODES), choices=shapes.MODES)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peers")
    p.add_argument("--no-donate", action="store_true", help="skip the donate_argnums experiment")
    p.add_argument(
        "--no-step", action="store_true", help="skip the training-step memory table (compile only)"
    )
    p.add_argument("--budget", type=float, help="seconds of timed rounds per case")
    return p.parse_args(argv)


def environment(args) -> dict:
    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "device": f"{dev.platform}: {dev.device_kind}",
        "cpu": cpu,
        "cpu_threads": impls.cpu_threads(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "memory_pages": memory_pages(),
        "load_average": load_average(),
    }
    import optax

    env["optax"] = optax.__version__
    if impls.torch_device() is not None and not args.no_torch:
        import torch

        env["torch"] = torch.__version__
        env["torch_device"] = impls.torch_device()
        if env["torch_device"] == "cpu":
            torch.set_num_threads(env["cpu_threads"])
        env["torch_threads"] = torch.get_num_threads()
    return env


def load_average() -> str:
    """The machine's 1/5/15-minute load averages when the run started ("-" if unknown): on a
    shared machine, how loud the neighbours were."""
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "-"


def memory_pages() -> str:
    """How large buffers get their pages: the kernel's transparent-huge-page mode and glibc's
    ``GLIBC_TUNABLES`` (``glibc.malloc.hugetlb=1`` makes malloc ask for huge pages).

    On CPU, page-faulting each fresh gradient buffer is most of value_and_grad's time at
    these sizes, so timings are only comparable between runs with the same setting.
    """
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = "unknown"
    return f"THP {thp}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}"


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def run_case(shape, dtype, mode, x, y, ref, *, use_torch, measure_kw) -> dict:
    """Times one case; returns its result row."""
    losses = impls.jax_losses(shape.kind)
    fns = {name: impls.jitted(f, mode) for name, f in losses.items()}
    floors = {f"floor_{k}": jax.jit(f) for k, f in impls.floors(shape.kind, mode).items()}
    temp = {name: impls.memory_stats(fn, x, y).get("temp") for name, fn in fns.items()}
    runners = {
        name: timing.simple_runner(lambda fn=fn: fn(x, y), jax.block_until_ready)
        for name, fn in {**fns, **floors}.items()
    }
    torch_fn = impls.torch_case(shape.kind, mode, x, y, impls.torch_device()) if use_torch else None
    if torch_fn is not None:
        runners["torch"] = timing.simple_runner(*torch_fn)
    res = timing.measure(runners, **measure_kw)
    med = {name: r["median"] for name, r in res.items()}
    floor_name = max((n for n in med if n.startswith("floor_")), key=med.get)
    out = fns["jbce"](x, y)
    value = float(out if mode == "fwd" else out[0])
    return {
        "case": shape.name,
        "kind": shape.kind,
        "dims": list(shape.dims),
        "dtype": dtype,
        "mode": mode,
        "median_s": med,
        "spread_s": {n: [r["p25"], r["p75"]] for n, r in res.items()},
        "rounds": {n: r["n"] for n, r in res.items()},
        "floor": floor_name.removeprefix("floor_"),
        "vs_optax": _ratio(med["optax"], med["jbce"]),
        "vs_torch": _ratio(med.get("torch"), med["jbce"]),
        "over_floor": _ratio(med["jbce"], med[floor_name]),
        "temp_bytes": temp,
        "input_bytes": int(x.nbytes + y.nbytes),
        "rel_err": abs(value - ref) / max(abs(ref), 1e-30),
    }


def run_donation(shape, x, y, measure_kw) -> list[dict]:
    """value_and_grad with and without ``donate_argnums=0`` (float32); returns result rows.

    Every call gets a fresh copy of the logits made outside the timed region, donated or not,
    so both variants start from the same freshly written buffer (as a training step's logits).
    """
    losses = impls.jax_losses(shape.kind)
    variants = {
        "jbce": impls.jitted(losses["jbce"], "vag"),
        "jbce+donate": impls.jitted(losses["jbce"], "vag", donate=True),
        "optax+donate": impls.jitted(losses["optax"], "vag", donate=True),
    }
    mem = {n: impls.memory_stats(fn, x, y) for n, fn in variants.items()}
    runners = {
        n: timing.prepared_runner(lambda: x + 0, lambda xc, fn=fn: fn(xc, y), jax.block_until_ready)
        for n, fn in variants.items()
    }
    res = timing.measure(runners, **measure_kw)
    return [
        {
            "case": shape.name,
            "variant": n,
            "median_s": res[n]["median"],
            "temp_bytes": mem[n].get("temp"),
            "alias_bytes": mem[n].get("alias"),
            "output_bytes": mem[n].get("output"),
        }
        for n in variants
    ]


def step_memory(quick: bool, dtypes) -> list[dict]:
    """XLA temp bytes of a training step's value_and_grad, in units of the logits' size.

    The loss is applied to ``logits = h @ w`` and differentiated w.r.t. ``h`` and ``w``, as
    in a model's last layer: the logits are then an intermediate, and the temp shows whether
    the loss's backward pass can write their gradient in place (1 logits-sized buffer) or
    needs more (copies, probabilities, casts). Compile only, no timing.
    """
    n, d, k = (64, 16, 2048) if quick else (1024, 256, 32768)
    rows = []
    for dtype in dtypes:
        dt = jnp.dtype(dtype)
        h, w = jnp.zeros((n, d), dt), jnp.zeros((d, k), dt)
        logits_bytes = n * k * dt.itemsize
        for kind in (shapes.BINARY, shapes.SOFTMAX_INT, shapes.SOFTMAX_SOFT):
            y = jnp.zeros((n,), jnp.int32) if kind == shapes.SOFTMAX_INT else jnp.zeros((n, k), dt)
            row = {"kind": kind, "dtype": dtype, "shape": [n, d, k]}
            for name, loss in impls.jax_losses(kind).items():
                step = jax.value_and_grad(lambda h, w, y, f=loss: f(h @ w, y), argnums=(0, 1))
                temp = impls.memory_stats(jax.jit(step), h, w, y).get("temp")
                row[name] = None if temp is None else temp / logits_bytes
            rows.append(row)
    return rows


STEP_HEADER = ("training step (h @ w)", "dtype", "temp jbce", "temp optax")


def step_cells(r: dict) -> list[str]:
    fmt = lambda v: "-" if v is None else f"{v:.2f} x logits"  # noqa: E731
    return [f"{r['kind']} {'x'.join(map(str, r['shape']))}", r["dtype"], fmt(r["jbce"]),
            fmt(r["optax"])]  # fmt: skip


def select(args) -> list:
    chosen = shapes.shapes("quick" if args.quick else "full")
    if args.only:
        chosen = [s for s in chosen if any(o in s.name for o in args.only)]
    return list(chosen)


HEADER = (
    "case",
    "dtype",
    "mode",
    "jbce",
    "optax",
    "torch",
    "floor",
    "optax/jbce",
    "torch/jbce",
    "jbce/floor",
    "temp jbce",
    "temp optax",
)


def row_cells(r: dict) -> list[str]:
    med = r["median_s"]
    f = lambda v: "-" if v is None else f"{v:.2f}"
    return [
        r["case"],
        r["dtype"],
        r["mode"],
        timing.fmt_time(med["jbce"]),
        timing.fmt_time(med["optax"]),
        timing.fmt_time(med.get("torch")),
        f"{timing.fmt_time(med['floor_' + r['floor']])} ({r['floor']})",
        f(r["vs_optax"]),
        f(r["vs_torch"]),
        f(r["over_floor"]),
        timing.fmt_bytes(r["temp_bytes"]["jbce"]),
        timing.fmt_bytes(r["temp_bytes"]["optax"]),
    ]


def text_table(rows: list[list[str]], header=HEADER) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(rows: list[list[str]], header=HEADER) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


DONATION_HEADER = ("case (float32, value_and_grad)", "variant", "median", "temp", "aliased")


def donation_cells(d: dict) -> list[str]:
    return [
        d["case"],
        d["variant"],
        timing.fmt_time(d["median_s"]),
        timing.fmt_bytes(d["temp_bytes"]),
        timing.fmt_bytes(d["alias_bytes"]),
    ]


def check_targets(results: list[dict]) -> list[str]:
    """Issue 23's targets, as lines "ok"/"MISSED" for the cases this run measured."""
    lines = []
    for r in results:
        key = (r["case"], r["dtype"], r["mode"])
        if key in TARGETS:
            want = TARGETS[key]["vs_optax"]
            lines.append(
                f"{'ok    ' if r['vs_optax'] >= want else 'MISSED'} {' '.join(key)}: optax/jbce"
                f" {r['vs_optax']:.2f} (want >= {want})"
            )
    slower = [r for r in results if r["vs_optax"] < MIN_VS_OPTAX]
    lines.append(
        f"{'ok    ' if not slower else 'MISSED'} no case slower than optax (>= {MIN_VS_OPTAX})"
        + "".join(
            f"\n         {r['case']} {r['dtype']} {r['mode']}: {r['vs_optax']:.2f}" for r in slower
        )
    )
    fat = [
        r
        for r in results
        if None not in r["temp_bytes"].values()
        and r["temp_bytes"]["jbce"] > r["temp_bytes"]["optax"] + r["input_bytes"]
    ]
    lines.append(
        f"{'ok    ' if not fat else 'MISSED'} temp bytes at most optax's + the inputs'"
        + "".join(
            f"\n         {r['case']} {r['dtype']} {r['mode']}: {r['temp_bytes']['jbce']} B vs"
            f" {r['temp_bytes']['optax']} B + inputs {r['input_bytes']} B"
            for r in fat
        )
    )
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment(args)
    use_torch = "torch" in env
    if args.quick:
        measure_kw = dict(warmup=1, min_rounds=3, max_rounds=15, budget_s=args.budget or 0.05)
    else:
        measure_kw = dict(warmup=1, min_rounds=3, max_rounds=41, budget_s=args.budget or 1.0)
    print(
        f"# {env['device']} ({env['cpu']}, {env['cpu_threads']} threads);"
        f" {env['memory_pages']}; jax {env['jax']},"
        f" optax {env['optax']}"
        + (f", torch {env['torch']} ({env['torch_threads']} threads)" if use_torch else "")
    )
    t_start = time.perf_counter()
    results, skipped, donation = [], [], []
    for shape in select(args):
        for dtype in args.dtypes:
            x, y = impls.make_inputs(shape, dtype)
            ref = None
            for mode in args.modes:
                try:
                    if ref is None:
                        f_ref = impls.jax_losses(shape.kind)["optax"]
                        ref = float(jax.jit(f_ref)(x.astype(jnp.float32), y))
                    r = run_case(
                        shape, dtype, mode, x, y, ref, use_torch=use_torch, measure_kw=measure_kw
                    )
                except AttributeError as e:  # a loss jbce does not have (yet)
                    skipped.append(f"{shape.name} {dtype} {mode}: {e}")
                    continue
                results.append(r)
                print(text_table([row_cells(r)]).splitlines()[-1], flush=True)
            if (
                not args.no_donate
                and dtype == "float32"
                and "vag" in args.modes
                and shape.kind != shapes.BINARY
                and ("target" in shape.tags or args.quick)
            ):
                try:
                    donation += run_donation(shape, x, y, measure_kw)
                except AttributeError as e:
                    skipped.append(f"{shape.name} donation: {e}")
            del x, y
    step = [] if args.no_step else step_memory(args.quick, args.dtypes)
    elapsed = time.perf_counter() - t_start
    env["load_average"] += f" (start); {load_average()} (end)"
    table = [row_cells(r) for r in results]
    print()
    print(text_table(table))
    if donation:
        print()
        print(text_table([donation_cells(d) for d in donation], DONATION_HEADER))
    if step:
        print()
        print(text_table([step_cells(r) for r in step], STEP_HEADER))
    targets = check_targets(results) if results else []
    if targets:
        print()
        print("\n".join(targets))
    for s in skipped:
        print(f"skipped {s}")
    print(
        f"# {len(results)} cases in {elapsed:.0f}s; max rel. error vs optax(float32):"
        f" {max((r['rel_err'] for r in results), default=0):.2g}"
    )
    if args.json:
        payload = {
            "env": env,
            "cases": results,
            "donation": donation,
            "training_step_temp_over_logits": step,
            "targets": targets,
            "skipped": skipped,
            "elapsed_s": elapsed,
        }
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    if args.markdown:
        md = [
            f"Measured on {env['device']} ({env['cpu']}, {env['cpu_threads']} threads),"
            f" {env['date']}; jax {env['jax']}, optax {env['optax']}"
            + (f", torch {env['torch']} ({env['torch_threads']} threads)" if use_torch else "")
            + f"; memory pages: {env['memory_pages']}."
            + f"\nCommand: `{env['command']}`.\n",
            markdown_table(table),
        ]
        if donation:
            md += ["", markdown_table([donation_cells(d) for d in donation], DONATION_HEADER)]
        if step:
            md += ["", markdown_table([step_cells(r) for r in step], STEP_HEADER)]
        if targets:
            md += ["", "```", *targets, "```"]
        Path(args.markdown).write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
