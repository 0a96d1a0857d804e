"""Turn committed ``python -m bench --json`` output into the tables of the Performance page.

The docs build runs this (``docs/conf.py``), so the page always shows what the committed
JSON says; nothing on it is typed by hand. To refresh the figures, re-run the benchmark and
rebuild the docs::

    python -m bench --json docs/_data/bench.json
    python -m sphinx -W -b html docs docs/_build/html

``python docs/bench_tables.py`` prints the generated Markdown. Any other ``*.json`` under
``docs/_data/`` that has a ``"cases"`` (or ``"rows"``) list of flat records, such as the
deviceless accelerator estimates, gets a table of its own after the CPU one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "_data"
OUT = HERE / "_generated" / "bench_tables.md"


def _num(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{_num(s / scale)} {unit}"
    return f"{_num(s * 1e9)} ns"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{_num(b / scale)} {unit}"
    return f"{int(b)} B"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def environment(env: dict, elapsed: float | None) -> str:
    rows = [
        ["date (UTC)", env.get("date", "-")],
        ["command", f"`{env.get('command', '-')}`"],
        ["device", env.get("device", "-")],
        ["CPU", f"{env.get('cpu', '-')}, {env.get('cpu_threads', '-')} threads"],
        ["memory pages", env.get("memory_pages", "-")],
        ["Python", env.get("python", "-")],
        ["jax", env.get("jax", "-")],
        ["optax", env.get("optax", "-")],
    ]
    if "torch" in env:
        rows.append(["torch", f"{env['torch']} ({env.get('torch_threads', '-')} threads)"])
    if elapsed is not None:
        rows.append(["run time", f"{elapsed:.0f} s"])
    return table(["measured", ""], rows)


def cases_table(cases: list[dict]) -> str:
    header = ["case", "dtype", "mode", "jbce", "optax", "torch", "floor", "optax/jbce",
              "torch/jbce", "jbce/floor", "temp jbce", "temp optax"]  # fmt: skip
    rows = []
    for r in cases:
        med = r["median_s"]
        floor = r.get("floor")
        rows.append([
            f"`{r['case']}`", r["dtype"], r["mode"],
            fmt_time(med.get("jbce")), fmt_time(med.get("optax")), fmt_time(med.get("torch")),
            f"{fmt_time(med.get('floor_' + floor))} ({floor})" if floor else "-",
            fmt_ratio(r.get("vs_optax")), fmt_ratio(r.get("vs_torch")),
            fmt_ratio(r.get("over_floor")),
            fmt_bytes(r["temp_bytes"].get("jbce")), fmt_bytes(r["temp_bytes"].get("optax")),
        ])  # fmt: skip
    return table(header, rows)


def donation_table(rows: list[dict]) -> str:
    return table(
        ["case (float32, value_and_grad)", "variant", "median", "temp", "aliased"],
        [
            [
                f"`{d['case']}`",
                d["variant"],
                fmt_time(d["median_s"]),
                fmt_bytes(d.get("temp_bytes")),
                fmt_bytes(d.get("alias_bytes")),
            ]  # fmt: skip
            for d in rows
        ],
    )


def step_table(rows: list[dict]) -> str:
    def units(v):
        return "-" if v is None else f"{v:.2f} x logits"

    return table(
        ["loss in a training step", "N x D x K", "dtype", "temp jbce", "temp optax"],
        [
            [
                r["kind"],
                " x ".join(map(str, r["shape"])),
                r["dtype"],
                units(r.get("jbce")),
                units(r.get("optax")),
            ]  # fmt: skip
            for r in rows
        ],
    )


def generic_table(records: list[dict]) -> str:
    keys: list[str] = []
    for rec in records:
        keys += [k for k, v in rec.items() if k not in keys and not isinstance(v, dict | list)]
    return table(keys, [[rec.get(k, "-") for k in keys] for rec in records])


def render_bench(d: dict) -> str:
    out = [
        "### Where and how it was measured",
        "",
        environment(d.get("env", {}), d.get("elapsed_s")),
        "",
        "### Losses alone: forward (`fwd`) and `value_and_grad` (`vag`) of the mean loss",
        "",
        cases_table(d.get("cases", [])),
    ]
    if d.get("training_step_temp_over_logits"):
        out += [
            "",
            "### Memory inside a training step",
            "",
            "XLA's temp bytes of the compiled `value_and_grad` of `loss(h @ w, y)` with respect "
            "to `h` and `w`, in units of the logits' size (compile only, so exact).",
            "",
            step_table(d["training_step_temp_over_logits"]),
        ]
    if d.get("donation"):
        out += [
            "",
            "### Donating the logits (`jax.jit(..., donate_argnums=0)`)",
            "",
            donation_table(d["donation"]),
        ]
    if d.get("targets"):
        out += ["", "### Checks the run made", "", "```text", *d["targets"], "```"]
    return "\n".join(out)


def render_other(name: str, d: dict) -> str | None:
    records = d.get("cases") or d.get("rows")
    if not isinstance(records, list) or not records or not isinstance(records[0], dict):
        return None
    out = [f"### `{name}`", ""]
    if isinstance(d.get("env"), dict):
        out += [table(["measured", ""], [[k, f"`{v}`" if k == "command" else v]
                                 for k, v in d["env"].items()]), ""]  # fmt: skip
    out.append(generic_table(records))
    return "\n".join(out)


def render(data_dir: Path = DATA) -> str:
    bench = data_dir / "bench.json"
    parts = [render_bench(json.loads(bench.read_text()))]
    for path in sorted(data_dir.glob("*.json")):
        if path.name != "bench.json":
            other = render_other(path.name, json.loads(path.read_text()))
            if other:
                parts.append(other)
    return "\n\n".join(parts) + "\n"


def write(out: Path = OUT, data_dir: Path = DATA) -> Path:
    text = render(data_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists() or out.read_text() != text:  # keep the mtime: no needless rebuilds
        out.write_text(text)
    return out


if __name__ == "__main__":
    sys.stdout.write(render())
