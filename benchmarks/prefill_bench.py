#!/usr/bin/env python
"""Prefill benchmark: full vs ring vs star vs APB, measured on this machine and projected to H hosts (issue 11).

Prefill = document prefill + the query -> first token (APB_SPEC §5).  For every strategy x length x host count:
- `full`: the whole prefill on one device (cuDNN attention on GPU), measured.
- `apb` (query_aware, retaining_heads with random heads), `star`, `ring`: the busiest host's exact per-host program
  (`Engine.prefill_host_fn` + `Engine.step_host_fn`, host H-1) replayed on one device with shape stand-ins for the
  collectives (apb_jax.replay), measured; plus the communication it would do, modelled (bytes / bandwidth
  measured here when >= 2 devices exist, else APB_SPEC §8).  PROJECTED H-host time = replayed busiest host +
  modelled communication.  With >= H devices the real mesh run (Engine.prefill) is timed too.
Median of --repeats timed runs after --warmup; compile time apart; XLA's program memory and the device's peak;
useful FLOP/s (linear layers on the host's rows incl. the anchor, attention on unmasked pairs, compression).

--layers N runs the first N layers of the model and scales times to the full depth at the measured FLOP rate (every
layer does the same work, except the last of a document prefill, which only makes its k/v: the cache needs nothing
else); the JSON keeps the measured numbers and the scale; --depth-check times `full` at every layer to check it.

    python benchmarks/prefill_bench.py --smoke                 # tiny model, 4 fake CPU devices, < 1 min
    python benchmarks/prefill_bench.py --layers 4 --budget-s 360 --out-dir $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

K = 1024
DEFAULT_LENGTHS = (32 * K, 128 * K, 512 * K, 1024 * K)
DEFAULT_FULL_LENGTHS = (32 * K, 64 * K, 128 * K, 256 * K)
DEFAULT_HOSTS = (2, 4, 8)
TARGETS = {
    "full_s": {32 * K: 1.23, 64 * K: 3.40, 128 * K: 11.05},
    "apb_vs_full": 7.0,
    "apb_vs_star": 1.7,
    "apb_vs_ring": 1.5,
    "ring_vs_ideal_max": 1.25,
    "apb_frac_of_790": 0.70,
    "mem_1m_4_hosts_bytes": 141e9,
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true", help="tiny config on 4 fake CPU devices (CI)")
    ap.add_argument("--model", default="llama3.1-8b", choices=("llama3.1-8b", "qwen2.5-7b", "tiny"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--layers", type=int, default=None, help="run this many layers, scale times to the model depth")
    ap.add_argument(
        "--depth-check",
        action="store_true",
        help="first time `full` at the first full length with every layer (checks the --layers scaling)",
    )
    ap.add_argument("--strategies", default="full,apb,star,ring")
    ap.add_argument("--compressors", default="query_aware,retaining_heads", help="for apb")
    ap.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="document lengths, sp strategies")
    ap.add_argument("--full-lengths", default=",".join(map(str, DEFAULT_FULL_LENGTHS)))
    ap.add_argument("--hosts", default=",".join(map(str, DEFAULT_HOSTS)))
    ap.add_argument("--query-len", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop starting grid points once this much wall time is spent (results so far are kept)",
    )
    ap.add_argument(
        "--real",
        default="auto",
        choices=("auto", "yes", "no"),
        help="also time the real mesh run (Engine.prefill) when >= H devices exist",
    )
    ap.add_argument("--kernel-backend", default="auto")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--out", default=None, help="JSON path (default <out-dir>/prefill_<device>_<date>.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--from-json",
        default=None,
        help="comma-separated results JSONs of one device: merge their rows (into --out, else the first "
        "file), recompute comparisons and targets, redraw the plot, reprint the table",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.dtype = "tiny", "float32"
        args.lengths, args.full_lengths, args.hosts = "512", "512", "4"
        args.query_len = min(args.query_len, 8)
        args.real = "yes" if args.real == "auto" else args.real
    ints = lambda s: [int(x) for x in s.split(",") if x]
    args.lengths, args.full_lengths, args.hosts = ints(args.lengths), ints(args.full_lengths), ints(args.hosts)
    args.strategies = [s for s in args.strategies.split(",") if s]
    args.compressors = [s for s in args.compressors.split(",") if s]
    return args


# --------------------------------------------------------------------------------------------- models


def model_config(name: str):
    from apb_jax.config import ModelConfig, RopeConfig

    if name == "llama3.1-8b":
        return ModelConfig(
            model_type="llama",
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            rms_norm_eps=1e-5,
            rope=RopeConfig(
                theta=500000.0,
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
            max_position_embeddings=131072,
            bos_token_id=128000,
            eos_token_ids=(128001, 128009),
        )
    if name == "qwen2.5-7b":
        return ModelConfig(
            model_type="qwen2",
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_layers=28,
            num_heads=28,
            num_kv_heads=4,
            head_dim=128,
            rms_norm_eps=1e-6,
            rope=RopeConfig(theta=1000000.0),
            max_position_embeddings=32768,
            qkv_bias=True,
            eos_token_ids=(151645, 151643),
        )
    return ModelConfig(
        model_type="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope=RopeConfig(theta=10000.0),
        dtype="float32",
    )


def random_model(cfg, dtype: str, seed: int):
    """Random N(0, 0.02) weights created by one jitted init directly on the default device (no host copy),
    placed as a 1-device NamedSharding so engines on that device reuse them without copying."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from apb_jax.model import Model, resolve_dtype
    from apb_jax.models.llama import LlamaForCausalLM
    from apb_jax.parallel import make_mesh

    dt = resolve_dtype(dtype)
    make = lambda: LlamaForCausalLM(cfg, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(seed))
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    repl = NamedSharding(make_mesh(1), P())
    shardings = jax.tree_util.tree_map(lambda _: repl, abstract)
    params = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
    return Model(config=cfg, graphdef=graphdef, params=params, dtype=dt)


