"""Local text material for the benchmark generators: English-like filler prose, word pools, random values.

Nothing is downloaded. RULER's "essay" haystack (Paul Graham essays) is replaced by prose generated from a small
grammar over the word lists below; RULER's and InfiniteBench's "noise" haystack is their repeated passage
(`NOISE_PASSAGE`). Every function draws from the `np.random.Generator` it is given, so a seed fixes the text.
"""

from __future__ import annotations

import string
import uuid

import numpy as np


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


NOISE_PASSAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

ADJECTIVES: tuple[str, ...] = _words(
    """
    able ancient angry bitter black bold brave bright brief broad broken busy calm careful cheap clean clear clever
    cold common cool crisp curious dark deep dense distant dry dull eager early easy empty even fair faint famous
    fast fierce fine firm flat fresh friendly full gentle giant glad golden good grand gray great green happy hard
    heavy hidden high hollow honest huge humble hungry icy idle keen kind large late lazy light little lively lonely
    long loud low lucky mild modern narrow neat new nice noble odd old open orange pale plain polite poor proud
    purple quick quiet rapid rare raw ready red rich rigid rough round royal rude rural sacred sad safe salty sharp
    short shy silent silver simple slow small smooth soft solid sour spare steady steep stiff still strange strict
    strong sudden sunny sweet swift tall tame tender thick thin tidy tiny tired tough true ugly vast violet warm
    weak wet white wide wild wise wooden yellow young
    """
)
NOUNS: tuple[str, ...] = _words(
    """
    anchor apple arrow autumn badge basket beach bell bench bird blanket boat bottle bread bridge brush bucket
    butter button cabin cable camera candle canvas carpet castle cattle cellar chair chalk cheese cherry chimney
    circle city clock cloud coast coffee collar copper corner cottage cotton county crayon creek crown cup curtain
    desert desk diamond dinner doctor dragon drawer dream drum eagle engine farmer feather fence field finger flag
    flower forest fountain garden gate glass glove goat harbor harvest hammer helmet hill honey horse island jacket
    jelly journey kettle kitchen ladder lake lamp lantern leather lemon letter library lily lion market meadow
    mirror monkey morning mountain needle nest night ocean orchard owl paint palace paper parcel pencil pepper
    piano pillow pine planet pocket pond potato prison puzzle rabbit radio rain river road rocket roof rope sail
    salt sand school scissors shadow sheep shell ship shore silk sister sky snow soap soldier spoon spring square
    stable star station stone storm stove street sugar summer table teacher temple thunder ticket tiger tower
    town train tree tunnel valley village violin wagon wall water wheel whistle window winter wolf wool yard
    """
)
VERBS: tuple[str, ...] = _words(
    """
    carried crossed found followed held kept left lifted moved opened passed pulled pushed raised reached saw
    showed started turned visited watched washed painted filled fixed built covered chased cleaned closed counted
    dropped entered joined marked mended noticed ordered packed planted poured pressed received repaired returned
    rolled sorted touched traded trimmed wrapped borrowed guarded measured gathered polished explored
    """
)
INTRANSITIVE: tuple[str, ...] = _words(
    """
    waited rested arrived listened wandered stayed paused slept smiled laughed worked travelled returned settled
    vanished glowed drifted grew shivered
    """
)
ADVERBS: tuple[str, ...] = _words(
    """
    slowly quickly quietly carefully gladly softly early later again often rarely always nearly briefly calmly
    gently loudly proudly suddenly warmly
    """
)
PREPOSITIONS: tuple[str, ...] = ("near", "behind", "beside", "under", "over", "across", "along", "past", "toward")
DETERMINERS: tuple[str, ...] = ("the", "a", "one", "every", "that", "this", "another", "each")
NAMES: tuple[str, ...] = _words(
    """
    Anna Boris Clara Daniel Elena Felix Grace Henry Irene Jonas Karen Leo Maria Nora Oscar Paula Ruth Simon Tara
    Victor Wendy
    """
)

