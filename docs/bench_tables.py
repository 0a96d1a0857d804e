"""Turn committed ``python -m bench --json`` output into the tables and the chart of the
Performance page.

The docs build runs this (``docs/conf.py``), so the page always shows what the committed
JSON says; nothing on it is typed by hand. The chart of the speed ratios against optax and
PyTorch (``_generated/bench_ratios.png``) is redrawn whenever ``bench.json`` or this file
changes. To refresh the figures, re-run the benchmark and rebuild the docs::

    python -m bench --json docs/_data/bench.json
    python -m sphinx -W -b html docs docs/_build/html

``python docs/bench_tables.py`` prints the generated Markdown. Any other ``*.json`` under
``docs/_data/`` that has a ``"cases"`` (or ``"rows"``) list of flat records, such as the
deviceless accelerator estimates, gets a table of its own after the CPU one.
"""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "_data"
OUT = HERE / "_generated" / "bench_tables.md"
CHART = "bench_ratios.png"  # written next to OUT; the generated Markdown shows it


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


def _loads(env: dict) -> str:
    """The load average of the run, or of each run of a merged file (``bench.merge``)."""
    if env.get("runs"):
        return "; ".join(f"run {i + 1}: {r.get('load_average') or '-'}"
                         for i, r in enumerate(env["runs"]))  # fmt: skip
    return env.get("load_average", "-")


def environment(env: dict, elapsed: float | None) -> str:
    rows = [
        ["date (UTC)", env.get("date", "-")],
        ["command", f"`{env.get('command', '-')}`"],
        ["device", env.get("device", "-")],
        ["CPU", f"{env.get('cpu', '-')}, {env.get('cpu_threads', '-')} threads"],
        ["memory pages", env.get("memory_pages", "-")],
        ["load average (1/5/15 min)", _loads(env)],
        ["Python", env.get("python", "-")],
        ["jax", env.get("jax", "-")],
        ["optax", env.get("optax", "-")],
    ]
    if "torch" in env:
        rows.append(["torch", f"{env['torch']} ({env.get('torch_threads', '-')} threads)"])
    if elapsed is not None:
        rows.append(["run time", f"{elapsed:.0f} s"])
    return table(["measured", ""], rows)


def _case_cells(r: dict) -> list[str]:
    return [f"`{r['case']}`", r["dtype"], r["mode"]]


def times_table(cases: list[dict]) -> str:
    """Median times: jbce, optax, PyTorch and the floor kernel."""
    header = ["case", "dtype", "mode", "jbce", "optax", "torch", "floor"]
    rows = []
    for r in cases:
        med = r["median_s"]
        floor = r.get("floor")
        rows.append([
            *_case_cells(r),
            fmt_time(med.get("jbce")), fmt_time(med.get("optax")), fmt_time(med.get("torch")),
            f"{fmt_time(med.get('floor_' + floor))} ({floor})" if floor else "-",
        ])  # fmt: skip
    return table(header, rows)


def ratios_table(cases: list[dict]) -> str:
    """Speed ratios (> 1: jbce faster; jbce/floor 1: at the floor) and XLA temp memory."""
    header = ["case", "dtype", "mode", "optax/jbce", "torch/jbce", "jbce/floor", "temp jbce",
              "temp optax"]  # fmt: skip
    rows = []
    for r in cases:
        rows.append([
            *_case_cells(r),
            fmt_ratio(r.get("vs_optax")), fmt_ratio(r.get("vs_torch")),
            fmt_ratio(r.get("over_floor")),
            fmt_bytes(r["temp_bytes"].get("jbce")), fmt_bytes(r["temp_bytes"].get("optax")),
        ])  # fmt: skip
    return table(header, rows)


def chart_rows(cases: list[dict]) -> dict[str, list[tuple[str, float | None, float | None]]]:
    """``{mode: [(label, optax/jbce, torch/jbce), ...]}`` in the JSON's order."""
    short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}
    out: dict[str, list] = {}
    for r in cases:
        label = f"{r['case']} {short.get(r['dtype'], r['dtype'])}"
        out.setdefault(r["mode"], []).append((label, r.get("vs_optax"), r.get("vs_torch")))
    return out


