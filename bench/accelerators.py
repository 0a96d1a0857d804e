"""Deviceless accelerator report: what XLA compiles for an H100 and a TPU v5e, no hardware.

Usage (from the repository root, in the accelerator environment that ``.ci/accelerators.sh``
builds: jax with the ``tpu`` and ``cuda12-local`` plugins; a plain ``.venv`` has neither)::

    .venv-accel/bin/python -m bench.accelerators                 # full report, both platforms
    .venv-accel/bin/python -m bench.accelerators --quick         # small shapes, about a minute
    .venv-accel/bin/python -m bench.accelerators --platforms gpu --json out.json --markdown out.md
    .venv-accel/bin/python -m bench.accelerators --pallas            # the Pallas kernels

For every public loss at the benchmark shapes (``bench/shapes.py``'s ``"target"`` shapes and
the fused linear + cross-entropy at ``bench/linear.py``'s ``TARGET``), in float32 and bfloat16,
forward (the mean loss) and value_and_grad (w.r.t. the logits; hidden and weight for the fused
loss), jbce and optax are lowered and compiled for each platform without a device:

- TPU: one device of ``get_topology_desc("v5e:2x2", platform="tpu")`` (``v5e:1x1`` is refused).
- GPU: ``get_topology_desc(platform="cuda", topology="1x1x1", target_config=...)`` with an H100
  SXM's device description (:data:`bench.hlo.H100_TARGET_CONFIG`). No autotuning happens without a device,
  so GEMM tilings are XLA's defaults.

What is reported, per case:

- ``temp``: ``compiled.memory_analysis().temp_size_in_bytes`` (on TPU: HBM only; buffers XLA
  keeps in VMEM are not temp).
- ``kernels``: work-launching instructions of the scheduled HLO
  (:func:`bench.hlo.analyse_hlo`), while bodies times their trip count.
- ``cond``: ``conditional`` instructions anywhere in the module.
- ``hbm``: estimated HBM bytes, counted from ``compiled.as_text()`` (``cost_analysis()`` is None
  for a deviceless GPU compile): operand + output bytes of each kernel, partial reads and
  in-place updates counted by what they touch (see :func:`bench.hlo.kernel_bytes`).
- ``ideal``: every input read once and every output written once (:func:`bench.hlo.ideal_bytes`);
  ``hbm/ideal`` (>= 1 for a loss that must read all its inputs) and ``jbce/optax`` ratios.

The targets (:data:`H100_IDEAL_TARGETS` and :func:`check_targets`) are printed met / not met.

The HLO analysis and the deviceless compiles are :mod:`bench.hlo`'s (with its caveats: the HBM
figure is a model, caches are not modelled, a TPU "kernel" is an op; a conditional is counted
at its costliest branch, the cheapest in parentheses). The no-conditional check of every
public loss is a test: ``tests/test_accelerators.py`` (``python -m tests.deviceless``).

Typical output (``python -m bench.accelerators``: jax 0.10.2, optax 0.2.8, jbce at 24ea5a3,
the library before its conditionals were removed; 285 s on the shared 2-core dev box; target
lines cut at ``...``)::

    device    case                 dtype      mode  temp j/o           kernels j/o  cond j/o  HBM jbce            HBM optax  ideal      HBM/ideal j/o  HBM j/o
    H100      bce_2^24             float32    fwd   17.5KiB/16KiB      6/3          1/0       256MiB (128MiB)     128MiB     128MiB     2.00/1.00      2.00
    TPU v5e   bce_2^24             float32    fwd   158KiB/0B          7/2          1/0       256MiB (192MiB)     128MiB     128MiB     2.00/1.00      2.00
    H100      bce_2^24             float32    vag   1.52KiB/16KiB      7/4          1/0       448MiB (320MiB)     384MiB     192MiB     2.33/2.00      1.17
    TPU v5e   bce_2^24             float32    vag   126KiB/0B          8/2          1/0       448MiB (384MiB)     192MiB     192MiB     2.33/1.00      2.33
    H100      ce_int_4096x32768    float32    fwd   2.05MiB/2.03MiB    15/8         1/0       1.51GiB (516MiB)    1.01GiB    512MiB     3.02/2.02      1.50
    TPU v5e   ce_int_4096x32768    float32    fwd   174KiB/79KiB       23/13        1/0       1.5GiB (512MiB)     1GiB       512MiB     3.00/2.00      1.50
    H100      ce_int_4096x32768    float32    vag   81KiB/32KiB        17/10        1/0       2.51GiB (1.5GiB)    2.01GiB    1GiB       2.51/2.01      1.25
    TPU v5e   ce_int_4096x32768    float32    vag   316KiB/0B          29/14        1/0       2.5GiB (1.5GiB)     2GiB       1GiB       2.50/2.00      1.25
    H100      ce_soft_4096x32768   float32    fwd   2.03MiB/2.03MiB    15/7         1/0       3.51GiB (1.5GiB)    2.01GiB    1GiB       3.51/2.01      1.75
    TPU v5e   ce_soft_4096x32768   float32    fwd   126KiB/0B          12/6         1/0       3.5GiB (1.5GiB)     2GiB       1GiB       3.50/2.00      1.75
    H100      ce_soft_4096x32768   float32    vag   50.3KiB/80KiB      27/11        2/0       6.52GiB (3.51GiB)   3.01GiB    1.5GiB     4.35/2.01      2.17
    TPU v5e   ce_soft_4096x32768   float32    vag   252KiB/0B          24/9         2/0       6.5GiB (3.5GiB)     3.5GiB     1.5GiB     4.33/2.33      1.86
    H100      lm_4096x512x32768    float32    fwd   9.09MiB/514MiB     1504/9       0/0       3.15GiB             1.58GiB    72MiB      44.74/22.44    1.99
    TPU v5e   lm_4096x512x32768    float32    fwd   0B/512MiB          2294/13      0/0       72MiB               1.06GiB    72MiB      1.00/15.11     0.07
    H100      lm_4096x512x32768    float32    vag   20.1MiB/1GiB       2675/13      0/0       10.8GiB             3.72GiB    144MiB     77.11/26.44    2.92
    TPU v5e   lm_4096x512x32768    float32    vag   0B/512MiB          5054/22      0/0       208MiB              2.16GiB    144MiB     1.44/15.39     0.09
    H100      bce_2^24             bfloat16   fwd   17.5KiB/16KiB      6/3          1/0       128MiB (64MiB)      64MiB      64MiB      2.00/1.00      2.00
    TPU v5e   bce_2^24             bfloat16   fwd   189KiB/31.5KiB     8/2          1/0       128MiB (128MiB)     64MiB      64MiB      2.00/1.00      2.00
    H100      bce_2^24             bfloat16   vag   1.52KiB/16.3KiB    7/4          1/0       224MiB (160MiB)     192MiB     96MiB      2.33/2.00      1.17
    TPU v5e   bce_2^24             bfloat16   vag   158KiB/0B          9/5          1/0       224MiB (224MiB)     160MiB     96MiB      2.33/1.67      1.40
    H100      ce_int_4096x32768    bfloat16   fwd   2.05MiB/2.02MiB    15/8         1/0       778MiB (260MiB)     518MiB     256MiB     3.04/2.02      1.50
    TPU v5e   ce_int_4096x32768    bfloat16   fwd   174KiB/63KiB       23/12        1/0       768MiB (256MiB)     512MiB     256MiB     3.00/2.00      1.50
    H100      ce_int_4096x32768    bfloat16   vag   81KiB/16.3KiB      17/10        1/0       1.26GiB (772MiB)    1.01GiB    512MiB     2.52/2.01      1.25
    TPU v5e   ce_int_4096x32768    bfloat16   vag   0B/0B              27/15        1/0       1.25GiB (768MiB)    1GiB       512MiB     2.50/2.00      1.25
    H100      ce_soft_4096x32768   bfloat16   fwd   2.03MiB/2.02MiB    15/8         1/0       1.76GiB (772MiB)    1.01GiB    512MiB     3.52/2.02      1.74
    TPU v5e   ce_soft_4096x32768   bfloat16   fwd   126KiB/31.5KiB     12/6         1/0       1.75GiB (768MiB)    1GiB       512MiB     3.50/2.00      1.75
    H100      ce_soft_4096x32768   bfloat16   vag   50.3KiB/2.02MiB    27/11        2/0       3.27GiB (1.76GiB)   1.51GiB    768MiB     4.36/2.02      2.16
    TPU v5e   ce_soft_4096x32768   bfloat16   vag   252KiB/0B          24/8         2/0       3.25GiB (1.75GiB)   1.75GiB    768MiB     4.33/2.33      1.86
    H100      lm_4096x512x32768    bfloat16   fwd   6.59MiB/258MiB     1504/9       0/0       2.33GiB             810MiB     36MiB      66.13/22.49    2.94
    TPU v5e   lm_4096x512x32768    bfloat16   fwd   0B/256MiB          2291/13      0/0       260MiB              544MiB     36MiB      7.22/15.11     0.48
    H100      lm_4096x512x32768    bfloat16   vag   82.6MiB/512MiB     2677/13      0/0       9.63GiB             1.86GiB    72MiB      136.92/26.47   5.17
    TPU v5e   lm_4096x512x32768    bfloat16   vag   0B/256MiB          5052/22      0/0       456MiB              1.08GiB    72MiB      6.34/15.39     0.41

    targets:
      NOT met  H100 bce_2^24 float32 fwd: HBM/ideal 1.0x: 2.000 (cheapest branches: 1.000)
      NOT met  H100 bce_2^24 float32 vag: HBM/ideal <= 1.25x: 2.334 (cheapest branches: 1.667)
      NOT met  H100 ce_int_4096x32768 float32 fwd: HBM/ideal 1.0x: 3.024 (cheapest branches: 1.008)
      NOT met  H100 ce_int_4096x32768 float32 vag: HBM/ideal <= 1.5x: 2.512 (cheapest branches: ...
      NOT met  H100 ce_soft_4096x32768 float32 fwd: HBM/ideal <= 1.0x: 3.512 (cheapest branches: ...
      NOT met  H100 ce_soft_4096x32768 float32 vag: HBM/ideal <= 1.67x: 4.349 (cheapest branches ...
      NOT met  H100 bce_2^24 bfloat16 fwd: HBM/ideal 1.0x: 2.001 (cheapest branches: 1.000)
      NOT met  H100 bce_2^24 bfloat16 vag: HBM/ideal <= 1.25x: 2.334 (cheapest branches: 1.667)
      NOT met  H100 ce_int_4096x32768 bfloat16 fwd: HBM/ideal 1.0x: 3.040 (cheapest branches: 1.016)
      NOT met  H100 ce_int_4096x32768 bfloat16 vag: HBM/ideal <= 1.5x: 2.520 (cheapest branches: ...
      NOT met  H100 ce_soft_4096x32768 bfloat16 fwd: HBM/ideal <= 1.0x: 3.520 (cheapest branches ...
      NOT met  H100 ce_soft_4096x32768 bfloat16 vag: HBM/ideal <= 1.67x: 4.360 (cheapest branche ...
      met      H100 lm_4096x512x32768 float32 fwd: fused temp <= optax/16: 9.09MiB vs 514MiB
      NOT met  H100 lm_4096x512x32768 float32 fwd: fused kernels <= 200: 1504
      NOT met  H100 lm_4096x512x32768 float32 fwd: fused HBM <= optax's: 1.99x
      met      H100 lm_4096x512x32768 float32 vag: fused temp <= optax/16: 20.1MiB vs 1GiB
      NOT met  H100 lm_4096x512x32768 float32 vag: fused kernels <= 200: 2675
      NOT met  H100 lm_4096x512x32768 float32 vag: fused HBM <= optax's: 2.92x
      met      H100 lm_4096x512x32768 bfloat16 fwd: fused temp <= optax/16: 6.59MiB vs 258MiB
      NOT met  H100 lm_4096x512x32768 bfloat16 fwd: fused kernels <= 200: 1504
      NOT met  H100 lm_4096x512x32768 bfloat16 fwd: fused HBM <= optax's: 2.94x
      NOT met  H100 lm_4096x512x32768 bfloat16 vag: fused temp <= optax/16: 82.6MiB vs 512MiB
      NOT met  H100 lm_4096x512x32768 bfloat16 vag: fused kernels <= 200: 2677
      NOT met  H100 lm_4096x512x32768 bfloat16 vag: fused HBM <= optax's: 5.17x
      NOT met  H100 every case: 0 conditionals: 4/16 ok; misses: bce_2^24 float32 fwd (1), bce_2 ...
      NOT met  H100 every case: HBM <= optax's: 0/16 ok; misses: bce_2^24 float32 fwd (2.00x), b ...
      NOT met  TPU v5e every case: 0 conditionals: 4/16 ok; misses: bce_2^24 float32 fwd (1), bc ...
      NOT met  TPU v5e every case: HBM <= optax's: 4/16 ok; misses: bce_2^24 float32 fwd (2.00x) ...
      met      H100 every case: temp <= optax's + 1 MiB: 16/16 ok

    temp: XLA's temp buffer (TPU: HBM only); kernels: work-launching instructions, loops unrolled;
    cond: conditional instructions; HBM: estimated from the compiled HLO with each conditional's
    costliest branch (in parentheses: its cheapest), caches (H100's 50 MiB L2) not modelled;
    ideal: inputs read once + outputs written once; j/o: jbce/optax.

    32 cases in 285s
"""  # noqa: E501

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python bench/accelerators.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.hlo import (  # noqa: E402
    DEVICE_NAMES,
    MIB,
    PLATFORMS,
    compile_for,
    compiled_stats,
    pallas_custom_calls,
    setup_environment,
)

