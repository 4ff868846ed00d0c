"""Sequence-parallel strategies on real GPUs: the multi-GPU counterpart of tests/test_strategies.py.

Skipped without a GPU (CI).  Run on a GPU machine with 1, 2, 4 or 8 GPUs:
  APB_TEST_GPU=1 NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false \
    python -m pytest tests/gpu/test_strategies_gpu.py -v -p no:cacheprovider
(APB_TEST_GPU=1 makes tests/conftest.py leave JAX_PLATFORMS alone; the conftest also sets
jax_default_matmul_precision="highest", so no float32 matmul runs in TF32).

Hosts are every power of two from 2 up to the GPU count (a test for more hosts than GPUs is skipped with the
count in the reason); with one GPU only the single-GPU tests run (Engine "full", one-host strategies and the
hosts emulated by jax.vmap on the one GPU).  What it checks, against full causal attention on one GPU:
  - one GPU: full == Model.logits; ring/apb/star on one host, and ring, exact APB and 2-host Star emulated
    by vmap, == full; decode of a vmap-emulated ring == full;
  - a real mesh of H GPUs (shard_map, NCCL collectives): ring == full; exact APB (anchor 0, every key passed)
    == full for both compressors; APB defaults (real top-P compression) finite, host 0 exact, the rest in
    the same ballpark, and == APB emulated by vmap on one GPU; Star on the mesh == Star emulated by vmap
    on one GPU (and hosts 0-1 exact); decode with the cross-host LSE merge == full (greedy tokens, first
    logits, and three decode steps' logits);
  - bfloat16 at a 3001-token document (prime: no host count divides it), head_dim 128, through the
    production kernel (Mosaic-GPU on Hopper, else Pallas-Triton), on the mesh and vmap-emulated on one GPU:
    APB and Star logits finite, their float32-exact parts within bf16 error of full float32, and the whole
    within bf16 error of the same strategy in float32.

Kernels on the GPU (pallas_kernels.apb_attention.choose_backend): every strategy, full included, goes through the
dispatcher. float32 goes to Pallas-Triton with IEEE dots (precision HIGHEST in pallas_kernels/portable.py; Mosaic
and cuDNN take bf16/f16 only), so the float32 comparisons keep a tight tolerance (F32_TOL). bfloat16 goes to Mosaic
on Hopper (head_dim 64/128); off Hopper plain causal goes to cuDNN and the rest to Triton.

Compiles dominate these tests (float32 programs of a 2-layer model; with XLA's GEMM autotuning on, a case spent
40-70 s compiling): tests/conftest.py turns autotuning off under APB_TEST_GPU=1.

The devices come from `devices_under_test()` only: to try these bodies without a GPU, make it `return jax.devices()`
in a scratch copy and run it on fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8,
JAX_PLATFORMS=cpu, JAX_DEFAULT_MATMUL_PRECISION=highest); the kernel is then the CPU one ("xla").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apb_jax import Engine, Model, ModelConfig
from apb_jax.parallel import make_mesh
from apb_jax.retaining_heads import random_retaining_heads
from pallas_kernels.apb_attention import _is_hopper, default_backend


def devices_under_test() -> list:
    """Every device the tests may use (the first is the single-GPU one); [] skips the module."""
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


DEVICES = devices_under_test()
N = len(DEVICES)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(N == 0, reason="needs a CUDA GPU (and APB_TEST_GPU=1 so jax may use it)"),
]


def production_backend() -> str:
    """The kernel the engine uses in production for bf16 at head_dim 128: Mosaic-GPU on Hopper, else Triton."""
    dev = DEVICES[0]
    if dev.platform == "gpu":
        return "mosaic" if _is_hopper(dev) else "triton"
    return "xla"  # not a GPU: only when these bodies are tried on CPU devices (see the docstring)


def _hosts(counts):
    return [
        pytest.param(h, id=f"{h}gpus", marks=pytest.mark.skipif(0 < N < h, reason=f"needs {h} GPUs, found {N}"))
        for h in counts
    ]


HOSTS = _hosts([2, 4, 8])  # a real mesh of H GPUs
# where the H hosts run: a mesh of H GPUs, or H hosts emulated by jax.vmap on the first GPU (runs on one GPU)
PLACES = [pytest.param(("mesh", h), id=f"mesh{h}", marks=p.marks) for h, p in zip([2, 4, 8], HOSTS)] + [
    pytest.param(("vmap", 4), id="vmap4")
]

# float32: both sides are IEEE float32 with different summation orders (CPU: ~5e-7 apart).  Changing one
# document token moves later logits (|logit| ~ 0.19) by 3e-2 to 1.6e-1, so any key seen or masked wrongly fails.
# (Were float32 dots run in TF32 the errors would be ~1e-3 and these tests would fail: the conftest sets
# jax_default_matmul_precision="highest" and the Triton kernel asks for HIGHEST, i.e. IEEE, dots.)
F32_TOL = dict(atol=1e-4, rtol=1e-4)
BF16_TOL = 2e-2  # relative (Frobenius) error of bf16 logits vs float32: measured ~5e-3 for full attention alone
# APB / Star vs full attention where they are approximate: bounds on the approximation itself, not tolerances.
# Measured on CPU (same models and prompts, float32): APB defaults on the 113-token prompt 0.64-0.82 (2-8 hosts;
# a different document gives 1.35, so this says only "same ballpark": the exact parts and the vmap equality
# are the real checks); bf16 at 3001 tokens, APB and Star, 2-8 hosts: <= 0.33 (doc rows), <= 0.24 (next token)
APPROX_BOUND = 1.0
LONG_APPROX_BOUND = 0.6

CFG = ModelConfig(
    model_type="llama",
    vocab_size=97,
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    eos_token_ids=(),
)  # d=64: a Triton f32 kernel shape
DOC_LEN, Q_LEN, Q_INSERT = 113, 7, 2  # 113 is prime: never divisible by the host count
# bf16 / production kernel: head_dim 128 (the Mosaic kernel's main shape), a longer prime-length document
CFG_BF16 = ModelConfig(
    model_type="llama",
    vocab_size=97,
    hidden_size=256,
    intermediate_size=512,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=128,
    eos_token_ids=(),
)
LONG_DOC, LONG_Q = 3001, 7


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def finite(*xs):
    for x in xs:
        assert np.isfinite(np.asarray(x)).all(), "non-finite logits"


def on_mesh(model, strategy, hosts, **kw) -> Engine:
    return Engine(model, strategy, devices=hosts, mesh=make_mesh(hosts, devices=DEVICES), **kw)


def on_one(model, strategy, hosts, **kw) -> Engine:
    """`hosts` hosts emulated by jax.vmap on the first device (one host: a plain mesh of that device)."""
    mode = "vmap" if hosts > 1 else "mesh"
    return Engine(model, strategy, devices=hosts, mode=mode, mesh=make_mesh(1, devices=DEVICES), **kw)


def place(model, strategy, where, **kw) -> Engine:
    mode, hosts = where
    return (on_mesh if mode == "mesh" else on_one)(model, strategy, hosts, **kw)


def full_engine(model) -> Engine:
    return Engine(model, "full", mesh=make_mesh(1, devices=DEVICES))


def check_on_devices(pre, hosts, mode="mesh"):
    """The cache really lives on the first `hosts` devices (mesh), or on the first device (vmap)."""
    assert pre.cache.doc_k.sharding.device_set == set(DEVICES[:hosts] if mode == "mesh" else DEVICES[:1])


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model():
    return Model.random(CFG, dtype="float32", seed=1)


@pytest.fixture(scope="module")
def prompt():
    rng = np.random.default_rng(0)
    return rng.integers(0, CFG.vocab_size, DOC_LEN), rng.integers(0, CFG.vocab_size, Q_LEN)


def full_reference(model, doc, q):
    """Full causal attention on the first GPU: (doc logits [1, L, V], next-token logits [1, V]), finite."""
    logits = np.asarray(model.logits(np.concatenate([doc, q])[None]))
    finite(logits)
    return logits[:, : len(doc)], logits[:, -1]


@pytest.fixture(scope="module")
def reference(model, prompt):
    return full_reference(model, *prompt)


@pytest.fixture(scope="module")
def full(model):
    """Engine "full" on the first GPU, shared so its compiled programs are reused."""
    return full_engine(model)


@pytest.fixture(scope="module")
def long_models():
    """The same weights in bf16 and in float32 (the bf16 values, widened), so only the compute precision differs."""
    m32 = Model.random(CFG_BF16, dtype="float32", seed=5)
    graph_bf16 = Model.random(CFG_BF16, dtype="bfloat16", seed=5).graphdef
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), m32.params)
    return (
        Model(CFG_BF16, graph_bf16, p16, jnp.dtype(jnp.bfloat16)),
        Model(CFG_BF16, m32.graphdef, jax.tree.map(lambda x: x.astype(jnp.float32), p16), jnp.dtype(jnp.float32)),
    )


@pytest.fixture(scope="module")
def long_prompt():
    rng = np.random.default_rng(2)
    return rng.integers(0, CFG_BF16.vocab_size, LONG_DOC), rng.integers(0, CFG_BF16.vocab_size, LONG_Q)


@pytest.fixture(scope="module")
def long_reference(long_models, long_prompt):
    return full_reference(long_models[1], *long_prompt)


# ------------------------------------------------------------------------------------------------ one GPU


ONE_GPU_CASES = {
    "ring-1host": ("ring", 1, {}),
    "apb-1host": ("apb", 1, dict(q_insert=Q_INSERT)),  # one host: no anchor, no passing: causal
    "star-1host": ("star", 1, {}),
    "ring-vmap4": ("ring", 4, {}),
    "apb_exact-vmap4": ("apb", 4, dict(anchor_len=0, passing_len=math.ceil(DOC_LEN / 4))),
    "star-vmap2": ("star", 2, {}),  # 2 hosts: host 1's anchor is host 0's whole block, so Star is exact
}


def test_full_engine_equals_model_logits(full, prompt, reference):
    doc, q = prompt
    pre = full.prefill(doc, q, doc_logits=True)
    finite(pre.doc_logits, pre.logits)
    check_on_devices(pre, 1)
    np.testing.assert_allclose(pre.doc_logits, reference[0], **F32_TOL)
    np.testing.assert_allclose(pre.logits, reference[1], **F32_TOL)


@pytest.mark.parametrize("case", ONE_GPU_CASES)
def test_one_gpu_strategies_equal_full(model, prompt, reference, case):
    strategy, hosts, kw = ONE_GPU_CASES[case]
    doc, q = prompt
    pre = on_one(model, strategy, hosts, **kw).prefill(doc, q, doc_logits=True)
    assert pre.cache.layout.hosts == hosts
    check_on_devices(pre, 1)  # one GPU, whatever the host count
    finite(pre.doc_logits, pre.logits)
    np.testing.assert_allclose(pre.doc_logits, reference[0], **F32_TOL)
    np.testing.assert_allclose(pre.logits, reference[1], **F32_TOL)


def test_one_gpu_vmap_decode_equals_full(model, full, prompt):
    doc, q = prompt
    want = full.generate(doc, q, max_new_tokens=8)
    out = on_one(model, "ring", 4).generate(doc, q, max_new_tokens=8)
    finite(out.first_logits, want.first_logits)
    assert len(want.tokens) == 8 and out.tokens == want.tokens
    np.testing.assert_allclose(out.first_logits, want.first_logits, **F32_TOL)


# ------------------------------------------------------------------------------------------ a mesh of GPUs


@pytest.mark.parametrize("hosts", HOSTS)
def test_ring_equals_full(model, prompt, reference, hosts):
    doc, q = prompt
    pre = on_mesh(model, "ring", hosts).prefill(doc, q, doc_logits=True)
    check_on_devices(pre, hosts)
    finite(pre.doc_logits, pre.logits)
    np.testing.assert_allclose(pre.doc_logits, reference[0], **F32_TOL)
    np.testing.assert_allclose(pre.logits, reference[1], **F32_TOL)


@pytest.mark.parametrize("compressor", ["query_aware", "retaining_heads"])
@pytest.mark.parametrize("hosts", HOSTS)
def test_apb_exact_mode_equals_full(model, prompt, reference, hosts, compressor):
    """A = 0 and P = B: every key is passed, so APB is exact causal attention."""
    doc, q = prompt
    heads = random_retaining_heads(CFG, hidden=32, seed=3) if compressor == "retaining_heads" else None
    eng = on_mesh(
        model,
        "apb",
        hosts,
        anchor_len=0,
        passing_len=math.ceil(DOC_LEN / hosts),
        compressor=compressor,
        retaining_heads=heads,
    )
    pre = eng.prefill(doc, q, doc_logits=True)
    lay = pre.cache.layout
    assert lay.anchor == 0 and lay.passing == lay.block and lay.hosts == hosts
    check_on_devices(pre, hosts)
    finite(pre.doc_logits, pre.logits)
    np.testing.assert_allclose(pre.doc_logits, reference[0], **F32_TOL)
    np.testing.assert_allclose(pre.logits, reference[1], **F32_TOL)


@pytest.mark.parametrize("hosts", HOSTS)
def test_apb_defaults_finite_close_and_equal_to_vmap_emulation(model, prompt, reference, hosts):
    doc, q = prompt
    pre = on_mesh(model, "apb", hosts, q_insert=Q_INSERT).prefill(doc, q, doc_logits=True)
    check_on_devices(pre, hosts)
    lay = pre.cache.layout
    block = math.ceil(DOC_LEN / hosts)
    assert (lay.anchor, lay.passing) == (
        min(max(math.ceil(DOC_LEN / 32), Q_INSERT + Q_LEN + 1), block),
        min(math.ceil(DOC_LEN / 64), block),
    )
    assert 0 < lay.passing < lay.block  # real compression: a top-P choice per host
    finite(pre.doc_logits, pre.logits)
    err = rel_err(pre.doc_logits, reference[0])
    print(f"apb defaults (A={lay.anchor}, P={lay.passing}, {hosts} GPUs) relative error vs full: {err:.3e}")
    # host 0's rows are exact; the rest differ (APB is approximate) but stay in the same ballpark
    np.testing.assert_allclose(pre.doc_logits[:, : lay.block], reference[0][:, : lay.block], **F32_TOL)
    assert 1e-3 < err < APPROX_BOUND
    # the same per-host program emulated on one GPU: the top-P choice, all_gather over NCCL and the passing
    # blocks on the mesh give what the emulation gives
    emu = on_one(model, "apb", hosts, q_insert=Q_INSERT).prefill(doc, q, doc_logits=True)
    assert emu.cache.layout == lay
    finite(emu.doc_logits, emu.logits)
    np.testing.assert_allclose(pre.doc_logits, emu.doc_logits, **F32_TOL)
    np.testing.assert_allclose(pre.logits, emu.logits, **F32_TOL)


@pytest.mark.parametrize("hosts", HOSTS)
def test_star_mesh_equals_vmap_emulation(model, prompt, reference, hosts):
    doc, q = prompt
    a = on_mesh(model, "star", hosts).prefill(doc, q, doc_logits=True)
    b = on_one(model, "star", hosts).prefill(doc, q, doc_logits=True)
    assert a.cache.layout == b.cache.layout and a.cache.layout.anchor == a.cache.layout.block
    check_on_devices(a, hosts)
    finite(a.doc_logits, a.logits, b.doc_logits, b.logits)
    np.testing.assert_allclose(a.doc_logits, b.doc_logits, **F32_TOL)
    np.testing.assert_allclose(a.logits, b.logits, **F32_TOL)
    # hosts 0 and 1 see every earlier key (host 1's anchor is host 0's block): those rows are exact
    two = 2 * a.cache.layout.block
    np.testing.assert_allclose(a.doc_logits[:, :two], reference[0][:, :two], **F32_TOL)


@pytest.mark.parametrize("strategy", ["ring", "apb_exact"])
@pytest.mark.parametrize("hosts", HOSTS)
def test_decode_with_cross_host_merge_equals_single_device(model, full, prompt, hosts, strategy):
    """Greedy decode over an H-GPU cache (every step: per-host attention, all_gather, LSE merge) == one GPU."""
    doc, q = prompt
    kw = dict(anchor_len=0, passing_len=math.ceil(DOC_LEN / hosts)) if strategy == "apb_exact" else {}
    e_h, e_1 = on_mesh(model, strategy.split("_")[0], hosts, **kw), full
    out, want = e_h.generate(doc, q, max_new_tokens=8), e_1.generate(doc, q, max_new_tokens=8)
    finite(out.first_logits, want.first_logits)
    assert len(want.tokens) == 8 and out.tokens == want.tokens
    np.testing.assert_allclose(out.first_logits, want.first_logits, **F32_TOL)
    # step by step on the same programs: every decode step's logits, fed the single-device tokens
    p_h, p_1 = e_h.prefill(doc, q, extra_tail=8), e_1.prefill(doc, q, extra_tail=8)
    check_on_devices(p_h, hosts)
    tok = np.argmax(p_1.logits, -1)[:, None].astype(np.int32)
    c_h, c_1 = p_h.cache, p_1.cache
    for _ in range(3):
        c_h, l_h = e_h.step(c_h, tok)
        c_1, l_1 = e_1.step(c_1, tok)
        finite(l_h, l_1)
        np.testing.assert_allclose(l_h, l_1, **F32_TOL)
        tok = np.argmax(l_1, -1)[:, None].astype(np.int32)


# -------------------------------------------------------------------------- bf16 through the production kernel


BF16_CASES = {  # strategy, engine arguments for H hosts
    "apb": ("apb", lambda h: {}),  # defaults: A = L/32, P = L/64, a real top-P choice per host
    # P = B: every eligible key is passed, so bf16 rounding of the scores cannot change which
    "apb_all_passed": ("apb", lambda h: dict(passing_len=math.ceil(LONG_DOC / h))),
    "star": ("star", lambda h: {}),  # anchor = B
}


@pytest.mark.parametrize("case", BF16_CASES)
@pytest.mark.parametrize("where", PLACES)
def test_bf16_long_document_production_kernel(long_models, long_prompt, long_reference, where, case):
    m16, m32 = long_models
    doc, q = long_prompt
    hosts = where[1]
    backend = production_backend()
    assert default_backend(jnp.bfloat16, CFG_BF16.head_dim) == backend  # what the engine picks by itself
    strategy, kwargs = BF16_CASES[case]
    kw = kwargs(hosts)
    pre = place(m16, strategy, where, kernel_backend=backend, **kw).prefill(doc, q, doc_logits=True)
    lay = pre.cache.layout
    assert LONG_DOC % hosts and lay.hosts == hosts and lay.anchor > 0
    check_on_devices(pre, hosts, where[0])
    assert pre.cache.doc_k.dtype == jnp.bfloat16
    finite(pre.doc_logits, pre.logits)
    ref_doc, ref_last = long_reference
    err = rel_err(pre.doc_logits, ref_doc)
    msg = f"{case} bf16 ({backend}, {where[0]} {hosts} hosts, A={lay.anchor}, P={lay.passing})"
    print(f"{msg}: relative error vs full f32 {err:.3e} (doc) {rel_err(pre.logits, ref_last):.3e} (next token)")
    assert err < LONG_APPROX_BOUND and rel_err(pre.logits, ref_last) < LONG_APPROX_BOUND
    # host 0's rows are exact causal attention (Star: hosts 0 and 1): only bf16 error vs full float32
    exact = lay.block * (2 if strategy == "star" else 1)
    e_exact = rel_err(pre.doc_logits[:, :exact], ref_doc[:, :exact])
    print(f"{msg}: its exact rows [0, {exact}) vs full f32 {e_exact:.3e}")
    assert e_exact < BF16_TOL, f"{msg}: exact rows {e_exact:.3e} vs full f32"
    if case != "apb":  # no top-P choice that bf16 rounding could flip: the whole run is within bf16 error
        f32 = place(m32, strategy, where, **kw).prefill(doc, q, doc_logits=True)  # f32: Triton, IEEE dots
        assert f32.cache.layout == lay
        finite(f32.doc_logits, f32.logits)
        e_doc, e_last = rel_err(pre.doc_logits, f32.doc_logits), rel_err(pre.logits, f32.logits)
        print(f"{msg}: vs the same in float32 {e_doc:.3e} (doc) {e_last:.3e} (next token)")
        assert e_doc < BF16_TOL and e_last < BF16_TOL, f"{msg}: {e_doc:.3e}, {e_last:.3e} vs float32"
