"""APB: anchor + compressed passing blocks + local block (APB_SPEC §2-§4).

Per layer on host h: score the host's KVs, keep the top-P local positions per KV head, all_gather the compressed
K/V of every host ([H, B, P, KVH, D] -> passing keys [B, H*P, KVH, D] in host order), and let one kernel call
attend rows [anchor | local] to keys [passing | anchor | local] with passing keys [0, h*P) visible.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from apb_jax.compression import gather_kv, query_aware_scores, retaining_head_scores, select_top
from apb_jax.models.llama import AttnCall
from apb_jax.strategies.base import HostCtx, kernel_call, local_positions
from apb_jax.strategies.star import anchor_valid


def eligible_local(ctx: HostCtx, host) -> jax.Array:
    """bool [B]: local positions compression may pass (real tokens, not among the document's first A)."""
    pos = local_positions(ctx.layout, host)
    return (pos >= 0) & (pos >= ctx.layout.anchor)


def scores(ctx: HostCtx, call: AttnCall) -> jax.Array:
    lay = ctx.layout
    if ctx.compressor == "retaining_heads":
        if ctx.heads is None:
            raise ValueError("compressor='retaining_heads' needs retaining-head weights (retaining_heads=path)")
        return retaining_head_scores(call, ctx.heads)
    return query_aware_scores(call, lay.q_insert, lay.query_len)


def compress(ctx: HostCtx, call: AttnCall, host):
    """This host's compressed block: k, v [B, P, KVH, D] and valid bool [P] (slots past the eligible count)."""
    lay = ctx.layout
    elig = eligible_local(ctx, host)
    idx = select_top(scores(ctx, call), elig, lay.anchor, lay.passing, ctx.pool_kernel)
    k_loc, v_loc = call.k[:, lay.anchor :], call.v[:, lay.anchor :]
    valid = jnp.arange(lay.passing) < jnp.sum(elig)
    return gather_kv(k_loc, idx), gather_kv(v_loc, idx), valid


def attention(ctx: HostCtx):
    lay = ctx.layout
    hosts, p = lay.hosts, lay.passing

    def attend(call: AttnCall):
        host = ctx.host()
        keys, vals = call.k, call.v
        kv_valid = ([anchor_valid(ctx)] if lay.anchor else []) + [jnp.ones((lay.block,), bool)]
        passing_valid = None
        if p and hosts > 1:
            k_sel, v_sel, valid = compress(ctx, call, host)
            k_all = ctx.coll.all_gather(k_sel)  # [H, B, P, KVH, D]
            v_all = ctx.coll.all_gather(v_sel)
            valid_all = ctx.coll.all_gather(valid)  # [H, P]
            b = call.k.shape[0]
            k_pass = jnp.moveaxis(k_all, 0, 1).reshape(b, hosts * p, *k_sel.shape[2:])
            v_pass = jnp.moveaxis(v_all, 0, 1).reshape(b, hosts * p, *v_sel.shape[2:])
            keys = jnp.concatenate([k_pass, keys], axis=1)
            vals = jnp.concatenate([v_pass, vals], axis=1)
            kv_valid = [valid_all.reshape(-1)] + kv_valid
            passing_valid = (host * p).astype(jnp.int32)
        kv_valid = jnp.concatenate(kv_valid) if len(kv_valid) > 1 else None
        out, _ = kernel_call(
            call.q,
            keys,
            vals,
            anchor_len=lay.anchor,
            passing_valid=passing_valid,
            kv_valid=kv_valid,
            backend=ctx.kernel_backend,
        )
        return out

    return attend
