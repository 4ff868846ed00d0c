"""RULER-style synthetic long-context tasks in the task language of `apb_jax.tokenizer`.

Every example is `(document, query, answer)` as int32 token ids (text on demand):

    document  <s> SYS : read the text and remember every KEY , VAR and PASSKEY . TXT   (16 tokens,
              SYSTEM_PREFIX; APB's default q_insert=16 puts the query right after it)
              then filler sentences (`bako temu ... .`) with the needle statements inside,
              exactly `length` tokens in all.
    query     ends where the model starts answering (with `ANS`; for multikey with the
              needle's own words up to its value; for deferred binding with `IS`).
    answer    the exact continuation, ending with `</s>`.

Tasks (needle statement / query / answer):

    passkey            PASSKEY IS 7 1 4 3 2 .       QRY PASSKEY ANS           7 1 4 3 2 </s>
    multikey_niah      KEY apple river 3 0 9 1 7 .  (num_keys pairs, one asked)
                                                    QRY KEY apple river       3 0 9 1 7 </s>
    variable_tracking  VAR EJ = 3 1 4 1 5 .  VAR NC = VAR EJ .  VAR WA = VAR NC . ...
                                                    QRY VAR = 3 1 4 1 5 ANS   EJ NC WA </s>
                       (num_chains chains of num_hops copies; the answer lists every variable
                       equal to the value in the order they are assigned in the document)
    deferred_binding   KEY apple river = VAR QX .  ...  VAR QX IS 4 8 2 1 3 .
                                                    QRY KEY apple river IS    4 8 2 1 3 </s>
                       (num_records records over num_handles handles; see below)

Values are 5-digit numbers (10000..99999, one token per digit), distinct within a document;
key pairs are distinct ordered pairs of two different key words; variable names are distinct.
Filler words, key words, variable names and keywords are disjoint, so a statement is never
confused with filler.

A multikey query repeats its needle up to the value, as RULER's queries end with the start of
the needle's sentence: the answer is the continuation of `KEY apple river` wherever the document
has it, the lookup an induction head does. Two earlier layouts ended the query with `ANS`
(`KEY apple river IS 3 0 9 1 7 .` and `KEY 3 0 9 1 7 IS apple river .`); the model never learned
either: the first digit stayed at chance (training/results/multikey_probes.json), while this layout
went from chance to 99% within 300 fine-tuning steps.

Depth: the queried needle (for variable tracking, the chain's first statement; for deferred
binding, the record's open statement) is preceded by `round(depth * F)` of the document's F
filler tokens; `depth=None` draws it uniformly. Other needles go to uniform random depths; a
chain's later statements to sorted uniform depths after its first one.

Deferred binding is the task whose answer must be bound while the document is prefilled,
across host blocks. A record is opened by `KEY k1 k2 = VAR X .` on a handle X (a variable
name) and gets its value later, with no repeat of the key, from `VAR X IS d1..d5 .`. The value
statement belongs to the most recent open statement of its handle. Handles are reused: each
names at least two records, which alternate open, value, open, value in document order, while
the records of different handles interleave. Two handles, six records (the defaults), e.g.

    KEY apple river = VAR QX .   KEY lemon tiger = VAR BK .   VAR QX IS 4 8 2 1 3 .
    KEY jade coral = VAR QX .    VAR BK IS 7 0 2 6 5 .        VAR QX IS 1 9 9 3 0 .  ...

binds apple river -> 48213, lemon tiger -> 70265, jade coral -> 19930. Neither a handle (it
names several records, with different values) nor the nearest open statement before a value
(often another handle's) identifies the record: only the rule does, and it needs the order of
the statements. The question `QRY KEY apple river IS` names the key; the answer is its value.

Why it separates the strategies: at decode time the query attends every host's cache exactly,
in every strategy, but the value statement's K/V were computed at prefill. Its tokens know
their key only if, then, they attended to the open statement. Under Star Attention a host sees
the first block (its anchor) and its own block; when the open statement sits in a later block
than the first and the value statement in a later block still ("cross_host", hosts >= 3), the
value's rows cannot see the key, and the query finds no value bound to it. Full and ring
attention see it; APB sees it when its passing blocks carry the open statement.
`deferred_binding(..., split=, hosts=)` places the asked record "same_host", "key_in_anchor"
or "cross_host" for a host count, and `host_split(example, hosts)` reports where any example's
record falls, so an accuracy run can report the two cases apart.

`sample_batch` packs several needles and as many queries into each training sequence (dense
supervision) and returns `tokens` with a `loss_mask` over the answers.
`score`/`accuracy` are exact match.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from apb_jax.tokenizer import (
    BOS_ID,
    EOS_ID,
    FILLER_WORDS,
    KEY_WORDS,
    PAD_ID,
    VAR_NAMES,
    ids_to_text,
    text_to_ids,
    token_id,
)

TASKS: tuple[str, ...] = ("passkey", "multikey_niah", "variable_tracking", "deferred_binding")
DEFERRED_SPLITS: tuple[str, ...] = ("same_host", "key_in_anchor", "cross_host")
SYSTEM_PREFIX: tuple[str, ...] = (
    "<s>",
    "SYS",
    ":",
    "read",
    "the",
    "text",
    "and",
    "remember",
    "every",
    "KEY",
    ",",
    "VAR",
    "and",
    "PASSKEY",
    ".",
    "TXT",
)
PREFIX_IDS = np.array([token_id(w) for w in SYSTEM_PREFIX], np.int32)
PREFIX_LEN = len(SYSTEM_PREFIX)  # 16 == APB's default q_insert
VALUE_DIGITS = 5
SENTENCE_LEN = (6, 13)  # filler sentence length in tokens, including its '.'

_DOT, _EQ = token_id("."), token_id("=")
_OPEN_LEN, _VALUE_LEN = 7, 9  # deferred_binding: KEY k1 k2 = VAR X .  /  VAR X IS d1..d5 .
_DEFERRED_RECORD_TOKENS = _OPEN_LEN + _VALUE_LEN + 5 + 6  # the two statements, QRY KEY k1 k2 IS, d1..d5 </s>
_KEY, _IS, _QRY, _ANS = token_id("KEY"), token_id("IS"), token_id("QRY"), token_id("ANS")
_VAR, _PASSKEY = token_id("VAR"), token_id("PASSKEY")
_DIGIT_IDS = np.array([token_id(str(d)) for d in range(10)], np.int32)
_FILLER_IDS = np.array([token_id(w) for w in FILLER_WORDS], np.int32)
_KEY_IDS = np.array([token_id(w) for w in KEY_WORDS], np.int32)
_VAR_IDS = np.array([token_id(w) for w in VAR_NAMES], np.int32)
_NUM_KEY_PAIRS = len(KEY_WORDS) * (len(KEY_WORDS) - 1)


def _ro(x) -> np.ndarray:
    a = np.asarray(x, np.int32).copy()
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class Example:
    """One task instance. Arrays are read-only int32 token ids.

    document: [length], starts with SYSTEM_PREFIX (so `<s>` first).
    query: [q_len], ends where the answer starts (with `ANS`; multikey: `QRY KEY k1 k2`;
        deferred binding: `QRY KEY k1 k2 IS`).
    answer: [a_len], the exact expected continuation, ending with `</s>`.
    needle_positions: start index in `document` of each statement of the queried needle
        (one for passkey/multikey; the chain's statements in order for variable tracking;
        the record's open then value statement for deferred binding).
    depth: the depth the queried needle was placed at, in [0, 1].
    """

    task: str
    document: np.ndarray
    query: np.ndarray
    answer: np.ndarray
    needle_positions: tuple[int, ...]
    depth: float

    @property
    def prompt(self) -> np.ndarray:
        """document ++ query: [length + q_len] int32, what a full-attention model reads."""
        return np.concatenate([self.document, self.query])

    @property
    def document_text(self) -> str:
        return ids_to_text(self.document)

    @property
    def query_text(self) -> str:
        return ids_to_text(self.query)

    @property
    def answer_text(self) -> str:
        return ids_to_text(self.answer)


@dataclass(frozen=True, eq=False)
class _Item:
    """A needle: its statements (chain order), its query and its answer (int32 arrays)."""

    statements: tuple[np.ndarray, ...]
    query: np.ndarray
    answer: np.ndarray

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.statements) + len(self.query) + len(self.answer)


def _check_depth(depth: float | None) -> None:
    if depth is not None and not (0.0 <= depth <= 1.0):
        raise ValueError(f"depth={depth} must be in [0, 1] (or None for a random depth)")


def _values(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct 5-digit values as digit token ids: [n, VALUE_DIGITS] int32."""
    nums = rng.choice(9 * 10 ** (VALUE_DIGITS - 1), size=n, replace=False) + 10 ** (VALUE_DIGITS - 1)
    digits = (nums[:, None] // 10 ** np.arange(VALUE_DIGITS - 1, -1, -1)) % 10
    return _DIGIT_IDS[digits]


def _passkey_items(rng: np.random.Generator, n: int) -> list[_Item]:
    if n != 1:
        raise ValueError(f"passkey has exactly one needle, got {n}")
    value = _values(rng, 1)[0]
    needle = np.concatenate([[_PASSKEY, _IS], value, [_DOT]]).astype(np.int32)
    query = np.array([_QRY, _PASSKEY, _ANS], np.int32)
    return [_Item((needle,), query, np.append(value, EOS_ID).astype(np.int32))]


def _key_pairs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n distinct ordered pairs of two different key words: (first ids [n], second ids [n])."""
    pairs = rng.choice(_NUM_KEY_PAIRS, size=n, replace=False)
    first = pairs // (len(KEY_WORDS) - 1)
    second = pairs % (len(KEY_WORDS) - 1)
    second = second + (second >= first)  # skip k1 == k2
    return _KEY_IDS[first], _KEY_IDS[second]


def _multikey_items(rng: np.random.Generator, n: int) -> list[_Item]:
    if not 1 <= n <= _NUM_KEY_PAIRS:
        raise ValueError(f"num_keys={n} must be in [1, {_NUM_KEY_PAIRS}]")
    first, second = _key_pairs(rng, n)
    values = _values(rng, n)
    items = []
    for a, b, value in zip(first, second, values):
        needle = np.concatenate([[_KEY, a, b], value, [_DOT]]).astype(np.int32)
        query = np.array([_QRY, _KEY, a, b], np.int32)
        items.append(_Item((needle,), query, np.append(value, EOS_ID).astype(np.int32)))
    return items


def _vt_items(rng: np.random.Generator, hops: Sequence[int]) -> list[_Item]:
    """One chain per entry of `hops` (its number of copy statements)."""
    total_vars = sum(h + 1 for h in hops)
    if total_vars > len(VAR_NAMES):
        raise ValueError(
            f"variable tracking needs {total_vars} variables (chains x (num_hops + 1)), at most {len(VAR_NAMES)} exist"
        )
    names = _VAR_IDS[rng.choice(len(VAR_NAMES), size=total_vars, replace=False)]
    values = _values(rng, len(hops))
    items, k = [], 0
    for h, value in zip(hops, values):
        chain = names[k : k + h + 1]
        k += h + 1
        statements = [np.concatenate([[_VAR, chain[0], _EQ], value, [_DOT]]).astype(np.int32)]
        for prev, cur in itertools.pairwise(chain):
            statements.append(np.array([_VAR, cur, _EQ, _VAR, prev, _DOT], np.int32))
        query = np.concatenate([[_QRY, _VAR, _EQ], value, [_ANS]]).astype(np.int32)
        items.append(_Item(tuple(statements), query, np.append(chain, EOS_ID).astype(np.int32)))
    return items


def _statement_depths(rng: np.random.Generator, item: _Item, first: float) -> list[float]:
    """The first statement at `first`, the rest at sorted uniform depths in [first, 1]."""
    rest = np.sort(rng.uniform(first, 1.0, size=len(item.statements) - 1))
    return [first, *map(float, rest)]


def _filler(rng: np.random.Generator, n: int) -> np.ndarray:
    """n filler tokens: random filler words in sentences closed by '.': [n] int32."""
    words = _FILLER_IDS[rng.integers(0, len(_FILLER_IDS), size=n)]
    lens = rng.integers(SENTENCE_LEN[0], SENTENCE_LEN[1] + 1, size=n // SENTENCE_LEN[0] + 1)
    ends = np.cumsum(lens) - 1
    words[ends[ends < n]] = _DOT
    return words


def _filler_count(length: int, statements: Sequence[np.ndarray]) -> int:
    """F, the filler tokens of a `length`-token document holding `statements` (ValueError if < 0)."""
    n_stmt = sum(len(s) for s in statements)
    if length - PREFIX_LEN - n_stmt < 0:
        raise ValueError(
            f"length={length} is too short: needs at least {PREFIX_LEN + n_stmt} tokens "
            f"(prefix {PREFIX_LEN} + needle statements {n_stmt})"
        )
    return length - PREFIX_LEN - n_stmt


def _assemble(
    rng: np.random.Generator,
    length: int,
    statements: Sequence[np.ndarray],
    depths: Sequence[float] | None = None,
    *,
    offsets: Sequence[int] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """SYSTEM_PREFIX + filler with `statements` inserted; exactly `length` tokens.

    Statement i is preceded by offsets[i] of the F filler tokens (or round(depths[i] * F));
    ties keep input order. Returns (document [length] int32, start index of each statement,
    input order).
    """
    n_filler = _filler_count(length, statements)
    filler = _filler(rng, n_filler)
    if offsets is None:
        offsets = [int(np.floor(d * n_filler + 0.5)) for d in depths]
    order = sorted(range(len(statements)), key=lambda i: (offsets[i], i))
    pieces, positions = [PREFIX_IDS], [0] * len(statements)
    prev, cursor = 0, PREFIX_LEN
    for i in order:
        pieces.append(filler[prev : offsets[i]])
        cursor += offsets[i] - prev
        prev = offsets[i]
        positions[i] = cursor
        pieces.append(statements[i])
        cursor += len(statements[i])
    pieces.append(filler[prev:])
    doc = np.concatenate(pieces).astype(np.int32)
    assert len(doc) == length
    return doc, positions


def _example(task: str, rng: np.random.Generator, length: int, depth: float | None, items: list[_Item]) -> Example:
    """items[0] is the queried needle, placed at `depth`; the others at random depths."""
    _check_depth(depth)
    depth = float(rng.uniform()) if depth is None else float(depth)
    statements, depths = [], []
    for i, item in enumerate(items):
        first = depth if i == 0 else float(rng.uniform())
        statements += item.statements
        depths += _statement_depths(rng, item, first)
    doc, positions = _assemble(rng, length, statements, depths)
    target = items[0]
    return Example(
        task=task,
        document=_ro(doc),
        query=_ro(target.query),
        answer=_ro(target.answer),
        needle_positions=tuple(positions[: len(target.statements)]),
        depth=depth,
    )


def passkey(rng: np.random.Generator, length: int, depth: float | None = None) -> Example:
    """A 5-digit passkey hidden in `length` tokens of filler, asked at the end.

    length: document tokens (exact), >= PREFIX_LEN + 8. depth: in [0, 1], None = random.
    """
    return _example("passkey", rng, length, depth, _passkey_items(rng, 1))


def multikey_niah(rng: np.random.Generator, length: int, depth: float | None = None, num_keys: int = 4) -> Example:
    """`num_keys` needles `KEY k1 k2 d1..d5 .`; the one at `depth` is asked (`QRY KEY k1 k2`).

    length: document tokens (exact), >= PREFIX_LEN + 9 * num_keys. num_keys: in [1, 1560].
    """
    return _example("multikey_niah", rng, length, depth, _multikey_items(rng, num_keys))


def variable_tracking(
    rng: np.random.Generator,
    length: int,
    depth: float | None = None,
    num_chains: int = 2,
    num_hops: int = 4,
) -> Example:
    """`num_chains` assignment chains of `num_hops` copies each; the variables of one are asked.

    The asked chain's first statement (`VAR X = d1..d5 .`) sits at `depth`, its copies
    (`VAR Y = VAR X .`) later. Answer: its num_hops + 1 names in chain order, then `</s>`.
    num_chains >= 1, num_hops >= 1, num_chains * (num_hops + 1) <= 64.
    length: document tokens (exact), >= PREFIX_LEN + num_chains * (9 + 6 * num_hops).
    """
    if num_chains < 1:
        raise ValueError(f"num_chains={num_chains} must be >= 1")
    if num_hops < 1:
        raise ValueError(f"num_hops={num_hops} must be >= 1")
    return _example("variable_tracking", rng, length, depth, _vt_items(rng, [num_hops] * num_chains))


def _deferred_items(rng: np.random.Generator, n: int, num_handles: int) -> tuple[list[_Item], np.ndarray]:
    """n records shared out evenly over `num_handles` handles (distinct variable names).

    Returns (items, slots): item i has statements (open, value) = (`KEY k1 k2 = VAR X .`,
    `VAR X IS d1..d5 .`), query `QRY KEY k1 k2 IS`, answer `d1..d5 </s>`; slots [n] int is
    the handle index of each record.
    """
    first, second = _key_pairs(rng, n)
    values = _values(rng, n)
    names = _VAR_IDS[rng.choice(len(VAR_NAMES), size=num_handles, replace=False)]
    slots = rng.permutation(np.arange(n) % num_handles)
    items = []
    for a, b, value, slot in zip(first, second, values, slots):
        opening = np.array([_KEY, a, b, _EQ, _VAR, names[slot], _DOT], np.int32)
        binding = np.concatenate([[_VAR, names[slot], _IS], value, [_DOT]]).astype(np.int32)
        query = np.array([_QRY, _KEY, a, b, _IS], np.int32)
        assert len(opening) == _OPEN_LEN and len(binding) == _VALUE_LEN
        items.append(_Item((opening, binding), query, np.append(value, EOS_ID).astype(np.int32)))
    return items, slots


def _deferred_offsets(
    rng: np.random.Generator, slots: np.ndarray, n_filler: int, fixed: tuple[int, int] | None
) -> tuple[list[tuple[int, int]], list[int]]:
    """Filler offsets of every record's open and value statements, alternating per handle.

    The records of one handle come in a random order as open, value, open, value, ... at sorted
    uniform offsets in [0, n_filler]. fixed: (open, value) offsets of record 0; the other records
    of its handle go before its open or after its value. Returns (refs, offsets): refs are
    (record, 0 for open | 1 for value) in input order, which within a handle is document order,
    so `_assemble`'s stable sort keeps the alternation at equal offsets.
    """
    refs: list[tuple[int, int]] = []
    offsets: list[int] = []
    for slot in range(int(slots.max()) + 1):
        recs = [int(i) for i in rng.permutation(np.flatnonzero(slots == slot))]
        if fixed is not None and 0 in recs:
            recs.remove(0)
            before = int(rng.integers(0, len(recs) + 1))
            o_open, o_value = fixed
            offs = np.concatenate(
                [
                    np.sort(rng.integers(0, o_open + 1, size=2 * before)),
                    [o_open, o_value],
                    np.sort(rng.integers(o_value, n_filler + 1, size=2 * (len(recs) - before))),
                ]
            )
            recs.insert(before, 0)
        else:
            offs = np.sort(rng.integers(0, n_filler + 1, size=2 * len(recs)))
        for j, r in enumerate(recs):
            refs += [(r, 0), (r, 1)]
            offsets += [int(offs[2 * j]), int(offs[2 * j + 1])]
    return refs, offsets


def _split_offsets(
    rng: np.random.Generator, split: str, hosts: int, length: int, n_filler: int, n_stmt: int
) -> tuple[int, int]:
    """Filler offsets (open, value) of the asked record that put its open statement wholly in
    one host block and its value statement wholly in one block as `split` asks, however many
    of the n_stmt statement tokens end up before them."""
    block = -(-length // hosts)
    if split == "same_host":
        pairs = [(h, h) for h in range(hosts)]
    elif split == "key_in_anchor":
        pairs = [(0, h) for h in range(1, hosts)]
    else:
        pairs = [(k, v) for k in range(1, hosts) for v in range(k + 1, hosts)]

    def span(blk: int, least_before: int, most_before: int, size: int) -> tuple[int, int]:
        lo = max(0, blk * block - PREFIX_LEN - least_before)
        hi = min(n_filler, min((blk + 1) * block, length) - PREFIX_LEN - size - most_before)
        return lo, hi

    feasible = []
    for kb, vb in pairs:
        lo_k, hi_k = span(kb, 0, n_stmt - _OPEN_LEN - _VALUE_LEN, _OPEN_LEN)
        lo_v, hi_v = span(vb, _OPEN_LEN, n_stmt - _VALUE_LEN, _VALUE_LEN)
        hi_k = min(hi_k, hi_v)  # the value never precedes its open
        if lo_k <= hi_k and lo_v <= hi_v:
            feasible.append((lo_k, hi_k, lo_v, hi_v))
    if not feasible:
        raise ValueError(
            f"length={length} over hosts={hosts} (blocks of {block} tokens) is too short for split={split!r}: "
            f"the asked record's statements must fit inside its blocks next to up to {n_stmt} statement tokens; "
            f"use a longer length, fewer hosts or fewer num_records"
        )
    lo_k, hi_k, lo_v, hi_v = feasible[int(rng.integers(0, len(feasible)))]
    o_open = int(rng.integers(lo_k, hi_k + 1))
    return o_open, int(rng.integers(max(o_open, lo_v), hi_v + 1))


def deferred_binding(
    rng: np.random.Generator,
    length: int,
    depth: float | None = None,
    num_records: int = 6,
    num_handles: int = 2,
    split: str | None = None,
    hosts: int | None = None,
) -> Example:
    """`num_records` records over `num_handles` reused handles; the key of record 0 is asked.

    A record is opened by `KEY k1 k2 = VAR X .` and gets its value later from `VAR X IS
    d1..d5 .`, which binds to the most recent open statement of handle X (see the module
    docstring). Query `QRY KEY k1 k2 IS`, answer `d1..d5 </s>`. needle_positions = (start of
    the asked record's open statement, start of its value statement).

    depth: where the asked open statement sits (fraction of the filler before it), None =
        random; its value goes to a uniform depth after it. Not with `split`.
    split: None, or one of DEFERRED_SPLITS to place the asked record for `hosts` host blocks
        of ceil(length / hosts) tokens (`host_split` reports it): "same_host" (hosts >= 1),
        "key_in_anchor" (hosts >= 2), "cross_host" (hosts >= 3).
    num_handles >= 1, 2 * num_handles <= num_records <= 1560 (every handle names at least two
    records, so a handle alone never identifies one). length: document tokens (exact), >=
    PREFIX_LEN + 16 * num_records, more with `split` (each block must hold the statements).
    """
    _check_depth(depth)
    if not 1 <= num_handles <= len(VAR_NAMES):
        raise ValueError(f"num_handles={num_handles} must be in [1, {len(VAR_NAMES)}]")
    if not 2 * num_handles <= num_records <= _NUM_KEY_PAIRS:
        raise ValueError(
            f"num_records={num_records} must be in [2 * num_handles, {_NUM_KEY_PAIRS}] = "
            f"[{2 * num_handles}, {_NUM_KEY_PAIRS}]: every handle must name at least two records"
        )
    if split is None:
        if hosts is not None:
            raise ValueError(f"hosts={hosts} is only used with split; pass split= too, or leave hosts None")
    else:
        if split not in DEFERRED_SPLITS:
            raise ValueError(f"split={split!r} must be None or one of {DEFERRED_SPLITS}")
        if depth is not None:
            raise ValueError(f"depth={depth} and split={split!r} cannot both be set: split places the asked record")
        least = {"same_host": 1, "key_in_anchor": 2, "cross_host": 3}[split]
        if hosts is None or hosts < least:
            raise ValueError(
                f"split={split!r} needs hosts >= {least}, got hosts={hosts}"
                + (" (with 2 hosts, block 0 is Star's anchor and there is no later block)" if least == 3 else "")
            )
    items, slots = _deferred_items(rng, num_records, num_handles)
    statements = [s for it in items for s in it.statements]
    n_filler = _filler_count(length, statements)
    if split is None:
        depth = float(rng.uniform()) if depth is None else float(depth)
        o_open = int(np.floor(depth * n_filler + 0.5))
        o_value = int(rng.integers(o_open, n_filler + 1))
    else:
        o_open, o_value = _split_offsets(rng, split, hosts, length, n_filler, sum(map(len, statements)))
        depth = o_open / n_filler if n_filler else 0.0
    refs, offsets = _deferred_offsets(rng, slots, n_filler, (o_open, o_value))
    doc, positions = _assemble(rng, length, [items[r].statements[k] for r, k in refs], offsets=offsets)
    where = dict(zip(refs, positions))
    return Example(
        task="deferred_binding",
        document=_ro(doc),
        query=_ro(items[0].query),
        answer=_ro(items[0].answer),
        needle_positions=(where[(0, 0)], where[(0, 1)]),
        depth=depth,
    )


def host_split(example: Example, hosts: int) -> str:
    """Where a deferred_binding example's asked record falls for `hosts` host blocks.

    The document of L tokens is split into `hosts` contiguous blocks of ceil(L / hosts) tokens
    (`parallel.make_layout`); block 0 is also every host's anchor in Star Attention. Returns
        "same_host"      the open and value statements lie inside one block: every strategy's
                         value rows attend to the key at prefill;
        "key_in_anchor"  the open statement inside block 0, the value statement in later
                         blocks: Star's anchor holds the key (APB's anchor, L/32 by default,
                         may not);
        "cross_host"     the open statement inside blocks 1.., the value statement wholly in
                         later blocks: Star's value rows cannot see the key, only full, ring
                         and APB (if its passing blocks carry the key) can;
        "mixed"          anything else (a statement straddles the first block's end or the
                         block boundary between them); `deferred_binding(split=...)` never
                         makes it.
    """
    if example.task != "deferred_binding":
        raise ValueError(f"host_split reads deferred_binding examples, got task={example.task!r}")
    return record_split(len(example.document), example.needle_positions, hosts)


def record_split(doc_len: int, needle_positions: Sequence[int], hosts: int) -> str:
    """`host_split` from a deferred_binding example's document length and needle positions (the open and
    value statements' starts), as an accuracy run stores them."""
    if hosts < 1:
        raise ValueError(f"hosts={hosts} must be >= 1")
    block = -(-doc_len // hosts)
    k, v = (int(x) for x in needle_positions)
    kb = {k // block, (k + _OPEN_LEN - 1) // block}
    vb = {v // block, (v + _VALUE_LEN - 1) // block}
    if len(kb | vb) == 1:
        return "same_host"
    if max(kb) < min(vb):
        if max(kb) == 0:
            return "key_in_anchor"
        if min(kb) >= 1:
            return "cross_host"
    return "mixed"


_GENERATORS = {
    "passkey": passkey,
    "multikey_niah": multikey_niah,
    "variable_tracking": variable_tracking,
    "deferred_binding": deferred_binding,
}


def _check_task(task: str) -> None:
    if task not in _GENERATORS:
        raise ValueError(f"task={task!r} is not one of {TASKS}")


def generate(task: str, rng: np.random.Generator, length: int, depth: float | None = None, **kwargs) -> Example:
    """One example of `task` (one of TASKS); kwargs go to the task's generator."""
    _check_task(task)
    return _GENERATORS[task](rng, length, depth, **kwargs)


def make_examples(task: str, seed: int, num: int, length: int, depth: float | None = None, **kwargs) -> list[Example]:
    """`num` examples; example i uses `np.random.default_rng([seed, i])`, so it does not
    depend on `num`. depth=None draws each example's depth uniformly."""
    _check_task(task)
    if num < 0:
        raise ValueError(f"num={num} must be >= 0")
    return [generate(task, np.random.default_rng([seed, i]), length, depth, **kwargs) for i in range(num)]


class Batch(NamedTuple):
    """A training batch.

    tokens: [batch, length] int32. Each row: document (prefix, filler, needles) then, for each
        needle in random order, its query and answer (`QRY ... ANS d1..d5 </s>`).
    loss_mask: [batch, length] float32, 1.0 where tokens[b, t] is an answer token (digits or
        names and the closing `</s>`); predict tokens[b, t] from position t - 1, i.e. use
        loss_mask[:, 1:] with targets tokens[:, 1:] and logits from [:, :-1].
    task_ids: [batch] int32 index into TASKS.
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    task_ids: np.ndarray


def _task_weights(task_mix: str | Sequence[str] | Mapping[str, float]) -> np.ndarray:
    if isinstance(task_mix, str):
        task_mix = {task_mix: 1.0}
    elif not isinstance(task_mix, Mapping):
        task_mix = dict.fromkeys(task_mix, 1.0)
    for t, w in task_mix.items():
        _check_task(t)
        if not w >= 0:
            raise ValueError(f"task_mix[{t!r}]={w} must be >= 0")
    w = np.array([float(task_mix.get(t, 0.0)) for t in TASKS])
    if w.sum() <= 0:
        raise ValueError(f"task_mix={task_mix!r} must give a positive weight to one of {TASKS}")
    return w / w.sum()


def _too_short(length: int, task: str, what: str, cost: int, budget: int) -> ValueError:
    return ValueError(
        f"length={length} is too short for {task}: {what} with its query and answer "
        f"takes {cost} tokens, at most (length - {PREFIX_LEN}) // 2 = {budget} allowed; "
        f"use length >= {PREFIX_LEN + 2 * cost}"
    )


def _needle_row(
    rng: np.random.Generator, task: str, n: int, length: int, budget: int, max_hops: int
) -> tuple[np.ndarray, list[_Item]]:
    """A passkey / multikey / variable tracking row: (document, the items asked in order)."""
    if task == "passkey":
        items = _passkey_items(rng, 1)
    elif task == "multikey_niah":
        items = _multikey_items(rng, n)
    else:
        items = _vt_items(rng, [int(h) for h in rng.integers(1, max_hops + 1, size=n)])
    while len(items) > 1 and sum(it.num_tokens for it in items) > budget:
        items.pop()
    if items[0].num_tokens > budget:
        raise _too_short(length, task, "one needle", items[0].num_tokens, budget)
    statements, depths = [], []
    for item in items:
        statements += item.statements
        depths += _statement_depths(rng, item, float(rng.uniform()))
    if task == "multikey_niah":  # as many queries as needles, drawn with replacement
        asked = [items[i] for i in rng.integers(0, len(items), size=len(items))]
    else:
        asked = [items[i] for i in rng.permutation(len(items))]
    qa_len = sum(len(it.query) + len(it.answer) for it in asked)
    doc, _ = _assemble(rng, length - qa_len, statements, depths)
    return doc, asked


def _deferred_row(rng: np.random.Generator, n: int, length: int, budget: int) -> tuple[np.ndarray, list[_Item]]:
    """A deferred_binding row of n >= 2 records (fewer if over budget, at least 2) over a
    number of handles uniform in [1, n // 2]; n keys asked with replacement."""
    while n > 2 and n * _DEFERRED_RECORD_TOKENS > budget:
        n -= 1
    if n * _DEFERRED_RECORD_TOKENS > budget:
        raise _too_short(length, "deferred_binding", "two records", 2 * _DEFERRED_RECORD_TOKENS, budget)
    items, slots = _deferred_items(rng, n, int(rng.integers(1, n // 2 + 1)))
    asked = [items[i] for i in rng.integers(0, n, size=n)]
    doc_len = length - sum(len(it.query) + len(it.answer) for it in asked)
    statements = [s for it in items for s in it.statements]
    refs, offsets = _deferred_offsets(rng, slots, _filler_count(doc_len, statements), None)
    doc, _ = _assemble(rng, doc_len, [items[r].statements[k] for r, k in refs], offsets=offsets)
    return doc, asked


def sample_batch(
    rng: np.random.Generator,
    task_mix: str | Sequence[str] | Mapping[str, float],
    length: int,
    batch: int,
    *,
    min_needles: int = 1,
    max_needles: int = 8,
    max_hops: int = 4,
) -> Batch:
    """A batch for training with dense supervision: several needles and queries per sequence.

    task_mix: a task name, a list of names (equal weights) or {name: weight}.
    length: tokens per row (exact). batch: rows.
    Each row draws a task, then a number of needles uniform in [min_needles, max_needles]
    (passkey: always 1; variable tracking: chains of 1..max_hops copies each; deferred
    binding: records, at least 2, over a number of handles uniform in [1, records // 2]), and
    asks every needle once, in random order, except multikey and deferred binding rows, whose
    keys are asked with replacement: asked each key once, the model learned to answer with a
    value not given yet in the row (right for the last query whatever the key: first-token
    accuracy 0.85 with two needles) and stayed at chance on the lookup
    (training/results/multikey_probes.json). Needles, queries and answers take at most half of
    the non-prefix tokens: rows that would exceed it get fewer needles (at least one; two
    deferred records).
    Returns Batch(tokens [batch, length] int32, loss_mask [batch, length] float32,
    task_ids [batch] int32).
    """
    if batch < 1:
        raise ValueError(f"batch={batch} must be >= 1")
    if not 1 <= min_needles <= max_needles:
        raise ValueError(f"need 1 <= min_needles ({min_needles}) <= max_needles ({max_needles})")
    if max_hops < 1:
        raise ValueError(f"max_hops={max_hops} must be >= 1")
    weights = _task_weights(task_mix)
    budget = (length - PREFIX_LEN) // 2
    tokens = np.empty((batch, length), np.int32)
    mask = np.zeros((batch, length), np.float32)
    task_ids = rng.choice(len(TASKS), size=batch, p=weights).astype(np.int32)
    for b, t in enumerate(task_ids):
        task = TASKS[t]
        n = 1 if task == "passkey" else int(rng.integers(min_needles, max_needles + 1))
        if task == "deferred_binding":
            doc, asked = _deferred_row(rng, max(2, n), length, budget)
        else:
            doc, asked = _needle_row(rng, task, n, length, budget, max_hops)
        row, pos = [doc], len(doc)
        for item in asked:
            row += [item.query, item.answer]
            pos += len(item.query)
            mask[b, pos : pos + len(item.answer)] = 1.0
            pos += len(item.answer)
        tokens[b] = np.concatenate(row)
    return Batch(tokens, mask, task_ids)


def _to_ids(x) -> list[int]:
    if isinstance(x, Example):
        return [int(i) for i in x.answer]
    if isinstance(x, str):
        return text_to_ids(x)
    return [int(i) for i in np.asarray(x).reshape(-1)]


def score(prediction, answer) -> bool:
    """Exact match of a generated answer.

    prediction: generated token ids (sequence / array) or text. It is cut at its first `</s>`
        (or `<pad>`); what remains must equal the answer without its `</s>`. So `7 1 4 3 2 </s>
        ...` and `7 1 4 3 2` (generation stopped at the answer's length) match, `7 1 4 3 2 9`
        does not. Text is read with the task vocabulary (`31415` == `3 1 4 1 5`).
    answer: an Example, its answer ids, or answer text.
    """
    pred = _to_ids(prediction)
    want = _to_ids(answer)
    if want and want[-1] == EOS_ID:
        want = want[:-1]
    for k, tok in enumerate(pred):
        if tok in (EOS_ID, PAD_ID):
            pred = pred[:k]
            break
    return pred == want


def accuracy(predictions: Sequence, answers: Sequence) -> float:
    """Fraction of exact matches, `score` pairwise; both sequences of the same length >= 1."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("accuracy of zero examples is undefined")
    return sum(score(p, a) for p, a in zip(predictions, answers)) / len(answers)


__all__ = [
    "BOS_ID",
    "DEFERRED_SPLITS",
    "EOS_ID",
    "PREFIX_IDS",
    "PREFIX_LEN",
    "SYSTEM_PREFIX",
    "TASKS",
    "VALUE_DIGITS",
    "Batch",
    "Example",
    "accuracy",
    "deferred_binding",
    "generate",
    "host_split",
    "make_examples",
    "multikey_niah",
    "passkey",
    "record_split",
    "sample_batch",
    "score",
    "variable_tracking",
]
