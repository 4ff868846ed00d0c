"""The CPU kernel cases on the real backends (Pallas-Triton, and Mosaic-GPU on Hopper).

Skipped without a GPU. Run on a GPU machine with
  APB_TEST_GPU=1 XLA_PYTHON_CLIENT_PREALLOCATE=false \
    python -m pytest tests/gpu/test_kernel_gpu.py -v -n 12 -p no:cacheprovider
(-v so every result line names its test even if a time limit cuts the run short).
APB_TEST_MOSAIC_KV=1 also runs the Mosaic kernel's kv_valid path on its own (the dispatcher
uses it by default: pallas_kernels.apb_attention.MOSAIC_KV_VALID).
(the conftest then leaves JAX_PLATFORMS alone). f32 runs on Triton with IEEE dots, so the
CPU tolerances hold; Mosaic-GPU takes bf16/f16 only, so its f32 cases are skipped.
"""

from __future__ import annotations

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from test_kernel import CASES, check_case

from pallas_kernels.apb_attention import _is_hopper


def _gpu():
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        return None


GPU = _gpu()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPU is None, reason="needs a CUDA GPU")]
BACKENDS = ["triton"] + (["mosaic"] if GPU is not None and _is_hopper(GPU) else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gpu_backend_matches_reference(case, backend):
    if backend == "mosaic" and case.dtype == "float32":
        pytest.skip("Mosaic-GPU kernel takes bf16/f16 only")
    check_case(case, backend)


def test_auto_backend_on_gpu():
    from pallas_kernels import default_backend

    assert default_backend() == ("mosaic" if _is_hopper(GPU) else "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_backend_under_shard_map_with_traced_passing_valid(backend):
    """As the APB strategy calls it: inside shard_map, passing_valid from lax.axis_index."""
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P
    from test_kernel import rel_err

    from pallas_kernels import apb_attention, apb_attention_reference

    mesh = Mesh(np.array(jax.devices("gpu")[:1]), ("sp",))
    rng = np.random.default_rng(1)
    a, l, pk, per_host = 64, 448, 192, 96
    q = jnp.asarray(rng.standard_normal((1, a + l, 8, 128)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((1, pk + a + l, 2, 128)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((1, pk + a + l, 2, 128)), jnp.bfloat16)

    def f(q, k, v):
        pv = (jax.lax.axis_index("sp") + 1) * per_host
        return apb_attention(q, k, v, anchor_len=a, passing_valid=pv, backend=backend)

    out, lse = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("sp"),) * 3, out_specs=(P("sp"), P("sp"))))(q, k, v)
    ref_o, ref_lse = apb_attention_reference(q, k, v, anchor_len=a, passing_valid=per_host)
    assert rel_err(out.astype(jnp.float32), ref_o) <= 1e-2
    assert rel_err(lse, ref_lse) <= 1e-2


@pytest.mark.skipif(
    not os.environ.get("APB_TEST_MOSAIC_KV") or "mosaic" not in BACKENDS,
    reason="set APB_TEST_MOSAIC_KV=1 on a Hopper GPU",
)
@pytest.mark.parametrize(
    "case", [c for c in CASES if c.kv_valid != "none" and c.dtype != "float32"], ids=lambda c: c.id
)
def test_mosaic_kv_valid_path(case, monkeypatch):
    import importlib

    dispatch = importlib.import_module("pallas_kernels.apb_attention")  # the module, not the function
    monkeypatch.setattr(dispatch, "MOSAIC_KV_VALID", True)
    check_case(case, "mosaic")
