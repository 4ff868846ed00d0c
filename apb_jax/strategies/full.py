"""Full attention on one device: every layer attends causally over the whole sequence (the baseline)."""

from __future__ import annotations

from apb_jax.models.llama import AttentionFn, AttnCall
from apb_jax.strategies.base import HostCtx, Strategy, kernel_call

NAME = "full"


def causal_attention(call: AttnCall, backend: str | None = None):
    """q [B, T, H, D], k/v [B, T, KVH, D] -> [B, T, H, D] (q.dtype), GQA without repeating K/V, through the
    attention dispatcher (which picks the fastest backend for the device, or `backend`)."""
    out, _ = kernel_call(call.q, call.k, call.v, anchor_len=0, backend=backend, return_lse=False)
    return out


class Full(Strategy):
    name = NAME
    summary = "full causal attention on one device (the baseline)"
    exact = True
    single_device = True

    def attention(self, ctx: HostCtx) -> AttentionFn:
        return lambda call: causal_attention(call, ctx.kernel_backend)


STRATEGY = Full()
