"""Accelerator rules checked without accelerators: what XLA compiles for an H100 and a TPU v5e.

The HLO-counting helpers of ``bench/accelerators.py`` are tested here on handwritten HLO (plain
Python, no plugins). The no-conditional rule needs jax's TPU and CUDA plugins, which live in a
separate environment (``bash .ci/accelerators.sh`` builds ``.venv-accel``): one subprocess with
that python compiles every public loss for both platforms and reports back as JSON.
``JBCE_ACCEL_PYTHON`` overrides the python; without one the test skips, except under
``CI=true``, where it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import jbce
from bench import accelerators as acc

ROOT = Path(__file__).resolve().parent.parent
ACCEL_PYTHON = Path(os.environ.get("JBCE_ACCEL_PYTHON", ROOT / ".venv-accel" / "bin" / "python"))

# A loss-shaped module: a reduction, a while loop that updates a buffer in place from a slice
# of its input (4 trips, counted from the condition), and a conditional with a costly branch.
HLO = """\
HloModule handwritten, entry_computation_layout={(f32[1024]{0}, s32[])->(f32[], f32[1024]{0})}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_reduce (p0: f32[1024]) -> f32[] {
  %p0 = f32[1024]{0} parameter(0)
  %zero = f32[] constant(0)
  ROOT %r = f32[] reduce(%p0, %zero), dimensions={0}, to_apply=%add
}

%fused_zeros () -> f32[1024] {
  %z = f32[] constant(0)
  ROOT %bz = f32[1024]{0} broadcast(%z), dimensions={}
}

%fused_update (p0: f32[1024], p1: f32[1024], p2: s32[]) -> f32[1024] {
  %p0 = f32[1024]{0} parameter(0)
  %p1 = f32[1024]{0} parameter(1)
  %p2 = s32[] parameter(2)
  %ds = f32[256]{0} dynamic-slice(%p1, %p2), dynamic_slice_sizes={256}
  %neg = f32[256]{0} negate(%ds)
  ROOT %dus = f32[1024]{0} dynamic-update-slice(%p0, %neg, %p2)
}

