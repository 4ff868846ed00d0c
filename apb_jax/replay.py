"""Single-host replay: run on one device exactly the program that host h of an H-host mesh runs.

Strategies talk to other hosts only through a collectives object (`parallel.MeshCollectives` on a real mesh).  A
replay hands the same per-host program (`Engine.prefill_host_fn`, `Engine.step_host_fn`) a stand-in instead, so
there is no second copy of any strategy's code:

- `parallel.ReplayCollectives(H, h)`: every collective returns local data of the shape it would return (the
  all_gather of compressed blocks, ring's ppermute of K/V, the decode LSE merge).  Compute is unchanged; this is
  what the benchmark times (communication is modelled separately).
- `ScriptedCollectives(H, h, records)`: returns, in call order, what the collectives returned on host h of a real
  run (recorded with `record_prefill`): the replay then reproduces host h's outputs exactly (tests).

Shapes: tokens/positions of one host [batch, A + B]; the prefill returns that host's k, v [layers, batch, B, KVH, D].
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from apb_jax import strategies
from apb_jax.layout import Layout, host_rows
from apb_jax.parallel import AXIS, MeshCollectives, ReplayCollectives, global_array, run_hosts

__all__ = [
    "RecordingCollectives",
    "ReplayCollectives",
    "ScriptedCollectives",
    "busiest_host",
    "host_inputs",
    "on_device",
    "record_prefill",
    "replay_prefill",
    "replay_prefill_fn",
    "replay_step_fn",
]


def busiest_host(layout: Layout) -> int:
    """The host with the most prefill work, as the layout's strategy says (`Strategy.busiest_host`)."""
    return strategies.get(layout.strategy).busiest_host(layout)


def host_inputs(layout: Layout, doc: np.ndarray, query: np.ndarray, host: int, pad_id: int = 0):
    """Token and position ids of `host` alone: both int32 [batch, A + B] (its slice of `layout.host_rows`)."""
    if not 0 <= host < layout.hosts:
        raise ValueError(f"host={host} must be in [0, {layout.hosts}) for a {layout.hosts}-host layout")
    doc, query = np.atleast_2d(np.asarray(doc, np.int32)), np.atleast_2d(np.asarray(query, np.int32))
    tokens, positions = host_rows(layout, doc, query, pad_id=pad_id)
    sl = slice(host * layout.rows, (host + 1) * layout.rows)
    return tokens[:, sl], positions[:, sl]


def on_device(tree: Any, device) -> Any:
    """Put a pytree on one device; arrays already there (alone) are left as they are (no copy)."""

    def put(x):
        if isinstance(x, jax.Array) and x.sharding.device_set == {device}:
            return x
        return jax.device_put(x, device)

    return jax.tree_util.tree_map(put, tree)


def replay_prefill_fn(engine, layout: Layout, host: int, coll=None):
    """jit of host `host`'s prefill program: (params, heads, tokens [b, A+B], positions) -> (k, v), each
    [layers, b, B, KVH, D].  `coll` defaults to `ReplayCollectives(H, host)` (shape stand-ins)."""
    coll = ReplayCollectives(layout.hosts, host) if coll is None else coll
    return jax.jit(engine.prefill_host_fn(layout, coll))


def replay_step_fn(engine, layout: Layout, host: int, coll=None):
    """jit of host `host`'s query/decode step: (params, doc_k, doc_v [layers, b, B, KVH, D], tail_k, tail_v
    [layers, b, E, KVH, D], tokens [b, t], start int32) -> (tail_k, tail_v, logits [b, V])."""
    coll = ReplayCollectives(layout.hosts, host) if coll is None else coll
    return jax.jit(engine.step_host_fn(layout, coll))


def replay_prefill(engine, doc_ids, query_ids, host: int, coll=None, device=None):
    """Run host `host`'s prefill alone on `device` (default: the engine mesh's first device); returns (k, v)."""
    doc, query = np.atleast_2d(doc_ids), np.atleast_2d(query_ids)
    lay = engine.layout(doc.shape[1], query.shape[1])
    tokens, positions = host_inputs(lay, doc, query, host, pad_id=engine.model.config.pad_token_id or 0)
    device = engine.mesh.devices.flat[0] if device is None else device
    params, heads = on_device((engine.params, engine.heads), device)
    fn = replay_prefill_fn(engine, lay, host, coll)
    return fn(params, heads, jax.device_put(tokens, device), jax.device_put(positions, device))


