"""One process of a multi-process test run (started by tests/test_distributed.py through apb_jax.launch).

Joins the run (`apb_jax.distributed.initialize`, settings from the launcher's APB_JAX_* variables unless flags
override them), builds the same tiny random model and prompt as every other process, generates with each
strategy over a mesh of --devices global devices, and writes this process's tokens to OUT/tokens_<process>.json.

    python tests/mp_worker.py --out DIR [--strategies apb,ring] [--devices N] [--num-processes N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIG = dict(
    model_type="llama",
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    eos_token_ids=(),
)
DOC_LEN, Q_LEN, NEW_TOKENS, Q_INSERT = 90, 6, 8, 2


def build(seed: int = 0):
    """The tiny model and prompt, identical in every process (deterministic from `seed`)."""
    import numpy as np

    from apb_jax import Model, ModelConfig

    model = Model.random(ModelConfig(**CONFIG), dtype="float32", seed=seed)
    rng = np.random.default_rng(seed + 1)
    doc = rng.integers(0, CONFIG["vocab_size"], DOC_LEN)
    query = rng.integers(0, CONFIG["vocab_size"], Q_LEN)
    return model, doc, query


def run_strategies(strategies, devices: int | None, seed: int = 0) -> dict:
    """{strategy: {"tokens": [...], "first_logits": [...], "doc_logits_sum": float}} on the current JAX runtime."""
    import numpy as np

    from apb_jax import Engine

    model, doc, query = build(seed)
    results = {}
    for s in strategies:
        engine = Engine(model, strategy=s, devices=devices, q_insert=Q_INSERT)
        out = engine.generate(doc, query, max_new_tokens=NEW_TOKENS)
        pre = engine.prefill(doc, query, doc_logits=True)
        results[s] = {
            "tokens": [int(t) for t in out.tokens],
            "first_logits": np.asarray(out.first_logits, np.float64).ravel().tolist(),
            "doc_logits": np.asarray(pre.doc_logits, np.float64).ravel().tolist(),
        }
        if s == "apb":  # sampling: every process draws with the same key, so all agree
            sampled = engine.generate(doc, query, max_new_tokens=NEW_TOKENS, temperature=0.8, top_p=0.9, seed=3)
            results[s]["sampled"] = [int(t) for t in sampled.tokens]
    return results


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--strategies", default="apb,ring")
    ap.add_argument("--devices", type=int, default=None, help="mesh size (default: every global device)")
    ap.add_argument("--num-processes", type=int, default=None, help="override the launcher's process count")
    ap.add_argument(
        "--probe-devices", default=None, help="comma list of mesh sizes expected not to fit: print each error, exit 3"
    )
    args = ap.parse_args()

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    from apb_jax import distributed

    distributed.initialize(num_processes=args.num_processes)
    print(distributed.describe(), flush=True)
    if args.probe_devices:
        from apb_jax import make_mesh

        for n in (int(x) for x in args.probe_devices.split(",")):
            try:
                make_mesh(n)
            except ValueError as e:
                print(f"DEVICES-ERROR {n}: {e}", flush=True)
            else:
                print(f"DEVICES-OK {n}", flush=True)
        return 3
    t0 = time.perf_counter()
    results = run_strategies(args.strategies.split(","), args.devices)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"tokens_{jax.process_index()}.json").write_text(json.dumps(results))
    if distributed.is_main_process():
        print(
            f"done in {time.perf_counter() - t0:.1f} s: " + ", ".join(f"{s} {r['tokens']}" for s, r in results.items()),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
