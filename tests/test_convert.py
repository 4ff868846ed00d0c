"""apb_jax.checkpoint (what converters.hf_to_flax and `apb-jax convert` run) and apb_jax.loading: name mapping,
validation, orbax round-trips, bad checkpoints."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from apb_jax import checkpoint as conv
from apb_jax.config import ModelConfig
from apb_jax.loading import load
from tests import hf_fixtures as hf

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def llama(tmp):
    return hf.make_tiny_llama(tmp, rope_type="llama3")


@pytest.fixture(scope="module")
def qwen(tmp):
    return hf.make_tiny_qwen2(tmp, tie=True, sharded=True)


@pytest.fixture(scope="module")
def llama_bf16(tmp):
    return hf.make_tiny_llama(tmp, rope_type="llama3", dtype="bfloat16", sharded=True)


def _hf_tensors(path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _flat(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(model.params)}


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _expected_from_hf(tensors: dict[str, np.ndarray], config: ModelConfig) -> dict:
    """What each Flax param must hold: the HF tensor, transposed for kernels (no dtype change)."""
    out = {}
    for name, arr in tensors.items():
        path = conv.hf_to_flax_path(name, config)
        if path is not None:
            out[path] = arr.T if path[-1] == "kernel" else arr
    return out


# ------------------------------------------------------------------------------------------------ names


def test_name_mapping_table(llama, qwen):
    cfg = ModelConfig.from_pretrained(llama)
    f = lambda n: conv.hf_to_flax_path(n, cfg)
    assert f("model.embed_tokens.weight") == ("embed_tokens", "embedding")
    assert f("model.norm.weight") == ("norm", "scale")
    assert f("lm_head.weight") == ("lm_head", "kernel")
    assert f("model.layers.1.self_attn.k_proj.weight") == ("layers", 1, "self_attn", "k_proj", "kernel")
    assert f("model.layers.0.self_attn.q_proj.bias") == ("layers", 0, "self_attn", "q_proj", "bias")
    assert f("model.layers.12.mlp.down_proj.weight") == ("layers", 12, "mlp", "down_proj", "kernel")
    assert f("model.layers.0.post_attention_layernorm.weight") == ("layers", 0, "post_attention_layernorm", "scale")
    assert f("layers.0.input_layernorm.weight") == ("layers", 0, "input_layernorm", "scale")  # no "model." prefix
    assert f("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    for bad in (
        "model.layers.0.self_attn.foo.weight",
        "model.layers.x.mlp.up_proj.weight",
        "model.wte.weight",
        "model.layers.0.mlp.up_proj.scale",
    ):
        with pytest.raises(ValueError, match="unknown tensor"):
            f(bad)
    tied = ModelConfig.from_pretrained(qwen)
    assert conv.hf_to_flax_path("lm_head.weight", tied) is None  # tied: the embedding is the head
    # the inverse names every param of both families
    for c in (cfg, tied):
        for p in conv.expected_params(c, "float32"):
            assert conv.hf_to_flax_path(conv.flax_to_hf_name(p), c) == p


def test_split_fused_names():
    cfg = ModelConfig.from_hf_dict(
        {
            "model_type": "llama",
            "vocab_size": 16,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    assert conv.split_fused("model.layers.3.self_attn.qkv_proj.weight", cfg) == [
        ("model.layers.3.self_attn.q_proj.weight", 64),
        ("model.layers.3.self_attn.k_proj.weight", 32),
        ("model.layers.3.self_attn.v_proj.weight", 32),
    ]
    assert conv.split_fused("model.layers.0.mlp.gate_up_proj.weight", cfg) == [
        ("model.layers.0.mlp.gate_proj.weight", 96),
        ("model.layers.0.mlp.up_proj.weight", 96),
    ]
    assert conv.split_fused("model.layers.0.mlp.up_proj.weight", cfg) is None


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_float32_roundtrip_bit_exact(which, request, tmp, capsys):
    src = request.getfixturevalue(which)
    (src / "tokenizer.json").write_text('{"fake": true}')
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    dst = conv.convert(src, tmp / f"{which}-f32", progress=True)
    summary = capsys.readouterr().out
    assert "tensors" in summary and "params" in summary and "MiB" in summary
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert (dst / "params").is_dir()
    cfg = ModelConfig.from_pretrained(dst)
    want = _expected_from_hf(_hf_tensors(src), cfg)
    got = _flat(load(dst))
    assert got.keys() == want.keys()
    for p in want:
        assert got[p].dtype == np.float32 and got[p].shape == want[p].shape, p
        assert np.array_equal(_bits(got[p]), _bits(np.ascontiguousarray(want[p]))), p
    if which == "qwen":
        assert ("lm_head", "kernel") not in got


def test_bfloat16_roundtrip_bit_exact(llama_bf16, tmp):
    dst = conv.convert(llama_bf16, tmp / "bf16", progress=False)
    cfg = ModelConfig.from_pretrained(dst)
    assert cfg.dtype == "bfloat16"
    want = _expected_from_hf(_hf_tensors(llama_bf16), cfg)
    for source in (dst, llama_bf16):  # converted orbax dir and the HF dir itself
        model = load(source)
        assert model.dtype == jnp.bfloat16
        got = _flat(model)
        assert got.keys() == want.keys()
        for p in want:
            assert got[p].dtype == ml_dtypes.bfloat16 and want[p].dtype == ml_dtypes.bfloat16, p
            assert np.array_equal(_bits(got[p]), _bits(np.ascontiguousarray(want[p]))), p


def test_convert_casts_like_torch(llama, tmp):
    """float32 checkpoint converted to bfloat16 rounds exactly as torch's `.bfloat16()` does."""
    import torch

    dst = conv.convert(llama, tmp / "f32-to-bf16", dtype="bfloat16", progress=False)
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    cfg = ModelConfig.from_pretrained(dst)
    got = _flat(load(dst))
    for name, arr in _hf_tensors(llama).items():
        p = conv.hf_to_flax_path(name, cfg)
        t = torch.from_numpy(arr).bfloat16().view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(_bits(got[p]), t.T if p[-1] == "kernel" else t), name
    assert load(dst, dtype="float32").dtype == jnp.float32


