"""The `apb-jax` command line end to end: convert a tiny HF checkpoint, then generate with full and APB."""

import json
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


def test_generate_full_and_apb(converted, capsys):
    model_dir, ctx = converted
    full = _generate(capsys, model_dir, ctx)
    apb = _generate(capsys, model_dir, ctx, "--strategy", "apb", "--devices", "4", "--q-insert", "2")
    exact = _generate(
        capsys, model_dir, ctx, "--strategy", "apb", "--devices", "2", "--anchor-len", "0", "--passing-len", "45"
    )
    assert full["doc_tokens"] == 90 and full["query_tokens"] == 3  # this tokenizer adds no BOS
    assert len(full["tokens"]) == 5 and full["prefill_seconds"] > 0
    assert exact["tokens"] == full["tokens"]  # ring and the other exact ones: test_every_exact_strategy_through_the_cli
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


@pytest.mark.parametrize("strategy", [n for n, s in strategies.REGISTRY.items() if s.exact and not s.single_device])
def test_every_exact_strategy_through_the_cli(converted, capsys, strategy):
    """`--strategy S --devices 4` on a 90-token context (block 23: no split is even) answers as full does."""
    model_dir, ctx = converted
    full = _generate(capsys, model_dir, ctx)
    got = _generate(capsys, model_dir, ctx, "--strategy", strategy, "--devices", "4")
    assert got["strategy"] == strategy and got["hosts"] == 4
    assert got["tokens"] == full["tokens"]


# ------------------------------------------------------------------------------------ chat templates (real path)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from tests.tokenizer_fixtures import build_bpe_tokenizer, load, tiny_config, write_model_dir

    tok_dir = build_bpe_tokenizer(tmp_path_factory.mktemp("tok"), "qwen2")
    tok = load(tok_dir)
    path = write_model_dir(tmp_path_factory.mktemp("chat") / "model", tok_dir, tiny_config(tok, layers=1))
    ctx = tmp_path_factory.mktemp("ctx") / "notes.txt"
    ctx.write_text("The lighthouse keeper wrote that the supply boat arrives on Friday. " * 12)
    return path, tok, ctx


def test_generate_feeds_the_chat_template_tokens(chat_model, capsys):
    path, tok, ctx = chat_model
    question = "When does the boat arrive?"
    got = _generate_q(capsys, path, ctx, question, "--strategy", "apb", "--devices", "4")
    messages = [{"role": "user", "content": f"{ctx.read_text()}\n\n{question}"}]
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert got["chat_template"] is True and got["doc_tokens"] + got["query_tokens"] == len(want)
    tail = tok.decode(want[got["doc_tokens"] :])  # the query: the question and everything after it
    assert tail.startswith(question) and tail.endswith("<|im_start|>assistant\n")
    raw = _generate_q(capsys, path, ctx, question, "--no-chat-template")
    assert raw["chat_template"] is False
    assert raw["doc_tokens"] == len(tok(ctx.read_text())["input_ids"])
    assert raw["query_tokens"] == len(tok(question, add_special_tokens=False)["input_ids"])


def _generate_q(capsys, model_dir, ctx, question, *extra):
    rc = main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--context-file",
            str(ctx),
            "--question",
            question,
            "--max-new-tokens",
            "3",
            "--json",
            *extra,
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    return json.loads(captured.out.strip().splitlines()[-1])


# --------------------------------------------------------------------------- what a newcomer gets wrong, and hears


def _error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    return err


