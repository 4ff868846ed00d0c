"""Star Attention: every host attends its block to an anchor (the document's first A tokens, A = B by default, no
query inside) plus its own block causally; nothing passes between hosts during prefill."""

from __future__ import annotations

import jax.numpy as jnp

from apb_jax.layout import Layout, block_len
from apb_jax.models.llama import AttentionFn, AttnCall
from apb_jax.strategies.base import (
    HostCtx,
    Strategy,
    anchor_key_valid,
    anchor_len_for,
    causal_pairs,
    check_lengths,
    kernel_call,
)

NAME = "star"


class Star(Strategy):
    name = NAME
    summary = "Star Attention: anchor (the document start, A = B by default) + local block, no passing"
    options = ("anchor_len",)

    def check_config(self, config) -> None:
        if config.passing_len:
            raise ValueError(f"passing_len={config.passing_len}: Star Attention passes nothing; leave it None or 0")
        super().check_config(config)

    def make_layout(self, config, doc_len: int, query_len: int) -> Layout:
        hosts = check_lengths(config.devices, doc_len, query_len)
        block = block_len(doc_len, hosts)
        a = anchor_len_for(config, doc_len, query_len, block, default=block, need=0) if hosts > 1 else 0
        return Layout(self.name, hosts, doc_len, query_len, block, anchor=a)

    def attention(self, ctx: HostCtx) -> AttentionFn:
        lay = ctx.layout

        def attend(call: AttnCall):
            kv_valid = None
            if lay.anchor:
                kv_valid = jnp.concatenate([anchor_key_valid(ctx), jnp.ones((lay.block,), bool)])
            out, _ = kernel_call(
                call.q,
                call.k,
                call.v,
                anchor_len=lay.anchor,
                kv_valid=kv_valid,
                backend=ctx.kernel_backend,
                return_lse=False,
            )
            return out

        return attend

    def attention_pairs(self, layout, host):
        a, b = layout.anchor, layout.block
        if host == 0:  # host 0's anchor duplicates its own block: masked, not useful work
            return causal_pairs(b)
        return causal_pairs(a) + b * a + causal_pairs(b)


STRATEGY = Star()
