"""`apb-jax` command line: convert, generate, demo, bench, launch.

jax is imported only after the arguments are read, so `--cpu-devices N` can still ask XLA for N fake CPU devices.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    from apb_jax import strategies

    p.add_argument(
        "--strategy",
        default=strategies.DEFAULT,
        choices=strategies.names(),
        help="; ".join(f"{n}: {s.summary}" for n, s in strategies.REGISTRY.items()),
    )
    p.add_argument(
        "--devices", type=int, default=None, help="hosts on mesh axis 'sp' (default: 1 for full, all for others)"
    )
    p.add_argument(
        "--anchor-len", type=int, default=None, help="APB/Star anchor length A (default: L/32 for APB, B for Star)"
    )
    p.add_argument("--passing-len", type=int, default=None, help="APB passing length P per host (default: L/64)")
    p.add_argument("--compressor", default=None, choices=["query_aware", "retaining_heads"])
    p.add_argument("--retaining-heads", default=None, help="retaining-heads checkpoint (.safetensors/.bin/.pt)")
    p.add_argument("--q-insert", type=int, default=16, help="document tokens before the query inside the anchor")
    p.add_argument(
        "--mode",
        default="mesh",
        choices=["mesh", "vmap"],
        help="mesh: one host per device; vmap: emulate the hosts on one device",
    )
    p.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="run on the CPU with this many fake devices (sets XLA_FLAGS before jax starts)",
    )
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    from apb_jax.distributed import add_arguments

    add_arguments(p)  # --coordinator/--num-processes/--process-id/--local-device-count/--init-timeout


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apb-jax", description="APB long-context prefill in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="HF checkpoint directory -> orbax checkpoint + config + tokenizer")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    c.add_argument("--overwrite", action="store_true")

    g = sub.add_parser("generate", help="answer a question about a long context file")
    g.add_argument("--model", required=True, help="HF or converted model directory")
    g.add_argument("--context-file", required=True)
    g.add_argument("--question", required=True)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _add_engine_args(g)

    d = sub.add_parser("demo", help="passkey retrieval on the embedded default model: full vs APB on 4 CPU devices")
    d.add_argument("--length", type=int, default=16384, help="document length in tokens")
    d.add_argument("--devices", type=int, default=4)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype")
    d.add_argument("--json", action="store_true")

    b = sub.add_parser(
        "bench", add_help=False, help="prefill benchmark of every strategy (apb-jax bench --help lists its options)"
    )
    b.add_argument("args", nargs=argparse.REMAINDER)

    la = sub.add_parser("launch", help="spawn N local processes (CPU, gloo) running an apb-jax command")
    la.add_argument("--processes", type=int, default=2)
    la.add_argument("--devices-per-process", type=int, default=2)
    la.add_argument("--timeout", type=float, default=600.0)
    la.add_argument("rest", nargs=argparse.REMAINDER, help="-- then the apb-jax command to run, e.g. -- generate ...")
    return parser


def _set_cpu_devices(n: int | None) -> None:
    """Ask for `n` fake CPU devices; works until the first jax computation starts a backend."""
    if n is None:
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    if "jax" in sys.modules:
        import jax
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            if jax.default_backend() == "cpu" and jax.device_count() >= n:
                return  # already there (e.g. called from a process that set them up itself)
            raise RuntimeError(
                f"--cpu-devices/--devices {n}: jax has already started with {jax.device_count()} "
                f"{jax.default_backend()} device(s); run the command in a fresh process"
            )
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)


def _maybe_distributed(args) -> None:
    """Join a multi-process run when flags, `apb-jax launch` or a cluster (SLURM, Open MPI, Kubernetes) say so;
    a single process otherwise."""
    from apb_jax import distributed

    distributed.initialize_from_args(args)


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


def cmd_convert(args) -> int:
    from apb_jax.checkpoint import convert

    convert(args.src, args.dst, dtype=args.dtype, progress=True, overwrite=args.overwrite)
    return 0


def cmd_generate(args) -> int:
    _set_cpu_devices(args.cpu_devices)
    _maybe_distributed(args)
    import apb_jax

    model = apb_jax.load(args.model, dtype=args.dtype)
    tok = model.tokenizer()
    with open(args.context_file, encoding="utf-8") as f:
        context = f.read()
    doc_ids = tok(context, add_special_tokens=True)["input_ids"]
    query_ids = tok(args.question, add_special_tokens=False)["input_ids"]
    engine = apb_jax.Engine(
        model,
        strategy=args.strategy,
        devices=args.devices,
        anchor_len=args.anchor_len,
        passing_len=args.passing_len,
        compressor=args.compressor,
        retaining_heads=args.retaining_heads,
        q_insert=args.q_insert,
        mode=args.mode,
    )
    out = engine.generate(
        doc_ids,
        query_ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    text = tok.decode(out.tokens, skip_special_tokens=True)
    if not _is_main():
        return 0
    record = {
        "answer": text,
        "tokens": out.tokens,
        "strategy": args.strategy,
        "hosts": engine.hosts,
        "doc_tokens": len(doc_ids),
        "query_tokens": len(query_ids),
        "anchor_len": out.layout.anchor,
        "passing_len": out.layout.passing,
        "block_len": out.layout.block,
        "prefill_seconds": out.prefill_seconds,
        "decode_seconds": out.decode_seconds,
        "compile_seconds": out.compile_seconds,
    }
    if args.json:
        print(json.dumps(record))
    else:
        print(text)
        print(
            f"[{args.strategy} on {engine.hosts} host(s): {len(doc_ids)} context tokens, prefill "
            f"{out.prefill_seconds:.3f}s, decode {out.decode_seconds:.3f}s, compile {out.compile_seconds:.1f}s]",
            file=sys.stderr,
        )
    return 0


def cmd_demo(args) -> int:
    _set_cpu_devices(args.devices)
    from apb_jax.demo import run_demo

    return run_demo(length=args.length, devices=args.devices, seed=args.seed, as_json=args.json, dtype=args.dtype)


def cmd_bench(args) -> int:
    from apb_jax.bench.prefill import main as bench_main

    return bench_main(args.args) or 0


def cmd_launch(args) -> int:
    from apb_jax import launch

    rest = args.rest[1:] if args.rest and args.rest[0] == "--" else args.rest
    if not rest:
        print("apb-jax launch: give the command after --, e.g. apb-jax launch -- generate --model ...", file=sys.stderr)
        return 2
    return launch.launch(
        rest, processes=args.processes, devices_per_process=args.devices_per_process, timeout_s=args.timeout
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":  # every option after `bench` is the benchmark's own (argparse would eat them)
        argv = [argv[0], *(["--"] if len(argv) > 1 and argv[1] != "--" else []), *argv[1:]]
    args = build_parser().parse_args(argv)
    if args.command == "bench" and args.args[:1] == ["--"]:
        args.args = args.args[1:]
    try:
        rc = {
            "convert": cmd_convert,
            "generate": cmd_generate,
            "demo": cmd_demo,
            "bench": cmd_bench,
            "launch": cmd_launch,
        }[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"apb-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
