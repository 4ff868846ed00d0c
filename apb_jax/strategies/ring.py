"""Ring attention: exact causal attention with K/V blocks passed around the mesh (ppermute) and an LSE merge.

Host h holds the contiguous block h.  Step s (0..H-1) sees block (h - s) mod H: the diagonal block causally at
s = 0, earlier blocks fully, later ones (h - s < 0) skipped, so host H-1 does H times the work of host 0 (see
`zigzag` for the balanced layout).  Must be called inside the per-host program over "sp".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from apb_jax.models.llama import AttentionFn, AttnCall
from apb_jax.strategies.base import HostCtx, Strategy, causal_pairs, kernel_call, kv_bytes_per_token, merge

NAME = "ring"


class Ring(Strategy):
    name = NAME
    summary = "ring attention: K/V blocks travel around the mesh, exact (contiguous blocks)"
    exact = True

    def attention(self, ctx: HostCtx) -> AttentionFn:
        hosts = ctx.layout.hosts

        def attend(call: AttnCall):
            host = ctx.host()
            q = call.q
            o, lse = kernel_call(q, call.k, call.v, anchor_len=0, backend=ctx.kernel_backend)
            o = o.astype(jnp.float32)
            if hosts == 1:
                return o.astype(q.dtype)

            def earlier(k, v):
                ob, lb = kernel_call(q, k, v, anchor_len=0, causal=False, backend=ctx.kernel_backend)
                return ob.astype(jnp.float32), lb

            def later(k, v):
                return jnp.zeros(o.shape, jnp.float32), jnp.full(lse.shape, -jnp.inf, jnp.float32)

            def step(carry, s):
                k, v, o, lse = carry
                k, v = ctx.coll.ppermute_next((k, v))
                ob, lb = jax.lax.cond(host - s >= 0, earlier, later, k, v)
                o, lse = merge(o, lse, ob, lb)
                return (k, v, o, lse), None

            (_, _, o, lse), _ = jax.lax.scan(step, (call.k, call.v, o, lse), jnp.arange(1, hosts))
            return o.astype(q.dtype)

        return attend

    def attention_pairs(self, layout, host):
        b = layout.block
        return causal_pairs(b) + host * b * b

    def comm_bytes(self, model, layout, batch, itemsize):
        kv = batch * layout.block * kv_bytes_per_token(model, itemsize)
        return {"all_gather": [], "ppermute": [kv] * 2 * (layout.hosts - 1), "all_to_all": []}


STRATEGY = Ring()
