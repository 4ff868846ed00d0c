"""Pure builders of the per-host programs and their jitted, mesh-wide forms.

A per-host program is what host h runs; the strategy's functions are the only part that talks to other hosts,
through the collectives object it is given (`parallel.MeshCollectives` on a mesh, `ReplayCollectives` or a
scripted stand-in in a replay).  `run_hosts` turns a per-host program into one program over every host
(`shard_map` over "sp", or `jax.vmap` over "sp" on one device), and `jax.jit` compiles it.

Three programs make a generation:
- prefill: (params, heads, tokens, positions) [b, H*(A+B)] -> document K/V cache [layers, b, H*B, KVH, D];
- query: (params, doc K/V, query tokens [b, Q], key, temperature, top_p) -> tail K/V [layers, b, H*E, KVH, D]
  holding the query, next-token logits [b, V] and the first generated token [b];
- decode: (params, doc K/V, tail K/V, first token, start, key, temperature, top_p, stop ids) -> tokens
  [b, max_new] and how many steps ran: a `lax.while_loop` on the device with on-device sampling and stop
  tokens, so no host round trip per token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from apb_jax import strategies
from apb_jax.compression import RetainingHeads
from apb_jax.layout import Layout
from apb_jax.parallel import AXIS, MeshCollectives, run_hosts
from apb_jax.strategies.base import DecodeCtx, HostCtx

SEQ = P(None, AXIS)  # [batch, H * n]
CACHE = P(None, None, AXIS)  # [layers, batch, H * n, KVH, D]
REPL = P()
PER_HOST = P(AXIS)  # [H, ...]: one entry per host


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the per-host programs need besides the layout: the compressor (and the seed of compressor="random")
    and the attention backend."""

    compressor: str = "query_aware"
    pool_kernel: int = 5
    kernel_backend: str | None = None
    seed: int = 0


def prefill_host(model, layout: Layout, coll, settings: Settings, *, doc_logits: bool = False, taps: bool = False):
    """Host h's document prefill: (params, heads, tokens [b, A+B], positions [b, A+B]) -> (k, v) each
    [layers, b, B, KVH, D] (the local block only), then logits [b, B, V] when `doc_logits`, then the strategy's
    taps {name: [1, layers, b, ...]} when `taps`."""
    graphdef, strategy = model.graphdef, strategies.get(layout.strategy)
    total = layout.doc_len + layout.query_len

    def host(params, heads: RetainingHeads | None, tokens, positions):
        module = nnx.merge(graphdef, params)
        store: dict | None = {} if taps else None
        ctx = HostCtx(
            layout,
            coll,
            compressor=settings.compressor,
            heads=heads,
            pool_kernel=settings.pool_kernel,
            kernel_backend=settings.kernel_backend,
            taps=store,
            seed=settings.seed,
        )
        hidden, (k, v) = module(tokens, positions, strategy.attention(ctx), rope_seq_len=total)
        out: tuple = (k[:, :, layout.anchor :], v[:, :, layout.anchor :])
        if doc_logits:
            out += (module.lm_logits(hidden[:, layout.anchor :]),)
        if taps:
            out += ({name: jnp.stack(vals)[None] for name, vals in store.items()},)
        return out

    return host


def step_host(model, layout: Layout, coll, settings: Settings):
    """Host h's query/decode step: new tokens [b, t] at tail slots [start, start + t) attend every host's cache
    by the strategy's decode rule.  (params, doc_k, doc_v [layers, b, B, KVH, D], tail_k, tail_v
    [layers, b, E, KVH, D], tokens [b, t], start int32) -> (tail_k, tail_v, logits [b, V] of the last new row)."""
    graphdef, strategy = model.graphdef, strategies.get(layout.strategy)
    total = layout.doc_len + layout.query_len

    def host(params, doc_k, doc_v, tail_k, tail_v, tokens, start):
        module = nnx.merge(graphdef, params)
        t = tokens.shape[1]
        positions = jnp.broadcast_to(layout.doc_len + start + jnp.arange(t, dtype=jnp.int32), tokens.shape)
        ctx = DecodeCtx(layout, coll, doc_k, doc_v, tail_k, tail_v, start, settings.kernel_backend)
        hidden, (k, v) = module(tokens, positions, strategy.decode_attention(ctx), rope_seq_len=total)
        # every host writes the new K/V; only the last host's tail is ever visible (the decode rule masks the rest)
        tail_k = jax.lax.dynamic_update_slice_in_dim(tail_k, k.astype(tail_k.dtype), start, axis=2)
        tail_v = jax.lax.dynamic_update_slice_in_dim(tail_v, v.astype(tail_v.dtype), start, axis=2)
        return tail_k, tail_v, module.lm_logits(hidden[:, -1])

    return host


