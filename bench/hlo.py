"""HLO analysis of a compiled XLA program, and deviceless compiles for an H100 and a TPU v5e.

What ``bench/accelerators.py`` reports and ``tests/test_accelerators.py`` checks, read from
``compiled.as_text()`` (``cost_analysis()`` is None for a deviceless GPU compile):

- :func:`parse_hlo`: an HLO module's text as computations of instructions.
- :func:`analyse_hlo`: kernels launched (work-launching instructions of the scheduled HLO,
  while bodies times their trip count, :func:`trip_count`), estimated HBM bytes
  (:func:`kernel_bytes`: operand + output bytes of each kernel, partial reads and in-place
  updates counted by what they touch) and ``conditional`` instructions
  (:func:`count_conditionals`); :func:`ideal_bytes`: every input read once and every
  output written once.
- :func:`compile_for`: ``jax.jit(fn)`` lowered and compiled for one deviceless device
  (:func:`device`: an H100 from :data:`H100_TARGET_CONFIG`, a TPU v5e chip), and
  :func:`compiled_stats`, the figures of a compile.

Caveats: the HBM figure is a model, not a measurement. Caches are not modelled (on an H100 a
few-MiB tile written and read back by the next kernel likely stays in the 50 MiB L2, so tiled
loops are overestimated); on TPU, buffers XLA places in VMEM cost nothing and every top-level
instruction counts as a "kernel" (a TPU program launches no kernels; read it as op count).
A conditional is counted at its costliest branch, the cheapest shown in ``*_min``.

The analysis half imports nothing from jax (``tests/test_hlo.py`` tests it on handwritten
HLO in the main environment); the compile half imports jax and its TPU and CUDA plugins
lazily (the ``.venv-accel`` environment of ``.ci/accelerators.sh``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Callable, Sequence

MIB = 1 << 20

# --- HLO text analysis (pure Python: no jax import) --------------------------------------------

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
    # With ``analyse_hlo(text, table=True)``: one :class:`Launch` per kernel instruction.
    table: list | None = None


@dataclasses.dataclass(frozen=True)
class Launch:
    """A kernel of :func:`analyse_hlo`'s table: the instruction, the computation it is in,
    how many times it runs (loop trips) and the HBM bytes of one run (:func:`kernel_bytes`)."""

    computation: str
    instr: Instr
    times: int
    bytes: int

    @property
    def total(self) -> int:
        return self.times * self.bytes


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
                if st.table is not None:  # the costliest branch's kernels
                    walked = [b for b in names if b in comps]
                    costly = max(range(len(walked)), key=lambda k: branches[k].hbm_bytes)
                    sub = HloStats(table=[])
                    _walk(walked[costly], comps, mult, sub)
                    st.table += sub.table
                st.kernels += max(s.kernels for s in branches)
                st.hbm_bytes += max(s.hbm_bytes for s in branches)
                st.kernels_min += min(s.kernels_min for s in branches)
                st.hbm_bytes_min += min(s.hbm_bytes_min for s in branches)
                st.while_loops += sum(s.while_loops for s in branches)
                st.unknown_trip_counts += sum(s.unknown_trip_counts for s in branches)
        else:
            st.kernels += mult
            st.kernels_min += mult
            one = kernel_bytes(i, comp, comps)
            st.hbm_bytes += mult * one
            st.hbm_bytes_min += mult * one
            if st.table is not None:
                st.table.append(Launch(comp.name, i, mult, one))


def analyse_hlo(text: str, table: bool = False) -> HloStats:
    """Kernels launched, estimated HBM bytes and ``conditional`` count of a compiled module.

    Kernels are the entry computation's instructions that launch work (fusions, custom calls,
    copies, sorts, ...; not parameters, tuples, get-tuple-element, bitcasts, constants or the
    ``-done`` half of async pairs); a while loop contributes its body and condition times its
    trip count (:func:`trip_count`), a ``call`` its computation, a ``conditional`` its costliest
    branch (``*_min``: its cheapest). Bytes per kernel are :func:`kernel_bytes`. With
    ``table``, :attr:`HloStats.table` lists every kernel (:class:`Launch`; a conditional's
    costliest branch), to see which kernels and bytes make up the totals
    (:func:`format_table`).
    """
    comps = parse_hlo(text)
    st = HloStats(table=[] if table else None)
    _walk(entry(comps).name, comps, 1, st)
    st.conditionals = sum(i.opcode == "conditional" for c in comps.values() for i in c.instrs)
    return st


# --- deviceless compilation (imports jax and the plugins lazily) -------------------------------

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


# Custom-call targets of Pallas kernels: Triton (GPU), Mosaic (TPU), Mosaic GPU.
PALLAS_TARGETS = ("__gpu$xla.gpu.triton", "tpu_custom_call", "mosaic_gpu", "mosaic_gpu_v2")


def pallas_custom_calls(text: str) -> int:
    """Custom calls of a compiled module that run a Pallas kernel (Triton, Mosaic)."""
    return sum(
        1
        for m in re.finditer(r'custom_call_target="([^"]*)"', text)
        if m.group(1) in PALLAS_TARGETS
    )


def format_table(st: HloStats, most: int = 40) -> str:
    """The ``most`` costliest kernels of :attr:`HloStats.table` (by total bytes), one a line:
    runs x bytes per run, the computation, the instruction and its result shape."""
    rows = sorted(st.table or [], key=lambda k: -k.total)
    lines = [f"{len(rows)} kernel instructions, {st.kernels} launches, {st.hbm_bytes} bytes"]
    for k in rows[:most]:
        what = k.instr.attr("calls") or k.instr.opcode
        lines.append(
            f"{k.times:>5} x {k.bytes / MIB:9.2f} MiB = {k.total / MIB:9.1f} MiB  "
            f"{k.computation[:28]:<28} {k.instr.opcode:<14} {what[:40]:<40} {k.instr.shape[:60]}"
        )
    return "\n".join(lines)
