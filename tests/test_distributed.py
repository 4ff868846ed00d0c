"""Multi-process runs (jax.distributed over gloo on CPU): 2 processes x 2 fake devices give exactly the tokens of
1 process x 4 devices; start-up errors name what to fix; the local launcher bounds and cleans up its children.

Every spawned process uses the loopback address and is bounded in time (launch's timeout_s, initialize's
timeout_s); the launcher kills each child's process group when it returns.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from apb_jax import distributed
from apb_jax.cli import main
from apb_jax.launch import launch

TESTS = Path(__file__).resolve().parent
WORKER = str(TESTS / "mp_worker.py")
STRATEGIES = ("apb", "ring")  # all_gather + LSE merge, ppermute: the collectives a mesh adds


def _worker_module():
    sys.path.insert(0, str(TESTS))
    try:
        import mp_worker
    finally:
        sys.path.remove(str(TESTS))
    return mp_worker


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process results, [process 0 results, process 1 results], launcher output, seconds).

    The 2-process run is launched in a thread while this process computes the 1 x 4 reference."""
    out = tmp_path_factory.mktemp("mp")
    buf = io.StringIO()
    box = {}

    def multi():
        t0 = time.perf_counter()
        box["rc"] = launch(
            [WORKER, "--out", str(out), "--strategies", ",".join(STRATEGIES)],
            processes=2,
            devices_per_process=2,
            timeout_s=240,
            init_timeout_s=60,
            out=buf,
        )
        box["seconds"] = time.perf_counter() - t0

    th = threading.Thread(target=multi)
    th.start()
    try:
        single = _worker_module().run_strategies(STRATEGIES, devices=4)
    finally:
        th.join()
    assert box["rc"] == 0, f"launcher exit {box['rc']}; output:\n{buf.getvalue()[-6000:]}"
    multi_results = [json.loads((out / f"tokens_{i}.json").read_text()) for i in range(2)]
    return single, multi_results, buf.getvalue(), box["seconds"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_match_one_process(runs, strategy):
    import numpy as np

    single, multi, log, _ = runs
    assert "process 0/2: 2 local of 4 cpu devices" in log, log[-3000:]
    for pid, res in enumerate(multi):
        got = res[strategy]
        assert got["tokens"] == single[strategy]["tokens"], (pid, got["tokens"], single[strategy]["tokens"])
        assert got.get("sampled") == single[strategy].get("sampled")  # apb also samples (temperature 0.8)
        # same program, same shards: the numbers agree to float32 rounding (in practice bit for bit)
        np.testing.assert_allclose(got["first_logits"], single[strategy]["first_logits"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["doc_logits"], single[strategy]["doc_logits"], rtol=1e-5, atol=1e-5)
    assert multi[0][strategy] == multi[1][strategy]  # every process returns the same tokens and logits


def test_only_process_zero_streams(runs):
    _, _, log, _ = runs
    assert "done in" in log and "process 1/2" not in log


def test_device_count_that_does_not_fit(tmp_path):
    buf = io.StringIO()
    rc = launch(
        [WORKER, "--out", str(tmp_path), "--probe-devices", "3,8,2"],
        processes=2,
        devices_per_process=2,
        timeout_s=120,
        init_timeout_s=60,
        out=buf,
    )
    log = buf.getvalue()
    assert rc == 3, log[-3000:]
    assert "DEVICES-ERROR 3: devices=3 does not fit 2 processes x 2 local cpu device(s)" in log, log[-3000:]
    assert "DEVICES-ERROR 8: devices=8" in log and "allowed: [2, 4]" in log and "--devices-per-process" in log
    assert "DEVICES-OK 2" in log


def test_wrong_process_count_fails_within_timeout(tmp_path):
    """Both processes are told there are 3: they wait init_timeout (5 s), say what to check, and stop."""
    buf = io.StringIO()
    t0 = time.perf_counter()
    rc = launch(
        [WORKER, "--out", str(tmp_path), "--num-processes", "3"],
        processes=2,
        devices_per_process=1,
        timeout_s=90,
        init_timeout_s=5,
        out=buf,
    )
    dt = time.perf_counter() - t0
    log = buf.getvalue()
    assert rc != 0 and dt < 60, (rc, dt, log[-3000:])
    assert "--num-processes=3" in log and "failed" in log, log[-3000:]


def test_unreachable_coordinator_fails_within_timeout():
    port = distributed.free_port()  # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(
        RuntimeError,
        match=rf"could not reach the coordinator 127\.0\.0\.1:{port} within 2 s.*"
        r"Start process 0",
    ):
        distributed.initialize(coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=1, timeout_s=2)
    assert time.perf_counter() - t0 < 10
    assert not distributed.jax.distributed.is_initialized()


def test_coordinator_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"process 0 cannot listen on port {port}.*pick a free port"):
            distributed.initialize(coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=0, timeout_s=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=2), r"process_id=2 must be in \[0, 1\]"),
        (dict(coordinator="127.0.0.1:1234", num_processes=2), r"missing: --process-id"),
        (dict(coordinator="localhost", num_processes=2, process_id=0), r"must be HOST:PORT"),
        (dict(coordinator="127.0.0.1:1234", num_processes=0, process_id=0), r"num_processes=0 must be >= 1"),
    ],
)
def test_bad_settings(monkeypatch, kwargs, match):
    for var in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=match):
        distributed.initialize(timeout_s=2, **kwargs)


