"""Ulysses (all-to-all from sequence to heads): exact against full attention on 4 fake CPU devices, both GQA paths
(KV heads split over hosts, or copied when hosts outnumber them), the replay stand-in, and the head-count refusal."""

import numpy as np
import pytest

from apb_jax import Engine, Model, ModelConfig
from apb_jax.replay import record_prefill, replay_prefill

DOC_LEN, Q_LEN = 61, 5  # no host count divides 61


def _model(heads, kv_heads, seed=11):
    cfg = ModelConfig(
        model_type="qwen2",
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=64 // heads * 2,
        eos_token_ids=(),
    )
    return Model.random(cfg, dtype="float32", seed=seed)


@pytest.fixture(scope="module")
def prompt():
    rng = np.random.default_rng(3)
    return rng.integers(0, 97, DOC_LEN), rng.integers(0, 97, Q_LEN)


@pytest.mark.parametrize(("heads", "kv_heads", "hosts"), [(8, 4, 4), (8, 8, 2), (4, 2, 4), (8, 1, 4)])
def test_ulysses_equals_full(prompt, heads, kv_heads, hosts):
    """KV heads split (4 over 4, 8 over 2) or copied (2 for 4 hosts, 1 for 4): logits and greedy tokens
    equal full attention's."""
    model = _model(heads, kv_heads)
    doc, q = prompt
    ref = np.asarray(model.logits(np.concatenate([doc, q])[None]))
    eng = Engine(model, "ulysses", devices=hosts)
    pre = eng.prefill(doc, q, doc_logits=True)
    np.testing.assert_allclose(pre.doc_logits, ref[:, :DOC_LEN], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(pre.logits, ref[:, -1], atol=2e-5, rtol=1e-5)
    full = Engine(model, "full").generate(doc, q, max_new_tokens=5)
    assert eng.generate(doc, q, max_new_tokens=5).tokens == full.tokens


def test_ulysses_replayed_host_equals_its_mesh_shard(prompt):
    """The all_to_all's recorded results replayed on one device give host h exactly its shard of the mesh run."""
    from apb_jax.replay import ScriptedCollectives

    model = _model(4, 2)
    doc, q = prompt
    eng = Engine(model, "ulysses", devices=4)
    k, v, records = record_prefill(eng, doc, q)
    lay = eng.layout(DOC_LEN, Q_LEN)
    for h in (0, 3):
        kh, vh = replay_prefill(eng, doc, q, h, coll=ScriptedCollectives(4, h, records[h]))
        sl = slice(h * lay.block, (h + 1) * lay.block)
        np.testing.assert_allclose(np.asarray(kh), k[:, :, sl], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(vh), v[:, :, sl], atol=1e-5, rtol=1e-5)
    shapes = replay_prefill(eng, doc, q, 3)  # shape stand-ins: runs, same shapes
    assert shapes[0].shape == k[:, :, : lay.block].shape


def test_ulysses_refuses_head_counts_it_cannot_split():
    with pytest.raises(
        ValueError, match=r"strategy='ulysses' splits the 4 query heads .* devices=3 .* allowed: \[1, 2, 4\]"
    ):
        Engine(_model(4, 2), "ulysses", devices=3)
