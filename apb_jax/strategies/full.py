"""Single-device causal attention: cuDNN flash attention on GPU, a plain jnp softmax elsewhere."""
from __future__ import annotations

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

    Off the GPU: float32 softmax over query chunks of `chunk` rows, each against the keys up to its last row, so
    memory is O(chunk * T) and the masked upper triangle is mostly never computed.
    """
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
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


def full_attention(call: AttnCall) -> jax.Array:
    """The `full` strategy's attention: every layer attends causally over the whole sequence on one device."""
    return causal_attention(call.q, call.k, call.v)


def attention(ctx):
    """Strategy entry point (one host): plain causal attention."""
    del ctx
    return full_attention
