"""Rotary position embeddings with explicit position ids (HF `rotate_half` convention).

Supports rope types default, linear, dynamic (NTK, given the total sequence length) and llama3.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from apb_jax.config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int, seq_len: int | None = None) -> np.ndarray:
    """float32 [head_dim // 2] inverse frequencies after the rope type's scaling.

    `seq_len` matters only for "dynamic": the NTK base grows once the sequence outruns the trained length.
    """
    theta = rope.theta
    if rope.rope_type == "dynamic" and seq_len is not None:
        max_pos = rope.original_max_position_embeddings or seq_len
        if seq_len > max_pos:
            theta = theta * ((rope.factor * seq_len / max_pos) - (rope.factor - 1)) ** (head_dim / (head_dim - 2))
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.rope_type == "linear":
        inv = inv / rope.factor
    elif rope.rope_type == "llama3":
        old_ctx = rope.original_max_position_embeddings
        low_wavelen = old_ctx / rope.low_freq_factor
        high_wavelen = old_ctx / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: jnp.ndarray) -> jnp.ndarray:
    """Rotate x: [B, T, heads, D] by positions: [B, T] (int); computed in float32, returned in x.dtype."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
