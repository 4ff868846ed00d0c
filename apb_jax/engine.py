"""The engine: a thin driver over the jitted programs of `apb_jax.programs`.

Flow: the strategy lays the document out over H hosts (`Strategy.make_layout`, `layout.host_rows`); one jitted
prefill program runs the whole decoder on every host's rows and keeps each host's local K/V as its cache; the query
program runs the query at the end of the sequence (every host attends it to its own cache, an LSE merge over the
mesh gives exact attention over the whole cache, the last host keeps the new K/V) and picks the first token; the
decode program loops on the device (`lax.while_loop`, on-device sampling and stop tokens) and returns every token
at once.  Caches are immutable pytrees; each input is built once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from apb_jax import strategies
from apb_jax.compression import RetainingHeads
from apb_jax.config import APBConfig
from apb_jax.layout import Layout, host_rows, local_rows_to_document
from apb_jax.model import Model
from apb_jax.parallel import MeshCollectives, global_array, make_mesh, replicate, to_host
from apb_jax.programs import (
    CACHE,
    REPL,
    SEQ,
    Settings,
    build_decode,
    build_prefill,
    build_query,
    build_step,
    prefill_host,
    step_host,
)

log = logging.getLogger("apb_jax")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
    """Per-host K/V after prefill (an immutable pytree; `layout` is static).

    doc_k, doc_v: [layers, batch, H*B, KVH, D] (host h's local block at h*B..; padding slots never visible);
    tail_k, tail_v: [layers, batch, H*E, KVH, D] (the query and generated tokens; only the last host's count);
    used: tail slots filled so far (a Python int).
    """

    doc_k: jax.Array
    doc_v: jax.Array
    tail_k: jax.Array
    tail_v: jax.Array
    layout: Layout = dataclasses.field(metadata=dict(static=True))
    used: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def capacity(self) -> int:
        """Tail slots per host."""
        return self.tail_k.shape[2] // self.layout.hosts


@dataclasses.dataclass
class GenerateOutput:
    tokens: list  # list[int] for 1-D inputs, list[list[int]] for a batch (each row up to its first stop token)
    prefill_seconds: float  # document prefill + query -> first token
    decode_seconds: float
    compile_seconds: float
    doc_prefill_seconds: float
    layout: Layout  # of the first group (a batch of different lengths runs one group per length pair)
    first_logits: np.ndarray | None = None  # float32 [batch, vocab]

    @property
    def tokens_per_second(self) -> float:
        rows = self.tokens if self.tokens and isinstance(self.tokens[0], list) else [self.tokens]
        n = sum(max(len(r) - 1, 0) for r in rows)
        return n / self.decode_seconds if n and self.decode_seconds > 0 else float("nan")


@dataclasses.dataclass
class TextOutput:
    """What `Engine.generate_text` returns: the answer text(s), their token ids, the rendered prompt(s)
    (`apb_jax.prompting.Prompt`: doc_ids, query_ids, stop_token_ids, chat_template) and the GenerateOutput."""

    text: str | list[str]
    tokens: list
    prompt: Any
    output: GenerateOutput


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
    strategy: a name from `apb_jax.strategies.names()`; mode="mesh" runs one host per device (shard_map);
    mode="vmap" emulates `devices` hosts on one device (jax.vmap with axis_name "sp": same per-host program, used
    for accuracy runs on one GPU).  retaining_heads: a path (a released Locret/APB checkpoint: see
    `apb_jax.retaining_heads`) or a `RetainingHeads`; with compressor None, APB uses the model directory's
    `retaining_heads.safetensors` when there is one, else the training-free query-aware scores; compressor="random"
    passes P positions drawn uniformly from each block (the ablation), the same ones for the same `compressor_seed`.
    A prompt plus the tokens to generate longer than the model's max_position_embeddings is an error unless
    allow_longer=True (RoPE past its trained range: quality is then the model's own business).
    """

    def __init__(
        self,
        model: Model,
        strategy: str | None = None,
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
        allow_longer: bool = False,
        compressor_seed: int = 0,
    ):
        if not isinstance(model, Model):
            raise TypeError(f"model must be an apb_jax Model (from apb_jax.load); got {type(model).__name__}")
        if mode not in ("mesh", "vmap"):
            raise ValueError(f"mode={mode!r} is unknown; allowed: 'mesh', 'vmap'")
        if isinstance(compressor_seed, bool) or not isinstance(compressor_seed, (int, np.integer)):
            raise ValueError(f"compressor_seed={compressor_seed!r} must be an int")
        unit = strategies.get(strategies.DEFAULT if strategy is None else strategy)
        if devices is None:
            devices = (
                1
                if unit.single_device
                else (mesh.size if mesh is not None else (jax.device_count() if mode == "mesh" else 4))
            )
        compressor, retaining_heads = _pick_compressor(model, unit, compressor, retaining_heads)
        self.config = APBConfig(
            strategy=unit.name,
            devices=devices,
            anchor_len=anchor_len,
            passing_len=passing_len,
            compressor=compressor,
            q_insert=q_insert,
            pool_kernel=pool_kernel,
        )
        unit.check_model(model.config, devices)
        self.strategy = unit
        self.model = model
        self.mode = mode
        self.kernel_backend = None if kernel_backend == "auto" else kernel_backend
        self.mesh = mesh if mesh is not None else make_mesh(devices if mode == "mesh" else 1)
        if mode == "mesh" and self.mesh.size != devices:
            raise ValueError(f"devices={devices} but the mesh has {self.mesh.size} devices")
        if devices == 1 and not unit.single_device:
            log.warning(
                "strategy=%r runs on one host here (devices=1): nothing is split, so it is plain causal "
                "attention; pass devices=N (or --devices N) for a sequence-parallel run",
                unit.name,
            )
        self.heads = None
        if compressor == "retaining_heads":
            if not isinstance(retaining_heads, RetainingHeads):
                from apb_jax.retaining_heads import load_retaining_heads

                retaining_heads = load_retaining_heads(retaining_heads, model.config, dtype=model.dtype)
            self.heads = replicate(retaining_heads, self.mesh)
        self.params = replicate(model.params, self.mesh)
        self.settings = Settings(compressor, pool_kernel, self.kernel_backend, int(compressor_seed))
        self.allow_longer = allow_longer
        self._compiled: dict = {}

    # ---------------------------------------------------------------------------------------------- public

    @property
    def hosts(self) -> int:
        return self.config.devices

    def layout(self, doc_len: int, query_len: int) -> Layout:
        return self.strategy.make_layout(self.config, doc_len, query_len)

    def prefill(
        self,
        doc_ids,
        query_ids,
        *,
        extra_tail: int = 0,
        doc_logits: bool = False,
        key=None,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> PrefillOutput:
        """Document prefill (sequence-parallel) + the query at the end.  Returns the cache (room for `extra_tail`
        more tokens after the query) and the next-token logits."""
        doc, query = _as_batch(doc_ids, query_ids, self.model.config.vocab_size)
        return self._prefill(doc, query, extra_tail, doc_logits, key, temperature, top_p)[0]

    def step(self, cache: Cache, tokens) -> tuple[Cache, np.ndarray]:
        """Run new tokens int [batch, t] after what the cache holds; returns (the new cache, next-token logits
        float32 [batch, vocab]).  The cache must have room (`prefill(..., extra_tail=...)`)."""
        tokens = np.asarray(tokens, np.int32)
        t = tokens.shape[1]
        if cache.used + t > cache.capacity:
            raise ValueError(
                f"the cache tail is full ({cache.used} + {t} tokens > capacity {cache.capacity}); "
                "pass a larger extra_tail to prefill"
            )
        args = (
            self.params,
            cache.doc_k,
            cache.doc_v,
            cache.tail_k,
            cache.tail_v,
            global_array(tokens, self.mesh, REPL),
            global_array(np.int32(cache.used), self.mesh, REPL),
        )
        fn, _ = self._program(
            ("step", cache.layout, tokens.shape, cache.tail_k.shape),
            build_step,
            args,
            self.model,
            cache.layout,
            self.mesh,
            self.mode,
            self.settings,
        )
        tail_k, tail_v, logits = fn(*args)
        return dataclasses.replace(cache, tail_k=tail_k, tail_v=tail_v, used=cache.used + t), to_host(logits)

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
        `seed`), on the device: one transfer of every token at the end.  Each row stops at any of `stop_tokens`
        (default: the model's eos ids), which is kept as its last token.

        doc_ids / query_ids: 1-D (one prompt), 2-D [batch, len] (rows of equal lengths), or lists of 1-D
        sequences of different lengths: those rows are grouped by (document, query) length and each group runs
        as its own batch, so a row's tokens are exactly what it gives alone; outputs come back in input order.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        stops = tuple(self.model.config.eos_token_ids if stop_tokens is None else stop_tokens)
        groups, one_d, n_rows = _groups(doc_ids, query_ids, self.model.config.vocab_size)
        rows: list = [None] * n_rows
        totals = dict(prefill=0.0, decode=0.0, compile=0.0, doc=0.0)
        first_logits = np.zeros((n_rows, self.model.config.vocab_size), np.float32)
        layout = None
        for index, doc, query in groups:
            out = self._generate_batch(doc, query, max_new_tokens, temperature, top_p, seed, stops)
            toks, logits, lay, times = out
            layout = layout or lay
            for j, i in enumerate(index):
                rows[i] = toks[j]
            first_logits[index] = logits
            for k, v in times.items():
                totals[k] += v
        tokens = rows[0] if one_d else rows
        return GenerateOutput(
            tokens, totals["prefill"], totals["decode"], totals["compile"], totals["doc"], layout, first_logits
        )

    def generate_text(
        self,
        context,
        question,
        max_new_tokens: int = 32,
        *,
        chat_template: bool | None = None,
        prompt_format: str | None = None,
        system_prompt: str | None = None,
        answer_prefix: str = "",
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> TextOutput:
        """Answer `question` about `context` (text, or two lists of texts: a batch of prompts of any lengths) with
        the model's own tokenizer: the prompt goes through its chat template when it has one (chat_template=None;
        True insists, False feeds the raw text), with the context in the document part (split over the hosts) and
        the question plus the template's assistant header in the query; generation stops at eos or the template's
        end-of-turn tokens.  See `apb_jax.prompting.render` for prompt_format, system_prompt and answer_prefix."""
        from apb_jax.prompting import render

        batch = isinstance(context, (list, tuple))
        contexts, questions = (list(context), list(question)) if batch else ([context], [question])
        if len(contexts) != len(questions):
            raise ValueError(f"{len(contexts)} contexts but {len(questions)} questions; give one question each")
        tok = self.model.tokenizer()
        limit = None if self.allow_longer else self.model.config.max_position_embeddings
        prompts = [
            render(
                tok,
                c,
                q,
                chat_template=chat_template,
                prompt_format=prompt_format,
                system_prompt=system_prompt,
                answer_prefix=answer_prefix,
                max_positions=limit,
                max_new_tokens=max_new_tokens,
                extra_stop_token_ids=self.model.config.eos_token_ids,
            )
            for c, q in zip(contexts, questions)
        ]
        stops = sorted({t for p in prompts for t in p.stop_token_ids})
        out = self.generate(
            [p.doc_ids for p in prompts],
            [p.query_ids for p in prompts],
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_tokens=stops,
        )
        texts = [tok.decode(t, skip_special_tokens=True) for t in out.tokens]
        return TextOutput(
            texts if batch else texts[0], out.tokens if batch else out.tokens[0], prompts if batch else prompts[0], out
        )

    def kept_positions(self, doc_ids, query_ids) -> dict:
        """What each host's compressor kept during the prefill, for a debugging look: {"positions": int32
        [hosts, layers, batch, kv_heads, passing_len] document positions (-1: an empty slot), "layout": Layout}.
        Only strategies that pass compressed blocks keep anything (an empty dict otherwise)."""
        doc, query = _as_batch(doc_ids, query_ids, self.model.config.vocab_size)
        lay = self.layout(doc.shape[1], query.shape[1])
        args = self._prefill_inputs(lay, doc, query)
        fn, _ = self._program(
            ("taps", lay, doc.shape[0]),
            build_prefill,
            args,
            self.model,
            lay,
            self.mesh,
            self.mode,
            self.settings,
            taps=True,
        )
        taps = _fetch(fn(*args)[-1])
        if "kept" not in taps:
            return {}
        return {"positions": np.asarray(taps["kept"]), "layout": lay}

    # ------------------------------------------------------------------------------------ per-host programs

    def prefill_host_fn(self, lay: Layout, coll, doc_logits: bool = False):
        """The per-host prefill program (what host h runs): (params, heads, tokens [b, A+B], positions) ->
        (k, v [layers, b, B, KVH, D][, logits [b, B, V]]).  `coll` decides how it talks to other hosts."""
        return prefill_host(self.model, lay, coll, self.settings, doc_logits=doc_logits)

    def step_host_fn(self, lay: Layout, coll):
        """Per-host query/decode step: (params, doc_k, doc_v, tail_k, tail_v, tokens [b, t], start) ->
        (tail_k, tail_v, next-token logits [b, V], identical on every host)."""
        return step_host(self.model, lay, coll, self.settings)

    def host_collectives(self, lay: Layout) -> MeshCollectives:
        return MeshCollectives(lay.hosts)

    # ---------------------------------------------------------------------------------------------- driver

    def _program(self, key, builder, args, *builder_args, **builder_kw):
        """The compiled program for `key` (lowered and compiled once, ahead of time, against `args`); returns
        (compiled, compile seconds: 0 when cached)."""
        if key in self._compiled:
            return self._compiled[key], 0.0
        t0 = time.perf_counter()
        compiled = builder(*builder_args, **builder_kw).lower(*args).compile()
        self._compiled[key] = compiled
        return compiled, time.perf_counter() - t0

    def _prefill_inputs(self, lay: Layout, doc: np.ndarray, query: np.ndarray):
        tokens, positions = host_rows(lay, doc, query, pad_id=self.model.config.pad_token_id or 0)
        return (self.params, self.heads, global_array(tokens, self.mesh, SEQ), global_array(positions, self.mesh, SEQ))

    def check_positions(self, doc_len: int, query_len: int, new_tokens: int) -> None:
        total, limit = doc_len + query_len + new_tokens, self.model.config.max_position_embeddings
        if total > limit and not self.allow_longer:
            raise ValueError(
                f"the prompt is {doc_len + query_len} tokens (document {doc_len} + query {query_len}) + {new_tokens} "
                f"to generate = {total}, past the model's max_position_embeddings {limit}; shorten the context, or "
                "pass allow_longer=True to run RoPE past its trained positions"
            )

    def _prefill(self, doc, query, extra_tail, doc_logits, key, temperature, top_p):
        self.check_positions(doc.shape[1], query.shape[1], extra_tail)
        lay = self.layout(doc.shape[1], query.shape[1])
        tail = _round_up(query.shape[1] + max(extra_tail, 1), 16)
        args = self._prefill_inputs(lay, doc, query)
        pre, c_pre = self._program(
            ("prefill", lay, doc.shape[0], doc_logits),
            build_prefill,
            args,
            self.model,
            lay,
            self.mesh,
            self.mode,
            self.settings,
            doc_logits=doc_logits,
        )
        t0 = time.perf_counter()
        out = jax.block_until_ready(pre(*args))
        doc_s = time.perf_counter() - t0
        doc_k, doc_v = out[0], out[1]
        all_logits = local_rows_to_document(lay, _fetch(out[2])) if doc_logits else None
        if key is None:
            key = global_array(jax.device_get(jax.random.PRNGKey(0)), self.mesh, REPL)
        qargs = (
            self.params,
            doc_k,
            doc_v,
            global_array(query, self.mesh, REPL),
            key,
            global_array(np.float32(temperature), self.mesh, REPL),
            global_array(np.float32(top_p), self.mesh, REPL),
        )
        qfn, c_q = self._program(
            ("query", lay, doc.shape[0], tail),
            build_query,
            qargs,
            self.model,
            lay,
            self.mesh,
            self.mode,
            self.settings,
            tail,
        )
        t0 = time.perf_counter()
        tail_k, tail_v, logits, first = jax.block_until_ready(qfn(*qargs))
        q_s = time.perf_counter() - t0
        cache = Cache(doc_k, doc_v, tail_k, tail_v, lay, used=query.shape[1])
        pre_out = PrefillOutput(cache, to_host(logits), all_logits, doc_s, q_s, c_pre + c_q)
        return pre_out, first

    def _generate_batch(self, doc, query, max_new, temperature, top_p, seed, stops):
        key, sub = (
            global_array(k, self.mesh, REPL) for k in jax.device_get(jax.random.split(jax.random.PRNGKey(seed)))
        )
        pre, first = self._prefill(doc, query, max_new, False, sub, temperature, top_p)
        cache, lay = pre.cache, pre.cache.layout
        compile_s, dec_s = pre.compile_seconds, 0.0
        n_steps, tokens = 1, np.asarray(to_host(first))[:, None]
        if max_new > 1 and not np.isin(tokens[:, 0], stops).all():
            stop_ids = np.asarray(stops if stops else (-1,), np.int32)
            args = (
                self.params,
                cache.doc_k,
                cache.doc_v,
                cache.tail_k,
                cache.tail_v,
                first,
                global_array(np.int32(cache.used), self.mesh, REPL),
                key,
                global_array(np.float32(temperature), self.mesh, REPL),
                global_array(np.float32(top_p), self.mesh, REPL),
                global_array(stop_ids, self.mesh, REPL),
            )
            fn, c_dec = self._program(
                ("decode", lay, doc.shape[0], max_new, cache.tail_k.shape, stop_ids.shape),
                build_decode,
                args,
                self.model,
                lay,
                self.mesh,
                self.mode,
                self.settings,
                max_new,
            )
            compile_s += c_dec
            t0 = time.perf_counter()
            out, n, _, _ = fn(*args)
            tokens, n_steps = jax.device_get((out, n))
            dec_s = time.perf_counter() - t0
            tokens = np.asarray(tokens)[:, : int(n_steps)]
        rows = [_until_stop(list(map(int, r)), stops) for r in tokens]
        times = dict(
            prefill=pre.doc_prefill_seconds + pre.query_seconds,
            decode=dec_s,
            compile=compile_s,
            doc=pre.doc_prefill_seconds,
        )
        return rows, pre.logits, lay, times


def _pick_compressor(model: Model, unit, compressor, retaining_heads):
    """compressor None: the retaining heads when given or found beside the model (`retaining_heads.safetensors`)
    and the strategy compresses, else the training-free query-aware scores."""
    from apb_jax.retaining_heads import HEADS_FILE

    if compressor is not None:
        if compressor == "retaining_heads" and retaining_heads is None:
            found = model.path / HEADS_FILE if model.path is not None else None
            if found is None or not found.is_file():
                where = f" (no {HEADS_FILE} in {model.path})" if model.path is not None else ""
                raise ValueError(
                    f"compressor='retaining_heads' needs retaining_heads=path (--retaining-heads PATH){where}"
                )
            retaining_heads = found
        return compressor, retaining_heads
    if retaining_heads is not None:
        return "retaining_heads", retaining_heads
    if "passing_len" not in unit.options:
        return "query_aware", None
    if model.path is not None and (model.path / HEADS_FILE).is_file():
        log.info(
            "%s compresses with the retaining heads in %s (compressor='query_aware' for the training-free scores)",
            unit.name,
            model.path / HEADS_FILE,
        )
        return "retaining_heads", model.path / HEADS_FILE
    log.info(
        "%s compresses with the training-free query-aware scores (no %s beside the model; retaining_heads=PATH "
        "to use trained heads)",
        unit.name,
        HEADS_FILE,
    )
    return "query_aware", None


def _until_stop(row: list[int], stops) -> list[int]:
    for i, t in enumerate(row):
        if t in stops:
            return row[: i + 1]
    return row


def _fetch(x):
    """A (possibly sequence-sharded) result as numpy on this process (tests, small outputs)."""

    def one(a):
        if a.is_fully_addressable:
            return np.asarray(jax.device_get(a))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))

    return jax.tree_util.tree_map(one, x)


to_host_sharded = _fetch


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _check_ids(name: str, x: np.ndarray, vocab: int) -> None:
    if not np.issubdtype(x.dtype, np.integer) and x.size:
        raise ValueError(f"{name} must be integer token ids; got dtype {x.dtype}")
    if x.size and (x.min() < 0 or x.max() >= vocab):
        raise ValueError(f"{name} holds ids outside [0, {vocab}): min {x.min()}, max {x.max()}")


def _as_batch(doc_ids, query_ids, vocab: int) -> tuple[np.ndarray, np.ndarray]:
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
    _check_ids("doc_ids", doc, vocab)
    _check_ids("query_ids", query, vocab)
    return doc.astype(np.int32), query.astype(np.int32)


def _is_ragged(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and not np.isscalar(x[0]) and np.ndim(x[0]) == 1


def _groups(doc_ids, query_ids, vocab: int):
    """([(row indices, doc [b, L], query [b, Q]), ...] one group per length pair, whether the input was one 1-D
    prompt, number of rows)."""
    if _is_ragged(doc_ids) or _is_ragged(query_ids):
        if not (_is_ragged(doc_ids) and _is_ragged(query_ids)) or len(doc_ids) != len(query_ids):
            raise ValueError(
                "doc_ids and query_ids must be two lists of 1-D sequences of the same length (a batch of "
                "prompts), or arrays"
            )
        docs = [np.asarray(d) for d in doc_ids]
        queries = [np.asarray(q) for q in query_ids]
        for i, (d, q) in enumerate(zip(docs, queries)):
            _check_ids(f"doc_ids[{i}]", d, vocab)
            _check_ids(f"query_ids[{i}]", q, vocab)
        by_len: dict[tuple[int, int], list[int]] = {}
        for i, (d, q) in enumerate(zip(docs, queries)):
            by_len.setdefault((len(d), len(q)), []).append(i)
        groups = [
            (
                idx,
                np.stack([docs[i] for i in idx]).astype(np.int32),
                np.stack([queries[i] for i in idx]).astype(np.int32),
            )
            for idx in by_len.values()
        ]
        return groups, False, len(docs)
    doc, query = _as_batch(doc_ids, query_ids, vocab)
    return [(list(range(doc.shape[0])), doc, query)], np.asarray(doc_ids).ndim == 1, doc.shape[0]


__all__ = ["CACHE", "REPL", "SEQ", "Cache", "Engine", "GenerateOutput", "PrefillOutput", "to_host_sharded"]
