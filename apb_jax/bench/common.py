"""Helpers shared by the benchmarks: timing, device facts, program memory, JSON, the communication model, plots.

Import jax lazily (inside functions): `apb-jax bench --smoke` must set XLA_FLAGS before jax is imported.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MB = 2**20
# all_gather over 4 NVLinked H200s as measured with jax 0.11.2: per-GPU bandwidth at 16 / 128 / 512 MB per shard.
SPEC_ALL_GATHER = ((16 * MB, 51e9), (128 * MB, 134e9), (512 * MB, 255e9))
H200_BF16_PEAK = 790e12  # measured dense bf16 matmul rate on one H200 (8192^3 products, random data)


def timed(fn: Callable, *args, warmup: int = 1, repeats: int = 3):
    """Run fn(*args) `warmup` times, then `repeats` timed times (host clock after block_until_ready).
    Returns (median seconds, [seconds...], last output).  The previous output is dropped before each call so
    two outputs never live at once."""
    import jax

    out = None
    for _ in range(warmup):
        del out
        out = fn(*args)
        jax.block_until_ready(out)
    runs = []
    for _ in range(repeats):
        del out
        t0 = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), runs, out


def compile_timed(jitted, *args):
    """AOT lower + compile; returns (compiled, seconds)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def program_bytes(compiled) -> dict | None:
    """XLA's buffer assignment for one compiled program: arguments, outputs, temporaries (bytes)."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    get = lambda name: int(getattr(m, name, 0) or 0)
    d = {
        "argument": get("argument_size_in_bytes"),
        "output": get("output_size_in_bytes"),
        "temp": get("temp_size_in_bytes"),
        "alias": get("alias_size_in_bytes"),
        "generated_code": get("generated_code_size_in_bytes"),
    }
    d["total"] = d["argument"] + d["output"] + d["temp"] - d["alias"]
    return d


def device_info() -> dict:
    import jax

    dev = jax.devices()[0]
    stats = memory_stats(dev)
    return {
        "name": dev.device_kind,
        "platform": dev.platform,
        "count": jax.device_count(),
        "bytes_limit": (stats or {}).get("bytes_limit"),
        "jax_version": jax.__version__,
    }


def memory_stats(dev) -> dict | None:
    try:
        return dev.memory_stats()
    except Exception:
        return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def today() -> str:
    return datetime.date.today().isoformat()


def read_jsons(spec: str) -> tuple[list[Path], list[dict]]:
    """`--from-json a.json,b.json` -> (paths, parsed documents), in order."""
    paths = [Path(p) for p in spec.split(",") if p]
    return paths, [json.loads(p.read_text()) for p in paths]


def output_path(out: str | None, out_dir: str | None, default_name: str, default_dir: str = "bench_results") -> Path:
    """Where a benchmark writes its JSON: `out` (a file path, or an existing directory / a path ending in '/' that
    gets `default_name`), else `out_dir/default_name` (out_dir defaults to ./bench_results)."""
    if out:
        p = Path(out)
        if p.is_dir() or str(out).endswith(("/", os.sep)):
            return p / default_name
        return p
    return Path(out_dir or default_dir) / default_name


def write_json(path: str | os.PathLike, doc: Any) -> None:
    """Write atomically (a killed run leaves the previous complete file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_json_default))
    tmp.replace(path)


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


