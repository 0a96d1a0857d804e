"""The HLO analysis of ``bench/hlo.py`` on handwritten HLO: parsing, kernel and byte counting,
trip counts, conditionals (plain Python, no plugins; the compiles themselves are
``tests/test_accelerators.py``'s)."""

from __future__ import annotations

from bench import hlo

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
    assert hlo.shape_bytes("f32[4096,32768]{1,0}") == 4096 * 32768 * 4
    assert hlo.shape_bytes("(f32[], bf16[8,128]{1,0:T(8,128)(2,1)}, pred[3])") == 4 + 2048 + 3
    # TPU: S(1) is VMEM, S(2)/S(6) sync flags and SMEM; only memory space 0 is HBM.
    assert hlo.shape_bytes("f32[512]{0:T(512)S(1)}") == 0
    assert hlo.shape_bytes("f32[512]{0:T(512)S(1)}", hbm_only=False) == 2048
    assert hlo.split_tuple("(s32[], (f32[2], u8[4]), /*index=2*/f32[3]{0})") == [
        "s32[]",
        "(f32[2], u8[4])",
        "f32[3]{0}",
    ]


def test_parse_hlo_reads_computations_and_instructions():
    comps = hlo.parse_hlo(HLO)
    assert hlo.entry(comps).name == "main"
    loop = hlo.entry(comps).by_name["loop"]
    assert (loop.opcode, loop.operands) == ("while", ["init"])
    assert (loop.attr("body"), loop.attr("condition")) == ("body", "cond")
    assert hlo.entry(comps).by_name["out"].root


def test_sliced_parameter_reads_the_slice_and_updated_buffer_reads_nothing():
    fused = hlo.parse_hlo(HLO)["fused_update"]
    assert hlo.fusion_param_reads(fused) == {0: 0, 1: 256 * 4, 2: None}
    assert hlo.fusion_output_bytes(fused, "f32[1024]{0}") == 256 * 4  # the update only


def test_parameter_sliced_inside_a_nested_fusion_reads_the_slice():
    nested = hlo.parse_hlo(
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
    assert hlo.fusion_param_reads(nested["outer"], nested)[0] == 64 * 128 * 4
    assert hlo.fusion_param_reads(nested["outer"])[0] is None  # without comps: all of it


def test_trip_count_from_the_condition_or_the_backend_config():
    comps = hlo.parse_hlo(HLO)
    loop = hlo.entry(comps).by_name["loop"]
    assert hlo.trip_count(loop, comps) == 4
    known = HLO.replace("body=%body", 'body=%body, backend_config={"known_trip_count":{"n":"7"}}')
    comps = hlo.parse_hlo(known)
    assert hlo.trip_count(hlo.entry(comps).by_name["loop"], comps) == 7


def test_kernels_bytes_and_conditionals_of_a_handwritten_module():
    st = hlo.analyse_hlo(HLO)
    # zeros (writes 4096) + sum (reads 4096, writes 4) + compare(sum, sum) (reads 4 once,
    # writes 1)
    # + 4 x [update (reads 1024 of x and the index, writes 1024) + add (4 + 4, 4)
    #        + condition's compare (4 + 4, 1)] + the costlier branch's multiply (4, 4).
    per_trip = (1024 + 4 + 1024) + (4 + 4 + 4) + (4 + 4 + 1)
    assert st.kernels == 1 + 1 + 1 + 4 * 3 + 1
    assert st.hbm_bytes == 4096 + (4096 + 4) + 5 + 4 * per_trip + 8
    assert (st.conditionals, st.while_loops, st.unknown_trip_counts) == (1, 1, 0)
    assert hlo.count_conditionals(HLO) == 1
    assert hlo.ideal_bytes(HLO) == (4096 + 4) + (4 + 4096)


def test_async_copies_and_buffer_reservations():
    tpu = HLO.replace(
        "  %sum = f32[] fusion(%x)",
        '  %buf = f32[512]{0:T(512)S(1)} custom-call(), custom_call_target="AllocateBuffer"\n'
        "  %cs = (f32[1024]{0:S(1)}, f32[1024]{0}, u32[]{:S(2)}) copy-start(%x)\n"
        "  %cd = f32[1024]{0:S(1)} copy-done(%cs)\n"
        "  %sum = f32[] fusion(%x)",
    )
    base, st = hlo.analyse_hlo(HLO), hlo.analyse_hlo(tpu)
    # copy-start reads x from HBM into VMEM: one kernel, 4096 bytes; the rest launch nothing.
    assert (st.kernels - base.kernels, st.hbm_bytes - base.hbm_bytes) == (1, 4096)


def test_the_kernel_table_adds_up_to_the_totals():
    st = hlo.analyse_hlo(HLO, table=True)
    assert sum(k.times for k in st.table) == st.kernels
    assert sum(k.total for k in st.table) == st.hbm_bytes
    update = next(k for k in st.table if k.instr.attr("calls") == "fused_update")
    assert (update.computation, update.times, update.bytes) == ("body", 4, 1024 + 4 + 1024)
    text = hlo.format_table(st, most=2)
    assert text.splitlines()[0].startswith(f"{len(st.table)} kernel instructions")
    # The costliest first: the loop's update (4 x 2052 bytes), then the sum (4100).
    first, second = text.splitlines()[1:]
    assert "fused_update" in first and "fused_reduce" in second
    assert hlo.analyse_hlo(HLO).table is None


def test_pallas_custom_calls_are_counted_by_target():
    text = (
        '%a = f32[8]{0} custom-call(%x), custom_call_target="__gpu$xla.gpu.triton"\n'
        '%b = f32[8]{0} custom-call(%x), custom_call_target="tpu_custom_call"\n'
        '%c = f32[8]{0} custom-call(%x), custom_call_target="__cublas$gemm"\n'
    )
    assert hlo.pallas_custom_calls(text) == 2
