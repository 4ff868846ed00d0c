"""Multi-process runs on JAX's own multi-controller runtime (`jax.distributed`): one process per machine (or GPU).

    import apb_jax
    apb_jax.distributed.initialize()               # SLURM / Open MPI / Kubernetes detected by JAX, or the launcher's
    engine = apb_jax.Engine(model, strategy="apb") # env, or single process when none is found
    out = engine.generate(doc, query)              # every process returns the same tokens
    if apb_jax.distributed.is_main_process(): print(out.tokens)

Every process runs the same program on a mesh that spans all processes' devices (`jax.devices()` is global after
`initialize`); the engine builds its inputs with `jax.make_array_from_callback`, so each process fills only its own
devices' shards.  Nothing here replaces the runtime: `initialize` resolves the settings, checks them, and calls
`jax.distributed.initialize`.  On CPU the collectives go over gloo.

Settings come from, in order: the arguments, the `APB_JAX_*` environment variables that `apb-jax launch` sets
(`APB_JAX_COORDINATOR`, `APB_JAX_NUM_PROCESSES`, `APB_JAX_PROCESS_ID`, `APB_JAX_LOCAL_DEVICE_COUNT`), then JAX's
cluster detection (SLURM, Open MPI, Kubernetes, TPU, ...).  With none of these, the run stays single-process.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

import jax

ENV_COORDINATOR = "APB_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "APB_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "APB_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_COUNT = "APB_JAX_LOCAL_DEVICE_COUNT"
ENV_INIT_TIMEOUT = "APB_JAX_INIT_TIMEOUT"
DEFAULT_TIMEOUT_S = 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --coordinator/--num-processes/--process-id/--local-device-count/--init-timeout to a CLI parser."""
    g = parser.add_argument_group(
        "multi-process (jax.distributed; default: detected from SLURM/Open MPI/"
        "Kubernetes or `apb-jax launch`, else one process)"
    )
    g.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="address of process 0's coordinator service (same on every process)",
    )
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="how many processes in all")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's id, 0..N-1")
    g.add_argument(
        "--local-device-count",
        type=int,
        default=None,
        metavar="D",
        help="devices this process uses (CPU: fake devices; GPU: GPUs local_rank*D .. +D-1)",
    )
    g.add_argument(
        "--init-timeout",
        type=int,
        default=None,
        metavar="S",
        help=f"seconds to wait for every process to join (default {DEFAULT_TIMEOUT_S})",
    )