def random_heads(cfg, dtype, seed: int, hidden: int = 1024):
    """Random Locret retaining heads (fc1 [(H + 2 KVH) D, R], fc2 [R, KVH] per layer), made on the device."""
    import jax

    from apb_jax.compression import RetainingHeads

    d_in = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim

    @jax.jit
    def make(key):
        ks = jax.random.split(key, 2 * cfg.num_layers)
        fc1 = tuple(jax.random.normal(ks[2 * i], (d_in, hidden), dtype) * (d_in**-0.5) for i in range(cfg.num_layers))
        fc2 = tuple(
            jax.random.normal(ks[2 * i + 1], (hidden, cfg.num_kv_heads), dtype) * (hidden**-0.5)
            for i in range(cfg.num_layers)
        )
        return fc1, fc2

    fc1, fc2 = make(jax.random.PRNGKey(seed))
    return RetainingHeads(fc1, fc2, act=cfg.hidden_act)


def pick_backend(requested: str):
    import importlib.util

    import jax

    if requested != "auto":
        return requested
    if jax.default_backend() != "gpu":
        return None  # pallas_kernels' default off GPU (the blocked plain-XLA backend)
    try:
        has_mosaic = importlib.util.find_spec("pallas_kernels.mosaic_gpu") is not None
    except ImportError:
        has_mosaic = False
    from pallas_kernels.apb_attention import default_backend

    return default_backend() if has_mosaic else "triton"


# ---------------------------------------------------------------------------------------------- counting


def linear_flops_per_row(cfg) -> float:
    h, d = cfg.hidden_size, cfg.head_dim
    return 2.0 * (
        h * cfg.num_heads * d + 2 * h * cfg.num_kv_heads * d + cfg.num_heads * d * h + 3 * h * cfg.intermediate_size
    )


def attention_pairs(lay, host: int) -> float:
    """Unmasked (query, key) pairs of `host`'s prefill attention, per head and layer (what must be computed)."""
    a, b, p = lay.anchor, lay.block, lay.passing
    causal = lambda n: n * (n + 1) / 2
    if lay.strategy in ("full",) or lay.hosts == 1:
        return causal(b)
    if lay.strategy == "ring":
        return causal(b) + host * b * b
    anchor_rows = causal(a) if host > 0 else 0.0  # host 0's anchor duplicates its own block: not useful
    anchor_keys = a if host > 0 else 0
    passing = host * p if lay.strategy == "apb" else 0
    return anchor_rows + b * (passing + anchor_keys) + causal(b)


def host_flops(cfg, lay, host: int, layers: int, compressor: str, rh_hidden: int = 1024) -> dict:
    """FLOPs the host's document prefill must do.  The cache needs only the last layer's k and v: its q,
    compression, attention, o_proj and MLP feed nothing (XLA removes them), so that layer counts its k/v
    projections alone (APB_SPEC §5: the query, run afterwards, makes the first token)."""
    rows = lay.anchor + lay.block
    live = layers - 1  # layers whose whole work is needed
    kv_proj = 2.0 * cfg.hidden_size * 2 * cfg.num_kv_heads * cfg.head_dim
    lin = rows * (linear_flops_per_row(cfg) * live + kv_proj)
    att = 4.0 * cfg.head_dim * cfg.num_heads * attention_pairs(lay, host) * live
    comp = 0.0
    if lay.strategy == "apb" and lay.passing and lay.hosts > 1:
        if compressor == "retaining_heads":
            d_in = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
            comp = 2.0 * rows * (d_in * rh_hidden + rh_hidden * cfg.num_kv_heads) * live
        else:
            comp = (2.0 * rows * cfg.num_kv_heads * cfg.head_dim + lay.query_len * cfg.num_heads * cfg.head_dim) * live
    return {"linear": lin, "attention": att, "compression": comp, "total": lin + att + comp}


def query_flops(cfg, lay, host: int, layers: int) -> dict:
    q = lay.query_len
    lin = q * linear_flops_per_row(cfg) * layers
    keys = lay.block + (q + 1) / 2 if host == lay.hosts - 1 else lay.block
    att = 4.0 * cfg.head_dim * cfg.num_heads * q * keys * layers
    head = 2.0 * cfg.hidden_size * cfg.vocab_size
    return {"linear": lin + head, "attention": att, "total": lin + att + head}


