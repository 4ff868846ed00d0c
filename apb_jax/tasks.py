"""RULER-style synthetic long-context tasks in the task language of `apb_jax.tokenizer`.

Every example is `(document, query, answer)` as int32 token ids (text on demand):

    document  <s> SYS : read the text and remember every KEY , VAR and PASSKEY . TXT   (16 tokens,
              SYSTEM_PREFIX; APB's default q_insert=16 puts the query right after it)
              then filler sentences (`bako temu ... .`) with the needle statements inside,
              exactly `length` tokens in all.
    query     ends where the model starts answering (with `ANS`, or for multikey with the
              needle's own words up to its value).
    answer    the exact continuation, ending with `</s>`.

Tasks (needle statement / query / answer):

    passkey            PASSKEY IS 7 1 4 3 2 .       QRY PASSKEY ANS           7 1 4 3 2 </s>
    multikey_niah      KEY apple river 3 0 9 1 7 .  (num_keys pairs, one asked)
                                                    QRY KEY apple river       3 0 9 1 7 </s>
    variable_tracking  VAR EJ = 3 1 4 1 5 .  VAR NC = VAR EJ .  VAR WA = VAR NC . ...
                                                    QRY VAR = 3 1 4 1 5 ANS   EJ NC WA </s>
                       (num_chains chains of num_hops copies; the answer lists every variable
                       equal to the value in the order they are assigned in the document)

Values are 5-digit numbers (10000..99999, one token per digit), distinct within a document;
key pairs are distinct ordered pairs of two different key words; variable names are distinct.
Filler words, key words, variable names and keywords are disjoint, so a statement is never
confused with filler.

A multikey query repeats its needle up to the value, as RULER's queries end with the start of
the needle's sentence: the answer is the continuation of `KEY apple river` wherever the document
has it, the lookup an induction head does. Two earlier layouts ended the query with `ANS`
(`KEY apple river IS 3 0 9 1 7 .` and `KEY 3 0 9 1 7 IS apple river .`); the model never learned
either: the first digit stayed at chance through runs 1-5 (training/results/multikey_probes.json),
while this layout went from chance to 99% within 300 fine-tuning steps (run 6).

Depth: the queried needle (for variable tracking, the chain's first statement) is preceded by
`round(depth * F)` of the document's F filler tokens; `depth=None` draws it uniformly. Other
needles go to uniform random depths; a chain's later statements to sorted uniform depths after
its first one.

`sample_batch` packs several needles and as many queries into each training sequence (dense
supervision, APB_SPEC.md §10) and returns `tokens` with a `loss_mask` over the answers.
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

TASKS: tuple[str, ...] = ("passkey", "multikey_niah", "variable_tracking")
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
    query: [q_len], ends where the answer starts (with `ANS`; multikey: `QRY KEY k1 k2`).
    answer: [a_len], the exact expected continuation, ending with `</s>`.
    needle_positions: start index in `document` of each statement of the queried needle
        (one for passkey/multikey; the chain's statements in order for variable tracking).
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


def _multikey_items(rng: np.random.Generator, n: int) -> list[_Item]:
    if not 1 <= n <= _NUM_KEY_PAIRS:
        raise ValueError(f"num_keys={n} must be in [1, {_NUM_KEY_PAIRS}]")
    pairs = rng.choice(_NUM_KEY_PAIRS, size=n, replace=False)
    first = pairs // (len(KEY_WORDS) - 1)
    second = pairs % (len(KEY_WORDS) - 1)
    second = second + (second >= first)  # skip k1 == k2
    values = _values(rng, n)
    items = []
    for a, b, value in zip(_KEY_IDS[first], _KEY_IDS[second], values):
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


def _assemble(
    rng: np.random.Generator, length: int, statements: Sequence[np.ndarray], depths: Sequence[float]
) -> tuple[np.ndarray, list[int]]:
    """SYSTEM_PREFIX + filler with `statements` inserted; exactly `length` tokens.

    Statement i is preceded by round(depths[i] * F) of the F filler tokens; ties keep input
    order. Returns (document [length] int32, start index of each statement, input order).
    """
    n_stmt = sum(len(s) for s in statements)
    n_filler = length - PREFIX_LEN - n_stmt
    if n_filler < 0:
        raise ValueError(
            f"length={length} is too short: needs at least {PREFIX_LEN + n_stmt} tokens "
            f"(prefix {PREFIX_LEN} + needle statements {n_stmt})"
        )
    filler = _filler(rng, n_filler)
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


_GENERATORS = {"passkey": passkey, "multikey_niah": multikey_niah, "variable_tracking": variable_tracking}


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
    """A batch for training with dense supervision (APB_SPEC.md §10).

    task_mix: a task name, a list of names (equal weights) or {name: weight}.
    length: tokens per row (exact). batch: rows.
    Each row draws a task, then a number of needles uniform in [min_needles, max_needles]
    (passkey: always 1; variable tracking: chains of 1..max_hops copies each), and asks every
    needle once, in random order, except multikey rows, whose keys are asked with replacement:
    asked each key once, the model learned to answer with a value not given yet in the row
    (right for the last query whatever the key: first-token accuracy 0.85 with two needles)
    and stayed at chance on the lookup (training/results/multikey_probes.json). Needles,
    queries and answers take at most half of the non-prefix tokens: rows that would exceed it
    get fewer needles (at least one).
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
        if task == "passkey":
            items = _passkey_items(rng, 1)
        elif task == "multikey_niah":
            items = _multikey_items(rng, n)
        else:
            items = _vt_items(rng, [int(h) for h in rng.integers(1, max_hops + 1, size=n)])
        while len(items) > 1 and sum(it.num_tokens for it in items) > budget:
            items.pop()
        cost = items[0].num_tokens
        if cost > budget:
            raise ValueError(
                f"length={length} is too short for {task}: one needle with its query and answer "
                f"takes {cost} tokens, at most (length - {PREFIX_LEN}) // 2 = {budget} allowed; "
                f"use length >= {PREFIX_LEN + 2 * cost}"
            )
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
    "EOS_ID",
    "PREFIX_IDS",
    "PREFIX_LEN",
    "SYSTEM_PREFIX",
    "TASKS",
    "VALUE_DIGITS",
    "Batch",
    "Example",
    "accuracy",
    "generate",
    "make_examples",
    "multikey_niah",
    "passkey",
    "sample_batch",
    "score",
    "variable_tracking",
]