class RecordingCollectives:
    """MeshCollectives that also keep what every all_gather returned, in call order (`records`).

    ppermute_next is passed through unrecorded: ring calls it inside a lax.scan, whose values cannot leave the
    loop this way."""

    def __init__(self, inner: MeshCollectives):
        self.inner = inner
        self.size = inner.size
        self.records: list = []

    def index(self):
        return self.inner.index()

    def all_gather(self, x):
        out = self.inner.all_gather(x)
        self.records.append(out)
        return out

    def ppermute_next(self, x):
        return self.inner.ppermute_next(x)

    def all_to_all(self, x, split_axis: int, concat_axis: int):
        out = self.inner.all_to_all(x, split_axis, concat_axis)
        self.records.append(out)
        return out


class ScriptedCollectives:
    """Stand-ins that return, in call order, the results a real run's collectives gave host `host`.

    records: a sequence of arrays (one per collective call, as `record_prefill` returns them for one host)."""

    def __init__(self, size: int, host: int, records: Sequence[Any]):
        self.size, self.host = size, host
        self.records = list(records)
        self.calls = 0

    def reset(self):
        self.calls = 0

    def index(self):
        return jnp.int32(self.host)

    def _next(self, x):
        if self.calls >= len(self.records):
            raise ValueError(f"host {self.host} called more collectives than the {len(self.records)} recorded")
        rec = self.records[self.calls]
        self.calls += 1
        return rec

    def all_gather(self, x):
        rec = jnp.asarray(self._next(x))
        if rec.shape != (self.size, *x.shape):
            raise ValueError(
                f"recorded all_gather result has shape {rec.shape}; this call needs {(self.size, *x.shape)}"
            )
        return rec.astype(x.dtype)

    def ppermute_next(self, x):
        rec = self._next(x)
        return jax.tree_util.tree_map(lambda r, xi: jnp.asarray(r).astype(xi.dtype), rec, x)

    def all_to_all(self, x, split_axis: int, concat_axis: int):
        rec = jnp.asarray(self._next(x))
        want = list(x.shape)
        want[split_axis] //= self.size
        want[concat_axis] *= self.size
        if rec.shape != tuple(want):
            raise ValueError(f"recorded all_to_all result has shape {rec.shape}; this call needs {tuple(want)}")
        return rec.astype(x.dtype)


def record_prefill(engine, doc_ids, query_ids):
    """The real mesh prefill of `engine` (mode "mesh" or "vmap"), recording every collective's result per host.

    Returns (k, v, records): k, v [layers, b, H*B, KVH, D] as in the engine's cache (numpy) and records[h] =
    the list of results host h's collectives returned, in call order (numpy), ready for `ScriptedCollectives`.
    """
    from apb_jax.engine import to_host_sharded
    from apb_jax.programs import CACHE, REPL, SEQ

    doc, query = np.atleast_2d(np.asarray(doc_ids, np.int32)), np.atleast_2d(np.asarray(query_ids, np.int32))
    lay = engine.layout(doc.shape[1], query.shape[1])
    tokens, positions = host_rows(lay, doc, query, pad_id=engine.model.config.pad_token_id or 0)
    rec = RecordingCollectives(MeshCollectives(lay.hosts))
    inner = engine.prefill_host_fn(lay, rec)

    def host(params, heads, toks, pos):
        rec.records.clear()
        k, v = inner(params, heads, toks, pos)
        return k, v, [jax.tree_util.tree_map(lambda r: r[None], r) for r in rec.records]

    fn = jax.jit(run_hosts(host, engine.mesh, lay.hosts, (REPL, REPL, SEQ, SEQ), (CACHE, CACHE, P(AXIS)), engine.mode))
    k, v, recs = fn(
        engine.params, engine.heads, global_array(tokens, engine.mesh, SEQ), global_array(positions, engine.mesh, SEQ)
    )
    recs = [jax.tree_util.tree_map(to_host_sharded, r) for r in recs]
    per_host = [[jax.tree_util.tree_map(operator.itemgetter(h), r) for r in recs] for h in range(lay.hosts)]
    return to_host_sharded(k), to_host_sharded(v), per_host
