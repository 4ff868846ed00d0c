#!/usr/bin/env python
"""Run the notebooks top to bottom on the CPU (4 fake devices) and save them with their outputs, in place.

    python notebooks/execute.py                                   # every notebooks/*.ipynb
    python notebooks/execute.py notebooks/02_anatomy_of_apb.ipynb --timeout 300

Needs the `notebooks` extra (`pip install -e ".[notebooks]"`: nbclient, nbformat, ipykernel, matplotlib).  The kernel
starts in the notebook's directory with `kernel_env()`: 4 fake CPU devices, JAX on the CPU and the repository root
first on PYTHONPATH, so the checkout's code is what runs.  tests/test_notebooks.py calls `execute` on temporary
copies and checks the outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CPU_DEVICES = 4
MAX_BYTES = 1 << 20  # a committed notebook must stay under 1 MiB


def notebooks() -> list[Path]:
    """The notebooks of this directory, in name order."""
    return sorted(HERE.glob("[0-9][0-9]_*.ipynb"))


def kernel_env(cpu_devices: int = CPU_DEVICES) -> dict[str, str]:
    """The environment the kernel starts with: this process's, plus fake CPU devices and the checkout on the path."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={cpu_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # the frozen-modules note of the debugger would land in stderr
    return env


def execute(path: Path, out: Path | None = None, *, timeout: int = 600, cwd: Path | None = None):
    """Execute notebook `path` in a fresh kernel; write it with outputs to `out` (None: do not write).

    timeout: seconds allowed per cell.  cwd: the kernel's working directory (default: the notebook's).
    Returns (notebook node, wall seconds).  A failing cell raises nbclient's CellExecutionError.
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd or path.parent)}},
        record_timing=False,
    )
    t0 = time.perf_counter()
    client.execute(env=kernel_env())
    seconds = time.perf_counter() - t0
    if out is not None:
        nbformat.write(nb, out)
    return nb, seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", type=Path, help="notebooks to run (default: notebooks/[0-9][0-9]_*.ipynb)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell (default 600)")
    args = ap.parse_args(argv)
    if args.timeout < 1:
        ap.error(f"--timeout={args.timeout} must be >= 1 second")
    paths = args.paths or notebooks()
    total = 0.0
    for p in paths:
        if not p.is_file():
            ap.error(f"notebook {str(p)!r} does not exist")
        _, seconds = execute(p, p, timeout=args.timeout)
        total += seconds
        size = p.stat().st_size
        print(f"{p}: {seconds:.1f} s, {size / 1024:.0f} KiB{'  (over 1 MiB!)' if size > MAX_BYTES else ''}")
    print(f"all: {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
