"""Retaining-head training (training/train_retaining_heads.py): the chunked importance target against a dense
float64 computation, training that beats random heads at top-k recall, the released-format round trip into an APB
engine, the CLI's outputs, and argument errors.  Tiny random models on CPU."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apb_jax import Engine
from apb_jax.config import ModelConfig, RopeConfig
from apb_jax.model import Model
from apb_jax.models.llama import AttnCall
from apb_jax.strategies.full import causal_attention
from apb_jax.tasks import passkey, sample_batch
from apb_jax.tokenizer import VOCAB, token_id
from converters.retaining_heads import load_retaining_heads
from pallas_kernels import apb_attention_reference
from training import train_retaining_heads as trh

CFG = ModelConfig(
    model_type="llama",
    vocab_size=len(VOCAB),
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope=RopeConfig(theta=1e4),
    eos_token_ids=(2,),
    dtype="float32",
)
MIX = ("passkey", "multikey_niah", "variable_tracking")


def sharp_model(scale: float = 8.0, seed: int = 0) -> Model:
    """A random model whose q/k projections are scaled up so attention depends on content (with N(0, 0.02) weights
    attention is nearly uniform and a key's importance is only its position, which no per-token head can learn)."""
    base = Model.random(CFG, dtype="float32", seed=seed)
    module = base.module()
    for layer in module.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.kernel[...] = proj.kernel[...] * scale
    graphdef, params = nnx.split(module)
    return Model(config=CFG, graphdef=graphdef, params=params, dtype=base.dtype)


@pytest.fixture(scope="module")
def model():
    return sharp_model()


def dense_log_importance(q, k, row_mask=None):
    """float64 numpy: max over rows i >= j (row_mask) and the heads of each group of log softmax(q k / sqrt d)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, t, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    s = np.einsum("bikgd,bjkd->bkgij", qg, k) / np.sqrt(d)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    mx = s.max(-1, keepdims=True)
    logp = s - (mx + np.log(np.exp(s - mx).sum(-1, keepdims=True)))
    if row_mask is not None:
        logp = np.where(np.asarray(row_mask)[:, None, None, :, None], logp, -np.inf)
    return logp.max(axis=(2, 3)).transpose(0, 2, 1)  # [b, t, kvh]


# --- (a) the target ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 8, 37, 64])
def test_attention_with_importance_equals_dense(chunk):
    rng = np.random.default_rng(0)
    b, t, h, kvh, d = 2, 37, 4, 2, 16
    q = jnp.asarray(rng.normal(0, 1.5, (b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(0, 1.5, (b, t, kvh, d)), jnp.float32)
    v = jnp.asarray(rng.normal(0, 1, (b, t, kvh, d)), jnp.float32)
    rows = rng.random((b, t)) < 0.4
    out, imp = trh.attention_with_importance(q, k, v, chunk=chunk)
    np.testing.assert_allclose(out, apb_attention_reference(q, k, v, anchor_len=0)[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(imp, dense_log_importance(q, k), atol=1e-4, rtol=1e-5)
    _, imp_rows = trh.attention_with_importance(q, k, v, chunk=chunk, row_mask=jnp.asarray(rows))
    want = dense_log_importance(q, k, rows)
    np.testing.assert_array_equal(np.isfinite(imp_rows), np.isfinite(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(np.asarray(imp_rows)[fin], want[fin], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows", ["all", "answers"])
def test_features_match_dense_on_model(model, rows):
    """The jitted forward's targets (chunk 16 over T = 150) equal dense float64 ones from the model's own q, k; the
    features are the layer's pre-RoPE projections."""
    tokens = sample_batch(np.random.default_rng(3), MIX, 150, 2).tokens
    feats = trh.make_feature_fn(model, rows=rows, chunk=16)(model.params, jnp.asarray(tokens))
    seen = []

    def record(call: AttnCall):
        seen.append((call.q, call.k, call.q_raw, call.k_raw, call.v))
        return causal_attention(call)

    pos = jnp.broadcast_to(jnp.arange(150, dtype=jnp.int32), tokens.shape)
    model.module()(jnp.asarray(tokens), pos, record, rope_seq_len=150)
    tail = np.cumsum(tokens == token_id("QRY"), axis=1) > 0
    keys = np.ones_like(tail) if rows == "all" else ~tail
    assert tail[:, -1].all() and not tail[:, 0].any()
    np.testing.assert_array_equal(feats.key_mask, keys)
    for layer, (q, k, q_raw, k_raw, v) in enumerate(seen):
        want = dense_log_importance(q, k, None if rows == "all" else tail)
        want = np.where(keys[..., None], want, 0.0)
        want = want - want.sum(1, keepdims=True) / keys.sum(1)[:, None, None]
        want = np.where(keys[..., None], want, 0.0)
        np.testing.assert_allclose(feats.target[layer], want, atol=2e-4)
        np.testing.assert_allclose(feats.q_raw[layer], q_raw, atol=1e-5)
        np.testing.assert_allclose(feats.k_raw[layer], k_raw, atol=1e-5)
        np.testing.assert_allclose(feats.v[layer], v, atol=1e-5)
    digits = np.isin(tokens, [token_id(str(i)) for i in range(10)])
    np.testing.assert_array_equal(feats.needle, digits & ~tail)
    # the metric itself: perfect predictions have recall 1, and the chunk size does not matter
    m = trh.ranking_metrics(feats.target, feats, block=37, k=3)
    np.testing.assert_allclose(m["recall"], 1.0)
    other = trh.make_feature_fn(model, rows=rows, chunk=150)(model.params, jnp.asarray(tokens))
    np.testing.assert_allclose(other.target, feats.target, atol=2e-5)


def test_default_hidden_and_chunk():
    assert trh.default_hidden(CFG) == 128  # input (4 + 4) * 16 = 128 -> 64 -> at least 128
    retriever = ModelConfig(
        model_type="llama",
        vocab_size=512,
        hidden_size=256,
        intermediate_size=768,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        head_dim=32,
    )
    llama8b = ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
    )
    assert trh.default_hidden(retriever) == 256 and trh.default_hidden(llama8b) == 1024
    assert trh.default_chunk(1, 8, 16384) == 1024 and trh.default_chunk(4, 8, 16384) == 256
    assert trh.default_chunk(1, 4, 37) == 64


