"""Flax NNX decoder for Llama-2/3.x and Qwen2/2.5.

The model knows nothing about devices or meshes: every layer hands its projections to an `attention` callable
chosen outside (a strategy) and gets the attention output back.  Shapes: tokens [B, T]; q [B, T, H, D];
k, v [B, T, KVH, D].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from apb_jax.config import ModelConfig
from apb_jax.models.rope import apply_rope, inv_frequencies


@dataclasses.dataclass(frozen=True)
class AttnCall:
    """What one layer hands to the attention strategy.

    q: [B, T, H, D] and k: [B, T, KVH, D] after RoPE; v: [B, T, KVH, D]; q_raw / k_raw before RoPE (the retaining
    heads score these).  `layer` is the layer index (a Python int).
    """

    layer: int
    q: jax.Array
    k: jax.Array
    v: jax.Array
    q_raw: jax.Array
    k_raw: jax.Array


class AttentionFn(Protocol):
    def __call__(self, call: AttnCall) -> jax.Array:  # -> [B, T, H, D] in q.dtype
        ...


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    return _ACTIVATIONS[name]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # HF casts back to the input dtype before the weight multiply
        return (self.scale[...].astype(self.dtype) * xf.astype(self.dtype)).astype(self.dtype)


def _linear(i, o, bias, *, dtype, param_dtype, rngs):
    return nnx.Linear(
        i, o, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=nnx.initializers.normal(0.02)
    )


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = _linear(h, cfg.num_heads * d, cfg.qkv_bias, **kw)
        self.k_proj = _linear(h, cfg.num_kv_heads * d, cfg.qkv_bias, **kw)
        self.v_proj = _linear(h, cfg.num_kv_heads * d, cfg.qkv_bias, **kw)
        self.o_proj = _linear(cfg.num_heads * d, h, cfg.o_bias, **kw)
        self.cfg = cfg


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, **kw)
        self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, **kw)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, **kw)
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, **kw, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, **kw, rngs=rngs)


class LlamaForCausalLM(nnx.Module):
    """Llama / Qwen2 causal LM.  Param names follow the HF checkpoint (`layers[i].self_attn.q_proj.kernel`, ...)."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, **kw, rngs=rngs, embedding_init=nnx.initializers.normal(0.02)
        )
        self.layers = nnx.List([DecoderLayer(cfg, **kw, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, False, **kw, rngs=rngs)

    def __call__(
        self, tokens: jax.Array, positions: jax.Array, attention: AttentionFn, rope_seq_len: int | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """tokens, positions: int [B, T] -> (final-normed hidden [B, T, hidden], (k, v) each [L, B, T, KVH, D]).

        k is after RoPE: exactly what a cache holds.  `rope_seq_len` is the total length (dynamic RoPE only).
        """
        cfg = self.config
        inv_freq = jnp.asarray(inv_frequencies(cfg.rope, cfg.head_dim, rope_seq_len))
        b, t = tokens.shape
        with jax.named_scope("embed"):
            x = self.embed_tokens(tokens).astype(self.dtype)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            with jax.named_scope("norm"):
                h = layer.input_layernorm(x)
            with jax.named_scope("qkv_proj"):
                q_raw = attn.q_proj(h).reshape(b, t, cfg.num_heads, cfg.head_dim)
                k_raw = attn.k_proj(h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
                v = attn.v_proj(h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
            with jax.named_scope("rope"):
                q = apply_rope(q_raw, positions, inv_freq)
                k = apply_rope(k_raw, positions, inv_freq)
            with jax.named_scope("attention"):
                o = attention(AttnCall(layer=i, q=q, k=k, v=v, q_raw=q_raw, k_raw=k_raw))
            with jax.named_scope("o_proj"):
                x = x + attn.o_proj(o.reshape(b, t, cfg.num_heads * cfg.head_dim).astype(self.dtype))
            with jax.named_scope("norm"):
                h = layer.post_attention_layernorm(x)
            with jax.named_scope("mlp"):
                x = x + layer.mlp(h)
            ks.append(k)
            vs.append(v)
        return self.norm(x), (jnp.stack(ks), jnp.stack(vs))

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., hidden_size] -> float32 logits [..., vocab]."""
        with jax.named_scope("lm_head"):
            return self._lm_logits(hidden)

    def _lm_logits(self, hidden: jax.Array) -> jax.Array:
        if self.config.tie_word_embeddings:
            w = self.embed_tokens.embedding[...].astype(self.dtype)
            return jnp.einsum("...h,vh->...v", hidden.astype(self.dtype), w, preferred_element_type=jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)
