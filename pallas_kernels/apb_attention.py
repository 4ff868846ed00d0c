"""APB attention: local rows against [passing | anchor | local] keys in one kernel call.

`apb_attention` validates its inputs and dispatches to a backend:
  "mosaic"    Pallas Mosaic-GPU kernel for Hopper (TMA, wgmma, warp specialisation)
  "triton"    the portable Pallas kernel lowered through Pallas-Triton (any CUDA GPU)
  "interpret" the same portable kernel with interpret=True (CPU; slow, for tests)
  "xla"       plain XLA ops, blocked flash-style (pallas_kernels.xla_blocked): the CPU default
  "reference" plain jnp (pallas_kernels.reference), dense, float32, cast to q.dtype: the oracle
The mask is described in `pallas_kernels.mask`.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp

from pallas_kernels.reference import apb_attention_reference

BACKENDS = ("mosaic", "triton", "interpret", "xla", "reference")
# The Mosaic kernel's kv_valid path passed every GPU case (H200, NOTES.md run 3), so calls
# with kv_valid stay on Mosaic; APB_MOSAIC_KV_VALID=0 sends them to Triton instead.
MOSAIC_KV_VALID = os.environ.get("APB_MOSAIC_KV_VALID", "1") == "1"
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_KERNEL_HEAD_DIMS = {"mosaic": (64, 128), "triton": (32, 64, 128, 256), "interpret": (32, 64, 128, 256)}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. Portable kernel: powers of two >= 16. Mosaic: multiples of 64."""

    block_q: int
    block_k: int
    num_warps: int | None = None
    num_stages: int | None = None

    @classmethod
    def get_default(cls, backend: str, head_dim: int = 128) -> BlockSizes:
        if backend == "mosaic":
            return cls(block_q=64, block_k=128, num_stages=2)
        if backend == "triton":
            return cls(
                block_q=128,
                block_k=64 if head_dim > 64 else 128,
                num_warps=8 if head_dim > 64 else 4,
                num_stages=3 if head_dim <= 128 else 2,
            )
        if backend == "xla":
            return cls(block_q=512, block_k=512)
        return cls(block_q=32, block_k=32)


def _is_hopper(dev) -> bool:
    cc = getattr(dev, "compute_capability", None)
    return cc is not None and str(cc).split(".")[0] == "9"


def default_backend(dtype=None, head_dim: int | None = None) -> str:
    """Fastest backend for the default device (and, if given, this dtype and head_dim)."""
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return "xla"
    mosaic_ok = (dtype is None or jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))) and (
        head_dim is None or head_dim in _KERNEL_HEAD_DIMS["mosaic"]
    )
    return "mosaic" if _is_hopper(dev) and mosaic_ok else "triton"


