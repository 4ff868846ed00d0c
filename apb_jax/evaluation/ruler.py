"""RULER's synthetic tasks (Hsieh et al. 2024, github NVIDIA/RULER), generated locally in text.

Task settings follow RULER's `synthetic.yaml` (and the copy in thunlp/APB the paper ran); the wording follows its
`constants.py` templates (context, query, answer prefix), paraphrased only where noted:

    niah_single_1    noise haystack, word key, 7-digit number     niah_multikey_2  haystack of distractor needles
    niah_single_2    essay haystack, word key, number              niah_multikey_3  the same with UUID keys/values
    niah_single_3    essay haystack, word key, UUID                niah_multivalue  one key, 4 values (all asked)
    niah_multikey_1  essay haystack, 4 keys, one asked             niah_multiquery  4 keys, all asked
    vt               1 chain of 4 hops (VAR X = 12345, VAR Y = VAR X, ...) in noise, one in-context example
    cwe              numbered word list: 10 words x 30, others x 3 (x 6 / x 1 below 4K), one in-context example
    fwe              coded 6-letter words with Zipf (alpha 2) counts; the 3 most frequent after the '...' noise

The essay haystack is generated English-like prose (no essays are downloaded); the noise haystack is RULER's
repeated passage. All tasks are scored with string_match_all (RULER uses string_match_part only for its QA tasks,
which need downloaded datasets and are not included).
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable

import numpy as np

from apb_jax.evaluation import text as T
from apb_jax.evaluation.base import Haystack, Sample, depth_grid, essay_haystack, noise_haystack, split_pieces

NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
NIAH_CONTEXT = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. I will quiz you "
    "about the {type_v} afterwards.\n{context}\n"
)
NIAH_QUERY = "What are all the special magic {type_v} for {query} mentioned in the provided text?"
NIAH_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
VT_CONTEXT = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
VT_QUERY = "Question: Find all variables that are assigned the value {query} in the text above."
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
    "the value {query}, they are: "
)
CWE_CONTEXT = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often.\n{context}\n"
)
CWE_QUERY = "Question: What are the {num_cw} most common words in the above list?"
CWE_PREFIX = " Answer: The top {num_cw} words that appear most often in the list are:"
FWE_CONTEXT = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\n"
)
FWE_QUERY = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently "
    "appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}


@dataclasses.dataclass(frozen=True)
class NiahConfig:
    haystack: str  # noise | essay | needle
    type_k: str  # words | numbers | uuids
    type_v: str
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1


NIAH_TASKS = {
    "niah_single_1": NiahConfig("noise", "words", "numbers"),
    "niah_single_2": NiahConfig("essay", "words", "numbers"),
    "niah_single_3": NiahConfig("essay", "words", "uuids"),
    "niah_multikey_1": NiahConfig("essay", "words", "numbers", num_k=4),
    "niah_multikey_2": NiahConfig("needle", "words", "numbers"),
    "niah_multikey_3": NiahConfig("needle", "uuids", "uuids"),
    "niah_multivalue": NiahConfig("essay", "words", "numbers", num_v=4),
    "niah_multiquery": NiahConfig("essay", "words", "numbers", num_q=4),
}


@dataclasses.dataclass(frozen=True)
class Builder:
    """build(size) -> Sample for one seed; min_size / max_size: the haystack sizes the task allows (max None: no
    limit)."""

    build: Callable[[int], Sample]
    min_size: int = 0
    max_size: int | None = None


def _rngs(seed) -> tuple[np.random.Generator, np.random.Generator]:
    """(needle stream, haystack stream) of one sample."""
    return np.random.default_rng([*seed, 0]), np.random.default_rng([*seed, 1])


def _random(rng, kind: str, n: int) -> list[str]:
    if kind == "words":
        return T.key_words(rng, n)
    if kind == "numbers":
        return T.numbers(rng, n, 7)
    if kind == "uuids":
        return T.uuids(rng, n)
    raise ValueError(f"needle type {kind!r}; allowed: words, numbers, uuids")


def _single(template: str) -> str:
    """RULER's rewrite of the plural templates when exactly one value is asked."""
    return template.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def niah(name: str, seed, length: int) -> Builder:
    """Needle in a haystack: `NEEDLE` sentences for num_k keys (num_v values each); num_q keys are asked."""
    cfg = NIAH_TASKS[name]
    rng, hay_rng = _rngs(seed)
    num_k = max(cfg.num_k, cfg.num_q)
    keys = _random(rng, cfg.type_k, num_k)
    values = [_random(rng, cfg.type_v, cfg.num_v) for _ in keys]
    needles = [NEEDLE.format(type_v=cfg.type_v, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    order = rng.permutation(len(needles))
    needles = [needles[i] for i in order]
    if cfg.haystack == "essay":
        depths = depth_grid(rng, len(needles))
    else:
        depths = [float(d) for d in rng.uniform(size=len(needles))]
    asked = sorted(int(i) for i in rng.choice(num_k, size=cfg.num_q, replace=False))
    query = ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]] if len(asked) > 1 else keys[asked[0]]
    answers = tuple(v for i in asked for v in values[i])
    ctx_t, q_t, p_t, type_v = NIAH_CONTEXT, NIAH_QUERY, NIAH_PREFIX, cfg.type_v
    if cfg.num_q * cfg.num_v == 1:
        ctx_t, q_t, p_t, type_v = _single(ctx_t), _single(q_t), _single(p_t), type_v[:-1]
    if cfg.haystack == "noise":
        hay = noise_haystack(hay_rng)
    elif cfg.haystack == "essay":
        hay = essay_haystack(hay_rng)
    else:
        taken = set(keys)

        def distractors(r, k):
            ks = [x for x in _random(r, cfg.type_k, k) if x not in taken]
            return [NEEDLE.format(type_v=cfg.type_v, key=x, value=v) for x, v in zip(ks, _random(r, cfg.type_v, k))]

        hay = Haystack(distractors, hay_rng, "\n", split=False)
    meta = {"keys": [keys[i] for i in asked], "depths": [round(d, 4) for d in depths], "haystack": cfg.haystack}

    def build(size: int) -> Sample:
        context = ctx_t.format(type_v=type_v, context=hay.text(size, list(zip(depths, needles))))
        return Sample(
            task=name,
            context=context,
            question=q_t.format(type_v=type_v, query=query),
            answers=answers,
            answer_prefix=p_t.format(type_v=type_v, query=query),
            metadata={**meta, "haystack_size": size},
        )

    return Builder(build)


