"""Retaining heads (Locret / APB checkpoints) -> `RetainingHeads`.

The released format, as the public reference code defines, saves and loads it (Locret:
`locret/models/llama/modeling_llama.py`, `locret/inference/utils.py`, `locret/train/train.py` and `convert.py`;
APB: `apb/models/modeling_llama.py`, `apb/load_models.py`, `experiments_apb/APB/infinite_bench/lring/utils.py`):

- Every decoder layer's attention module owns two bias-free linears, `fc1 = Linear((H + 2 KVH) D, R)` and
  `fc2 = Linear(R, KVH)` (R = 1024 in every release; the released models all have KVH = 8), and the model's own
  activation `act = ACT2FN[config.hidden_act]` (SiLU for Llama and Qwen2).
- Their input is `cat(q_proj(x), k_proj(x), v_proj(x))` on the last axis: the projections as they leave the linear
  layers (with Qwen2's q/k/v biases), before RoPE, each flattened head-major, so the feature vector is
  [query head 0 .. H-1 | key head 0 .. KVH-1 | value head 0 .. KVH-1], D values per head.  The output
  `fc2(act(fc1(...)))` is [B, T, KVH]: column j scores the keys of KV head j.  The reference then max-pools the
  scores along the sequence (kernel 5, our `pool_kernel`) and keeps the top-P positions per KV head.
- The tensors live in a torch state dict under `model.layers.{i}.self_attn.fc1.weight` [R, (H + 2 KVH) D] and
  `model.layers.{i}.self_attn.fc2.weight` [KVH, R] (torch's [out, in] layout).  The reference loaders
  `torch.load` one file, keep the entries whose name contains "fc" and load them into the model non-strictly, so a
  released file may be a whole-model state dict: Locret's training saves the full model (`save_pretrained`,
  sharded safetensors with an index) and its `convert.py` rewrites one safetensors file as a torch `.bin`.

Mapping onto `RetainingHeads` (`apb_jax.compression`): `fc1[i] = fc1.weight.T` [(H + 2 KVH) D, R],
`fc2[i] = fc2.weight.T` [R, KVH], `act = config.hidden_act`; `retaining_head_scores` concatenates `q_raw`, `k_raw`
and `v` (the same pre-RoPE projections, in the same head-major order) and computes the same forward.

What this module reads: a `.safetensors` file, a torch `.bin` / `.pt` / `.pth` file (weights only), or a directory
holding one such file or a sharded checkpoint with its `*.index.json` (only the shards holding the heads are
opened).  Besides the head weights, only the base-model tensors of a whole Llama / Qwen2 checkpoint are allowed
(and skipped); any other name, a bias of a head included (the released heads have none), is an error naming it.
`save_retaining_heads` writes exactly the released names and shapes, as float32 safetensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from apb_jax.compression import RetainingHeads
from apb_jax.config import ModelConfig

HEAD_KEY = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(fc1|fc2)\.weight$")
EXPECTED = "model.layers.{i}.self_attn.fc1.weight / model.layers.{i}.self_attn.fc2.weight"
# the tensors of a whole Hugging Face Llama / Qwen2 checkpoint, which a released heads file may also hold
BASE_KEY = re.compile(
    r"^(?:lm_head\.weight"
    r"|model\.(?:embed_tokens\.weight|norm\.weight|rotary_emb\.inv_freq"
    r"|layers\.\d+\.(?:input_layernorm\.weight|post_attention_layernorm\.weight|self_attn\.rotary_emb\.inv_freq"
    r"|self_attn\.[qkvo]_proj\.(?:weight|bias)|mlp\.(?:gate|up|down)_proj\.(?:weight|bias))))$"
)
_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HEADS_FILE = "retaining_heads.safetensors"  # the file apb_jax looks for beside a model directory


def head_keys(names) -> list[str]:
    """The retaining-head names among `names` (a checkpoint's tensor names).  Base-model names are skipped; any
    other name raises a ValueError naming it and the expected pattern."""
    heads, unknown = [], []
    for k in names:
        if not isinstance(k, str):
            unknown.append(k)
        elif HEAD_KEY.match(k):
            heads.append(k)
        elif not BASE_KEY.match(k):
            unknown.append(k)
    if unknown:
        more = f" (and {len(unknown) - 1} more, e.g. {unknown[1]!r})" if len(unknown) > 1 else ""
        raise ValueError(
            f"retaining-heads checkpoint: unexpected tensor {unknown[0]!r}{more}; expected {EXPECTED} (torch "
            "[out, in] weights; the released heads have no biases), optionally beside the base-model tensors of a "
            "whole Llama / Qwen2 checkpoint (model.layers.{i}.self_attn.q_proj.weight, ...)"
        )
    return heads


def _checkpoint_files(path: Path) -> list[Path]:
    """The files to open: the file itself; in a directory, the shards of its `*.index.json` that hold retaining
    heads, or its one checkpoint file."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"retaining_heads={str(path)!r} does not exist")
    indexes = sorted(path.glob("*.index.json"))
    if len(indexes) == 1:
        try:
            weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{indexes[0]} is not a checkpoint index (no valid weight_map: {e})") from None
        shards = sorted({weight_map[k] for k in head_keys(weight_map)})
        if not shards:
            raise ValueError(f"{indexes[0]} names no retaining-head tensors ({EXPECTED})")
        return [path / s for s in shards]
    files = sorted(p for p in path.iterdir() if p.suffix in _SUFFIXES)
    if len(files) == 1 and not indexes:
        return files
    raise ValueError(
        f"retaining_heads={str(path)!r}: expected exactly one of {_SUFFIXES} or one *.index.json in the directory, "
        f"found {[p.name for p in files + indexes]}"
    )


def _read_safetensors(f: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(f), framework="numpy") as st:
        keys = head_keys(list(st.keys()))
        try:
            return {k: np.asarray(st.get_tensor(k), np.float32) for k in keys}
        except (TypeError, ValueError):  # bfloat16 / float8 tensors have no numpy dtype: read through torch
            pass
    with safe_open(str(f), framework="pt") as st:
        return {k: st.get_tensor(k).float().numpy() for k in keys}


def _read_torch(f: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is in the test extra
        raise ImportError(f"reading {f.name} needs torch (pip install torch); .safetensors files do not") from e
    try:  # memory-mapped: a whole-model file is not read beyond the heads
        sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files in torch's legacy (non-zip) format cannot be mapped
        sd = torch.load(str(f), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{f} holds a {type(sd).__name__}, not a state dict of retaining heads ({EXPECTED})")
    out = {}
    for k in head_keys(sd):
        if not isinstance(sd[k], torch.Tensor):
            raise ValueError(f"{f}: {k!r} is a {type(sd[k]).__name__}, not a tensor")
        out[k] = sd[k].float().numpy()
    return out


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The retaining-head tensors of a checkpoint (file or directory) as float32 numpy, keyed by their released
    names, torch [out, in] layout kept.  Base-model tensors are skipped; other names raise (see `head_keys`)."""
    out: dict[str, np.ndarray] = {}
    for f in _checkpoint_files(Path(path)):
        out.update(_read_safetensors(f) if f.suffix == ".safetensors" else _read_torch(f))
    return out


def heads_from_state_dict(sd: dict[str, np.ndarray], config: ModelConfig, dtype=jnp.bfloat16) -> RetainingHeads:
    """Map `model.layers.{i}.self_attn.fc{1,2}.weight` (torch [out, in]) to per-layer [in, out] arrays, checking
    every layer is there with the shapes `config` implies and one hidden width R throughout."""
    found: dict[tuple[int, str], np.ndarray] = {}
    for k in head_keys(sd):
        m = HEAD_KEY.match(k)
        found[(int(m.group(1)), m.group(2))] = np.asarray(sd[k])
    d_in = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    fc1s, fc2s = [], []
    hidden = None
    for i in range(config.num_layers):
        for name in ("fc1", "fc2"):
            if (i, name) not in found:
                raise ValueError(
                    f"retaining heads: missing model.layers.{i}.self_attn.{name}.weight "
                    f"(the model has {config.num_layers} layers)"
                )
        w1, w2 = found.pop((i, "fc1")), found.pop((i, "fc2"))
        hidden = w1.shape[0] if hidden is None else hidden
        want1, want2 = (hidden, d_in), (config.num_kv_heads, hidden)
        if w1.shape != want1:
            raise ValueError(
                f"model.layers.{i}.self_attn.fc1.weight has shape {w1.shape}; expected {want1} "
                f"([hidden, (heads + 2 * kv_heads) * head_dim] for this model)"
            )
        if w2.shape != want2:
            raise ValueError(
                f"model.layers.{i}.self_attn.fc2.weight has shape {w2.shape}; expected {want2} ([kv_heads, hidden])"
            )
        fc1s.append(jnp.asarray(w1.T, dtype))
        fc2s.append(jnp.asarray(w2.T, dtype))
    if found:
        extra = sorted(f"model.layers.{i}.self_attn.{n}.weight" for i, n in found)
        raise ValueError(
            f"retaining heads for layers the model does not have ({config.num_layers} layers): {extra[:5]}"
        )
    return RetainingHeads(tuple(fc1s), tuple(fc2s), act=config.hidden_act)


def load_retaining_heads(path: str | Path, config: ModelConfig, dtype=jnp.bfloat16) -> RetainingHeads:
    """Read a released (or `save_retaining_heads`) checkpoint and check it against `config`."""
    return heads_from_state_dict(read_state_dict(path), config, dtype)


def random_retaining_heads(
    config: ModelConfig, *, hidden: int = 1024, seed: int = 0, dtype=jnp.float32
) -> RetainingHeads:
    """Random heads of the released shape (for tests and benchmarks)."""
    rng = np.random.default_rng(seed)
    d_in = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    fc1 = tuple(jnp.asarray(rng.normal(0, d_in**-0.5, (d_in, hidden)), dtype) for _ in range(config.num_layers))
    fc2 = tuple(
        jnp.asarray(rng.normal(0, hidden**-0.5, (hidden, config.num_kv_heads)), dtype) for _ in range(config.num_layers)
    )
    return RetainingHeads(fc1, fc2, act=config.hidden_act)


def save_retaining_heads(heads: RetainingHeads, path: str | Path) -> Path:
    """Write heads under the released names and shapes (`model.layers.{i}.self_attn.fc{1,2}.weight`, torch
    [out, in] layout) as float32 .safetensors."""
    from safetensors.numpy import save_file

    path = Path(path)
    tensors = {}
    for i, (w1, w2) in enumerate(zip(heads.fc1, heads.fc2)):
        tensors[f"model.layers.{i}.self_attn.fc1.weight"] = np.ascontiguousarray(np.asarray(w1, np.float32).T)
        tensors[f"model.layers.{i}.self_attn.fc2.weight"] = np.ascontiguousarray(np.asarray(w2, np.float32).T)
    save_file(tensors, str(path))
    return path
