"""Interleaved timing: every implementation of a case is timed in the same rounds.

Each round calls every implementation once (A B C ... then, next round, ... C B A, so no
implementation always runs right after the same neighbour), each sample is the mean of
``reps`` back-to-back calls (``reps`` calibrated so a sample lasts about ``sample_s``; a
sample of a big case is one call), and the result is the median over the rounds. Every call
is synchronised with its implementation's ``sync`` (``jax.block_until_ready`` for JAX, which
also makes GPU timings honest), so a sample measures latency, dispatch included.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

# A runner takes a repetition count k, runs the implementation k times (synchronised)
# and returns the mean seconds of one run; setup it needs (a fresh donated buffer) is
# done inside and excluded from the time.
Runner = Callable[[int], float]


def simple_runner(fn: Callable[[], object], sync: Callable[[object], object]) -> Runner:
    """A runner for ``sync(fn())``."""

    def run(k: int) -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            sync(fn())
        return (time.perf_counter() - t0) / k

    return run


def prepared_runner(
    prepare: Callable[[], object],
    fn: Callable[[object], object],
    sync: Callable[[object], object],
) -> Runner:
    """A runner for ``sync(fn(prepare()))`` that times only ``fn`` (for donated inputs)."""

    def run(k: int) -> float:
        total = 0.0
        for _ in range(k):
            arg = sync(prepare())
            t0 = time.perf_counter()
            sync(fn(arg))
            total += time.perf_counter() - t0
        return total / k

    return run


def measure(
    runners: dict[str, Runner],
    *,
    warmup: int = 2,
    min_rounds: int = 5,
    max_rounds: int = 41,
    budget_s: float = 2.0,
    sample_s: float = 2e-3,
) -> dict[str, dict[str, float]]:
    """Times ``runners`` interleaved; returns ``{name: {"median", "min", "p25", "p75", "n"}}``.

    ``warmup`` rounds first (compilation, page faults of fresh buffers, caches), then one
    calibration call each, then between ``min_rounds`` and ``max_rounds`` timed rounds, as
    many as fit in ``budget_s``.
    """
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name](1)
    reps = {}
    round_s = 0.0
    for name in names:
        t = runners[name](1)
        reps[name] = max(1, min(2000, int(sample_s / max(t, 1e-9))))
        round_s += t * reps[name]
    rounds = max(min_rounds, min(max_rounds, int(budget_s / max(round_s, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            samples[name].append(runners[name](reps[name]))
    out = {}
    for name, xs in samples.items():
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        out[name] = {
            "median": statistics.median(xs),
            "min": min(xs),
            "p25": q[0],
            "p75": q[2],
            "n": len(xs),
            "reps": reps[name],
        }
    return out


def fmt_time(s: float | None) -> str:
    """Seconds as a short human string: 12.3us, 4.56ms, 1.23s."""
    if s is None or not math.isfinite(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f}us"
    if s < 1:
        return f"{s * 1e3:.3g}ms"
    return f"{s:.3g}s"


def fmt_bytes(b: int | None) -> str:
    if b is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.3g}{unit}"
    return f"{b}B"
