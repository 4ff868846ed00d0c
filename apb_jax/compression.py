"""Block compression, as APB does it: score every KV of a host's sequence, max-pool, keep the top-P local positions
per KV head.

Two scorers, both returning float32 [B, T, KVH] over the host's whole sequence [anchor | local]:
- `retaining_head_scores`: Locret's MLP fc2(act(fc1(concat(q, k, v)))) on the projections before RoPE (the released
  weights and how they map here: `apb_jax.retaining_heads`).
- `query_aware_scores`: training-free (Spava's cheap form): k . q_bar, with q_bar the mean over the anchor's query
  rows and over the query heads of each KV group (after RoPE), in float32.

And one selection without scores, the ablation: `random_select` keeps P eligible positions chosen uniformly at
random (per row, layer, host and KV head; deterministic given a seed).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from apb_jax.models.llama import AttnCall, activation


@dataclasses.dataclass(frozen=True)
class RetainingHeads:
    """Per-layer Locret weights in [in, out] layout: fc1 [(H + 2 KVH) D, R], fc2 [R, KVH]."""

    fc1: tuple[jax.Array, ...]
    fc2: tuple[jax.Array, ...]
    act: str = "silu"

    def tree_flatten(self):
        return (self.fc1, self.fc2), self.act

    @classmethod
    def tree_unflatten(cls, act, children):
        return cls(*children, act=act)


jax.tree_util.register_pytree_node(RetainingHeads, RetainingHeads.tree_flatten, RetainingHeads.tree_unflatten)


def retaining_head_scores(call: AttnCall, heads: RetainingHeads) -> jax.Array:
    """[B, T, KVH] float32 scores from the layer's retaining head on pre-RoPE q, k and v."""
    b, t = call.q_raw.shape[:2]
    x = jnp.concatenate([call.q_raw.reshape(b, t, -1), call.k_raw.reshape(b, t, -1), call.v.reshape(b, t, -1)], axis=-1)
    fc1, fc2 = heads.fc1[call.layer], heads.fc2[call.layer]
    hid = activation(heads.act)(jnp.dot(x.astype(fc1.dtype), fc1, preferred_element_type=jnp.float32))
    return jnp.dot(hid.astype(fc2.dtype), fc2, preferred_element_type=jnp.float32)


def query_aware_scores(call: AttnCall, query_start: int, query_len: int) -> jax.Array:
    """[B, T, KVH] float32: each key's dot product with the mean query vector of its KV group.

    The query rows are [query_start, query_start + query_len) of the host's sequence (inside the anchor).
    """
    b, _t, h, d = call.q.shape
    kvh = call.k.shape[2]
    qrows = jax.lax.dynamic_slice_in_dim(call.q, query_start, query_len, axis=1).astype(jnp.float32)
    q_bar = qrows.reshape(b, query_len, kvh, h // kvh, d).mean(axis=(1, 3))  # [B, KVH, D]
    return jnp.einsum("btkd,bkd->btk", call.k.astype(jnp.float32), q_bar) / jnp.sqrt(jnp.float32(d))


def max_pool(scores: jax.Array, kernel: int) -> jax.Array:
    """Max over a window of `kernel` (odd) positions centred on each, along axis 1; -inf beyond the ends."""
    if kernel == 1:
        return scores
    pad = kernel // 2
    return jax.lax.reduce_window(scores, -jnp.inf, jax.lax.max, (1, kernel, 1), (1, 1, 1), ((0, 0), (pad, pad), (0, 0)))


def select_top(scores: jax.Array, eligible: jax.Array, anchor_len: int, passing_len: int, pool_kernel: int):
    """Pick the top-`passing_len` local positions per KV head.

    scores: [B, A + Bl, KVH] over the host's sequence; eligible: bool [Bl] (local positions that may be passed:
    real tokens, not among the document's first A).  Scores of non-eligible positions are dropped before the pool
    (padding never sways a neighbour) and the pooled scores of non-eligible positions are -inf.
    Returns idx int32 [B, KVH, P] into the local block, ordered by score.
    """
    valid_rows = jnp.concatenate([jnp.ones((anchor_len,), bool), eligible])
    s = jnp.where(valid_rows[None, :, None], scores, -jnp.inf)
    s = max_pool(s, pool_kernel)[:, anchor_len:]
    s = jnp.where(eligible[None, :, None], s, -jnp.inf)
    _, idx = jax.lax.top_k(jnp.swapaxes(s, 1, 2), passing_len)  # [B, KVH, P]
    return idx.astype(jnp.int32)


def random_select(seed: int, layer: int, host, eligible: jax.Array, batch: int, kv_heads: int, passing_len: int):
    """P distinct local positions per (row, KV head), drawn uniformly among the eligible ones: no scoring.

    Every local position gets a uniform key from a stream fixed by (seed, layer, host) and the P largest keys win,
    which is a uniformly random P-subset in random order.  Non-eligible positions get -inf, so, as with
    `select_top`, they fill only the slots past the eligible count (which the strategy marks invalid).
    `host` may be traced (the mesh axis index).  Returns idx int32 [batch, kv_heads, P] into the local block.
    """
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), layer), host)
    u = jax.random.uniform(key, (batch, kv_heads, eligible.shape[0]), jnp.float32)
    u = jnp.where(eligible[None, None, :], u, -jnp.inf)
    _, idx = jax.lax.top_k(u, passing_len)
    return idx.astype(jnp.int32)


def gather_kv(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, T, KVH, D] at per-head positions idx [B, KVH, P] -> [B, P, KVH, D]."""
    xt = jnp.swapaxes(x, 1, 2)  # [B, KVH, T, D]
    g = jnp.take_along_axis(xt, idx[..., None], axis=2)  # [B, KVH, P, D]
    return jnp.swapaxes(g, 1, 2)
