"""The engine: jit-compiled sequence-parallel prefill, the KV cache it leaves, and decoding with an LSE merge.

Flow (APB_SPEC §1-§5): the document is split over H hosts (`parallel.make_layout` / `host_rows`); one
`jax.jit(shard_map(...))` runs the whole decoder on every host's rows [anchor | local] with the chosen strategy's
attention and keeps each host's local K/V as its cache (padding marked empty).  The query then runs at the end of
the sequence (positions L..L+Q-1): every host attends it to its own cache, an all_gather of (out, lse) and an LSE
merge give exact attention over the whole cache, and only the last host keeps the new K/V (its "tail").  Decoding
repeats that one token at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from apb_jax.compression import RetainingHeads
from apb_jax.config import APBConfig
from apb_jax.model import Model
from apb_jax.parallel import (
    Layout,
    MeshCollectives,
    global_array,
    host_rows,
    make_layout,
    make_mesh,
    replicate,
    run_hosts,
    to_host,
)
from apb_jax.strategies import REGISTRY
from apb_jax.strategies.base import HostCtx, local_positions, merge, merge_all, partial_attention

SEQ = P(None, "sp")  # [batch, H * n]
CACHE = P(None, None, "sp")  # [layers, batch, H * n, KVH, D]
REPL = P()


@dataclasses.dataclass
class Cache:
    """Per-host K/V after prefill.  doc_*: [layers, batch, H*B, KVH, D] (host h's local block at h*B..; padding
    slots empty); tail_*: [layers, batch, H*E, KVH, D] (query and generated tokens; only the last host's count)."""

    doc_k: jax.Array
    doc_v: jax.Array
    tail_k: jax.Array
    tail_v: jax.Array
    layout: Layout
    used: int = 0  # tail slots filled so far


@dataclasses.dataclass
class GenerateOutput:
    tokens: list  # list[int] for 1-D inputs, list[list[int]] for a batch
    prefill_seconds: float  # document prefill + query -> first token
    decode_seconds: float
    compile_seconds: float
    doc_prefill_seconds: float
    layout: Layout
    first_logits: np.ndarray | None = None  # float32 [batch, vocab]

    @property
    def tokens_per_second(self) -> float:
        n = len(self.tokens[0]) if self.tokens and isinstance(self.tokens[0], list) else len(self.tokens)
        return (n - 1) / self.decode_seconds if n > 1 and self.decode_seconds > 0 else float("nan")


@dataclasses.dataclass
class PrefillOutput:
    cache: Cache
    logits: np.ndarray  # float32 [batch, vocab]: next-token logits after the query
    doc_logits: np.ndarray | None  # float32 [batch, L, vocab] when asked for (tests)
    doc_prefill_seconds: float
    query_seconds: float
    compile_seconds: float


class Engine:
    """Prefill + decode for one model over `devices` hosts with one strategy.

    Engine(model, strategy="apb", devices=4, anchor_len=None, passing_len=None, compressor="query_aware")
    mode="mesh" runs one host per device (shard_map); mode="vmap" emulates `devices` hosts on one device
    (jax.vmap with axis_name "sp": same per-host program, used for accuracy runs on one GPU).
    """

    def __init__(
        self,
        model: Model,
        strategy: str = "full",
        devices: int | None = None,
        anchor_len: int | None = None,
        passing_len: int | None = None,
        compressor: str | None = None,
        retaining_heads: Any = None,
        q_insert: int = 16,
        pool_kernel: int = 5,
        mode: str = "mesh",
        kernel_backend: str | None = None,
        mesh=None,
    ):
        if not isinstance(model, Model):
            raise TypeError(f"model must be an apb_jax Model (from apb_jax.load); got {type(model).__name__}")
        if mode not in ("mesh", "vmap"):
            raise ValueError(f"mode={mode!r} is unknown; allowed: 'mesh', 'vmap'")
        if compressor is None:
            compressor = "retaining_heads" if retaining_heads is not None else "query_aware"
        if devices is None:
            devices = (
                1
                if strategy == "full"
                else (mesh.size if mesh is not None else (jax.device_count() if mode == "mesh" else 4))
            )
        self.config = APBConfig(
            strategy=strategy,
            devices=devices,
            anchor_len=anchor_len,
            passing_len=passing_len,
            compressor=compressor,
            q_insert=q_insert,
            pool_kernel=pool_kernel,
        )
        self.model = model
        self.mode = mode
        self.kernel_backend = kernel_backend
        self.mesh = mesh if mesh is not None else make_mesh(devices if mode == "mesh" else 1)
        if mode == "mesh" and self.mesh.size != devices:
            raise ValueError(f"devices={devices} but the mesh has {self.mesh.size} devices")
        self.heads = None
        if compressor == "retaining_heads":
            if retaining_heads is None:
                raise ValueError("compressor='retaining_heads' needs retaining_heads=path (or a RetainingHeads)")
            if not isinstance(retaining_heads, RetainingHeads):
                from converters.retaining_heads import load_retaining_heads

                retaining_heads = load_retaining_heads(retaining_heads, model.config, dtype=model.dtype)
            self.heads = replicate(retaining_heads, self.mesh)
        self.params = replicate(model.params, self.mesh)
        self._compiled: dict = {}

    # ---------------------------------------------------------------------------------------------- public

    @property
    def hosts(self) -> int:
        return self.config.devices

    def layout(self, doc_len: int, query_len: int) -> Layout:
        c = self.config
        return make_layout(
            c.strategy,
            c.devices,
            doc_len,
            query_len,
            anchor_len=c.anchor_len,
            passing_len=c.passing_len,
            q_insert=c.q_insert,
            compressor=c.compressor,
        )

    def prefill(self, doc_ids, query_ids, *, extra_tail: int = 0, doc_logits: bool = False) -> PrefillOutput:
        """Document prefill (sequence-parallel) + the query at the end.  Returns the cache and next-token logits."""
        doc, query, _ = _as_batch(doc_ids, query_ids, self.model.config.vocab_size)
        lay = self.layout(doc.shape[1], query.shape[1])
        tokens, positions = host_rows(lay, doc, query, pad_id=self.model.config.pad_token_id or 0)
        tail = _round_up(query.shape[1] + max(extra_tail, 1), 16)
        compile_s = 0.0
        fn, dt = self._get(
            ("prefill", lay, doc.shape[0], doc_logits),
            self._build_prefill,
            lay,
            doc_logits,
            self.params,
            self.heads,
            global_array(tokens, self.mesh, SEQ),
            global_array(positions, self.mesh, SEQ),
        )
        compile_s += dt
        args = (self.params, self.heads, global_array(tokens, self.mesh, SEQ), global_array(positions, self.mesh, SEQ))
        t0 = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        doc_s = time.perf_counter() - t0
        doc_k, doc_v = out[0], out[1]
        all_logits = None
        if doc_logits:
            full = to_host_sharded(out[2])  # [batch, H*(A+B)... local only] -> [batch, H*B, V]
            all_logits = full[:, : lay.doc_len]
        kv_shape = doc_k.shape
        tail_k = self._zeros_tail(kv_shape, tail, doc_k.dtype)
        tail_v = self._zeros_tail(kv_shape, tail, doc_k.dtype)
        cache = Cache(doc_k, doc_v, tail_k, tail_v, lay)
        logits, q_s, c_s = self._step(cache, query)
        return PrefillOutput(cache, logits, all_logits, doc_s, q_s, compile_s + c_s)

    def generate(
        self,
        doc_ids,
        query_ids,
        max_new_tokens: int = 16,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_tokens: Sequence[int] | None = None,
    ) -> GenerateOutput:
        """Prefill, then decode up to `max_new_tokens` tokens (greedy by default; temperature/top-p sampling with
        `seed`).  Stops a row at any of `stop_tokens` (default: the model's eos ids)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        one_d = np.asarray(doc_ids).ndim == 1
        stops = set(self.model.config.eos_token_ids if stop_tokens is None else stop_tokens)
        pre = self.prefill(doc_ids, query_ids, extra_tail=max_new_tokens)
        key = jax.random.PRNGKey(seed)
        key, sub = jax.random.split(key)
        tok = _choose(pre.logits, sub, temperature, top_p)
        rows = [[int(t)] for t in tok]
        done = np.array([t in stops for t in tok])
        compile_s = pre.compile_seconds
        t0 = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            if done.all():
                break
            logits, _, c_s = self._step(pre.cache, np.asarray(tok, np.int32)[:, None])
            compile_s += c_s
            key, sub = jax.random.split(key)
            tok = _choose(logits, sub, temperature, top_p)
            for i, t in enumerate(tok):
                if not done[i]:
                    rows[i].append(int(t))
                    done[i] = t in stops
        dec_s = time.perf_counter() - t0 - (compile_s - pre.compile_seconds)  # compiles are reported apart
        tokens = rows[0] if one_d else rows
        return GenerateOutput(
            tokens,
            pre.doc_prefill_seconds + pre.query_seconds,
            dec_s,
            compile_s,
            pre.doc_prefill_seconds,
            pre.cache.layout,
            pre.logits,
        )

    # ------------------------------------------------------------------------------------------- programs

    def _get(self, key, builder, *builder_args):
        """A compiled program for `key` (AOT: lower + compile once, timed)."""
        if key in self._compiled:
            return self._compiled[key], 0.0
        (*static,) = builder_args[:2]
        fn = builder(*static)
        t0 = time.perf_counter()
        compiled = fn.lower(*builder_args[2:]).compile()
        dt = time.perf_counter() - t0
        self._compiled[key] = compiled
        return compiled, dt

    def host_ctx(self, lay: Layout, coll) -> HostCtx:
        return HostCtx(
            layout=lay,
            coll=coll,
            compressor=self.config.compressor,
            heads=None,
            pool_kernel=self.config.pool_kernel,
            kernel_backend=self.kernel_backend,
        )

    def prefill_host_fn(self, lay: Layout, coll, doc_logits: bool = False):
        """The per-host prefill program (what host h runs): (params, heads, tokens [b, A+B], positions) ->
        (k, v [layers, b, B, KVH, D][, logits [b, B, V]]).  `coll` decides how it talks to other hosts."""
        graphdef, strategy = self.model.graphdef, REGISTRY[lay.strategy]
        total = lay.doc_len + lay.query_len
        base_ctx = self.host_ctx(lay, coll)

        def host(params, heads, tokens, positions):
            module = nnx.merge(graphdef, params)
            ctx = dataclasses.replace(base_ctx, heads=heads)
            hidden, (k, v) = module(tokens, positions, strategy(ctx), rope_seq_len=total)
            out = (k[:, :, lay.anchor :], v[:, :, lay.anchor :])
            if doc_logits:
                out = out + (module.lm_logits(hidden[:, lay.anchor :]),)
            return out

        return host

    def _build_prefill(self, lay: Layout, doc_logits: bool):
        host = self.prefill_host_fn(lay, MeshCollectives(lay.hosts), doc_logits)
        outs = (CACHE, CACHE) + ((SEQ,) if doc_logits else ())
        return jax.jit(run_hosts(host, self.mesh, lay.hosts, (REPL, REPL, SEQ, SEQ), outs, self.mode))

    def step_host_fn(self, lay: Layout, coll):
        """Per-host query/decode program: new tokens attend every host's cache (LSE merge over "sp"); returns the
        updated tail and next-token logits [b, V] (identical on every host)."""
        graphdef = self.model.graphdef
        total = lay.doc_len + lay.query_len

        def host(params, doc_k, doc_v, tail_k, tail_v, tokens, start):
            module = nnx.merge(graphdef, params)
            h = coll.index()
            t = tokens.shape[1]
            doc_pos = local_positions(lay, h)
            q_pos = lay.doc_len + start + jnp.arange(t, dtype=jnp.int32)
            slots = jnp.arange(tail_k.shape[2], dtype=jnp.int32)
            tail_pos = jnp.where((h == lay.hosts - 1) & (slots < start + t), lay.doc_len + slots, -1)

            def attend(call):
                i = call.layer
                tk = jax.lax.dynamic_update_slice_in_dim(tail_k[i], call.k.astype(tail_k.dtype), start, axis=1)
                tv = jax.lax.dynamic_update_slice_in_dim(tail_v[i], call.v.astype(tail_v.dtype), start, axis=1)
                o1, l1 = partial_attention(call.q, doc_k[i], doc_v[i], q_pos, doc_pos)
                o2, l2 = partial_attention(call.q, tk, tv, q_pos, tail_pos)
                o, lse = merge(o1, l1, o2, l2)
                if lay.hosts > 1:
                    o, lse = merge_all(coll.all_gather(o), coll.all_gather(lse))
                return o.astype(call.q.dtype)

            positions = jnp.broadcast_to(q_pos, tokens.shape)
            hidden, (k, v) = module(tokens, positions, attend, rope_seq_len=total)
            tail_k = jax.lax.dynamic_update_slice_in_dim(tail_k, k.astype(tail_k.dtype), start, axis=2)
            tail_v = jax.lax.dynamic_update_slice_in_dim(tail_v, v.astype(tail_v.dtype), start, axis=2)
            return tail_k, tail_v, module.lm_logits(hidden[:, -1])

        return host

    def _build_step(self, lay: Layout, _unused=None):
        host = self.step_host_fn(lay, MeshCollectives(lay.hosts))
        fn = run_hosts(
            host, self.mesh, lay.hosts, (REPL, CACHE, CACHE, CACHE, CACHE, REPL, REPL), (CACHE, CACHE, REPL), self.mode
        )
        return jax.jit(fn, donate_argnums=(3, 4))

    def _step(self, cache: Cache, tokens: np.ndarray):
        """Run new tokens [b, t] through the step program; returns (logits np [b, V], seconds, compile seconds)."""
        t = tokens.shape[1]
        if cache.used + t > cache.tail_k.shape[2] // cache.layout.hosts:
            raise ValueError(
                f"the cache tail is full ({cache.used} + {t} tokens > capacity "
                f"{cache.tail_k.shape[2] // cache.layout.hosts}); raise max_new_tokens at prefill"
            )
        args = (
            self.params,
            cache.doc_k,
            cache.doc_v,
            cache.tail_k,
            cache.tail_v,
            global_array(np.asarray(tokens, np.int32), self.mesh, REPL),
            global_array(np.int32(cache.used), self.mesh, REPL),
        )
        key = ("step", cache.layout, tokens.shape, cache.tail_k.shape)
        fn, c_s = self._get(key, self._build_step, cache.layout, None, *args)
        t0 = time.perf_counter()
        cache.tail_k, cache.tail_v, logits = fn(*args)
        logits = to_host(logits)
        cache.used += t
        return logits, time.perf_counter() - t0, c_s

    def _zeros_tail(self, kv_shape, per_host: int, dtype):
        layers, b, _, kvh, d = kv_shape
        shape = (layers, b, self.hosts * per_host, kvh, d)
        if self.mode == "vmap":
            return jnp.zeros(shape, dtype)
        sharding = jax.sharding.NamedSharding(self.mesh, CACHE)
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def to_host_sharded(x: jax.Array) -> np.ndarray:
    """Gather a sequence-sharded array to numpy on this process (tests/small outputs only)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _as_batch(doc_ids, query_ids, vocab: int):
    doc = np.asarray(doc_ids)
    query = np.asarray(query_ids)
    if doc.ndim not in (1, 2) or query.ndim != doc.ndim:
        raise ValueError(
            f"doc_ids and query_ids must both be 1-D (one prompt) or 2-D [batch, len]; got shapes "
            f"{doc.shape} and {query.shape}"
        )
    if doc.ndim == 1:
        doc, query = doc[None], query[None]
    if doc.shape[0] != query.shape[0]:
        raise ValueError(f"doc_ids batch {doc.shape[0]} != query_ids batch {query.shape[0]}")
    for name, x in (("doc_ids", doc), ("query_ids", query)):
        if not np.issubdtype(x.dtype, np.integer) and x.size:
            raise ValueError(f"{name} must be integer token ids; got dtype {x.dtype}")
        if x.size and (x.min() < 0 or x.max() >= vocab):
            raise ValueError(f"{name} holds ids outside [0, {vocab}): min {x.min()}, max {x.max()}")
    return doc.astype(np.int32), query.astype(np.int32), doc.ndim == 1


@functools.partial(jax.jit, static_argnums=(2, 3))
def _sample(logits, key, temperature: float, top_p: float):
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # smallest set whose mass reaches top_p: keep tokens whose preceding mass is < top_p
        keep = (cum - probs) < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1)


def _choose(logits: np.ndarray, key, temperature: float, top_p: float) -> np.ndarray:
    if temperature == 0:
        return np.argmax(logits, axis=-1)
    return np.asarray(_sample(jnp.asarray(logits), key, float(temperature), float(top_p)))
