"""Deviceless accelerator report: what XLA compiles for an H100 and a TPU v5e, no hardware.

Usage (from the repository root, in the accelerator environment that ``.ci/accelerators.sh``
builds: jax with the ``tpu`` and ``cuda12-local`` plugins; a plain ``.venv`` has neither)::

    .venv-accel/bin/python -m bench.accelerators                 # full report, both platforms
    .venv-accel/bin/python -m bench.accelerators --quick         # small shapes, about a minute
    .venv-accel/bin/python -m bench.accelerators --platforms gpu --json out.json --markdown out.md
    .venv-accel/bin/python -m bench.accelerators --check-conditionals --json cond.json

For every public loss at the benchmark shapes (``bench/shapes.py``'s ``"target"`` shapes and
the fused linear + cross-entropy at ``bench/linear.py``'s ``TARGET``), in float32 and bfloat16,
forward (the mean loss) and value_and_grad (w.r.t. the logits; hidden and weight for the fused
loss), jbce and optax are lowered and compiled for each platform without a device:

- TPU: one device of ``get_topology_desc("v5e:2x2", platform="tpu")`` (``v5e:1x1`` is refused).
- GPU: ``get_topology_desc(platform="cuda", topology="1x1x1", target_config=...)`` with an H100
  SXM's device description (:data:`H100_TARGET_CONFIG`). No autotuning happens without a device,
  so GEMM tilings are XLA's defaults.

What is reported, per case:

- ``temp``: ``compiled.memory_analysis().temp_size_in_bytes`` (on TPU: HBM only; buffers XLA
  keeps in VMEM are not temp).
- ``kernels``: work-launching instructions of the scheduled HLO (:func:`analyse_hlo`), while
  bodies times their trip count.
- ``cond``: ``conditional`` instructions anywhere in the module.
- ``hbm``: estimated HBM bytes, counted from ``compiled.as_text()`` (``cost_analysis()`` is None
  for a deviceless GPU compile): operand + output bytes of each kernel, partial reads and
  in-place updates counted by what they touch (see :func:`kernel_bytes`).
- ``ideal``: every input read once and every output written once (:func:`ideal_bytes`);
  ``hbm/ideal`` (>= 1 for a loss that must read all its inputs) and ``jbce/optax`` ratios.

The targets (:data:`H100_IDEAL_TARGETS` and :func:`check_targets`) are printed met / not met.

``--check-conditionals`` compiles :func:`conditional_cases` (every public loss at a tiny and a
2**15-2**17-element size, each reduction and option, float32 and bfloat16, forward and
value_and_grad) as one module per platform and reports the ``conditional`` count of each call;
it exits 1 when any is non-zero (``tests/test_accelerators.py`` runs it in a subprocess).

Caveats: the HBM figure is a model, not a measurement. Caches are not modelled (on an H100 a
few-MiB tile written and read back by the next kernel likely stays in the 50 MiB L2, so tiled
loops are overestimated); on TPU, buffers XLA places in VMEM cost nothing and every top-level
instruction counts as a "kernel" (a TPU program launches no kernels; read it as op count).
A conditional is counted at its costliest branch, the cheapest shown in parentheses.

The HLO-analysis helpers in the first half of this module import nothing from jax, so the
main test environment can unit-test them on handwritten HLO.

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
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # `python bench/accelerators.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MIB = 1 << 20

# --------------------------------------------------------------------------------------------
# HLO text analysis (pure Python: no jax import)
# --------------------------------------------------------------------------------------------

DTYPE_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16,
    "f16": 16, "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
    "c64": 64, "c128": 128, "token": 0,
}  # fmt: skip

_ARRAY = re.compile(
    r"\b(pred|token|bf16|f[0-9]+e[0-9a-z]+|[fsuc][0-9]+)\[([0-9,<=]*)\](\{[^{}]*\})?"
)
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_NAME = r"[\w.\-]+"
_HEADER = re.compile(rf"^(ENTRY\s+)?%({_NAME})\s*\((.*)\)\s*->\s*(.*)\{{\s*$")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')

# Instructions that launch no work of their own: bookkeeping, views, and the halves of
# asynchronous pairs whose start is counted.
NO_WORK = frozenset(
    {
        "parameter",
        "constant",
        "tuple",
        "get-tuple-element",
        "bitcast",
        "after-all",
        "add-dependency",
        "opt-barrier",
        "domain",
        "partition-id",
        "replica-id",
    }
)
NO_WORK_TARGETS = frozenset({"AllocateBuffer"})  # TPU: reserves a buffer, moves nothing
CONTROL = frozenset({"while", "call", "conditional"})  # counted through their computations


@dataclasses.dataclass
class Instr:
    """One HLO instruction: ``%name = shape opcode(operands), attrs``."""

    name: str
    shape: str
    opcode: str
    operands: list[str]
    raw_operands: str
    attrs: str
    root: bool = False

    def attr(self, key: str) -> str | None:
        """The computation named by ``key=%name`` in the attributes, or None."""
        m = re.search(rf"\b{re.escape(key)}=%({_NAME})", self.attrs)
        return m.group(1) if m else None


@dataclasses.dataclass
class Computation:
    name: str
    entry: bool
    params: str  # the header's parameter list, ``name: shape, ...``
    result: str  # the header's result shape
    instrs: list[Instr]

    def __post_init__(self):
        self.by_name = {i.name: i for i in self.instrs}

    @property
    def root(self) -> Instr:
        return next((i for i in self.instrs if i.root), self.instrs[-1])


def _balanced(s: str, start: int) -> int:
    """Index just past the parenthesis group opening at ``s[start] == "("``."""
    depth = 0
    for k in range(start, len(s)):
        if s[k] == "(":
            depth += 1
        elif s[k] == ")":
            depth -= 1
            if depth == 0:
                return k + 1
    raise ValueError(f"unbalanced parentheses in HLO: {s[start : start + 80]!r}")


def parse_instruction(line: str) -> Instr | None:
    """Parse one instruction line of HLO text (None for anything else)."""
    s = line.strip()
    root = s.startswith("ROOT ")
    if root:
        s = s[5:]
    m = re.match(rf"%({_NAME})\s*=\s*", s)
    if not m:
        return None
    rest = s[m.end() :]
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end = rest.find(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    m2 = re.match(r"([a-z][\w\-]*)\(", rest)
    if not m2:
        return None
    close = _balanced(rest, m2.end() - 1)
    raw = rest[m2.end() : close - 1]
    return Instr(
        name=m.group(1),
        shape=shape,
        opcode=m2.group(1),
        operands=re.findall(rf"%({_NAME})", raw),
        raw_operands=raw,
        attrs=rest[close:],
        root=root,
    )


def parse_hlo(text: str) -> dict[str, Computation]:
    """Computations of an HLO module's text by name (the entry one has ``entry=True``)."""
    comps: dict[str, Computation] = {}
    cur = None
    for line in text.splitlines():
        if cur is None:
            m = _HEADER.match(line)
            if m:
                cur = (m.group(2), bool(m.group(1)), m.group(3), m.group(4).strip(), [])
            continue
        if line.startswith("}"):
            comps[cur[0]] = Computation(*cur)
            cur = None
            continue
        ins = parse_instruction(line)
        if ins is not None:
            cur[4].append(ins)
    return comps


