"""`load(path)`: a converted directory (orbax `params/`) or a Hugging Face directory (safetensors / bin) -> `Model`.

Params are read into host numpy arrays and made jax arrays one at a time with `jnp.asarray` (default device); the
engine replicates them onto its mesh itself, so every process of a multi-host run can call `load` alike.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from apb_jax import checkpoint as conv
from apb_jax.config import ModelConfig
from apb_jax.model import Model, abstract_module, resolve_dtype


def load(path, dtype=None) -> Model:
    """Load a model directory.

    path: a directory written by `apb-jax convert` (`apb_jax.checkpoint.convert`; has `params/`), or an HF
      checkpoint directory (`config.json` + `model.safetensors` / shards with `model.safetensors.index.json` /
      `pytorch_model.bin`).
    dtype: None keeps the checkpoint's dtype (config `dtype`/`torch_dtype`, else float32); "float32", "bfloat16",
      "float16" or a jnp dtype casts.
    """
    if path is None:
        raise ValueError("load(path): path is None")
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory {str(root)!r} does not exist")
    config = ModelConfig.from_pretrained(root)
    dt = resolve_dtype(dtype, default=config.dtype)
    module = abstract_module(config, dt)
    graphdef, state = nnx.split(module)
    expected = conv.expected_params(config, dt)
    if (root / conv.PARAMS_DIR).is_dir():
        flat = conv.restore_params(root / conv.PARAMS_DIR, expected)
    else:
        flat = conv.load_hf_params(root, config, dt)  # FileNotFoundError if there are no weights
    pure: dict = {}
    for p in list(flat):
        node = pure
        for key in p[:-1]:
            node = node.setdefault(key, {})
        node[p[-1]] = jnp.asarray(flat.pop(p))  # pop: never two host copies of the whole model
    nnx.replace_by_pure_dict(state, pure)
    return Model(config=config, graphdef=graphdef, params=state, dtype=dt, path=root)
