"""`apb-jax launch`: try a multi-process run on one machine (CPU processes with fake devices, gloo collectives).

    apb-jax launch --processes 2 --devices-per-process 2 -- generate --model m --strategy apb ...
    python -m apb_jax.launch --processes 2 --devices-per-process 2 -- my_script.py --flag

Spawns N copies of the command on this machine, each told (through APB_JAX_* variables, read by
`apb_jax.distributed.initialize`) the loopback coordinator 127.0.0.1:<free port>, the process count, its id and
its device count.  Process 0's output is streamed; the others' goes to log files that are shown when they fail.
Each child runs in its own process group; all of them are stopped when one fails, at the time limit, or on
Ctrl-C.  JAX's runtime does the rest: this is a starter, not a protocol.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from apb_jax import distributed as dist

_REPO = str(Path(__file__).resolve().parents[1])
# join the run before the CLI starts, so any subcommand runs multi-process (initialize is idempotent)
_CLI = (
    "import sys; from apb_jax import distributed; distributed.initialize(); "
    "from apb_jax.cli import main; sys.exit(main())"
)
DEFAULT_TIMEOUT_S = 3600


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the launcher's flags and the command after `--` to a (sub)parser."""
    parser.add_argument("--processes", type=int, default=2, metavar="N", help="processes to start (default 2)")
    parser.add_argument(
        "--devices-per-process", type=int, default=1, metavar="D", help="fake CPU devices per process (default 1)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"stop every process after S seconds (default {DEFAULT_TIMEOUT_S})",
    )
    parser.add_argument(
        "--init-timeout",
        type=int,
        default=120,
        metavar="S",
        help="seconds the processes wait for each other at start-up (default 120)",
    )
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="after `--`: an apb-jax subcommand with its flags (e.g. `generate ...`), a script "
        "`file.py ...`, or `-m module ...`",
    )


