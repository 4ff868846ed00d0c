"""Mesh, sequence split and the collectives a strategy may use.

Everything that knows about devices lives here and in the strategies; the model does not.

A prefill over H hosts works on per-host rows `[anchor (A) | local block (B)]` (A = 0 for ring/full).  The global
token array is `[batch, H * (A + B)]`, sharded over mesh axis "sp" along the sequence: host h owns columns
`[h * (A + B), (h + 1) * (A + B))`.  All global arrays are built from host numpy data with
`jax.make_array_from_callback`, so the same code runs when the mesh spans several processes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from apb_jax.config import STRATEGIES

AXIS = "sp"


def make_mesh(n: int | None = None, devices=None) -> Mesh:
    """A 1-D mesh over the first `n` devices (all by default), axis "sp".

    With several processes (jax.distributed) every process must hold the same number of mesh devices: the mesh
    takes the first n / process_count local devices of each process, in process order.
    """
    if devices is None and jax.process_count() > 1:
        return Mesh(np.array(_per_process_devices(n)), (AXIS,))
    devs = list(jax.devices() if devices is None else devices)
    n = len(devs) if n is None else n
    if not 1 <= n <= len(devs):
        raise ValueError(
            f"devices={n} but {len(devs)} JAX device(s) are available "
            f"({devs[0].platform if devs else 'none'}); allowed: 1..{len(devs)}"
        )
    return Mesh(np.array(devs[:n]), (AXIS,))


def _per_process_devices(n: int | None) -> list:
    """n global devices, n / process_count from each process (process-major order), or a ValueError naming the fix."""
    procs = jax.process_count()
    by_proc: dict[int, list] = {}
    for d in jax.devices():
        by_proc.setdefault(d.process_index, []).append(d)
    local = min(len(v) for v in by_proc.values())
    total = len(jax.devices())
    n = total if n is None else n
    if n < 1 or n % procs or n // procs > local:
        allowed = [procs * k for k in range(1, local + 1)]
        raise ValueError(
            f"devices={n} does not fit {procs} processes x {local} local "
            f"{jax.devices()[0].platform} device(s) ({total} in all): in a multi-process run every "
            f"process holds the same number of mesh devices, so devices must be a multiple of the "
            f"process count; allowed: {allowed}. Change --devices, or start more processes or more "
            f"devices per process (--devices-per-process / --local-device-count)"
        )
    per = n // procs
    return [d for p in sorted(by_proc) for d in by_proc[p][:per]]


# ----------------------------------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static shape of one sequence-parallel prefill.

    hosts H; doc_len L (real tokens); block B = ceil(L / H); anchor A (rows before the local block on every host;
    host 0's anchor rows exist for uniform shapes but are masked); passing P (compressed entries each host sends);
    q_insert: document tokens kept before the query inside the anchor (APB only).
    """

    strategy: str
    hosts: int
    doc_len: int
    query_len: int
    block: int
    anchor: int = 0
    passing: int = 0
    q_insert: int = 0
    query_in_anchor: bool = False

    @property
    def rows(self) -> int:
        return self.anchor + self.block

    @property
    def padded_len(self) -> int:
        return self.hosts * self.block

    def eligible_count(self, host: int) -> int:
        """How many local positions of `host` compression may select (real tokens, not the first A of the doc)."""
        lo = host * self.block
        hi = min((host + 1) * self.block, self.doc_len)
        if host == 0:
            lo = min(self.anchor, hi) if self.anchor else lo
        return max(0, hi - lo)