class BandwidthModel:
    """Per-GPU collective bandwidth as a function of the shard size, interpolated log-log between points and
    extrapolated with the end slopes (capped at the largest measured bandwidth above the last point).

    all_gather of a shard of s bytes over H hosts: every GPU receives (H - 1) s bytes -> (H - 1) s / bw(s).
    ppermute of s bytes: each GPU sends and receives s bytes -> s / bw(s) (the all_gather figures stand in when
    no ppermute was measured)."""

    def __init__(
        self, all_gather: Sequence[tuple[float, float]], ppermute: Sequence[tuple[float, float]] | None, source: str
    ):
        self.all_gather = sorted(all_gather)
        self.ppermute = sorted(ppermute) if ppermute else None
        self.source = source

    @staticmethod
    def _interp(points, nbytes: float) -> float:
        if len(points) == 1:
            return points[0][1]
        xs = [math.log(s) for s, _ in points]
        ys = [math.log(b) for _, b in points]
        x = math.log(max(nbytes, 1.0))
        if x >= xs[-1]:
            return points[-1][1]
        i = 0 if x < xs[0] else max(j for j in range(len(xs) - 1) if xs[j] <= x)
        slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
        return math.exp(ys[i] + slope * (x - xs[i]))

    def bandwidth(self, nbytes: float, kind: str = "all_gather") -> float:
        pts = self.ppermute if kind == "ppermute" and self.ppermute else self.all_gather
        return self._interp(pts, nbytes)

    def all_gather_s(self, shard_bytes: float, hosts: int) -> float:
        if hosts <= 1 or shard_bytes <= 0:
            return 0.0
        return (hosts - 1) * shard_bytes / self.bandwidth(shard_bytes, "all_gather")

    def ppermute_s(self, nbytes: float) -> float:
        return 0.0 if nbytes <= 0 else nbytes / self.bandwidth(nbytes, "ppermute")

    def all_to_all_s(self, nbytes: float, hosts: int) -> float:
        """all_to_all of `nbytes` per GPU: (H-1)/H of it leaves, in pieces of nbytes/H (all_gather rates)."""
        if hosts <= 1 or nbytes <= 0:
            return 0.0
        return (hosts - 1) / hosts * nbytes / self.bandwidth(nbytes / hosts, "all_gather")

    def describe(self) -> dict:
        return {
            "source": self.source,
            "all_gather_points_bytes_Bps": self.all_gather,
            "ppermute_points_bytes_Bps": self.ppermute,
            "formula": "all_gather: (H-1)*shard/bw(shard); ppermute: bytes/bw(bytes); bw interpolated log-log "
            "in the shard size, end slopes extrapolated below, capped above",
        }


def spec_bandwidth_model() -> BandwidthModel:
    return BandwidthModel(
        SPEC_ALL_GATHER,
        None,
        "measured all_gather over 4 NVLinked H200s, per GPU "
        "(51 / 134 / 255 GB/s at 16 / 128 / 512 MB); ppermute assumed "
        "the same",
    )


def measure_bandwidth(devices, sizes: Sequence[int], repeats: int = 5) -> BandwidthModel:
    """Measure all_gather and ppermute over a 1-D mesh of `devices` at shard sizes `sizes` (bytes, bf16 data)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    n = len(devices)
    mesh = Mesh(np.array(devices), ("sp",))
    perm = [(i, (i + 1) % n) for i in range(n)]
    ag = jax.jit(
        jax.shard_map(
            lambda x: jax.lax.all_gather(x, "sp", tiled=True),
            mesh=mesh,
            in_specs=P("sp"),
            out_specs=P("sp"),
            check_vma=False,
        )
    )
    pp = jax.jit(
        jax.shard_map(
            lambda x: jax.lax.ppermute(x, "sp", perm), mesh=mesh, in_specs=P("sp"), out_specs=P("sp"), check_vma=False
        )
    )
    ag_pts, pp_pts = [], []
    for size in sizes:
        elems = max(size // 2, 1)
        x = jax.device_put(jnp.ones((n * elems,), jnp.bfloat16), NamedSharding(mesh, P("sp")))
        t_ag, _, _ = timed(ag, x, warmup=1, repeats=repeats)
        t_pp, _, _ = timed(pp, x, warmup=1, repeats=repeats)
        ag_pts.append((elems * 2, (n - 1) * elems * 2 / t_ag))
        pp_pts.append((elems * 2, elems * 2 / t_pp))
        del x
    return BandwidthModel(ag_pts, pp_pts, f"measured here over {n} {devices[0].device_kind} devices")


def loglog_plot(
    series: dict[str, tuple[list, list, dict]],
    path: str | os.PathLike,
    title: str,
    xlabel: str = "sequence length (tokens)",
    ylabel: str = "prefill time (s)",
) -> None:
    """series: label -> (xs, ys, matplotlib kwargs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for label, (xs, ys, kw) in series.items():
        if xs:
            ax.plot(xs, ys, label=label, **kw)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def smoke_verdict(problems: list[str], ok: str) -> int:
    """A smoke check's last word: 'SMOKE FAILED: ...' and 1, or 'smoke ok: <ok>' and 0."""
    if problems:
        print("SMOKE FAILED: " + "; ".join(problems))
        return 1
    print(f"smoke ok: {ok}")
    return 0


def format_table(rows: list[dict], columns: list[tuple[str, str, Callable[[dict], Any]]]) -> str:
    """columns: (header, format spec, getter); None values print as '-'."""
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        line = []
        for _, fmt, get in columns:
            try:
                v = get(r)
            except (KeyError, TypeError, ZeroDivisionError):
                v = None
            line.append("-" if v is None else format(v, fmt))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)
