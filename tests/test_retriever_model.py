"""The shipped retriever (apb_jax/assets/retriever): it loads through apb_jax.load and transformers alike, and it
answers fixed sets of short passkey, multikey and variable-tracking examples with full attention and with APB on the
4 fake CPU devices (both compressors, its own retaining heads included)."""

import json

import numpy as np
import pytest

from apb_jax.demo import ASSET

pytestmark = pytest.mark.skipif(not (ASSET / "model.safetensors").is_file(), reason="retriever not shipped")
HEADS = ASSET / "retaining_heads.safetensors"


@pytest.fixture(scope="module")
def model():
    import apb_jax

    return apb_jax.load(ASSET, dtype="float32")


def test_shipped_files_are_a_small_hf_llama():
    cfg = json.loads((ASSET / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["vocab_size"] == 512
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
    size = sum(p.stat().st_size for p in ASSET.iterdir() if p.is_file())
    assert size <= 20 * 2**20, f"assets are {size / 2**20:.1f} MiB; the issue allows 20"
    assert HEADS.is_file()


def test_transformers_reads_the_same_model(model):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(ASSET), dtype=torch.float32)
    ids = np.random.default_rng(0).integers(0, 512, (1, 48))
    with torch.no_grad():
        theirs = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.logits(ids)), theirs, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "strategy, kw",
    [
        ("full", {}),
        ("apb", {"devices": 4}),
        ("apb", {"devices": 4, "compressor": "retaining_heads", "retaining_heads": str(HEADS)}),
    ],
    ids=["full", "apb-query-aware", "apb-retaining-heads"],
)
@pytest.mark.parametrize("task", ["passkey", "multikey_niah", "variable_tracking"])
def test_answers_short_examples(model, strategy, kw, task):
    from apb_jax.engine import Engine
    from apb_jax.tasks import make_examples, score
    from apb_jax.tokenizer import ids_to_text

    exs = make_examples(task, 7, 6, 1024)
    eng = Engine(model, strategy, **kw)
    out = eng.generate(
        np.stack([e.document for e in exs]), np.stack([e.query for e in exs]), max_new_tokens=len(exs[0].answer)
    )
    got = [ids_to_text(t) for t in out.tokens]
    want = [e.answer_text for e in exs]
    assert all(score(t, e.answer) for t, e in zip(out.tokens, exs)), list(zip(got, want))
