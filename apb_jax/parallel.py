"""Mesh, collectives, global arrays and the per-host program runner.

Everything that knows about devices lives here and in the strategies; the model does not.  The per-host rows and
their positions are the layout's (`apb_jax.layout`); here they become global arrays sharded over mesh axis "sp",
built from host numpy data with `jax.make_array_from_callback`, so the same code runs when the mesh spans several
processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "sp"


def use_cpu_devices(n: int) -> None:
    """Run jax on the CPU with `n` fake devices (to try sequence-parallel strategies without GPUs).

    Call it before the first jax computation (importing jax is fine); once jax has started its backends it can
    only check that they already match (a RuntimeError says to start a fresh process otherwise)."""
    import os
    import sys

    if not isinstance(n, int) or n < 1:
        raise ValueError(f"use_cpu_devices(n={n!r}): n must be an integer >= 1")
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            if jax.default_backend() == "cpu" and jax.device_count() >= n:
                return  # already there (e.g. called from a process that set them up itself)
            raise RuntimeError(
                f"{n} CPU devices asked for, but jax has already started with {jax.device_count()} "
                f"{jax.default_backend()} device(s); ask before the first jax computation, or run in a fresh process"
            )
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)


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
        platform = devs[0].platform if devs else "none"
        hint = (
            f"; for fake CPU devices call apb_jax.use_cpu_devices({n}) before the first jax computation "
            f"(CLI: --cpu-devices {n}), or use mode='vmap' to emulate the hosts on one device"
            if platform == "cpu"
            else "; or use mode='vmap' to emulate the hosts on one device"
        )
        raise ValueError(
            f"devices={n} but {len(devs)} JAX device(s) are available ({platform}); allowed: 1..{len(devs)}{hint}"
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

    def all_to_all(self, x: jax.Array, split_axis: int, concat_axis: int) -> jax.Array:
        """Split x's `split_axis` into H parts, send part j to host j, concatenate what arrives along `concat_axis`
        in host order: [.., n, .., m, ..] -> [.., H n, .., m / H, ..]."""
        return jax.lax.all_to_all(x, self.axis, split_axis, concat_axis, tiled=True)


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

    def all_to_all(self, x: jax.Array, split_axis: int, concat_axis: int) -> jax.Array:
        parts = jnp.split(x, self.size, axis=split_axis)
        return jnp.concatenate([parts[0]] * self.size, axis=concat_axis)


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
    """Read a replicated (or single-process) global array into numpy on every process (an explicit transfer)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(jax.device_get(x.addressable_data(0)))


def run_hosts(fn: Callable, mesh: Mesh | None, hosts: int, in_specs, out_specs, mode: str = "mesh") -> Callable:
    """Run per-host `fn` on every host: shard_map over "sp" (mode "mesh"), or jax.vmap with axis_name "sp" on one
    device (mode "vmap": H hosts emulated; inputs/outputs carry a leading host axis instead of a sharded one).

    in_specs / out_specs: PartitionSpecs (or tuples / lists / dicts of them).  P() means replicated: an input
    every host gets whole, an output every host computes alike (under vmap, host 0's copy is returned)."""
    if mode == "mesh":
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    if mode != "vmap":
        raise ValueError(f"mode={mode!r} is unknown; allowed: 'mesh', 'vmap'")
    in_axes, out_host = _host_axes(in_specs), _host_axes(out_specs)
    out_axes = jax.tree_util.tree_map(lambda a: 0 if a is None else a, out_host, is_leaf=lambda a: a is None)
    vfn = jax.vmap(fn, in_axes=in_axes, out_axes=out_axes, axis_name=AXIS, axis_size=hosts)

    def split(x, ax):  # global [.., H*n, ..] -> [.., H, n, ..]
        return x if ax is None else x.reshape(*x.shape[:ax], hosts, x.shape[ax] // hosts, *x.shape[ax + 1 :])

    def join(x, ax):  # [.., H, n, ..] -> [.., H*n, ..]; a replicated output: host 0's
        if ax is None:
            return x[0]
        return x.reshape(*x.shape[:ax], x.shape[ax] * x.shape[ax + 1], *x.shape[ax + 2 :])

    def wrapped(*args):
        args = jax.tree_util.tree_map(split, args, _broadcast_axes(in_axes, args), is_leaf=_is_array)
        out = vfn(*args)
        return jax.tree_util.tree_map(join, out, _broadcast_axes(out_host, out), is_leaf=_is_array)

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
        if isinstance(ax, dict):
            return {k: rec(ax[k], sub[k]) for k in sub}
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
    if isinstance(specs, dict):
        return {k: _host_axes(v) for k, v in specs.items()}
    raise TypeError(f"specs must be PartitionSpecs or tuples / lists / dicts of them; got {specs!r}")
