"""apb_jax.profiling: the category table on HLO snippets and synthetic traces (a GPU-shaped one: device stream
lines, kernel names, hlo_op args), the time attribution, and real profiles on the CPU (a scoped jitted function;
`apb-jax bench --smoke --profile` on the replayed per-host prefill of the tiny model)."""

# ruff: noqa: E501 (HLO text: one instruction per line, as XLA prints it)

import gzip
import json
import math

import jax
import jax.numpy as jnp
import pytest

from apb_jax import profiling as prof
from apb_jax.profiling import IDLE, RULES, Rule, attribute, classify, parse_hlo

HLO = """HloModule jit_host, entry_computation_layout={(bf16[8,128]{1,0})->bf16[8,128]{1,0}}

FileNames
1 "/x.py"

%fused_norm (param_0: bf16[8,128]) -> bf16[8,128] {
  %param_0 = bf16[8,128]{1,0} parameter(0)
  %multiply.1 = bf16[8,128]{1,0} multiply(%param_0, %param_0), metadata={op_name="jit(host)/layer_0/norm/mul"}
  ROOT %rsqrt.2 = bf16[8,128]{1,0} rsqrt(%multiply.1), metadata={op_name="jit(host)/layer_0/norm/rsqrt"}
}

%gemm_computation (p.0: bf16[8,128], p.1: bf16[128,128]) -> bf16[8,128] {
  %p.0 = bf16[8,128]{1,0} parameter(0)
  %p.1 = bf16[128,128]{1,0} parameter(1)
  ROOT %dot.3 = bf16[8,128]{1,0} dot(%p.0, %p.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(host)/layer_0/o_proj/dot_general"}
}

%fused_concat (param_0.2: bf16[4,128], param_1.2: bf16[4,128]) -> bf16[1024] {
  %param_0.2 = bf16[4,128]{1,0} parameter(0)
  %param_1.2 = bf16[4,128]{1,0} parameter(1)
  %concatenate.4 = bf16[8,128]{1,0} concatenate(%param_0.2, %param_1.2), dimensions={0}, metadata={op_name="jit(host)/layer_0/attention/passing/concat/concatenate"}
  ROOT %bitcast.5 = bf16[1024]{0} bitcast(%concatenate.4)
}

%fused_copy (param_0.3: bf16[8,128]) -> (bf16[128,8], bf16[1024]) {
  %param_0.3 = bf16[8,128]{1,0} parameter(0)
  %transpose.6 = bf16[128,8]{0,1} transpose(%param_0.3), dimensions={1,0}
  %bitcast.7 = bf16[1024]{0} bitcast(%param_0.3)
  ROOT %tuple.8 = (bf16[128,8]{0,1}, bf16[1024]{0}) tuple(%transpose.6, %bitcast.7)
}

%fused_gather (param_0.4: bf16[64,128], param_1.4: s32[8,1]) -> bf16[8,128] {
  %param_0.4 = bf16[64,128]{1,0} parameter(0)
  %param_1.4 = s32[8,1]{1,0} parameter(1)
  ROOT %gather.9 = bf16[8,128]{1,0} gather(%param_0.4, %param_1.4), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,128}, metadata={op_name="jit(host)/layer_0/attention/compress/gather/jit(take_along_axis)/gather"}
}

%fused_embed (param_0.5: bf16[256,128], param_1.5: s32[8,1]) -> bf16[8,128] {
  %param_0.5 = bf16[256,128]{1,0} parameter(0)
  %param_1.5 = s32[8,1]{1,0} parameter(1)
  ROOT %gather.10 = bf16[8,128]{1,0} gather(%param_0.5, %param_1.5), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,128}, metadata={op_name="jit(host)/embed/jit(_take)/gather"}
}

%region_cond (arg.1: (s32[], bf16[8,128])) -> pred[] {
  %arg.1 = (s32[], bf16[8,128]{1,0}) parameter(0)
  %gte.1 = s32[] get-tuple-element(%arg.1), index=0
  %c.1 = s32[] constant(4)
  ROOT %lt.1 = pred[] compare(%gte.1, %c.1), direction=LT
}

%region_body (arg.2: (s32[], bf16[8,128])) -> (s32[], bf16[8,128]) {
  %arg.2 = (s32[], bf16[8,128]{1,0}) parameter(0)
  ROOT %t.2 = (s32[], bf16[8,128]{1,0}) tuple(%arg.2)
}

ENTRY %main.20 (x.1: bf16[8,128], w.1: bf16[128,128], t.1: bf16[64,128], e.1: bf16[256,128], i.1: s32[8,1]) -> bf16[8,128] {
  %x.1 = bf16[8,128]{1,0} parameter(0), metadata={op_name="x"}
  %w.1 = bf16[128,128]{1,0} parameter(1), metadata={op_name="w"}
  %t.1 = bf16[64,128]{1,0} parameter(2)
  %e.1 = bf16[256,128]{1,0} parameter(3)
  %i.1 = s32[8,1]{1,0} parameter(4)
  %loop_multiply_fusion = bf16[8,128]{1,0} fusion(%x.1), kind=kLoop, calls=%fused_norm, metadata={op_name="jit(host)/layer_0/norm/rsqrt"}
  %gemm_fusion_dot.1 = bf16[8,128]{1,0} fusion(%x.1, %w.1), kind=kCustom, calls=%gemm_computation, metadata={op_name="jit(host)/layer_0/o_proj/dot_general"}, backend_config={"operation_queue_id":"0","fusion_backend_config":{"kind":"__triton_gemm"}}
  %custom-call.5 = (bf16[8,128]{1,0}, s8[4194304]{0}) custom-call(%x.1, %w.1), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(host)/layer_0/mlp/dot_general"}
  %custom-call.6 = (bf16[8,128]{1,0}, f32[8]{0}) custom-call(%x.1, %x.1, %x.1), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(host)/layer_0/attention/kernel/pallas_call"}
  %custom-call.7 = (bf16[8,128]{1,0}, s8[4194304]{0}) custom-call(%x.1, %w.1), custom_call_target="__cublas$gemm", metadata={op_name="jit(host)/layer_0/attention/compress/score/dot_general"}
  %custom-call.8 = (bf16[8,4]{1,0}, s32[8,4]{1,0}) custom-call(%x.1), custom_call_target="__gpu$TopK", metadata={op_name="jit(host)/layer_0/attention/compress/topk/top_k"}
  %custom-call.10 = (bf16[8,64]{1,0}, s8[4194304]{0}) custom-call(%x.1, %w.1), custom_call_target="__cublas$gemm", metadata={op_name="jit(host)/layer_0/attention/compress/topk/transpose"}
  %custom-call.9 = (bf16[8,128]{1,0}, f32[8]{0}) custom-call(%x.1, %x.1, %x.1), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(host)/jit(apb_attention_portable)/pallas_call"}
  %loop_concatenate_fusion = bf16[1024]{0} fusion(%x.1, %x.1), kind=kLoop, calls=%fused_concat
  %loop_transpose_fusion = (bf16[128,8]{0,1}, bf16[1024]{0}) fusion(%x.1), kind=kLoop, calls=%fused_copy
  %loop_gather_fusion = bf16[8,128]{1,0} fusion(%t.1, %i.1), kind=kLoop, calls=%fused_gather, metadata={op_name="jit(host)/layer_0/attention/compress/gather/jit(take_along_axis)/gather"}
  %input_embed_fusion = bf16[8,128]{1,0} fusion(%e.1, %i.1), kind=kLoop, calls=%fused_embed, metadata={op_name="jit(host)/embed/jit(_take)/gather"}
  %all-gather-start = (bf16[8,128]{1,0}, bf16[32,128]{1,0}) all-gather-start(%x.1), dimensions={0}, metadata={op_name="jit(host)/layer_0/attention/passing/all_gather/all_gather"}
  %all-gather-done = bf16[32,128]{1,0} all-gather-done(%all-gather-start)
  %collective-permute.1 = bf16[8,128]{1,0} collective-permute(%x.1), source_target_pairs={{0,1},{1,0}}
  %copy.11 = bf16[8,128]{0,1} copy(%x.1)
  %tuple.12 = (s32[], bf16[8,128]{1,0}) tuple(%c.0, %x.1)
  %while.13 = (s32[], bf16[8,128]{1,0}) while(%tuple.12), condition=%region_cond, body=%region_body
  ROOT %add.14 = bf16[8,128]{1,0} add(%loop_multiply_fusion, %gemm_fusion_dot.1), metadata={op_name="jit(host)/layer_0/add"}
}
"""

