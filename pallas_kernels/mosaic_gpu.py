"""Hopper APB attention on Pallas Mosaic-GPU: TMA loads, wgmma, warp-specialised pipeline.

Imported lazily by the dispatcher (only on a GPU). One CTA per (query head, pair of q
tiles, batch) with three warpgroups: two compute warpgroups own `block_q` query rows each,
a memory warpgroup streams K/V blocks into a `num_stages`-deep shared-memory ring with TMA.
Both compute warpgroups walk the same list of key blocks: first the passing blocks
[0, cdiv(passing_valid, block_k)) when the CTA has local rows, then the main-segment
blocks (keys Pk + j*block_k) up to the causal edge (`mask.ApbMask`). A block gets a
per-element mask only where the ranges cut it (passing tail, q tile straddling the
anchor, causal diagonal); every other block is either skipped or used as is. The two
compute warpgroups alternate on the tensor cores through a shared barrier, so one's
softmax overlaps the other's matrix products (the FlashAttention-3 ping-pong).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mask import cdiv, pad_passing

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
# Scores are scaled (by scale * log2 e) before masking, so a masked score is exactly _MASK: a row with every key of
# a block masked gets exp2(_MASK - _MASK) = 1, finite, and its first visible key later rescales it by exp2(-huge) = 0.
# (Masking the raw score and scaling after let the compiler fuse `score * c - max` into an FMA whose rounding
# residue is about +-1e22 for a masked score: exp2 of that is inf, and inf * 0 made NaN in every anchor row that met
# a passing block; at head_dim 64 the residue was positive, at 128 it happened to be negative.)
_MASK = -1e30
_COMPUTE_WGS = 2


def _kernel(
    pv_ref,
    q_ref,
    k_ref,
    v_ref,
    *refs,
    q_smem,
    k_smem,
    v_smem,
    lse_smem,
    q_bar,
    k_bar,
    v_bar,
    k_done,
    v_done,
    sched,
    tq,
    pk,
    anchor_len,
    causal,
    scale,
    block_q,
    block_k,
    num_stages,
    n_q_tiles,
    group,
    dtype,
    has_kvv,
):
    if has_kvv:
        kvv_ref, kvb_ref, o_ref, lse_ref = refs
    else:
        kvv_ref = kvb_ref = None
        o_ref, lse_ref = refs
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    hq = lax.axis_index("heads")
    bi = lax.axis_index("batch")
    qi = lax.axis_index("q")
    if causal:
        qi = n_q_tiles - 1 - qi  # the longest rows first
    wg = lax.axis_index("wg")
    c = scale * _LOG2E

    def m_end(r):
        if causal:
            return r + 1
        return jnp.where(r < anchor_len, r + 1, tq)

    pv = pv_ref[0]
    r0 = qi * (_COMPUTE_WGS * block_q)
    r_last = jnp.minimum(r0 + _COMPUTE_WGS * block_q, tq) - 1
    m_hi = lax.div(m_end(r_last) + (block_k - 1), block_k)
    n_p = jnp.where(r_last >= anchor_len, lax.div(pv + (block_k - 1), block_k), 0)
    n_steps = n_p + m_hi
    all_local = r0 >= anchor_len
    m_full_keys = m_end(r0)  # main keys [0, m_full_keys) are visible to every row of the CTA

    def key_start(s):
        return jnp.where(s < n_p, s * block_k, pk + (s - n_p) * block_k)

    def sched_sync():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    def iota(dim):
        return plgpu.broadcasted_iota(jnp.int32, (block_q, block_k), dim, layout=wgmma_layout)

    def bcast_rows(x, shape):
        return lax.broadcast_in_dim(x, shape, [0])

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_base = r0 + wg * block_q
        qs = q_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q_base, block_q), hq], qs, q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])
        m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), row_layout)
        l_i = plgpu.layout_cast(jnp.full((block_q,), 0.0, jnp.float32), row_layout)
        acc = plgpu.layout_cast(jnp.full((block_q, q_smem.shape[-1]), 0.0, jnp.float32), wgmma_layout)
        plgpu.barrier_wait(k_bar.at[0])  # n_steps >= 1: every real row sees itself
        pl.when(wg == 1)(sched_sync)

        def step(s, carry, *, seg):
            acc, m_i, l_i = carry
            slot = lax.rem(s, num_stages)

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, qs, k_smem.at[slot].T)
                sched_sync()
                return acc_ref[...]

            sc = pl.run_scoped(qk, plgpu.ACC((block_q, block_k), jnp.float32))
            plgpu.barrier_arrive(k_done.at[slot])

            def key_mask():
                # kv_valid of this key block, one flag per column, broadcast over the rows.
                flags = plgpu.load(
                    kvv_ref.at[bi],
                    (pl.ds(key_start(s), block_k),),
                    layout=plgpu.Layout.WGMMA.reduce(0),
                    optimized=False,
                )
                return lax.broadcast_in_dim(flags, (block_q, block_k), [1]) != 0

            if seg == "pass":
                need = jnp.logical_not(all_local) | ((s + 1) * block_k > pv)

                def apply_mask():
                    keys = s * block_k + iota(1)
                    rows = q_base + iota(0)
                    vis = (keys < pv) & (rows >= anchor_len)
                    if has_kvv:
                        vis = vis & key_mask()
                    return jnp.where(vis, s_c, _MASK)
            else:
                j0 = (s - n_p) * block_k
                need = j0 + block_k > m_full_keys

                def apply_mask():
                    keys = j0 + iota(1)
                    rows = q_base + iota(0)
                    if causal:
                        vis = keys <= rows
                    else:
                        vis = (keys <= rows) | ((rows >= anchor_len) & (keys < tq))
                    if has_kvv:
                        vis = vis & key_mask()
                    return jnp.where(vis, s_c, _MASK)

            if has_kvv:  # a key block with an invalid key needs the per-element mask; the rest only where cut
                need = need | (kvb_ref[bi, lax.div(key_start(s), block_k)] == 0)
            s_c = sc * c
            s_c = lax.cond(need, apply_mask, lambda: s_c)
            m_new = jnp.maximum(m_i, s_c.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s_c - bcast_rows(m_new, s_c.shape))
            acc = acc * bcast_rows(alpha, acc.shape)
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(v_bar.at[slot])
            plgpu.barrier_wait(sched)

            def pv_mm(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                nxt = s + 1

                @pl.when(nxt < n_steps)
                def _():
                    plgpu.barrier_wait(k_bar.at[lax.rem(nxt, num_stages)])

            acc = pl.run_state(pv_mm)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_done.at[slot])
            return acc, m_new, l_i

        carry = (acc, m_i, l_i)
        carry = lax.fori_loop(0, n_p, functools.partial(step, seg="pass"), carry)
        acc, m_i, l_i = lax.fori_loop(n_p, n_steps, functools.partial(step, seg="main"), carry)
        pl.when(wg == 0)(sched_sync)

        valid = m_i > 0.5 * _MASK
        l_safe = jnp.where(valid, l_i, 1.0)
        inv = jnp.where(valid, 1.0 / l_safe, 0.0)
        acc = acc * bcast_rows(inv, acc.shape)
        qs[...] = acc.astype(dtype)
        lse_smem[wg] = jnp.where(valid, m_i * _LN2 + jnp.log(l_safe), -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qs, o_ref.at[bi, pl.ds(q_base, block_q), hq])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bi, hq, pl.ds(q_base, block_q)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(hq, group)

        def issue(s, slot):
            ks = pl.ds(key_start(s), block_k)
            plgpu.copy_gmem_to_smem(k_ref.at[bi, ks, kv_head], k_smem.at[slot], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[bi, ks, kv_head], v_smem.at[slot], v_bar.at[slot])

        for i in range(num_stages):
            pl.when(i < n_steps)(functools.partial(issue, i, i))

        @pl.loop(num_stages, jnp.maximum(n_steps, num_stages))
        def _(s):
            slot = lax.rem(s, num_stages)
            ks = pl.ds(key_start(s), block_k)
            plgpu.barrier_wait(k_done.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[bi, ks, kv_head], k_smem.at[slot], k_bar.at[slot])
            plgpu.barrier_wait(v_done.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[bi, ks, kv_head], v_smem.at[slot], v_bar.at[slot])


@functools.partial(jax.jit, static_argnames=("anchor_len", "causal", "sm_scale", "block_q", "block_k", "num_stages"))
def apb_attention_mosaic(
    q,
    k,
    v,
    passing_valid,
    kv_valid,
    *,
    anchor_len: int,
    causal: bool,
    sm_scale: float,
    block_q: int = 64,
    block_k: int = 128,
    num_stages: int = 2,
):
    """q [B, Tq, H, D], k/v [B, Tk, KVH, D] (bf16/f16), passing_valid int32 [], kv_valid bool [B, Tk] | None.

    Returns out [B, Tq, H, D] (q.dtype) and lse [B, H, Tq] float32.
    """
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    pk = tk - tq
    span = _COMPUTE_WGS * block_q
    n_q_tiles = cdiv(tq, span)
    tq_pad = n_q_tiles * span
    # Re-lay the keys so that every TMA start is a multiple of block_k, as in the shapes
    # verified on the H200: pad the passing block to whole key blocks (the gap sits past
    # passing_valid, so it is never visible and never loaded) and the local block too.
    # (With the passing block unpadded, Mosaic's layout inference asserted on key lengths
    # that are not multiples of 8.)
    k, v, kv_valid, pk_pad = pad_passing(k, v, kv_valid, pk, block_k)
    tk_pad = pk_pad + cdiv(tq, block_k) * block_k
    if tq_pad != tq:
        q = jnp.pad(q, ((0, 0), (0, tq_pad - tq), (0, 0), (0, 0)))
    if tk_pad != pk_pad + tq:
        k = jnp.pad(k, ((0, 0), (0, tk_pad - pk_pad - tq), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, tk_pad - pk_pad - tq), (0, 0), (0, 0)))
    pv = jnp.clip(jnp.asarray(passing_valid, jnp.int32), 0, pk).reshape(1)
    args = [pv, q, k, v]
    has_kvv = kv_valid is not None
    if has_kvv:  # padded keys are invalid; kvb: 1 where a whole key block is valid (no per-element mask needed)
        kvv = jnp.pad(kv_valid.astype(jnp.int32), ((0, 0), (0, tk_pad - pk_pad - tq)))
        args += [kvv, kvv.reshape(b, tk_pad // block_k, block_k).min(axis=-1)]
    dtype = q.dtype
    swizzle = 128
    tiling = (8, swizzle // jnp.dtype(dtype).itemsize)
    transforms = (plgpu.TilingTransform(tiling), plgpu.SwizzleTransform(swizzle))
    scratch = dict(
        q_smem=plgpu.SMEM((_COMPUTE_WGS, block_q, d), dtype, transforms=transforms),
        k_smem=plgpu.SMEM((num_stages, block_k, d), dtype, transforms=transforms),
        v_smem=plgpu.SMEM((num_stages, block_k, d), dtype, transforms=transforms),
        lse_smem=plgpu.SMEM((_COMPUTE_WGS, block_q), jnp.float32),
        q_bar=plgpu.Barrier(num_barriers=_COMPUTE_WGS),
        k_bar=plgpu.Barrier(num_barriers=num_stages),
        v_bar=plgpu.Barrier(num_barriers=num_stages),
        k_done=plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=num_stages),
        v_done=plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=num_stages),
        sched=plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
    )
    body = functools.partial(
        _kernel,
        tq=tq,
        pk=pk_pad,
        anchor_len=anchor_len,
        causal=causal,
        scale=sm_scale,
        block_q=block_q,
        block_k=block_k,
        num_stages=num_stages,
        n_q_tiles=n_q_tiles,
        group=h // kvh,
        dtype=dtype,
        has_kvv=has_kvv,
    )
    out, lse = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((b, tq_pad, h, d), dtype), jax.ShapeDtypeStruct((b, h, tq_pad), jnp.float32)),
        scratch_types=scratch,
        grid=(h, n_q_tiles, b),
        grid_names=("heads", "q", "batch"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*args)
    return out[:, :tq], lse[:, :, :tq]