def make_layout(
    strategy: str,
    hosts: int,
    doc_len: int,
    query_len: int,
    *,
    anchor_len: int | None = None,
    passing_len: int | None = None,
    q_insert: int = 16,
    compressor: str = "query_aware",
) -> Layout:
    """Validate lengths and fill in defaults (APB: A = L/32, P = L/64, clipped to valid ranges; Star: A = B)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is unknown; allowed: {STRATEGIES}")
    if doc_len < 1:
        raise ValueError(f"the document must hold at least 1 token; got doc_len={doc_len}")
    if query_len < 1:
        raise ValueError(f"the query must hold at least 1 token; got query_len={query_len}")
    if hosts < 1:
        raise ValueError(f"hosts={hosts} must be >= 1")
    if strategy == "full" and hosts != 1:
        raise ValueError(f"strategy='full' runs on one device; got devices={hosts}")
    block = math.ceil(doc_len / hosts)
    where = f"(doc {doc_len} tokens over {hosts} hosts: block {block})"
    if strategy in ("full", "ring"):
        for name, val in (("anchor_len", anchor_len), ("passing_len", passing_len)):
            if val:
                raise ValueError(f"{name}={val} has no meaning for strategy={strategy!r}; leave it None or 0")
        return Layout(strategy, hosts, doc_len, query_len, block)
    if strategy == "star":
        if passing_len:
            raise ValueError(f"passing_len={passing_len}: Star Attention passes nothing; leave it None or 0")
        a = block if anchor_len is None else anchor_len
        if not 0 <= a <= block:
            raise ValueError(f"anchor_len={a} must be in [0, {block}] {where}")
        return Layout(strategy, hosts, doc_len, query_len, block, anchor=a if hosts > 1 else 0)
    # apb
    if hosts == 1:  # host 0 has neither anchor nor passing: plain causal attention
        return Layout(strategy, 1, doc_len, query_len, block)
    need = q_insert + query_len + 1  # the anchor must hold doc[:q_insert] + query + at least one more token
    if anchor_len is None:
        a = min(max(math.ceil(doc_len / 32), need), block)
        if a < need:
            raise ValueError(
                f"the query ({query_len} tokens) plus q_insert={q_insert} does not fit an anchor of at "
                f"most the block length {where}: need block >= {need}; use fewer devices or a "
                f"shorter query"
            )
    else:
        a = anchor_len
        if a != 0 and not need <= a <= block:
            raise ValueError(
                f"anchor_len={a} must be 0 or in [{need}, {block}] (q_insert {q_insert} + query "
                f"{query_len} tokens < anchor <= block) {where}"
            )
    p = min(math.ceil(doc_len / 64), block) if passing_len is None else passing_len
    if not 0 <= p <= block:
        raise ValueError(f"passing_len={p} must be in [0, {block}] {where}")
    if a == 0 and p < block and p > 0 and compressor == "query_aware":
        raise ValueError(
            f"compressor='query_aware' scores keys by the query rows inside the anchor, so it needs "
            f"anchor_len > 0 unless passing_len == block ({block}); got anchor_len=0, passing_len={p}"
        )
    return Layout(
        strategy, hosts, doc_len, query_len, block, anchor=a, passing=p, q_insert=q_insert, query_in_anchor=a > 0
    )


def host_rows(layout: Layout, doc: np.ndarray, query: np.ndarray, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-host token ids and position ids, concatenated over hosts: both int32 [batch, H * (A + B)].

    doc [batch, L], query [batch, Q].  Anchor = doc[:q_insert] ++ query ++ doc[q_insert : A - Q] for APB
    (positions 0..A-1), doc[:A] for Star; local block h = doc[h*B : (h+1)*B] at its true positions; padding
    (past L) takes `pad_id` and positions continuing past L (masked everywhere it could matter).
    """
    bsz = doc.shape[0]
    a, b, h = layout.anchor, layout.block, layout.hosts
    padded = np.full((bsz, layout.padded_len), pad_id, np.int32)
    padded[:, : layout.doc_len] = doc
    if a:
        if layout.query_in_anchor:
            qi = layout.q_insert
            anchor = np.concatenate([doc[:, :qi], query, doc[:, qi : a - query.shape[1]]], axis=1)
        else:
            anchor = doc[:, :a]
        assert anchor.shape[1] == a, (anchor.shape, a)
    tokens = np.empty((bsz, h, a + b), np.int32)
    pos = np.empty((bsz, h, a + b), np.int32)
    for host in range(h):
        if a:
            tokens[:, host, :a] = anchor
            pos[:, host, :a] = np.arange(a)
        tokens[:, host, a:] = padded[:, host * b : (host + 1) * b]
        pos[:, host, a:] = host * b + np.arange(b)
    return tokens.reshape(bsz, -1), pos.reshape(bsz, -1)


# ------------------------------------------------------------------------------------------------ collectives


@dataclasses.dataclass(frozen=True)
class MeshCollectives:
    """The collectives a strategy may call, over mesh axis "sp" (inside shard_map, or jax.vmap(axis_name="sp"))."""

    size: int
    axis: str = AXIS

    def index(self) -> jax.Array:
        return jax.lax.axis_index(self.axis)

    def all_gather(self, x: jax.Array) -> jax.Array:
        """x [...] -> [H, ...] in host order."""
        return jax.lax.all_gather(x, self.axis)

    def ppermute_next(self, x):
        """Send x to host h+1 (mod H); return what host h-1 sent."""
        perm = [(i, (i + 1) % self.size) for i in range(self.size)]
        return jax.lax.ppermute(x, self.axis, perm)