def ratio_chart(cases: list[dict], path: Path, *, env: dict | None = None) -> Path:
    """Horizontal bars of optax/jbce and torch/jbce per case on a log axis, each labelled with
    its value, one panel per mode (stacked, so each is readable at page width); right of 1x
    jbce is faster."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    titles = {"fwd": "forward of the mean loss", "vag": "value_and_grad of the mean loss"}
    series = (("optax / jbce", "tab:blue", -0.2), ("PyTorch / jbce", "tab:orange", 0.2))
    groups = chart_rows(cases)
    heights = [0.34 * len(rows) + 1.1 for rows in groups.values()]
    fig, axes = plt.subplots(
        len(groups), 1, figsize=(7.2, sum(heights) + 0.9), dpi=110,
        gridspec_kw={"height_ratios": heights}, squeeze=False,
    )  # fmt: skip
    values = [v for rows in groups.values() for _, *vs in rows for v in vs if v]
    lo, hi = min(values + [1.0]) / 1.35, max(values + [1.0]) * 1.35
    for ax, (mode, rows) in zip(axes[:, 0], groups.items()):
        y = np.arange(len(rows))
        for k, (name, color, offset) in enumerate(series):
            v = np.array([np.nan if r[1 + k] is None else r[1 + k] for r in rows], float)
            # Bars start at 1: right of it jbce is faster, left of it slower.
            ax.barh(y + offset, v - 1, left=1, height=0.38, color=color, label=name)
            for yi, vi in zip(y + offset, v):
                text = "n/a" if np.isnan(vi) else f"{vi:.2f}"
                x = 1 if np.isnan(vi) else vi
                ax.text(x * (1.02 if x >= 1 else 0.98), yi, text, va="center", fontsize=7.5,
                        ha="left" if x >= 1 else "right", color="#333")  # fmt: skip
        ax.axvline(1, color="black", linewidth=1)
        ax.axvspan(lo, 1, color="tab:red", alpha=0.07, linewidth=0)
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ticks = [t for t in (0.25, 0.33, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8) if lo <= t <= hi]
        ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
        ax.minorticks_off()
        ax.set_yticks(y, [r[0] for r in rows], fontsize=9)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"{titles.get(mode, mode)} ({mode})", fontsize=10)
        ax.text(0.01, 0.005, "jbce slower", transform=ax.transAxes, fontsize=8,
                color="tab:red", va="bottom")  # fmt: skip
        ax.text(0.99, 0.005, "jbce faster", transform=ax.transAxes, fontsize=8,
                color="tab:green", va="bottom", ha="right")  # fmt: skip
    axes[-1, 0].set_xlabel("time of optax or PyTorch / time of jbce (log scale)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    inch = 1 / (sum(heights) + 0.9)  # one inch of the figure's height
    top = 1 - 1.0 * inch  # the legend below the title line, the panels below the legend
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=9,
               bbox_to_anchor=(0.5, top + 0.55 * inch))  # fmt: skip
    if env:
        fig.suptitle(
            f"{env.get('command', '')}; {env.get('cpu', '')}, "
            f"{env.get('cpu_threads', '?')} threads; {env.get('date', '')[:10]}",
            fontsize=8.5, y=1 - 0.1 * inch, va="top",
        )  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, top))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


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
        "Each bar is how many times longer optax or PyTorch took than jbce on the same case, "
        "in the same interleaved run: right of 1x jbce leads, left of it (shaded) jbce "
        "trails. The numbers are in the tables below.",
        "",
        f"![Speed ratios against optax and PyTorch per case]({CHART})",
        "",
        "Ratios (> 1: jbce is faster; `jbce/floor` 1: as fast as touching the bytes allows) "
        "and XLA's temp memory:",
        "",
        ratios_table(d.get("cases", [])),
        "",
        "Median times:",
        "",
        times_table(d.get("cases", [])),
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
        lines = [w for t in d["targets"] for w in textwrap.wrap(t, 88, subsequent_indent="    ")]
        out += ["", "### Checks the run made", "", "```text", *lines, "```"]
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


def write_chart(out_dir: Path = OUT.parent, data_dir: Path = DATA) -> Path:
    """Draws the ratio chart unless one drawn from the same JSON by the same code exists."""
    raw = (data_dir / "bench.json").read_bytes()
    key = hashlib.sha256(raw + Path(__file__).read_bytes()).hexdigest()
    path, stamp = out_dir / CHART, out_dir / (CHART + ".sha256")
    if not (path.exists() and stamp.exists() and stamp.read_text() == key):
        d = json.loads(raw)
        ratio_chart(d.get("cases", []), path, env=d.get("env"))
        stamp.write_text(key)
    return path


def write(out: Path = OUT, data_dir: Path = DATA) -> Path:
    text = render(data_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists() or out.read_text() != text:  # keep the mtime: no needless rebuilds
        out.write_text(text)
    write_chart(out.parent, data_dir)
    return out


if __name__ == "__main__":
    sys.stdout.write(render())
