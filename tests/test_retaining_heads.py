"""Loading released retaining heads (Locret / APB): the names, shapes and file layouts the reference code writes,
scored against a numpy transcription of the reference module's forward."""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from apb_jax import ModelConfig
from apb_jax.compression import RetainingHeads, retaining_head_scores
from apb_jax.models.llama import AttnCall
from apb_jax.retaining_heads import heads_from_state_dict, load_retaining_heads, save_retaining_heads

torch = pytest.importorskip("torch")

CFG = ModelConfig(
    model_type="qwen2",
    vocab_size=11,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)
R = 12  # the released heads use 1024
D_IN = (CFG.num_heads + 2 * CFG.num_kv_heads) * CFG.head_dim


def released_heads(seed=0) -> dict:
    """Per layer, the reference module's two bias-free linears, under their state-dict names."""
    torch.manual_seed(seed)
    sd = {}
    for i in range(CFG.num_layers):
        fc1 = torch.nn.Linear(D_IN, R, bias=False)
        fc2 = torch.nn.Linear(R, CFG.num_kv_heads, bias=False)
        sd[f"model.layers.{i}.self_attn.fc1.weight"] = fc1.weight.detach().clone()
        sd[f"model.layers.{i}.self_attn.fc2.weight"] = fc2.weight.detach().clone()
    return sd


def base_tensors() -> dict:
    """A few tensors of the whole model, which a released file may also hold (the reference loaders skip them)."""
    h = CFG.hidden_size
    return {
        "model.embed_tokens.weight": torch.randn(CFG.vocab_size, h),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(CFG.num_heads * CFG.head_dim, h),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(CFG.num_heads * CFG.head_dim),
        "model.layers.1.mlp.down_proj.weight": torch.randn(h, CFG.intermediate_size),
        "model.layers.1.input_layernorm.weight": torch.randn(h),
        "model.norm.weight": torch.randn(h),
        "lm_head.weight": torch.randn(CFG.vocab_size, h),
    }


