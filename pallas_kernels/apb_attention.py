"""APB attention: local rows against [passing | anchor | local] keys in one kernel call.

`apb_attention` validates its inputs and dispatches to a backend:
  "mosaic"    Pallas Mosaic-GPU kernel for Hopper (TMA, wgmma, warp specialisation)
  "triton"    the portable Pallas kernel lowered through Pallas-Triton (any CUDA GPU)
  "interpret" the same portable kernel with interpret=True (CPU; slow, for tests)
  "xla"       plain XLA ops, blocked flash-style (pallas_kernels.xla_blocked): the CPU default, and on a GPU the
              choice for a handful of rows (decode), where a kernel's query tile would be nearly empty
  "cudnn"     cuDNN flash attention (jax.nn.dot_product_attention) for plain causal / full masks without LSE
  "reference" plain jnp (pallas_kernels.reference), dense, float32, cast to q.dtype: the oracle
The mask is described in `pallas_kernels.mask`.  With backend=None the dispatcher picks the fastest backend that
can serve the call on the current device (`choose_backend`) and logs each distinct choice once; a backend asked
for by name that cannot serve the call raises a ValueError saying why.  The "xla" and "cudnn" paths can be
differentiated ("xla" through the reference's gradient); the Pallas kernels are forward-only.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp

from pallas_kernels.reference import apb_attention_reference

BACKENDS = ("mosaic", "triton", "interpret", "xla", "cudnn", "reference")
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_KERNEL_HEAD_DIMS = {"mosaic": (64, 128), "triton": (32, 64, 128, 256), "interpret": (32, 64, 128, 256)}
SMALL_TQ = 64  # fewer query rows than this run on the "xla" backend on a GPU (decode steps)
log = logging.getLogger("pallas_kernels")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. Portable kernel: powers of two >= 16. Mosaic: multiples of 64."""

    block_q: int
    block_k: int
    num_warps: int | None = None
    num_stages: int | None = None

    @classmethod
    def get_default(cls, backend: str, head_dim: int = 128, tq: int | None = None) -> BlockSizes:
        if backend == "mosaic":
            return cls(block_q=64, block_k=128, num_stages=2)
        if backend == "triton":
            return cls(
                block_q=128,
                block_k=64 if head_dim > 64 else 128,
                num_warps=8 if head_dim > 64 else 4,
                num_stages=3 if head_dim <= 128 else 2,
            )
        if backend == "xla":  # a few rows (decode): long key blocks, few loop steps
            return cls(block_q=512, block_k=4096 if tq is not None and tq < SMALL_TQ else 512)
        return cls(block_q=32, block_k=32)


def _is_hopper(dev) -> bool:
    cc = getattr(dev, "compute_capability", None)
    return cc is not None and str(cc).split(".")[0] == "9"


def default_backend(dtype=None, head_dim: int | None = None) -> str:
    """Fastest kernel backend for the default device (and, if given, this dtype and head_dim)."""
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return "xla"
    mosaic_ok = (dtype is None or jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))) and (
        head_dim is None or head_dim in _KERNEL_HEAD_DIMS["mosaic"]
    )
    return "mosaic" if _is_hopper(dev) and mosaic_ok else "triton"


@dataclasses.dataclass(frozen=True)
class Call:
    """The static facts of one call that decide which backends can serve it."""

    platform: str
    hopper: bool
    dtype: jnp.dtype
    head_dim: int
    tq: int
    pk: int
    anchor_len: int
    has_kv_valid: bool
    need_lse: bool


def cannot_serve(backend: str, c: Call) -> str | None:
    """Why `backend` cannot serve call `c` (None: it can)."""
    half = c.dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if backend in ("mosaic", "triton", "cudnn") and c.platform != "gpu":
        return f"it needs a CUDA GPU (this device is {c.platform})"
    if backend == "mosaic":
        if not c.hopper:
            return "it needs a Hopper GPU (compute capability 9.x)"
        if not half:
            return f"dtype {c.dtype} is not supported (bfloat16, float16); use backend='triton'"
        if c.head_dim not in _KERNEL_HEAD_DIMS["mosaic"]:
            return f"head_dim D={c.head_dim} is not supported; supported: {_KERNEL_HEAD_DIMS['mosaic']}"
    if backend in ("triton", "interpret") and c.head_dim not in _KERNEL_HEAD_DIMS[backend]:
        return f"head_dim D={c.head_dim} is not supported; supported: {_KERNEL_HEAD_DIMS[backend]}"
    if backend == "cudnn":
        if not half:
            return f"dtype {c.dtype} is not supported by cuDNN flash attention (bfloat16, float16)"
        if c.pk or c.anchor_len or c.has_kv_valid:
            return "it serves plain causal or full masks only (no passing block, anchor or kv_valid)"
        if c.need_lse:
            return "it does not return the log-sum-exp (pass return_lse=False)"
        if c.head_dim % 8 or c.head_dim > 128:
            return f"head_dim D={c.head_dim} is not supported (a multiple of 8, at most 128)"
    return None


def choose_backend(c: Call) -> tuple[str, str]:
    """(backend, why) for a call with no backend named: the fastest that can serve it on this device."""
    if c.platform != "gpu":
        return "xla", f"the blocked XLA path is the fastest off a GPU ({c.platform})"
    if c.tq < SMALL_TQ:
        return "xla", f"{c.tq} query rows: a kernel's {SMALL_TQ}-row tile would be nearly empty"
    why_not = cannot_serve("mosaic", c) if c.hopper else "this GPU is not a Hopper"
    if why_not is None:
        return "mosaic", "Hopper, bf16/f16: the Mosaic-GPU kernel"
    if cannot_serve("cudnn", c) is None:
        return "cudnn", f"plain causal attention without LSE, and not the Mosaic kernel because {why_not}"
    return "triton", f"the Pallas-Triton kernel, not the Mosaic kernel because {why_not}"