def _vt_parts(rng, hay_rng, num_chains: int, num_hops: int):
    """(haystack, statements [(depth, text)], the first chain's names, its value)."""
    names = T.letter_words(rng, num_chains * (num_hops + 1), 5, string.ascii_uppercase)
    statements, first_value = [], None
    for c in range(num_chains):
        chain = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
        value = str(int(rng.integers(10000, 99999)))
        first_value = first_value or value
        depths = np.sort(rng.uniform(size=num_hops + 1))
        statements.append((float(depths[0]), f"VAR {chain[0]} = {value}"))
        statements += [(float(d), f"VAR {b} = VAR {a}") for d, a, b in zip(depths[1:], chain, chain[1:])]
    statements.sort(key=lambda s: s[0])
    return noise_haystack(hay_rng), statements, names[: num_hops + 1], first_value


def vt(name: str, seed, length: int, num_chains: int = 1, num_hops: int = 4) -> Builder:
    """Variable tracking: find every variable that ends up holding the value; one worked example first."""
    rng, hay_rng = _rngs(seed)
    hay, statements, chain, value = _vt_parts(rng, hay_rng, num_chains, num_hops)
    # the in-context example: a short instance (RULER's is generated at 500 tokens) with its answer
    ex_hay, ex_st, ex_chain, ex_value = _vt_parts(rng, np.random.default_rng([*seed, 2]), num_chains, num_hops)
    ex_passages = 10 if length >= 4096 else 4
    example = (
        VT_CONTEXT.format(context=ex_hay.text(ex_passages * len(split_pieces(T.NOISE_PASSAGE)), ex_st))
        + VT_QUERY.format(query=ex_value)
        + VT_PREFIX.format(num_v=num_hops + 1, query=ex_value)
        + " ".join(ex_chain)
        + "\n\n"
    )

    def build(size: int) -> Sample:
        return Sample(
            task=name,
            context=example + VT_CONTEXT.format(context=hay.text(size, statements)),
            question=VT_QUERY.format(query=value),
            answers=tuple(chain),
            answer_prefix=VT_PREFIX.format(num_v=num_hops + 1, query=value),
            metadata={"value": value, "depths": [round(d, 4) for d, _ in statements], "haystack_size": size},
        )

    return Builder(build)


