"""The README's runnable blocks run as shown (marked `<!-- readme-test -->`), on small inputs where a block's
default would take minutes, so the README cannot drift from the code."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# extra flags that keep a command small here (argparse takes the last value of a repeated flag)
SMALLER = {
    ("apb-jax", "demo"): ["--length", "2048"],
    ("apb-jax", "bench"): ["--strategies", "full,apb", "--real", "no"],
}
EXPECT = {  # what the output must show
    ("apb-jax", "demo"): "[correct]",
    ("apb-jax", "generate"): "8 6 6 6 6",
    ("apb-jax", "eval"): "lang:passkey",
    ("apb-jax", "bench"): "smoke ok",
}


def blocks(lang: str) -> list[str]:
    return re.findall(rf"<!-- readme-test -->\n```{lang}\n(.*?)```", README, flags=re.S)


def commands() -> list[list[str]]:
    """Every marked bash command as argv lists (continuation lines joined, `a && b` split, pip installs dropped:
    the package is installed already)."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part)
                if argv and argv[0] != "pip":
                    out.append(argv)
    return out


TEST_COMMAND = ["python", "-m", "pytest", "-q"]
RUNNABLE = [c for c in commands() if c != TEST_COMMAND]


def _env():
    env = dict(os.environ)
    # each command asks for its own devices, as on a fresh machine (conftest's compile flags are kept)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env.pop("JAX_PLATFORMS", None)
    # the session's compile cache (conftest) is kept: a program another test compiled need not compile again
    return env


def test_the_readme_has_runnable_blocks_and_ci_runs_its_test_command():
    assert len(RUNNABLE) >= 4 and len(blocks("python")) == 1
    assert TEST_COMMAND in commands()
    ci = (ROOT / ".ci" / "run").read_text()
    install = next(b for b in blocks("bash") if "pytest" in b).split("&&")[0].strip()
    assert install in ci and "python -m pytest -q" in ci, ".ci/run must run the README's test command"


@pytest.mark.parametrize("argv", RUNNABLE, ids=lambda a: " ".join(a[:2]))
def test_readme_command_runs(argv):
    key = tuple(argv[:2])
    exe = [sys.executable, "-m", "apb_jax.cli"] if argv[0] == "apb-jax" else [argv[0]]
    run = exe + argv[1:] + SMALLER.get(key, [])
    r = subprocess.run(run, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(argv)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert EXPECT.get(key, "") in r.stdout + r.stderr
    if key == ("apb-jax", "demo"):  # the shipped retriever answers with full attention and with APB
        assert r.stdout.count("[correct]") == 2 and "[wrong]" not in r.stdout, r.stdout[-2000:]


def test_readme_python_api_block_runs(tmp_path):
    (code,) = blocks("python")
    script = tmp_path / "api.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "8 6 6 6 6" in r.stdout
