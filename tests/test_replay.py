"""Single-host replay runs the same per-host code as the real mesh: host h's replayed prefill equals host h's shard
of the real 4-device shard_map run (4 fake CPU devices, tiny random model, float32)."""

import jax.numpy as jnp
import numpy as np
import pytest

from apb_jax import Engine, Model, ModelConfig
from apb_jax.replay import (
    ReplayCollectives,
    ScriptedCollectives,
    busiest_host,
    host_inputs,
    on_device,
    record_prefill,
    replay_prefill,
    replay_step_fn,
)

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
HOSTS, DOC_LEN, Q_LEN = 4, 126, 4  # block 32, the last two slots of host 3 are padding
KW = {"apb": dict(anchor_len=8, passing_len=4, q_insert=2), "star": dict(anchor_len=12), "ring": {}}


@pytest.fixture(scope="module")
def model():
    return Model.random(CFG, dtype="float32", seed=2)


@pytest.fixture(scope="module")
def prompt():
    rng = np.random.default_rng(5)
    return rng.integers(0, CFG.vocab_size, DOC_LEN), rng.integers(0, CFG.vocab_size, Q_LEN)


def _engine(model, strategy):
    return Engine(model, strategy, devices=HOSTS, **KW[strategy])


def _shard(x, lay, h):
    return x[:, :, h * lay.block : (h + 1) * lay.block]


class RingPeers:
    """ppermute stand-in for a ring replay: returns the real K/V block of the previous host (found in the real
    run's cache by nearest match, so the ring code itself stays untouched)."""

    def __init__(self, size, host, k_all, v_all):
        self.size, self.host = size, host
        self.k_all, self.v_all = jnp.asarray(k_all), jnp.asarray(v_all)  # [layers, H, b, B, KVH, D]

    def index(self):
        return jnp.int32(self.host)

    def all_gather(self, x):
        raise AssertionError("ring prefill has no all_gather")

    def ppermute_next(self, kv):
        k, v = kv
        dist = jnp.max(jnp.abs(self.k_all - k[None, None]), axis=(2, 3, 4, 5))  # [layers, H]
        flat = jnp.argmin(dist.reshape(-1))
        layer, src = flat // self.size, flat % self.size
        prev = (src - 1) % self.size
        return self.k_all[layer, prev].astype(k.dtype), self.v_all[layer, prev].astype(v.dtype)


@pytest.mark.parametrize("strategy", ["apb", "star", "ring"])
def test_replayed_host_equals_its_shard_of_the_mesh_run(model, prompt, strategy):
    doc, q = prompt
    eng = _engine(model, strategy)
    lay = eng.layout(DOC_LEN, Q_LEN)
    assert eng.mesh.size == HOSTS
    real_k, real_v, records = record_prefill(eng, doc, q)  # the real shard_map run, all_gathers recorded
    if strategy == "apb":
        cache = eng.prefill(doc, q).cache  # recording changes nothing
        np.testing.assert_array_equal(real_k, np.asarray(cache.doc_k))
        assert len(records[0]) == 3 * CFG.num_layers  # k, v, valid per layer
    k_all = real_k.reshape(*real_k.shape[:2], HOSTS, lay.block, *real_k.shape[3:]).transpose(0, 2, 1, 3, 4, 5)
    v_all = real_v.reshape(*real_v.shape[:2], HOSTS, lay.block, *real_v.shape[3:]).transpose(0, 2, 1, 3, 4, 5)
    for h in (0, 1, HOSTS - 1):
        independent = strategy == "star" or h == 0  # host 0 masks every passing key / skips every ring step
        if independent:
            coll = ReplayCollectives(HOSTS, h)
        elif strategy == "apb":
            coll = ScriptedCollectives(HOSTS, h, records[h])
        else:
            coll = RingPeers(HOSTS, h, k_all, v_all)
        k, v = replay_prefill(eng, doc, q, h, coll=coll)
        assert k.shape == (CFG.num_layers, 1, lay.block, CFG.num_kv_heads, CFG.head_dim)
        assert len(k.devices()) == 1
        np.testing.assert_allclose(
            np.asarray(k), _shard(real_k, lay, h), atol=1e-5, rtol=1e-5, err_msg=f"{strategy} host {h} k"
        )
        np.testing.assert_allclose(
            np.asarray(v), _shard(real_v, lay, h), atol=1e-5, rtol=1e-5, err_msg=f"{strategy} host {h} v"
        )


def test_shape_stand_ins_run_every_host_and_the_query_step(model, prompt):
    """The timing replay (local stand-ins) runs the busiest host's prefill and query step with real shapes."""
    doc, q = prompt
    eng = _engine(model, "apb")
    lay = eng.layout(DOC_LEN, Q_LEN)
    h = busiest_host(lay)
    assert h == HOSTS - 1
    tokens, positions = host_inputs(lay, doc, q, h)
    assert tokens.shape == (1, lay.anchor + lay.block)
    assert list(positions[0, lay.anchor : lay.anchor + 3]) == [h * lay.block + i for i in range(3)]
    k, v = replay_prefill(eng, doc, q, h)
    assert np.isfinite(np.asarray(k)).all()
    dev = eng.mesh.devices.flat[0]
    tail = jnp.zeros((CFG.num_layers, 1, 16, CFG.num_kv_heads, CFG.head_dim), jnp.float32)
    step = replay_step_fn(eng, lay, h)
    tk, _tv, logits = step(on_device(eng.params, dev), k, v, tail, tail, jnp.asarray(q[None], jnp.int32), jnp.int32(0))
    assert logits.shape == (1, CFG.vocab_size) and np.isfinite(np.asarray(logits)).all()
    assert float(jnp.abs(tk[:, :, :Q_LEN]).sum()) > 0 and float(jnp.abs(tk[:, :, Q_LEN:]).sum()) == 0


def test_host_inputs_rejects_a_host_outside_the_layout(model):
    lay = _engine(model, "star").layout(DOC_LEN, Q_LEN)
    with pytest.raises(ValueError, match=r"host=4 must be in \[0, 4\)"):
        host_inputs(lay, np.zeros(DOC_LEN, np.int32), np.zeros(Q_LEN, np.int32), 4)