def test_pytorch_bin_checkpoint(llama, tmp):
    import torch

    src = shutil.copytree(llama, tmp / "as-bin", ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = _hf_tensors(llama)
    sd = {k: torch.from_numpy(v.copy()) for k, v in tensors.items()}
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints carry this buffer
    torch.save(sd, src / "pytorch_model.bin")
    a, b = _flat(load(src)), _flat(load(llama))
    assert a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in a)


def test_fused_checkpoint_splits(llama, tmp):
    def fuse(t):
        for i in range(2):
            pre = f"model.layers.{i}."
            t[pre + "self_attn.qkv_proj.weight"] = np.concatenate(
                [t.pop(pre + f"self_attn.{x}_proj.weight") for x in "qkv"]
            )
            t[pre + "mlp.gate_up_proj.weight"] = np.concatenate(
                [t.pop(pre + "mlp.gate_proj.weight"), t.pop(pre + "mlp.up_proj.weight")]
            )
        return t

    fused = hf.rewrite_safetensors(llama, tmp / "fused", fuse)
    a, b = _flat(load(fused)), _flat(load(llama))
    assert a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in a)


# ------------------------------------------------------------------------------------------------ bad input


def _bad(llama, tmp, name, edit):
    return hf.rewrite_safetensors(llama, tmp / name, edit)


def _both_raise(src, tmp, match):
    """convert and load(hf_dir) both fail with a ValueError matching `match`; nothing is written."""
    with pytest.raises(ValueError, match=match) as e1:
        conv.convert(src, tmp / (src.name + "-out"), progress=False)
    assert not (tmp / (src.name + "-out") / "params").exists()
    with pytest.raises(ValueError, match=match):
        load(src)
    return str(e1.value)


