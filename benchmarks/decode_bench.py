#!/usr/bin/env python
"""Decode benchmark: tokens/s of `Engine.generate` after a long prefill, on the public API only.

Prefill a passkey document of --length tokens with the shipped retriever (or --model), then decode --new-tokens
tokens with no stop token (every row runs to the end), and report decode tokens/s (compile time excluded: the
first generate call compiles, the timed ones reuse the programs), prefill seconds and the per-token latency.

    python benchmarks/decode_bench.py --cpu-devices 4 --length 32768 --hosts 4 --strategy apb       # CPU smoke
    python benchmarks/decode_bench.py --length 131072 --hosts 4 --mode vmap --dtype bfloat16 --out-dir DIR  # one GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the shipped retriever)")
    ap.add_argument("--length", type=int, default=32768, help="document length in tokens")
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--strategy", default="apb")
    ap.add_argument("--mode", default="mesh", choices=("mesh", "vmap"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--cpu-devices", type=int, default=None, help="fake CPU devices (set before jax starts)")
    ap.add_argument("--label", default="", help="free text stored in the JSON (e.g. 'before' / 'after')")
    ap.add_argument("--out-dir", default=None, help="directory for the JSON (default: a temporary directory)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_devices:
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.cpu_devices}"])
    import jax
    import numpy as np

    import apb_jax
    from apb_jax.demo import default_model
    from apb_jax.tasks import passkey

    model = apb_jax.load(args.model, dtype=args.dtype) if args.model else default_model(args.dtype)[0]
    hosts = 1 if args.strategy == "full" else args.hosts
    engine = apb_jax.Engine(model, strategy=args.strategy, devices=hosts, mode=args.mode)
    ex = passkey(np.random.default_rng(0), args.length, depth=0.5)
    doc = np.stack([ex.document] * args.batch)
    query = np.stack([ex.query] * args.batch)
    gen = lambda: engine.generate(doc, query, max_new_tokens=args.new_tokens, stop_tokens=[])
    first = gen()  # compiles
    runs = [gen() for _ in range(args.repeats)]
    n = len(runs[0].tokens[0])
    tps = [args.batch * (n - 1) / r.decode_seconds for r in runs]
    rec = {
        "benchmark": "decode",
        "label": args.label,
        "device": {
            "name": jax.devices()[0].device_kind,
            "platform": jax.devices()[0].platform,
            "count": jax.device_count(),
        },
        "jax_version": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "strategy": args.strategy,
        "hosts": hosts,
        "mode": args.mode,
        "length": args.length,
        "batch": args.batch,
        "dtype": args.dtype,
        "new_tokens": n,
        "compile_seconds": first.compile_seconds,
        "prefill_seconds": statistics.median(r.prefill_seconds for r in runs),
        "decode_seconds": statistics.median(r.decode_seconds for r in runs),
        "decode_tokens_per_second": statistics.median(tps),
        "ms_per_token": 1e3 * statistics.median(r.decode_seconds / (n - 1) for r in runs),
    }
    out_dir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="apb_decode_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = rec["device"]["name"].lower().replace(" ", "-")
    path = (
        out_dir
        / f"decode_{slug}_{rec['date']}_{args.strategy}_{args.length}{'_' + args.label if args.label else ''}.json"
    )
    path.write_text(json.dumps(rec, indent=1))
    print(f"{'strategy':<8} {'hosts':>5} {'length':>7} {'prefill_s':>9} {'decode tok/s':>12} {'ms/token':>9}")
    print(
        f"{args.strategy:<8} {hosts:>5} {args.length:>7} {rec['prefill_seconds']:>9.3f} "
        f"{rec['decode_tokens_per_second']:>12.1f} {rec['ms_per_token']:>9.2f}"
    )
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