def _validate(q, k, v, anchor_len, passing_valid, kv_valid, backend, block_sizes):
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS} (or None for auto)")
    if q.ndim not in (3, 4):
        raise ValueError(f"q must be [Tq, H, D] or [batch, Tq, H, D], got shape {q.shape}")
    if k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(f"q, k, v must have the same rank, got q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {k.shape}, v {v.shape}")
    if q.ndim == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(f"batch of q ({q.shape[0]}) and k/v ({k.shape[0]}) differ")
    tq, h, d = q.shape[-3:]
    tk, kvh, dk = k.shape[-3:]
    if dk != d:
        raise ValueError(f"head_dim of q (D={d}) and k/v (D={dk}) differ")
    if kvh < 1 or h % kvh:
        raise ValueError(f"heads H={h} must be a multiple of kv_heads KVH={kvh}")
    if tk < tq:
        raise ValueError(
            f"k has Tk={tk} keys but q has Tq={tq} rows; keys are "
            f"[passing | anchor | local], so Tk - Tq (the passing length) must be >= 0"
        )
    if not isinstance(anchor_len, (int,)) or isinstance(anchor_len, bool):
        raise ValueError(f"anchor_len must be a Python int, got {type(anchor_len).__name__}")
    if anchor_len < 0:
        raise ValueError(f"anchor_len={anchor_len} must be >= 0")
    if anchor_len > tq:
        raise ValueError(f"anchor_len={anchor_len} exceeds Tq={tq}")
    dts = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dts) != 1:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if jnp.dtype(q.dtype) not in map(jnp.dtype, _DTYPES):
        raise ValueError(f"dtype {q.dtype} is not supported; use float32, bfloat16 or float16")
    pk = tk - tq
    if passing_valid is not None:
        if isinstance(passing_valid, (int,)) and not isinstance(passing_valid, bool):
            if not 0 <= passing_valid <= pk:
                raise ValueError(f"passing_valid={passing_valid} must be in [0, Pk={pk}] (Pk = Tk - Tq)")
        else:
            pv = jnp.asarray(passing_valid)
            if pv.ndim != 0 or not jnp.issubdtype(pv.dtype, jnp.integer):
                raise ValueError(f"passing_valid must be an int or an integer scalar, got {pv.dtype}{list(pv.shape)}")
    if kv_valid is not None:
        kvv = jnp.asarray(kv_valid)
        want = (tk,) if q.ndim == 3 else (q.shape[0], tk)
        if kvv.shape != want and not (q.ndim == 4 and kvv.shape == (tk,)):
            raise ValueError(f"kv_valid must have shape {want} (one flag per key), got {kvv.shape}")
        if kvv.dtype != jnp.bool_:
            raise ValueError(f"kv_valid must be bool, got {kvv.dtype}")
    if backend == "mosaic" and jnp.dtype(q.dtype) == jnp.dtype(jnp.float32):
        raise ValueError("dtype float32 is not supported by backend 'mosaic' (bfloat16, float16); use backend='triton'")
    if backend in _KERNEL_HEAD_DIMS and d not in _KERNEL_HEAD_DIMS[backend]:
        raise ValueError(
            f"head_dim D={d} is not supported by backend {backend!r}; supported: {_KERNEL_HEAD_DIMS[backend]}"
        )
    if block_sizes is not None and backend in ("triton", "interpret"):
        for name in ("block_q", "block_k"):
            x = getattr(block_sizes, name)
            if x < 16 or x & (x - 1):
                raise ValueError(f"{name}={x} must be a power of two >= 16 for backend {backend!r}")
    if block_sizes is not None and backend == "xla" and min(block_sizes.block_q, block_sizes.block_k) < 1:
        raise ValueError(f"block_q={block_sizes.block_q} and block_k={block_sizes.block_k} must be >= 1")
    if block_sizes is not None and backend == "mosaic" and (block_sizes.block_q % 64 or block_sizes.block_k % 64):
        raise ValueError(
            f"block_q={block_sizes.block_q} and block_k={block_sizes.block_k} "
            "must be multiples of 64 for backend 'mosaic'"
        )