EXPECTED = {
    "loop_multiply_fusion": "norm_rope_elementwise",
    "gemm_fusion_dot.1": "gemm",
    "custom-call.5": "gemm",
    "custom-call.6": "attention",
    "custom-call.7": "compression_scoring",  # a GEMM, but the compressor's: purpose first
    "custom-call.8": "topk_gather",
    "custom-call.9": "attention",  # no named scope yet: the kernel's jitted name
    "custom-call.10": "compression_scoring",  # XLA named the scores' GEMM after the transpose folded into it
    "loop_concatenate_fusion": "kv_concat_copy",  # no metadata of its own: the fused ops' scope
    "loop_transpose_fusion": "kv_concat_copy",  # a multi-output root, looked through
    "loop_gather_fusion": "topk_gather",
    "input_embed_fusion": "other",  # the embedding lookup is a gather, but not the compressor's
    "all-gather-start": "collectives",
    "all-gather-done": "collectives",
    "collective-permute.1": "collectives",
    "copy.11": "kv_concat_copy",
    "while.13": "other",
    "add.14": "norm_rope_elementwise",
}


def test_parse_hlo_reads_instructions_scopes_and_fusions():
    idx = parse_hlo(HLO)
    assert idx.module == "jit_host"
    assert set(EXPECTED) <= set(idx.instrs)
    cc = idx.instrs["custom-call.5"]  # a tuple result shape (with spaces) before the opcode
    assert cc.opcode == "custom-call" and cc.target == "__cublas$lt$matmul"
    assert idx.instrs["gemm_fusion_dot.1"].backend_kind == "__triton_gemm"
    assert idx.instrs["while.13"].control == ("region_cond", "region_body") and not idx.instrs["while.13"].calls
    assert idx.instrs["rsqrt.2"].is_root and idx.instrs["rsqrt.2"].computation == "fused_norm"
    fused = idx.instrs["loop_concatenate_fusion"]
    assert idx.scope(fused) == "jit(host)/layer_0/attention/passing/concat/concatenate"
    assert idx.roots(fused) == {"concatenate"}
    assert idx.roots(idx.instrs["loop_transpose_fusion"]) == {"transpose", "parameter"}
    assert "dot" in idx.ops(idx.instrs["gemm_fusion_dot.1"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_category_table_on_hlo_instructions(name):
    idx = parse_hlo(HLO)
    got = classify("some_kernel_name", idx.instrs[name], idx)
    assert got.category == EXPECTED[name], (name, got, RULES[got.rule] if got.rule >= 0 else None)


@pytest.mark.parametrize(
    "kernel,category",
    [
        ("nvjet_tst_192x192_64x4_1x2_h_bz_coopB_NTN", "gemm"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "gemm"),
        ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>", "gemm"),
        ("apb_attention_portable", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128", "attention"),
        ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collectives"),
        ("void cub::DeviceRadixSortOnesweepKernel<cub::DeviceRadixSortPolicy>", "topk_gather"),
        ("MemcpyD2D", "kv_concat_copy"),
        ("MemcpyH2D", "other"),
        ("some_unknown_kernel", "other"),
    ],
)
def test_category_table_on_kernel_names_alone(kernel, category):
    assert classify(kernel).category == category


def test_scopes_match_whole_segments_and_the_table_extends():
    idx = parse_hlo(HLO)
    dot = idx.instrs["dot.3"]
    assert classify("k", dot, idx, scope_path="jit(f)/layer_2/compress/score/dot_general").category == (
        "compression_scoring"
    )
    assert classify("k", dot, idx, scope_path="jit(f)/decompress/scores/dot_general").category == "gemm"
    path = "jit(host)/jit(apb_attention_xla)/while/body/closed_call/while/body/kqd,ksd->kqs"
    assert classify("ynn_fusion.3", dot, idx, scope_path=path).category == "attention"
    mine = (Rule("kernel", r"^my_special_", "compression_scoring"), *RULES)
    assert classify("my_special_score", rules=mine).category == "compression_scoring"
    assert classify("my_special_score").category == "other"
    with pytest.raises(ValueError, match="field"):
        Rule("op_type", "x", "gemm")
    with pytest.raises(ValueError, match="category"):
        Rule("kernel", "x", "matmuls")


def test_attribute_nests_per_thread_and_shares_across_threads():
    spans = [
        (0.0, 100.0, "a"),  # parent on thread a
        (20.0, 30.0, "a"),  # nested child: owns its 10 us
        (50.0, 70.0, "b"),  # another thread, overlapping the parent for 20 us: shared
        (90.0, 130.0, "b"),  # runs past the window's end: clipped
    ]
    share, busy = attribute(spans, 0.0, 110.0)
    us = [s * 1e6 for s in share]
    assert us == pytest.approx([90 - 10 - 5, 10, 10, 15])  # [75, 10, 10, 15]
    assert busy * 1e6 == pytest.approx(110.0)
    share, busy = attribute([(10.0, 20.0, 0), (40.0, 45.0, 0)], 0.0, 100.0)
    assert busy * 1e6 == pytest.approx(15.0) and sum(share) == pytest.approx(busy)


def _gpu_trace() -> dict:
    """A trace shaped like jaxlib's GPU export: host annotations mark 3 runs, kernels on device stream lines with
    the hlo_op / hlo_module args XLA's launch annotations give them."""
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "python"}},
        {"ph": "M", "pid": 1001, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1001, "tid": 13, "name": "thread_name", "args": {"name": "Stream #13(Kernel,MemcpyD2D)"}},
        {"ph": "M", "pid": 1001, "tid": 14, "name": "thread_name", "args": {"name": "Stream #14(Kernel)"}},
        {"ph": "M", "pid": 1001, "tid": 99, "name": "thread_name", "args": {"name": "CUPTI overhead"}},
        {"ph": "M", "pid": 1002, "name": "process_name", "args": {"name": "/device:GPU:1"}},
        {"ph": "M", "pid": 1002, "tid": 13, "name": "thread_name", "args": {"name": "Stream #13(Kernel)"}},
    ]

    def mark(i, t0, t1):
        return {"ph": "X", "pid": 1, "tid": 7, "name": f"{prof.RUN_MARK}{i}", "ts": t0, "dur": t1 - t0}

    def k(name, t0, t1, hlo_op=None, tid=13, module="jit_host", pid=1001):
        args = {"correlation_id": "1", "kernel_details": "regs:32 shm:0 grid:1,1,1 block:128,1,1"}
        if hlo_op:
            args.update(hlo_op=hlo_op, hlo_module=module, program_id="3")
        return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": t0, "dur": t1 - t0, "args": args}

    ev = [mark(0, 0.0, 100.0), mark(1, 500.0, 620.0), mark(2, 1000.0, 1110.0)]
    ev += [k("nvjet_tst_64x8", 10.0, 60.0, "custom-call.5"), k("nvjet_tst_64x8", 510.0, 600.0, "custom-call.5")]
    ev += [
        k("loop_multiply_fusion", 1005.0, 1025.0, "while.13"),  # in a CUDA graph: the kernel's own name counts
        k("gemm_fusion_dot_1", 1025.0, 1045.0),  # XLA names the kernel of fusion gemm_fusion_dot.1 so
        k("apb_attention_portable", 1050.0, 1070.0, "custom-call.6"),
        k("ncclDevKernel_AllGather_RING_LL", 1060.0, 1080.0, "all-gather-start", tid=14),  # overlaps: shared
        k("MemcpyD2D", 1080.0, 1090.0),
        k("some_unknown_kernel", 1090.0, 1095.0),
        k("cupti_overhead", 1095.0, 1100.0, tid=99),  # not a stream line
        k("loop_add_fusion", 1100.0, 1105.0, "loop_add_fusion", module="jit_other"),  # another program
        k("loop_add_fusion", 1000.0, 1001.0, "add.14", pid=1002),  # another, idler GPU
        k("late_kernel", 2000.0, 2010.0, "add.14"),  # outside every run
    ]
    return {"displayTimeUnit": "ns", "traceEvents": meta + ev}


