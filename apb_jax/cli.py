"""`apb-jax` command line: convert, generate, eval, demo, bench, launch.

jax's backends start only after the arguments are read and checked, so `--cpu-devices N` can still ask XLA for N
fake CPU devices, and a bad flag or file is reported before any weight is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class UserError(Exception):
    """A mistake in the command's input, reported in one line (no traceback)."""


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    from apb_jax import strategies
    from apb_jax.config import COMPRESSORS

    p.add_argument(
        "--strategy",
        default=strategies.DEFAULT,
        choices=strategies.names(),
        help="; ".join(f"{n}: {s.summary}" for n, s in strategies.REGISTRY.items()),
    )
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="hosts on mesh axis 'sp' (default: 1 for full, every device for the others)",
    )
    p.add_argument(
        "--anchor-len",
        type=int,
        default=None,
        help="APB/Star anchor length A (default: L/32 for APB, the block length for Star)",
    )
    p.add_argument(
        "--passing-len",
        type=_passing_len,
        default=None,
        help="APB passing length P per host (default: L/64; 'block': every key, exact with --anchor-len 0)",
    )
    p.add_argument(
        "--compressor",
        default=None,
        choices=COMPRESSORS,
        help="APB's compressor (default: the retaining heads when the model directory has "
        "retaining_heads.safetensors or --retaining-heads is given, else query_aware; random: P keys drawn "
        "uniformly per block, the ablation)",
    )
    p.add_argument(
        "--retaining-heads",
        default=None,
        help="retaining-heads checkpoint (.safetensors/.bin/.pt; default: <model>/retaining_heads.safetensors)",
    )
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
        help="run on the CPU with this many fake devices (set before jax starts)",
    )
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    from apb_jax.distributed import add_arguments

    add_arguments(p)  # --coordinator/--num-processes/--process-id/--local-device-count/--init-timeout


def _passing_len(text: str):
    if text == "block":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a whole number nor 'block'") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apb-jax", description="APB long-context prefill in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="HF checkpoint directory -> orbax checkpoint + config + tokenizer")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing DST/params")

    g = sub.add_parser("generate", help="answer a question about a long context file")
    g.add_argument("--model", required=True, help="HF or converted model directory")
    g.add_argument("--context-file", required=True, help="a UTF-8 text file")
    g.add_argument("--question", required=True)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    g.add_argument(
        "--no-chat-template", action="store_true", help="feed the raw text even when the tokenizer has a chat template"
    )
    g.add_argument(
        "--prompt-format",
        default=None,
        help="the user turn with {context} and {question} (default: '{context}\\n\\n{question}')",
    )
    g.add_argument("--system-prompt", default=None, help="a system message (default: the template's own)")
    _add_engine_args(g)

    from apb_jax.evaluation.runner import add_eval_arguments

    ev = sub.add_parser(
        "eval", help="RULER / InfiniteBench / the task language: scores over strategies x hosts x lengths"
    )
    add_eval_arguments(ev)

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
    """Ask for `n` fake CPU devices (`apb_jax.use_cpu_devices`), as the flag --cpu-devices."""
    if n is None:
        return
    from apb_jax.parallel import use_cpu_devices

    try:
        use_cpu_devices(n)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--cpu-devices {n}: {e}") from None


def _compile_cache() -> None:
    """Keep compiled programs on disk (~/.cache/apb-jax/xla, or $APB_JAX_CACHE; "off" disables it), so a second run
    of the same command skips most of its compile time.  A cache the caller configured already is left alone."""
    import os

    import jax

    where = os.environ.get("APB_JAX_CACHE", str(Path.home() / ".cache" / "apb-jax" / "xla"))
    if where == "off" or jax.config.jax_compilation_cache_dir:
        return

    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


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

    try:
        convert(args.src, args.dst, dtype=args.dtype, progress=True, overwrite=args.overwrite)
    except FileExistsError as e:
        raise UserError(str(e).replace("pass overwrite=True (--overwrite)", "pass --overwrite")) from None
    return 0


