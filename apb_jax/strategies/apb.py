"""APB: anchor + compressed passing blocks + local block.

Layout: host h runs rows [anchor (A) | local block h (B)]; the anchor is the document start with the query
inserted after `q_insert` tokens (positions 0..A-1).  Defaults follow the paper: A = L/32, P = L/64.

Per layer on host h: score the host's KVs and keep the top-P local positions per KV head (compressor="random":
P positions drawn uniformly instead, the ablation), all_gather the compressed K/V of every host ([H, b, P, KVH, D]
-> passing keys [b, H*P, KVH, D] in host order), and let one kernel call attend rows [anchor | local] to keys
[passing | anchor | local] with passing keys [0, h*P) visible.  The positions kept are exposed as the tap "kept"
(document positions, -1 for empty slots) for debugging.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from apb_jax.compression import gather_kv, query_aware_scores, random_select, retaining_head_scores, select_top
from apb_jax.config import PASS_ALL
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
    kv_bytes_per_token,
    where,
)

NAME = "apb"


class Apb(Strategy):
    name = NAME
    summary = "APB: anchor with the query + compressed passing blocks from earlier hosts + local block"
    options = ("anchor_len", "passing_len", "compressor", "retaining_heads")

    def make_layout(self, config, doc_len: int, query_len: int) -> Layout:
        hosts = check_lengths(config.devices, doc_len, query_len)
        block = block_len(doc_len, hosts)
        if hosts == 1:  # host 0 has neither anchor nor passing: plain causal attention
            return Layout(self.name, 1, doc_len, query_len, block)
        need = config.q_insert + query_len + 1  # doc[:q_insert] + query + at least one more document token
        a = anchor_len_for(config, doc_len, query_len, block, default=math.ceil(doc_len / 32), need=need)
        if config.passing_len is None:
            p = min(math.ceil(doc_len / 64), block)
        else:
            p = block if config.passing_len == PASS_ALL else config.passing_len
        if not 0 <= p <= block:
            raise ValueError(f"passing_len={p} must be in [0, {block}] {where(block, doc_len, hosts)}")
        if a == 0 and 0 < p < block and config.compressor == "query_aware":
            raise ValueError(
                f"compressor='query_aware' scores keys by the query rows inside the anchor, so it needs anchor_len > 0 "
                f"unless passing_len == block ({block}); got anchor_len=0, passing_len={p}"
            )
        return Layout(
            self.name,
            hosts,
            doc_len,
            query_len,
            block,
            anchor=a,
            passing=p,
            q_insert=config.q_insert,
            query_in_anchor=a > 0,
        )

    def attention(self, ctx: HostCtx) -> AttentionFn:
        lay = ctx.layout
        hosts, p = lay.hosts, lay.passing

        def attend(call: AttnCall):
            host = ctx.host()
            keys, vals = call.k, call.v
            kv_valid = ([anchor_key_valid(ctx)] if lay.anchor else []) + [jnp.ones((lay.block,), bool)]
            passing_valid = None
            if p and hosts > 1:
                k_sel, v_sel, valid = compress(ctx, call, host)
                with jax.named_scope("passing/all_gather"):
                    k_all = ctx.coll.all_gather(k_sel)  # [H, b, P, KVH, D]
                    v_all = ctx.coll.all_gather(v_sel)
                    valid_all = ctx.coll.all_gather(valid)  # [H, P]
                with jax.named_scope("passing/concat"):
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
                return_lse=False,
            )
            return out

        return attend

    def attention_pairs(self, layout, host):
        a, b = layout.anchor, layout.block
        if layout.hosts == 1:
            return causal_pairs(b)
        anchor_rows = causal_pairs(a) if host > 0 else 0.0  # host 0's anchor duplicates its own block
        anchor_keys = a if host > 0 else 0
        return anchor_rows + b * (host * layout.passing + anchor_keys) + causal_pairs(b)

    def compression_flops(self, model, layout, compressor, heads_hidden):
        if not layout.passing or layout.hosts == 1:
            return 0.0
        rows = layout.rows
        if compressor == "random":  # a few uniform draws per local key and a top-k: no matmul
            return 0.0
        if compressor == "retaining_heads":
            d_in = (model.num_heads + 2 * model.num_kv_heads) * model.head_dim
            return 2.0 * rows * (d_in * heads_hidden + heads_hidden * model.num_kv_heads)
        return 2.0 * rows * model.num_kv_heads * model.head_dim + layout.query_len * model.num_heads * model.head_dim

    def comm_bytes(self, model, layout, batch, itemsize):
        if not layout.passing or layout.hosts == 1:
            return super().comm_bytes(model, layout, batch, itemsize)
        kv = batch * layout.passing * kv_bytes_per_token(model, itemsize)
        return {"all_gather": [kv, kv, layout.passing], "ppermute": [], "all_to_all": []}


def eligible_local(ctx: HostCtx, host) -> jax.Array:
    """bool [B]: local positions compression may pass (real tokens, not among the document's first A)."""
    pos = ctx.layout.local_positions(host)
    return (pos >= 0) & (pos >= ctx.layout.anchor)


def scores(ctx: HostCtx, call: AttnCall) -> jax.Array:
    lay = ctx.layout
    if ctx.compressor == "retaining_heads":
        if ctx.heads is None:
            raise ValueError("compressor='retaining_heads' needs retaining-head weights (retaining_heads=path)")
        return retaining_head_scores(call, ctx.heads)
    return query_aware_scores(call, lay.q_insert, lay.query_len)


def compress(ctx: HostCtx, call: AttnCall, host):
    """This host's compressed block: k, v [b, P, KVH, D] and valid bool [P] (slots past the eligible count)."""
    lay = ctx.layout
    elig = eligible_local(ctx, host)
    if ctx.compressor == "random":
        with jax.named_scope("compress/random"):
            b, _, kvh, _ = call.k.shape
            idx = random_select(ctx.seed, call.layer, host, elig, b, kvh, lay.passing)  # [b, KVH, P]
    else:
        with jax.named_scope("compress/score"):
            s = scores(ctx, call)
        with jax.named_scope("compress/topk"):
            idx = select_top(s, elig, lay.anchor, lay.passing, ctx.pool_kernel)  # [b, KVH, P]
    valid = jnp.arange(lay.passing) < jnp.sum(elig)
    ctx.tap("kept", jnp.where(valid, lay.local_positions(host)[idx], -1))
    with jax.named_scope("compress/gather"):
        k_loc, v_loc = call.k[:, lay.anchor :], call.v[:, lay.anchor :]
        return gather_kv(k_loc, idx), gather_kv(v_loc, idx), valid


STRATEGY = Apb()
