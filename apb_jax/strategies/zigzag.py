"""Ring attention on the zigzag (load-balanced) layout: exact causal attention, even work on every host.

The document is cut into 2H chunks of c tokens; host h holds chunks h and 2H-1-h (its local block, 2c rows, in
increasing position order), so every host has one early and one late chunk and the causal triangle splits evenly.
K/V blocks travel around the mesh with ppermute as in plain ring attention; at step s host h holds the block of
host src = (h - s) mod H:
- s = 0: its own block, causally (positions increase along the block);
- src < h: every row sees src's first chunk (chunk src < h), none of its second (chunk 2H-1-src > 2H-1-h);
- src > h: only the rows of the second chunk (2H-1-h) see anything, and they see both of src's chunks.
Each step after the first is c x 2c pairs on every host.  Must be called inside the per-host program over "sp".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from apb_jax.layout import Layout, block_len
from apb_jax.models.llama import AttentionFn, AttnCall
from apb_jax.strategies.base import (
    HostCtx,
    Strategy,
    causal_pairs,
    check_lengths,
    kernel_call,
    kv_bytes_per_token,
    merge,
)

NAME = "zigzag"


class Zigzag(Strategy):
    name = NAME
    summary = "ring attention on the zigzag layout (chunks h and 2H-1-h per host): exact, load-balanced"
    exact = True

    def make_layout(self, config, doc_len: int, query_len: int) -> Layout:
        hosts = check_lengths(config.devices, doc_len, query_len)
        if hosts == 1:
            return Layout(self.name, 1, doc_len, query_len, block_len(doc_len, 1))
        return Layout(self.name, hosts, doc_len, query_len, block_len(doc_len, hosts, multiple=2), zigzag=True)

    def attention(self, ctx: HostCtx) -> AttentionFn:
        hosts, c = ctx.layout.hosts, ctx.layout.block // 2
        backend = ctx.kernel_backend

        def attend(call: AttnCall):
            q = call.q
            o, lse = kernel_call(q, call.k, call.v, anchor_len=0, backend=backend)
            o = o.astype(jnp.float32)
            if hosts == 1:
                return o.astype(q.dtype)
            h = ctx.host()
            b, rows, heads, d = q.shape

            def earlier(k, v):  # every row against the first chunk: both chunks' rows as a batch of 2b, c keys each
                halves = lambda x: jnp.repeat(x[:, :c], 2, axis=0)
                ob, lb = kernel_call(
                    q.reshape(2 * b, c, heads, d), halves(k), halves(v), anchor_len=0, causal=False, backend=backend
                )
                return ob.reshape(b, rows, heads, d).astype(jnp.float32), lb.reshape(b, rows, heads)

            def later(k, v):  # the second chunk's rows against the whole block (the first c keys as its passing part)
                ob, lb = kernel_call(q[:, c:], k, v, anchor_len=0, causal=False, backend=backend)
                zeros = jnp.zeros((b, c, heads, d), jnp.float32)
                return (
                    jnp.concatenate([zeros, ob.astype(jnp.float32)], axis=1),
                    jnp.concatenate([jnp.full((b, c, heads), -jnp.inf, jnp.float32), lb], axis=1),
                )

            def step(carry, s):
                k, v, o, lse = carry
                k, v = ctx.coll.ppermute_next((k, v))
                src = (h - s) % hosts
                ob, lb = jax.lax.cond(src < h, earlier, later, k, v)
                o, lse = merge(o, lse, ob, lb)
                return (k, v, o, lse), None

            (_, _, o, lse), _ = jax.lax.scan(step, (call.k, call.v, o, lse), jnp.arange(1, hosts))
            return o.astype(q.dtype)

        return attend

    def attention_pairs(self, layout, host):
        c = layout.block // 2
        return causal_pairs(2 * c) + (layout.hosts - 1) * c * 2 * c

    def comm_bytes(self, model, layout, batch, itemsize):
        kv = batch * layout.block * kv_bytes_per_token(model, itemsize)
        return {"all_gather": [], "ppermute": [kv] * 2 * (layout.hosts - 1), "all_to_all": []}


STRATEGY = Zigzag()