def test_missing_tensor(llama, tmp):
    src = _bad(
        llama, tmp, "missing", lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"}
    )
    msg = _both_raise(src, tmp, r"missing.*model\.layers\.1\.mlp\.up_proj\.weight")
    assert "layers/1/mlp/up_proj/kernel" in msg and "(64, 128)" in msg


def test_wrong_shape(llama, tmp):
    src = _bad(
        llama, tmp, "shape", lambda t: {**t, "model.layers.0.self_attn.k_proj.weight": np.zeros((48, 64), np.float32)}
    )
    msg = _both_raise(src, tmp, r"model\.layers\.0\.self_attn\.k_proj\.weight")
    assert "[48, 64]" in msg and "layers/0/self_attn/k_proj/kernel" in msg and "(64, 32)" in msg


def test_extra_unknown_tensor(llama, tmp):
    src = _bad(
        llama, tmp, "unknown", lambda t: {**t, "model.layers.0.self_attn.foo.weight": np.zeros((4, 4), np.float32)}
    )
    _both_raise(src, tmp, r"unknown tensor 'model\.layers\.0\.self_attn\.foo\.weight'")


def test_extra_layer(llama, tmp):
    src = _bad(
        llama, tmp, "extra-layer", lambda t: {**t, "model.layers.2.input_layernorm.weight": np.ones(64, np.float32)}
    )
    msg = _both_raise(src, tmp, r"extra tensor 'model\.layers\.2\.input_layernorm\.weight'")
    assert "layers/2/input_layernorm/scale" in msg and "num_layers=2" in msg


def test_bias_in_model_without_bias(llama, tmp):
    src = _bad(llama, tmp, "extra-bias", lambda t: {**t, "model.layers.0.mlp.up_proj.bias": np.ones(128, np.float32)})
    _both_raise(src, tmp, r"extra tensor 'model\.layers\.0\.mlp\.up_proj\.bias'.*mlp_bias=False")


def test_validation_happens_before_reading_data(llama, tmp, monkeypatch):
    src = _bad(llama, tmp, "no-read", lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"})

    def boom(*a, **k):
        raise AssertionError("tensor data read before the checkpoint was validated")

    monkeypatch.setattr(conv, "_iter_file", boom)
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        conv.load_hf_params(src)


def test_unknown_model_type(llama, tmp):
    src = hf.edit_config(shutil.copytree(llama, tmp / "gpt2"), model_type="gpt2")
    for fn in (lambda: conv.convert(src, tmp / "gpt2-out", progress=False), lambda: load(src)):
        with pytest.raises(ValueError, match="model_type='gpt2'"):
            fn()


def test_bad_dtype(llama, tmp):
    with pytest.raises(ValueError, match="int8"):
        load(llama, dtype="int8")
    with pytest.raises(ValueError, match="int8"):
        load(llama, dtype=jnp.int8)
    with pytest.raises(ValueError, match="int8"):
        conv.convert(llama, tmp / "int8", dtype="int8", progress=False)


def test_missing_dir_and_weights(llama, tmp):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp / "nope")
    empty = tmp / "no-weights"
    empty.mkdir()
    shutil.copy(llama / "config.json", empty / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights"):
        load(empty)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load(tmp)  # a directory without config.json


def test_existing_destination(llama, tmp):
    dst = conv.convert(llama, tmp / "twice", progress=False)
    with pytest.raises(FileExistsError, match="params"):
        conv.convert(llama, dst, progress=False)
    conv.convert(llama, dst, progress=False, overwrite=True)
    assert load(dst).config == ModelConfig.from_pretrained(llama)


def test_converted_dir_must_match_config(llama, tmp):
    dst = conv.convert(llama, tmp / "mismatch", progress=False)
    hf.edit_config(dst, num_hidden_layers=3)
    with pytest.raises(ValueError, match="layers/2"):
        load(dst)