def test_gpu_shaped_trace_breakdown_of_the_median_run():
    idx = parse_hlo(HLO)
    analysis = prof.analyse_trace(_gpu_trace(), idx)
    assert analysis["source"] == "gpu" and analysis["device"] == 1001 and analysis["windows"] == 3
    assert analysis["other_modules_s"] * 1e6 == pytest.approx(5.0)
    assert analysis["outside_runs_s"] * 1e6 == pytest.approx(10.0)
    res = prof.summarise(analysis, walls=[110e-6, 111e-6, 109e-6], prof_walls=[100e-6, 120e-6, 110e-6])
    assert res["profiled_run"] == 2 and res["profiled_wall_s"] * 1e6 == pytest.approx(110.0)
    us = {c: v * 1e6 for c, v in res["categories"].items()}
    assert us == pytest.approx(
        {
            "gemm": 20.0,
            "attention": 15.0,
            "compression_scoring": 0.0,
            "topk_gather": 0.0,
            "kv_concat_copy": 10.0,
            "norm_rope_elementwise": 20.0,
            "collectives": 15.0,
            "other": 5.0,
            IDLE: 25.0,
        }
    )
    assert res["device_busy_s"] * 1e6 == pytest.approx(85.0)
    assert res["covered_fraction"] == pytest.approx(110.0 / 110.0)
    assert res["top_kernels"][0][:2] == ["loop_multiply_fusion", "norm_rope_elementwise"]
    assert [r[0] for r in res["unmatched"]["no_hlo"]] == ["MemcpyD2D", "some_unknown_kernel"]
    assert res["unmatched"]["other"][0][0] == "some_unknown_kernel"
    assert res["scopes"]["attention/kernel"] * 1e6 == pytest.approx(15.0)
    json.dumps(res)
    text = prof.format_breakdown(res)
    assert "covered_fraction" in text and "gemm_fusion_dot_1" in text


