"""The Flax decoder against transformers' PyTorch models (float32): logits and greedy generation.

Each variant is a tiny random HF checkpoint, converted with `converters.hf_to_flax.convert` and loaded with
`apb_jax.loading.load` (and loaded straight from the HF directory too).
"""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apb_jax.config import ModelConfig
from apb_jax.loading import load
from apb_jax.models.rope import inv_frequencies
from converters.hf_to_flax import convert
from tests import hf_fixtures as hf

pytest.importorskip("torch")
pytest.importorskip("transformers")

TOL = 1e-4
SEQ = 40  # > original_max_position_embeddings=32 of the llama3 variant
NEW_TOKENS = 8

VARIANTS = {
    "llama-llama3": lambda d: hf.make_tiny_llama(d, rope_type="llama3"),
    "llama-linear-sharded": lambda d: hf.make_tiny_llama(d, rope_type="linear", sharded=True),
    "qwen2-tied": lambda d: hf.make_tiny_qwen2(d, tie=True),
    "qwen2-sharded-untied": lambda d: hf.make_tiny_qwen2(d, tie=False, sharded=True),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def case(request, tmp_path_factory):
    """(hf_dir, converted_dir, torch model) for one variant."""
    d = tmp_path_factory.mktemp(request.param)
    src = VARIANTS[request.param](d)
    dst = convert(src, d / "converted", progress=False)
    return src, dst, hf.load_torch(src)


def _flat(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(model.params)}


def flax_greedy(model, prompt: np.ndarray, max_new_tokens: int, eos: int = hf.EOS) -> list[int]:
    """Greedy decode by re-running `model.logits` on a fixed-size buffer (causal: the tail padding is never seen)."""
    buf = np.zeros((1, len(prompt) + max_new_tokens), np.int32)
    buf[0, : len(prompt)] = prompt
    cur, out = len(prompt), []
    for _ in range(max_new_tokens):
        tok = int(np.asarray(model.logits(buf))[0, cur - 1].argmax())
        out.append(tok)
        if tok == eos:
            break
        buf[0, cur] = tok
        cur += 1
    return out


def test_converted_logits_match_torch(case):
    _src, dst, tm = case
    ids = hf.random_ids(0, SEQ, batch=2)
    model = load(dst)
    assert model.dtype == jnp.float32 and model.path == dst
    got = np.asarray(model.logits(ids))
    want = hf.torch_logits(tm, ids)
    assert got.shape == want.shape == (2, SEQ, hf.VOCAB)
    err = np.abs(got - want).max()
    assert err <= TOL, f"max abs logit error {err:.3g} > {TOL}"


def test_hf_dir_loads_the_same_params(case):
    src, dst, _ = case
    a, b = _flat(load(src)), _flat(load(dst))
    assert a.keys() == b.keys()
    for p in a:
        assert a[p].dtype == b[p].dtype and np.array_equal(a[p], b[p]), p


def test_greedy_matches_transformers_generate(case):
    src, _, tm = case
    model = load(src)
    for seed in (1, 2):
        prompt = hf.random_ids(seed, SEQ - 4)
        want = hf.torch_greedy(tm, prompt, NEW_TOKENS)
        got = flax_greedy(model, prompt, NEW_TOKENS)
        assert got == want, f"seed {seed}: flax {got} vs transformers {want}"


def test_bfloat16_load_is_close(case):
    _, dst, tm = case
    model = load(dst, dtype="bfloat16")
    assert model.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.bfloat16 for v in _flat(model).values())
    ids = hf.random_ids(3, SEQ, batch=1)
    got, want = np.asarray(model.logits(ids)), hf.torch_logits(tm, ids)
    assert got.dtype == np.float32
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 0.1, rel


def test_llama3_scaling_matters_at_test_length(tmp_path_factory):
    """The comparison above could not pass if llama3 scaling were ignored: with default RoPE the logits differ."""
    d = tmp_path_factory.mktemp("llama3-vs-default")
    src = hf.make_tiny_llama(d, rope_type="llama3")
    cfg = ModelConfig.from_pretrained(src)
    plain = ModelConfig.from_hf_dict(
        {**json.loads((src / "config.json").read_text()), "rope_parameters": hf.ROPE["default"]}
    )
    assert not np.allclose(inv_frequencies(cfg.rope, cfg.head_dim), inv_frequencies(plain.rope, plain.head_dim))
    wrong = shutil.copytree(src, d / "as-default")
    hf.edit_config(wrong, rope_parameters=hf.ROPE["default"])
    ids = hf.random_ids(4, SEQ, batch=1)
    want = hf.torch_logits(hf.load_torch(src), ids)
    assert np.abs(np.asarray(load(src).logits(ids)) - want).max() <= TOL
    assert np.abs(np.asarray(load(wrong).logits(ids)) - want).max() > 100 * TOL
