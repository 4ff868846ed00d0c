"""Ring attention: exact causal attention with K/V blocks passed around the mesh (ppermute) and an LSE merge.

Host h holds block h.  Step s (0..H-1) sees block (h - s) mod H: the diagonal block causally at s = 0, earlier
blocks fully, later ones (h - s < 0) skipped.  Must be called inside the per-host program over "sp".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from apb_jax.models.llama import AttnCall
from apb_jax.strategies.base import HostCtx, kernel_call, merge


def attention(ctx: HostCtx):
    hosts = ctx.layout.hosts

    def attend(call: AttnCall):
        host = ctx.host()
        q = call.q
        o, lse = kernel_call(q, call.k, call.v, anchor_len=0, backend=ctx.kernel_backend)
        o = o.astype(jnp.float32)
        if hosts == 1:
            return o.astype(q.dtype)

        def off_diagonal(k, v):
            ob, lb = kernel_call(q, k, v, anchor_len=0, causal=False, backend=ctx.kernel_backend)
            return ob.astype(jnp.float32), lb

        def skip(k, v):
            return jnp.zeros(o.shape, jnp.float32), jnp.full(lse.shape, -jnp.inf, jnp.float32)

        def step(carry, s):
            k, v, o, lse = carry
            k, v = ctx.coll.ppermute_next((k, v))
            ob, lb = jax.lax.cond(host - s >= 0, off_diagonal, skip, k, v)
            o, lse = merge(o, lse, ob, lb)
            return (k, v, o, lse), None

        (_, _, o, lse), _ = jax.lax.scan(step, (call.k, call.v, o, lse), jnp.arange(1, hosts))
        return o.astype(q.dtype)

    return attend
