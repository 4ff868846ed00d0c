"""The engine's driver: decoding on the device (no host round trip per token), batches of different lengths,
text in / text out through a chat template, the position limit, and the kept-positions look at APB's compressor
(4 fake CPU devices, tiny random models, float32)."""

import math

import jax
import numpy as np
import pytest

from apb_jax import Engine, Model, ModelConfig
from apb_jax.prompting import render
from tests.tokenizer_fixtures import build_bpe_tokenizer, load, tiny_config, write_model_dir

CFG = ModelConfig(
    model_type="llama",
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    eos_token_ids=(),
    max_position_embeddings=512,
)


@pytest.fixture(scope="module")
def model():
    return Model.random(CFG, dtype="float32", seed=7)


def _prompts(lengths, q_lengths, seed=0):
    rng = np.random.default_rng(seed)
    return ([rng.integers(0, 97, n) for n in lengths], [rng.integers(0, 97, n) for n in q_lengths])


def test_decode_runs_on_the_device_without_a_transfer_per_token(model):
    """Implicit device->host transfers are forbidden around generate: only the explicit ones at the end (tokens,
    first logits) may happen; and 12 tokens take one compiled decode program, not one per token."""
    docs, queries = _prompts([50], [4])
    eng = Engine(model, "ring", devices=4)
    with jax.transfer_guard_device_to_host("disallow"):
        out = eng.generate(docs[0], queries[0], max_new_tokens=12)
    assert len(out.tokens) == 12
    decode = [k for k in eng._compiled if k[0] == "decode"]
    assert len(decode) == 1
    eng.generate(docs[0], queries[0], max_new_tokens=12)
    assert [k for k in eng._compiled if k[0] == "decode"] == decode  # reused, nothing recompiled


def test_stop_tokens_end_each_row_and_sampling_is_seeded(model):
    docs, queries = _prompts([40, 40], [3, 3], seed=1)
    eng = Engine(model, "full")
    greedy = eng.generate(np.stack(docs), np.stack(queries), max_new_tokens=10)
    stop = greedy.tokens[0][2]
    cut = eng.generate(np.stack(docs), np.stack(queries), max_new_tokens=10, stop_tokens=[stop])
    assert cut.tokens[0] == greedy.tokens[0][: greedy.tokens[0].index(stop) + 1]
    r = greedy.tokens[1]
    assert cut.tokens[1] == (r[: r.index(stop) + 1] if stop in r else r)
    a = eng.generate(docs[0], queries[0], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = eng.generate(docs[0], queries[0], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    c = eng.generate(docs[0], queries[0], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=4)
    assert a.tokens == b.tokens and len(a.tokens) == 8 and a.tokens != c.tokens


RAGGED = ([61, 37, 117], [5, 3, 4])
_SOLO: dict = {}


@pytest.mark.parametrize(
    "strategy, kw",
    [("full", {}), ("ring", dict(devices=4)), ("apb", dict(devices=4, anchor_len=0, passing_len="block"))],
)
def test_a_batch_of_different_lengths_gives_each_row_its_solo_output(model, strategy, kw):
    """Three documents (61, 37, 117 tokens; queries 5, 3, 4) in one call: each row's greedy tokens and first logits
    are what the row gives alone with full attention (these strategies are exact), and its first logits are
    `Model.logits`' last row."""
    docs, queries = _prompts(*RAGGED, seed=2)
    out = Engine(model, strategy, **kw).generate(docs, queries, max_new_tokens=6)
    assert len(out.tokens) == 3
    for i, (d, q) in enumerate(zip(docs, queries)):
        if i not in _SOLO:
            _SOLO[i] = Engine(model, "full").generate(d, q, max_new_tokens=6)
        assert out.tokens[i] == _SOLO[i].tokens
        np.testing.assert_allclose(out.first_logits[i], _SOLO[i].first_logits[0], atol=2e-5, rtol=1e-5)
        ref = np.asarray(model.logits(np.concatenate([d, q])[None]))[0, -1]
        np.testing.assert_allclose(out.first_logits[i], ref, atol=2e-5, rtol=1e-5)


def test_the_position_limit_names_both_numbers(model):
    docs, queries = _prompts([500], [8])
    with pytest.raises(
        ValueError,
        match=r"500 \+ query 8\) \+ 16 to generate = 524, past the model's "
        r"max_position_embeddings 512",
    ):
        Engine(model, "full").generate(docs[0], queries[0], max_new_tokens=16)
    out = Engine(model, "full", allow_longer=True).generate(docs[0], queries[0], max_new_tokens=16)
    assert len(out.tokens) == 16


def test_kept_positions_are_eligible_document_positions(model):
    docs, queries = _prompts([120], [4], seed=5)
    eng = Engine(model, "apb", devices=4, q_insert=2, passing_len=6)
    kept = eng.kept_positions(docs[0], queries[0])
    lay = kept["layout"]
    pos = kept["positions"]
    assert pos.shape == (4, CFG.num_layers, 1, CFG.num_kv_heads, lay.passing)
    for h in range(4):
        block = lay.block_positions()[h]
        valid = pos[h][pos[h] >= 0]
        assert np.isin(valid, block).all() and (valid >= lay.anchor).all() and (valid < lay.doc_len).all()
        assert (pos[h] >= 0).sum() == CFG.num_layers * CFG.num_kv_heads * min(lay.passing, lay.eligible_count(h))
    assert Engine(model, "ring", devices=4).kept_positions(docs[0], queries[0]) == {}


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    tok_dir = build_bpe_tokenizer(tmp_path_factory.mktemp("tok"), "llama3")
    tok = load(tok_dir)
    return write_model_dir(tmp_path_factory.mktemp("m") / "model", tok_dir, tiny_config(tok, layers=2)), tok


def test_generate_text_feeds_the_chat_template_and_stops_at_end_of_turn(chat_model_dir):
    import apb_jax

    path, tok = chat_model_dir
    model = apb_jax.load(path)
    context = "The harbor light was green on Tuesday. " * 30 + "The code word is lantern. " + "Birds sang. " * 20
    question = "What is the code word?"
    eng = Engine(model, "apb", devices=4)
    ans = eng.generate_text(context, question, max_new_tokens=8)
    messages = [{"role": "user", "content": f"{context}\n\n{question}"}]
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert list(ans.prompt.doc_ids) + list(ans.prompt.query_ids) == list(want)
    assert ans.prompt.chat_template and tok.convert_tokens_to_ids("<|eot_id|>") in ans.prompt.stop_token_ids
    same = eng.generate(ans.prompt.doc_ids, ans.prompt.query_ids, 8, stop_tokens=ans.prompt.stop_token_ids)
    assert ans.tokens == same.tokens and ans.text == tok.decode(same.tokens, skip_special_tokens=True)
    raw = eng.generate_text(context, question, max_new_tokens=4, chat_template=False)
    assert not raw.prompt.chat_template and "<|start_header_id|>" not in raw.prompt.text
    both = eng.generate_text([context, context[:400]], [question, "Which light?"], max_new_tokens=4)
    assert len(both.text) == 2 and isinstance(both.text[0], str)
    with pytest.raises(ValueError, match="max positions"):
        render(tok, context * 40, question, max_positions=model.config.max_position_embeddings)
    assert math.isfinite(ans.output.prefill_seconds)