def entry(comps: dict[str, Computation]) -> Computation:
    return next(c for c in comps.values() if c.entry)


def split_tuple(shape: str) -> list[str]:
    """Top-level elements of a tuple shape ``(a, (b, c), d)``; ``[shape]`` for an array."""
    shape = re.sub(r"/\*.*?\*/", "", shape).strip()
    if not shape.startswith("("):
        return [shape]
    out, depth, cur = [], 0, ""
    for ch in shape[1:-1]:
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def shape_bytes(shape: str, hbm_only: bool = True) -> int:
    """Bytes of every array in ``shape`` (tuples summed); with ``hbm_only``, arrays whose
    layout names a memory space other than 0 (TPU ``S(1)`` VMEM, ``S(2)``/``S(6)`` sync
    flags and SMEM) count 0.

    >>> shape_bytes("(f32[4,8]{1,0}, bf16[3]{0:T(128)S(1)}, pred[])")
    129
    >>> shape_bytes("bf16[3]{0:T(128)S(1)}", hbm_only=False)
    6
    """
    total = 0
    for dtype, dims, layout in _ARRAY.findall(shape):
        if hbm_only and layout:
            ms = _MEMORY_SPACE.search(layout)
            if ms and int(ms.group(1)) != 0:
                continue
        n = 1
        for d in dims.replace("<=", "").split(","):
            if d:
                n *= int(d)
        total += (n * DTYPE_BITS.get(dtype, 8) + 7) // 8
    return total


def ideal_bytes(text: str) -> int:
    """Entry parameters read once plus entry results written once (logical shapes)."""
    e = entry(parse_hlo(text))
    return shape_bytes(e.params, hbm_only=False) + shape_bytes(e.result, hbm_only=False)


def count_conditionals(text: str) -> int:
    """Number of ``conditional`` instructions in every computation of the module."""
    return sum(i.opcode == "conditional" for c in parse_hlo(text).values() for i in c.instrs)


def _constants_in(comp_name: str, comps: dict[str, Computation], seen=None) -> dict[str, int]:
    """Integer scalar constants of a computation and the computations it calls."""
    seen = set() if seen is None else seen
    if comp_name in seen or comp_name not in comps:
        return {}
    seen.add(comp_name)
    out = {}
    for i in comps[comp_name].instrs:
        if i.opcode == "constant" and re.fullmatch(r"-?\d+", i.raw_operands.strip()):
            out[i.name] = int(i.raw_operands)
        for key in ("calls", "to_apply"):
            sub = i.attr(key)
            if sub:
                out.update(_constants_in(sub, comps, seen))
    return out


def trip_count(w: Instr, comps: dict[str, Computation]) -> int | None:
    """Iterations of the while loop ``w``: XLA's ``known_trip_count`` when its backend config
    has one (GPU), else the bound ``c`` of an ``i < c`` compare in its condition (TPU: loops
    from ``lax.fori_loop``/``scan`` count up from 0 by 1); None when neither is found."""
    m = _TRIP.search(w.attrs)
    if m:
        return int(m.group(1))
    cond = w.attr("condition")
    todo, seen = [cond], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        consts = _constants_in(name, comps)
        for i in comps[name].instrs:
            if i.opcode == "compare" and "direction=LT" in i.attrs and len(i.operands) == 2:
                if i.operands[1] in consts:
                    return consts[i.operands[1]]
            sub = i.attr("calls")
            if sub:
                todo.append(sub)
    return None


def _strip_bitcasts(i: Instr, comp: Computation) -> Instr:
    while i.opcode == "bitcast" and i.operands and i.operands[0] in comp.by_name:
        i = comp.by_name[i.operands[0]]
    return i


def _is_param(i: Instr, comp: Computation) -> bool:
    return _strip_bitcasts(i, comp).opcode == "parameter"


