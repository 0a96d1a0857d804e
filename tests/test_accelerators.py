"""Accelerator rules checked without accelerators: what XLA compiles for an H100 and a TPU v5e.

The compiles need jax's TPU and CUDA plugins, which live in a separate environment
(``bash .ci/accelerators.sh`` builds ``.venv-accel``): one subprocess with that python runs
``tests/deviceless.py`` (every public loss for the no-conditional rule, the Pallas kernels,
the fused distillation loss at the bench shape) once per session and reports back as JSON;
the tests below read it. ``JBCE_ACCEL_PYTHON`` overrides the python; without one they skip,
except under ``CI=true``, where they fail. The HLO analysis itself is tested on handwritten
HLO in ``tests/test_hlo.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import jbce
from bench import accelerators as acc
from bench import hlo
from tests import _once
from tests import deviceless as dl

ROOT = Path(__file__).resolve().parent.parent
ACCEL_PYTHON = Path(os.environ.get("JBCE_ACCEL_PYTHON", ROOT / ".venv-accel" / "bin" / "python"))
LIMIT = 1500  # seconds the subprocess may take


def test_the_conditional_check_covers_every_public_loss():
    cases = dl.conditional_cases()
    assert {v.loss for v in cases} == set(jbce.__all__)
    for loss in jbce.__all__:
        mine = [v for v in cases if v.loss == loss]
        assert {v.dtype for v in mine} == {"float32", "bfloat16"}, loss
        assert {v.size for v in mine} == set(dl.SIZES), loss
    reductions = {v.options for v in cases if v.loss == "sigmoid_focal_loss"}
    assert {"none", "sum", "mean"} <= reductions
    # The TPU compiles the calls whose program differs there: every loss but the binary ones.
    on_tpu = {v.loss for v in cases if dl.differs_on_tpu(v)}
    assert on_tpu == set(jbce.__all__) - set(dl.BINARY)


def test_the_conditional_check_covers_the_fused_ops_options():
    cases = dl.conditional_cases()
    lp = {(v.options, v.dtype, v.size) for v in cases if v.loss == "linear_log_probs"}
    # Plain at both sizes and dtypes, and a traced temperature, a bias and both chunks.
    assert {("", dt, size) for dt in ("float32", "bfloat16") for size in dl.SIZES} <= lp
    assert any("temperature" in o and "chunk_size" in o for o, _, _ in lp), lp
    linear = {v.options for v in cases if v.loss == "linear_softmax_cross_entropy"}
    assert any("class_weights" in o for o in linear), linear
    options = {v.options for v in cases if v.loss == "linear_distillation_loss"}
    assert "traced beta and temperature,beta=1,sum" in options
    kinds = {c.kind for c in acc.report_cases(quick=True)}
    assert "linear_log_probs" in kinds


def test_the_report_compares_the_fused_distillation_loss_with_the_materialised_jsd():
    cases = [c for c in acc.report_cases(quick=False) if c.kind == "distill"]
    assert {c.dtype for c in cases} == {"float32", "bfloat16"}
    for c in cases:  # student and teacher (hidden, weight); gradients of the student only
        assert [s for s, _ in c.specs] == [(4096, 512), (512, 32768)] * 2 and c.argnums == (0, 1)


@pytest.fixture(scope="session")
def deviceless() -> dict:
    """``python -m tests.deviceless``'s results, run once per session in the accelerator
    environment (the first test that needs them starts it; a waiting worker leaves its core
    to the compiles)."""
    if not ACCEL_PYTHON.exists():
        why = (
            f"no accelerator python at {ACCEL_PYTHON} (build it with `bash .ci/accelerators.sh` "
            "or set JBCE_ACCEL_PYTHON)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {why}")
        pytest.skip(why)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    argv = [str(ACCEL_PYTHON), "-m", "tests.deviceless", "--json-stdout"]
    _once.start("deviceless", argv, env=env, cwd=ROOT, limit=LIMIT)
    return _once.result("deviceless", limit=LIMIT)


def test_no_public_loss_compiles_a_conditional_on_h100_or_tpu(deviceless):
    doc = deviceless["conditionals"]
    results = doc["results"]
    cases = dl.conditional_cases()
    assert len([r for r in results if r["platform"] == "gpu"]) == len(cases)
    assert {r["loss"] for r in results if r["platform"] == "gpu"} == set(jbce.__all__)
    assert len([r for r in results if r["platform"] == "tpu"]) == sum(map(dl.differs_on_tpu, cases))
    bad = [
        f"{hlo.DEVICE_NAMES[r['platform']]}: {r['loss']}[{r['options']}] {r['dtype']} "
        f"{r['size']}: {r['conditionals']}"
        for r in results
        if r["conditionals"]
    ]
    bad += [f"{hlo.DEVICE_NAMES[p]}: {n} unattributed" for p, n in doc["unattributed"].items() if n]
    assert not bad, (
        f"{len(bad)} of {len(results)} calls compile a conditional (forward or value_and_grad; "
        "`python -m tests.deviceless --checks conditionals` reproduces):\n" + "\n".join(bad)
    )


def test_fused_distillation_on_h100_has_no_conditional_few_kernels_and_less_hbm(deviceless):
    # N=4096, D=512, V=32768 float32 value_and_grad w.r.t. the student.
    fused, materialised = deviceless["distill"]["fused"], deviceless["distill"]["materialised"]
    assert fused["conditionals"] == 0
    assert fused["kernels"] <= acc.LINEAR_MAX_KERNELS, fused["kernels"]
    assert fused["hbm_bytes"] <= materialised["hbm_bytes"], (fused, materialised)
    assert fused["temp_bytes"] * 4 <= materialised["temp_bytes"], (fused, materialised)


def test_pallas_kernels_compile_for_h100_and_tpu_v5e(deviceless):
    """implementation="pallas" value_and_grad compiles deviceless for an H100 (sm_90, the
    Triton kernels) and a TPU v5e (Mosaic) at a ragged shape, as three Pallas custom calls, no
    conditional, and on the H100 at most 8 kernels in all; and inside ``shard_map``
    (``check_vma=True``) with class weights, alone and with label smoothing (the kernels'
    weighted sums)."""
    rows = deviceless["pallas"]["rows"]
    assert sorted(r["platform"] for r in rows) == sorted(hlo.PLATFORMS)
    for r in rows:
        where = hlo.DEVICE_NAMES[r["platform"]]
        assert r["pallas_calls"] == 3, where  # forward, d hidden, d weight
        assert r["conditionals"] == 0, where
        if r["platform"] == "gpu":
            assert r["kernels"] <= acc.PALLAS_MAX_KERNELS, where
    shard_map = deviceless["pallas"]["shard_map"]
    assert set(shard_map) == set(hlo.PLATFORMS)
    for platform, cases in shard_map.items():
        assert set(cases) == set(dl.PALLAS_SHARD_MAP_OPTIONS), platform
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
