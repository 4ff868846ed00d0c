"""`apb-jax demo`: a passkey hidden in a long document, answered with full attention on one device and with APB
over several (fake CPU) devices; prints the question, both answers, the truth and the timings.  The default document
is 16K tokens: on a 2-core CPU the whole run (load, compiles, both prefills and decodes) takes about 35 s the first
time and about 25 s once the compiled programs are in the disk cache (the CLI keeps them in ~/.cache/apb-jax), the
attention going through the blocked plain-XLA path (`pallas_kernels.xla_blocked`), the CPU default.

The embedded default model lives in `apb_jax/assets/retriever/` when it has been trained and shipped (a small
Llama trained on the synthetic tasks).  Until then the demo falls back to a tiny random Llama over the same
tokenizer and says so: its answers are noise, but the run shows the whole pipeline working end to end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

ASSET = Path(__file__).parent / "assets" / "retriever"


def default_model(dtype: str = "float32"):
    """(model, trained?) — the shipped retriever if its weights exist, else a seeded tiny random Llama."""
    from apb_jax.config import ModelConfig, RopeConfig
    from apb_jax.model import Model

    if (ASSET / "config.json").is_file() and any(ASSET.glob("*.safetensors")):
        from apb_jax.loading import load

        return load(ASSET, dtype=dtype), True
    from apb_jax.tokenizer import VOCAB

    cfg = ModelConfig(
        model_type="llama",
        vocab_size=len(VOCAB),
        hidden_size=256,
        intermediate_size=768,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        head_dim=32,
        rope=RopeConfig(theta=1e6),
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2,),
        pad_token_id=0,
        dtype="float32",
    )
    return Model.random(cfg, dtype=dtype, seed=0), False


def run_demo(
    length: int = 16384, devices: int = 4, seed: int = 0, as_json: bool = False, dtype: str = "float32"
) -> int:
    import jax

    from apb_jax import strategies
    from apb_jax.engine import Engine
    from apb_jax.tasks import passkey, score
    from apb_jax.tokenizer import ids_to_text

    if jax.device_count() < devices:
        raise ValueError(
            f"devices={devices} but only {jax.device_count()} JAX devices exist; run "
            f"`apb-jax demo` from a fresh process (it asks XLA for {devices} CPU devices)"
        )
    t_start = time.perf_counter()
    model, trained = default_model(dtype)
    ex = passkey(np.random.default_rng(seed), length, depth=0.5)
    n_new = len(ex.answer)
    results = {}
    full, apb = strategies.full.NAME, strategies.apb.NAME
    for name, engine in ((full, Engine(model, full)), (apb, Engine(model, apb, devices=devices))):
        out = engine.generate(ex.document, ex.query, max_new_tokens=n_new)
        results[name] = {
            "answer": ids_to_text(out.tokens),
            "correct": bool(score(out.tokens, ex.answer)),
            "hosts": engine.hosts,
            "prefill_seconds": round(out.prefill_seconds, 3),
            "decode_seconds": round(out.decode_seconds, 3),
            "compile_seconds": round(out.compile_seconds, 2),
            "anchor_len": out.layout.anchor,
            "passing_len": out.layout.passing,
            "block_len": out.layout.block,
        }
    record = {
        "model": "retriever (trained)" if trained else "tiny random Llama (untrained stand-in)",
        "devices": [str(d) for d in jax.devices()[:devices]],
        "document_tokens": len(ex.document),
        "question": ex.query_text,
        "truth": ex.answer_text,
        **results,
        "same_answer": results[full]["answer"] == results[apb]["answer"],
        "dtype": str(model.dtype),
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    }
    if as_json:
        print(json.dumps(record))
        return 0
    print(f"model     : {record['model']}")
    print(f"document  : {record['document_tokens']} tokens, a passkey hidden at depth 0.5")
    print(f"question  : {record['question']}")
    print(f"truth     : {record['truth']}")
    for name in (full, apb):
        r = results[name]
        extra = f", A={r['anchor_len']} P={r['passing_len']} B={r['block_len']}" if name == apb else ""
        print(
            f"{name:<5} ({r['hosts']} host{'s' if r['hosts'] > 1 else ''}{extra}): {r['answer']!r} "
            f"[{'correct' if r['correct'] else 'wrong'}]  prefill {r['prefill_seconds']:.2f}s, "
            f"decode {r['decode_seconds']:.2f}s, compile {r['compile_seconds']:.1f}s"
        )
    print(
        f"wall      : {record['wall_seconds']:.1f}s for both runs ({record['dtype']}, model load and compiles included)"
    )
    if not trained:
        print(
            "note      : no trained model is shipped yet, so both answers come from random weights; what the "
            "demo shows is the pipeline (split, compression, all_gather, merge) running on "
            f"{devices} devices"
        )
    return 0