def test_a_module_spelled_otherwise_in_the_trace_still_counts():
    trace = _gpu_trace()
    for e in trace["traceEvents"]:
        if e.get("args", {}).get("hlo_module") == "jit_host":
            e["args"]["hlo_module"] = "jit_host_7"
    res = prof.summarise(prof.analyse_trace(trace, parse_hlo(HLO)), walls=[110e-6])
    assert res["device_busy_s"] * 1e6 == pytest.approx(85.0 + 5.0)  # the other module's kernel counts now
    assert any("jit_host" in n for n in res["notes"])


def test_load_trace_finds_the_newest_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="log_dir"):
        prof.load_trace(str(tmp_path))
    d = tmp_path / "plugins" / "profile" / "2026_01_01"
    d.mkdir(parents=True)
    with gzip.open(d / "host.trace.json.gz", "wt") as f:
        json.dump(_gpu_trace(), f)
    trace, path = prof.load_trace(str(tmp_path))
    assert path.endswith("host.trace.json.gz") and len(prof.run_windows(trace)) == 3


def _scoped(x, w, ws):
    """A small model step with the named scopes the model will carry: each category has measurable work."""
    with jax.named_scope("qkv_proj"):
        h = x @ w
    with jax.named_scope("norm"):
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)
    with jax.named_scope("compress"):
        with jax.named_scope("score"):
            s = h @ ws
        with jax.named_scope("topk"):
            _, idx = jax.lax.top_k(s.T, 64)
        with jax.named_scope("gather"):
            g = jnp.take_along_axis(h[None], idx[:, :, None], axis=1)  # [64 heads, 64 kept, d]
    with jax.named_scope("passing"), jax.named_scope("concat"):
        kv = jnp.concatenate([h, g.reshape(-1, h.shape[1])], axis=0)
    with jax.named_scope("attention"), jax.named_scope("kernel"):
        p = jax.nn.softmax(h @ kv.T / 16.0, axis=-1)
        out = p @ kv
    return out, kv