def _numbered(words) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def cwe(name: str, seed, length: int, freq_cw: int = 30, freq_ucw: int = 3, num_cw: int = 10) -> Builder:
    """Common words extraction: size = distinct words in the list; num_cw of them repeat freq_cw times, the others
    freq_ucw times (RULER uses 6 / 1 below 4096 tokens, and a smaller worked example)."""
    rng, list_rng = _rngs(seed)
    short = length < 4096
    main_freq = (6, 1) if short else (freq_cw, freq_ucw)
    ex_words, ex_freq = (20, (3, 1)) if short else (40, (10, 3))
    real = list(dict.fromkeys(T.NOUNS + T.ADJECTIVES + T.VERBS + T.INTRANSITIVE))
    known = set(real)
    extra = [w for w in T.pseudo_words(max(length // 2, 1000)) if w not in known]
    pool = [real[i] for i in rng.permutation(len(real))] + [extra[i] for i in rng.permutation(len(extra))]
    ex_pool = [real[i] for i in rng.choice(len(real), size=ex_words, replace=False)]

    def word_list(words, freqs, r):
        lst = words[:num_cw] * freqs[0] + words[num_cw:] * freqs[1]
        return [lst[i] for i in r.permutation(len(lst))]

    ex_list = word_list(ex_pool, ex_freq, rng)
    example = (
        CWE_CONTEXT.format(context=_numbered(ex_list))
        + CWE_QUERY.format(num_cw=num_cw)
        + CWE_PREFIX.format(num_cw=num_cw)
        + " "
        + _numbered(ex_pool[:num_cw])
        + "\n"
    )
    order_seed = int(list_rng.integers(2**31))

    def build(size: int) -> Sample:
        words = pool[:size]
        lst = word_list(words, main_freq, np.random.default_rng(order_seed))
        return Sample(
            task=name,
            context=example + CWE_CONTEXT.format(context=_numbered(lst)),
            question=CWE_QUERY.format(num_cw=num_cw),
            answers=tuple(words[:num_cw]),
            answer_prefix=CWE_PREFIX.format(num_cw=num_cw),
            metadata={"distinct_words": size, "entries": len(lst), "freq": list(main_freq)},
        )

    return Builder(build, min_size=num_cw + 1, max_size=len(pool))


def zeta(alpha: float, terms: int = 2000) -> float:
    """Riemann zeta(alpha) for alpha > 1: a partial sum plus the Euler-Maclaurin tail."""
    if alpha <= 1:
        raise ValueError(f"alpha={alpha} must be > 1")
    k = np.arange(1, terms + 1, dtype=np.float64)
    n = float(terms)
    tail = n ** (1 - alpha) / (alpha - 1) - 0.5 * n**-alpha + alpha * n ** (-alpha - 1) / 12
    return float(np.sum(k**-alpha) + tail)


def fwe_counts(num_words: int, vocab_size: int, alpha: float) -> np.ndarray:
    """RULER's Zipf counts: floor(num_words * k^-alpha / zeta(alpha)) for ranks k = 1..vocab_size."""
    k = np.arange(1, vocab_size + 1, dtype=np.float64)
    return np.floor(num_words * k**-alpha / zeta(alpha)).astype(np.int64)


def fwe(name: str, seed, length: int, alpha: float = 2.0, coded_wordlen: int = 6) -> Builder:
    """Frequent words extraction: size = RULER's num_words; word of rank 1 is the '...' noise, ranks 2-4 the
    answer. The vocabulary has (length - 50) // 50 coded words (at least 8)."""
    rng, text_rng = _rngs(seed)
    vocab_size = max(8, (length - MAX_NEW_TOKENS["fwe"]) // 50)
    vocab = T.letter_words(rng, vocab_size, coded_wordlen)
    vocab[0] = "..."
    order_seed = int(text_rng.integers(2**31))
    lo = 1
    while True:  # ranks 2-5 strictly decreasing, so the top three after the noise are well defined
        c = fwe_counts(lo, 5, alpha)
        if c[4] >= 1 and np.all(np.diff(c[1:5]) < 0):
            break
        lo += 1

    def build(size: int) -> Sample:
        counts = fwe_counts(size, vocab_size, alpha)
        words = np.repeat(np.arange(vocab_size), counts)
        words = words[np.random.default_rng(order_seed).permutation(len(words))]
        return Sample(
            task=name,
            context=FWE_CONTEXT.format(context=" ".join(vocab[i] for i in words)),
            question=FWE_QUERY,
            answers=tuple(vocab[1:4]),
            answer_prefix=FWE_PREFIX,
            metadata={"num_words": size, "vocab_size": vocab_size, "top_counts": counts[:5].tolist()},
        )

    return Builder(build, min_size=lo)