# --------------------------------------------------------------------------------------------
# The report's cases
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """A benchmark case: ``name``, the argument specs, and ``{impl: loss}`` (mean losses)."""

    name: str
    kind: str
    dtype: str
    specs: tuple[tuple[tuple[int, ...], str], ...]
    argnums: tuple[int, ...]


def _losses(kind: str) -> dict[str, Callable]:
    import jax
    import jax.numpy as jnp
    import optax

    import jbce

    if kind == "binary":
        return {
            "jbce": lambda x, y: jbce.sigmoid_binary_cross_entropy(x, y),
            "optax": lambda x, y: optax.losses.sigmoid_binary_cross_entropy(x, y).mean(),
        }
    if kind == "softmax_int":
        return {
            "jbce": lambda x, y: jbce.softmax_cross_entropy_with_integer_labels(x, y),
            "optax": lambda x, y: optax.losses.softmax_cross_entropy_with_integer_labels(
                x, y
            ).mean(),
        }
    if kind == "softmax_soft":
        return {
            "jbce": lambda x, y: jbce.softmax_cross_entropy(x, y),
            "optax": lambda x, y: optax.losses.softmax_cross_entropy(x, y).mean(),
        }
    if kind in ("nll", "focal_soft"):
        from bench import impls

        return impls.jax_losses(kind)
    if kind == "linear":
        return {
            "jbce": lambda h, w, y: jbce.linear_softmax_cross_entropy(h, w, y),
            "optax": lambda h, w, y: optax.losses.softmax_cross_entropy_with_integer_labels(
                jnp.matmul(h, w), y
            ).mean(),
        }
    if kind == "linear_log_probs":  # "optax": the materialised equivalent (optax has none)

        def materialised(h, w, y):
            ls = jax.nn.log_softmax(jnp.matmul(h, w).astype(jnp.float32))
            lp = jnp.take_along_axis(ls, y[:, None], axis=-1)[:, 0]
            return jnp.mean(lp) - jnp.mean(jnp.sum(jnp.exp(ls) * ls, axis=-1))

        def fused(h, w, y):
            lp, ent = jbce.linear_log_probs(h, w, y)
            return jnp.mean(lp) + jnp.mean(ent)

        return {"jbce": fused, "optax": materialised}
    if kind == "distill":  # optax has no JSD: the "optax" column is the materialised jbce loss
        return {
            "jbce": lambda h, w, ht, wt: jbce.linear_distillation_loss(h, w, ht, wt),
            "optax": lambda h, w, ht, wt: jbce.jensen_shannon_divergence(
                jnp.matmul(h, w), jnp.matmul(ht, wt)
            ),
        }
    raise ValueError(f"unknown kind {kind!r}")


