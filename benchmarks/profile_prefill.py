#!/usr/bin/env python
"""Where the busiest host's prefill time goes: a profiler breakdown of the replayed per-host prefill program.

For every strategy x compressor x length x host count: a Llama-shaped random model (prefill_bench's configs), an
Engine, and host H-1's exact document-prefill program replayed on one device with shape stand-ins for the
collectives (apb_jax.replay, the program prefill_bench times).  `apb_jax.profiling.profile` times it (median of
--repeats, block_until_ready), traces --repeats more runs with jax.profiler and splits the median traced run into
gemm / attention / compression_scoring / topk_gather / kv_concat_copy / norm_rope_elementwise / collectives /
other / idle/gaps, by kernel name and by the HLO op_name (named-scope) path.  Times are at the layers run
(--layers), not scaled to the model depth.

    python benchmarks/profile_prefill.py --smoke            # tiny model on the CPU, seconds
    python benchmarks/profile_prefill.py --layers 4 --lengths 131072 --hosts 4 --strategies apb,star --out-dir $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

K = 1024


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--smoke", action="store_true", help="tiny model, float32, 512 tokens, 4 hosts, on the CPU (seconds)"
    )
    ap.add_argument("--model", default="llama3.1-8b", choices=("llama3.1-8b", "qwen2.5-7b", "tiny"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--layers", type=int, default=None, help="run the first N layers (default: all)")
    ap.add_argument("--strategies", default=None, help="comma-separated: apb, star, ring, full (default apb,star)")
    ap.add_argument(
        "--compressors",
        default=None,
        help="for apb: query_aware, retaining_heads (default query_aware; --smoke: both)",
    )
    ap.add_argument("--lengths", default=str(128 * K), help="document lengths")
    ap.add_argument("--hosts", default="4", help="host counts (full always runs on 1)")
    ap.add_argument("--query-len", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs, and as many traced runs")
    ap.add_argument("--kernel-backend", default="auto")
    ap.add_argument("--top", type=int, default=15, help="kernels printed per point (the JSON keeps 25)")
    ap.add_argument("--keep-traces", action="store_true", help="keep the jax.profiler traces under --out-dir")
    ap.add_argument(
        "--keep-command-buffers",
        action="store_true",
        help="leave XLA's GPU command buffers (CUDA graphs) on; by default they are off (XLA_FLAGS), since kernels "
        "inside a CUDA graph lose their HLO annotation in the trace",
    )
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default: a new temporary directory)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.dtype = "tiny", "float32"
        args.lengths, args.hosts = "512", "4"
        args.compressors = args.compressors or "query_aware,retaining_heads"
        args.query_len, args.repeats = min(args.query_len, 8), min(args.repeats, 3)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",") if x]
        args.hosts = [int(x) for x in args.hosts.split(",") if x]
    except ValueError as e:
        ap.error(f"--lengths and --hosts take comma-separated integers ({e})")
    args.strategies = [s for s in (args.strategies or "apb,star").split(",") if s]
    args.compressors = [s for s in (args.compressors or "query_aware").split(",") if s]
    bad = [s for s in args.strategies if s not in ("apb", "star", "ring", "full")]
    if bad:
        ap.error(f"--strategies {','.join(bad)}: each must be one of apb, star, ring, full")
    bad = [c for c in args.compressors if c not in ("query_aware", "retaining_heads")]
    if bad:
        ap.error(f"--compressors {','.join(bad)}: each must be query_aware or retaining_heads")
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: must be >= 1")
    return args


def points(args) -> list[tuple[str, str, int, int]]:
    """(strategy, compressor, length, hosts) in the order given."""
    out = []
    for s in args.strategies:
        for L in args.lengths:
            for H in [1] if s == "full" else args.hosts:
                for c in args.compressors if s == "apb" else ["query_aware"]:
                    out.append((s, c, L, H))
    return out


def point_name(strategy: str, compressor: str, length: int, hosts: int) -> str:
    s = strategy if strategy != "apb" else f"apb-{'qa' if compressor == 'query_aware' else 'rh'}"
    size = f"{length // K}K" if length >= K else str(length)
    return f"{s} H={hosts} L={size}"


def profile_point(model, heads, args, strategy, compressor, length, hosts, backend, rng, trace_dir) -> dict:
    import jax
    import numpy as np

    from apb_jax import Engine, profiling
    from apb_jax.replay import busiest_host, host_inputs, replay_prefill_fn

    cfg = model.config
    eng = Engine(
        model,
        strategy,
        devices=hosts,
        compressor=compressor,
        retaining_heads=heads if compressor == "retaining_heads" else None,
        mode="vmap",
        kernel_backend=backend,
    )
    doc = rng.integers(0, cfg.vocab_size, (1, length), dtype=np.int32)
    query = rng.integers(0, cfg.vocab_size, (1, args.query_len), dtype=np.int32)
    lay = eng.layout(length, args.query_len)
    h = busiest_host(lay)
    dev = jax.devices()[0]
    tokens, positions = host_inputs(lay, doc, query, h, pad_id=cfg.pad_token_id or 0)
    tokens, positions = jax.device_put(tokens, dev), jax.device_put(positions, dev)
    fn = replay_prefill_fn(eng, lay, h)
    res = profiling.profile(
        fn,
        eng.params,
        eng.heads,
        tokens,
        positions,
        repeats=args.repeats,
        warmup=args.warmup,
        log_dir=trace_dir,
    )
    return {
        "name": point_name(strategy, compressor, length, hosts),
        "strategy": strategy,
        "compressor": compressor if strategy == "apb" else None,
        "hosts": hosts,
        "doc_len": length,
        "query_len": args.query_len,
        "anchor": lay.anchor,
        "block": lay.block,
        "passing": lay.passing,
        "replayed_host": h,
        "layers_run": cfg.num_layers,
        "kernel_backend": backend or "default",
        "profile": res,
    }


def summary_table(rows) -> str:
    from common import format_table

    from apb_jax.profiling import CATEGORIES, IDLE

    short = {
        "compression_scoring": "compress",
        "topk_gather": "topk_gath",
        "kv_concat_copy": "kv_copy",
        "norm_rope_elementwise": "elementw",
        "collectives": "coll",
        IDLE: "idle",
    }
    cols = [("point", "s", lambda r: r["name"]), ("wall_s", ".4f", lambda r: r["profile"]["wall_s"])]
    for c in (*CATEGORIES, IDLE):
        cols.append((short.get(c, c), ".4f", lambda r, c=c: r["profile"]["categories"][c]))
    cols.append(("covered", ".1%", lambda r: r["profile"]["covered_fraction"]))
    return format_table([r for r in rows if "profile" in r], cols)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    elif not args.keep_command_buffers and "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
        # read when jax starts its backend: only effective when this script starts the process
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
    t_start = time.perf_counter()
    import common
    import jax
    import jax.numpy as jnp
    import numpy as np
    from prefill_bench import model_config, random_heads, random_model

    from apb_jax import profiling

    try:
        from prefill_bench import pick_backend
    except ImportError:  # older / moved benchmark module: the dispatcher's default
        pick_backend = lambda requested: None if requested == "auto" else requested

    info = common.device_info()
    out_dir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="profile_prefill_"))
    out_path = out_dir / f"profile_{common.slug(info['name'])}_{common.today()}.json"
    cfg_model = model_config(args.model)
    layers = min(args.layers or cfg_model.num_layers, cfg_model.num_layers)
    if layers < 1:
        raise SystemExit(f"--layers {args.layers}: must be >= 1")
    backend = pick_backend(args.kernel_backend)
    doc = {
        "benchmark": "profile_prefill",
        "device": info,
        "jax_version": jax.__version__,
        "date": common.today(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "model": args.model,
        "dtype": args.dtype,
        "layers_run": layers,
        "layers_model": cfg_model.num_layers,
        "query_len": args.query_len,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "kernel_backend": backend or "default",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "categories": [*profiling.CATEGORIES, profiling.IDLE],
        "rules": profiling.describe_rules().splitlines(),
        "status": "running",
        "rows": [],
        "notes": [
            "Each row: the busiest host's document-prefill program replayed on one device (apb_jax.replay); "
            "wall_s = median unprofiled run; categories = the median traced run, idle/gaps = its window minus "
            "device-busy time; covered_fraction = sum of categories / wall_s.",
            f"Times at {layers} of {cfg_model.num_layers} layers (not scaled to the model depth).",
        ],
    }
    print(
        f"{info['name']} x{info['count']}, jax {jax.__version__}, backend {backend or 'default'}, "
        f"{args.model} {layers}/{cfg_model.num_layers} layers {args.dtype}",
        flush=True,
    )
    model = random_model(dataclasses.replace(cfg_model, num_layers=layers), args.dtype, args.seed)
    heads = None
    if any(s == "apb" for s in args.strategies) and "retaining_heads" in args.compressors:
        heads = random_heads(model.config, jnp.dtype(args.dtype), args.seed + 1)
    rng = np.random.default_rng(args.seed)
    for strategy, compressor, length, hosts in points(args):
        name = point_name(strategy, compressor, length, hosts)
        trace_dir = str(out_dir / "traces" / common.slug(name)) if args.keep_traces else None
        try:
            row = profile_point(model, heads, args, strategy, compressor, length, hosts, backend, rng, trace_dir)
            print()
            print(profiling.format_breakdown(row["profile"], top=args.top, title=f"== {name}"), flush=True)
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            row = {"name": name, "strategy": strategy, "hosts": hosts, "doc_len": length, "error": msg[:2000]}
            print(f"\n{name} failed: {msg[:400]}", flush=True)
            traceback.print_exc()
        doc["rows"].append(row)
        doc["elapsed_s"] = time.perf_counter() - t_start
        common.write_json(out_path, doc)
        gc.collect()
    doc["status"] = "complete"
    doc["elapsed_s"] = time.perf_counter() - t_start
    common.write_json(out_path, doc)
    print("\n" + summary_table(doc["rows"]))
    print(f"\nJSON: {out_path}")
    if args.smoke:
        return check(doc)
    return 0


def check(doc) -> int:
    """The smoke check: every point profiled, its categories sum to its traced window, which matches the host clock
    of that run, the model's GEMMs and the attention found, little left in 'other'."""
    import math

    import common

    from apb_jax.profiling import IDLE

    problems = []
    for r in doc["rows"]:
        if "error" in r:
            problems.append(f"{r['name']}: {r['error'][:200]}")
            continue
        p = r["profile"]
        cats = p["categories"]
        if not math.isclose(sum(cats.values()), p["profiled_wall_s"], rel_tol=1e-6):
            problems.append(f"{r['name']}: categories sum {sum(cats.values())} != window {p['profiled_wall_s']}")
        if not (cats["gemm"] > 0 and cats["attention"] > 0):
            problems.append(f"{r['name']}: no gemm or attention time ({cats})")
        busy = sum(v for k, v in cats.items() if k != IDLE)
        if cats["other"] > 0.2 * busy:
            problems.append(f"{r['name']}: {cats['other']:.4g} s of {busy:.4g} s device time left in 'other'")
        # the traced window of a run and the host clock around the same run must agree (the CPU's unprofiled wall
        # time is too noisy at a millisecond to test covered_fraction itself)
        host = p["profiled_runs_wall_s"][p["profiled_run"]]
        if abs(p["profiled_wall_s"] - host) > 0.05 * host + 2e-4:
            problems.append(f"{r['name']}: traced window {p['profiled_wall_s']:.6f} s, host clock {host:.6f} s")
    return common.smoke_verdict(problems, f"{len(doc['rows'])} points profiled")


if __name__ == "__main__":
    sys.exit(main())
