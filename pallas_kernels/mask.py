"""The APB attention mask as ranges, not as a dense array.

Queries are `[anchor (A) | local (Tl)]` (Tq = A + Tl rows), keys are
`[passing (Pk) | anchor (A) | local (Tl)]` (Tk = Pk + Tq). Split the keys into two
segments and every row's visible keys are two ranges:

  passing segment  keys [0, p_end(r))              p_end(r) = passing_valid if r >= A else 0
  main segment     keys [Pk, Pk + m_end(r))        m_end(r) = r + 1 if (causal or r < A) else Tq

In main-segment coordinates (key j = k - Pk) the anchor rows and the local rows are
plain causal attention (bottom-right aligned: row r sees j <= r), so the causal
offset of the whole mask is Pk. Hosts >= h in the passing block are masked by
`passing_valid` alone because the passing entries are ordered by host: the valid
ones come first, so "hosts < h" is the prefix [0, passing_valid).

In tokamax's single-range form (one range per row plus a causal offset) this is
`k_start(r) = 0 if r >= A else Pk`, `k_end(r) = Pk + m_end(r)`, causal offset Pk,
plus the hole [passing_valid, Pk) when passing_valid < Pk. The optional
`kv_valid [Tk]` is an extra per-key mask (padding, ineligible passing slots) and
is the only part that is data rather than ranges.

`block_table` turns the ranges into block-skipping metadata once, in numpy: for
each q block, which key blocks of each segment are empty (skipped), full (no
per-element mask) or partial (masked). The kernels compute the same numbers from
the program id; tests check both against the dense mask.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class ApbMask:
    """The APB mask of one call: static lengths, `causal` flag."""

    tq: int
    tk: int
    anchor_len: int
    causal: bool = True

    @property
    def pk(self) -> int:
        return self.tk - self.tq

    def m_end(self, rows):
        """Visible main-segment keys [0, m_end) of each row (numpy or jnp ints)."""
        lib = jnp if isinstance(rows, jnp.ndarray) else np
        if self.causal:
            return rows + 1
        return lib.where(rows < self.anchor_len, rows + 1, self.tq)

    def p_end(self, rows, passing_valid):
        """Visible passing keys [0, p_end) of each row."""
        lib = jnp if isinstance(rows, jnp.ndarray) or not isinstance(passing_valid, (int, np.integer)) else np
        return lib.where(rows >= self.anchor_len, passing_valid, 0)

    def k_ranges(self, passing_valid=None):
        """tokamax-style ranges: (k_start [Tq], k_end [Tq], causal_offset, hole).

        hole = (passing_valid, Pk): keys in it are invisible to every row.
        """
        pv = self.pk if passing_valid is None else passing_valid
        rows = np.arange(self.tq)
        k_start = np.where(rows >= self.anchor_len, 0, self.pk)
        k_end = self.pk + self.m_end(rows)
        return k_start, k_end, self.pk, (pv, self.pk)

    def dense(self, passing_valid=None, kv_valid=None):
        """bool [Tq, Tk] (or [batch, Tq, Tk] with a batched kv_valid); for the reference and tests.

        numpy when every input is concrete numpy/int, jnp otherwise (traced passing_valid).
        """
        pv = self.pk if passing_valid is None else passing_valid
        concrete = isinstance(pv, (int, np.integer)) and (kv_valid is None or isinstance(kv_valid, np.ndarray))
        lib = np if concrete else jnp
        rows = lib.arange(self.tq)[:, None]
        keys = lib.arange(self.tk)[None, :]
        j = keys - self.pk
        m_end = rows + 1 if self.causal else lib.where(rows < self.anchor_len, rows + 1, self.tq)
        in_main = (j >= 0) & (j < m_end)
        in_pass = keys < lib.minimum(lib.where(rows >= self.anchor_len, pv, 0), self.pk)
        mask = in_main | in_pass
        if kv_valid is not None:
            mask = mask & lib.asarray(kv_valid, bool)[..., None, :]
        return mask

    def block_table(
        self, block_q: int, block_k: int, passing_valid: int | None = None, has_kv_valid: bool = False
    ) -> np.ndarray:
        """int32 [n_q_blocks, 4]: (p_full, p_hi, m_full, m_hi) key blocks of each q block.

        Passing key blocks [0, p_full) need no mask, [p_full, p_hi) need one, the rest
        are skipped; likewise main-segment blocks (block j covers keys
        Pk + [j*block_k, (j+1)*block_k)).
        """
        pv = self.pk if passing_valid is None else int(passing_valid)
        nqb = cdiv(self.tq, block_q)
        out = np.zeros((nqb, 4), np.int32)
        for qb in range(nqb):
            r0 = qb * block_q
            r1 = min(r0 + block_q, self.tq) - 1  # last real row
            has_local = r1 >= self.anchor_len
            all_local = r0 >= self.anchor_len
            p_hi = cdiv(pv, block_k) if has_local else 0
            p_full = pv // block_k if (all_local and not has_kv_valid) else 0
            m_hi = cdiv(int(self.m_end(np.int64(r1))), block_k)
            m_full = 0 if has_kv_valid else int(self.m_end(np.int64(r0))) // block_k
            out[qb] = (min(p_full, p_hi), p_hi, min(m_full, m_hi), m_hi)
        return out

    def useful_pairs(self, passing_valid: int | None = None) -> int:
        """Number of visible (row, key) pairs, for useful-FLOP counts."""
        pv = self.pk if passing_valid is None else int(passing_valid)
        rows = np.arange(self.tq, dtype=np.int64)
        return int(self.m_end(rows).sum() + np.minimum(self.p_end(rows, pv), self.pk).sum())


def pad_passing(k, v, kv_valid, pk: int, multiple: int):
    """Re-lays keys [passing (pk) | rest] as [passing | zeros | rest] with the passing block
    padded to a multiple of `multiple` rows; k, v: [B, Tk, KVH, D], kv_valid [B, Tk] | None.

    The gap sits past any passing_valid <= pk, so no row sees it. Returns (k, v, kv_valid, pk_pad).
    """
    pk_pad = cdiv(pk, multiple) * multiple
    if pk_pad == pk:
        return k, v, kv_valid, pk
    b = k.shape[0]
    gap = jnp.zeros((b, pk_pad - pk) + k.shape[2:], k.dtype)
    k = jnp.concatenate([k[:, :pk], gap, k[:, pk:]], axis=1)
    v = jnp.concatenate([v[:, :pk], gap, v[:, pk:]], axis=1)
    if kv_valid is not None:
        kv_valid = jnp.concatenate(
            [kv_valid[:, :pk], jnp.zeros((b, pk_pad - pk), kv_valid.dtype), kv_valid[:, pk:]], axis=1
        )
    return k, v, kv_valid, pk_pad