def reference_scores(sd: dict, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The reference forward in numpy: fc2(silu(fc1(cat(q_proj(x), k_proj(x), v_proj(x))))) with q, k, v the flat
    projection outputs [T, heads * D] before RoPE; -> [T, KVH]."""
    w1 = sd[f"model.layers.{layer}.self_attn.fc1.weight"].float().numpy().astype(np.float64)
    w2 = sd[f"model.layers.{layer}.self_attn.fc2.weight"].float().numpy().astype(np.float64)
    x = np.concatenate([q, k, v], axis=-1).astype(np.float64)
    h = x @ w1.T
    h = h / (1.0 + np.exp(-h))
    return h @ w2.T


def write_bin(tmp_path, sd):
    torch.save({**base_tensors(), **sd}, tmp_path / "locret.bin")
    return tmp_path / "locret.bin"


def write_sharded_bf16(tmp_path, sd):
    """A `save_pretrained`-style directory: bfloat16 safetensors shards and the index naming them; a third shard
    of base tensors only is not a valid file, so reading it would fail."""
    from safetensors.torch import save_file

    d = tmp_path / "final_model"
    d.mkdir()
    base = base_tensors()
    shards = {
        "model-00001-of-00003.safetensors": {
            "model.embed_tokens.weight": base["model.embed_tokens.weight"],
            **{k: v for k, v in sd.items() if ".layers.0." in k},
        },
        "model-00002-of-00003.safetensors": {k: v for k, v in sd.items() if ".layers.1." in k},
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(d / name))
        weight_map.update(dict.fromkeys(tensors, name))
    (d / "model-00003-of-00003.safetensors").write_bytes(b"not a safetensors file")
    weight_map["lm_head.weight"] = "model-00003-of-00003.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text("{}")
    return d, {k: v.to(torch.bfloat16) for k, v in sd.items()}


@pytest.mark.parametrize("layout", ["whole-model .bin", "sharded bfloat16 safetensors"])
def test_released_heads_score_like_the_reference_module(tmp_path, layout):
    sd = released_heads()
    if layout == "whole-model .bin":
        path, want_sd = write_bin(tmp_path, sd), sd
    else:
        path, want_sd = write_sharded_bf16(tmp_path, sd)
    heads = load_retaining_heads(path, CFG, dtype=jnp.float32)
    assert isinstance(heads, RetainingHeads) and heads.act == "silu"
    assert [w.shape for w in heads.fc1] == [(D_IN, R)] * 2 and [w.shape for w in heads.fc2] == [(R, 2)] * 2
    rng = np.random.default_rng(1)
    t = 7
    q = rng.normal(size=(t, CFG.num_heads * CFG.head_dim)).astype(np.float32)  # flat, as q_proj returns it
    k = rng.normal(size=(t, CFG.num_kv_heads * CFG.head_dim)).astype(np.float32)
    v = rng.normal(size=(t, CFG.num_kv_heads * CFG.head_dim)).astype(np.float32)
    heads_view = lambda a, n: jnp.asarray(a.reshape(1, t, n, CFG.head_dim))  # torch's .view(b, t, heads, D)
    q_raw, k_raw = heads_view(q, CFG.num_heads), heads_view(k, CFG.num_kv_heads)
    for layer in range(CFG.num_layers):
        call = AttnCall(layer=layer, q=q_raw, k=k_raw, v=heads_view(v, CFG.num_kv_heads), q_raw=q_raw, k_raw=k_raw)
        got = np.asarray(retaining_head_scores(call, heads))[0]
        np.testing.assert_allclose(got, reference_scores(want_sd, layer, q, k, v), rtol=2e-5, atol=2e-5)


def test_save_writes_exactly_the_released_names_and_shapes(tmp_path):
    from safetensors.numpy import load_file

    heads = load_retaining_heads(write_bin(tmp_path, released_heads()), CFG, dtype=jnp.float32)
    path = save_retaining_heads(heads, tmp_path / "retaining_heads.safetensors")
    saved = load_file(str(path))
    assert {k: v.shape for k, v in saved.items()} == {
        **{f"model.layers.{i}.self_attn.fc1.weight": (R, D_IN) for i in range(2)},
        **{f"model.layers.{i}.self_attn.fc2.weight": (2, R) for i in range(2)},
    }
    again = load_retaining_heads(path, CFG, dtype=jnp.float32)
    for a, b in zip(heads.fc1 + heads.fc2, again.fc1 + again.fc2):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "key",
    [
        "model.layers.0.self_attn.fc1.bias",  # the released heads have no biases
        "layers.0.self_attn.fc1.weight",  # not the released prefix
        "model.model.layers.0.self_attn.fc1.weight",
        "model.layers.0.mlp.fc1.weight",
        "model.layers.0.self_attn.fc3.weight",
        "optimizer.state",
    ],
)
def test_other_names_are_refused_by_name(tmp_path, key):
    sd = {**released_heads(), key: torch.zeros(3)}
    named = re.escape(f"unexpected tensor {key!r}")
    expected = re.escape("expected model.layers.{i}.self_attn.fc1.weight / model.layers.{i}.self_attn.fc2.weight")
    with pytest.raises(ValueError, match=f"{named}.*{expected}"):
        heads_from_state_dict({k: v.numpy() for k, v in sd.items()}, CFG)
    torch.save(sd, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match=named):
        load_retaining_heads(tmp_path / "bad.bin", CFG)


def test_wrong_shapes_and_missing_layers_are_named(tmp_path):
    sd = {k: v.numpy() for k, v in released_heads().items()}
    bad = {**sd, "model.layers.1.self_attn.fc1.weight": np.zeros((R, D_IN + 1), np.float32)}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.fc1\.weight has shape \(12, 65\); expected"):
        heads_from_state_dict(bad, CFG)
    bad = {**sd, "model.layers.0.self_attn.fc2.weight": np.zeros((8, R), np.float32)}  # 8 KV heads: another model
    with pytest.raises(ValueError, match=r"fc2\.weight has shape \(8, 12\); expected \(2, 12\) \(\[kv_heads, hid"):
        heads_from_state_dict(bad, CFG)
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.self_attn.fc1.weight"}
    with pytest.raises(ValueError, match=r"missing model\.layers\.1\.self_attn\.fc1\.weight"):
        heads_from_state_dict(missing, CFG)
    extra = {**sd, "model.layers.2.self_attn.fc1.weight": sd["model.layers.0.self_attn.fc1.weight"]}
    with pytest.raises(ValueError, match=r"layers the model does not have"):
        heads_from_state_dict(extra, CFG)
    (tmp_path / "two").mkdir()
    for name in ("a.bin", "b.bin"):
        torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "two" / name)
    with pytest.raises(ValueError, match=r"expected exactly one of"):
        load_retaining_heads(tmp_path / "two", CFG)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_retaining_heads(tmp_path / "nope.bin", CFG)


def test_converter_writes_the_file_beside_the_model(tmp_path, capsys):
    from apb_jax.retaining_heads import HEADS_FILE
    from converters.retaining_heads import main

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    sd = released_heads(seed=4)
    assert main([str(write_bin(tmp_path, sd)), str(model_dir)]) == 0
    assert f"{CFG.num_layers} layers, hidden {R}" in capsys.readouterr().out
    got = load_retaining_heads(model_dir / HEADS_FILE, CFG, dtype=jnp.float32)
    np.testing.assert_array_equal(got.fc2[1], sd["model.layers.1.self_attn.fc2.weight"].numpy().T)
    assert main([str(write_bin(tmp_path, sd)), str(model_dir)]) == 2  # no silent overwrite
    assert "--overwrite" in capsys.readouterr().err