def report_cases(quick: bool) -> list[Case]:
    """``bench/shapes.py``'s target shapes (``quick``: its quick ones) and the fused linear
    shape of ``bench/linear.py`` (``TARGET``; ``QUICK``), each in float32 and bfloat16."""
    from bench import shapes

    lin = ("lm_512x128x4096", 512, 128, 4096) if quick else ("lm_4096x512x32768", 4096, 512, 32768)
    out = []
    for dt in shapes.DTYPES:
        for s in shapes.shapes("quick" if quick else "target"):
            if s.kind == shapes.BINARY:
                specs = ((s.dims, dt), (s.dims, dt))
            elif s.kind in shapes.INTEGER_LABELS:
                specs = ((s.dims, dt), (s.dims[:1], "int32"))
            else:
                specs = ((s.dims, dt), (s.dims, dt))
            out.append(Case(s.name, s.kind, dt, specs, (0,)))
        name, n, d, v = lin
        lin_specs = (((n, d), dt), ((d, v), dt), ((n,), "int32"))
        out.append(Case(name, "linear", dt, lin_specs, (0, 1)))
        out.append(Case(f"lp_{n}x{d}x{v}", "linear_log_probs", dt, lin_specs, (0, 1)))
        # The fused distillation loss (bench/linear_distill.py), teacher frozen, same shape.
        hw = (((n, d), dt), ((d, v), dt))
        out.append(Case(name.replace("lm_", "distill_"), "distill", dt, hw + hw, (0, 1)))
    return out


