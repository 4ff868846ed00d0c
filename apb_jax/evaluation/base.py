"""Samples, haystacks and the fit of a sample to a target length in tokens of a given tokenizer.

A text task builds a sample from a seed and a haystack size (a number of haystack *pieces*: words of a filler
passage or sentence, whole distractor needles, JSON pairs). `fit_sample` searches the largest size whose rendered
prompt (chat template included, see `apb_jax.prompting`) plus the task's generation budget fits the target length,
as RULER does (`max_seq_length` counts the prompt and `tokens_to_generate`). Needle texts and depths are drawn
before the haystack, from their own stream, so changing the size only moves the cut at the end of the haystack.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from apb_jax.evaluation import text as T


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
    """One benchmark example.

    context: everything of the user turn before the question (instruction, haystack, separator).
    question: the question text. answers: the references the task's metric compares the prediction with.
    answer_prefix: text that starts the answer (after the assistant header with a chat template).
    prompt_format: how context and question make the user turn (the benchmark's: the context carries its own
      separator, so "{context}{question}").
    metadata: how it was made (needle depths, keys, haystack size, ...), JSON-serialisable.
    doc_ids / query_ids: int32 token ids for token-level tasks (`apb_jax.tasks`): used as they are, with no
      template; None for text tasks, which are rendered with the model's tokenizer.
    """

    task: str
    context: str
    question: str
    answers: tuple[str, ...]
    answer_prefix: str = ""
    prompt_format: str = "{context}{question}"
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    doc_ids: np.ndarray | None = None
    query_ids: np.ndarray | None = None


_PIECE = re.compile(r"\s?[^\s.,!?;:]+|[.,!?;:]")


def split_pieces(sentence: str) -> list[str]:
    """'The grass is green.' -> ['The', ' grass', ' is', ' green', '.']: words keep their leading space."""
    return _PIECE.findall(sentence)


class Haystack:
    """A stream of filler units (passages, sentences, distractor needles, JSON pairs), each made of pieces.

    Sizes count pieces; the text of `n` pieces is the first n pieces, units joined by `joiner` (a cut may end inside
    a unit when units have several pieces). Needles go between units (or at either end). The stream is extended
    lazily from `make_units(rng, count) -> list[str]`, so a size's text never depends on larger sizes.
    """

    def __init__(self, make_units: Callable[[np.random.Generator, int], list[str]], rng, joiner: str, *, split=True):
        self._make, self._rng, self.joiner, self._split = make_units, rng, joiner, split
        self._pieces: list[str] = []
        self._starts: list[int] = []  # piece index where each unit starts
        self._opens: list[bool] = []  # per piece: does it start a unit

    def _ensure(self, n: int) -> None:
        while len(self._pieces) < n:
            for unit in self._make(self._rng, 256):
                pieces = split_pieces(unit) if self._split else [unit]
                self._starts.append(len(self._pieces))
                self._opens += [True] + [False] * (len(pieces) - 1)
                self._pieces += pieces

    def boundaries(self, n: int) -> np.ndarray:
        """Piece indices in [0, n] where a needle may go: unit starts, and n."""
        self._ensure(n)
        starts = np.asarray(self._starts, np.int64)
        return np.append(starts[starts < n], n)

    def text(self, n: int, needles: Sequence[tuple[float, str]] = ()) -> str:
        """The first n pieces with `needles` [(depth in [0, 1], text)] inserted at the unit boundary nearest
        depth * n; needles at one boundary keep their order."""
        self._ensure(n)
        bounds = self.boundaries(n)
        where = []
        for i, (depth, _) in enumerate(needles):
            j = int(np.argmin(np.abs(bounds - depth * n)))
            where.append((int(bounds[j]), i))
        where.sort()
        segments, prev = [], 0
        for b, i in where:
            segments.append(self._chunk(prev, b))
            segments.append(needles[i][1])
            prev = b
        segments.append(self._chunk(prev, n))
        return self.joiner.join(s for s in segments if s)

    def _chunk(self, lo: int, hi: int) -> str:
        if hi <= lo:
            return ""
        out = [self._pieces[lo]]
        for k in range(lo + 1, hi):
            if self._opens[k]:
                out.append(self.joiner)
            out.append(self._pieces[k])
        return "".join(out).strip()


def noise_haystack(rng, passage: str = T.NOISE_PASSAGE, joiner: str = "\n") -> Haystack:
    """RULER's / InfiniteBench's repeated passage, one passage per unit."""
    return Haystack(lambda _rng, k: [passage] * k, rng, joiner)


def essay_haystack(rng) -> Haystack:
    """English-like prose (stands in for RULER's Paul Graham essays), one sentence per unit."""
    return Haystack(T.english_sentences, rng, " ")


def depth_grid(rng, k: int) -> list[float]:
    """k distinct depths from RULER's grid of 40 evenly spaced depths in [0, 1]."""
    grid = np.round(np.linspace(0, 100, num=40)) / 100
    return [float(d) for d in rng.choice(grid, size=k, replace=False)]


class TooShort(ValueError):
    pass


def fit_size(
    count: Callable[[int], int], target: int, lo: int = 0, guess: int | None = None, hi: int | None = None
) -> int:
    """The largest size in [lo, hi] with count(size) <= target, for a count that grows about linearly with size.

    Interpolation search between a size that fits and one that does not (few evaluations: the count is nearly
    linear), falling back to bisection when an interpolation step does not halve the bracket. Without a `guess`, a
    small probe above `lo` measures the slope first. Raises TooShort when even `lo` does not fit.
    """
    c_lo = count(lo)
    if c_lo > target:
        raise TooShort(f"the smallest prompt is {c_lo} tokens, more than the {target} available")
    limit = hi
    if limit is not None and limit <= lo:
        return lo
    up, c_up = None, None  # the smallest size known not to fit
    cand = guess if guess is not None and guess > lo else lo + 16
    slope, bisect = 1.0, False
    while up is None or up - lo > 1:
        if cand is None:
            if up is None:
                cand = lo + max(1, int((target - c_lo) / slope))
            elif bisect:
                cand = (lo + up) // 2
            else:
                cand = lo + int((target - c_lo) * (up - lo) / max(c_up - c_lo, 1))
        cand = max(cand, lo + 1) if up is None else min(max(cand, lo + 1), up - 1)
        if limit is not None:
            cand = min(cand, limit)
        old = None if up is None else up - lo
        c = count(cand)
        slope = max((c - c_lo) / (cand - lo), 1e-3)
        if c <= target:
            lo, c_lo = cand, c
            if limit is not None and lo == limit:
                return lo
        else:
            up, c_up = cand, c
        bisect = old is not None and up is not None and (up - lo) * 2 > old
        cand = None
    return lo


@dataclasses.dataclass(frozen=True)
class Fitted:
    sample: Sample
    size: int
    prompt_tokens: int


def fit_sample(
    build: Callable[[int], Sample],
    renderer,
    target: int,
    *,
    lo: int = 0,
    hi: int | None = None,
    guess: int | None = None,
) -> Fitted:
    """The sample of the largest haystack size whose rendered prompt has at most `target` tokens."""
    cache: dict[int, tuple[Sample, int]] = {}

    def count(size: int) -> int:
        if size not in cache:
            s = build(size)
            cache[size] = (s, renderer.count(s.context, s.question, s.answer_prefix, s.prompt_format))
        return cache[size][1]

    size = fit_size(count, target, lo=lo, guess=guess, hi=hi)
    count(size)
    sample, n = cache[size]
    return Fitted(sample, size, n)
