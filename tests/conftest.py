"""Test setup: four fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
if not os.environ.get("APB_TEST_GPU"):  # the GPU test files set APB_TEST_GPU=1 on a GPU machine
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import jax

jax.config.update("jax_default_matmul_precision", "highest")