# sentence patterns; {A} adjective, {N} noun, {V} transitive verb, {I} intransitive, {R} adverb, {P} preposition,
# {D} determiner, {M} name
_PATTERNS = (
    "The {A} {N} {V} the {N}.",
    "{M} {V} {D} {A} {N} {P} the {N}.",
    "In the {N}, {D} {N} {I} {R}.",
    "It was a {A} {N}, and the {N} {I} {P} the {N}.",
    "{D} {N} {V} the {A} {N} {R}.",
    "After the {N}, {M} {V} a {N} {P} the {A} {N}.",
    "The {N} of the {A} {N} {I} {R}.",
    "Nobody {V} the {N} that {M} {V}.",
    "When the {N} {I}, the {A} {N} {V} a {N}.",
    "{M} and {M} {I} {P} the {A} {N}.",
)
_POOLS = {
    "A": ADJECTIVES,
    "N": NOUNS,
    "V": VERBS,
    "I": INTRANSITIVE,
    "R": ADVERBS,
    "P": PREPOSITIONS,
    "D": DETERMINERS,
    "M": NAMES,
}
_SLOTS = [[p[i + 1] for i in range(len(p)) if p[i] == "{"] for p in _PATTERNS]


def english_sentences(rng: np.random.Generator, n: int) -> list[str]:
    """n English-like sentences (grammatical filler with no facts worth remembering), each ending with '.'."""
    out = []
    kinds = rng.integers(0, len(_PATTERNS), size=n)
    for k in kinds:
        words = [_POOLS[s][rng.integers(0, len(_POOLS[s]))] for s in _SLOTS[k]]
        text = _PATTERNS[k]
        for s, w in zip(_SLOTS[k], words):
            text = text.replace("{" + s + "}", w, 1)
        out.append(text[0].upper() + text[1:])
    return out


def pseudo_words(n: int) -> list[str]:
    """n distinct pronounceable lower-case pseudo-words of three consonant-vowel syllables, a fixed order (no RNG)."""
    syl = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]  # 90 syllables, 729000 words
    total = len(syl) ** 3
    if n > total:
        raise ValueError(f"at most {total} pseudo-words exist; {n} asked")
    # 7919 is prime and coprime with 729000 = 2^3 3^6 5^3: a permutation that spreads neighbours apart
    idx = (np.arange(n, dtype=np.int64) * 7919) % total
    return [syl[i // 8100] + syl[(i // 90) % 90] + syl[i % 90] for i in idx.tolist()]


def word_pool(n: int) -> list[str]:
    """At least n distinct words: real nouns, adjectives and verbs (what RULER's common-words task samples), then
    pseudo-words when more are needed."""
    real = list(dict.fromkeys(NOUNS + ADJECTIVES + VERBS + INTRANSITIVE))
    if n <= len(real):
        return real
    extra = [w for w in pseudo_words(n) if w not in set(real)]
    return real + extra[: n - len(real)]


def key_words(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct 'adjective-noun' keys, like RULER's needle keys (e.g. 'quiet-lantern')."""
    total = len(ADJECTIVES) * len(NOUNS)
    idx = rng.choice(total, size=n, replace=False)
    return [f"{ADJECTIVES[i // len(NOUNS)]}-{NOUNS[i % len(NOUNS)]}" for i in idx]


def numbers(rng: np.random.Generator, n: int, digits: int) -> list[str]:
    """n distinct decimal numbers of exactly `digits` digits (no leading zero)."""
    lo, hi = 10 ** (digits - 1), 10**digits
    if hi - lo < n:
        raise ValueError(f"only {hi - lo} numbers have {digits} digits; {n} asked")
    vals: set[int] = set()
    while len(vals) < n:
        vals.update(int(v) for v in rng.integers(lo, hi, size=n - len(vals)))
    return [str(v) for v in sorted(vals, key=lambda v: rng.random())]


def uuids(rng: np.random.Generator, n: int) -> list[str]:
    """n random version-4 UUID strings."""
    raw = rng.bytes(16 * n)
    return [str(uuid.UUID(bytes=raw[16 * i : 16 * i + 16], version=4)) for i in range(n)]


def letter_words(rng: np.random.Generator, n: int, length: int, alphabet: str = string.ascii_lowercase) -> list[str]:
    """n distinct random strings of `length` letters from `alphabet` (RULER's coded words and variable names)."""
    out: dict[str, None] = {}
    letters = np.array(list(alphabet))
    while len(out) < n:
        for row in rng.choice(letters, size=(n - len(out), length)):
            out.setdefault("".join(row), None)
    return list(out)[:n]
