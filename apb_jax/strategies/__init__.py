"""Ways of running attention across the mesh; one file each, one signature: `attention(ctx) -> AttentionFn`."""

from apb_jax.strategies import apb, full, ring, star

REGISTRY = {"full": full.attention, "ring": ring.attention, "star": star.attention, "apb": apb.attention}

__all__ = ["REGISTRY"]