@dataclasses.dataclass(frozen=True)
class ReplayCollectives:
    """Stand-ins that let one device run exactly host `host`'s program of an H-host mesh (for timing).

    Each returns local data of the shape the real collective would return, so the compute is the same; the
    communication time is modelled separately.
    """

    size: int
    host: int

    def index(self) -> jax.Array:
        return jnp.int32(self.host)

    def all_gather(self, x: jax.Array) -> jax.Array:
        return jnp.broadcast_to(x[None], (self.size, *x.shape))

    def ppermute_next(self, x):
        return x


# ------------------------------------------------------------------------------------------- global arrays


def global_array(data: np.ndarray, mesh: Mesh, spec: P) -> jax.Array:
    """A global jax.Array from host numpy data that every process holds in full (token ids, positions).

    Each process materialises only the shards of its own devices: safe on a mesh spanning processes.
    """
    data = np.asarray(data)
    return jax.make_array_from_callback(data.shape, NamedSharding(mesh, spec), lambda idx: data[idx])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Replicate a pytree of arrays onto every device of `mesh` (params), multi-process safe."""
    sharding = NamedSharding(mesh, P())

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if (
            isinstance(x, jax.Array)
            and x.is_fully_addressable
            and len(mesh.devices.flat) == len(jax.devices())
            and jax.process_count() == 1
        ):
            return jax.device_put(x, sharding)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # a global array of another mesh
            if not x.is_fully_replicated:
                raise ValueError(
                    f"replicate() got an array of shape {x.shape} sharded across processes "
                    f"({x.sharding}); pass host data or a replicated array"
                )
            x = x.addressable_data(0)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree_util.tree_map(put, tree)


def to_host(x: jax.Array) -> np.ndarray:
    """Read a replicated (or single-process) global array into numpy on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(x.addressable_data(0))


def run_hosts(fn: Callable, mesh: Mesh | None, hosts: int, in_specs, out_specs, mode: str = "mesh") -> Callable:
    """Run per-host `fn` on every host: shard_map over "sp" (mode "mesh"), or jax.vmap with axis_name "sp" on one
    device (mode "vmap": H hosts emulated; inputs/outputs carry a leading host axis instead of a sharded one)."""
    if mode == "mesh":
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    if mode != "vmap":
        raise ValueError(f"mode={mode!r} is unknown; allowed: 'mesh', 'vmap'")
    in_axes, out_axes = _host_axes(in_specs), _host_axes(out_specs)
    vfn = jax.vmap(fn, in_axes=in_axes, out_axes=out_axes, axis_name=AXIS, axis_size=hosts)

    def split(x, ax):  # global [.., H*n, ..] -> [.., H, n, ..]
        return x if ax is None else x.reshape(*x.shape[:ax], hosts, x.shape[ax] // hosts, *x.shape[ax + 1 :])

    def join(x, ax):
        return x if ax is None else x.reshape(*x.shape[:ax], x.shape[ax] * x.shape[ax + 1], *x.shape[ax + 2 :])

    def wrapped(*args):
        args = jax.tree_util.tree_map(split, args, _broadcast_axes(in_axes, args), is_leaf=_is_array)
        out = vfn(*args)
        return jax.tree_util.tree_map(join, out, _broadcast_axes(out_axes, out), is_leaf=_is_array)

    return wrapped


def _is_array(x):
    return isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "shape")


def _broadcast_axes(axes, tree):
    """Expand a prefix tree of axes (ints/None) to the full structure of `tree`."""

    def rec(ax, sub):
        if ax is None or isinstance(ax, int):
            return jax.tree_util.tree_map(lambda _: ax, sub, is_leaf=_is_array)
        if isinstance(ax, (list, tuple)):
            return type(ax)(rec(a, s) for a, s in zip(ax, sub))
        raise TypeError(ax)

    return rec(axes, tree)


def _host_axes(specs):
    """P() -> None (replicated, broadcast to every host); P(..., 'sp', ...) -> the index of that dimension."""

    def one(spec):
        for i, s in enumerate(spec):
            if s == AXIS:
                return i
        return None

    if isinstance(specs, P):
        return one(specs)
    if isinstance(specs, (list, tuple)):
        return type(specs)(_host_axes(s) for s in specs)
    raise TypeError(f"specs must be PartitionSpecs or tuples of them; got {specs!r}")