def _in_place_update(i: Instr, comp: Computation) -> Instr | None:
    """The update operand of an in-place ``dynamic-update-slice``/``scatter`` (its operand 0
    is a parameter of ``comp``), else None."""
    if i.opcode not in ("dynamic-update-slice", "scatter") or len(i.operands) < 2:
        return None
    if not _is_param(comp.by_name.get(i.operands[0], i), comp):
        return None
    upd = i.operands[1] if i.opcode == "dynamic-update-slice" else i.operands[-1]
    return comp.by_name.get(upd)


def fusion_param_reads(
    fused: Computation, comps: dict[str, Computation] | None = None
) -> dict[int, int | None]:
    """Bytes each parameter of a fused computation reads, or None for "all of it".

    A parameter read only through ``slice``/``dynamic-slice``/``gather`` (bitcasts followed)
    reads what those produce; one that is only the buffer of an in-place
    ``dynamic-update-slice``/``scatter`` on the fusion's output reads nothing. With ``comps``,
    a parameter passed to a nested fusion (TPU) reads what that fusion's parameter reads.
    """
    users: dict[str, list[tuple[Instr, int]]] = {}
    for i in fused.instrs:
        for pos, op in enumerate(i.operands):
            users.setdefault(op, []).append((i, pos))
    outputs = {
        _strip_bitcasts(fused.by_name.get(o, fused.root), fused).name
        for o in (fused.root.operands if fused.root.opcode == "tuple" else [fused.root.name])
    }

    def read(name: str) -> int | None:
        total = 0
        for u, pos in users.get(name, []):
            if u.opcode == "bitcast":
                sub = read(u.name)
                if sub is None:
                    return None
                total += sub
            elif u.opcode in ("slice", "dynamic-slice", "gather") and pos == 0:
                total += shape_bytes(u.shape, hbm_only=False)
            elif u.opcode == "fusion" and comps and u.attr("calls") in comps:
                sub = fusion_param_reads(comps[u.attr("calls")], comps).get(pos)
                if sub is None:
                    return None
                total += sub
            elif u.opcode in ("dynamic-update-slice", "scatter") and pos == 0 and u.name in outputs:
                continue
            else:
                return None
        return total

    out = {}
    for i in fused.instrs:
        if i.opcode == "parameter":
            out[int(i.raw_operands)] = read(i.name)
    return out


def fusion_output_bytes(fused: Computation, shape: str) -> int:
    """HBM bytes a fusion of result ``shape`` writes: in-place updates write their update."""
    elems = split_tuple(shape)
    roots = fused.root.operands if fused.root.opcode == "tuple" else [fused.root.name]
    if len(roots) != len(elems):
        return shape_bytes(shape)
    total = 0
    for name, elem in zip(roots, elems):
        full = shape_bytes(elem)
        r = _strip_bitcasts(fused.by_name[name], fused) if name in fused.by_name else None
        upd = _in_place_update(r, fused) if r is not None else None
        total += min(full, shape_bytes(upd.shape, hbm_only=False)) if upd and full else full
    return total


def kernel_bytes(i: Instr, comp: Computation, comps: dict[str, Computation]) -> int:
    """Estimated HBM bytes one launch of kernel ``i`` (an instruction of ``comp``) moves.

    Operands (each distinct operand once) plus outputs, HBM arrays only. A fusion parameter
    read only by slices/gathers counts what is read; in-place ``dynamic-update-slice`` and
    ``scatter`` (top level or as a fusion's output) count the update, not the buffer;
    ``copy-start`` counts its source and destination; a custom call's trailing ``s8``/``u8``
    tuple element (a cuBLAS workspace) is not counted.
    """

    def operand(name: str) -> int:
        d = comp.by_name.get(name)
        return shape_bytes(d.shape) if d is not None else 0

    ops = list(dict.fromkeys(i.operands))
    if i.opcode == "fusion" and i.attr("calls") in comps:
        fused = comps[i.attr("calls")]
        reads = fusion_param_reads(fused, comps)
        total = 0
        for k, name in enumerate(i.operands):
            full = operand(name)
            part = reads.get(k)
            total += full if part is None else min(full, part)
        return total + fusion_output_bytes(fused, i.shape)
    if i.opcode in ("slice", "dynamic-slice", "gather"):
        src = comp.by_name.get(ops[0]) if ops else None
        read = shape_bytes(i.shape, hbm_only=False) if src and shape_bytes(src.shape) else 0
        return read + sum(operand(o) for o in ops[1:]) + shape_bytes(i.shape)
    if i.opcode in ("dynamic-update-slice", "scatter"):
        upd = i.operands[1] if i.opcode == "dynamic-update-slice" else i.operands[-1]
        rest = sum(operand(o) for o in ops[1:])
        return rest + (operand(upd) if shape_bytes(i.shape) else 0)
    if i.opcode == "copy-start":
        return sum(operand(o) for o in ops) + shape_bytes(split_tuple(i.shape)[0])
    if i.opcode.endswith("-start"):
        done = next(
            (d for d in comp.instrs if d.opcode.endswith("-done") and i.name in d.operands), None
        )
        return sum(operand(o) for o in ops) + (shape_bytes(done.shape) if done else 0)
    out = split_tuple(i.shape)
    if i.opcode == "custom-call" and len(out) > 1 and re.match(r"\s*[su]8\[", out[-1]):
        out = out[:-1]
    return sum(operand(o) for o in ops) + sum(shape_bytes(o) for o in out)


@dataclasses.dataclass
class HloStats:
    """What :func:`analyse_hlo` counts; ``*_min`` take each conditional's cheapest branch
    where the plain fields take its costliest."""

    kernels: int = 0
    hbm_bytes: int = 0
    kernels_min: int = 0
    hbm_bytes_min: int = 0
    conditionals: int = 0
    while_loops: int = 0
    unknown_trip_counts: int = 0


