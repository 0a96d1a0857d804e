"""The benchmark harness runs (``--quick``) and reports what it claims to measure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import shapes, timing
from bench.run import main

ROOT = Path(__file__).resolve().parent.parent


def test_shape_table_names_are_unique_and_tagged():
    names = [s.name for s in shapes.SHAPES]
    assert len(names) == len(set(names))
    assert shapes.shapes("quick"), "the smoke run needs at least one shape"
    assert {s.kind for s in shapes.shapes("quick")} == set(shapes.KINDS)
    assert all("full" in s.tags for s in shapes.SHAPES)
    assert shapes.by_name("bce_2^24").dims == (2**24,)


def test_measure_interleaves_and_takes_medians():
    calls = []

    def runner(name, seconds):
        def run(k):
            calls.extend([name] * k)
            return seconds

        return run

    res = timing.measure(
        {"a": runner("a", 1e-3), "b": runner("b", 3e-3)},
        warmup=1,
        min_rounds=4,
        max_rounds=4,
        budget_s=0.0,
    )
    assert res["a"]["median"] == 1e-3 and res["b"]["median"] == 3e-3
    assert res["a"]["n"] == res["b"]["n"] == 4
    # Rounds alternate the order: a b | b a | a b | b a after warm-up and calibration.
    timed = [c for c in calls[4:] if c in "ab"]
    reps = {n: res[n]["reps"] for n in "ab"}
    assert timed[: reps["a"]] == ["a"] * reps["a"]
    assert "b" in timed[reps["a"] : reps["a"] + reps["b"]]


def test_quick_run_writes_json_and_markdown(tmp_path):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    assert (
        main(["--quick", "--dtypes", "float32", "--json", str(out_json), "--markdown", str(out_md)])
        == 0
    )
    data = json.loads(out_json.read_text())
    measured = {(r["case"], r["mode"]) for r in data["cases"]}
    assert measured == {(s.name, m) for s in shapes.shapes("quick") for m in shapes.MODES}
    for r in data["cases"]:
        med = r["median_s"]
        assert med["jbce"] > 0 and med["optax"] > 0
        assert r["vs_optax"] == pytest.approx(med["optax"] / med["jbce"])
        assert r["over_floor"] == pytest.approx(med["jbce"] / med["floor_" + r["floor"]])
        assert r["temp_bytes"]["jbce"] is not None
        # every benchmarked case is also a correctness check against optax in float32
        assert r["rel_err"] < 1e-5, r
    assert data["donation"], "the donate_argnums experiment must run in the smoke run"
    assert data["env"]["device"] and data["env"]["jax"]
    md = out_md.read_text()
    assert "| case | dtype | mode | jbce |" in md and "Command: `" in md


def test_script_entry_point_runs_from_the_repository_root():
    proc = subprocess.run(
        [sys.executable, "bench/run.py", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "--markdown" in proc.stdout


def test_hardware_script_for_the_fused_loss_times_every_implementation(tmp_path):
    # The prepared script a lent GPU runs (bench/pallas_hardware.py); here its smoke run,
    # where "pallas" is the XLA tiled loop (no compiled Pallas on CPU).
    from bench import pallas_hardware

    out = tmp_path / "hw.json"
    assert pallas_hardware.main(["--quick", "--budget-s", "0.2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert {(r["dtype"], r["impl"]) for r in rows} == {
        (dt, impl) for dt in ("float32", "bfloat16") for impl in pallas_hardware.IMPLS
    }
    for r in rows:
        assert r["median_s"] > 0 and r["temp_bytes"] >= 0, r
        tol = 1e-5 if r["dtype"] == "float32" else 2e-2
        assert r["rel_err_vs_optax_f32"] < tol, r
    assert doc["precision"] == "highest" and doc["platform"] == "cpu"


def test_merge_takes_each_cases_median_ratio_and_keeps_the_format():
    from bench import merge

    def run_(vs, t, load):
        case = {"case": "bce_2^10", "kind": "binary", "dims": [1024], "dtype": "float32",
                "mode": "fwd", "median_s": {"jbce": t, "optax": t * vs},
                "spread_s": {"jbce": [t, t], "optax": [t, t]}, "rounds": {"jbce": 3, "optax": 3},
                "floor": "traffic", "vs_optax": vs, "vs_torch": None, "over_floor": 1.0,
                "temp_bytes": {"jbce": 0, "optax": 8}, "input_bytes": 8,
                "rel_err": 0.0}  # fmt: skip
        env = {"date": "d", "command": "python -m bench --json x", "load_average": load}
        return {"env": env, "cases": [case], "elapsed_s": 1.0}

    out = merge.merge([run_(0.9, 1.0, "5"), run_(1.3, 2.0, "9"), run_(1.1, 4.0, "7")])
    (c,) = out["cases"]
    assert c["vs_optax"] == pytest.approx(1.1) and c["vs_optax_runs"] == [0.9, 1.3, 1.1]
    assert c["median_s"]["jbce"] == 2.0 and c["rounds"]["jbce"] == 9
    assert [r["load_average"] for r in out["env"]["runs"]] == ["5", "9", "7"]
    assert any(t.startswith("ok") and "slower than optax" in t for t in out["targets"])