def read_text_file(path: str, flag: str = "--context-file") -> str:
    """The UTF-8 text of `path`, or a UserError naming the file and what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag} {path}: no such file")
    data = p.read_bytes()
    if b"\x00" in data[:65536]:
        raise UserError(f"{flag} {path}: this looks like a binary file (it holds NUL bytes); give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{flag} {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); convert it to UTF-8 first"
        ) from None


def check_devices(strategy: str, devices: int | None, cpu_devices: int | None, mode: str) -> None:
    """Before any weight is loaded: the hosts asked for exist (or say how to get them)."""
    import jax

    from apb_jax import strategies

    if devices is not None and devices < 1:
        raise UserError(f"--devices {devices}: must be >= 1")
    if mode != "mesh" or devices is None or strategies.get(strategy).single_device:
        return
    have = jax.device_count()
    if devices > have:
        hint = (
            f"; on a CPU add --cpu-devices {devices} for fake devices"
            if jax.default_backend() == "cpu" and cpu_devices is None
            else ""
        )
        raise UserError(
            f"--devices {devices}: only {have} {jax.default_backend()} device(s) exist; allowed: "
            f"1..{have}{hint}, or --mode vmap to emulate the hosts on one device"
        )


def unknown_fraction(tok, ids) -> float:
    unk = getattr(tok, "unk_token_id", None)
    if unk is None or len(ids) == 0:
        return 0.0
    return sum(1 for i in ids if i == unk) / len(ids)


def cmd_generate(args) -> int:
    from apb_jax.config import ModelConfig

    _set_cpu_devices(args.cpu_devices)
    context = read_text_file(args.context_file)
    config = ModelConfig.from_pretrained(args.model)  # a bad model directory fails here, before any weight
    _maybe_distributed(args)
    _compile_cache()
    check_devices(args.strategy, args.devices, args.cpu_devices, args.mode)
    from apb_jax.model import load_tokenizer
    from apb_jax.prompting import render

    tok = load_tokenizer(args.model)
    prompt = render(
        tok,
        context,
        args.question,
        chat_template=False if args.no_chat_template else None,
        prompt_format=args.prompt_format,
        system_prompt=args.system_prompt,
        max_positions=config.max_position_embeddings,
        max_new_tokens=args.max_new_tokens,
        extra_stop_token_ids=config.eos_token_ids,
    )
    frac = unknown_fraction(tok, prompt.doc_ids)
    if frac > 0.1:
        print(
            f"warning: {frac:.0%} of the context's tokens are the unknown token {tok.unk_token!r}: this model's "
            "tokenizer does not know most of its words, so answers will be poor (the shipped retriever reads only "
            "its own task language; see the README)",
            file=sys.stderr,
        )
    import apb_jax

    model = apb_jax.load(args.model, dtype=args.dtype)
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
        prompt.doc_ids,
        prompt.query_ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop_tokens=prompt.stop_token_ids,
    )
    text = tok.decode(out.tokens, skip_special_tokens=True)
    if not _is_main():
        return 0
    record = {
        "answer": text,
        "tokens": out.tokens,
        "strategy": args.strategy,
        "hosts": engine.hosts,
        "doc_tokens": len(prompt.doc_ids),
        "query_tokens": len(prompt.query_ids),
        "chat_template": prompt.chat_template,
        "compressor": engine.config.compressor,
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
        comp = f", compressor {engine.config.compressor}" if out.layout.passing else ""
        print(
            f"[{args.strategy} on {engine.hosts} host(s){comp}: {len(prompt.doc_ids)} context tokens"
            f"{' (chat template)' if prompt.chat_template else ''}, prefill {out.prefill_seconds:.3f}s, decode "
            f"{out.decode_seconds:.3f}s, compile {out.compile_seconds:.1f}s]",
            file=sys.stderr,
        )
    return 0


def cmd_eval(args) -> int:
    from apb_jax.evaluation.runner import main_eval

    return main_eval(args)


def cmd_demo(args) -> int:
    _set_cpu_devices(args.devices)
    _compile_cache()
    from apb_jax.demo import run_demo

    return run_demo(length=args.length, devices=args.devices, seed=args.seed, as_json=args.json, dtype=args.dtype)


def cmd_bench(args) -> int:
    from apb_jax.bench.prefill import main as bench_main

    return bench_main(args.args) or 0


def cmd_launch(args) -> int:
    from apb_jax import launch

    rest = args.rest[1:] if args.rest and args.rest[0] == "--" else args.rest
    if not rest:
        raise UserError("give the command after --, e.g. apb-jax launch -- generate --model ...")
    return launch.launch(
        rest, processes=args.processes, devices_per_process=args.devices_per_process, timeout_s=args.timeout
    )


COMMANDS = {
    "convert": cmd_convert,
    "generate": cmd_generate,
    "eval": cmd_eval,
    "demo": cmd_demo,
    "bench": cmd_bench,
    "launch": cmd_launch,
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":  # every option after `bench` is the benchmark's own (argparse would eat them)
        argv = [argv[0], *(["--"] if len(argv) > 1 and argv[1] != "--" else []), *argv[1:]]
    args = build_parser().parse_args(argv)
    if args.command == "bench" and args.args[:1] == ["--"]:
        args.args = args.args[1:]
    try:
        return COMMANDS[args.command](args)
    except (UserError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"apb-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
