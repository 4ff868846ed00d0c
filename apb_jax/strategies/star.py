"""Star Attention: every host attends its block to an anchor (the document's first A tokens, A = B by default)
plus its own block causally; nothing passes between hosts."""

from __future__ import annotations

import jax.numpy as jnp

from apb_jax.models.llama import AttnCall
from apb_jax.strategies.base import HostCtx, kernel_call


def anchor_valid(ctx: HostCtx) -> jnp.ndarray:
    """bool [A]: host 0 holds the document start in its own block, so its anchor rows are masked as keys."""
    return jnp.broadcast_to(ctx.host() != 0, (ctx.layout.anchor,))


def attention(ctx: HostCtx):
    lay = ctx.layout

    def attend(call: AttnCall):
        kv_valid = None
        if lay.anchor:
            kv_valid = jnp.concatenate([anchor_valid(ctx), jnp.ones((lay.block,), bool)])
        out, _ = kernel_call(
            call.q, call.k, call.v, anchor_len=lay.anchor, kv_valid=kv_valid, backend=ctx.kernel_backend
        )
        return out

    return attend
