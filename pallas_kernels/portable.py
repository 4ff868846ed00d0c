"""Portable Pallas APB attention: `interpret=True` on the CPU, Pallas-Triton on a GPU.

One program per (q block, query head, batch); query head j reads kv head j // G
through the BlockSpec index map, so K/V are never repeated. The key loop walks the
two segments of `mask.ApbMask` (main: keys Pk + j, causal; passing: keys [0,
passing_valid), local rows only), and within each segment first the blocks that
need no per-element mask, then the partial ones; every other block is skipped.
Online softmax in float32 with base-2 exponentials.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.mask import cdiv

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


def out_struct(shape, dtype, like):
    """ShapeDtypeStruct that inherits `like`'s varying-manual-axes type (for shard_map's check_vma).

    jax 0.10 calls that field `manual_axis_type`, older releases `vma`; try both.
    """
    aval = jax.typeof(like)
    for attr in ("manual_axis_type", "vma"):
        if hasattr(aval, attr):
            try:
                return jax.ShapeDtypeStruct(shape, dtype, **{attr: getattr(aval, attr)})
            except TypeError:
                pass
    return jax.ShapeDtypeStruct(shape, dtype)


def _kernel(
    pv_ref,
    q_ref,
    k_ref,
    v_ref,
    *rest,
    tq,
    pk,
    anchor_len,
    causal,
    block_q,
    block_k,
    scale,
    n_q_blocks,
    reverse,
    has_kvv,
    precision,
):
    if has_kvv:
        kvv_ref, o_ref, lse_ref = rest
    else:
        kvv_ref = None
        o_ref, lse_ref = rest
    qb = pl.program_id(0)
    if reverse:
        qb = n_q_blocks - 1 - qb
    pv = pv_ref[0]
    r0 = qb * block_q
    r_last = jnp.minimum(r0 + block_q, tq) - 1
    rows = r0 + lax.broadcasted_iota(jnp.int32, (block_q,), 0)

    def m_end_of(r):
        if causal:
            return r + 1
        return jnp.where(r < anchor_len, r + 1, tq)

    m_end_rows = m_end_of(rows)
    m_hi = lax.div(m_end_of(r_last) + (block_k - 1), block_k)
    m_full = lax.div(m_end_of(r0), block_k)
    has_local = r_last >= anchor_len
    all_local = r0 >= anchor_len
    p_hi = jnp.where(has_local, lax.div(pv + (block_k - 1), block_k), 0)
    p_full = jnp.where(all_local, lax.div(pv, block_k), 0)

    q = q_ref[...]
    d = q.shape[-1]
    qk_scale = scale * _LOG2E

    def body(start, carry, *, masked, seg):
        acc, m_i, l_i = carry
        ks = pl.ds(start, block_k)
        k = k_ref[ks, :]
        s = (
            lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)
            * qk_scale
        )
        if masked:
            keys = start + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
            if seg == "main":
                vis = (keys - pk)[None, :] < m_end_rows[:, None]
            else:
                vis = (keys < pv)[None, :] & (rows >= anchor_len)[:, None]
            if kvv_ref is not None:
                vis = vis & (kvv_ref[ks] != 0)[None, :]
            s = jnp.where(vis, s, MASK_VALUE)
        m_next = jnp.maximum(m_i, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_i - m_next)
        p = jnp.exp2(s - m_next[:, None])
        l_next = l_i * alpha + jnp.sum(p, axis=1)
        v = v_ref[ks, :]
        pv_ = lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )
        return acc * alpha[:, None] + pv_, m_next, l_next

    carry = (
        jnp.zeros((block_q, d), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )

    def block(start, c, *, masked, seg):
        if masked or kvv_ref is None:
            return body(start, c, masked=masked, seg=seg)
        # the ranges leave this block whole: it needs the per-element mask only if it holds an invalid key
        holey = jnp.min(kvv_ref[pl.ds(start, block_k)]) == 0
        return lax.cond(
            holey, lambda c: body(start, c, masked=True, seg=seg), lambda c: body(start, c, masked=False, seg=seg), c
        )

    main = lambda masked: lambda j, c: block(pk + j * block_k, c, masked=masked, seg="main")
    pas = lambda masked: lambda j, c: block(j * block_k, c, masked=masked, seg="pass")
    carry = lax.fori_loop(0, m_full, main(False), carry)
    carry = lax.fori_loop(m_full, m_hi, main(True), carry)
    carry = lax.fori_loop(0, p_full, pas(False), carry)
    carry = lax.fori_loop(p_full, p_hi, pas(True), carry)
    acc, m_i, l_i = carry

    valid = m_i > 0.5 * MASK_VALUE
    l_safe = jnp.where(valid, l_i, 1.0)
    out = jnp.where(valid[:, None], acc / l_safe[:, None], 0.0)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = jnp.where(valid, m_i * _LN2 + jnp.log(l_safe), -jnp.inf)


@functools.partial(
    jax.jit,
    static_argnames=("anchor_len", "causal", "sm_scale", "block_q", "block_k", "interpret", "num_warps", "num_stages"),
)
def apb_attention_portable(
    q,
    k,
    v,
    passing_valid,
    kv_valid,
    *,
    anchor_len: int,
    causal: bool,
    sm_scale: float,
    block_q: int,
    block_k: int,
    interpret: bool,
    num_warps: int | None = None,
    num_stages: int | None = None,
):
    """q [B, Tq, H, D], k/v [B, Tk, KVH, D], passing_valid int32 [] , kv_valid bool [B, Tk] | None.

    Returns out [B, Tq, H, D] (q.dtype) and lse [B, H, Tq] float32.
    """
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    pk = tk - tq
    nqb = cdiv(tq, block_q)
    tq_pad = nqb * block_q
    tk_pad = pk + cdiv(tq, block_k) * block_k
    if tq_pad != tq:
        q = jnp.pad(q, ((0, 0), (0, tq_pad - tq), (0, 0), (0, 0)))
    if tk_pad != tk:
        k = jnp.pad(k, ((0, 0), (0, tk_pad - tk), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, tk_pad - tk), (0, 0), (0, 0)))
    has_kvv = kv_valid is not None
    pv = jnp.clip(jnp.asarray(passing_valid, jnp.int32), 0, pk).reshape(1)
    reverse = causal  # heavy (late) q blocks first balances the causal triangle
    qmap = (lambda i: nqb - 1 - i) if reverse else (lambda i: i)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    in_specs = [
        pl.BlockSpec((1,), lambda i, j, bb: (0,)),
        pl.BlockSpec((None, block_q, None, d), lambda i, j, bb: (bb, qmap(i), j, 0)),
        pl.BlockSpec((None, tk_pad, None, d), lambda i, j, bb: (bb, 0, j // g, 0)),
        pl.BlockSpec((None, tk_pad, None, d), lambda i, j, bb: (bb, 0, j // g, 0)),
    ]
    args = [pv, q, k, v]
    if has_kvv:
        kvv = jnp.pad(kv_valid.astype(jnp.int32), ((0, 0), (0, tk_pad - tk)))
        in_specs.append(pl.BlockSpec((None, tk_pad), lambda i, j, bb: (bb, 0)))
        args.append(kvv)
    kernel = functools.partial(
        _kernel,
        tq=tq,
        pk=pk,
        anchor_len=anchor_len,
        causal=causal,
        block_q=block_q,
        block_k=block_k,
        scale=sm_scale,
        n_q_blocks=nqb,
        reverse=reverse,
        has_kvv=has_kvv,
        precision=precision,
    )
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        compiler_params = pltriton.CompilerParams(
            num_warps=num_warps if num_warps is not None else (4 if d <= 64 else 8),
            num_stages=num_stages if num_stages is not None else 2,
        )
    out, lse = pl.pallas_call(
        kernel,
        grid=(nqb, h, b),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, block_q, None, d), lambda i, j, bb: (bb, qmap(i), j, 0)),
            pl.BlockSpec((None, None, block_q), lambda i, j, bb: (bb, j, qmap(i))),
        ],
        out_shape=[out_struct((b, tq_pad, h, d), q.dtype, q), out_struct((b, h, tq_pad), jnp.float32, q)],
        interpret=interpret,
        compiler_params=compiler_params,
        name="apb_attention_portable",
    )(*args)
    return out[:, :tq], lse[:, :, :tq]
