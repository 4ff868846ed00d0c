"""`Model`: a loaded decoder (config + NNX graph + params) with a plain full-attention `logits` call.

Params live as an `nnx.State` so jitted functions take them as an ordinary pytree argument; `module()` rebuilds the
NNX module (inside or outside jit) with `nnx.merge`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apb_jax.config import ModelConfig
from apb_jax.models.llama import LlamaForCausalLM
from apb_jax.strategies.full import causal_attention

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: Any, default: str = "bfloat16") -> jnp.dtype:
    """None -> `default`; "float32"/"bfloat16"/"float16" or a jnp dtype -> jnp dtype.  Anything else is an error."""
    if dtype is None:
        dtype = default
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; allowed: {tuple(_DTYPES)} or a jnp float dtype")
        return jnp.dtype(_DTYPES[dtype])
    dt = jnp.dtype(dtype)
    if dt not in [jnp.dtype(d) for d in _DTYPES.values()]:
        raise ValueError(f"dtype={dt} is not supported; allowed: {tuple(_DTYPES)}")
    return dt


def abstract_module(config: ModelConfig, dtype) -> LlamaForCausalLM:
    """The module with shape-only params (no memory): the target a checkpoint is mapped onto."""
    dtype = resolve_dtype(dtype)
    return nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))


@dataclasses.dataclass
class Model:
    """A decoder ready to run.  `params` is an nnx.State of jax arrays (replicated where a mesh is used)."""

    config: ModelConfig
    graphdef: Any
    params: Any
    dtype: jnp.dtype
    path: Path | None = None  # where it was loaded from (tokenizer files live there)

    @classmethod
    def random(cls, config: ModelConfig, *, dtype=None, seed: int = 0) -> Model:
        """Random weights (N(0, 0.02)), for tests and benchmarks."""
        dt = resolve_dtype(dtype, config.dtype)
        module = LlamaForCausalLM(config, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(seed))
        graphdef, params = nnx.split(module)
        return cls(config=config, graphdef=graphdef, params=params, dtype=dt)

    def module(self, params=None) -> LlamaForCausalLM:
        return nnx.merge(self.graphdef, self.params if params is None else params)

    def logits(self, input_ids) -> jax.Array:
        """int32 [batch, seq] -> float32 [batch, seq, vocab], full causal attention on one device."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq]; got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids out of range [0, {self.config.vocab_size})")
        return _logits_fn(self.graphdef)(self.params, jnp.asarray(ids, jnp.int32))

    def tokenizer(self):
        """The HF tokenizer saved beside the checkpoint (transformers.AutoTokenizer), with its chat template."""
        if self.path is None:
            raise ValueError("this model was not loaded from a directory, so it has no tokenizer files")
        return load_tokenizer(self.path)


def load_tokenizer(path):
    """The HF tokenizer in model directory `path`, or a ValueError naming the directory."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"no usable tokenizer in {path} ({type(e).__name__}: {str(e)[:200]}); a converted "
            "directory holds tokenizer.json / tokenizer_config.json copied from the HF checkpoint"
        ) from None


def forward_logits(graphdef, params, ids: jax.Array, attention_backend: str | None = None) -> jax.Array:
    """int32 [batch, seq] -> float32 logits [batch, seq, vocab]: positions 0.., full causal attention (traceable:
    `Model.logits` jits it, training differentiates it).  `attention_backend` None lets the dispatcher choose (the
    Mosaic kernel on a Hopper GPU); to differentiate on a GPU pass "cudnn" (the Pallas kernels are forward-only; the
    CPU default has a backward pass)."""
    module = nnx.merge(graphdef, params)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    hidden, _ = module(ids, pos, lambda call: causal_attention(call, attention_backend), rope_seq_len=ids.shape[1])
    return module.lm_logits(hidden)


@functools.lru_cache(maxsize=16)
def _logits_fn(graphdef):
    return jax.jit(functools.partial(forward_logits, graphdef))