def main(args: argparse.Namespace) -> int:
    """Run what `add_arguments` parsed; returns the exit code."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    return launch(
        command,
        args.processes,
        args.devices_per_process,
        args.timeout,
        init_timeout_s=getattr(args, "init_timeout", 120),
    )


def child_command(argv: Sequence[str]) -> list[str]:
    """What each process runs: `x.py ...` and `-m mod ...`/`-c code ...` under this Python, else `apb-jax argv`."""
    argv = list(argv)
    if not argv:
        raise ValueError("launch needs a command after `--`, e.g. `apb-jax launch --processes 2 -- generate ...`")
    if argv[0].endswith(".py") or argv[0] in ("-m", "-c"):
        return [sys.executable, "-u", *argv]
    return [sys.executable, "-u", "-c", _CLI, *argv]


def child_env(
    process_id: int,
    processes: int,
    devices_per_process: int,
    coordinator: str,
    init_timeout_s: int | None = None,
    base: dict | None = None,
) -> dict:
    env = dict(os.environ if base is None else base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    env["JAX_PLATFORMS"] = "cpu"
    env[dist.ENV_COORDINATOR] = coordinator
    env[dist.ENV_NUM_PROCESSES] = str(processes)
    env[dist.ENV_PROCESS_ID] = str(process_id)
    env[dist.ENV_LOCAL_DEVICE_COUNT] = str(devices_per_process)
    if init_timeout_s is not None:
        env[dist.ENV_INIT_TIMEOUT] = str(int(init_timeout_s))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, env.get("PYTHONPATH", "")) if p)
    return env


def launch(
    argv: Sequence[str],
    processes: int,
    devices_per_process: int = 1,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    init_timeout_s: int = 120,
    out=None,
) -> int:
    """Start `processes` local CPU processes of `devices_per_process` devices running `argv`; wait for all.

    Returns 0 when every process exits 0, the first failing process's exit code (128 + signal for a signal) when
    one fails (the others are stopped), 124 at `timeout_s`, 130 on Ctrl-C/SIGTERM.  `out`: where process 0's
    output and the launcher's messages go (default sys.stdout).
    """
    out = sys.stdout if out is None else out
    if processes < 1:
        raise ValueError(f"processes={processes} must be >= 1")
    if devices_per_process < 1:
        raise ValueError(f"devices_per_process={devices_per_process} must be >= 1")
    if not timeout_s or timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be > 0")
    cmd = child_command(argv)
    coordinator = f"127.0.0.1:{dist.free_port('127.0.0.1')}"
    logdir = Path(tempfile.mkdtemp(prefix="apb_jax_launch_"))
    procs: list[subprocess.Popen] = []
    logs: list[Path | None] = []
    forwarder = None
    old_term = _install_sigterm()
    rc = 0
    try:
        for i in range(processes):
            env = child_env(i, processes, devices_per_process, coordinator, init_timeout_s)
            if i == 0:
                p = subprocess.Popen(
                    cmd,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
                forwarder = threading.Thread(target=_forward, args=(p.stdout, out), daemon=True)
                forwarder.start()
                logs.append(None)
            else:
                log = logdir / f"process{i}.log"
                with open(log, "wb") as fh:
                    p = subprocess.Popen(
                        cmd,
                        env=env,
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                logs.append(log)
            procs.append(p)
        deadline = time.monotonic() + timeout_s

        def shut_down(message: str, only_failed: bool) -> None:
            _stop(procs)
            if forwarder is not None:
                forwarder.join(timeout=5)
            _say(out, f"apb-jax launch: {message}")
            _show_logs(out, procs, logs, only_failed=only_failed)

        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, c = failed[0]
                rc = 128 - c if c < 0 else c
                shut_down(
                    f"process {i} of {processes} failed ({_describe_code(c)}); stopped the others", only_failed=True
                )
                break
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                rc = 124
                shut_down(
                    f"stopped all {processes} processes after the time limit of {timeout_s:g} s (--timeout)",
                    only_failed=False,
                )
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop(procs)
        _say(out, f"apb-jax launch: interrupted; stopped all {len(procs)} processes")
        rc = 130
    finally:
        _stop(procs)
        if forwarder is not None:
            forwarder.join(timeout=5)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if rc == 0:
            for log in logs:
                if log is not None:
                    log.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                logdir.rmdir()
    return rc


# ------------------------------------------------------------------------------------------------- helpers


def _forward(stream, out):
    for line in iter(stream.readline, b""):
        out.write(line.decode(errors="replace"))
        out.flush()
    stream.close()


def _say(out, msg: str):
    out.write(msg + "\n")
    out.flush()


def _describe_code(c: int) -> str:
    if c < 0:
        try:
            return f"killed by {signal.Signals(-c).name}"
        except ValueError:
            return f"killed by signal {-c}"
    return f"exit code {c}"


def _show_logs(out, procs, logs, only_failed: bool, tail: int = 40):
    for i, (p, log) in enumerate(zip(procs, logs)):
        if log is None or not log.exists():
            continue
        if only_failed and p.returncode in (0, None, -signal.SIGTERM, -signal.SIGKILL):
            continue
        lines = log.read_text(errors="replace").splitlines()[-tail:]
        _say(
            out,
            f"--- process {i} ({_describe_code(p.returncode) if p.returncode is not None else 'running'}), "
            f"last {len(lines)} lines of {log}:",
        )
        for line in lines:
            _say(out, f"[{i}] {line}")


def _stop(procs: Sequence[subprocess.Popen], grace_s: float = 3.0):
    """SIGTERM every child's process group (also of children that exited: their own children may live on), then
    SIGKILL what is left after `grace_s`.  Each child leads its own group (start_new_session), so only processes
    this launcher started are hit; the kernel keeps a group id from being reused while the group has members."""
    procs = [p for p in procs if not getattr(p, "_apb_stopped", False)]
    alive = [p for p in procs if p.poll() is None]
    for p in procs:
        _killpg(p, signal.SIGTERM)
    end = time.monotonic() + grace_s
    for p in alive:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, end - time.monotonic()))
    for p in procs:
        _killpg(p, signal.SIGKILL)
        if p.poll() is None:
            p.wait()
        p._apb_stopped = True


def _killpg(p: subprocess.Popen, sig):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, sig)  # start_new_session: the child leads its own group


def _install_sigterm():
    """Turn SIGTERM into KeyboardInterrupt so the children are stopped (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m apb_jax.launch", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


if __name__ == "__main__":
    sys.exit(main(_parser().parse_args()))