def run_report(
    platforms: Sequence[str], quick: bool, log=print, cases: Sequence[str] | None = None
) -> list[dict]:
    """One row per (case, dtype, mode, platform) with jbce's and optax's compile stats
    (``cases``: only the cases of these names)."""
    import jax

    rows = []
    for case in report_cases(quick):
        if cases is not None and case.name not in cases:
            continue
        for mode in ("fwd", "vag"):
            for platform in platforms:
                row = {
                    "case": case.name,
                    "kind": case.kind,
                    "dtype": case.dtype,
                    "mode": mode,
                    "platform": platform,
                    "device": DEVICE_NAMES[platform],
                }
                for impl, f in _losses(case.kind).items():
                    g = f if mode == "fwd" else jax.value_and_grad(f, argnums=case.argnums)
                    t0 = time.perf_counter()
                    row[impl] = compiled_stats(compile_for(g, case.specs, platform))
                    row[impl]["compile_s"] = round(time.perf_counter() - t0, 2)
                j, o = row["jbce"], row["optax"]
                row["hbm_jbce_over_optax"] = j["hbm_bytes"] / max(o["hbm_bytes"], 1)
                row["temp_jbce_over_optax"] = j["temp_bytes"] / max(o["temp_bytes"], 1)
                for r in (j, o):
                    r["hbm_over_ideal"] = r["hbm_bytes"] / max(r["ideal_bytes"], 1)
                rows.append(row)
                log(format_row(row), flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------

# H100 estimated HBM bytes over ideal, per (kind, mode): "1.0x" is read as < 1.05, "<= Nx"
# as <= N + 0.001 (a few per-row vectors on top of 1 GiB are noise, not a pass over the
# logits: 0.001 of the 4096 x 32768 float32 ideal is 64 floats per row).
PER_ROW_SLACK = 0.001
H100_IDEAL_TARGETS = {
    ("binary", "fwd"): (1.05, "1.0x"),
    ("binary", "vag"): (1.25 + PER_ROW_SLACK, "<= 1.25x"),
    ("softmax_int", "fwd"): (1.05, "1.0x"),
    ("softmax_int", "vag"): (1.5 + PER_ROW_SLACK, "<= 1.5x"),
    ("softmax_soft", "fwd"): (1.0 + PER_ROW_SLACK, "<= 1.0x"),
    ("softmax_soft", "vag"): (1.67 + PER_ROW_SLACK, "<= 1.67x"),
}
LINEAR_TEMP_RATIO = 16  # fused temp <= optax temp / 16
LINEAR_MAX_KERNELS = 200
TEMP_SLACK = MIB  # every case: jbce temp <= optax temp + 1 MiB


def check_targets(rows: list[dict]) -> list[dict]:
    """Each target as ``{"target", "met", "detail"}`` (per-case targets list the misses)."""
    out = []

    def add(name, met, detail):
        out.append({"target": name, "met": bool(met), "detail": detail})

    def label(r):
        return f"{r['case']} {r['dtype']} {r['mode']}"

    gpu = [r for r in rows if r["platform"] == "gpu"]
    for r in gpu:
        key = (r["kind"], r["mode"])
        if key in H100_IDEAL_TARGETS:
            bound, text = H100_IDEAL_TARGETS[key]
            j = r["jbce"]
            x = j["hbm_over_ideal"]
            lo = j.get("hbm_bytes_cheapest_branches", j["hbm_bytes"]) / max(j["ideal_bytes"], 1)
            extra = f" (cheapest branches: {lo:.3f})" if lo != x else ""
            add(f"H100 {label(r)}: HBM/ideal {text}", x <= bound, f"{x:.3f}{extra}")
    for r in gpu:
        if r["kind"] not in ("linear", "linear_log_probs"):
            continue
        j, o = r["jbce"], r["optax"]
        add(
            f"H100 {label(r)}: fused temp <= optax/{LINEAR_TEMP_RATIO}",
            j["temp_bytes"] * LINEAR_TEMP_RATIO <= o["temp_bytes"],
            f"{fmt_bytes(j['temp_bytes'])} vs {fmt_bytes(o['temp_bytes'])}",
        )
        add(
            f"H100 {label(r)}: fused kernels <= {LINEAR_MAX_KERNELS}",
            j["kernels"] <= LINEAR_MAX_KERNELS,
            f"{j['kernels']}",
        )
        add(
            f"H100 {label(r)}: fused HBM <= optax's",
            j["hbm_bytes"] <= o["hbm_bytes"],
            f"{r['hbm_jbce_over_optax']:.2f}x",
        )

    for r in gpu:  # issue 13: the fused distillation loss against the materialised JSD
        if r["kind"] != "distill":
            continue
        j, o = r["jbce"], r["optax"]
        add(
            f"H100 {label(r)}: fused kernels <= {LINEAR_MAX_KERNELS}",
            j["kernels"] <= LINEAR_MAX_KERNELS,
            f"{j['kernels']}",
        )
        add(
            f"H100 {label(r)}: fused HBM <= materialised JSD's",
            j["hbm_bytes"] <= o["hbm_bytes"],
            f"{r['hbm_jbce_over_optax']:.2f}x",
        )

    def every(platform, name, ok, show):
        rs = [r for r in rows if r["platform"] == platform]
        if not rs:
            return
        bad = [f"{label(r)} ({show(r)})" for r in rs if not ok(r)]
        add(
            f"{DEVICE_NAMES[platform]} every case: {name}",
            not bad,
            f"{len(rs) - len(bad)}/{len(rs)} ok" + ("; misses: " + ", ".join(bad) if bad else ""),
        )

    for p in ("gpu", "tpu"):
        every(
            p,
            "0 conditionals",
            lambda r: r["jbce"]["conditionals"] == 0,
            lambda r: f"{r['jbce']['conditionals']}",
        )
        every(
            p,
            "HBM <= optax's",
            lambda r: r["jbce"]["hbm_bytes"] <= r["optax"]["hbm_bytes"],
            lambda r: f"{r['hbm_jbce_over_optax']:.2f}x",
        )
    every(
        "gpu",
        "temp <= optax's + 1 MiB",
        lambda r: r["jbce"]["temp_bytes"] <= r["optax"]["temp_bytes"] + TEMP_SLACK,
        lambda r: f"{fmt_bytes(r['jbce']['temp_bytes'])} vs {fmt_bytes(r['optax']['temp_bytes'])}",
    )
    return out


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The Pallas kernels of the fused linear loss (implementation="pallas")
# --------------------------------------------------------------------------------------------

# (N, D, V): the bench shape and a ragged one (N, V not multiples of any block size).
PALLAS_SHAPES = {
    "lm_4096x512x32768": (4096, 512, 32768),
    "lm_ragged_4100x512x32001": (4100, 512, 32001),
}
PALLAS_QUICK_SHAPES = {
    "lm_512x128x4096": (512, 128, 4096),
    "lm_ragged_300x96x1000": (300, 96, 1000),
}
PALLAS_MAX_KERNELS = 8  # value_and_grad
PALLAS_TEMP_RATIO = 64  # temp <= optax's / 64 at the bench shape
PALLAS_HBM_OVER_IDEAL = 1.5  # custom-call operands + outputs <= 1.5x ideal (+ block re-reads)


def pallas_block_reads(platform: str, n: int, d: int, v: int, itemsize: int) -> dict:
    """Bytes of ``weight`` and ``hidden`` the value_and_grad kernels load, from their block
    sizes: ``{"weight": ..., "hidden": ..., "weight_rereads": ..., "hidden_rereads": ...}``.

    The HBM estimate counts each custom-call operand once; a kernel that walks its tiles
    loads blocks of an operand again (``*_rereads``: the loads beyond one full read per
    kernel). GPU: every token-block program of the forward and d hidden kernels reads all
    of ``weight`` (the d hidden kernel once more per ``td`` slice of D), every vocabulary
    program of d weight all of ``hidden``; a program's own block (its rows of ``hidden``,
    its columns of ``weight``) is reloaded per step, which the L1/L2 caches mostly serve.
    TPU: the pipeline fetches a block when its index changes, so the forward and d hidden
    kernels read ``weight`` once per token block, d weight ``hidden`` once per vocabulary
    block. Caches are not modelled: an upper bound on what reaches HBM.
    """
    from jbce._linear import pallas_mosaic_tpu as tpu
    from jbce._linear import pallas_triton as gpu

    W, H = d * v * itemsize, n * d * itemsize
    if platform == "gpu":
        tn, tv, _, td = gpu.block_sizes(max(n, 16), d + (-d % 16), max(v, 16))
        ni, nj, nd = -(-n // tn), -(-v // tv), d // td
        weight = ni * W + (ni * nd * W + ni * W) + nd * ni * W
        hidden = nj * H + nd * nj * H + (nj * nd * H + nj * H)
    else:
        tn, tv = tpu.block_sizes(n, d, v, itemsize)
        ni, nj = -(-n // tn), -(-v // tv)
        weight = ni * W + ni * W + W
        hidden = H + H + nj * H
    return {
        "blocks": [tn, tv],
        "weight": weight,
        "hidden": hidden,
        "weight_rereads": weight - 3 * W,
        "hidden_rereads": hidden - 3 * H,
    }


def pallas_report(
    platforms: Sequence[str],
    quick: bool = False,
    log=print,
    *,
    compare: bool = True,
    dtypes: Sequence[str] = ("float32", "bfloat16"),
) -> list[dict]:
    """value_and_grad of ``implementation="pallas"`` per (shape, dtype, platform), with (if
    ``compare``) the XLA tiled loop and optax's materialised loss at the bench shape (the
    first) beside it."""
    import jax

    from bench.pallas_hardware import losses  # the implementations the hardware run times

    impls = losses()
    shapes = PALLAS_QUICK_SHAPES if quick else PALLAS_SHAPES
    rows = []
    for k, (name, (n, d, v)) in enumerate(shapes.items()):
        for dt in dtypes:
            specs = (((n, d), dt), ((d, v), dt), ((n,), "int32"))
            for platform in platforms:
                row = {"case": name, "dtype": dt, "platform": platform, "mode": "vag"}
                row["device"] = DEVICE_NAMES[platform]
                for impl, f in impls.items():
                    if impl != "pallas" and (k or not compare):
                        continue  # the comparisons only at the bench shape
                    t0 = time.perf_counter()
                    compiled = compile_for(jax.value_and_grad(f, (0, 1)), specs, platform)
                    st = compiled_stats(compiled)
                    st["compile_s"] = round(time.perf_counter() - t0, 2)
                    st["hbm_over_ideal"] = st["hbm_bytes"] / max(st["ideal_bytes"], 1)
                    if impl == "pallas":
                        st["pallas_calls"] = pallas_custom_calls(compiled.as_text())
                        itemsize = 2 if dt == "bfloat16" else 4
                        st["block_reads"] = pallas_block_reads(platform, n, d, v, itemsize)
                    row[impl] = st
                rows.append(row)
                log(format_pallas_row(row), flush=True)
    return rows


def check_pallas_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets for the kernels (value_and_grad): kernels, temp, HBM/ideal."""
    out = []
    for r in rows:
        p = r["pallas"]
        label = f"{r['device']} {r['case']} {r['dtype']} vag (pallas)"
        out.append(
            {
                "target": f"{label}: {PALLAS_MAX_KERNELS} kernels at most",
                "met": p["kernels"] <= PALLAS_MAX_KERNELS,
                "detail": f"{p['kernels']} ({p['pallas_calls']} Pallas)",
            }
        )
        out.append(
            {
                "target": f"{label}: 0 conditionals",
                "met": p["conditionals"] == 0,
                "detail": f"{p['conditionals']}",
            }
        )
        out.append(
            {
                "target": f"{label}: HBM (operands + outputs) <= {PALLAS_HBM_OVER_IDEAL}x ideal",
                "met": p["hbm_over_ideal"] <= PALLAS_HBM_OVER_IDEAL,
                "detail": f"{p['hbm_over_ideal']:.2f}x; block re-reads not in it: weight "
                f"{fmt_bytes(p['block_reads']['weight_rereads'])}, hidden "
                f"{fmt_bytes(p['block_reads']['hidden_rereads'])}",
            }
        )
        if "optax" in r:
            o = r["optax"]
            out.append(
                {
                    "target": f"{label}: temp <= optax's / {PALLAS_TEMP_RATIO}",
                    "met": p["temp_bytes"] * PALLAS_TEMP_RATIO <= o["temp_bytes"],
                    "detail": f"{fmt_bytes(p['temp_bytes'])} vs {fmt_bytes(o['temp_bytes'])}",
                }
            )
    return out


PALLAS_COLUMNS = (
    "device", "case", "dtype", "kernels p/x/o", "Pallas calls", "temp p/x/o",
    "HBM p/x/o", "ideal", "HBM/ideal p", "weight re-reads", "hidden re-reads",
)  # fmt: skip
_PALLAS_WIDTHS = (8, 25, 9, 14, 12, 26, 26, 9, 11, 15, 15)


def _pallas_cells(r: dict) -> list[str]:
    p = r["pallas"]
    others = [r.get(k) for k in ("pallas", "xla", "optax")]

    def each(key, fmt=str):
        return "/".join("-" if o is None else fmt(o[key]) for o in others)

    return [
        r["device"],
        r["case"],
        r["dtype"],
        each("kernels"),
        str(p["pallas_calls"]),
        each("temp_bytes", fmt_bytes),
        each("hbm_bytes", fmt_bytes),
        fmt_bytes(p["ideal_bytes"]),
        f"{p['hbm_over_ideal']:.2f}",
        fmt_bytes(p["block_reads"]["weight_rereads"]),
        fmt_bytes(p["block_reads"]["hidden_rereads"]),
    ]


def format_pallas_row(r: dict) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(_pallas_cells(r), _PALLAS_WIDTHS)).rstrip()


def format_pallas_header() -> str:
    return "  ".join(c.ljust(w) for c, w in zip(PALLAS_COLUMNS, _PALLAS_WIDTHS)).rstrip()


PALLAS_LEGEND = (
    'p/x/o: implementation="pallas" / the XLA tiled loop / optax materialised (the last '
    "two at the\nbench shape only); HBM: custom-call (kernel) operands + outputs, each "
    "operand once; re-reads:\nloads of weight/hidden blocks beyond one read per kernel, "
    "from the block sizes (not in HBM; caches\nnot modelled, an upper bound); value_and_grad "
    "w.r.t. hidden and weight."
)


def fmt_bytes(n: float | None) -> str:
    """``1.5GiB``, ``512MiB``, ``17.5KiB``, ``16B`` (three significant digits)."""
    if n is None:
        return "-"
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= k:
            v = n / k
            return f"{v:.0f}{unit}" if v >= 100 else f"{v:.3g}{unit}"
    return f"{int(n)}B"


COLUMNS = (
    "device",
    "case",
    "dtype",
    "mode",
    "temp j/o",
    "kernels j/o",
    "cond j/o",
    "HBM jbce",
    "HBM optax",
    "ideal",
    "HBM/ideal j/o",
    "HBM j/o",
)


def _hbm_cell(r: dict) -> str:
    lo = r.get("hbm_bytes_cheapest_branches", r["hbm_bytes"])
    return fmt_bytes(r["hbm_bytes"]) + (f" ({fmt_bytes(lo)})" if lo != r["hbm_bytes"] else "")


LEGEND = (
    "temp: XLA's temp buffer (TPU: HBM only); kernels: work-launching instructions, loops "
    "unrolled;\ncond: conditional instructions; HBM: estimated from the compiled HLO with each "
    "conditional's\ncostliest branch (in parentheses: its cheapest), caches (H100's 50 MiB L2) "
    "not modelled;\nideal: inputs read once + outputs written once; j/o: jbce/optax."
)


def row_cells(r: dict) -> list[str]:
    j, o = r["jbce"], r["optax"]
    return [
        r["device"],
        r["case"],
        r["dtype"],
        r["mode"],
        f"{fmt_bytes(j['temp_bytes'])}/{fmt_bytes(o['temp_bytes'])}",
        f"{j['kernels']}/{o['kernels']}",
        f"{j['conditionals']}/{o['conditionals']}",
        _hbm_cell(j),
        fmt_bytes(o["hbm_bytes"]),
        fmt_bytes(j["ideal_bytes"]),
        f"{j['hbm_over_ideal']:.2f}/{o['hbm_over_ideal']:.2f}",
        f"{r['hbm_jbce_over_optax']:.2f}",
    ]


_WIDTHS = (8, 19, 9, 4, 17, 11, 8, 18, 9, 9, 13, 7)


def format_row(r: dict) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(row_cells(r), _WIDTHS)).rstrip()


def format_header() -> str:
    return "  ".join(c.ljust(w) for c, w in zip(COLUMNS, _WIDTHS)).rstrip()


def markdown(rows: list[dict], targets: list[dict]) -> str:
    lines = [LEGEND.replace("\n", " "), ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    lines += ["", "| target | met | value |", "|---|---|---|"]
    lines += [
        f"| {t['target']} | {'met' if t['met'] else 'NOT met'} | {t['detail']} |" for t in targets
    ]
    return "\n".join(lines) + "\n"


def environment() -> dict:
    import jax

    import jbce

    try:
        import optax

        optax_version = optax.__version__
    except ImportError:
        optax_version = None
    return {
        "jax": jax.__version__,
        "optax": optax_version,
        "jbce": jbce.__version__,
        "python": sys.version.split()[0],
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.accelerators", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--platforms", default="gpu,tpu", help="comma-separated: gpu, tpu")
    p.add_argument("--quick", action="store_true", help="bench/shapes.py's quick shapes")
    p.add_argument("--json", type=Path, help="write the rows (or check results) here")
    p.add_argument("--markdown", type=Path, help="write the table and targets as Markdown")
    p.add_argument("--cases", help="comma-separated case names (default: every case)")
    p.add_argument(
        "--pallas",
        action="store_true",
        help='only the Pallas kernels (implementation="pallas") of the fused linear loss',
    )
    args = p.parse_args(argv)
    args.platforms = [s.strip() for s in args.platforms.split(",") if s.strip()]
    for s in args.platforms:
        if s not in PLATFORMS:
            p.error(f"--platforms takes {', '.join(PLATFORMS)}; got {s!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_environment()
    t0 = time.perf_counter()
    if args.pallas:
        print(format_pallas_header(), flush=True)
        rows = pallas_report(args.platforms, args.quick)
        targets = check_pallas_targets(rows)
        print("\ntargets:")
        for t in targets:
            print(f"  {'met    ' if t['met'] else 'NOT met'}  {t['target']}: {t['detail']}")
        print("\n" + PALLAS_LEGEND)
        print(f"\n{len(rows)} cases in {time.perf_counter() - t0:.0f}s")
        if args.json:
            doc = {"environment": environment(), "quick": args.quick, "rows": rows}
            doc["targets"] = targets
            args.json.write_text(json.dumps(doc, indent=1) + "\n")
        return 0

    print(format_header(), flush=True)
    cases = None if args.cases is None else [c.strip() for c in args.cases.split(",")]
    rows = run_report(args.platforms, args.quick, cases=cases)
    targets = check_targets(rows) if not args.quick else []
    if targets:
        print("\ntargets:")
        for t in targets:
            print(f"  {'met    ' if t['met'] else 'NOT met'}  {t['target']}: {t['detail']}")
    print("\n" + LEGEND)
    print(f"\n{len(rows)} cases in {time.perf_counter() - t0:.0f}s")
    if args.json:
        doc = {"environment": environment(), "quick": args.quick, "rows": rows, "targets": targets}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(rows, targets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