# --- (b) training beats random heads ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(model):
    return trh.train(model, steps=40, length=256, batch=2, hidden=64, lr=5e-3, seed=0, eval_every=20, progress=False)


def test_training_lowers_loss_and_beats_random_heads(trained):
    heads, hist = trained
    base, final = hist["baseline"], hist["final"]
    assert hist["steps_done"] == 40 and hist["stopped"] == "steps" and final["step"] == 40
    assert [e["step"] for e in hist["eval"]] == [20, 40]
    # random heads rank at chance (keep = 1/16, k = 4 of 64); trained heads must clearly beat them on held-out data
    assert base["recall"] < 0.15
    assert final["recall"] > base["recall"] + 0.1, (base["recall"], final["recall"])
    assert final["loss"] < 0.75 * base["loss"], (base["loss"], final["loss"])
    tr = hist["train"]["loss"]
    assert len(tr) == 40 and np.mean(tr[-5:]) < 0.75 * np.mean(tr[:5])
    lrs = hist["train"]["lr"]  # warm-up over 4 updates to 5e-3, then linear decay towards 0 at step 40
    assert lrs[3] == pytest.approx(5e-3) and lrs[0] < lrs[3] and lrs[-1] < 0.05 * 5e-3 and lrs[20] > lrs[30]
    assert all(np.isfinite(tr))
    json.dumps(hist)  # JSON-ready
    assert heads.fc1[0].shape == (8 * 16, 64) and heads.fc2[1].shape == (64, 2)
    assert heads.fc1[0].dtype == jnp.float32


# --- (c) released format -> engine -------------------------------------------------------------------------------


def test_saved_heads_load_and_run_in_apb_engine(model, trained, tmp_path):
    from converters.retaining_heads import save_retaining_heads

    heads, _ = trained
    path = save_retaining_heads(heads, tmp_path / "retaining_heads.safetensors")
    loaded = load_retaining_heads(path, CFG, dtype=jnp.float32)
    for a, b in zip(heads.fc1 + heads.fc2, loaded.fc1 + loaded.fc2):
        np.testing.assert_array_equal(a, b)
    ex = passkey(np.random.default_rng(1), 192, depth=0.5)
    eng = Engine(model, "apb", devices=4, compressor="retaining_heads", retaining_heads=str(path))
    pre = eng.prefill(ex.document, ex.query)
    assert pre.logits.shape == (1, CFG.vocab_size) and np.isfinite(pre.logits).all()


def test_cli_writes_heads_log_and_plot(model, tmp_path, monkeypatch):
    import apb_jax.loading

    monkeypatch.setattr(apb_jax.loading, "load", lambda path, dtype=None: model)
    out = tmp_path / "heads.safetensors"
    rc = trh.main(
        [
            "--model",
            "unused",
            "--out",
            str(out),
            "--steps",
            "1000",
            "--length",
            "128",
            "--batch",
            "1",
            "--hidden",
            "32",
            "--task-mix",
            "passkey,multikey_niah",
            "--time-budget-s",
            "0.001",
            "--quiet",
        ]
    )
    assert rc == 0
    log = json.loads(out.with_suffix(".json").read_text())
    assert log["stopped"] == "time_budget" and 1 <= log["steps_done"] < 1000
    assert log["config"]["task_mix"] == ["passkey", "multikey_niah"] and log["config"]["hidden"] == 32
    assert out.with_suffix(".png").is_file()
    assert load_retaining_heads(out, CFG).fc1[1].shape == (128, 32)


# --- (d) argument errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), r"steps=0 .*allowed: an integer >= 1"),
        (dict(length=100), r"length=100 .*allowed: an integer >= 128"),
        (dict(hidden=0), r"hidden=0 .*allowed: an integer >= 1"),
        (dict(batch=0), r"batch=0 .*allowed"),
        (dict(rows="queries"), r"rows='queries' .*allowed: one of \('all', 'answers'\)"),
        (dict(hosts=9), r"hosts=9 .*allowed: an integer in \[1, length // 16\] = \[1, 8\]"),
        (dict(task_mix="sudoku"), r"sudoku"),
    ],
)
def test_bad_arguments(model, kwargs, match):
    args = dict(steps=2, length=128, batch=1, progress=False) | kwargs
    with pytest.raises(ValueError, match=match):
        trh.train(model, **args)


def test_bad_chunk():
    x = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"chunk=0 must be >= 1"):
        trh.attention_with_importance(x, x[:, :, :1], x[:, :, :1], chunk=0)
