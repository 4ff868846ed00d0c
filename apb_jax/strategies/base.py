"""What every strategy is and shares: the `Strategy` unit, the per-host context, the LSE merge, the kernel call,
the anchor rules and the decode rule most strategies use.

A strategy is one object (one file under `apb_jax/strategies/`, registered in `apb_jax/strategies/__init__.py`)
that knows four things about one way of running attention across the mesh:

- `make_layout(config, doc_len, query_len) -> Layout`: which rows and positions each host runs (validating the
  lengths the config asks for, filling in defaults);
- `attention(ctx) -> AttentionFn`: the per-layer attention of one host's prefill, called inside the per-host
  program (shard_map over "sp", jax.vmap over "sp", or a single-host replay);
- `decode_attention(ctx) -> AttentionFn`: how new tokens (the query, then each decoded token) attend the caches
  the prefill left on every host;
- the cost model: `attention_pairs(layout, host)` (visible query-key pairs per head and layer),
  `compression_flops(...)` and `comm_bytes(...)` (collective payloads per layer), from which `prefill_flops`
  assembles FLOPs and bytes per host for the benchmark, the replay and the docs.

Strategies talk to other hosts only through `ctx.coll` (`parallel.MeshCollectives`, or the replay stand-ins) and
never import each other: what two strategies share lives here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from apb_jax.compression import RetainingHeads
from apb_jax.layout import Layout, block_len
from apb_jax.models.llama import AttentionFn, AttnCall


@dataclasses.dataclass(frozen=True)
class HostCtx:
    """What one host's attention needs besides q/k/v: the layout, the collectives, the compressor settings.

    `taps`, when not None, collects named traced values a strategy exposes for debugging (e.g. the positions its
    compressor kept); the program that asked for them returns them as extra outputs.
    """

    layout: Layout
    coll: Any  # parallel.MeshCollectives | parallel.ReplayCollectives | a recording / scripted stand-in
    compressor: str = "query_aware"
    heads: RetainingHeads | None = None
    pool_kernel: int = 5
    kernel_backend: str | None = None  # pallas_kernels backend; None = chosen per call by the dispatcher
    taps: dict | None = None
    seed: int = 0  # compressor="random": the seed of its draws

    def host(self) -> jax.Array:
        return self.coll.index()

    def tap(self, name: str, value: jax.Array) -> None:
        if self.taps is not None:
            self.taps.setdefault(name, []).append(value)


@dataclasses.dataclass(frozen=True)
class DecodeCtx:
    """What new rows need to attend the caches: per layer, this host's document cache and the tail.

    doc_k, doc_v: [layers, b, B, KVH, D] (this host's local block); tail_k, tail_v: [layers, b, E, KVH, D] (the
    query and generated tokens, kept on the last host only); start: int32, the tail slot of the first new row.
    """

    layout: Layout
    coll: Any
    doc_k: jax.Array
    doc_v: jax.Array
    tail_k: jax.Array
    tail_v: jax.Array
    start: jax.Array
    kernel_backend: str | None = None

    def host(self) -> jax.Array:
        return self.coll.index()


class Strategy:
    """One way of running attention across the mesh.  Subclasses set the class attributes and override what
    differs; the defaults are the contiguous layout without anchor, the cached-attention decode rule, and a
    cost model with no compression and no prefill communication."""

    name: ClassVar[str]
    summary: ClassVar[str]
    exact: ClassVar[bool] = False  # equals full causal attention (to float32 rounding) with any settings
    single_device: ClassVar[bool] = False  # runs on exactly one host
    options: ClassVar[tuple[str, ...]] = ()  # the APBConfig fields this strategy reads (others must stay unset)

    def check_config(self, config) -> None:
        """Raise a ValueError for settings this strategy has no use for (named, with what to do instead)."""
        if self.single_device and config.devices != 1:
            raise ValueError(f"strategy={self.name!r} runs on one device; got devices={config.devices}")
        for field in ("anchor_len", "passing_len"):
            val = getattr(config, field)
            if field not in self.options and val:
                raise ValueError(f"{field}={val} has no meaning for strategy={self.name!r}; leave it None or 0")

    def check_model(self, model, hosts: int) -> None:
        """Raise a ValueError when this strategy cannot run `model` (a ModelConfig) over `hosts` hosts."""

    def make_layout(self, config, doc_len: int, query_len: int) -> Layout:
        hosts = check_lengths(config.devices, doc_len, query_len)
        return Layout(self.name, hosts, doc_len, query_len, block_len(doc_len, hosts))

    def attention(self, ctx: HostCtx) -> AttentionFn:
        raise NotImplementedError

    def decode_attention(self, ctx: DecodeCtx) -> AttentionFn:
        return cached_attention(ctx)

    def busiest_host(self, layout: Layout) -> int:
        """The host with the most prefill work (the one the benchmark replays); the last host also holds the
        query's tail."""
        return layout.hosts - 1

    # cost model ---------------------------------------------------------------------------------------------

    def attention_pairs(self, layout: Layout, host: int) -> float:
        """Visible (query, key) pairs of `host`'s prefill attention, per head and layer (what must be computed)."""
        return causal_pairs(layout.block)

    def compression_flops(self, model, layout: Layout, compressor: str, heads_hidden: int) -> float:
        """FLOPs per layer of choosing what to pass (0 for strategies that pass nothing)."""
        return 0.0

    def comm_bytes(self, model, layout: Layout, batch: int, itemsize: int) -> dict[str, list[float]]:
        """Collective payloads of one layer of the document prefill, as one host sends them:
        {"all_gather": [shard bytes, ...], "ppermute": [bytes, ...], "all_to_all": [bytes per host, ...]}."""
        return {"all_gather": [], "ppermute": [], "all_to_all": []}


