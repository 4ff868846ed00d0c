"""Prefill benchmark: every strategy measured on this machine and projected to H hosts (`apb-jax bench`).

Prefill = document prefill + the query -> first token.  For every strategy x length x host count:
- the single-device strategy (full attention): the whole prefill on one device, measured;
- each sequence-parallel strategy (and, for those that compress, each compressor; retaining heads are random, of
  the released shape): the busiest host's exact per-host program (`Engine.prefill_host_fn` + `step_host_fn`)
  replayed on one device with shape stand-ins for the collectives (`apb_jax.replay`), measured; plus the
  communication it would do, modelled from the strategy's own byte counts (bandwidth measured here when >= 2
  devices exist, else the figures for 4 NVLinked H200s).  PROJECTED H-host time = replayed busiest host +
  modelled communication.  With >= H devices the real mesh run (`Engine.prefill`) is timed too.
Median of --repeats timed runs after --warmup; compile time apart; XLA's program memory and the device's peak;
useful FLOP/s from each strategy's cost model (linear layers on the host's rows incl. the anchor, attention on
visible pairs, compression).  --profile adds a breakdown of the replayed program's time by category.

--layers N runs the first N layers of the model and scales times to the full depth at the measured FLOP rate (every
layer does the same work, except the last of a document prefill, which only makes its k/v: the cache needs nothing
else); the JSON keeps the measured numbers and the scale; --depth-check times the baseline at every layer.

    apb-jax bench --smoke                                   # tiny model, 4 fake CPU devices, < 1 min
    apb-jax bench --layers 4 --lengths 131072 --hosts 4 --budget-s 360 --out-dir results/
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
from collections.abc import Callable
from pathlib import Path

from apb_jax.config import COMPRESSOR_TAGS

K = 1024
DEFAULT_LENGTHS = (32 * K, 128 * K, 512 * K, 1024 * K)
DEFAULT_FULL_LENGTHS = (32 * K, 64 * K, 128 * K, 256 * K)
DEFAULT_HOSTS = (2, 4, 8)


def parse_args(argv=None, prog: str = "apb-jax bench"):
    from apb_jax import strategies
    from apb_jax.config import COMPRESSORS

    ap = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--smoke", action="store_true", help="tiny config on 4 fake CPU devices (a CI check)")
    ap.add_argument("--model", default="llama3.1-8b", choices=tuple(MODELS))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--layers", type=int, default=None, help="run this many layers, scale times to the model depth")
    ap.add_argument(
        "--depth-check",
        action="store_true",
        help="also time the baseline at the first baseline length with every layer (checks --layers)",
    )
    ap.add_argument(
        "--strategies",
        default=",".join(strategies.names()),
        help=f"comma-separated, any of {','.join(strategies.names())}",
    )
    ap.add_argument(
        "--compressors",
        default="query_aware,retaining_heads",
        help=f"for strategies that compress, any of {','.join(COMPRESSORS)}",
    )
    ap.add_argument(
        "--lengths",
        default=",".join(map(str, DEFAULT_LENGTHS)),
        help="document lengths of the sequence-parallel strategies",
    )
    ap.add_argument(
        "--full-lengths",
        default=",".join(map(str, DEFAULT_FULL_LENGTHS)),
        help="document lengths of the single-device baseline",
    )
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
    ap.add_argument("--kernel-backend", default="auto", help="attention backend (auto: the dispatcher's choice)")
    ap.add_argument(
        "--profile", action="store_true", help="also profile each replayed program and break its time down by category"
    )
    ap.add_argument(
        "--out-dir",
        default=None,
        help="directory for the JSON and the plot (default ./bench_results; --smoke: a temp directory)",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="JSON path, or an existing directory (default <out-dir>/prefill_<device>_<date>.json)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--from-json",
        default=None,
        help="comma-separated results JSONs of one device: merge their rows (into --out, else the first "
        "file), recompute comparisons, redraw the plot, reprint the table",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.dtype = "tiny", "float32"
        args.lengths, args.full_lengths, args.hosts = "512", "512", "4"
        args.query_len = min(args.query_len, 8)
        args.real = "yes" if args.real == "auto" else args.real
        if args.out_dir is None and args.out is None:
            args.out_dir = tempfile.mkdtemp(prefix="apb_bench_smoke_")
    ints = lambda s, flag: [_positive(x, flag, ap) for x in s.split(",") if x]
    args.lengths = ints(args.lengths, "--lengths")
    args.full_lengths = ints(args.full_lengths, "--full-lengths")
    args.hosts = ints(args.hosts, "--hosts")
    args.strategies = [s for s in args.strategies.split(",") if s]
    for s in args.strategies:
        if s not in strategies.names():
            ap.error(f"--strategies: {s!r} is unknown; allowed: {','.join(strategies.names())}")
    args.compressors = [s for s in args.compressors.split(",") if s]
    for c in args.compressors:
        if c not in COMPRESSORS:
            ap.error(f"--compressors: {c!r} is unknown; allowed: {','.join(COMPRESSORS)}")
    if args.layers is not None and args.layers < 2:
        ap.error(f"--layers {args.layers}: need >= 2 (the last layer of a document prefill is only its k/v)")
    return args


def _positive(x: str, flag: str, ap) -> int:
    try:
        v = int(x)
    except ValueError:
        ap.error(f"{flag}: {x!r} is not a whole number")
    if v < 1:
        ap.error(f"{flag}: {v} must be >= 1")
    return v


# --------------------------------------------------------------------------------------------- models


def _llama31_8b():
    from apb_jax.config import ModelConfig, RopeConfig

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


def _qwen25(hidden, inter, layers, heads, kv, vocab=152064, max_pos=32768):
    from apb_jax.config import ModelConfig, RopeConfig

    return ModelConfig(
        model_type="qwen2",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hidden // heads,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1000000.0),
        max_position_embeddings=max_pos,
        qkv_bias=True,
        eos_token_ids=(151645, 151643),
    )


def _yi_34b():
    from apb_jax.config import ModelConfig, RopeConfig

    # Yi-34B-200K's published config: a Llama architecture
    return ModelConfig(
        model_type="llama",
        vocab_size=64000,
        hidden_size=7168,
        intermediate_size=20480,
        num_layers=60,
        num_heads=56,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=10000000.0),
        max_position_embeddings=200000,
        bos_token_id=1,
        eos_token_ids=(2,),
    )


def _tiny():
    from apb_jax.config import ModelConfig, RopeConfig

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


MODELS: dict[str, Callable] = {
    "llama3.1-8b": _llama31_8b,
    "qwen2.5-7b": lambda: _qwen25(3584, 18944, 28, 28, 4),
    "qwen2.5-14b": lambda: _qwen25(5120, 13824, 48, 40, 8, max_pos=131072),
    "yi-34b": _yi_34b,
    "tiny": _tiny,
}


def model_config(name: str):
    if name not in MODELS:
        raise ValueError(f"model={name!r} is unknown; allowed: {tuple(MODELS)}")
    return MODELS[name]()


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


# ---------------------------------------------------------------------------------------------- counting


def host_flops(cfg, lay, host: int, layers: int, compressor: str) -> dict:
    from apb_jax import strategies
    from apb_jax.strategies.base import prefill_flops

    return prefill_flops(strategies.get(lay.strategy), cfg, lay, host, layers, compressor)


def comm_seconds(cfg, lay, bw, layers: int, itemsize: int, batch: int = 1) -> dict:
    """Modelled communication of one host's prefill: the strategy's per-layer payloads over `bw`."""
    from apb_jax import strategies
    from apb_jax.strategies.base import query_comm_bytes

    hosts = lay.hosts
    cb = strategies.get(lay.strategy).comm_bytes(cfg, lay, batch, itemsize)
    qb = query_comm_bytes(cfg, lay, batch)
    doc = sum(bw.all_gather_s(s, hosts) for s in cb["all_gather"])
    doc += sum(bw.ppermute_s(s) for s in cb["ppermute"])
    doc += sum(bw.all_to_all_s(s, hosts) for s in cb["all_to_all"])
    query = sum(bw.all_gather_s(s, hosts) for s in qb)
    doc_moved = sum(cb["all_gather"]) * (hosts - 1) + sum(cb["ppermute"]) + sum(cb["all_to_all"]) * (hosts - 1) / hosts
    q_moved = sum(qb) * (hosts - 1)
    # the last layer's document collectives feed only its (unneeded) attention: layers - 1 of them
    return {
        "doc_s": doc * (layers - 1),
        "query_s": query * layers,
        "bytes_received": doc_moved * (layers - 1) + q_moved * layers,
        "per_layer_bytes": cb,
    }


# --------------------------------------------------------------------------------------------- the grid


def label(strategy: str, compressor: str | None) -> str:
    return f"{strategy}-{COMPRESSOR_TAGS[compressor]}" if compressor else strategy


@dataclasses.dataclass
class Point:
    strategy: str
    length: int
    hosts: int
    compressor: str | None = None  # set for strategies that compress
    layers: int | None = None  # None: --layers
    prio: int = 9
    est_s: float = 0.0

    @property
    def name(self) -> str:
        size = f"{self.length // K}K" if self.length >= K else str(self.length)
        return f"{label(self.strategy, self.compressor)} H={self.hosts} L={size}" + (
            f" ({self.layers} layers)" if self.layers else ""
        )


def compresses(strategy: str) -> bool:
    from apb_jax import strategies

    return "passing_len" in strategies.get(strategy).options


def priority(pt: Point) -> int:
    """Most important first: the baseline at 32K / 128K, every strategy at 128K on 4 hosts, then breadth."""
    from apb_jax import strategies

    if strategies.get(pt.strategy).single_device:
        return {32 * K: 1, 128 * K: 1, 64 * K: 2}.get(pt.length, 4)
    if pt.length == 128 * K and pt.hosts == 4:
        return 1 if pt.compressor in (None, "query_aware") else 2
    if pt.compressor == "retaining_heads":
        return 5
    if pt.length == 128 * K or (pt.length == 512 * K and pt.hosts == 4):
        return 3
    if pt.length <= 128 * K or pt.hosts == 8:
        return 4
    return 5


def build_grid(args, cfg, layers_run: int, rate: float, compile_per_layer: float) -> list[Point]:
    from apb_jax import strategies

    pts = []
    for s in args.strategies:
        if strategies.get(s).single_device:
            pts += [Point(s, L, 1) for L in args.full_lengths]
            continue
        for L in args.lengths:
            for H in args.hosts:
                for c in args.compressors if compresses(s) else [None]:
                    pts.append(Point(s, L, H, c))
    est = lambda lay, layers, comp: (
        2 * (4 + compile_per_layer * layers)
        + (args.warmup + args.repeats + 1)
        * (host_flops(cfg, lay, strategies.get(lay.strategy).busiest_host(lay), layers, comp)["total"] / rate)
    )
    out = []
    for p in pts:
        try:
            lay = strategies.make_layout(
                p.strategy, p.hosts, p.length, args.query_len, compressor=p.compressor or "query_aware"
            )
        except ValueError:
            continue
        p.prio, p.est_s = priority(p), est(lay, layers_run, p.compressor or "query_aware")
        out.append(p)
    base = strategies.DEFAULT
    if args.depth_check and base in args.strategies and layers_run < cfg.num_layers:
        L = args.full_lengths[0]
        lay = strategies.make_layout(base, 1, L, args.query_len)
        out.append(Point(base, L, 1, layers=cfg.num_layers, prio=2, est_s=est(lay, cfg.num_layers, "query_aware")))
    out.sort(key=lambda p: (p.prio, p.est_s))
    return out


# ------------------------------------------------------------------------------------------ one point


def run_point(pt: Point, model, heads, args, cfg_model, bw, backend, rng) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from apb_jax import Engine
    from apb_jax.bench.common import H200_BF16_PEAK, compile_timed, memory_stats, program_bytes, timed
    from apb_jax.replay import busiest_host, host_inputs, replay_prefill_fn, replay_step_fn
    from apb_jax.strategies.base import linear_flops_per_row, query_flops

    cfg = model.config
    layers_run = cfg.num_layers
    dev = jax.devices()[0]
    compressor = pt.compressor or "query_aware"
    eng = Engine(
        model,
        pt.strategy,
        devices=pt.hosts,
        compressor=compressor,
        retaining_heads=heads if compressor == "retaining_heads" else None,
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
        "compressor": pt.compressor,
        "hosts": pt.hosts,
        "doc_len": pt.length,
        "query_len": args.query_len,
        "block": lay.block,
        "anchor": lay.anchor,
        "passing": lay.passing,
        "replayed_host": h,
        "layers_run": layers_run,
        "layers_model": cfg_model.num_layers,
        "kernel_backend": backend or "auto",
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
    if args.profile:
        row["profile"] = _profile(pre, (eng.params, eng.heads, tokens, positions), args)
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
    finite = bool(np.isfinite(np.asarray(jax.device_get(out[2]))).all())
    del out, k, v, tail, step_c
    stats = memory_stats(dev) or {}

    fl = host_flops(cfg_model, lay, h, cfg_model.num_layers, compressor)
    fq = query_flops(cfg_model, lay, h, cfg_model.num_layers)
    # depth scaling at the measured FLOP rate: N run layers = N-1 whole layers + the last one's k/v projections
    scale = fl["total"] / host_flops(cfg_model, lay, h, layers_run, compressor)["total"]
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
    itemsize = jnp.dtype(model.dtype).itemsize
    weights_per_layer = (linear_flops_per_row(cfg_model) / 2) * itemsize
    kv_per_layer = 2 * (lay.anchor + lay.block + lay.block) * cfg.num_kv_heads * cfg.head_dim * itemsize
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
    row["model_depth"]["doc_frac_of_790"] = row["model_depth"]["doc_tflops"] * 1e12 / H200_BF16_PEAK
    comm = comm_seconds(cfg_model, lay, bw, cfg_model.num_layers, itemsize)
    if pt.hosts > 1:
        total = doc_s + comm["doc_s"] + q_s + comm["query_s"]
        row["projected"] = {
            "label": "projected",
            "what": "busiest host replayed + modelled communication",
            "comm_doc_s": comm["doc_s"],
            "comm_query_s": comm["query_s"],
            "bytes_received_per_host": comm["bytes_received"],
            "doc_prefill_s": doc_s + comm["doc_s"],
            "prefill_s": total,
            "prefill_tflops": (fl["total"] + fq["total"]) / total / 1e12,
        }
    return row


def _profile(fn, fn_args, args) -> dict:
    """The replayed program's time by category (`apb_jax.profiling`).  On a GPU it is compiled once more without
    CUDA command buffers: kernels replayed inside a CUDA graph lose the HLO names the categories come from."""
    import jax

    from apb_jax import profiling

    opts = {"xla_gpu_enable_command_buffer": ""} if jax.default_backend() == "gpu" else None
    try:
        return profiling.profile(fn, *fn_args, repeats=args.repeats, warmup=1, compiler_options=opts)
    except Exception as e:
        if opts is None:
            raise
        res = profiling.profile(fn, *fn_args, repeats=args.repeats, warmup=1)
        res.setdefault("notes", []).append(f"profiled with command buffers on ({type(e).__name__}: {e})"[:300])
        return res


def run_real(pt: Point, model, heads, args, backend, rng) -> dict:
    """The real mesh run (Engine.prefill over H devices), when there are enough devices."""
    import statistics

    import numpy as np

    from apb_jax import Engine

    compressor = pt.compressor or "query_aware"
    eng = Engine(
        model,
        pt.strategy,
        devices=pt.hosts,
        compressor=compressor,
        retaining_heads=heads if compressor == "retaining_heads" else None,
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
        "compressor": pt.compressor,
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


def find(rows, strategy, length, hosts=None, compressor="any"):
    """The replayed / single-device row of (strategy, length[, hosts][, compressor]), or None."""
    for r in rows:
        if "model_depth" not in r or r.get("depth_check"):
            continue
        if (
            r["strategy"] == strategy
            and r["doc_len"] == length
            and (hosts is None or r["hosts"] == hosts)
            and (compressor == "any" or r.get("compressor") == compressor)
        ):
            return r
    return None


def time_of(r):
    if r is None:
        return None
    return r["projected"]["prefill_s"] if "projected" in r else r["model_depth"]["prefill_s"]


def add_comparisons(rows):
    """Speed-ups against the single-device baseline at the same length and the distance from the ideal (baseline
    time / H); and, for each real mesh run, the projection it checks: its replay row's measured document time (same
    layer count) plus the modelled communication of those layers."""
    from apb_jax import strategies

    for r in rows:
        if not r.get("mode", "").startswith("real") or "measured" not in r:
            continue
        rep = find(rows, r["strategy"], r["doc_len"], r["hosts"], r.get("compressor"))
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
        base = find(rows, strategies.DEFAULT, r["doc_len"], 1)
        if base and r["hosts"] > 1:
            ideal = base["model_depth"]["prefill_s"] / r["hosts"]
            r["projected"]["speedup_vs_full"] = base["model_depth"]["prefill_s"] / r["projected"]["prefill_s"]
            r["projected"]["ideal_s"] = ideal
            r["projected"]["vs_ideal"] = r["projected"]["prefill_s"] / ideal


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
    from apb_jax import strategies
    from apb_jax.bench.common import format_table

    def col(path):
        def get(r):
            x = r
            for p in path.split("."):
                x = x[p]
            return x

        return get

    cols = [
        ("name", "s", col("name")),
        ("mode", "s", lambda r: "replay" if r["mode"].startswith("replay") else r["mode"]),
        ("doc_s", ".3f", col("model_depth.doc_prefill_s")),
        ("query_s", ".4f", col("model_depth.query_s")),
        ("comm_s(model)", ".4f", lambda r: r["projected"]["comm_doc_s"] + r["projected"]["comm_query_s"]),
        ("prefill_s", ".3f", lambda r: r["model_depth"]["prefill_s"] if "projected" not in r else None),
        ("PROJECTED_s", ".3f", col("projected.prefill_s")),
        (f"x_{strategies.DEFAULT}", ".2f", col("projected.speedup_vs_full")),
        ("vs_ideal", ".2f", col("projected.vs_ideal")),
        ("TFLOP/s", ".3g", col("model_depth.doc_tflops")),
        ("GB(prog)", ".2g", lambda r: r["measured"]["program_bytes_doc"]["total"] / 1e9),
        ("GB@depth", ".2g", lambda r: r["measured"]["program_bytes_doc_at_model_depth"] / 1e9),
        ("compile_s", ".1f", lambda r: r["measured"]["compile_doc_s"] + r["measured"]["compile_query_s"]),
        ("layers", "d", col("layers_run")),
    ]
    ok = [r for r in rows if "model_depth" in r]
    ok.sort(
        key=lambda r: (
            r["hosts"] > 1,
            r["strategy"],
            r.get("compressor") or "",
            r["hosts"],
            r["doc_len"],
            r["layers_run"],
        )
    )
    print(format_table(ok, cols))
    prof = [r for r in ok if r.get("profile")]
    if prof:
        from apb_jax.profiling import CATEGORIES

        cats = [c for c in CATEGORIES if any(r["profile"]["categories"].get(c) for r in prof)]
        print("\nwhere the replayed document prefill's time goes (seconds at the layers run; share of wall time):")
        print(
            format_table(
                prof,
                [("name", "s", col("name")), ("wall_s", ".4f", col("profile.wall_s"))]
                + [(c, ".4f", lambda r, c=c: r["profile"]["categories"].get(c, 0.0)) for c in cats]
                + [("covered", ".0%", col("profile.covered_fraction"))],
            )
        )
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
    for r in rows:
        if r.get("error") or r.get("skipped"):
            print(f"  {r['name']}: {r.get('error') or r.get('skipped')}")
    print("(times at model depth; PROJECTED = busiest host replayed on one device + modelled communication)")


def plot(rows, path, device_name):
    from apb_jax.bench.common import loglog_plot

    series = {}
    colors = ["k", "tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:olive"]
    styles = {}
    marks = {1: "o", 2: "s", 4: "^", 8: "D"}
    color = lambda s: styles.setdefault(s, colors[len(styles) % len(colors)])
    for r in sorted((r for r in rows if "model_depth" in r and not r.get("depth_check")), key=lambda r: r["doc_len"]):
        name = label(r["strategy"], r.get("compressor"))
        if r["hosts"] == 1:
            lab, y = f"{name}, 1 GPU (measured)", r["model_depth"]["prefill_s"]
        else:
            lab, y = f"{name} H={r['hosts']} (projected)", r["projected"]["prefill_s"]
        ls = "-" if r["hosts"] == 1 else ("--" if r.get("compressor") != "retaining_heads" else ":")
        s = series.setdefault(
            lab, ([], [], {"color": color(r["strategy"]), "linestyle": ls, "marker": marks.get(r["hosts"], "x")})
        )
        s[0].append(r["doc_len"])
        s[1].append(y)
    for r in sorted((r for r in rows if "vs_projected" in r), key=lambda r: r["doc_len"]):
        rep = find(rows, r["strategy"], r["doc_len"], r["hosts"], r.get("compressor"))
        if rep is None:
            continue
        s = series.setdefault(
            f"{label(r['strategy'], r.get('compressor'))} H={r['hosts']} (measured on {r['hosts']} devices)",
            ([], [], {"color": color(r["strategy"]), "linestyle": "none", "marker": "*", "markersize": 12}),
        )
        s[0].append(r["doc_len"])  # the real run's measured/projected ratio applied at the model depth
        s[1].append(rep["projected"]["prefill_s"] * r["vs_projected"]["measured_over_projected"])
    loglog_plot(
        series,
        path,
        f"Prefill (doc + query -> first token) on {device_name}\n"
        "projected = busiest host replayed on one device + modelled communication; * = real mesh run",
    )


# ----------------------------------------------------------------------------------------------- main


def main(argv=None, targets: Callable | None = None, prog: str = "apb-jax bench") -> int:
    """Run the benchmark.  `targets(rows, gemm_rate) -> dict`, when given, is stored as the JSON's "targets" (a
    project's own goals; reported, never asserted)."""
    args = parse_args(argv, prog)
    if args.from_json:
        return replot(args, targets)
    if args.smoke:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    t_start = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm.auto import tqdm

    from apb_jax.bench import common

    info = common.device_info()
    out_path = common.output_path(args.out, args.out_dir, f"prefill_{common.slug(info['name'])}_{common.today()}.json")
    png_path = out_path.with_suffix(".png")
    cfg_model = model_config(args.model)
    layers_run = min(args.layers or cfg_model.num_layers, cfg_model.num_layers)
    backend = None if args.kernel_backend == "auto" else args.kernel_backend
    on_gpu = jax.default_backend() == "gpu"

    # the two ceilings this machine has: matmul rate and collective bandwidth
    dt = jnp.dtype(args.dtype)
    m = 8192 if on_gpu else 256
    a = jax.random.normal(jax.random.PRNGKey(1), (m, cfg_model.hidden_size), dt)
    b = jax.random.normal(jax.random.PRNGKey(2), (cfg_model.hidden_size, cfg_model.intermediate_size), dt)
    t_mm, _, _ = common.timed(jax.jit(lambda x, y: x @ y), a, b, warmup=2, repeats=10)
    gemm_rate = 2.0 * m * cfg_model.hidden_size * cfg_model.intermediate_size / t_mm
    del a, b
    if jax.device_count() >= 2:
        sizes = [16 * common.MB, 128 * common.MB, 512 * common.MB] if on_gpu else [64 * K, 2 * common.MB]
        bw = common.measure_bandwidth(jax.devices(), sizes)
    else:
        bw = common.spec_bandwidth_model()

    doc = {
        "benchmark": "prefill",
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
        "kernel_backend": backend or "auto",
        "gemm_rate_tflops": gemm_rate / 1e12,
        "comm_model": bw.describe(),
        "status": "running",
        "rows": [],
        "notes": [
            "All sequence-parallel times are PROJECTED: the busiest host's exact per-host program replayed on one "
            "device (apb_jax.replay) + modelled communication, no overlap assumed.",
            "model_depth = measured x layers_model / layers_run (every layer does the same work).",
            "Attention runs through the pallas_kernels dispatcher with the backend named above ('auto': its choice).",
        ],
    }

    def save():
        add_comparisons(doc["rows"])
        breakdown(doc["rows"], gemm_rate)
        if targets is not None:
            doc["targets"] = targets(doc["rows"], gemm_rate)
        doc["elapsed_s"] = time.perf_counter() - t_start
        common.write_json(out_path, doc)

    rate_guess = (0.45 if on_gpu else 0.3) * gemm_rate
    grid = build_grid(args, cfg_model, layers_run, rate_guess, 0.8 if on_gpu else 0.3)
    print(
        f"{info['name']} x{info['count']}, jax {jax.__version__}, attention backend {backend or 'auto'}, matmul "
        f"{gemm_rate / 1e12:.3g} TFLOP/s; {len(grid)} points, {layers_run}/{cfg_model.num_layers} layers; comm: "
        f"{bw.source}",
        flush=True,
    )
    save()
    rng = np.random.default_rng(args.seed)
    heads = None
    model, model_layers = None, None
    bar = tqdm(grid, desc="prefill grid", file=sys.stdout)
    for pt in bar:
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
                model = random_model(dataclasses.replace(cfg_model, num_layers=n), args.dtype, args.seed)
                model_layers = n
            if pt.compressor == "retaining_heads" and heads is None:
                heads = random_heads(model.config, dt, args.seed + 1)
            row = run_point(pt, model, heads, args, cfg_model, bw, backend, rng)
            row["depth_check"] = pt.layers is not None
            row["priority"] = pt.prio
            doc["rows"].append(row)
            # the real mesh run, where there are devices for it (the baseline's is its single-device run above; in
            # the smoke only the first compressor, to stay inside CI's minute)
            want_real = args.real == "yes" or (args.real == "auto" and jax.device_count() >= pt.hosts)
            if args.smoke and pt.compressor not in (None, args.compressors[0]):
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
        return check_json(out_path, args)
    return 0


