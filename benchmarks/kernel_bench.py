"""APB attention kernel benchmark: useful TFLOP/s on one GPU.

Cases (Llama-3.1-8B heads: 32 q / 8 kv, d 128, bf16, batch 1):
  causal-L     plain causal attention, L = 16K, 32K, 64K, 128K (anchor 0, no passing)
  apb-L        the APB mask of the last of 4 hosts: B = L/4, A = L/32, Pk = 3L/64,
               L = 32K, 128K, 512K (rows [A | B], keys [Pk | A | B])
Implementations: ours (Mosaic-GPU, Triton), cuDNN through jax.nn.dot_product_attention
(plain causal only), jax's Pallas `mha` (Triton; plain causal, K/V repeated to 32 heads)
and tokamax's Mosaic-GPU flash attention with the equivalent range mask
(k_start = Pk on anchor rows, causal offset Pk). tokamax is optional: carried as wheels
to the GPU machine; if it does not import, its rows are skipped.

Useful FLOPs = 4 * D * H * (visible (row, key) pairs): masked pairs count for nothing.
Each time is the median of --reps timed calls after --warmup calls.
Writes benchmarks/results/kernel_<device>_<date>.json and prints a table.

  python benchmarks/kernel_bench.py [--cases causal-32K,apb-128K] [--impls ours-mosaic,tokamax]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import pathlib
import statistics
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import ApbMask, BlockSizes, apb_attention

H, KVH, D = 32, 8, 128
K = 1024
CASES = {f"causal-{n}K": dict(anchor=0, local=n * K, passing=0) for n in (16, 32, 64, 128)}
CASES.update({f"apb-{n}K": dict(anchor=n * K // 32, local=n * K // 4, passing=3 * n * K // 64) for n in (32, 128, 512)})
# Small cases for a CPU smoke run (not part of the default set).
EXTRA_CASES = {"tiny-causal": dict(anchor=0, local=256, passing=0), "tiny-apb": dict(anchor=32, local=256, passing=96)}
IMPLS = ("ours-mosaic", "ours-triton", "cudnn", "jax-pallas-mha", "tokamax")


def _import_tokamax():
    """tokamax's Mosaic-GPU attention, or None. Stubs xprof (only its profiler needs it)."""
    if importlib.util.find_spec("xprof") is None:
        stub = pathlib.Path(tempfile.mkdtemp()) / "xprof"
        (stub / "cli").mkdir(parents=True)
        (stub / "__init__.py").write_text("")
        (stub / "cli" / "__init__.py").write_text("")
        (stub / "cli" / "tools.py").write_text(
            "def get_kernel_stats_tool(*a, **k):\n  raise NotImplementedError('xprof stub')\n"
        )
        sys.path.insert(0, str(stub.parent))
    try:
        from tokamax._src.ops.attention import base
        from tokamax._src.ops.attention.pallas_mosaic_gpu import PallasMosaicGpuFlashAttention

        return base, PallasMosaicGpuFlashAttention()
    except Exception as e:
        print(f"tokamax unavailable, skipping it: {type(e).__name__}: {e}")
        return None


def make_fn(impl, case, tk_mod):
    a, p = case["anchor"], case["passing"]
    causal_only = a == 0 and p == 0
    if impl == "ours-mosaic":
        return jax.jit(lambda q, k, v: apb_attention(q, k, v, anchor_len=a, backend="mosaic")[0])
    if impl == "ours-triton":
        return jax.jit(lambda q, k, v: apb_attention(q, k, v, anchor_len=a, backend="triton")[0])
    if impl in ("ours-interpret", "ours-reference"):
        be = impl.split("-")[1]
        bs = BlockSizes(64, 64) if be == "interpret" else None
        return jax.jit(lambda q, k, v: apb_attention(q, k, v, anchor_len=a, backend=be, block_sizes=bs)[0])
    if impl == "cudnn":
        if not causal_only:
            return None
        return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
    if impl == "jax-pallas-mha":
        if not causal_only or case["local"] > 32 * K:  # a peer for the Triton target at <= 32K
            return None
        from jax.experimental.pallas.ops.gpu import attention as jax_attn

        def mha(q, k, v):
            g = q.shape[2] // k.shape[2]
            k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
            return jax_attn.mha(q, k, v, None, sm_scale=1 / np.sqrt(D), causal=True)

        return jax.jit(mha)
    if impl == "tokamax":
        if tk_mod is None:
            return None
        base, op = tk_mod
        tq = a + case["local"]
        if causal_only:
            mask = base.Mask(is_causal=True)
        else:
            k_start = jnp.where(jnp.arange(tq) < a, p, 0).astype(jnp.int32)
            mask = base.Mask(causal_mask=base.CausalMask(offset=p), k_start=k_start)
        return jax.jit(lambda q, k, v: op(q, k, v, mask=mask))
    raise ValueError(impl)


