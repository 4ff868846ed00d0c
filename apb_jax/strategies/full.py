"""Single-device causal attention: cuDNN flash attention on GPU, blocked plain-XLA attention on the CPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from apb_jax.models.llama import AttnCall


def _on_gpu(x: jax.Array) -> bool:
    try:
        return all(d.platform == "gpu" for d in x.devices())
    except Exception:  # tracers inside jit: ask the default backend
        return jax.default_backend() == "gpu"


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int = 1024) -> jax.Array:
    """q [B, T, H, D], k/v [B, T, KVH, D] -> [B, T, H, D] (q.dtype); GQA without repeating K/V.

    GPU, bf16/f16: cuDNN.  GPU, float32: `chunked_causal_attention`.  Other devices: the blocked flash-style loop
    of `pallas_kernels.xla_blocked` (float32 online softmax over the key blocks each query block can see, tiles
    that stay in cache: ~10x faster on a CPU at 16K); its gradient is that of `chunked_causal_attention`.
    """
    if jax.default_backend() == "gpu":
        if q.dtype in (jnp.bfloat16, jnp.float16):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        return chunked_causal_attention(q, k, v, chunk)
    return _blocked_causal(q, k, v, chunk)


def chunked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int = 1024) -> jax.Array:
    """float32 softmax over query chunks of `chunk` rows, each against the keys up to its last row, so memory is
    O(chunk * T) and the masked upper triangle is mostly never computed.  Shapes as `causal_attention`."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d).astype(jnp.float32) / jnp.sqrt(jnp.float32(d))
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    outs = []
    for lo in range(0, t, chunk):
        hi = min(lo + chunk, t)
        s = jnp.einsum("bqkgd,bskd->bkgqs", qg[:, lo:hi], kf[:, :hi])
        mask = jnp.arange(hi)[None, :] <= jnp.arange(lo, hi)[:, None]
        p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
        outs.append(jnp.einsum("bkgqs,bskd->bqkgd", p, vf[:, :hi]))
    o = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return o.reshape(b, t, h, d).astype(q.dtype)


# The blocked loop has traced trip counts (only the key blocks a query block sees), which reverse-mode AD cannot
# go through; training differentiates `full_attention`, so the backward pass is the chunked version's.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_causal(q, k, v, chunk):
    from pallas_kernels.xla_blocked import apb_attention_xla

    out, _ = apb_attention_xla(
        q, k, v, jnp.int32(0), None, anchor_len=0, causal=True, sm_scale=1.0 / float(q.shape[-1]) ** 0.5
    )
    return out


def _blocked_causal_fwd(q, k, v, chunk):
    return _blocked_causal(q, k, v, chunk), (q, k, v)


def _blocked_causal_bwd(chunk, res, g):
    _, vjp = jax.vjp(lambda q, k, v: chunked_causal_attention(q, k, v, chunk), *res)
    return vjp(g)


_blocked_causal.defvjp(_blocked_causal_fwd, _blocked_causal_bwd)


def full_attention(call: AttnCall) -> jax.Array:
    """The `full` strategy's attention: every layer attends causally over the whole sequence on one device."""
    return causal_attention(call.q, call.k, call.v)


def attention(ctx):
    """Strategy entry point (one host): plain causal attention."""
    del ctx
    return full_attention
