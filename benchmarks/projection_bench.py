#!/usr/bin/env python
"""Projection GEMM benchmark: one decoder layer's linear layers, each on its own and fused, at a host's row count.

The model runs q/k/v as three GEMMs and gate/up as two, as the checkpoint names them. This measures what fusing them
(one GEMM over the concatenated weights) would give at the shapes a prefill host runs, so a change to the model's
GEMM layout is decided by a number, not a guess. Rows default to the busiest APB host at 128K on 4 hosts (anchor
4096 + block 32768) and to a whole 128K document (the single-device baseline).

    python benchmarks/projection_bench.py --model llama3.1-8b --rows 36864,131072 --out-dir benchmarks/results
    python benchmarks/projection_bench.py --smoke            # tiny shapes on the CPU (a CI check)

Each case is timed as the median of --repeats runs after a warm-up (host clock after block_until_ready), inputs
random N(0, 1) in --dtype, accumulated in float32 and written back in --dtype. TFLOP/s counts 2*M*N*K per GEMM.
"""

from __future__ import annotations

import argparse
import tempfile

from apb_jax.bench.common import device_info, format_table, output_path, slug, timed, today, write_json
from apb_jax.bench.prefill import MODELS, model_config


def cases(cfg) -> list[tuple[str, int, list[int]]]:
    """(name, K, [N of each GEMM]) for one layer: the separate GEMMs of a group, fused = one GEMM of sum(N)."""
    h, d = cfg.hidden_size, cfg.head_dim
    return [
        ("qkv", h, [cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d]),
        ("o", cfg.num_heads * d, [h]),
        ("gate_up", h, [cfg.intermediate_size, cfg.intermediate_size]),
        ("down", cfg.intermediate_size, [h]),
    ]


def measure(cfg, rows: int, dtype: str, repeats: int, seed: int = 0) -> list[dict]:
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    key = jax.random.PRNGKey(seed)
    mm = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(dt))
    out = []
    for name, k, ns in cases(cfg):
        key, kx = jax.random.split(key)
        x = jax.random.normal(kx, (rows, k), dt)
        ws = []
        for n in ns:
            key, kw = jax.random.split(key)
            ws.append(jax.random.normal(kw, (k, n), dt) / k**0.5)
        separate = sum(timed(mm, x, w, warmup=1, repeats=repeats)[0] for w in ws)
        fused = None
        if len(ws) > 1:
            w_cat = jnp.concatenate(ws, axis=1)
            fused = timed(mm, x, w_cat, warmup=1, repeats=repeats)[0]
            del w_cat
        flops = 2.0 * rows * k * sum(ns)
        out.append(
            {
                "gemm": name,
                "rows": rows,
                "k": k,
                "n": ns,
                "flops": flops,
                "separate_s": separate,
                "fused_s": fused,
                "separate_tflops": flops / separate / 1e12,
                "fused_tflops": flops / fused / 1e12 if fused else None,
            }
        )
        del x, ws
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3.1-8b", choices=tuple(MODELS))
    ap.add_argument("--rows", default="36864,131072", help="comma-separated row counts (tokens on one host)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny model and rows on the CPU; writes to a temp dir")
    ap.add_argument("--out-dir", default=None, help="directory for the JSON (default ./bench_results)")
    ap.add_argument("--out", default=None, help="JSON path, or an existing directory")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.rows, args.dtype, args.repeats = "tiny", "96,200", "float32", 2
        if args.out is None and args.out_dir is None:
            args.out_dir = tempfile.mkdtemp(prefix="apb_projection_smoke_")
    try:
        rows = [int(r) for r in args.rows.split(",") if r]
    except ValueError:
        ap.error(f"--rows={args.rows!r} must be comma-separated positive integers")
    if not rows or min(rows) < 1:
        ap.error(f"--rows={args.rows!r} must be comma-separated positive integers")
    if args.repeats < 1:
        ap.error(f"--repeats={args.repeats} must be >= 1")

    cfg = model_config(args.model)
    dev = device_info()
    results = []
    for r in rows:
        results += measure(cfg, r, args.dtype, args.repeats)

    per_rows = {}
    for r in rows:
        sel = [x for x in results if x["rows"] == r]
        sep = sum(x["separate_s"] for x in sel)
        fus = sum(x["fused_s"] if x["fused_s"] else x["separate_s"] for x in sel)
        per_rows[str(r)] = {"layer_separate_s": sep, "layer_fused_s": fus, "fused_saves": 1 - fus / sep}
    doc = {
        "benchmark": "projection",
        "model": args.model,
        "dtype": args.dtype,
        "device": dev,
        "jax_version": dev["jax_version"],
        "date": today(),
        "repeats": args.repeats,
        "rows": results,
        "per_layer": per_rows,
    }
    cols = [
        ("gemm", "s", lambda x: x["gemm"]),
        ("rows", "d", lambda x: x["rows"]),
        ("K", "d", lambda x: x["k"]),
        ("N", "s", lambda x: "+".join(map(str, x["n"]))),
        ("separate ms", ".3f", lambda x: x["separate_s"] * 1e3),
        ("fused ms", ".3f", lambda x: x["fused_s"] * 1e3),
        ("separate TF/s", ".1f", lambda x: x["separate_tflops"]),
        ("fused TF/s", ".1f", lambda x: x["fused_tflops"]),
    ]
    print(f"{dev['name']} x{dev['count']}, jax {dev['jax_version']}, {args.model}, {args.dtype}, {today()}")
    print(format_table(results, cols))
    for r, v in per_rows.items():
        print(
            f"rows {r}: one layer's projections {v['layer_separate_s'] * 1e3:.2f} ms separate, "
            f"{v['layer_fused_s'] * 1e3:.2f} ms with qkv and gate/up fused ({v['fused_saves']:.1%} saved)"
        )
    name = f"projection_{slug(dev['name'])}_{today()}_{args.model}.json"
    path = output_path(args.out, args.out_dir, name)
    write_json(path, doc)
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
