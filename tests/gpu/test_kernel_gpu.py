"""The CPU kernel cases on the real backends (Pallas-Triton, and Mosaic-GPU on Hopper).

Skipped without a GPU; how to run the GPU tests is in the README ("Development").  f32 runs on Triton with IEEE
dots, so the CPU tolerances hold; a case a backend cannot serve (Mosaic: f32) must be refused with a ValueError.
"""

from __future__ import annotations

import jax
import pytest

from pallas_kernels.apb_attention import _is_hopper
from tests.test_kernel import CASES, check_case


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
    """Every case on every kernel backend of this GPU; a case the backend cannot serve must be refused by name."""
    import jax.numpy as jnp

    from pallas_kernels.apb_attention import Call, cannot_serve

    call = Call(
        platform="gpu",
        hopper=_is_hopper(GPU),
        dtype=jnp.dtype(case.dtype),
        head_dim=case.head_dim,
        tq=case.anchor + case.local,
        pk=case.passing,
        anchor_len=case.anchor,
        has_kv_valid=case.kv_valid != "none",
        need_lse=True,
    )
    why = cannot_serve(backend, call)
    if why is not None:
        with pytest.raises(ValueError, match=f"backend={backend!r} cannot serve this call"):
            check_case(case, backend)
        return
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

    from pallas_kernels import apb_attention, apb_attention_reference
    from tests.test_kernel import rel_err

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