def _walk(comp_name: str, comps: dict[str, Computation], mult: int, st: HloStats) -> None:
    comp = comps[comp_name]
    for i in comp.instrs:
        op = i.opcode
        if op in NO_WORK or op.endswith("-done"):
            continue
        if op == "custom-call":
            tgt = re.search(r'custom_call_target="([^"]*)"', i.attrs)
            if tgt and tgt.group(1) in NO_WORK_TARGETS:
                continue
        if op == "while":
            st.while_loops += 1
            n = trip_count(i, comps)
            if n is None:
                st.unknown_trip_counts += 1
                n = 1
            for key in ("body", "condition"):
                if i.attr(key) in comps:
                    _walk(i.attr(key), comps, mult * n, st)
        elif op == "call":
            if i.attr("to_apply") in comps:
                _walk(i.attr("to_apply"), comps, mult, st)
        elif op == "conditional":  # one branch runs: the costliest and the cheapest
            m = re.search(r"branch_computations=\{([^}]*)\}", i.attrs)
            names = re.findall(rf"%({_NAME})", m.group(1)) if m else []
            names += [n for n in (i.attr("true_computation"), i.attr("false_computation")) if n]
            branches = []
            for b in names:
                if b in comps:
                    branches.append(HloStats())
                    _walk(b, comps, mult, branches[-1])
            if branches:
                st.kernels += max(s.kernels for s in branches)
                st.hbm_bytes += max(s.hbm_bytes for s in branches)
                st.kernels_min += min(s.kernels_min for s in branches)
                st.hbm_bytes_min += min(s.hbm_bytes_min for s in branches)
                st.while_loops += sum(s.while_loops for s in branches)
                st.unknown_trip_counts += sum(s.unknown_trip_counts for s in branches)
        else:
            st.kernels += mult
            st.kernels_min += mult
            b = mult * kernel_bytes(i, comp, comps)
            st.hbm_bytes += b
            st.hbm_bytes_min += b


def analyse_hlo(text: str) -> HloStats:
    """Kernels launched, estimated HBM bytes and ``conditional`` count of a compiled module.

    Kernels are the entry computation's instructions that launch work (fusions, custom calls,
    copies, sorts, ...; not parameters, tuples, get-tuple-element, bitcasts, constants or the
    ``-done`` half of async pairs); a while loop contributes its body and condition times its
    trip count (:func:`trip_count`), a ``call`` its computation, a ``conditional`` its costliest
    branch (``*_min``: its cheapest). Bytes per kernel are :func:`kernel_bytes`.
    """
    comps = parse_hlo(text)
    st = HloStats()
    _walk(entry(comps).name, comps, 1, st)
    st.conditionals = sum(i.opcode == "conditional" for c in comps.values() for i in c.instrs)
    return st


# --------------------------------------------------------------------------------------------
# Deviceless compilation (imports jax and the plugins lazily)
# --------------------------------------------------------------------------------------------

# An H100 SXM 80 GB as XLA's GpuTargetConfigProto (text format): compute capability 9.0,
# 132 SMs, 3.35 TB/s, 50 MiB L2, 228 KiB shared memory per SM (227 KiB opt-in per block).
H100_TARGET_CONFIG = """
gpu_device_info {
  cuda_compute_capability { major: 9 minor: 0 }
  core_count: 132
  fpus_per_core: 128
  clock_rate_ghz: 1.98
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  device_memory_size: 84978434048
  shared_memory_per_core: 233472
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  threads_per_block_limit: 1024
  threads_per_core_limit: 2048
  threads_per_warp: 32
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
}
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
"""

PLATFORMS = ("gpu", "tpu")
DEVICE_NAMES = {"gpu": "H100", "tpu": "TPU v5e"}


def setup_environment() -> None:
    """Before jax is imported: the CPU backend as default (so the plugins register without
    probing for hardware: the CUDA plugin skips its version check), libtpu shareable between
    processes, and quiet logs."""
    if "jax" in sys.modules:
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # libtpu takes /tmp/libtpu_lockfile (one process per TPU host); compiling without a TPU
    # needs no such exclusivity, and a second report or test would otherwise abort.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
    os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")


_DEVICES: dict = {}


def device(platform: str):
    """A deviceless device for ``platform`` (``"gpu"``: an H100, ``"tpu"``: a v5e chip)."""
    if platform not in _DEVICES:
        from jax.experimental import topologies

        if platform == "tpu":
            topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
        elif platform == "gpu":
            topo = topologies.get_topology_desc(
                platform="cuda", topology="1x1x1", target_config=H100_TARGET_CONFIG
            )
        else:
            raise ValueError(f"platform must be one of {PLATFORMS}; got {platform!r}")
        _DEVICES[platform] = topo.devices[0]
    return _DEVICES[platform]


