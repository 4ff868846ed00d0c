"""The CPU kernel cases on the real backends (Pallas-Triton, and Mosaic-GPU on Hopper).

Skipped without a GPU. Run on a GPU machine with
  APB_TEST_GPU=1 python -m pytest tests/gpu/test_kernel_gpu.py -q
(the conftest then leaves JAX_PLATFORMS alone). f32 runs on Triton with IEEE dots, so the
CPU tolerances hold; Mosaic-GPU takes bf16/f16 only, so its f32 cases are skipped.
"""
from __future__ import annotations

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from test_kernel import CASES, check_case  # noqa: E402  (the shared cases)

from pallas_kernels.apb_attention import _is_hopper  # noqa: E402


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
