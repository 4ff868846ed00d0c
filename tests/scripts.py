"""Import a repository script (benchmarks/, training/ hold scripts, not packages) as a module, once per session."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str):
    """`load_script("benchmarks/prefill_bench.py")` -> the module, registered in sys.modules under its file stem
    (dataclasses look their module up there)."""
    name = Path(relpath).stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
