"""APB attention kernel vs its jnp twin (CPU, interpret mode).

The cases and checks here are shared with tests/gpu/test_kernel_gpu.py, which runs them
on the real backends (triton, mosaic) when a GPU is present.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ApbMask, BlockSizes, apb_attention, apb_attention_reference

TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2}
HEADS = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 4), (8, 8)]
CPU_BLOCKS = [(16, 16), (16, 32), (32, 16), (32, 32)]


@dataclasses.dataclass(frozen=True)
class Case:
    seed: int
    batch: int | None  # None = unbatched [T, H, D]
    anchor: int
    local: int
    passing: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    passing_valid: int | None
    kv_valid: str  # "none" | "random" | "pad"
    causal: bool
    block: tuple[int, int]

    @property
    def id(self):
        return (
            f"s{self.seed}-b{self.batch}-A{self.anchor}-L{self.local}-P{self.passing}"
            f"-h{self.heads}/{self.kv_heads}-d{self.head_dim}-{self.dtype}-pv{self.passing_valid}"
            f"-{self.kv_valid}-{'c' if self.causal else 'nc'}-bq{self.block[0]}bk{self.block[1]}"
        )


def make_cases(n: int = 52) -> list[Case]:
    """Seeded random configurations; the first few pin the corners the issue names."""
    rng = np.random.default_rng(2502_12085)
    cases = []
    for i in range(n):
        h, kvh = HEADS[i % len(HEADS)]
        d = (64, 128)[(i // 2) % 2]
        dtype = ("float32", "bfloat16")[i % 2]
        anchor = int(rng.integers(0, 90))
        local = int(rng.integers(1, 150))
        passing = int(rng.integers(0, 110))
        kind = i % 7
        if kind == 0:
            anchor = 0
        elif kind == 1:
            passing = 0
        elif kind == 2:
            anchor, passing = 0, 0
        pv = None
        if passing and rng.random() < 0.6:
            pv = int(rng.integers(0, passing + 1))
            if i % 5 == 0:  # whole hosts masked: a multiple of a per-host length
                per_host = max(1, passing // 3)
                pv = min(passing, per_host * int(rng.integers(0, 3)))
        kv_valid = ("none", "none", "random", "pad")[int(rng.integers(0, 4))]
        causal = not (anchor == 0 and passing == 0 and i % 4 == 3)
        batch = (None, None, 1, 2)[i % 4]
        cases.append(
            Case(
                seed=i,
                batch=batch,
                anchor=anchor,
                local=local,
                passing=passing,
                heads=h,
                kv_heads=kvh,
                head_dim=d,
                dtype=dtype,
                passing_valid=pv,
                kv_valid=kv_valid,
                causal=causal,
                block=CPU_BLOCKS[i % len(CPU_BLOCKS)],
            )
        )
    return cases


CASES = make_cases()


def make_inputs(c: Case):
    rng = np.random.default_rng(c.seed)
    tq = c.anchor + c.local
    tk = c.passing + tq
    lead = () if c.batch is None else (c.batch,)
    dt = jnp.dtype(c.dtype)
    q = jnp.asarray(rng.standard_normal(lead + (tq, c.heads, c.head_dim)), jnp.float32).astype(dt)
    k = jnp.asarray(rng.standard_normal(lead + (tk, c.kv_heads, c.head_dim)), jnp.float32).astype(dt)
    v = jnp.asarray(rng.standard_normal(lead + (tk, c.kv_heads, c.head_dim)), jnp.float32).astype(dt)
    kvv = None
    if c.kv_valid == "random":
        kvv = jnp.asarray(rng.random(lead + (tk,)) < 0.85)
    elif c.kv_valid == "pad":  # last few keys are padding, as on a padded last host
        kvv = jnp.asarray(np.broadcast_to(np.arange(tk) < tk - min(5, c.local), lead + (tk,)))
    return q, k, v, kvv


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_case(c: Case, backend: str, block_sizes=None):
    """Runs one case on `backend` and checks it against the reference; returns the errors."""
    q, k, v, kvv = make_inputs(c)
    out, lse = apb_attention(
        q,
        k,
        v,
        anchor_len=c.anchor,
        passing_valid=c.passing_valid,
        kv_valid=kvv,
        causal=c.causal,
        backend=backend,
        block_sizes=block_sizes,
    )
    ref_o, ref_lse = apb_attention_reference(
        q, k, v, anchor_len=c.anchor, passing_valid=c.passing_valid, kv_valid=kvv, causal=c.causal
    )
    out, lse, ref_o, ref_lse = map(np.asarray, (out.astype(jnp.float32), lse, ref_o, ref_lse))
    assert out.shape == q.shape and out.dtype == np.float32
    assert lse.shape == q.shape[:-3] + (c.heads, q.shape[-3])
    assert not np.isnan(out).any(), "NaN in out"
    assert not np.isnan(lse).any(), "NaN in lse"
    # Rows with no visible key: zeros and -inf, in both.
    dead = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), dead)
    dead_rows = np.moveaxis(dead, -1, -2)[..., None]  # [.., Tq, H, 1]
    assert np.all(np.where(dead_rows, out, 0.0) == 0.0)
    tol = TOL[jnp.dtype(c.dtype)]
    e_out = rel_err(out, ref_o)
    live = ~dead
    e_lse = rel_err(lse[live], ref_lse[live]) if live.any() else 0.0
    assert e_out <= tol, f"out rel err {e_out:.2e} > {tol:.0e}"
    assert e_lse <= tol, f"lse rel err {e_lse:.2e} > {tol:.0e}"
    return e_out, e_lse


def test_case_coverage():
    """The case list covers what the issue asks for."""
    assert len(CASES) >= 50
    assert {(c.heads, c.kv_heads) for c in CASES} == set(HEADS)
    assert {c.heads // c.kv_heads for c in CASES} == {1, 2, 4, 8}
    assert {c.head_dim for c in CASES} == {64, 128}
    assert {c.dtype for c in CASES} == {"float32", "bfloat16"}
    assert any(c.anchor == 0 for c in CASES) and any(c.passing == 0 for c in CASES)
    assert any(c.passing_valid is not None and c.passing_valid < c.passing for c in CASES)
    assert any(c.kv_valid != "none" for c in CASES) and any(not c.causal for c in CASES)
    assert any(c.batch for c in CASES)
    ragged = [c for c in CASES if (c.anchor + c.local) % c.block[0] or c.passing % c.block[1]]
    assert len(ragged) > len(CASES) // 2


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_interpret_matches_reference(case):
    check_case(case, "interpret", BlockSizes(*case.block))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_xla_matches_reference(case):
    """The blocked plain-XLA backend (the CPU default), with the case's small blocks so every path runs."""
    check_case(case, "xla", BlockSizes(*case.block))


