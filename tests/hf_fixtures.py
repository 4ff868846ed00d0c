"""Tiny random Hugging Face checkpoints (transformers + torch, CPU) for tests that compare against PyTorch.

Every builder saves with `save_pretrained(safe_serialization=True)` into `tmpdir/<name>` and returns that path.
Weights are seeded and every tensor is randomized, including biases and RMSNorm scales (a default of 1 or 0 hides
bugs).  Shapes: hidden 64, 2 layers, 4 query heads over 2 KV heads (GQA), head_dim 16, vocab 128.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VOCAB = 128
BOS, EOS = 1, 2
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=BOS,
    eos_token_id=EOS,
)

# rope_type -> HF rope parameters; original_max_position_embeddings 32 makes llama3 scaling bite at ~40 tokens
ROPE = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
}


def _randomize(model, seed: int) -> None:
    """Seeded weights with O(1) logits: matrices N(0, 1/sqrt(fan_in)), embeddings N(0, 0.5), biases N(0, 0.1),
    norm scales 1 + N(0, 0.2)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 2:
                std = 0.5 if "embed_tokens" in name else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _save(model, out: Path, *, sharded: bool, dtype: str) -> Path:
    import torch

    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    kw = {"max_shard_size": "40KB"} if sharded else {}
    model.save_pretrained(str(out), safe_serialization=True, **kw)
    if sharded and not (out / "model.safetensors.index.json").is_file():
        raise AssertionError(f"expected a sharded checkpoint in {out}")
    return out


def make_tiny_llama(
    tmpdir,
    *,
    llama3_rope: bool = True,
    rope_type: str | None = None,
    sharded: bool = False,
    tie: bool = False,
    dtype: str = "float32",
    seed: int = 0,
    name: str | None = None,
) -> Path:
    """A random `LlamaForCausalLM`; rope_type ("default", "linear", "llama3") overrides `llama3_rope`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    rope_type = rope_type or ("llama3" if llama3_rope else "default")
    out = Path(tmpdir) / (name or f"llama-{rope_type}{'-sharded' if sharded else ''}{'-tied' if tie else ''}-{dtype}")
    torch.manual_seed(seed)
    cfg = LlamaConfig(**_COMMON, rope_parameters=dict(ROPE[rope_type]), tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    _randomize(model, seed)
    return _save(model, out, sharded=sharded, dtype=dtype)


def make_tiny_qwen2(
    tmpdir, *, sharded: bool = False, tie: bool = True, dtype: str = "float32", seed: int = 1, name: str | None = None
) -> Path:
    """A random `Qwen2ForCausalLM` (q/k/v bias; tied embeddings by default)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(tmpdir) / (name or f"qwen2{'-sharded' if sharded else ''}{'-tied' if tie else ''}-{dtype}")
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        **_COMMON,
        rope_parameters=dict(ROPE["default"], rope_theta=1000000.0),
        tie_word_embeddings=tie,
        use_sliding_window=False,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    _randomize(model, seed)
    return _save(model, out, sharded=sharded, dtype=dtype)


def load_torch(path):
    """The saved checkpoint as a transformers model (float32, eval, eager attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    """int [batch, seq] -> float32 [batch, seq, vocab] from the torch model."""
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def torch_greedy(model, prompt: np.ndarray, max_new_tokens: int) -> list[int]:
    """`generate(do_sample=False)` new tokens for one prompt (int [seq])."""
    import torch

    ids = torch.as_tensor(np.asarray(prompt)[None], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=EOS,
            eos_token_id=EOS,
        )
    return out[0, ids.shape[1] :].tolist()


def random_ids(seed: int, length: int, batch: int | None = None) -> np.ndarray:
    """Token ids in [3, VOCAB) (no BOS/EOS), int32 [length] or [batch, length]."""
    shape = (length,) if batch is None else (batch, length)
    return np.random.default_rng(seed).integers(3, VOCAB, size=shape, dtype=np.int32)


def rewrite_safetensors(src: Path, dst: Path, edit) -> Path:
    """Copy HF dir `src` to `dst` with one `model.safetensors`, its tensors passed through `edit(dict) -> dict`."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors: dict = {}
    for f in sorted(dst.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
        f.unlink()
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(edit(tensors), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def edit_config(path: Path, **changes) -> Path:
    f = Path(path) / "config.json"
    cfg = json.loads(f.read_text())
    cfg.update(changes)
    f.write_text(json.dumps(cfg, indent=2))
    return path