def apb_attention(
    q,
    k,
    v,
    *,
    anchor_len: int,
    passing_valid=None,
    kv_valid=None,
    causal: bool = True,
    sm_scale: float | None = None,
    backend: str | None = None,
    block_sizes=None,
):
    """APB attention: anchor rows causal on the anchor; local rows on passing + anchor + local.

    q: [Tq, H, D] or [batch, Tq, H, D], rows = [anchor (anchor_len) | local (Tl)].
    k, v: [Tk, KVH, D] (or batched), keys = [passing (Pk) | anchor (anchor_len) | local (Tl)],
      Pk = Tk - Tq >= 0.
    passing_valid: None (= Pk) or an int32 scalar, possibly traced: only passing keys
      [0, passing_valid) are visible; blocks past it are skipped.
    kv_valid: None or bool [Tk] (or [batch, Tk]) extra per-key mask.
    causal: local rows see local keys <= their own index (bottom-right aligned); causal=False
      lets local rows see the whole local block. Anchor rows are always causal on the anchor and
      never see passing keys.
    GQA: H % KVH == 0, query head j uses kv head j // (H // KVH); K/V are never repeated.
    Returns out [.., Tq, H, D] in q.dtype and lse [.., H, Tq] float32 (natural log); a row with
    no visible key gives out 0 and lse -inf.
    backend: None = auto (mosaic on Hopper, triton on other GPUs, xla elsewhere), or
      "mosaic" | "triton" | "interpret" | "xla" | "reference". block_sizes: a `BlockSizes` or None.
    """
    if backend is None:
        backend = default_backend(getattr(q, "dtype", None), q.shape[-1] if hasattr(q, "shape") else None)
    _validate(q, k, v, anchor_len, passing_valid, kv_valid, backend, block_sizes)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    if backend == "reference":
        out, lse = apb_attention_reference(
            q,
            k,
            v,
            anchor_len=anchor_len,
            passing_valid=passing_valid,
            kv_valid=kv_valid,
            causal=causal,
            sm_scale=scale,
        )
        return out.astype(q.dtype), lse
    if backend == "xla":
        from pallas_kernels.xla_blocked import apb_attention_xla

        bs = block_sizes or BlockSizes.get_default(backend, d)
        batched = q.ndim == 4
        qb, kb, vb = (q, k, v) if batched else (q[None], k[None], v[None])
        kvv = None if kv_valid is None else jnp.broadcast_to(jnp.asarray(kv_valid), (qb.shape[0], kb.shape[1]))
        pv = kb.shape[1] - qb.shape[1] if passing_valid is None else passing_valid
        out, lse = apb_attention_xla(
            qb,
            kb,
            vb,
            jnp.asarray(pv, jnp.int32),
            kvv,
            anchor_len=anchor_len,
            causal=causal,
            sm_scale=scale,
            block_q=bs.block_q,
            block_k=bs.block_k,
        )
        return (out, lse) if batched else (out[0], lse[0])

    unbatched = q.ndim == 3
    if unbatched:
        q, k, v = q[None], k[None], v[None]
    pk = k.shape[1] - q.shape[1]
    pv = pk if passing_valid is None else passing_valid
    kvv = None
    if kv_valid is not None:
        kvv = jnp.asarray(kv_valid)
        kvv = jnp.broadcast_to(kvv, (q.shape[0], k.shape[1]))
    # Calls the Mosaic kernel must not take go to Triton: kv_valid when MOSAIC_KV_VALID is off, and
    # d=64 with both an anchor and a passing block (NaN on the H200, NOTES.md runs 3-4; Triton
    # passed the same cases).
    if backend == "mosaic" and ((kvv is not None and not MOSAIC_KV_VALID) or (d != 128 and anchor_len > 0 and pk > 0)):
        backend = "triton"
        block_sizes = None
    bs = block_sizes or BlockSizes.get_default(backend, d)
    if backend == "mosaic":
        from pallas_kernels import mosaic_gpu  # lazy: never needed (or importable) on CPU

        out, lse = mosaic_gpu.apb_attention_mosaic(
            q,
            k,
            v,
            jnp.asarray(pv, jnp.int32),
            kvv,
            anchor_len=anchor_len,
            causal=causal,
            sm_scale=scale,
            block_q=bs.block_q,
            block_k=bs.block_k,
            num_stages=bs.num_stages or 2,
        )
    else:
        from pallas_kernels.portable import apb_attention_portable

        out, lse = apb_attention_portable(
            q,
            k,
            v,
            jnp.asarray(pv, jnp.int32),
            kvv,
            anchor_len=anchor_len,
            causal=causal,
            sm_scale=scale,
            block_q=bs.block_q,
            block_k=bs.block_k,
            interpret=backend == "interpret",
            num_warps=bs.num_warps,
            num_stages=bs.num_stages,
        )
    if unbatched:
        return out[0], lse[0]
    return out, lse
