"""Retaining heads (Locret / APB) checkpoints -> `RetainingHeads`.

Released heads are torch state dicts whose keys end in `layers.{i}.self_attn.fc1.weight` / `fc2.weight` (torch
[out, in] layout): fc1 [R, (H + 2 KVH) D], fc2 [KVH, R].  `.bin`/`.pt` files load with torch (weights only),
`.safetensors` directly; a directory may hold one such file.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from apb_jax.compression import RetainingHeads
from apb_jax.config import ModelConfig

_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(fc1|fc2)\.weight$")
_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HEADS_FILE = "retaining_heads.safetensors"  # the file apb_jax looks for beside a model directory


def _find_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _SUFFIXES)
        if len(files) == 1:
            return files[0]
        raise ValueError(
            f"retaining_heads={str(path)!r}: expected exactly one of {_SUFFIXES} in the directory, "
            f"found {[p.name for p in files]}"
        )
    raise FileNotFoundError(f"retaining_heads={str(path)!r} does not exist")


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a retaining-heads file as float32 numpy (torch [out, in] layout kept)."""
    f = _find_file(Path(path))
    if f.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return {k: np.asarray(v, np.float32) for k, v in load_file(str(f)).items()}
        except (TypeError, ValueError):  # bf16 safetensors: go through torch if available
            pass
        from safetensors.torch import load_file as load_torch

        return {k: v.float().numpy() for k, v in load_torch(str(f)).items()}
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is in the test extra
        raise ImportError(f"reading {f.name} needs torch (pip install torch); .safetensors files do not") from e
    sd = torch.load(str(f), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return {k: v.float().numpy() for k, v in sd.items() if hasattr(v, "float")}


def heads_from_state_dict(sd: dict[str, np.ndarray], config: ModelConfig, dtype=jnp.bfloat16) -> RetainingHeads:
    """Map `...layers.{i}.self_attn.fc{1,2}.weight` to per-layer [in, out] arrays; validate against `config`."""
    found: dict[tuple[int, str], np.ndarray] = {}
    unknown = []
    for k, v in sd.items():
        m = _KEY.search(k)
        if m is None:
            unknown.append(k)
            continue
        found[(int(m.group(1)), m.group(2))] = v
    if unknown:
        raise ValueError(
            f"unexpected tensors in the retaining-heads checkpoint (only layers.N.self_attn.fc1/fc2"
            f".weight are allowed): {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    d_in = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    fc1s, fc2s = [], []
    hidden = None
    for i in range(config.num_layers):
        for name in ("fc1", "fc2"):
            if (i, name) not in found:
                raise ValueError(
                    f"retaining heads: missing layers.{i}.self_attn.{name}.weight "
                    f"(the model has {config.num_layers} layers)"
                )
        w1, w2 = found.pop((i, "fc1")), found.pop((i, "fc2"))
        hidden = w1.shape[0] if hidden is None else hidden
        want1, want2 = (hidden, d_in), (config.num_kv_heads, hidden)
        if w1.shape != want1:
            raise ValueError(
                f"layers.{i}.self_attn.fc1.weight has shape {w1.shape}; expected {want1} "
                f"([hidden, (heads + 2 * kv_heads) * head_dim] for this model)"
            )
        if w2.shape != want2:
            raise ValueError(
                f"layers.{i}.self_attn.fc2.weight has shape {w2.shape}; expected {want2} ([kv_heads, hidden])"
            )
        fc1s.append(jnp.asarray(w1.T, dtype))
        fc2s.append(jnp.asarray(w2.T, dtype))
    if found:
        extra = sorted(f"layers.{i}.self_attn.{n}.weight" for i, n in found)
        raise ValueError(
            f"retaining heads for layers the model does not have ({config.num_layers} layers): {extra[:5]}"
        )
    return RetainingHeads(tuple(fc1s), tuple(fc2s), act=config.hidden_act)


def load_retaining_heads(path: str | Path, config: ModelConfig, dtype=jnp.bfloat16) -> RetainingHeads:
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


def save_retaining_heads(heads: RetainingHeads, path: str | Path, prefix: str = "model.") -> Path:
    """Write heads in the released format (torch [out, in] layout, keys `model.layers.{i}.self_attn.fc{1,2}.weight`)
    as .safetensors (float32)."""
    from safetensors.numpy import save_file

    path = Path(path)
    tensors = {}
    for i, (w1, w2) in enumerate(zip(heads.fc1, heads.fc2)):
        tensors[f"{prefix}layers.{i}.self_attn.fc1.weight"] = np.ascontiguousarray(np.asarray(w1, np.float32).T)
        tensors[f"{prefix}layers.{i}.self_attn.fc2.weight"] = np.ascontiguousarray(np.asarray(w2, np.float32).T)
    save_file(tensors, str(path))
    return path