def comm_bytes(cfg, lay, batch: int, itemsize: int) -> dict:
    """Per-layer collective payloads: what one host sends (its shard)."""
    kv_row = cfg.num_kv_heads * cfg.head_dim * itemsize
    out = {"doc_all_gather_shards": [], "doc_ppermute_bytes": [], "query_all_gather_shards": []}
    if lay.hosts > 1:
        if lay.strategy == "apb" and lay.passing:
            out["doc_all_gather_shards"] = [batch * lay.passing * kv_row] * 2 + [lay.passing]  # k, v, valid
        if lay.strategy == "ring":
            out["doc_ppermute_bytes"] = [batch * lay.block * kv_row] * 2 * (lay.hosts - 1)  # k, v per step
        o = batch * lay.query_len * cfg.num_heads * cfg.head_dim * 4
        out["query_all_gather_shards"] = [o, batch * lay.query_len * cfg.num_heads * 4]  # out, lse (float32)
    return out


def comm_seconds(cb: dict, bw, hosts: int, layers: int) -> tuple[float, float, float]:
    doc = sum(bw.all_gather_s(s, hosts) for s in cb["doc_all_gather_shards"])
    doc += sum(bw.ppermute_s(s) for s in cb["doc_ppermute_bytes"])
    query = sum(bw.all_gather_s(s, hosts) for s in cb["query_all_gather_shards"])
    doc_moved = sum(cb["doc_all_gather_shards"]) * (hosts - 1) + sum(cb["doc_ppermute_bytes"])
    q_moved = sum(cb["query_all_gather_shards"]) * (hosts - 1)
    # the last layer's document collectives feed only its (unneeded) attention: layers - 1 of them
    return doc * (layers - 1), query * layers, doc_moved * (layers - 1) + q_moved * layers


# --------------------------------------------------------------------------------------------- the grid


@dataclasses.dataclass
class Point:
    strategy: str
    length: int
    hosts: int
    compressor: str = "query_aware"
    layers: int | None = None  # None: --layers
    prio: int = 9
    est_s: float = 0.0

    @property
    def name(self) -> str:
        s = self.strategy if self.strategy != "apb" else f"apb-{'qa' if self.compressor == 'query_aware' else 'rh'}"
        size = f"{self.length // K}K" if self.length >= K else str(self.length)
        return f"{s} H={self.hosts} L={size}" + (f" ({self.layers} layers)" if self.layers else "")


def priority(strategy: str, length: int, hosts: int, compressor: str) -> int:
    """Most important first: the issue's targets (full 32K/128K, H=4 at 128K, 1M on 4 hosts), then breadth."""
    if strategy == "full":
        return {32 * K: 1, 128 * K: 1, 64 * K: 2}.get(length, 4)
    if length == 128 * K and hosts == 4:
        return 1 if compressor == "query_aware" else 2
    if strategy == "apb" and compressor == "query_aware" and length == 1024 * K and hosts == 4:
        return 2
    if compressor == "retaining_heads":
        return 5
    if length == 128 * K or (length == 512 * K and hosts == 4):
        return 3
    if length <= 128 * K or hosts == 8:
        return 4
    return 5


def build_grid(args, cfg, layers_run: int, rate: float, compile_per_layer: float) -> list[Point]:
    from apb_jax.parallel import make_layout

    pts = []
    for s in args.strategies:
        if s == "full":
            pts += [Point("full", L, 1) for L in args.full_lengths]
            continue
        for L in args.lengths:
            for H in args.hosts:
                for c in args.compressors if s == "apb" else ["query_aware"]:
                    pts.append(Point(s, L, H, c))
    out = []
    for p in pts:
        try:
            lay = make_layout(p.strategy, p.hosts, p.length, args.query_len, compressor=p.compressor)
        except ValueError:
            continue
        f = host_flops(cfg, lay, lay.hosts - 1, layers_run, p.compressor)["total"]
        p.prio = priority(p.strategy, p.length, p.hosts, p.compressor)
        p.est_s = 2 * (4 + compile_per_layer * layers_run) + (args.warmup + args.repeats + 1) * f / rate
        out.append(p)
    if args.depth_check and "full" in args.strategies and layers_run < cfg.num_layers:
        L = args.full_lengths[0]
        lay = make_layout("full", 1, L, args.query_len)
        f = host_flops(cfg, lay, 0, cfg.num_layers, "query_aware")["total"]
        out.append(
            Point(
                "full",
                L,
                1,
                layers=cfg.num_layers,
                prio=2,
                est_s=2 * (4 + compile_per_layer * cfg.num_layers) + (args.warmup + args.repeats + 1) * f / rate,
            )
        )
    out.sort(key=lambda p: (p.prio, p.est_s))
    return out


# ------------------------------------------------------------------------------------------ one point


