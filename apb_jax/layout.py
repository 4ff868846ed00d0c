"""The static shape of one sequence-parallel prefill: which document positions each host runs, in which rows.

A prefill over H hosts works on per-host rows `[anchor (A) | local block (B)]` (A = 0 for strategies without an
anchor).  The global token array is `[batch, H * (A + B)]`, sharded over mesh axis "sp" along the sequence: host h
owns columns `[h * (A + B), (h + 1) * (A + B))`.  Which document positions make up host h's local block is the
layout's `block_positions()` table: contiguous blocks `[h*B, (h+1)*B)` by default, or two half-blocks
`h` and `2H-1-h` (the zigzag order that balances causal work).  Positions past the document are padding: their
token is the pad id, and no real token ever sees them (they come after every real token).

Everything here is numpy and static; a strategy builds its `Layout` (`apb_jax.strategies`), the engine turns it
into per-host token and position ids with `host_rows`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static shape of one sequence-parallel prefill.

    hosts H; doc_len L (real tokens); block B (local rows per host, H * B >= L); anchor A (rows before the local
    block on every host; host 0's anchor rows exist for uniform shapes but are masked as keys); passing P
    (compressed entries each host sends); q_insert: document tokens kept before the query inside the anchor;
    query_in_anchor: whether the anchor holds the query (APB) or is the plain document start (Star);
    zigzag: the local block is the two half-blocks h and 2H-1-h of the document instead of block h.
    """

    strategy: str
    hosts: int
    doc_len: int
    query_len: int
    block: int
    anchor: int = 0
    passing: int = 0
    q_insert: int = 0
    query_in_anchor: bool = False
    zigzag: bool = False

    def __post_init__(self):
        if self.zigzag and self.block % 2:
            raise ValueError(f"a zigzag layout needs an even block length; got block={self.block}")
        if self.hosts * self.block < self.doc_len:
            raise ValueError(f"hosts={self.hosts} x block={self.block} cannot hold doc_len={self.doc_len}")

    @property
    def rows(self) -> int:
        """Rows each host runs: anchor + local block."""
        return self.anchor + self.block

    @property
    def padded_len(self) -> int:
        return self.hosts * self.block

    def block_positions(self) -> np.ndarray:
        """int32 [H, B]: the document position of every local-block slot (>= doc_len: padding)."""
        return _block_positions(self.hosts, self.block, self.zigzag)

    def local_positions(self, host) -> jnp.ndarray:
        """int32 [B]: the document position of each local slot of `host` (a traced index is fine), -1 for
        padding."""
        table = self.block_positions()
        table = np.where(table < self.doc_len, table, -1).astype(np.int32)
        return jnp.asarray(table)[host]

    def eligible_count(self, host: int) -> int:
        """How many local positions of `host` compression may select (real tokens, not the first A of the doc)."""
        pos = self.block_positions()[host]
        return int(np.sum((pos < self.doc_len) & (pos >= self.anchor)))


@functools.lru_cache(maxsize=64)
def _block_positions(hosts: int, block: int, zigzag: bool) -> np.ndarray:
    if not zigzag:
        table = np.arange(hosts * block, dtype=np.int32).reshape(hosts, block)
    else:
        half = block // 2
        chunks = np.arange(2 * hosts * half, dtype=np.int32).reshape(2 * hosts, half)
        table = np.stack([np.concatenate([chunks[h], chunks[2 * hosts - 1 - h]]) for h in range(hosts)])
    table.flags.writeable = False
    return table


def block_len(doc_len: int, hosts: int, multiple: int = 1) -> int:
    """The smallest block length B with hosts * B >= doc_len and B a multiple of `multiple`."""
    return math.ceil(doc_len / (hosts * multiple)) * multiple


def host_rows(layout: Layout, doc: np.ndarray, query: np.ndarray, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-host token ids and position ids, concatenated over hosts: both int32 [batch, H * (A + B)].

    doc [batch, L], query [batch, Q].  Anchor = doc[:q_insert] ++ query ++ doc[q_insert : A - Q] when the layout
    puts the query in the anchor (positions 0..A-1), else doc[:A]; local block h = the document at
    `block_positions()[h]` with those positions (padding past L takes `pad_id`).
    """
    bsz = doc.shape[0]
    a, b, h = layout.anchor, layout.block, layout.hosts
    padded = np.full((bsz, layout.padded_len), pad_id, np.int32)
    padded[:, : layout.doc_len] = doc
    table = layout.block_positions()
    tokens = np.empty((bsz, h, a + b), np.int32)
    pos = np.empty((bsz, h, a + b), np.int32)
    if a:
        if layout.query_in_anchor:
            qi = layout.q_insert
            anchor = np.concatenate([doc[:, :qi], query, doc[:, qi : a - query.shape[1]]], axis=1)
        else:
            anchor = doc[:, :a]
        if anchor.shape[1] != a:
            raise ValueError(f"the anchor holds {anchor.shape[1]} tokens, the layout asks for {a}")
        tokens[:, :, :a] = anchor[:, None]
        pos[:, :, :a] = np.arange(a)
    tokens[:, :, a:] = padded[:, table]
    pos[:, :, a:] = table[None]
    return tokens.reshape(bsz, -1), pos.reshape(bsz, -1)


def local_rows_to_document(layout: Layout, x: np.ndarray) -> np.ndarray:
    """Per-host local rows [batch, H * B, ...] (host-major, as the engine returns them) -> [batch, L, ...] in
    document order (padding dropped)."""
    order = layout.block_positions().reshape(-1)
    out = np.empty((x.shape[0], layout.padded_len, *x.shape[2:]), x.dtype)
    out[:, order] = x
    return out[:, : layout.doc_len]