@functools.cache
def _log_choice(backend: str, why: str) -> None:
    log.info("apb_attention backend=auto -> %r: %s", backend, why)


def _validate(q, k, v, anchor_len, passing_valid, kv_valid, backend, block_sizes):
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS} (or None / 'auto' to let the dispatcher pick)")
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
    return_lse: bool = True,
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
    Returns out [.., Tq, H, D] in q.dtype and lse [.., H, Tq] float32 (natural log; None when return_lse is
    False); a row with no visible key gives out 0 and lse -inf.
    backend: None or "auto" = the fastest that can serve the call here (`choose_backend`, logged once per
      choice), or one of BACKENDS (a ValueError says why when it cannot serve the call).
    block_sizes: a `BlockSizes` or None.
    """
    if backend == "auto":
        backend = None
    _validate(q, k, v, anchor_len, passing_valid, kv_valid, backend, block_sizes)
    d = q.shape[-1]
    dev = jax.devices()[0]
    call = Call(
        platform=dev.platform,
        hopper=_is_hopper(dev),
        dtype=jnp.dtype(q.dtype),
        head_dim=d,
        tq=q.shape[-3],
        pk=k.shape[-3] - q.shape[-3],
        anchor_len=anchor_len,
        has_kv_valid=kv_valid is not None,
        need_lse=return_lse,
    )
    if backend is None:
        backend, why = choose_backend(call)
        _log_choice(backend, why)
    else:
        why = cannot_serve(backend, call)
        if why is not None:
            raise ValueError(f"backend={backend!r} cannot serve this call: {why}")
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    unbatched = q.ndim == 3
    if unbatched:
        q, k, v = q[None], k[None], v[None]
    pk = k.shape[1] - q.shape[1]
    pv = jnp.asarray(pk if passing_valid is None else passing_valid, jnp.int32)
    kvv = None if kv_valid is None else jnp.broadcast_to(jnp.asarray(kv_valid), (q.shape[0], k.shape[1]))
    if backend == "cudnn":
        out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, scale=scale, implementation="cudnn")
        lse = None
    elif backend == "reference":
        out, lse = apb_attention_reference(
            q, k, v, anchor_len=anchor_len, passing_valid=pv, kv_valid=kvv, causal=causal, sm_scale=scale
        )
        out = out.astype(q.dtype)
    elif backend == "xla":
        bs = block_sizes or BlockSizes.get_default(backend, d, q.shape[1])
        out, lse = _xla(q, k, v, pv, kvv, anchor_len, causal, scale, bs.block_q, bs.block_k)
    else:
        bs = block_sizes or BlockSizes.get_default(backend, d)
        if backend == "mosaic":
            from pallas_kernels import mosaic_gpu  # lazy: never needed (or importable) on CPU

            kernel = functools.partial(
                mosaic_gpu.apb_attention_mosaic,
                anchor_len=anchor_len,
                causal=causal,
                sm_scale=scale,
                block_q=bs.block_q,
                block_k=bs.block_k,
                num_stages=bs.num_stages or 2,
            )
        else:
            from pallas_kernels.portable import apb_attention_portable

            kernel = functools.partial(
                apb_attention_portable,
                anchor_len=anchor_len,
                causal=causal,
                sm_scale=scale,
                block_q=bs.block_q,
                block_k=bs.block_k,
                interpret=backend == "interpret",
                num_warps=bs.num_warps,
                num_stages=bs.num_stages,
            )
        if kvv is None:
            out, lse = kernel(q, k, v, pv, None)
        else:  # a kv_valid that is all true at run time (e.g. every APB host but the first) costs nothing
            out, lse = jax.lax.cond(jnp.all(kvv), lambda: kernel(q, k, v, pv, None), lambda: kernel(q, k, v, pv, kvv))
    if not return_lse:
        lse = None
    if unbatched:
        return out[0], (None if lse is None else lse[0])
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _xla(q, k, v, pv, kvv, anchor_len, causal, scale, block_q, block_k):
    """The blocked XLA forward; its gradient is the dense reference's (the blocked loops have traced trip counts,
    which reverse-mode AD cannot go through)."""
    from pallas_kernels.xla_blocked import apb_attention_xla

    return apb_attention_xla(
        q, k, v, pv, kvv, anchor_len=anchor_len, causal=causal, sm_scale=scale, block_q=block_q, block_k=block_k
    )


def _xla_fwd(q, k, v, pv, kvv, anchor_len, causal, scale, block_q, block_k):
    return _xla(q, k, v, pv, kvv, anchor_len, causal, scale, block_q, block_k), (q, k, v, pv, kvv)


def _xla_bwd(anchor_len, causal, scale, block_q, block_k, res, g):
    q, k, v, pv, kvv = res

    def ref(q, k, v):
        out, lse = apb_attention_reference(
            q, k, v, anchor_len=anchor_len, passing_valid=pv, kv_valid=kvv, causal=causal, sm_scale=scale
        )
        return out.astype(q.dtype), lse

    _, vjp = jax.vjp(ref, q, k, v)
    dq, dk, dv = vjp(g)
    return dq, dk, dv, None, None


_xla.defvjp(_xla_fwd, _xla_bwd)
