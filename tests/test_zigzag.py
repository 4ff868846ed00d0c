"""Zigzag ring attention: the layout (host h holds chunks h and 2H-1-h), exactness against full attention on awkward
lengths (including documents shorter than 2H chunks of one token), and the balanced cost it exists for."""

import numpy as np
import pytest

from apb_jax import Engine, Model, ModelConfig, strategies
from apb_jax.layout import host_rows

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
)


@pytest.fixture(scope="module")
def model():
    return Model.random(CFG, dtype="float32", seed=5)


def test_layout_puts_chunks_h_and_2h_minus_1_minus_h_on_host_h():
    lay = strategies.make_layout("zigzag", 4, 61, 3)  # 8 chunks of 8 tokens: block 16, 3 padding positions
    assert (lay.block, lay.zigzag) == (16, True)
    table = lay.block_positions()
    np.testing.assert_array_equal(table[0], [*range(0, 8), *range(56, 64)])
    np.testing.assert_array_equal(table[3], [*range(24, 32), *range(32, 40)])
    assert sorted(table.reshape(-1)) == list(range(64))
    doc = np.arange(61)[None] + 10
    tokens, positions = host_rows(lay, doc, np.zeros((1, 3), np.int32), pad_id=0)
    np.testing.assert_array_equal(positions[0, :16], table[0])
    np.testing.assert_array_equal(tokens[0, :16], [*range(10, 18), *range(66, 71), 0, 0, 0])  # 61..63: padding
    assert np.asarray(lay.local_positions(0))[-1] == -1


@pytest.mark.parametrize(("doc_len", "hosts"), [(61, 4), (3, 2)])
def test_zigzag_equals_full_on_awkward_lengths(model, doc_len, hosts):
    rng = np.random.default_rng(doc_len)
    doc, q = rng.integers(0, 97, doc_len), rng.integers(0, 97, 4)
    ref = np.asarray(model.logits(np.concatenate([doc, q])[None]))
    eng = Engine(model, "zigzag", devices=hosts)
    pre = eng.prefill(doc, q, doc_logits=True)
    np.testing.assert_allclose(pre.doc_logits, ref[:, :doc_len], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(pre.logits, ref[:, -1], atol=2e-5, rtol=1e-5)
    assert eng.generate(doc, q, max_new_tokens=4).tokens == Engine(model, "full").generate(doc, q, 4).tokens


def test_every_host_does_the_same_work_and_ring_does_not():
    zz = strategies.make_layout("zigzag", 4, 131072, 64)
    ring = strategies.make_layout("ring", 4, 131072, 64)
    z_pairs = [strategies.get("zigzag").attention_pairs(zz, h) for h in range(4)]
    r_pairs = [strategies.get("ring").attention_pairs(ring, h) for h in range(4)]
    assert len(set(z_pairs)) == 1  # balanced
    assert sum(z_pairs) == pytest.approx(sum(r_pairs), rel=1e-4)  # the same causal triangle overall
    assert max(r_pairs) / z_pairs[0] == pytest.approx(7 / 4, rel=1e-3)  # ring's last host: (2H-1)/H of the zigzag load