def sample(logits, key, temperature, top_p):
    """Next tokens int32 [b] from logits float32 [b, V]: greedy when temperature == 0, else temperature and
    nucleus (top_p) sampling; temperature and top_p are traced scalars (no recompile per setting)."""

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled(key):
        lg = logits / temperature
        srt = jnp.sort(lg, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(srt, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # the smallest prefix whose mass reaches top_p
        cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        lg = jnp.where(lg >= cutoff, lg, -jnp.inf)
        return jax.random.categorical(key, lg, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sampled, greedy, key)


def query_host(model, layout: Layout, coll, settings: Settings, tail: int):
    """The query step with an empty tail of `tail` slots per host: (params, doc_k, doc_v, query [b, Q], key,
    temperature, top_p) -> (tail_k, tail_v, logits [b, V], first token [b])."""
    step = step_host(model, layout, coll, settings)
    cfg = model.config

    def host(params, doc_k, doc_v, query, key, temperature, top_p):
        shape = (cfg.num_layers, query.shape[0], tail, cfg.num_kv_heads, cfg.head_dim)
        empty = jnp.zeros(shape, doc_k.dtype)
        tail_k, tail_v, logits = step(params, doc_k, doc_v, empty, empty, query, jnp.int32(0))
        return tail_k, tail_v, logits, sample(logits, key, temperature, top_p)

    return host


def decode_host(model, layout: Layout, coll, settings: Settings, max_new: int):
    """The decode loop: (params, doc_k, doc_v, tail_k, tail_v, first [b], start int32, key, temperature, top_p,
    stops [S] int32) -> (tokens [b, max_new] with tokens[:, 0] = first, steps run int32, tail_k, tail_v).

    Token i (i >= 1) is chosen from the logits of token i-1, fed at tail slot start + i - 1; the loop ends when
    every row has produced a stop id or max_new tokens exist.  Rows that stopped keep running (their later
    tokens are dropped by the caller), so the batch stays one array."""
    step = step_host(model, layout, coll, settings)

    def host(params, doc_k, doc_v, tail_k, tail_v, first, start, key, temperature, top_p, stops):
        out = jnp.zeros((first.shape[0], max_new), jnp.int32).at[:, 0].set(first)
        done = jnp.isin(first, stops)

        def cond(c):
            i, _, _, _, _, done, _ = c
            return (i < max_new) & ~jnp.all(done)

        def body(c):
            i, tok, tk, tv, out, done, key = c
            tk, tv, logits = step(params, doc_k, doc_v, tk, tv, tok[:, None], start + i - 1)
            key, sub = jax.random.split(key)
            nxt = sample(logits, sub, temperature, top_p)
            out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
            return i + 1, nxt, tk, tv, out, done | jnp.isin(nxt, stops), key

        init = (jnp.int32(1), first, tail_k, tail_v, out, done, key)
        i, _, tail_k, tail_v, out, _, _ = jax.lax.while_loop(cond, body, init)
        return out, i, tail_k, tail_v

    return host


def build_prefill(model, layout: Layout, mesh, mode: str, settings: Settings, *, doc_logits=False, taps=False):
    host = prefill_host(model, layout, MeshCollectives(layout.hosts), settings, doc_logits=doc_logits, taps=taps)
    outs = (CACHE, CACHE) + ((SEQ,) if doc_logits else ()) + ((PER_HOST,) if taps else ())
    return jax.jit(run_hosts(host, mesh, layout.hosts, (REPL, REPL, SEQ, SEQ), outs, mode))


def build_step(model, layout: Layout, mesh, mode: str, settings: Settings):
    host = step_host(model, layout, MeshCollectives(layout.hosts), settings)
    ins = (REPL, CACHE, CACHE, CACHE, CACHE, REPL, REPL)
    return jax.jit(run_hosts(host, mesh, layout.hosts, ins, (CACHE, CACHE, REPL), mode), donate_argnums=(3, 4))


def build_query(model, layout: Layout, mesh, mode: str, settings: Settings, tail: int):
    host = query_host(model, layout, MeshCollectives(layout.hosts), settings, tail)
    ins = (REPL, CACHE, CACHE, REPL, REPL, REPL, REPL)
    return jax.jit(run_hosts(host, mesh, layout.hosts, ins, (CACHE, CACHE, REPL, REPL), mode))


def build_decode(model, layout: Layout, mesh, mode: str, settings: Settings, max_new: int):
    host = decode_host(model, layout, MeshCollectives(layout.hosts), settings, max_new)
    ins = (REPL, CACHE, CACHE, CACHE, CACHE, REPL, REPL, REPL, REPL, REPL, REPL)
    outs = (REPL, REPL, CACHE, CACHE)
    return jax.jit(run_hosts(host, mesh, layout.hosts, ins, outs, mode), donate_argnums=(3, 4))


__all__: list[Any] = [
    "CACHE",
    "PER_HOST",
    "REPL",
    "SEQ",
    "Settings",
    "build_decode",
    "build_prefill",
    "build_query",
    "build_step",
    "decode_host",
    "prefill_host",
    "query_host",
    "sample",
    "step_host",
]
