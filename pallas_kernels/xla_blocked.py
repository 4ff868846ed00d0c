"""APB attention in plain XLA ops, blocked like the kernels: the fast path off the GPU.

The same contract and mask as `apb_attention` (see `pallas_kernels.mask`), computed flash-style: a scan over
q blocks, and for each an online softmax (float32, LSE merge) over the key blocks its rows can see, in two
loops with traced trip counts (main segment: causal, so only the blocks up to the block's last row; passing
segment: only [0, passing_valid), local rows only). Every head of the block goes through one batched dot per
key block, so XLA's CPU dot and fusions work on tiles that stay in cache instead of [Tq, Tk] score matrices.
Used by the `"xla"` backend (the CPU default) and by `full`'s causal attention off the GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.mask import cdiv

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
BLOCK_Q = 512
BLOCK_K = 512


@functools.partial(jax.jit, static_argnames=("anchor_len", "causal", "sm_scale", "block_q", "block_k"))
def apb_attention_xla(
    q,
    k,
    v,
    passing_valid,
    kv_valid,
    *,
    anchor_len: int,
    causal: bool,
    sm_scale: float,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
):
    """q [B, Tq, H, D], k/v [B, Tk, KVH, D] (Tk = Pk + Tq), passing_valid int32 [], kv_valid bool [B, Tk] | None.

    Returns out [B, Tq, H, D] (q.dtype) and lse [B, H, Tq] float32; a row with no visible key gives 0 / -inf.
    """
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    pk = tk - tq
    bq = min(block_q, tq)
    bk = min(block_k, max(tq, pk))
    nqb, nmb, npb = cdiv(tq, bq), cdiv(tq, bk), cdiv(pk, bk)
    f32 = jnp.float32

    # q -> [b * nqb, kvh, g * bq, d] (scaled); k/v segments -> [b, kvh, n * bk, d]: one dot per tile and head group.
    # The scan runs over (batch row, q block): a tile holds one row's scores, so a batch does not grow the tiles.
    qf = jnp.pad(q.astype(f32) * f32(sm_scale), ((0, 0), (0, nqb * bq - tq), (0, 0), (0, 0)))
    qt = qf.reshape(b, nqb, bq, kvh, g, d).transpose(0, 1, 3, 4, 2, 5).reshape(b * nqb, kvh, g * bq, d)

    def segment(x, lo, hi, n):
        x = jnp.pad(x[:, lo:hi].astype(f32), ((0, 0), (0, n * bk - (hi - lo)), (0, 0), (0, 0)))
        return jnp.swapaxes(x, 1, 2)

    km, vm = segment(k, pk, tk, nmb), segment(v, pk, tk, nmb)
    kp, vp = (segment(k, 0, pk, npb), segment(v, 0, pk, npb)) if pk else (None, None)
    if kv_valid is None:
        valid_m = valid_p = None
    else:
        kvv = jnp.broadcast_to(kv_valid, (b, tk))
        valid_m = jnp.pad(kvv[:, pk:], ((0, 0), (0, nmb * bk - tq)))
        valid_p = jnp.pad(kvv[:, :pk], ((0, 0), (0, npb * bk - pk))) if pk else None
    pv = jnp.clip(jnp.asarray(passing_valid, jnp.int32), 0, pk)
    col = lax.broadcasted_iota(jnp.int32, (bk,), 0)
    # 0.0 that varies over whatever mesh axes the inputs vary over (inside shard_map with check_vma): added to the
    # loop carries' initial values so their type matches what the loop body makes of them
    firsts = [x.reshape(-1)[0].astype(f32) for x in (qt, km, vm, kp, vp, valid_m, valid_p, pv) if x is not None]
    zero = sum(jnp.where(jnp.isfinite(e), e, 0.0) * 0 for e in firsts)

    def m_end_of(r):
        return r + 1 if causal else jnp.where(r < anchor_len, r + 1, tq)

    def q_block(_, xs):
        bi, qi, qb = xs  # qb [kvh, g * bq, d]
        rows = qi * bq + lax.broadcasted_iota(jnp.int32, (bq,), 0)
        r_last = jnp.minimum(qi * bq + bq, tq) - 1

        def tile(start, ks, vs, valid, visible, carry):
            m, l, acc = carry
            kt = lax.dynamic_slice(ks, (bi, 0, start, 0), (1, kvh, bk, d))[0]
            vt = lax.dynamic_slice(vs, (bi, 0, start, 0), (1, kvh, bk, d))[0]
            s = jnp.einsum("kqd,ksd->kqs", qb, kt).reshape(kvh, g, bq, bk)
            vis = visible(start + col)  # [bq, bk]
            if valid is not None:
                vis = vis & lax.dynamic_slice(valid, (bi, start), (1, bk))
            s = jnp.where(vis, s, MASK_VALUE)
            m_next = jnp.maximum(m, s.max(-1))
            alpha = jnp.exp(m - m_next)
            p = jnp.exp(s - m_next[..., None])
            l = l * alpha + p.sum(-1)
            pv_ = jnp.einsum("kqs,ksd->kqd", p.reshape(kvh, g * bq, bk), vt).reshape(kvh, g, bq, d)
            return m_next, l, acc * alpha[..., None] + pv_

        m_end_rows = m_end_of(rows)
        main = lambda j, c: tile(j * bk, km, vm, valid_m, lambda keys: keys[None, :] < m_end_rows[:, None], c)
        carry = (
            jnp.full((kvh, g, bq), -jnp.inf, f32) + zero,
            jnp.zeros((kvh, g, bq), f32) + zero,
            jnp.zeros((kvh, g, bq, d), f32) + zero,
        )
        carry = lax.fori_loop(0, cdiv_t(m_end_of(r_last), bk), main, carry)
        if pk:
            local = rows >= anchor_len
            pas = lambda j, c: tile(j * bk, kp, vp, valid_p, lambda keys: (keys < pv)[None, :] & local[:, None], c)
            carry = lax.fori_loop(0, jnp.where(r_last >= anchor_len, cdiv_t(pv, bk), 0), pas, carry)
        m, l, acc = carry
        ok = m > 0.5 * MASK_VALUE
        l_safe = jnp.where(ok, l, 1.0)
        out = jnp.where(ok[..., None], acc / l_safe[..., None], 0.0)
        lse = jnp.where(ok, m + jnp.log(l_safe), -jnp.inf)
        return None, (out, lse)

    idx = jnp.arange(b * nqb, dtype=jnp.int32)
    _, (out, lse) = lax.scan(q_block, None, (idx // nqb, idx % nqb, qt))
    # out [b * nqb, kvh, g, bq, d] -> [b, Tq, H, D]; lse [b * nqb, kvh, g, bq] -> [b, H, Tq]
    out = out.reshape(b, nqb, kvh, g, bq, d).transpose(0, 1, 4, 2, 3, 5).reshape(b, nqb * bq, h, d)[:, :tq]
    lse = lse.reshape(b, nqb, kvh, g, bq).transpose(0, 2, 3, 1, 4).reshape(b, h, nqb * bq)[:, :, :tq]
    return out.astype(q.dtype), lse


def cdiv_t(x, m: int):
    """Ceiling division of a traced int by a static one."""
    return lax.div(x + (m - 1), m)
