"""What every strategy shares: the per-host context, the LSE merge, and masked partial attention for decode.

A strategy module exposes `attention(ctx: HostCtx) -> AttentionFn`: called once per host inside the per-host
program (shard_map over "sp", jax.vmap over "sp", or a single-host replay), it returns the function every layer
calls.  Strategies talk to other hosts only through `ctx.coll` (parallel.MeshCollectives or ReplayCollectives).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from apb_jax.compression import RetainingHeads
from apb_jax.parallel import Layout


@dataclasses.dataclass(frozen=True)
class HostCtx:
    layout: Layout
    coll: Any  # MeshCollectives | ReplayCollectives
    compressor: str = "query_aware"
    heads: RetainingHeads | None = None
    pool_kernel: int = 5
    kernel_backend: str | None = None  # pallas_kernels backend; None = fastest for the device

    def host(self) -> jax.Array:
        return self.coll.index()


def local_positions(layout: Layout, host) -> jax.Array:
    """int32 [B]: the document position of each local-block slot of `host`, or -1 for padding."""
    pos = host * layout.block + jnp.arange(layout.block, dtype=jnp.int32)
    return jnp.where(pos < layout.doc_len, pos, -1)


def merge(o1, l1, o2, l2):
    """Merge two attention partials over disjoint key sets.  o: [..., T, H, D] float32; l: [..., T, H] (natural-log
    sum-exp, -inf where a row saw no key).  Rows empty in both stay 0 / -inf."""
    lse = jnp.logaddexp(l1, l2)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w1 = jnp.where(jnp.isfinite(l1), jnp.exp(l1 - safe), 0.0)
    w2 = jnp.where(jnp.isfinite(l2), jnp.exp(l2 - safe), 0.0)
    return o1 * w1[..., None] + o2 * w2[..., None], lse


def merge_all(os, ls):
    """Merge H partials stacked on axis 0: os [H, ..., T, H, D], ls [H, ..., T, H]."""
    lse = jax.nn.logsumexp(ls, axis=0)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w = jnp.where(jnp.isfinite(ls), jnp.exp(ls - safe[None]), 0.0)
    return jnp.sum(os * w[..., None], axis=0), lse


def partial_attention(q, k, v, q_pos, k_pos, chunk: int = 4096):
    """Attention of a few rows over a cache, by positions: row i sees key j iff 0 <= k_pos[j] <= q_pos[i].

    q [B, t, H, D]; k, v [B, S, KVH, D]; q_pos [t] and k_pos [S] int32 (-1 marks an empty slot).
    Returns out float32 [B, t, H, D] and lse float32 [B, t, H].  Keys are processed in chunks of `chunk` with an
    online softmax, so memory stays O(t * chunk) however long the cache.
    """
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    qg = q.reshape(b, t, kvh, g, d).astype(jnp.float32) / jnp.sqrt(jnp.float32(d))
    n = -(-s // chunk) if s > chunk else 1
    size = -(-s // n)
    padn = n * size - s
    if padn:
        k = jnp.pad(k, ((0, 0), (0, padn), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, padn), (0, 0), (0, 0)))
        k_pos = jnp.pad(k_pos, (0, padn), constant_values=-1)
    kc = k.reshape(b, n, size, kvh, d)
    vc = v.reshape(b, n, size, kvh, d)
    pc = k_pos.reshape(n, size)

    def step(carry, xs):
        m, l, acc = carry
        kb, vb, pb = xs
        sc = jnp.einsum("btkgd,bskd->btkgs", qg, kb.astype(jnp.float32))
        vis = (pb[None, :] >= 0) & (pb[None, :] <= q_pos[:, None])  # [t, S]
        sc = jnp.where(vis[None, :, None, None, :], sc, -jnp.inf)
        m_new = jnp.maximum(m, sc.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(sc - m_safe[..., None])
        corr = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
        l = l * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("btkgs,bskd->btkgd", p, vb.astype(jnp.float32))
        return (m_new, l, acc), None

    init = (jnp.full((b, t, kvh, g), -jnp.inf), jnp.zeros((b, t, kvh, g)), jnp.zeros((b, t, kvh, g, d)))
    xs = (jnp.moveaxis(kc, 1, 0), jnp.moveaxis(vc, 1, 0), pc)
    (m, l, acc), _ = jax.lax.scan(step, init, xs)
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
    return out.reshape(b, t, h, d), lse.reshape(b, t, h)


def kernel_call(q, k, v, *, anchor_len, passing_valid=None, kv_valid=None, causal=True, backend=None):
    """The Pallas APB kernel on batched inputs; returns out [B, T, H, D] (q.dtype), lse [B, T, H] float32."""
    from pallas_kernels import apb_attention

    if kv_valid is not None and kv_valid.ndim == 1:
        kv_valid = jnp.broadcast_to(kv_valid, (q.shape[0], kv_valid.shape[0]))
    out, lse = apb_attention(
        q, k, v, anchor_len=anchor_len, passing_valid=passing_valid, kv_valid=kv_valid, causal=causal, backend=backend
    )
    return out, jnp.swapaxes(lse, -1, -2)