def test_bad_files_are_named_before_any_weight_is_loaded(converted, tmp_path, capsys, monkeypatch):
    import apb_jax

    model_dir, ctx = converted
    monkeypatch.setattr(apb_jax, "load", lambda *a, **k: pytest.fail("weights loaded before the inputs were checked"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama",\n')
    err = _error(capsys, ["generate", "--model", str(broken), "--context-file", str(ctx), "--question", "w1"])
    assert str(broken / "config.json") in err and "not valid JSON" in err
    binary = tmp_path / "book.pdf"
    binary.write_bytes(b"%PDF-1.7\x00\xd0\xcf\x11\xe0" * 50)
    err = _error(capsys, ["generate", "--model", str(model_dir), "--context-file", str(binary), "--question", "w1"])
    assert str(binary) in err and "binary" in err
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    err = _error(capsys, ["generate", "--model", str(model_dir), "--context-file", str(latin), "--question", "w1"])
    assert str(latin) in err and "not UTF-8" in err and "0xe9" in err
    err = _error(
        capsys,
        ["generate", "--model", str(model_dir), "--context-file", str(tmp_path / "nope.txt"), "--question", "w1"],
    )
    assert "no such file" in err
    long_ctx = tmp_path / "long.txt"
    long_ctx.write_text(" ".join(["w1"] * 300))
    err = _error(capsys, ["generate", "--model", str(model_dir), "--context-file", str(long_ctx), "--question", "w1"])
    assert "max positions 256" in err and "300" in err
    err = _error(
        capsys,
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
            "8",
        ],
    )
    assert "--devices 8" in err and "only 4 cpu device(s)" in err and "--cpu-devices 8" in err


def test_cli_messages_use_flag_names(converted, tmp_path, capsys):
    model_dir, ctx = converted
    err = _error(capsys, ["convert", str(model_dir), str(model_dir)])
    assert "pick another" in err
    src = model_dir.parent / "llama-llama3-float32"
    again = tmp_path / "again"
    assert main(["convert", str(src), str(again)]) == 0
    capsys.readouterr()
    err = _error(capsys, ["convert", str(src), str(again)])
    assert "--overwrite" in err and "overwrite=True" not in err
    err = _error(
        capsys,
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
            "--compressor",
            "retaining_heads",
        ],
    )
    assert "--retaining-heads" in err and "retaining_heads.safetensors" in err


def test_retaining_heads_beside_the_model_are_found(converted, tmp_path, capsys):
    import shutil

    from apb_jax.config import ModelConfig
    from apb_jax.retaining_heads import HEADS_FILE, random_retaining_heads, save_retaining_heads

    model_dir, ctx = converted
    with_heads = tmp_path / "with_heads"
    shutil.copytree(model_dir, with_heads)
    save_retaining_heads(
        random_retaining_heads(ModelConfig.from_pretrained(with_heads), hidden=16), with_heads / HEADS_FILE
    )
    got = _generate(capsys, with_heads, ctx, "--strategy", "apb", "--devices", "4", "--q-insert", "2")
    assert got["compressor"] == "retaining_heads"
    got = _generate(capsys, model_dir, ctx, "--strategy", "apb", "--devices", "4", "--q-insert", "2")
    assert got["compressor"] == "query_aware"


def test_warnings_for_one_host_and_unknown_words(converted, tmp_path, capsys, caplog):
    model_dir, _ = converted
    english = tmp_path / "english.txt"
    english.write_text("The quick brown fox jumps over the lazy dog near the river bank. " * 4 + "w1 w2 w3")
    got = _generate(capsys, model_dir, english, "--strategy", "apb", "--devices", "1")
    assert got["hosts"] == 1
    assert any("runs on one host" in r.getMessage() for r in caplog.records)
    main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--context-file",
            str(english),
            "--question",
            "w5",
            "--max-new-tokens",
            "2",
        ]
    )
    err = capsys.readouterr().err
    assert "warning:" in err and "unknown token" in err and "%" in err


def test_bench_takes_its_own_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    assert "--lengths" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--strategies", "nope"])
    assert "unknown; allowed" in capsys.readouterr().err


def test_every_compressor_is_offered_by_generate_eval_and_bench(capsys):
    from apb_jax.bench.prefill import COMPRESSOR_TAGS
    from apb_jax.bench.prefill import parse_args as bench_args
    from apb_jax.cli import build_parser
    from apb_jax.config import COMPRESSORS

    assert "random" in COMPRESSORS and set(COMPRESSOR_TAGS) == set(COMPRESSORS)
    parser = build_parser()
    common = ["--model", "m", "--context-file", "c", "--question", "q"]
    for c in COMPRESSORS:
        assert parser.parse_args(["generate", *common, "--compressor", c]).compressor == c
        assert parser.parse_args(["eval", "--model", "m", "--compressors", c]).compressors == c
        assert bench_args(["--compressors", c]).compressors == [c]
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", *common, "--compressor", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    # eval takes a list (one column per compressor) and names what it refuses before loading any model
    assert main(["eval", "--model", "m", "--compressors", f"{COMPRESSORS[0]},nope"]) == 2
    assert f"--compressors: ['nope'] not allowed; allowed: {', '.join(COMPRESSORS)}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_args(["--compressors", "query_aware,nope"])
    assert f"allowed: {','.join(COMPRESSORS)}" in capsys.readouterr().err