def test_profile_of_a_scoped_function_on_the_cpu():
    """The categories of the median traced run sum to its window, which the host clock around that run confirms
    (within 5%).  Against the unprofiled median nothing is asserted but the note: on shared CPU cores (parallel test
    workers) runs of the same program differ by several times; a gap over 5% must be noted in the result."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k1, (512, 256))
    w = jax.random.normal(k2, (256, 256)) / 16
    ws = jax.random.normal(k3, (256, 64)) / 16
    res = prof.profile(jax.jit(_scoped), x, w, ws, repeats=5)
    assert res["trace_source"] == "cpu" and res["module"] == "jit__scoped"
    cats = res["categories"]
    assert set(cats) == {*prof.CATEGORIES, IDLE}
    assert all(v >= 0 and math.isfinite(v) for v in cats.values())
    for c in ("gemm", "attention", "compression_scoring", "topk_gather", "kv_concat_copy", "norm_rope_elementwise"):
        assert cats[c] > 0, (c, cats, res["top_kernels"])
    assert cats["collectives"] == 0.0
    assert sum(cats.values()) == pytest.approx(res["profiled_wall_s"], rel=1e-9)
    host = res["profiled_runs_wall_s"][res["profiled_run"]]
    assert res["profiled_wall_s"] == pytest.approx(host, rel=0.05, abs=2e-4)
    assert res["device_busy_s"] > 0.5 * res["profiled_wall_s"]  # the thunk events cover most of a run
    if abs(res["covered_fraction"] - 1) > 0.05:
        assert any("wall time" in n for n in res["notes"])
    assert {"qkv_proj", "norm", "compress/topk", "passing/concat", "attention/kernel"} <= set(res["scopes"])
    assert "by named scope" in prof.format_breakdown(res)
    assert not res["unmatched"]["no_hlo"]  # every CPU thunk event names its HLO instruction
    assert res["unmatched"]["outside_runs_s"] == 0.0
    json.dumps(res)


def test_bench_profile_smoke(tmp_path, capsys):
    """`apb-jax bench --smoke --profile` on the replayed busiest-host prefill of the tiny model: APB with retaining
    heads (scores, top-k, gather, concat) and Star, every category sums to the profiled run."""
    from apb_jax.bench.prefill import main

    argv = [
        "--smoke",
        "--profile",
        "--strategies",
        "apb,star",
        "--compressors",
        "retaining_heads",
        "--real",
        "no",
        "--out-dir",
        str(tmp_path),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "smoke ok" in printed and "where the replayed document prefill's time goes" in printed
    (path,) = tmp_path.glob("prefill_*.json")
    doc = json.loads(path.read_text())
    rows = [r for r in doc["rows"] if "model_depth" in r]
    assert sorted(r["name"] for r in rows) == ["apb-rh H=4 L=512", "star H=4 L=512"]
    for r in rows:
        p = r["profile"]
        assert r["replayed_host"] == 3 and p["wall_s"] > 0 and p["top_kernels"]
        assert sum(p["categories"].values()) == pytest.approx(p["profiled_wall_s"], rel=1e-9)
    apb = next(r for r in rows if r["strategy"] == "apb")
    assert apb["profile"]["categories"]["compression_scoring"] > 0 and apb["profile"]["categories"]["topk_gather"] > 0
