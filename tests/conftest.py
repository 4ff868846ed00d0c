"""Test setup: four fake CPU devices, set before jax is imported anywhere.

With APB_TEST_GPU=1 (the GPU tests, see the README's "Development") jax may use the GPU; compiles are kept short
(no GEMM autotuning: the tests check values, not speed), CUDA command buffers are off (instantiating CUDA graphs
for many small programs ran out of memory under parallel workers).

Compiled programs go to one on-disk cache per test session (a fresh temporary directory, or $APB_TEST_CACHE;
"off" disables it), shared with the processes the tests start (the CLI, notebooks, multi-process runs): many tests
build the same small programs in new closures, and a cache hit skips their compile. A fresh directory keeps every
CI run cold, as a newcomer's first run is.
"""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
GPU_TESTS = bool(os.environ.get("APB_TEST_GPU"))
if GPU_TESTS:
    os.environ["XLA_FLAGS"] += " --xla_gpu_autotune_level=0 --xla_gpu_enable_command_buffer="
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
else:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # compile for the tests, not for speed: LLVM's cheap pipeline (same HLO, same float semantics) takes about a
    # quarter off the suite, which on CPU is nearly all compiling; inherited by the processes the tests start
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
_OWN_CACHE = not os.environ.get("APB_TEST_CACHE")  # made here (and removed at the end), not given
CACHE = os.environ.get("APB_TEST_CACHE") or tempfile.mkdtemp(prefix="apb_jax_test_xla_")
os.environ["APB_TEST_CACHE"] = CACHE  # pytest-xdist workers inherit it: one cache for the whole run
if CACHE != "off":
    os.environ["APB_JAX_CACHE"] = CACHE  # the CLI's cache, in-process and in subprocesses
    os.environ["JAX_COMPILATION_CACHE_DIR"] = CACHE  # any other jax process the tests start (notebooks, workers)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    jax.config.update("jax_compilation_cache_dir", CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
else:
    os.environ["APB_JAX_CACHE"] = "off"


def pytest_sessionfinish(session, exitstatus):
    """No test collected is a failure, not pytest's quiet exit 5: a typo in a path or marker must not pass CI."""
    if exitstatus == 5:
        session.exitstatus = 1
    if _OWN_CACHE and CACHE != "off":
        shutil.rmtree(CACHE, ignore_errors=True)


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (the default in pyproject): one worker per core, at most 8 and at most one per 3 GiB of memory. Each
    worker is a JAX process holding its own compiled programs and test models: a 64-core box must not start 64."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 3 * cores
    return max(1, min(cores, 8, int(mem_gib // 3)))