def initialize_from_args(args: argparse.Namespace) -> bool:
    """`initialize` with the values `add_arguments` parsed."""
    return initialize(
        coordinator=getattr(args, "coordinator", None),
        num_processes=getattr(args, "num_processes", None),
        process_id=getattr(args, "process_id", None),
        local_device_count=getattr(args, "local_device_count", None),
        timeout_s=getattr(args, "init_timeout", None),
    )


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_count: int | None = None,
    timeout_s: int | None = None,
) -> bool:
    """Join (or start) a multi-process run.  Call before anything touches a JAX device.

    coordinator "HOST:PORT" of process 0 (it binds that port; the others connect to it); num_processes N;
    process_id in 0..N-1; local_device_count: devices this process uses (CPU: sets `jax_num_cpu_devices`;
    GPU: GPUs `local_rank*D .. local_rank*D+D-1`, local_rank from SLURM_LOCALID / OMPI_COMM_WORLD_LOCAL_RANK).
    Unset values come from the APB_JAX_* environment, then from JAX's cluster detection.  timeout_s bounds the
    wait for every process to join (default: APB_JAX_INIT_TIMEOUT, else 300 s).  Returns True when a
    multi-process runtime is up, False for a single-process run (nothing given, no cluster found, or a cluster
    of one process).  Calling it again is a no-op.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = _int_setting("num_processes", num_processes, ENV_NUM_PROCESSES)
    process_id = _int_setting("process_id", process_id, ENV_PROCESS_ID)
    local_device_count = _int_setting("local_device_count", local_device_count, ENV_LOCAL_DEVICE_COUNT)
    timeout_s = _int_setting("timeout_s", timeout_s, ENV_INIT_TIMEOUT)
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    if timeout_s < 1:
        raise ValueError(f"timeout_s={timeout_s} must be >= 1 (seconds to wait for every process to join)")
    if local_device_count is not None and local_device_count < 1:
        raise ValueError(f"local_device_count={local_device_count} must be >= 1")

    given = (coordinator, num_processes, process_id)
    if all(v is None for v in given):
        cluster = _detected_cluster()
        if cluster is None or cluster[1] == 1:
            # no cluster manager (or a cluster of one process): a plain single-process run on all local devices
            if local_device_count is not None:
                _set_local_devices(local_device_count, None)
            return False
    else:
        missing = [
            f"--{n.replace('_', '-')}"
            for n, v in zip(("coordinator", "num_processes", "process_id"), given)
            if v is None
        ]
        if missing and _detected_cluster() is None:
            raise ValueError(
                f"a multi-process run needs --coordinator, --num-processes and --process-id together "
                f"(no SLURM/Open MPI/Kubernetes environment was found to fill in the rest); missing: "
                f"{', '.join(missing)}"
            )
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be >= 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id={process_id} must be in [0, {num_processes - 1}] for num_processes="
            f"{num_processes}; give each process a distinct id 0..N-1"
        )
    if coordinator is not None:
        host, port = _split_address(coordinator)
    local_ids = _set_local_devices(local_device_count, num_processes) if local_device_count is not None else None
    if jax.config.jax_cpu_collectives_implementation != "mpi":  # keep an explicit MPI choice
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes

    if coordinator is not None and process_id not in (None, 0):
        _wait_reachable(host, port, timeout_s, process_id)
    if coordinator is not None and process_id == 0:
        _check_bindable(port, coordinator)

    who = f"process {process_id if process_id is not None else '?'} of {num_processes or '?'}"
    watchdog = _Watchdog(
        timeout_s,
        f"apb_jax.distributed: {who} is still waiting for the other processes at the "
        f"coordinator {coordinator or '(detected)'} after ~{{:.0f}} s (timeout {timeout_s} s). "
        f"JAX will stop this process at the timeout.  Check that exactly "
        f"--num-processes={num_processes} processes were started, each with a distinct "
        f"--process-id in 0..{(num_processes or 1) - 1} and the same --coordinator, and "
        f"that they can reach it.",
    )
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_ids,
            initialization_timeout=int(timeout_s),
        )
    except (ValueError, RuntimeError) as e:
        raise RuntimeError(f"jax.distributed.initialize failed for {who} (coordinator {coordinator}): {e}") from e
    finally:
        watchdog.cancel()
    return True


def is_main_process() -> bool:
    """True on process 0 (the one that prints, writes files and shows progress bars)."""
    return jax.process_index() == 0


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def describe() -> str:
    """One line: processes, local and global devices (for logs)."""
    return (
        f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
        f"{jax.device_count()} {jax.devices()[0].platform} devices"
    )


def shutdown() -> None:
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


# ------------------------------------------------------------------------------------------------- helpers


def _int_setting(name: str, value, env: str) -> int | None:
    if value is not None:
        return int(value)
    raw = os.environ.get(env)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{env}={raw!r} must be an integer ({name})") from None


def _split_address(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator={addr!r} must be HOST:PORT (e.g. 127.0.0.1:12345 or node001:12345)")
    return host.strip("[]"), int(port)


def _detected_cluster() -> tuple[str, int | None] | None:
    """(name, process count) of the cluster environment JAX would detect, or None."""
    try:
        from jax._src import clusters

        for env in clusters.ClusterEnv._cluster_types:
            if not getattr(env, "opt_in_only_method", False) and env.is_env_present():
                try:
                    count = env.get_process_count()
                except Exception:
                    count = None
                return env.__name__, count
        return None
    except Exception:
        if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_NTASKS"):
            return "SlurmCluster", int(os.environ["SLURM_NTASKS"])
        if os.environ.get("OMPI_COMM_WORLD_SIZE"):
            return "OmpiCluster", int(os.environ["OMPI_COMM_WORLD_SIZE"])
        return None


def _platform_hint() -> str:
    """'cpu' or 'gpu': which backend this process will use, decided without initialising one."""
    plats = (jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS") or "").lower()
    if plats:
        return "cpu" if plats.split(",")[0].strip() == "cpu" else "gpu"
    import importlib.util

    for mod in ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin", "jax_rocm60_plugin", "jaxlib.cuda"):
        try:
            if importlib.util.find_spec(mod) is not None:
                return "gpu"
        except (ImportError, ValueError):
            pass
    return "cpu"


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge._backends)
    except Exception:
        return False


def _set_local_devices(count: int, num_processes: int | None) -> list[int] | None:
    """CPU: `count` fake devices (jax_num_cpu_devices).  GPU: the ids of this process's `count` GPUs."""
    if _platform_hint() == "cpu":
        if _backends_started() and jax.local_device_count() != count:
            raise RuntimeError(
                f"local_device_count={count} must be set before JAX starts its CPU backend (it has "
                f"{jax.local_device_count()} devices already): call apb_jax.distributed.initialize "
                f"first thing"
            )
        jax.config.update("jax_num_cpu_devices", count)
        return None
    rank = int(
        os.environ.get("SLURM_LOCALID")
        or os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK")
        or os.environ.get("LOCAL_RANK")
        or 0
    )
    return list(range(rank * count, (rank + 1) * count))


def _wait_reachable(host: str, port: int, timeout_s: float, process_id) -> None:
    """Fail fast, with a message, when process 0's coordinator cannot be reached (it may start a little later)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(0.1, deadline - time.monotonic()))):
                return
        except OSError as e:
            last = e
            time.sleep(0.25)
    raise RuntimeError(
        f"process {process_id} could not reach the coordinator {host}:{port} within {timeout_s} s "
        f"({last}). Start process 0 with the same --coordinator (it listens on that port), check the "
        f"host name/port and firewalls, or raise --init-timeout."
    )


def _check_bindable(port: int, coordinator: str) -> None:
    for fam, addr in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            s = socket.socket(fam, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, port))
            return
        except OSError as e:
            raise RuntimeError(
                f"process 0 cannot listen on port {port} of --coordinator {coordinator} ({e}): pick a free port"
            ) from None
        finally:
            s.close()


class _Watchdog:
    """Print a hint shortly before JAX aborts a process that waited `timeout_s` for the others (JAX ends such a
    process from C++, so no Python exception can carry the hint)."""

    def __init__(self, timeout_s: float, message: str):
        self._start = time.monotonic()
        delay = max(0.5, min(timeout_s * 0.9, timeout_s - 1.0))
        self._msg = message
        self._timer = threading.Timer(delay, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self):
        print(self._msg.format(time.monotonic() - self._start), file=sys.stderr, flush=True)

    def cancel(self):
        self._timer.cancel()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (for the local launcher)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