def compile_for(fn: Callable, specs: Sequence[tuple[tuple[int, ...], str]], platform: str):
    """``jax.jit(fn)`` lowered for ``specs`` (``(shape, dtype)`` per argument) on one
    deviceless ``platform`` device, compiled."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sharding = NamedSharding(Mesh([device(platform)], ("x",)), PartitionSpec())
    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in specs]
    return jax.jit(fn).lower(*args).compile()


def compiled_stats(compiled) -> dict:
    """temp bytes, kernels, conditionals, estimated HBM bytes and ideal bytes of a compile."""
    text = compiled.as_text()
    st = analyse_hlo(text)
    ma = compiled.memory_analysis()
    out = {
        "temp_bytes": int(ma.temp_size_in_bytes) if ma is not None else None,
        "kernels": st.kernels,
        "conditionals": st.conditionals,
        "hbm_bytes": st.hbm_bytes,
        "hbm_bytes_cheapest_branches": st.hbm_bytes_min,
        "kernels_cheapest_branches": st.kernels_min,
        "ideal_bytes": ideal_bytes(text),
        "while_loops": st.while_loops,
        "unknown_trip_counts": st.unknown_trip_counts,
    }
    try:  # TPU reports XLA's own estimate; a deviceless GPU compile gives None
        ca = compiled.cost_analysis()
        if isinstance(ca, list):
            ca = ca[0] if ca else None
        out["xla_bytes_accessed"] = int(ca["bytes accessed"]) if ca else None
    except Exception:  # noqa: BLE001 - optional
        out["xla_bytes_accessed"] = None
    return out


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
# The no-conditional check of every public loss (tests/test_accelerators.py)
# --------------------------------------------------------------------------------------------

# Batches on either side of the sizes at which a loss may switch implementation: a tiny one
# and one of 2**15 elements (binary) or 2**17 logits (softmax, fused linear; two vocabulary
# tiles of the default chunk). Deviceless compile time grows with the shapes (TPU), so the
# large size is only as large as it needs to be.
SIZES = {
    "small": {"N": 8, "K": 16, "D": 4, "B": (8, 16)},
    "large": {"N": 32, "K": 4096, "D": 16, "B": (128, 256)},
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One call of a public loss: ``fn(*args)`` for arguments of ``specs`` (``(shape,
    dtype)``), differentiated w.r.t. ``argnums`` for value_and_grad."""

    loss: str
    options: str
    dtype: str
    size: str
    fn: Callable
    specs: tuple[tuple[tuple[int, ...], str], ...]
    argnums: tuple[int, ...] = (0,)

    @property
    def label(self) -> str:
        return f"{self.loss}[{self.options}] {self.dtype} {self.size}"