def test_single_process_when_nothing_is_given(monkeypatch):
    for var in (
        "SLURM_JOB_ID",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_MCA_orte_hnp_uri",
        distributed.ENV_COORDINATOR,
        distributed.ENV_NUM_PROCESSES,
        distributed.ENV_PROCESS_ID,
        "JAX_COORDINATOR_ADDRESS",
    ):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() is False
    assert distributed.is_main_process() and distributed.process_count() == 1


# ---------------------------------------------------------------------------------- launcher (no jax inside)

_SLEEPER = (
    "import os, subprocess, sys, time; "
    "g = subprocess.Popen(['sleep', '120']); "
    "f = os.path.join(sys.argv[1], 'pid%s' % os.environ['APB_JAX_PROCESS_ID']); "
    "open(f + '.tmp', 'w').write(str(g.pid)); os.replace(f + '.tmp', f); "
    "code = int(sys.argv[2]) if os.environ['APB_JAX_PROCESS_ID'] == '1' else 0; "
    "time.sleep(1 if code else 120); sys.exit(code)"
)


def _gone(pid: int, within: float = 5.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def _grandchildren(tmp_path, n):
    return [int((tmp_path / f"pid{i}").read_text()) for i in range(n) if (tmp_path / f"pid{i}").exists()]


@pytest.mark.parametrize(
    "exit_code, timeout_s, rc_want, message",
    [
        ("7", 60, 7, "process 1 of 2 failed (exit code 7)"),  # one fails: everyone stops
        ("0", 3, 124, "time limit of 3 s"),  # nobody ends: the time limit stops all
    ],
    ids=["one-fails", "time-limit"],
)
def test_launch_stops_every_process(tmp_path, exit_code, timeout_s, rc_want, message):
    buf = io.StringIO()
    t0 = time.perf_counter()
    rc = launch(
        ["-c", _SLEEPER, str(tmp_path), exit_code], processes=2, devices_per_process=1, timeout_s=timeout_s, out=buf
    )
    assert rc == rc_want and time.perf_counter() - t0 < 20, (rc, buf.getvalue())
    assert message in buf.getvalue()
    pids = _grandchildren(tmp_path, 2)
    assert len(pids) == 2 and all(_gone(p) for p in pids), pids


def test_launch_module_sigterm_stops_children(tmp_path):
    """`python -m apb_jax.launch ... -- cmd`, then SIGTERM to the launcher (as Ctrl-C would): all children go."""
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent))
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apb_jax.launch",
            "--processes",
            "2",
            "--timeout",
            "60",
            "--",
            "-c",
            _SLEEPER,
            str(tmp_path),
            "0",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        end = time.monotonic() + 20
        while len(_grandchildren(tmp_path, 2)) < 2 and time.monotonic() < end:
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, out
    assert b"interrupted; stopped all 2 processes" in out
    pids = _grandchildren(tmp_path, 2)
    assert len(pids) == 2 and all(_gone(p) for p in pids), pids


def test_launch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="needs a command after `--`"):
        launch([], 2, 1, 10)
    with pytest.raises(ValueError, match="processes=0 must be >= 1"):
        launch(["-c", "pass"], 0, 1, 10)


# ---------------------------------------------------------------------------- the CLI, end to end (if present)


def _tiny_hf_model(path: Path) -> Path:
    """A seeded tiny HF Llama over the package's task tokenizer (so `apb-jax generate` can tokenize)."""
    import shutil

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from apb_jax.tokenizer import VOCAB

    cfg = transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path), safe_serialization=True)
    for f in (TESTS.parent / "apb_jax" / "assets" / "retriever").iterdir():
        shutil.copy(f, path / f.name)
    return path


def test_cli_launch_generate_matches_single_process(tmp_path, capsys):
    import random

    from apb_jax.tokenizer import VOCAB

    model = _tiny_hf_model(tmp_path / "model")
    words = [w for w in VOCAB if w.isalpha()]
    random.seed(0)
    (tmp_path / "ctx.txt").write_text(" ".join(random.choice(words) for _ in range(120)))
    gen = [
        "generate",
        "--model",
        str(model),
        "--context-file",
        str(tmp_path / "ctx.txt"),
        "--question",
        "QRY KEY",
        "--strategy",
        "apb",
        "--q-insert",
        "2",
        "--max-new-tokens",
        "4",
        "--dtype",
        "float32",
        "--json",
    ]
    cmd = [
        sys.executable,
        "-m",
        "apb_jax.cli",
        "launch",
        "--processes",
        "2",
        "--devices-per-process",
        "2",
        "--timeout",
        "180",
        "--",
        *gen,
    ]
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent))
    multi = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert main(gen + ["--devices", "4"]) == 0  # the reference: this process, 4 devices
        single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        out, err = multi.communicate(timeout=200)
    finally:
        if multi.poll() is None:
            os.killpg(multi.pid, signal.SIGKILL)
            multi.wait()
    assert multi.returncode == 0, err.decode()[-4000:]
    records = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    assert len(records) == 1, out.decode()  # only process 0 prints
    assert records[0]["hosts"] == 4 and records[0]["tokens"] == single["tokens"], (records[0], single)