def replot(args, targets=None) -> int:
    from apb_jax.bench import common

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
    if targets is not None:
        d["targets"] = targets(d["rows"], gemm)
    out = common.output_path(args.out, None, paths[0].name) if args.out else paths[0]
    common.write_json(out, d)
    plot(d["rows"], out.with_suffix(".png"), d["device"]["name"])
    print_table(d["rows"])
    return 0


def _is_oom(msg: str) -> bool:
    return "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()


def check_json(path, args) -> int:
    """The smoke check: the file is valid JSON with every requested strategy measured, replayed and (mesh) real."""
    import json

    from apb_jax import strategies
    from apb_jax.bench import common

    d = json.loads(Path(path).read_text())
    rows = d["rows"]
    errors = [r for r in rows if r.get("error")]
    sp = [s for s in args.strategies if not strategies.get(s).single_device]
    need = {(s, "replay of the busiest host") for s in sp}
    need |= {(s, "single device") for s in args.strategies if strategies.get(s).single_device}
    have = {(r["strategy"], r.get("mode")) for r in rows if "model_depth" in r}
    real = {r["strategy"] for r in rows if r.get("mode", "").startswith("real")}
    problems = []
    if errors:
        problems.append(f"{len(errors)} grid point(s) failed: {[r['error'][:200] for r in errors]}")
    if not need <= have:
        problems.append(f"missing measurements: {sorted(need - have)}")
    if args.real != "no" and not set(sp) <= real:
        problems.append(f"missing real mesh runs: {sorted(set(sp) - real)}")
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