def _variants(dtype: str, size: str, *, wrappers: bool, options: bool) -> list[Variant]:
    """The public losses at ``size`` in ``dtype``: each reduction (``"mean"``/``"none"``
    only at ``"large"``: ``"sum"`` takes the path ``"mean"`` does); with ``wrappers`` also
    entropy, KL and the GAN losses; with ``options`` weights, masks, label smoothing, z-loss,
    soft-capping, class weights, ``pos_weight``, focal alpha/gamma, ``chunk_size``."""
    import jax.numpy as jnp

    import jbce

    z = SIZES[size]
    N, K, D, BX = z["N"], z["K"], z["D"], z["B"]
    X, S32, M = dtype, "int32", "bool"
    out: list[Variant] = []

    def add(loss, opts, fn, specs, argnums=(0,)):
        out.append(Variant(loss, opts, dtype, size, fn, tuple(specs), tuple(argnums)))

    reductions = ("none", "sum", "mean") if size == "small" else ("none", "mean")
    bce, bce_p = jbce.sigmoid_binary_cross_entropy, jbce.binary_cross_entropy
    focal = jbce.sigmoid_focal_loss
    ce, sce = jbce.softmax_cross_entropy_with_integer_labels, jbce.softmax_cross_entropy
    lin = jbce.linear_softmax_cross_entropy
    bxy = [(BX, X), (BX, X)]  # binary logits (or probabilities) and float labels
    xl = [((N, K), X), ((N,), S32)]  # logits, integer labels
    xy = [((N, K), X), ((N, K), X)]  # logits, label distributions
    hwl = [((N, D), X), ((D, K), X), ((N,), S32)]  # hidden, weight, labels
    for r in reductions:
        add("sigmoid_binary_cross_entropy", r, lambda x, y, r=r: bce(x, y, reduction=r), bxy)
        add("binary_cross_entropy", r, lambda p, y, r=r: bce_p(p, y, reduction=r), bxy)
        add("sigmoid_focal_loss", r, lambda x, y, r=r: focal(x, y, reduction=r), bxy)
        add(
            "softmax_cross_entropy_with_integer_labels",
            r,
            lambda x, y, r=r: ce(x, y, reduction=r),
            xl,
        )
        add("softmax_cross_entropy", r, lambda x, y, r=r: sce(x, y, reduction=r), xy)
        add(
            "linear_softmax_cross_entropy",
            r,
            lambda h, w, y, r=r: lin(h, w, y, reduction=r),
            hwl,
            (0, 1),
        )
        if r == "mean":  # per-token outputs, no reduction: once per size
            add(
                "linear_log_probs",
                "",
                lambda h, w, y: jnp.stack(jbce.linear_log_probs(h, w, y)),
                hwl,
                (0, 1),
            )
        # Losses newer than the ones above, where this jbce has them.
        for name, specs, argnums in _SOFTMAX_FAMILY:
            f = getattr(jbce, name, None)
            if f is not None:
                add(name, r, lambda *a, f=f, r=r: f(*a, reduction=r), [xl, xy][specs], argnums)
        if hasattr(jbce, "linear_distillation_loss"):
            add(
                "linear_distillation_loss",
                r,
                lambda h, w, ht, wt, r=r: jbce.linear_distillation_loss(h, w, ht, wt, reduction=r),
                hwl[:2] + hwl[:2],
                (0, 1),
            )
        if hasattr(jbce, "clip_loss"):  # embeddings x, y [N, D], scale, bias
            emb = [((N, D), X), ((N, D), X), ((), "float32"), ((), "float32")]
            opts = {"ids": None, "chunk_size": None}
            if options:  # duplicate ids; tiles whose last row and column chunks overlap
                opts = {"ids": jnp.arange(N) // 2, "chunk_size": (3, 5)}
            name = r + (",ids,chunk_size=(3, 5)" if options else "")
            add("clip_loss", name,
                lambda x, y, s, b, r=r, o=opts: jbce.clip_loss(x, y, scale=s, reduction=r, **o),
                emb, (0, 1, 2))  # fmt: skip
            add("siglip_loss", name,
                lambda x, y, s, b, r=r, o=opts: jbce.siglip_loss(x, y, scale=s, bias=b,
                                                                 reduction=r, **o),
                emb, (0, 1, 2, 3))  # fmt: skip
    if wrappers:
        add("entropy", "", lambda p: jbce.entropy(p), xy[:1])
        add("kl_divergence", "", lambda x, y: jbce.kl_divergence(x, y), xy, (0, 1))
        add("discriminator_loss", "", lambda a, b: jbce.discriminator_loss(a, b), bxy, (0, 1))
        add("generator_loss", "", lambda a: jbce.generator_loss(a), bxy[:1])
    if not options:
        return out
    bw = [(BX, X), (BX[-1:], X), (BX, M)]  # weights, pos_weight (last axis), where
    add(
        "sigmoid_binary_cross_entropy",
        "weights,pos_weight,where,label_smoothing",
        lambda x, y, w, pw, m: bce(x, y, weights=w, pos_weight=pw, where=m, label_smoothing=0.1),
        bxy + bw,
    )
    add(
        "sigmoid_binary_cross_entropy",
        "where,sum",
        lambda x, y, m: bce(x, y, where=m, reduction="sum"),
        bxy + bw[2:],
    )
    add(
        "binary_cross_entropy",
        "weights,where,label_smoothing",
        lambda p, y, w, m: bce_p(p, y, weights=w, where=m, label_smoothing=0.1),
        bxy + [bw[0], bw[2]],
    )
    add(
        "sigmoid_focal_loss",
        "alpha=0.25,gamma=2,weights,where",
        lambda x, y, w, m: focal(x, y, alpha=0.25, gamma=2.0, weights=w, where=m),
        bxy + [bw[0], bw[2]],
    )
    add("sigmoid_focal_loss", "gamma=0.5", lambda x, y: focal(x, y, gamma=0.5), bxy)
    add(
        "sigmoid_focal_loss",
        "alpha=0.75,gamma=0",
        lambda x, y: focal(x, y, alpha=0.75, gamma=0.0),
        bxy,
    )
    add(
        "softmax_cross_entropy_with_integer_labels",
        "class_weights,weights,label_smoothing",
        lambda x, y, cw, w: ce(x, y, class_weights=cw, weights=w, label_smoothing=0.1),
        xl + [((K,), X), ((N,), X)],
    )
    add(
        "softmax_cross_entropy_with_integer_labels",
        "z_loss,logit_softcap,ignore_index=None",
        lambda x, y: ce(x, y, z_loss=1e-4, logit_softcap=30.0, ignore_index=None),
        xl,
    )
    add(
        "softmax_cross_entropy_with_integer_labels",
        "where per example",
        lambda x, y, m: ce(x, y, where=m),
        xl + [((N,), M)],
    )
    add(
        "softmax_cross_entropy_with_integer_labels",
        "where per logit,sum",
        lambda x, y, m: ce(x, y, where=m, reduction="sum"),
        xl + [((N, K), M)],
    )
    add(
        "softmax_cross_entropy",
        "weights,label_smoothing,where per example",
        lambda x, y, w, m: sce(x, y, weights=w, label_smoothing=0.1, where=m),
        xy + [((N,), X), ((N,), M)],
    )
    add(
        "softmax_cross_entropy",
        "where per logit",
        lambda x, y, m: sce(x, y, where=m),
        xy + [((N, K), M)],
    )
    add(
        "linear_softmax_cross_entropy",
        "bias,weights,label_smoothing,z_loss,logit_softcap",
        lambda h, w, y, b, wt: lin(
            h, w, y, bias=b, weights=wt, label_smoothing=0.1, z_loss=1e-4, logit_softcap=30.0
        ),
        hwl + [((K,), X), ((N,), X)],
        (0, 1, 3),
    )
    add(
        "linear_softmax_cross_entropy",
        "class_weights,label_smoothing,ignore_index=None",
        lambda h, w, y, cw: lin(h, w, y, class_weights=cw, label_smoothing=0.1, ignore_index=None),
        hwl + [((K,), X)],
        (0, 1, 3),
    )
    add(
        "linear_log_probs",
        "bias,temperature,chunk_size=(N/2,K/2)",
        lambda h, w, y, b, t: jnp.stack(
            jbce.linear_log_probs(h, w, y, bias=b, temperature=t, chunk_size=(N // 2, K // 2))
        ),
        hwl + [((K,), X), ((), "float32")],
        (0, 1, 3, 4),
    )
    add(
        "linear_softmax_cross_entropy",
        "ignore_index=None,chunk_size=K/2",
        lambda h, w, y: lin(h, w, y, ignore_index=None, chunk_size=K // 2),
        hwl,
        (0, 1),
    )
    if hasattr(jbce, "linear_distillation_loss"):
        dist = jbce.linear_distillation_loss
        add(
            "linear_distillation_loss",
            "beta=0,temperature=2,bias,teacher_bias,labels,weights,chunk_size=K/2",
            lambda h, w, ht, wt, b, bt, y, wt_: dist(
                h, w, ht, wt, beta=0.0, temperature=2.0, bias=b, teacher_bias=bt, labels=y,
                weights=wt_, chunk_size=K // 2,
            ),
            hwl[:2] + hwl[:2] + [((K,), X), ((K,), X), ((N,), S32), ((N,), X)],
            (0, 1, 2, 3, 4, 5),
        )  # fmt: skip
        add(
            "linear_distillation_loss",
            "traced beta and temperature,beta=1,sum",
            lambda h, w, ht, wt, b, t: (
                dist(h, w, ht, wt, beta=b, temperature=t, reduction="sum")
                + dist(h, w, ht, wt, beta=1.0, reduction="sum")
            ),
            hwl[:2] + hwl[:2] + [((), X), ((), X)],
            (0, 1, 4, 5),
        )
    extra = {  # name: (options, call, extra argument specs)
        "softmax_focal_loss": (
            "alpha=0.25,gamma=0.5,weights,where per logit",
            lambda f, x, y, w, m: f(x, y, alpha=0.25, gamma=0.5, weights=w, where=m),
            [((N,), X), ((N, K), M)],
        ),
        "softmax_focal_loss_with_integer_labels": (
            "alpha[K],class_weights,ignore_index=None,where",
            lambda f, x, y, a, cw, m: f(
                x, y, alpha=a, class_weights=cw, ignore_index=None, where=m
            ),
            [((K,), X), ((K,), X), ((N,), M)],
        ),
        "poly_loss_cross_entropy": (
            "epsilon=1,weights,where",
            lambda f, x, y, w, m: f(x, y, epsilon=1.0, weights=w, where=m),
            [((N,), X), ((N,), M)],
        ),
        "nll_loss": (
            "class_weights,weights,where",
            lambda f, x, y, cw, w, m: f(x, y, class_weights=cw, weights=w, where=m),
            [((K,), X), ((N,), X), ((N,), M)],
        ),
        "categorical_cross_entropy": (
            "label_smoothing,where per probability",
            lambda f, x, y, m: f(x, y, label_smoothing=0.1, where=m),
            [((N, K), M)],
        ),
        "jensen_shannon_divergence": (
            "beta=0.3,temperature=2,weights,where",
            lambda f, x, y, w, m: f(x, y, beta=0.3, temperature=2.0, weights=w, where=m),
            [((N,), X), ((N,), M)],
        ),
    }
    for name, specs, argnums in _SOFTMAX_FAMILY:
        f = getattr(jbce, name, None)
        if f is not None and name in extra:
            opts, call, more = extra[name]
            add(name, opts, lambda *a, f=f, c=call: c(f, *a), [xl, xy][specs] + more, argnums)
    return out


# Softmax-family losses taking (logits-like, labels): name, 0 = integer labels / 1 = label
# distributions (or a second logits), value_and_grad argnums. Looked up with getattr, so the
# check runs on a jbce that predates some of them (the coverage test pins jbce.__all__).
_SOFTMAX_FAMILY = (
    ("softmax_focal_loss", 1, (0,)),
    ("softmax_focal_loss_with_integer_labels", 0, (0,)),
    ("poly_loss_cross_entropy", 1, (0,)),
    ("nll_loss", 0, (0,)),
    ("categorical_cross_entropy", 1, (0,)),
    ("jensen_shannon_divergence", 1, (0, 1)),
)


# (dtype, size, wrappers, options): each dtype and size with every reduction; the thin
# wrappers (entropy, KL, GAN) and the option variants in about half of them, so that the
# check compiles in well under a minute on two cores.
CHECK_GRID = (
    ("float32", "small", True, True),
    ("bfloat16", "small", True, False),
    ("float32", "large", True, False),
    ("bfloat16", "large", False, True),
)


def conditional_cases() -> list[Variant]:
    """The calls the no-conditional check compiles (:data:`CHECK_GRID`; each forward and
    value_and_grad)."""
    out = []
    for dtype, size, wrappers, options in CHECK_GRID:
        out += _variants(dtype, size, wrappers=wrappers, options=options)
    return out


def _both_modes(v: Variant) -> Callable:
    """``fn(*args) -> (forward, value_and_grad)`` of a variant (``"none"`` summed for vag)."""
    import jax
    import jax.numpy as jnp

    vag = jax.value_and_grad(lambda *a: jnp.sum(v.fn(*a)), argnums=v.argnums)
    return lambda *a: (v.fn(*a), vag(*a))


_SCOPE = "jbce_check_case"


def _conditional_scopes(text: str) -> list[int | None]:
    """For each ``conditional`` of a module, the case index of the ``jbce_check_case<k>``
    named scope in its metadata (None when it carries none)."""
    out = []
    for c in parse_hlo(text).values():
        for i in c.instrs:
            if i.opcode == "conditional":
                m = re.search(rf"{_SCOPE}(\d+)\b", i.attrs)
                out.append(int(m.group(1)) if m else None)
    return out


def check_conditionals(platforms: Sequence[str] = PLATFORMS, log=None) -> dict:
    """``conditional`` count of each of :func:`conditional_cases` per platform.

    All cases are compiled as one module per platform, each under a named scope, and each
    conditional is attributed to its case by the scope in its metadata (a conditional with
    none is reported as unattributed). Returns ``{"results": [...], "unattributed": {...},
    "seconds": {...}}``.
    """
    import jax

    cases = conditional_cases()
    fns = [_both_modes(v) for v in cases]
    bounds = [0]
    for v in cases:
        bounds.append(bounds[-1] + len(v.specs))

    def together(*args):
        out = []
        for k, (f, b0, b1) in enumerate(zip(fns, bounds, bounds[1:])):
            with jax.named_scope(f"{_SCOPE}{k}"):
                out.append(f(*args[b0:b1]))
        return out

    specs = [s for v in cases for s in v.specs]

    def run(platform):
        t0 = time.perf_counter()
        scopes = _conditional_scopes(compile_for(together, specs, platform).as_text())
        dt = round(time.perf_counter() - t0, 1)
        if log:
            log(
                f"{DEVICE_NAMES[platform]}: {len(cases)} calls (forward and value_and_grad) "
                f"compiled in {dt}s, {len(scopes)} conditionals",
                flush=True,
            )
        return scopes, dt

    for p in platforms:  # create the devices before the threads do
        device(p)
    # XLA compiles outside the GIL: the platforms compile side by side.
    with ThreadPoolExecutor(max_workers=len(platforms)) as pool:
        done = dict(zip(platforms, pool.map(run, platforms)))
    results, unattributed, seconds = [], {}, {}
    for platform in platforms:
        scopes, seconds[platform] = done[platform]
        unattributed[platform] = sum(s is None for s in scopes)
        for k, v in enumerate(cases):
            results.append(
                {
                    "platform": platform,
                    "loss": v.loss,
                    "options": v.options,
                    "dtype": v.dtype,
                    "size": v.size,
                    "conditionals": scopes.count(k),
                }
            )
    return {"results": results, "unattributed": unattributed, "seconds": seconds}


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
PALLAS_TARGETS = ("__gpu$xla.gpu.triton", "tpu_custom_call", "mosaic_gpu", "mosaic_gpu_v2")


def pallas_custom_calls(text: str) -> int:
    """Custom calls of a compiled module that run a Pallas kernel (Triton, Mosaic)."""
    return sum(
        1
        for m in re.finditer(r'custom_call_target="([^"]*)"', text)
        if m.group(1) in PALLAS_TARGETS
    )


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


# The option sets pallas_shard_map_compile compiles: class weights alone (w_y, taken outside
# the kernels) and with label smoothing (the kernels' weighted sums, a [1, V] operand more).
PALLAS_SHARD_MAP_OPTIONS = {
    "class_weights": {},
    "class_weights_smoothing": {"label_smoothing": 0.1},
}


def pallas_shard_map_compile(
    platform: str, n: int = 512, d: int = 128, v: int = 4096, **options
) -> dict:
    """value_and_grad of ``implementation="pallas"`` with class weights inside ``shard_map``
    (``check_vma=True``, the default; a one-device ``"vocab"`` axis) compiled for
    ``platform``, with the other loss ``options`` (:data:`PALLAS_SHARD_MAP_OPTIONS`):
    ``{"pallas_calls": ..., "conditionals": ...}``. The kernels' outputs must carry the
    mesh-axis types there (interpret mode cannot check this: see
    tests/_parallel_checks.py)."""
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jbce

    mesh = Mesh([device(platform)], ("vocab",))

    def loss(h, w, y, c):
        return jbce.linear_softmax_cross_entropy(
            h, w, y, class_weights=c, axis_name="vocab", implementation="pallas", **options
        )

    f = jax.shard_map(
        loss, mesh=mesh, in_specs=(P(), P(None, "vocab"), P(), P("vocab")), out_specs=P()
    )
    specs = (((n, d), "float32", P()), ((d, v), "float32", P(None, "vocab")),
             ((n,), "int32", P()), ((v,), "float32", P("vocab")))  # fmt: skip
    args = [jax.ShapeDtypeStruct(s, t, sharding=NamedSharding(mesh, p)) for s, t, p in specs]
    text = jax.jit(jax.value_and_grad(f, (0, 1, 3))).lower(*args).compile().as_text()
    return {
        "pallas_calls": pallas_custom_calls(text),
        "conditionals": analyse_hlo(text).conditionals,
    }


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
        "--check-conditionals",
        action="store_true",
        help="only the no-conditional check of every public loss (two small sizes)",
    )
    p.add_argument(
        "--pallas",
        action="store_true",
        help='only the Pallas kernels (implementation="pallas") of the fused linear loss',
    )
    p.add_argument(
        "--pallas-check",
        action="store_true",
        help="--pallas without the XLA/optax comparisons, float32 only (the CI compile check)",
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
    if args.check_conditionals:
        doc = check_conditionals(args.platforms, log=print)
        bad = [r for r in doc["results"] if r["conditionals"]]
        for r in bad:
            print(
                f"conditional: {DEVICE_NAMES[r['platform']]} {r['loss']}[{r['options']}] "
                f"{r['dtype']} {r['size']}: {r['conditionals']}"
            )
        for p, n in doc["unattributed"].items():
            if n:
                print(f"conditional: {DEVICE_NAMES[p]}: {n} not attributable to a call")
        n_bad = len(bad) + sum(doc["unattributed"].values())
        print(
            f"{len(doc['results']) - len(bad)}/{len(doc['results'])} calls without a "
            f"conditional ({time.perf_counter() - t0:.1f}s)"
        )
        if args.json:
            doc["environment"] = environment()
            args.json.write_text(json.dumps(doc, indent=1) + "\n")
        return 1 if n_bad else 0

    if args.pallas or args.pallas_check:
        print(format_pallas_header(), flush=True)
        check = dict(compare=False, dtypes=("float32",)) if args.pallas_check else {}
        rows = pallas_report(args.platforms, args.quick, **check)
        targets = check_pallas_targets(rows)
        print("\ntargets:")
        for t in targets:
            print(f"  {'met    ' if t['met'] else 'NOT met'}  {t['target']}: {t['detail']}")
        print("\n" + PALLAS_LEGEND)
        print(f"\n{len(rows)} cases in {time.perf_counter() - t0:.0f}s")
        shard_map = {}
        if args.pallas_check:
            for platform in args.platforms:
                shard_map[platform] = {}
                for name, options in PALLAS_SHARD_MAP_OPTIONS.items():
                    st = pallas_shard_map_compile(platform, **options)
                    shard_map[platform][name] = st
                    print(f"{DEVICE_NAMES[platform]} shard_map (check_vma), {name}: {st}")
        if args.json:
            doc = {"environment": environment(), "quick": args.quick, "rows": rows}
            doc["targets"], doc["shard_map"] = targets, shard_map
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