def test_cpu_default_is_xla():
    from pallas_kernels import default_backend

    assert jax.default_backend() != "cpu" or default_backend() == "xla"


@pytest.mark.parametrize("dtype,heads,kv_heads", [("float32", 4, 1), ("bfloat16", 8, 8)])
def test_plain_causal_equals_dot_product_attention(dtype, heads, kv_heads):
    """anchor_len=0, Pk=0 is ordinary causal attention."""
    rng = np.random.default_rng(7)
    t, d = 77, 64
    dt = jnp.dtype(dtype)
    q = jnp.asarray(rng.standard_normal((2, t, heads, d)), dt)
    k = jnp.asarray(rng.standard_normal((2, t, kv_heads, d)), dt)
    v = jnp.asarray(rng.standard_normal((2, t, kv_heads, d)), dt)
    want = jax.nn.dot_product_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), is_causal=True
    )
    # lse of plain causal attention, computed naively with a repeated K (test only).
    kr = jnp.repeat(k.astype(jnp.float32), heads // kv_heads, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kr, precision=jax.lax.Precision.HIGHEST) / math.sqrt(d)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    want_lse = jax.nn.logsumexp(s, axis=-1)
    tol = TOL[dt]
    for backend, bs in (("reference", None), ("interpret", BlockSizes(16, 32)), ("xla", BlockSizes(16, 32))):
        out, lse = apb_attention(q, k, v, anchor_len=0, backend=backend, block_sizes=bs)
        assert out.dtype == dt
        assert rel_err(out.astype(jnp.float32), want) <= tol
        assert rel_err(lse, want_lse) <= tol


@pytest.mark.parametrize("backend", ["reference", "interpret", "xla"])
def test_fully_masked_rows_give_zero_and_neg_inf(backend):
    rng = np.random.default_rng(3)
    a, l, p, h, d = 9, 21, 13, 4, 64
    tq, tk = a + l, a + l + p
    q = jnp.asarray(rng.standard_normal((tq, h, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((tk, 2, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((tk, 2, d)), jnp.float32)
    bs = BlockSizes(16, 16) if backend in ("interpret", "xla") else None
    # Every key masked: every row is dead.
    out, lse = apb_attention(q, k, v, anchor_len=a, kv_valid=jnp.zeros((tk,), bool), backend=backend, block_sizes=bs)
    assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
    # The first anchor key masked: anchor row 0 sees nothing, the rest are fine.
    kvv = jnp.ones((tk,), bool).at[p].set(False)
    out, lse = apb_attention(q, k, v, anchor_len=a, kv_valid=kvv, backend=backend, block_sizes=bs)
    out, lse = np.asarray(out), np.asarray(lse)
    assert np.all(out[0] == 0) and np.all(np.isneginf(lse[:, 0]))
    assert np.all(np.isfinite(lse[:, 1:])) and not np.isnan(out).any()


def test_traced_passing_valid_under_jit_and_shard_map():
    """passing_valid computed from lax.axis_index inside shard_map (4 fake CPU devices)."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    n = 4
    mesh = Mesh(np.array(jax.devices()[:n]), ("sp",))
    rng = np.random.default_rng(11)
    a, l, per_host, h, kvh, d = 6, 19, 5, 4, 2, 64
    tq, pk = a + l, n * per_host
    q = jnp.asarray(rng.standard_normal((n, tq, h, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((n, pk + tq, kvh, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((n, pk + tq, kvh, d)), jnp.float32)

    def per_device(backend):
        # jax's Pallas interpreter does not track varying manual axes, so the interpret
        # backend needs check_vma=False; the reference and xla (the CPU default) run with the check on.
        def f(q, k, v):
            pv = jax.lax.axis_index("sp") * per_host
            o, lse = apb_attention(
                q,
                k,
                v,
                anchor_len=a,
                passing_valid=pv,
                backend=backend,
                block_sizes=BlockSizes(16, 16) if backend in ("interpret", "xla") else None,
            )
            return o, lse

        return jax.jit(
            jax.shard_map(
                f, mesh=mesh, in_specs=(P("sp"),) * 3, out_specs=(P("sp"), P("sp")), check_vma=backend != "interpret"
            )
        )

    got_o, got_lse = per_device("interpret")(q, k, v)
    for hst in range(n):
        ref_o, ref_lse = apb_attention_reference(q[hst], k[hst], v[hst], anchor_len=a, passing_valid=hst * per_host)
        assert rel_err(got_o[hst], ref_o) <= 1e-5
        assert rel_err(got_lse[hst], ref_lse) <= 1e-5
    ref_o2, _ = per_device("reference")(q, k, v)
    assert rel_err(ref_o2, got_o) <= 1e-5
    xla_o, xla_lse = per_device("xla")(q, k, v)  # traced passing_valid -> traced trip count of its passing loop
    assert rel_err(xla_o, got_o) <= 1e-5 and rel_err(xla_lse, got_lse) <= 1e-5


def test_block_table_agrees_with_dense_mask():
    rng = np.random.default_rng(5)
    for _ in range(40):
        a, l, p = int(rng.integers(0, 50)), int(rng.integers(1, 90)), int(rng.integers(0, 70))
        causal = bool(rng.integers(0, 2))
        bq, bk = int(rng.choice([8, 16, 32])), int(rng.choice([8, 16, 32]))
        pv = int(rng.integers(0, p + 1))
        m = ApbMask(a + l, a + l + p, a, causal)
        dense = np.asarray(m.dense(pv))
        table = m.block_table(bq, bk, pv)
        for qb, (p_full, p_hi, m_full, m_hi) in enumerate(table):
            rows = dense[qb * bq : (qb + 1) * bq]
            seen = np.zeros(dense.shape[1], bool)
            for j in range(p_hi):
                blk = rows[:, j * bk : min((j + 1) * bk, p)]
                seen[j * bk : min((j + 1) * bk, p)] = True
                if j < p_full:
                    assert blk.all()
            for j in range(m_hi):
                lo, hi = p + j * bk, min(p + (j + 1) * bk, m.tk)
                seen[lo:hi] = True
                if j < m_full:
                    assert rows[:, lo:hi].all()
            assert not rows[:, ~seen].any(), "a skipped block has visible keys"
        assert m.useful_pairs(pv) == int(dense.sum())
        ks, ke, _off, (h0, h1) = m.k_ranges(pv)
        keys = np.arange(m.tk)
        rebuilt = (keys[None] >= ks[:, None]) & (keys[None] < ke[:, None]) & ~((keys[None] >= h0) & (keys[None] < h1))
        np.testing.assert_array_equal(rebuilt, dense)


def _bad(**over):
    rng = np.random.default_rng(0)
    args = dict(
        q=jnp.asarray(rng.standard_normal((20, 4, 64)), jnp.float32),
        k=jnp.asarray(rng.standard_normal((30, 2, 64)), jnp.float32),
        v=jnp.asarray(rng.standard_normal((30, 2, 64)), jnp.float32),
        anchor_len=5,
    )
    args.update(over)
    return args


BAD = {
    "anchor_too_long": (_bad(anchor_len=21), "anchor_len=21 exceeds Tq=20"),
    "anchor_negative": (_bad(anchor_len=-1), "anchor_len"),
    "fewer_keys_than_rows": (_bad(k=jnp.zeros((10, 2, 64)), v=jnp.zeros((10, 2, 64))), "Tk=10"),
    "heads_not_multiple": (_bad(k=jnp.zeros((30, 3, 64)), v=jnp.zeros((30, 3, 64))), "KVH=3"),
    "head_dim_mismatch": (_bad(k=jnp.zeros((30, 2, 32)), v=jnp.zeros((30, 2, 32))), "D="),
    "k_v_shape": (_bad(v=jnp.zeros((31, 2, 64))), "same shape"),
    "rank": (_bad(q=jnp.zeros((20, 64))), "q must be"),
    "dtype_mix": (_bad(q=jnp.zeros((20, 4, 64), jnp.bfloat16)), "dtype"),
    "int_dtype": (
        _bad(
            q=jnp.zeros((20, 4, 64), jnp.int32),
            k=jnp.zeros((30, 2, 64), jnp.int32),
            v=jnp.zeros((30, 2, 64), jnp.int32),
        ),
        "not supported",
    ),
    "passing_valid_range": (_bad(passing_valid=11), "passing_valid=11"),
    "kv_valid_shape": (_bad(kv_valid=jnp.ones((29,), bool)), "kv_valid"),
    "kv_valid_dtype": (_bad(kv_valid=jnp.ones((30,), jnp.int32)), "bool"),
    "backend": (_bad(backend="cuda"), "backend"),
    "head_dim_kernel": (
        _bad(q=jnp.zeros((20, 4, 48)), k=jnp.zeros((30, 2, 48)), v=jnp.zeros((30, 2, 48)), backend="interpret"),
        "D=48",
    ),
    "block_not_pow2": (_bad(backend="interpret", block_sizes=BlockSizes(24, 16)), "block_q=24"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs_raise_value_error(name):
    args, msg = BAD[name]
    with pytest.raises(ValueError, match=msg):
        apb_attention(**args)


@pytest.mark.parametrize("pk,multiple", [(0, 128), (70, 8), (70, 128), (129, 64), (128, 128)])
def test_pad_passing_keeps_the_function(pk, multiple):
    """The Mosaic wrapper's re-layout [passing | gap | rest] is invisible to every row."""
    from pallas_kernels.mask import pad_passing

    rng = np.random.default_rng(pk + multiple)
    a, l, h, kvh, d = 11, 37, 4, 2, 64
    tq = a + l
    q = jnp.asarray(rng.standard_normal((2, tq, h, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, pk + tq, kvh, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, pk + tq, kvh, d)), jnp.float32)
    kvv = jnp.asarray(rng.random((2, pk + tq)) < 0.9)
    pv = pk * 2 // 3
    k2, v2, kvv2, pk_pad = pad_passing(k, v, kvv, pk, multiple)
    assert pk_pad % multiple == 0 and k2.shape[1] == pk_pad + tq
    for causal in (True, False):
        want = apb_attention_reference(q, k, v, anchor_len=a, passing_valid=pv, kv_valid=kvv, causal=causal)
        got = apb_attention_reference(q, k2, v2, anchor_len=a, passing_valid=pv, kv_valid=kvv2, causal=causal)
        for w, g in zip(want, got):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
