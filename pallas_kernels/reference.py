"""APB attention in plain jnp, float32 accumulation: the oracle for every kernel test."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.mask import ApbMask


def apb_attention_reference(
    q, k, v, *, anchor_len: int, passing_valid=None, kv_valid=None, causal: bool = True, sm_scale: float | None = None
):
    """Same contract as `apb_attention`, computed densely.

    q: [Tq, H, D] or [batch, Tq, H, D]; k, v: [Tk, KVH, D] (or batched), Tk = Pk + Tq.
    Returns out float32 [.., Tq, H, D] and lse float32 [.., H, Tq]. GQA by head groups
    (query head j uses kv head j // (H // KVH)) without repeating K/V.
    """
    unbatched = q.ndim == 3
    if unbatched:
        q, k, v = q[None], k[None], v[None]
        if kv_valid is not None:
            kv_valid = jnp.asarray(kv_valid)[None]
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    pk = k.shape[1] - q.shape[1]
    pv = jnp.asarray(pk if passing_valid is None else passing_valid, jnp.int32)
    o, lse = _reference(q, k, v, pv, kv_valid, anchor_len=anchor_len, causal=causal, scale=scale)
    if unbatched:
        return o[0], lse[0]
    return o, lse


@functools.partial(jax.jit, static_argnames=("anchor_len", "causal", "scale"))
def _reference(q, k, v, passing_valid, kv_valid, *, anchor_len, causal, scale):
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    m = ApbMask(tq, tk, anchor_len, causal)
    pv = jnp.clip(passing_valid, 0, m.pk)
    mask = m.dense(pv, kv_valid)  # [Tq, Tk] or [b, Tq, Tk]
    if mask.ndim == 2:
        mask = mask[None]
    mask = mask[:, None, None]  # [b, 1, 1, Tq, Tk]

    hi = jax.lax.Precision.HIGHEST
    qg = q.astype(jnp.float32).reshape(b, tq, kvh, g, d)
    s = jnp.einsum("bqkgd,btkd->bkgqt", qg, k.astype(jnp.float32), precision=hi) * scale
    s = jnp.where(mask, s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    mx_safe = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.where(mask, jnp.exp(s - mx_safe), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bkgqt,btkd->bqkgd", p, v.astype(jnp.float32), precision=hi)
    l_q = jnp.moveaxis(l[..., 0], -1, 1)[..., None]  # [b, Tq, kvh, g, 1]
    o = jnp.where(l_q > 0, o / jnp.where(l_q > 0, l_q, 1.0), 0.0).reshape(b, tq, h, d)
    lse = jnp.where(l > 0, mx_safe + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]
    return o, lse.reshape(b, h, tq)