def time_fn(fn, args, warmup, reps):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernel_<device>_<date>.json)")
    ap.add_argument("--mosaic-blocks", default=None, help="block_q,block_k,num_stages for ours-mosaic")
    args = ap.parse_args(argv)
    from tqdm import tqdm

    dev = jax.devices()[0]
    kind = dev.device_kind
    slug = kind.lower().replace("nvidia", "").strip().split()[0] if dev.platform == "gpu" else dev.platform
    date = datetime.date.today().isoformat()
    cases = [c for c in args.cases.split(",") if c]
    impls = [i for i in args.impls.split(",") if i]
    tk_mod = _import_tokamax() if "tokamax" in impls else None
    results = []
    rng = np.random.default_rng(0)
    jobs = [(c, i) for c in cases for i in impls]
    bar = tqdm(jobs, desc="kernel bench", file=sys.stdout)
    cur_case, arrays, ref_out = None, None, None
    for cname, impl in bar:
        bar.set_postfix_str(f"{cname} {impl}")
        case = CASES.get(cname) or EXTRA_CASES[cname]
        tq = case["anchor"] + case["local"]
        tk = case["passing"] + tq
        if cname != cur_case:
            cur_case, arrays, ref_out = cname, None, None
            arrays = tuple(
                jnp.asarray(rng.standard_normal(s, np.float32), jnp.bfloat16)
                for s in ((1, tq, H, D), (1, tk, KVH, D), (1, tk, KVH, D))
            )
        pairs = ApbMask(tq, tk, case["anchor"]).useful_pairs()
        flops = 4.0 * D * H * pairs
        row = dict(
            case=cname,
            impl=impl,
            tq=tq,
            tk=tk,
            anchor=case["anchor"],
            passing=case["passing"],
            local=case["local"],
            heads=H,
            kv_heads=KVH,
            head_dim=D,
            dtype="bfloat16",
            useful_pairs=pairs,
            useful_flops=flops,
        )
        try:
            fn = make_fn(impl, case, tk_mod)
            if fn is None:
                continue
            out = jax.block_until_ready(fn(*arrays))
            # Agreement with the first implementation that ran on this case (sanity, not a test).
            o32 = out.astype(jnp.float32)
            if ref_out is None:
                ref_out, ref_impl = o32, impl
            else:
                err = float(jnp.linalg.norm(o32 - ref_out) / jnp.linalg.norm(ref_out))
                row.update(rel_err_vs=ref_impl, rel_err=err)
            row["nan"] = bool(jnp.isnan(o32).any())
            del out, o32
            med, ts = time_fn(fn, arrays, args.warmup, args.reps)
            row.update(ms=med * 1e3, times_ms=[t * 1e3 for t in ts], tflops=flops / med / 1e12)
        except Exception as e:
            row.update(error=f"{type(e).__name__}: {str(e)[:2000]}")
            traceback.print_exc(limit=3)
        results.append(row)

    out_path = (
        pathlib.Path(args.out)
        if args.out
        else (pathlib.Path(__file__).resolve().parent / "results" / f"kernel_{slug}_{date}.json")
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        device=kind,
        platform=dev.platform,
        jax_version=jax.__version__,
        date=date,
        warmup=args.warmup,
        reps=args.reps,
        timing="median wall time of jitted calls, block_until_ready",
        flops="4*D*H*useful (row,key) pairs",
    )
    out_path.write_text(json.dumps(dict(meta=meta, results=results), indent=1))

    print(f"\n{kind}, jax {jax.__version__}, {date}: median of {args.reps} after {args.warmup} warm-up")
    print(f"{'case':<13}{'impl':<16}{'ms':>10}{'TFLOP/s':>10}{'rel err':>12}")
    for r in results:
        if "error" in r:
            print(f"{r['case']:<13}{r['impl']:<16}   ERROR {r['error'][:80]}")
        else:
            err = f"{r['rel_err']:.1e}" if "rel_err" in r else "-"
            print(f"{r['case']:<13}{r['impl']:<16}{r['ms']:>10.2f}{r['tflops']:>10.1f}{err:>12}")
    print(f"wrote {out_path}")
    try:
        plot(out_path)
    except Exception as e:
        print(f"no plot: {type(e).__name__}: {e}")
    return results


def plot(json_path):
    """Bar chart of useful TFLOP/s per case and implementation, next to the JSON (.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_path = pathlib.Path(json_path)
    data = json.loads(json_path.read_text())
    rows = [r for r in data["results"] if "tflops" in r]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    w = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, c in enumerate(cases):
            for r in rows:
                if r["case"] == c and r["impl"] == impl:
                    xs.append(j + (i - (len(impls) - 1) / 2) * w)
                    ys.append(r["tflops"])
        ax.bar(xs, ys, w, label=impl)
    ax.set_xticks(range(len(cases)), cases)
    ax.set_ylabel("useful TFLOP/s (bf16)")
    m = data["meta"]
    ax.set_title(f"APB attention kernels, {m['device']}, jax {m['jax_version']}, {m['date']}")
    ax.set_ylim(0, 1.18 * max(r["tflops"] for r in rows))
    ax.legend(ncol=len(impls), fontsize=8, loc="upper center")
    fig.tight_layout()
    fig.savefig(json_path.with_suffix(".png"), dpi=110)
    print(f"wrote {json_path.with_suffix('.png')}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--plot":
        plot(sys.argv[2])
    else:
        main()
