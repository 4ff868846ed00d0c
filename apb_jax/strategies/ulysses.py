"""DeepSpeed-Ulysses: sequence-sharded activations, head-sharded attention.

Host h holds the contiguous block h of every layer's input.  For attention, one all_to_all per tensor turns
"my tokens, all heads" into "all tokens, my heads": q [b, B, H, D] -> [b, H*B... i.e. n B, H/n, D] (n hosts), and
likewise k and v; every host runs exact causal attention over the whole (padded) sequence for its H/n query heads;
one all_to_all brings the output back to [b, B, H, D].  Exact, so it equals full attention.

GQA: with KVH divisible by n each host takes KVH/n KV heads (those its query heads use); with n a multiple of KVH,
each KV head is copied n/KVH times first so every host gets the one KV head its query heads share.  Other head
counts are refused (`check_model`).
"""

from __future__ import annotations

import jax.numpy as jnp

from apb_jax.models.llama import AttentionFn, AttnCall
from apb_jax.strategies.base import HostCtx, Strategy, causal_pairs, divisible_heads, kernel_call

NAME = "ulysses"


class Ulysses(Strategy):
    name = NAME
    summary = "DeepSpeed-Ulysses: all-to-all from sequence to heads, exact attention per head group, and back"
    exact = True

    def check_model(self, model, hosts: int) -> None:
        divisible_heads(self.name, model.num_heads, model.num_kv_heads, hosts)

    def attention(self, ctx: HostCtx) -> AttentionFn:
        n = ctx.layout.hosts

        def attend(call: AttnCall):
            if n == 1:
                return kernel_call(call.q, call.k, call.v, anchor_len=0, backend=ctx.kernel_backend, return_lse=False)[
                    0
                ]
            kvh = call.k.shape[2]
            k, v = call.k, call.v
            if kvh % n:  # fewer KV heads than hosts: one copy of the shared KV head per host
                k, v = jnp.repeat(k, n // kvh, axis=2), jnp.repeat(v, n // kvh, axis=2)
            # [b, B, heads, D] -> [b, n B, heads / n, D]: every token, this host's heads
            q2, k2, v2 = (ctx.coll.all_to_all(x, split_axis=2, concat_axis=1) for x in (call.q, k, v))
            o2, _ = kernel_call(q2, k2, v2, anchor_len=0, backend=ctx.kernel_backend, return_lse=False)
            return ctx.coll.all_to_all(o2, split_axis=1, concat_axis=2)  # [b, n B, H / n, D] -> [b, B, H, D]

        return attend

    def attention_pairs(self, layout, host):
        # H / n heads over the whole padded sequence, counted per head of all H
        return causal_pairs(layout.padded_len) / layout.hosts

    def comm_bytes(self, model, layout, batch, itemsize):
        n = layout.hosts
        if n == 1:
            return super().comm_bytes(model, layout, batch, itemsize)
        kv_heads = max(model.num_kv_heads, n)
        q = batch * layout.block * model.num_heads * model.head_dim * itemsize
        kv = batch * layout.block * kv_heads * model.head_dim * itemsize
        return {"all_gather": [], "ppermute": [], "all_to_all": [q, kv, kv, q]}


STRATEGY = Ulysses()
