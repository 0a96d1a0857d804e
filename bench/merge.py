"""The medians of several ``python -m bench --json`` runs, in the same JSON format.

Usage (from the repository root)::

    for i in 1 2 3; do python -m bench --json run$i.json; done
    python -m bench.merge run1.json run2.json run3.json --json docs/_data/bench.json

On a shared machine one run's ratios move by tens of percent; only ratios taken inside one
interleaved run are meaningful, so each case's ``vs_optax``, ``vs_torch`` and ``over_floor``
are the medians of the runs' own ratios (not ratios of median times), and each time the
median of the runs' medians. Temp bytes are compile-time and identical in every run (checked).
The environment is the first run's, with each run's date, command and load averages kept,
and the targets are checked again on the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/merge.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import run  # noqa: E402

RATIOS = ("vs_optax", "vs_torch", "over_floor")


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def merge(runs: list[dict]) -> dict:
    """The runs' medians, case by case (every run must have the same cases)."""
    keys = [[(c["case"], c["dtype"], c["mode"]) for c in r["cases"]] for r in runs]
    if any(k != keys[0] for k in keys):
        raise ValueError("the runs measured different cases")
    cases = []
    for parts in zip(*(r["cases"] for r in runs)):
        first = parts[0]
        if any(p["temp_bytes"] != first["temp_bytes"] for p in parts):
            raise ValueError(f"temp bytes differ between runs: {first['case']}")
        case = dict(first)
        case["median_s"] = {n: _median([p["median_s"].get(n) for p in parts])
                            for n in first["median_s"]}  # fmt: skip
        case["spread_s"] = {n: [min(p["spread_s"][n][0] for p in parts),
                                max(p["spread_s"][n][1] for p in parts)]
                            for n in first["spread_s"]}  # fmt: skip
        case["rounds"] = {n: sum(p["rounds"][n] for p in parts) for n in first["rounds"]}
        for k in RATIOS:
            case[k] = _median([p.get(k) for p in parts])
            case[f"{k}_runs"] = [p.get(k) for p in parts]
        case["rel_err"] = max(p["rel_err"] for p in parts)
        cases.append(case)
    env = dict(runs[0]["env"])
    env["runs"] = [{k: r["env"].get(k) for k in ("date", "command", "load_average")} for r in runs]
    env["command"] = f"{runs[0]['env']['command']} ({len(runs)} runs); python -m bench.merge"
    return {
        "env": env,
        "cases": cases,
        "donation": runs[0].get("donation", []),
        "training_step_temp_over_logits": runs[0].get("training_step_temp_over_logits", []),
        "targets": run.check_targets(cases),
        "skipped": runs[0].get("skipped", []),
        "elapsed_s": _median([r.get("elapsed_s") for r in runs]),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.merge", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="python -m bench --json outputs")
    p.add_argument("--json", metavar="PATH", required=True, help="write the medians here")
    args = p.parse_args(argv)
    merged = merge([json.loads(Path(f).read_text()) for f in args.runs])
    Path(args.json).write_text(json.dumps(merged, indent=1) + "\n")
    print(run.text_table([run.row_cells(r) for r in merged["cases"]]))
    print()
    print("\n".join(merged["targets"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