def run_point(pt: Point, model, heads, args, cfg_model, bw, backend, rng) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from common import compile_timed, memory_stats, program_bytes, timed

    from apb_jax import Engine
    from apb_jax.replay import busiest_host, host_inputs, replay_prefill_fn, replay_step_fn

    cfg = model.config
    layers_run = cfg.num_layers
    dev = jax.devices()[0]
    eng = Engine(
        model,
        pt.strategy,
        devices=pt.hosts,
        compressor=pt.compressor,
        retaining_heads=heads if pt.compressor == "retaining_heads" else None,
        mode="vmap",
        kernel_backend=backend,
    )
    doc = rng.integers(0, cfg.vocab_size, (1, pt.length), dtype=np.int32)
    query = rng.integers(0, cfg.vocab_size, (1, args.query_len), dtype=np.int32)
    lay = eng.layout(pt.length, args.query_len)
    h = busiest_host(lay)
    row = {
        "name": pt.name,
        "strategy": pt.strategy,
        "compressor": pt.compressor if pt.strategy == "apb" else None,
        "hosts": pt.hosts,
        "doc_len": pt.length,
        "query_len": args.query_len,
        "block": lay.block,
        "anchor": lay.anchor,
        "passing": lay.passing,
        "replayed_host": h,
        "layers_run": layers_run,
        "layers_model": cfg_model.num_layers,
        "kernel_backend": backend or "default",
        "mode": "single device" if pt.hosts == 1 else "replay of the busiest host",
    }

    tokens, positions = host_inputs(lay, doc, query, h, pad_id=cfg.pad_token_id or 0)
    tokens, positions = jax.device_put(tokens, dev), jax.device_put(positions, dev)
    pre = replay_prefill_fn(eng, lay, h)
    pre_c, c_doc = compile_timed(pre, eng.params, eng.heads, tokens, positions)
    mem_doc = program_bytes(pre_c)
    t_doc, runs_doc, (k, v) = timed(
        pre_c, eng.params, eng.heads, tokens, positions, warmup=args.warmup, repeats=args.repeats
    )
    del pre_c
    tail_len = -(-(args.query_len + 1) // 16) * 16
    tail = jnp.zeros((layers_run, 1, tail_len, cfg.num_kv_heads, cfg.head_dim), k.dtype)
    qtok = jax.device_put(query, dev)
    step = replay_step_fn(eng, lay, h)
    step_c, c_q = compile_timed(step, eng.params, k, v, tail, tail, qtok, jnp.int32(0))
    mem_q = program_bytes(step_c)
    t_q, runs_q, out = timed(
        step_c, eng.params, k, v, tail, tail, qtok, jnp.int32(0), warmup=args.warmup, repeats=args.repeats
    )
    finite = bool(np.isfinite(np.asarray(out[2])).all())
    del out, k, v, tail, step_c
    stats = memory_stats(dev) or {}

    fl = host_flops(cfg_model, lay, h, cfg_model.num_layers, pt.compressor)
    fq = query_flops(cfg_model, lay, h, cfg_model.num_layers)
    # depth scaling at the measured FLOP rate: N run layers = N-1 whole layers + the last one's k/v projections
    scale = fl["total"] / host_flops(cfg_model, lay, h, layers_run, pt.compressor)["total"]
    scale_q = fq["total"] / query_flops(cfg_model, lay, h, layers_run)["total"]
    row["depth_scale"], row["depth_scale_query"] = scale, scale_q
    doc_s, q_s = t_doc * scale, t_q * scale_q
    row["measured"] = {
        "doc_prefill_s": t_doc,
        "doc_prefill_runs_s": runs_doc,
        "query_s": t_q,
        "query_runs_s": runs_q,
        "compile_doc_s": c_doc,
        "compile_query_s": c_q,
        "program_bytes_doc": mem_doc,
        "program_bytes_query": mem_q,
        "peak_bytes_in_use_so_far": stats.get("peak_bytes_in_use"),
        "logits_finite": finite,
    }
    weights_per_layer = (linear_flops_per_row(cfg_model) / 2) * jnp.dtype(model.dtype).itemsize
    kv_per_layer = (
        2 * (lay.anchor + lay.block + lay.block) * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(model.dtype).itemsize
    )
    if mem_doc:
        extra = (cfg_model.num_layers - layers_run) * (weights_per_layer + kv_per_layer)
        row["measured"]["program_bytes_doc_at_model_depth"] = mem_doc["total"] + extra
    row["flops"] = {"doc": fl, "query": fq}
    row["model_depth"] = {
        "doc_prefill_s": doc_s,
        "query_s": q_s,
        "prefill_s": doc_s + q_s,
        "doc_tflops": fl["total"] / doc_s / 1e12,
        "prefill_tflops": (fl["total"] + fq["total"]) / (doc_s + q_s) / 1e12,
    }
    row["model_depth"]["doc_frac_of_790"] = row["model_depth"]["doc_tflops"] * 1e12 / 790e12
    cb = comm_bytes(cfg_model, lay, 1, jnp.dtype(model.dtype).itemsize)
    c_doc_s, c_q_s, moved = comm_seconds(cb, bw, pt.hosts, cfg_model.num_layers)
    if pt.hosts > 1:
        total = doc_s + c_doc_s + q_s + c_q_s
        row["projected"] = {
            "label": "projected",
            "what": "busiest host replayed + modelled communication",
            "comm_doc_s": c_doc_s,
            "comm_query_s": c_q_s,
            "bytes_received_per_host": moved,
            "doc_prefill_s": doc_s + c_doc_s,
            "prefill_s": total,
            "prefill_tflops": (fl["total"] + fq["total"]) / total / 1e12,
        }
    return row


def run_real(pt: Point, model, heads, args, backend, rng) -> dict:
    """The real mesh run (Engine.prefill over H devices), when there are enough devices."""
    import statistics

    import numpy as np

    from apb_jax import Engine

    eng = Engine(
        model,
        pt.strategy,
        devices=pt.hosts,
        compressor=pt.compressor,
        retaining_heads=heads if pt.compressor == "retaining_heads" else None,
        mode="mesh",
        kernel_backend=backend,
    )
    doc = rng.integers(0, model.config.vocab_size, pt.length, dtype=np.int32)
    query = rng.integers(0, model.config.vocab_size, args.query_len, dtype=np.int32)
    first = eng.prefill(doc, query)
    for _ in range(max(args.warmup - 1, 0)):
        eng.prefill(doc, query)
    docs, qs = [], []
    for _ in range(args.repeats):
        out = eng.prefill(doc, query)
        docs.append(out.doc_prefill_seconds)
        qs.append(out.query_seconds)
    return {
        "name": pt.name + " real mesh",
        "strategy": pt.strategy,
        "compressor": pt.compressor if pt.strategy == "apb" else None,
        "hosts": pt.hosts,
        "doc_len": pt.length,
        "query_len": args.query_len,
        "mode": f"real mesh over {pt.hosts} devices",
        "layers_run": model.config.num_layers,
        "measured": {
            "doc_prefill_s": statistics.median(docs),
            "doc_prefill_runs_s": docs,
            "query_s": statistics.median(qs),
            "query_runs_s": qs,
            "compile_s": first.compile_seconds,
            "logits_finite": bool(np.isfinite(first.logits).all()),
        },
    }


# -------------------------------------------------------------------------------------------- summary


def _find(rows, strategy, length, hosts=None, compressor=None):
    for r in rows:
        if "model_depth" not in r or r.get("depth_check"):
            continue
        if (
            r["strategy"] == strategy
            and r["doc_len"] == length
            and (hosts is None or r["hosts"] == hosts)
            and (compressor is None or r.get("compressor") == compressor)
        ):
            return r
    return None


def _time(r):
    if r is None:
        return None
    return r["projected"]["prefill_s"] if "projected" in r else r["model_depth"]["prefill_s"]


def add_comparisons(rows):
    """Speed-ups against full at the same length and ring's distance from its ideal (full time / H); and, for each
    real mesh run, the projection it checks: its replay row's measured document time (same layer count) plus the
    modelled communication of those layers."""
    for r in rows:
        if not r.get("mode", "").startswith("real") or "measured" not in r:
            continue
        rep = _find(rows, r["strategy"], r["doc_len"], r["hosts"], r.get("compressor"))
        if rep is None or "projected" not in rep or rep["layers_run"] != r["layers_run"]:
            continue
        frac = rep["layers_run"] / rep["layers_model"]
        proj = rep["measured"]["doc_prefill_s"] + rep["projected"]["comm_doc_s"] * frac
        r["vs_projected"] = {
            "projected_doc_s": proj,
            "measured_doc_s": r["measured"]["doc_prefill_s"],
            "measured_over_projected": r["measured"]["doc_prefill_s"] / proj,
            "replay_doc_s": rep["measured"]["doc_prefill_s"],
            "comm_model_doc_s": rep["projected"]["comm_doc_s"] * frac,
            "layers": rep["layers_run"],
        }
    for r in rows:
        if "model_depth" not in r or r.get("depth_check"):
            continue
        full = _find(rows, "full", r["doc_len"], 1)
        if full and r["hosts"] > 1:
            ideal = full["model_depth"]["prefill_s"] / r["hosts"]
            r["projected"]["speedup_vs_full"] = full["model_depth"]["prefill_s"] / r["projected"]["prefill_s"]
            r["projected"]["ideal_s"] = ideal
            r["projected"]["vs_ideal"] = r["projected"]["prefill_s"] / ideal


def targets(rows, gemm_rate) -> dict:
    t = {}
    for L, want in TARGETS["full_s"].items():
        r = _find(rows, "full", L, 1)
        exact = next((x for x in rows if x.get("depth_check") and x["doc_len"] == L and "model_depth" in x), None)
        got = _time(exact) if exact else _time(r)
        t[f"full_{L // K}K_s"] = {
            "target_max": want,
            "got": got,
            "met": None if got is None else got <= want,
            "all_layers_measured": exact is not None,
        }
    L = 128 * K
    apb = _find(rows, "apb", L, 4, "query_aware")
    full, star, ring = _find(rows, "full", L, 1), _find(rows, "star", L, 4), _find(rows, "ring", L, 4)
    ratio = lambda a, b: None if a is None or b is None else _time(b) / _time(a)
    for key, other, want in (
        ("apb_vs_full_128K_H4", full, TARGETS["apb_vs_full"]),
        ("apb_vs_star_128K_H4", star, TARGETS["apb_vs_star"]),
        ("apb_vs_ring_128K_H4", ring, TARGETS["apb_vs_ring"]),
    ):
        got = ratio(apb, other)
        t[key] = {"target_min": want, "got": got, "met": None if got is None else got >= want, "label": "projected"}
    got = ring["projected"].get("vs_ideal") if ring else None
    t["ring_vs_ideal_128K_H4"] = {
        "target_max": TARGETS["ring_vs_ideal_max"],
        "got": got,
        "met": None if got is None else got <= TARGETS["ring_vs_ideal_max"],
        "ideal": "full prefill time / H",
        "label": "projected",
    }
    got = apb["model_depth"]["doc_frac_of_790"] if apb else None
    t["apb_frac_of_790_128K_H4"] = {
        "target_min": TARGETS["apb_frac_of_790"],
        "got": got,
        "met": None if got is None else got >= TARGETS["apb_frac_of_790"],
        "what": "busiest host's useful FLOP/s during its document prefill / 790e12",
    }
    m = _find(rows, "apb", 1024 * K, 4, "query_aware")
    got = m["measured"].get("program_bytes_doc_at_model_depth") if m else None
    t["apb_1M_H4_fits"] = {
        "target_max_bytes": TARGETS["mem_1m_4_hosts_bytes"],
        "got_bytes": got,
        "met": None if got is None else got <= TARGETS["mem_1m_4_hosts_bytes"],
        "what": "XLA program bytes of the busiest host (weights + outputs + temporaries), scaled to the model depth",
    }
    return t


def breakdown(rows, gemm_rate):
    """Model-depth time split of each replayed row: linear (FLOPs / measured matmul rate), compression (likewise),
    attention + the rest (the remainder of the measured time), communication (modelled)."""
    for r in rows:
        if "model_depth" not in r:
            continue
        fl = r["flops"]["doc"]
        lin = fl["linear"] / gemm_rate
        comp = fl["compression"] / gemm_rate
        r["breakdown_doc_s"] = {
            "linear_est": lin,
            "compression_est": comp,
            "attention_and_other": r["model_depth"]["doc_prefill_s"] - lin - comp,
            "communication_model": r.get("projected", {}).get("comm_doc_s", 0.0),
        }


def print_table(rows):
    from common import format_table

    def col(path):
        def get(r):
            x = r
            for p in path.split("."):
                x = x[p]
            return x

        return get

    cols = [
        ("name", "s", col("name")),
        ("mode", "s", lambda r: r["mode"][:14]),
        ("doc_s", ".3f", col("model_depth.doc_prefill_s")),
        ("query_s", ".4f", col("model_depth.query_s")),
        ("comm_s(model)", ".4f", lambda r: r["projected"]["comm_doc_s"] + r["projected"]["comm_query_s"]),
        ("prefill_s", ".3f", lambda r: r["model_depth"]["prefill_s"] if "projected" not in r else None),
        ("PROJECTED_s", ".3f", col("projected.prefill_s")),
        ("x_full", ".2f", col("projected.speedup_vs_full")),
        ("vs_ideal", ".2f", col("projected.vs_ideal")),
        ("TFLOP/s", ".0f", col("model_depth.doc_tflops")),
        ("%790", ".0%", col("model_depth.doc_frac_of_790")),
        ("GB(prog)", ".1f", lambda r: r["measured"]["program_bytes_doc"]["total"] / 1e9),
        ("GB@depth", ".1f", lambda r: r["measured"]["program_bytes_doc_at_model_depth"] / 1e9),
        ("compile_s", ".1f", lambda r: r["measured"]["compile_doc_s"] + r["measured"]["compile_query_s"]),
        ("layers", "d", col("layers_run")),
    ]
    ok = [r for r in rows if "model_depth" in r]
    ok.sort(
        key=lambda r: (
            r["strategy"] != "full",
            r["strategy"],
            r.get("compressor") or "",
            r["hosts"],
            r["doc_len"],
            r["layers_run"],
        )
    )
    print(format_table(ok, cols))
    real = [r for r in rows if r.get("mode", "").startswith("real")]
    if real:
        print("\nreal mesh runs (Engine.prefill):")
        print(
            format_table(
                real,
                [
                    ("name", "s", col("name")),
                    ("doc_s", ".4f", col("measured.doc_prefill_s")),
                    ("projected_doc_s", ".4f", col("vs_projected.projected_doc_s")),
                    ("measured/projected", ".3f", col("vs_projected.measured_over_projected")),
                    ("query_s", ".4f", col("measured.query_s")),
                    ("compile_s", ".1f", col("measured.compile_s")),
                ],
            )
        )
        print("(real rows at the layers run; projected = that replay row's measured time + modelled communication)")
    bad = [r for r in rows if r.get("error") or r.get("skipped")]
    for r in bad:
        print(f"  {r['name']}: {r.get('error') or r.get('skipped')}")
    print("(times at model depth; PROJECTED = busiest host replayed on one device + modelled communication)")


def plot(rows, path, device_name):
    from common import loglog_plot

    series = {}
    styles = {"full": "k", "apb": "tab:red", "star": "tab:blue", "ring": "tab:green"}
    marks = {1: "o", 2: "s", 4: "^", 8: "D"}
    for r in sorted((r for r in rows if "model_depth" in r and not r.get("depth_check")), key=lambda r: r["doc_len"]):
        comp = {"query_aware": "-qa", "retaining_heads": "-rh"}.get(r.get("compressor"), "")
        if r["hosts"] == 1:
            label, y = "full, 1 GPU (measured)", r["model_depth"]["prefill_s"]
        else:
            label, y = f"{r['strategy']}{comp} H={r['hosts']} (projected)", r["projected"]["prefill_s"]
        ls = "-" if r["hosts"] == 1 else ("--" if comp != "-rh" else ":")
        s = series.setdefault(
            label,
            (
                [],
                [],
                {"color": styles.get(r["strategy"], "gray"), "linestyle": ls, "marker": marks.get(r["hosts"], "x")},
            ),
        )
        s[0].append(r["doc_len"])
        s[1].append(y)
    for r in sorted((r for r in rows if "vs_projected" in r), key=lambda r: r["doc_len"]):
        rep = _find(rows, r["strategy"], r["doc_len"], r["hosts"], r.get("compressor"))
        if rep is None:
            continue
        comp = {"query_aware": "-qa", "retaining_heads": "-rh"}.get(r.get("compressor"), "")
        s = series.setdefault(
            f"{r['strategy']}{comp} H={r['hosts']} (measured on {r['hosts']} GPUs)",
            (
                [],
                [],
                {"color": styles.get(r["strategy"], "gray"), "linestyle": "none", "marker": "*", "markersize": 12},
            ),
        )
        s[0].append(r["doc_len"])  # the real run's measured/projected ratio applied at the model depth
        s[1].append(rep["projected"]["prefill_s"] * r["vs_projected"]["measured_over_projected"])
    loglog_plot(
        series,
        path,
        f"Llama-shaped prefill (doc + query -> first token) on {device_name}\n"
        "projected = busiest host replayed on one device + modelled communication; "
        "* = real mesh run",
    )


# ----------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return replot(args)
    if args.smoke:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    t_start = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import numpy as np

    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional
        tqdm = None
    import common

    info = common.device_info()
    out_path = (
        Path(args.out)
        if args.out
        else Path(args.out_dir) / f"prefill_{common.slug(info['name'])}_{common.today()}.json"
    )
    png_path = out_path.with_suffix(".png")
    cfg_model = model_config(args.model)
    layers_run = min(args.layers or cfg_model.num_layers, cfg_model.num_layers)
    if layers_run < 2:
        raise SystemExit(f"--layers {args.layers}: need >= 2 (the last layer of a document prefill is only its k/v)")
    backend = pick_backend(args.kernel_backend)
    on_gpu = jax.default_backend() == "gpu"

    # the two ceilings this machine has: matmul rate and collective bandwidth
    dt = jnp.dtype(args.dtype)
    m = 8192 if on_gpu else 256
    a = jax.random.normal(jax.random.PRNGKey(1), (m, cfg_model.hidden_size), dt)
    b = jax.random.normal(jax.random.PRNGKey(2), (cfg_model.hidden_size, cfg_model.intermediate_size), dt)
    mm = jax.jit(lambda x, y: x @ y)
    t_mm, _, _ = common.timed(mm, a, b, warmup=2, repeats=10)
    gemm_rate = 2.0 * m * cfg_model.hidden_size * cfg_model.intermediate_size / t_mm
    del a, b
    if jax.device_count() >= 2:
        sizes = [16 * common.MB, 128 * common.MB, 512 * common.MB] if on_gpu else [64 * K, 2 * common.MB]
        bw = common.measure_bandwidth(jax.devices(), sizes)
    else:
        bw = common.spec_bandwidth_model()

    doc = {
        "benchmark": "prefill",
        "issue": 11,
        "device": info,
        "jax_version": jax.__version__,
        "date": common.today(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "model": args.model,
        "config": dataclasses.asdict(cfg_model),
        "dtype": args.dtype,
        "layers_run": layers_run,
        "query_len": args.query_len,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "kernel_backend": backend or "default",
        "gemm_rate_tflops": gemm_rate / 1e12,
        "comm_model": bw.describe(),
        "status": "running",
        "rows": [],
        "notes": [
            "All sequence-parallel times are PROJECTED: the busiest host's exact per-host program replayed "
            "on one device (apb_jax.replay) + modelled communication, no overlap assumed.",
            "model_depth = measured x layers_model / layers_run (every layer does the same work).",
            "full uses cuDNN attention on GPU; apb/star/ring use the pallas_kernels backend named above.",
        ],
    }

    def save():
        add_comparisons(doc["rows"])
        breakdown(doc["rows"], gemm_rate)
        doc["targets"] = targets(doc["rows"], gemm_rate)
        doc["elapsed_s"] = time.perf_counter() - t_start
        common.write_json(out_path, doc)

    rate_guess = (0.45 if on_gpu else 0.3) * gemm_rate
    grid = build_grid(args, cfg_model, layers_run, rate_guess, 0.8 if on_gpu else 0.3)
    print(
        f"{info['name']} x{info['count']}, jax {jax.__version__}, backend {backend or 'default'}, "
        f"matmul {gemm_rate / 1e12:.0f} TFLOP/s; {len(grid)} points, {layers_run}/{cfg_model.num_layers} layers; "
        f"comm: {bw.source}",
        flush=True,
    )
    save()
    rng = np.random.default_rng(args.seed)
    heads = None
    model, model_layers = None, None
    bar = tqdm(grid, desc="prefill grid", file=sys.stdout) if tqdm else grid
    for pt in bar:
        if tqdm:
            bar.set_postfix_str(pt.name)
        n = pt.layers or layers_run
        elapsed = time.perf_counter() - t_start
        if args.budget_s is not None and elapsed + pt.est_s > args.budget_s:
            doc["rows"].append(
                {
                    "name": pt.name,
                    "strategy": pt.strategy,
                    "hosts": pt.hosts,
                    "doc_len": pt.length,
                    "skipped": f"time budget ({elapsed:.0f}s spent, ~{pt.est_s:.0f}s estimated, "
                    f"budget {args.budget_s:.0f}s)",
                }
            )
            continue
        try:
            if model_layers != n:
                model = heads = None
                gc.collect()
                cfg_run = dataclasses.replace(cfg_model, num_layers=n)
                model = random_model(cfg_run, args.dtype, args.seed)
                model_layers = n
            if pt.compressor == "retaining_heads" and heads is None:
                heads = random_heads(model.config, dt, args.seed + 1)
            try:
                row = run_point(pt, model, heads, args, cfg_model, bw, backend, rng)
            except Exception as e:
                msg = f"{type(e).__name__}: {e}"
                if backend != "mosaic" or pt.strategy == "full" or _is_oom(msg):
                    raise
                print(f"\n{pt.name}: mosaic kernel failed ({msg[:300]}); switching to triton", flush=True)
                doc["notes"].append(f"mosaic backend failed at {pt.name}: {msg[:500]}; later points use triton")
                backend = doc["kernel_backend"] = "triton"
                row = run_point(pt, model, heads, args, cfg_model, bw, backend, rng)
            row["depth_check"] = pt.layers is not None
            row["priority"] = pt.prio
            doc["rows"].append(row)
            # the real mesh run, where there are devices for it (full's is its single-device run above; in the
            # smoke only the query-aware compressor, to stay inside CI's minute)
            want_real = args.real == "yes" or (args.real == "auto" and jax.device_count() >= pt.hosts)
            if args.smoke and pt.compressor != "query_aware":
                want_real = False
            if want_real and jax.device_count() >= pt.hosts > 1 and not pt.layers:
                doc["rows"].append(run_real(pt, model, heads, args, backend, rng))
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            doc["rows"].append(
                {"name": pt.name, "strategy": pt.strategy, "hosts": pt.hosts, "doc_len": pt.length, "error": msg[:2000]}
            )
            print(f"\n{pt.name} failed: {msg[:400]}", flush=True)
            if not _is_oom(msg):
                traceback.print_exc()
        gc.collect()
        save()
    doc["status"] = "complete"
    save()
    try:
        plot(doc["rows"], png_path, info["name"])
    except Exception as e:
        print(f"plot failed: {e}")
    print(f"\nJSON: {out_path}\nplot: {png_path}")
    print_table(doc["rows"])
    if args.smoke:
        return check_json(out_path)
    return 0


def replot(args) -> int:
    import common

    paths, docs = common.read_jsons(args.from_json)
    d = docs[0]
    for other in docs[1:]:
        if other["device"]["name"] != d["device"]["name"]:
            raise SystemExit(f"{other['device']['name']} != {d['device']['name']}: merge results of one device only")
        have = {(r["name"], r.get("mode")) for r in d["rows"] if "model_depth" in r or "measured" in r}
        d["rows"] = [
            r
            for r in d["rows"]
            if not (r.get("skipped") and any(o["name"] == r["name"] and "model_depth" in o for o in other["rows"]))
        ]
        d["rows"] += [
            r
            for r in other["rows"]
            if (r["name"], r.get("mode")) not in have
            and not (r.get("skipped") and any(x["name"] == r["name"] for x in d["rows"]))
        ]
        d.setdefault("merged_from", []).append({"argv": other["argv"], "elapsed_s": other.get("elapsed_s")})
    gemm = d["gemm_rate_tflops"] * 1e12
    add_comparisons(d["rows"])
    breakdown(d["rows"], gemm)
    d["targets"] = targets(d["rows"], gemm)
    out = Path(args.out) if args.out else paths[0]
    from common import write_json

    write_json(out, d)
    plot(d["rows"], out.with_suffix(".png"), d["device"]["name"])
    print_table(d["rows"])
    return 0


def _is_oom(msg: str) -> bool:
    return "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()


def check_json(path) -> int:
    """The smoke check: the file is valid JSON with every strategy measured, replayed and (mesh) real."""
    import json

    import common

    d = json.loads(Path(path).read_text())
    rows = d["rows"]
    errors = [r for r in rows if r.get("error")]
    need = {
        ("full", "single device"),
        ("apb", "replay of the busiest host"),
        ("star", "replay of the busiest host"),
        ("ring", "replay of the busiest host"),
    }
    have = {(r["strategy"], r.get("mode")) for r in rows if "model_depth" in r}
    real = {r["strategy"] for r in rows if r.get("mode", "").startswith("real")}
    problems = []
    if errors:
        problems.append(f"{len(errors)} grid point(s) failed: {[r['error'][:200] for r in errors]}")
    if not need <= have:
        problems.append(f"missing measurements: {sorted(need - have)}")
    if not {"apb", "star", "ring"} <= real:
        problems.append(f"missing real mesh runs: {sorted({'apb', 'star', 'ring'} - real)}")
    for r in rows:
        if r.get("mode", "").startswith("real") and not 0 < r.get("vs_projected", {}).get(
            "measured_over_projected", float("nan")
        ) < float("inf"):
            problems.append(f"{r['name']} has no comparison with its projection")
        if r.get("hosts", 1) > 1 and "model_depth" in r and r["projected"]["label"] != "projected":
            problems.append(f"{r['name']} not labelled projected")
    return common.smoke_verdict(problems, f"{len(rows)} rows in {path}")


if __name__ == "__main__":
    sys.exit(main())