def causal_pairs(n: float) -> float:
    return n * (n + 1) / 2


def check_lengths(hosts: int, doc_len: int, query_len: int) -> int:
    if doc_len < 1:
        raise ValueError(f"the document must hold at least 1 token; got doc_len={doc_len}")
    if query_len < 1:
        raise ValueError(f"the query must hold at least 1 token; got query_len={query_len}")
    if hosts < 1:
        raise ValueError(f"devices={hosts} must be >= 1")
    return hosts


def where(layout_or_block: Layout | int, doc_len: int, hosts: int) -> str:
    """The '(doc L tokens over H hosts: block B)' suffix of a length error."""
    block = layout_or_block.block if isinstance(layout_or_block, Layout) else layout_or_block
    return f"(doc {doc_len} tokens over {hosts} hosts: block {block})"


def prefill_flops(
    strategy: Strategy,
    model,
    layout: Layout,
    host: int,
    layers: int,
    compressor: str = "query_aware",
    heads_hidden: int = 1024,
) -> dict[str, float]:
    """FLOPs `host`'s document prefill must do over `layers` layers.

    The cache needs only the last layer's k and v: its q, compression, attention, o_proj and MLP feed nothing (XLA
    removes them), so that layer counts its k/v projections alone (the query, run afterwards, makes the first
    token)."""
    live = layers - 1
    kv_proj = 2.0 * model.hidden_size * 2 * model.num_kv_heads * model.head_dim
    lin = layout.rows * (linear_flops_per_row(model) * live + kv_proj)
    att = 4.0 * model.head_dim * model.num_heads * strategy.attention_pairs(layout, host) * live
    comp = strategy.compression_flops(model, layout, compressor, heads_hidden) * live
    return {"linear": lin, "attention": att, "compression": comp, "total": lin + att + comp}


def linear_flops_per_row(model) -> float:
    h, d = model.hidden_size, model.head_dim
    return 2.0 * (
        h * model.num_heads * d
        + 2 * h * model.num_kv_heads * d
        + model.num_heads * d * h
        + 3 * h * model.intermediate_size
    )


def query_flops(model, layout: Layout, host: int, layers: int) -> dict[str, float]:
    """FLOPs of the query step on `host` (the query rows against its cache; the last host also its own tail)."""
    q = layout.query_len
    lin = q * linear_flops_per_row(model) * layers
    keys = layout.block + (q + 1) / 2 if host == layout.hosts - 1 else layout.block
    att = 4.0 * model.head_dim * model.num_heads * q * keys * layers
    head = 2.0 * model.hidden_size * model.vocab_size
    return {"linear": lin + head, "attention": att, "total": lin + att + head}


def query_comm_bytes(model, layout: Layout, batch: int) -> list[float]:
    """The query step's cross-host merge: every host's partial out and LSE (float32), per layer."""
    if layout.hosts == 1:
        return []
    o = batch * layout.query_len * model.num_heads * model.head_dim * 4
    return [o, batch * layout.query_len * model.num_heads * 4]


# shared mechanics ---------------------------------------------------------------------------------------------


def anchor_len_for(config, doc_len: int, query_len: int, block: int, *, default: int, need: int) -> int:
    """Validate config.anchor_len (0 or in [need, block]); None takes `default` clipped to [need, block]."""
    hosts = config.devices
    if config.anchor_len is None:
        a = min(max(default, need), block)
        if a < need:
            raise ValueError(
                f"the query ({query_len} tokens) plus q_insert={config.q_insert} does not fit an anchor of at most "
                f"the block length {where(block, doc_len, hosts)}: need block >= {need}; use fewer devices or a "
                f"shorter query"
            )
        return a
    a = config.anchor_len
    if a != 0 and not need <= a <= block:
        allowed = f"0 or in [{need}, {block}]" if need > 0 else f"in [0, {block}]"
        raise ValueError(f"anchor_len={a} must be {allowed} {where(block, doc_len, hosts)}")
    return a