%body (t: (s32[], f32[1024], f32[1024])) -> (s32[], f32[1024], f32[1024]) {
  %t = (s32[], f32[1024]{0}, f32[1024]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[1024]{0} get-tuple-element(%t), index=1
  %acc = f32[1024]{0} get-tuple-element(%t), index=2
  %upd = f32[1024]{0} fusion(%acc, %x, %i), kind=kLoop, calls=%fused_update
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %out = (s32[], f32[1024]{0}, /*index=2*/f32[1024]{0}) tuple(%next, %x, %upd)
}

%cond (t: (s32[], f32[1024], f32[1024])) -> pred[] {
  %t = (s32[], f32[1024]{0}, f32[1024]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%fix (t: (f32[])) -> (f32[]) {
  %t = (f32[]) parameter(0)
  %v = f32[] get-tuple-element(%t), index=0
  %w = f32[] multiply(%v, %v)
  ROOT %r = (f32[]) tuple(%w)
}

%keep (t: (f32[])) -> (f32[]) {
  ROOT %t = (f32[]) parameter(0)
}

ENTRY %main (x: f32[1024], k: s32[]) -> (f32[], f32[1024]) {
  %x = f32[1024]{0} parameter(0)
  %k = s32[] parameter(1)
  %zeros = f32[1024]{0} fusion(), kind=kLoop, calls=%fused_zeros
  %sum = f32[] fusion(%x), kind=kInput, calls=%fused_reduce, metadata={op_name="jit(f)/sum"}
  %init = (s32[], f32[1024]{0}, f32[1024]{0}) tuple(%k, %x, %zeros)
  %loop = (s32[], f32[1024]{0}, f32[1024]{0}) while(%init), condition=%cond, body=%body
  %acc = f32[1024]{0} get-tuple-element(%loop), index=2
  %nan = pred[] compare(%sum, %sum), direction=NE
  %ts = (f32[]) tuple(%sum)
  %c = (f32[]) conditional(%nan, %ts, %ts), true_computation=%fix, false_computation=%keep
  %res = f32[] get-tuple-element(%c), index=0
  ROOT %out = (f32[], f32[1024]{0}) tuple(%res, %acc)
}
"""


def test_shape_bytes_sums_tuples_and_skips_on_chip_memory_spaces():
    assert acc.shape_bytes("f32[4096,32768]{1,0}") == 4096 * 32768 * 4
    assert acc.shape_bytes("(f32[], bf16[8,128]{1,0:T(8,128)(2,1)}, pred[3])") == 4 + 2048 + 3
    # TPU: S(1) is VMEM, S(2)/S(6) sync flags and SMEM; only memory space 0 is HBM.
    assert acc.shape_bytes("f32[512]{0:T(512)S(1)}") == 0
    assert acc.shape_bytes("f32[512]{0:T(512)S(1)}", hbm_only=False) == 2048
    assert acc.split_tuple("(s32[], (f32[2], u8[4]), /*index=2*/f32[3]{0})") == [
        "s32[]",
        "(f32[2], u8[4])",
        "f32[3]{0}",
    ]


def test_parse_hlo_reads_computations_and_instructions():
    comps = acc.parse_hlo(HLO)
    assert acc.entry(comps).name == "main"
    loop = acc.entry(comps).by_name["loop"]
    assert (loop.opcode, loop.operands) == ("while", ["init"])
    assert (loop.attr("body"), loop.attr("condition")) == ("body", "cond")
    assert acc.entry(comps).by_name["out"].root


def test_sliced_parameter_reads_the_slice_and_updated_buffer_reads_nothing():
    fused = acc.parse_hlo(HLO)["fused_update"]
    assert acc.fusion_param_reads(fused) == {0: 0, 1: 256 * 4, 2: None}
    assert acc.fusion_output_bytes(fused, "f32[1024]{0}") == 256 * 4  # the update only


def test_parameter_sliced_inside_a_nested_fusion_reads_the_slice():
    nested = acc.parse_hlo(
        """\
%inner (q0: f32[64,1024], q1: s32[]) -> f32[64,128] {
  %q0 = f32[64,1024]{1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  ROOT %ds = f32[64,128]{1,0} dynamic-slice(%q0, %zero, %q1), dynamic_slice_sizes={64,128}
}

%outer (p0: f32[64,1024], p1: s32[]) -> f32[64] {
  %p0 = f32[64,1024]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %tile = f32[64,128]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%inner
  %z = f32[] constant(0)
  ROOT %r = f32[64]{0} reduce(%tile, %z), dimensions={1}, to_apply=%inner
}
"""
    )
    assert acc.fusion_param_reads(nested["outer"], nested)[0] == 64 * 128 * 4
    assert acc.fusion_param_reads(nested["outer"])[0] is None  # without comps: all of it


def test_trip_count_from_the_condition_or_the_backend_config():
    comps = acc.parse_hlo(HLO)
    loop = acc.entry(comps).by_name["loop"]
    assert acc.trip_count(loop, comps) == 4
    known = HLO.replace("body=%body", 'body=%body, backend_config={"known_trip_count":{"n":"7"}}')
    comps = acc.parse_hlo(known)
    assert acc.trip_count(acc.entry(comps).by_name["loop"], comps) == 7


def test_kernels_bytes_and_conditionals_of_a_handwritten_module():
    st = acc.analyse_hlo(HLO)
    # zeros (writes 4096) + sum (reads 4096, writes 4) + compare(sum, sum) (reads 4 once,
    # writes 1)
    # + 4 x [update (reads 1024 of x and the index, writes 1024) + add (4 + 4, 4)
    #        + condition's compare (4 + 4, 1)] + the costlier branch's multiply (4, 4).
    per_trip = (1024 + 4 + 1024) + (4 + 4 + 4) + (4 + 4 + 1)
    assert st.kernels == 1 + 1 + 1 + 4 * 3 + 1
    assert st.hbm_bytes == 4096 + (4096 + 4) + 5 + 4 * per_trip + 8
    assert (st.conditionals, st.while_loops, st.unknown_trip_counts) == (1, 1, 0)
    assert acc.count_conditionals(HLO) == 1
    assert acc.ideal_bytes(HLO) == (4096 + 4) + (4 + 4096)


def test_async_copies_and_buffer_reservations():
    tpu = HLO.replace(
        "  %sum = f32[] fusion(%x)",
        '  %buf = f32[512]{0:T(512)S(1)} custom-call(), custom_call_target="AllocateBuffer"\n'
        "  %cs = (f32[1024]{0:S(1)}, f32[1024]{0}, u32[]{:S(2)}) copy-start(%x)\n"
        "  %cd = f32[1024]{0:S(1)} copy-done(%cs)\n"
        "  %sum = f32[] fusion(%x)",
    )
    base, st = acc.analyse_hlo(HLO), acc.analyse_hlo(tpu)
    # copy-start reads x from HBM into VMEM: one kernel, 4096 bytes; the rest launch nothing.
    assert (st.kernels - base.kernels, st.hbm_bytes - base.hbm_bytes) == (1, 4096)


def test_the_conditional_check_covers_every_public_loss():
    cases = acc.conditional_cases()
    assert {v.loss for v in cases} == set(jbce.__all__)
    for loss in jbce.__all__:
        mine = [v for v in cases if v.loss == loss]
        assert {v.dtype for v in mine} == {"float32", "bfloat16"}, loss
        assert {v.size for v in mine} == set(acc.SIZES), loss
    reductions = {v.options for v in cases if v.loss == "sigmoid_focal_loss"}
    assert {"none", "sum", "mean"} <= reductions


def test_the_conditional_check_covers_the_fused_ops_options():
    cases = acc.conditional_cases()
    lp = {(v.options, v.dtype, v.size) for v in cases if v.loss == "linear_log_probs"}
    # Plain at both sizes and dtypes, and a traced temperature, a bias and both chunks.
    assert {("", dt, size) for dt in ("float32", "bfloat16") for size in acc.SIZES} <= lp
    assert any("temperature" in o and "chunk_size" in o for o, _, _ in lp), lp
    linear = {v.options for v in cases if v.loss == "linear_softmax_cross_entropy"}
    assert any("class_weights" in o for o in linear), linear
    kinds = {c.kind for c in acc.report_cases(quick=True)}
    assert "linear_log_probs" in kinds


def _accel_python() -> Path:
    if ACCEL_PYTHON.exists():
        return ACCEL_PYTHON
    why = (
        f"no accelerator python at {ACCEL_PYTHON} (build it with `bash .ci/accelerators.sh` "
        "or set JBCE_ACCEL_PYTHON)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {why}")
    pytest.skip(why)


def test_no_public_loss_compiles_a_conditional_on_h100_or_tpu(tmp_path):
    python = _accel_python()
    out = tmp_path / "conditionals.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [str(python), "-m", "bench.accelerators", "--check-conditionals", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if not out.exists():
        pytest.fail(f"the check wrote no results (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    doc = json.loads(out.read_text())
    results = doc["results"]
    assert {(r["platform"], r["loss"]) for r in results} == {
        (p, loss) for p in acc.PLATFORMS for loss in jbce.__all__
    }
    bad = [
        f"{acc.DEVICE_NAMES[r['platform']]}: {r['loss']}[{r['options']}] {r['dtype']} "
        f"{r['size']}: {r['conditionals']}"
        for r in results
        if r["conditionals"]
    ]
    bad += [f"{acc.DEVICE_NAMES[p]}: {n} unattributed" for p, n in doc["unattributed"].items() if n]
    assert not bad, (
        f"{len(bad)} of {len(results)} calls compile a conditional (forward or value_and_grad; "
        "`python -m bench.accelerators --check-conditionals` reproduces):\n" + "\n".join(bad)
    )


def test_the_report_compares_the_fused_distillation_loss_with_the_materialised_jsd():
    cases = [c for c in acc.report_cases(quick=False) if c.kind == "distill"]
    assert {c.dtype for c in cases} == {"float32", "bfloat16"}
    for c in cases:  # student and teacher (hidden, weight); gradients of the student only
        assert [s for s, _ in c.specs] == [(4096, 512), (512, 32768)] * 2 and c.argnums == (0, 1)
    options = {v.options for v in acc.conditional_cases() if v.loss == "linear_distillation_loss"}
    assert "traced beta and temperature,beta=1,sum" in options


DISTILL_SCRIPT = """
import json
from bench import accelerators as acc
acc.setup_environment()
import jax
case = next(c for c in acc.report_cases(False) if c.kind == "distill" and c.dtype == "float32")
out = {}
for impl, f in acc._losses("distill").items():
    g = jax.value_and_grad(f, argnums=case.argnums)
    out[impl] = acc.compiled_stats(acc.compile_for(g, case.specs, "gpu"))
print(json.dumps(out))
"""


def test_fused_distillation_on_h100_has_no_conditional_few_kernels_and_less_hbm(tmp_path):
    # The deviceless targets at N=4096, D=512, V=32768 float32 value_and_grad.
    python = _accel_python()
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [str(python), "-c", DISTILL_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    fused, materialised = stats["jbce"], stats["optax"]
    assert fused["conditionals"] == 0
    assert fused["kernels"] <= acc.LINEAR_MAX_KERNELS, fused["kernels"]
    assert fused["hbm_bytes"] <= materialised["hbm_bytes"], (fused, materialised)
    assert fused["temp_bytes"] * 4 <= materialised["temp_bytes"], (fused, materialised)


def test_pallas_kernels_compile_for_h100_and_tpu_v5e(tmp_path):
    """implementation="pallas" value_and_grad compiles deviceless for an H100 (sm_90, the
    Triton kernels) and a TPU v5e (Mosaic) at the bench shape and at a ragged one, as three
    Pallas custom calls, no conditional, and on the H100 at most 8 kernels in all; and
    inside ``shard_map`` (``check_vma=True``) with class weights, alone and with label
    smoothing (the kernels' weighted sums)."""
    python = _accel_python()
    out = tmp_path / "pallas.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [str(python), "-m", "bench.accelerators", "--pallas-check", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if not out.exists():
        pytest.fail(f"the check wrote no results (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    rows = json.loads(out.read_text())["rows"]
    assert {(r["platform"], r["case"]) for r in rows} == {
        (p, c) for p in acc.PLATFORMS for c in acc.PALLAS_SHAPES
    }
    for r in rows:
        p = r["pallas"]
        where = f"{r['device']} {r['case']}"
        assert p["pallas_calls"] == 3, where  # forward, d hidden, d weight
        assert p["conditionals"] == 0, where
        if r["platform"] == "gpu":
            assert p["kernels"] <= acc.PALLAS_MAX_KERNELS, where
    # Inside shard_map (check_vma=True), with class weights (and label smoothing): the same
    # three kernels.
    shard_map = json.loads(out.read_text())["shard_map"]
    assert set(shard_map) == set(acc.PLATFORMS)
    for platform, cases in shard_map.items():
        assert set(cases) == set(acc.PALLAS_SHARD_MAP_OPTIONS), platform
        for name, st in cases.items():
            assert st == {"pallas_calls": 3, "conditionals": 0}, (platform, name)


def test_pallas_block_reads_count_the_kernels_walks():
    n, d, v = 4096, 512, 32768
    tpu = acc.pallas_block_reads("tpu", n, d, v, 4)
    tn, tv = tpu["blocks"]
    W, H = d * v * 4, n * d * 4
    # forward and d hidden: weight once per token block; d weight: hidden once per class block
    assert tpu["weight_rereads"] == 2 * (n // tn - 1) * W
    assert tpu["hidden_rereads"] == (v // tv - 1) * H
    gpu = acc.pallas_block_reads("gpu", n, d, v, 4)
    assert gpu["weight_rereads"] > tpu["weight_rereads"]
    assert acc.pallas_custom_calls('custom_call_target="tpu_custom_call", x') == 1
