"""The `apb-jax` command line end to end: convert a tiny HF checkpoint, then generate with full and APB."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from apb_jax import strategies
from apb_jax.cli import main
from tests.hf_fixtures import VOCAB, make_tiny_llama

WORDS = [f"w{i}" for i in range(VOCAB - 4)]


def _write_tokenizer(model_dir: Path) -> None:
    """A word-level tokenizer whose ids fit the tiny model's vocab (ids 0-3 are specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    src = make_tiny_llama(tmp, seed=3)
    _write_tokenizer(src)
    dst = tmp / "converted"
    assert main(["convert", str(src), str(dst)]) == 0
    assert (dst / "params").is_dir() and (dst / "config.json").is_file() and (dst / "tokenizer.json").is_file()
    rng = np.random.default_rng(0)
    ctx = tmp / "context.txt"
    ctx.write_text(" ".join(rng.choice(WORDS, 90)))
    return dst, ctx


def _generate(capsys, model_dir, ctx, *extra):
    rc = main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--context-file",
            str(ctx),
            "--question",
            "w5 w6 w7",
            "--max-new-tokens",
            "5",
            "--json",
            *extra,
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    return json.loads(captured.out.strip().splitlines()[-1])


def test_generate_full_ring_and_apb(converted, capsys):
    model_dir, ctx = converted
    full = _generate(capsys, model_dir, ctx)
    ring = _generate(capsys, model_dir, ctx, "--strategy", "ring", "--devices", "4")
    apb = _generate(capsys, model_dir, ctx, "--strategy", "apb", "--devices", "4", "--q-insert", "2")
    exact = _generate(
        capsys, model_dir, ctx, "--strategy", "apb", "--devices", "2", "--anchor-len", "0", "--passing-len", "45"
    )
    assert full["doc_tokens"] == 90 and full["query_tokens"] == 3  # this tokenizer adds no BOS
    assert len(full["tokens"]) == 5 and full["prefill_seconds"] > 0
    assert ring["tokens"] == full["tokens"] and exact["tokens"] == full["tokens"]
    assert apb["hosts"] == 4 and apb["anchor_len"] == 6 and apb["passing_len"] == 2 and len(apb["tokens"]) == 5


def test_generate_bad_options_are_clear(converted, capsys):
    model_dir, ctx = converted
    rc = main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--context-file",
            str(ctx),
            "--question",
            "w1",
            "--strategy",
            "apb",
            "--devices",
            "4",
            "--passing-len",
            "999",
        ]
    )
    assert rc == 2
    assert "passing_len=999 must be in [0, 23]" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir / "nope"), "--context-file", str(ctx), "--question", "w1"]) == 2
    assert "nope" in capsys.readouterr().err


def test_demo_runs_as_a_fresh_process():
    """`apb-jax demo` in its own process, at its default ~16K tokens: it asks XLA for 4 CPU devices, prints both
    answers as JSON; the shipped retriever gets the passkey right with full attention and with APB."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "apb_jax.cli", "demo", "--json"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["document_tokens"] == 16384 and len(rec["devices"]) == 4 and rec["dtype"] == "float32"
    assert rec["apb"]["hosts"] == 4 and rec["full"]["hosts"] == 1
    assert (rec["apb"]["anchor_len"], rec["apb"]["passing_len"], rec["apb"]["block_len"]) == (512, 256, 4096)
    assert rec["truth"].endswith("</s>") and rec["full"]["answer"] and rec["apb"]["answer"]
    assert rec["full"]["correct"] and rec["apb"]["correct"], rec
    assert rec["wall_seconds"] > 0 and "retriever" in rec["model"]


@pytest.mark.parametrize("strategy", [n for n, s in strategies.REGISTRY.items() if s.exact and not s.single_device])
def test_every_exact_strategy_through_the_cli(converted, capsys, strategy):
    """`--strategy S --devices 4` on a 90-token context (block 23: no split is even) answers as full does."""
    model_dir, ctx = converted
    full = _generate(capsys, model_dir, ctx)
    got = _generate(capsys, model_dir, ctx, "--strategy", strategy, "--devices", "4")
    assert got["strategy"] == strategy and got["hosts"] == 4
    assert got["tokens"] == full["tokens"]