def anchor_key_valid(ctx: HostCtx) -> jax.Array:
    """bool [A]: host 0 holds the document start in its own block, so its anchor rows are masked as keys."""
    return jnp.broadcast_to(ctx.host() != 0, (ctx.layout.anchor,))


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


def kernel_call(q, k, v, *, anchor_len, passing_valid=None, kv_valid=None, causal=True, backend=None, return_lse=True):
    """The attention dispatcher (`pallas_kernels.apb_attention`) on batched inputs.

    q [B, Tq, H, D]; k, v [B, Tk, KVH, D] laid out [passing | anchor | local]; kv_valid bool [Tk] or [B, Tk].
    Returns out [B, Tq, H, D] (q.dtype) and lse [B, Tq, H] float32 (None when return_lse is False).
    """
    from pallas_kernels import apb_attention

    if kv_valid is not None and kv_valid.ndim == 1:
        kv_valid = jnp.broadcast_to(kv_valid, (q.shape[0], kv_valid.shape[0]))
    with jax.named_scope("attention/kernel"):
        out, lse = apb_attention(
            q,
            k,
            v,
            anchor_len=anchor_len,
            passing_valid=passing_valid,
            kv_valid=kv_valid,
            causal=causal,
            backend=backend,
            return_lse=return_lse,
        )
    return out, (None if lse is None else jnp.swapaxes(lse, -1, -2))


def attend_all(q, k, v, kv_valid, backend=None):
    """Rows q [B, t, H, D] against every key of k, v [B, S, KVH, D] allowed by kv_valid bool [B, S] (no causal
    order among them).  Returns out float32 [B, t, H, D], lse [B, t, H].

    Through the dispatcher: the last t keys play its "local" block with causal=False, the rest its passing
    block; when S < t, invalid keys are put in front so the call is well formed."""
    t, s = q.shape[1], k.shape[1]
    if s < t:
        pad = t - s
        k = jnp.pad(k, ((0, 0), (pad, 0), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (pad, 0), (0, 0), (0, 0)))
        kv_valid = jnp.pad(kv_valid, ((0, 0), (pad, 0)))
    o, lse = kernel_call(q, k, v, anchor_len=0, kv_valid=kv_valid, causal=False, backend=backend)
    return o.astype(jnp.float32), lse


def cached_attention(ctx: DecodeCtx) -> AttentionFn:
    """The decode rule of every strategy that leaves each host its own block's K/V: the new rows attend this
    host's document cache and (on the last host) the tail holding the query and earlier generated tokens plus
    themselves causally; an all_gather of (out, LSE) and a merge give exact attention over every host's cache.
    The new rows' K/V stay on the last host (written into its tail by the step program)."""
    lay = ctx.layout

    def attend(call: AttnCall):
        i, h = call.layer, ctx.host()
        b, t = call.q.shape[:2]
        last = h == lay.hosts - 1
        doc_valid = jnp.broadcast_to(lay.local_positions(h) >= 0, (b, lay.block))
        o1, l1 = attend_all(call.q, ctx.doc_k[i], ctx.doc_v[i], doc_valid, ctx.kernel_backend)
        # tail slots [0, start) hold earlier tokens; the new rows see them and themselves causally
        tail = ctx.tail_k.shape[2]
        keys = jnp.concatenate([ctx.tail_k[i], call.k.astype(ctx.tail_k.dtype)], axis=1)
        vals = jnp.concatenate([ctx.tail_v[i], call.v.astype(ctx.tail_v.dtype)], axis=1)
        valid = jnp.concatenate([jnp.arange(tail) < ctx.start, jnp.ones((t,), bool)]) & last
        o2, l2 = kernel_call(call.q, keys, vals, anchor_len=0, kv_valid=valid, backend=ctx.kernel_backend)
        o, lse = merge(o1, l1, o2.astype(jnp.float32), l2)
        if lay.hosts > 1:
            o, lse = merge_all(ctx.coll.all_gather(o), ctx.coll.all_gather(lse))
        return o.astype(call.q.dtype)

    return attend


def divisible_heads(name: str, heads: int, kv_heads: int, hosts: int) -> None:
    """Head-parallel strategies split the query heads over hosts, and the KV heads with them (or each host takes
    one copy of the KV head its query heads use)."""
    ok = [d for d in range(1, heads + 1) if heads % d == 0 and (kv_heads % d == 0 or d % kv_heads == 0)]
    if hosts not in ok:
        raise ValueError(
            f"strategy={name!r} splits the {heads} query heads (and {kv_heads} KV heads) over hosts: devices={hosts} "
            f"must divide the query heads and divide or be a multiple of the KV heads; allowed: {ok}"
        )


def kv_bytes_per_token(model, itemsize: int) -> int:
    return model.num_kv_heads * model.head_dim * itemsize
