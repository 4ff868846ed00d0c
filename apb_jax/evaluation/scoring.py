"""The benchmarks' scoring rules. Each per-sample metric returns a value in [0, 1]; `score` averages to 0-100.

RULER (scripts/eval/synthetic/constants.py): predictions are stripped and control characters turned into newlines
(`ruler_postprocess`), then
    string_match_all   the fraction of the references found in the prediction (case-insensitive substring):
                       every synthetic task (NIAH, vt, cwe, fwe)
    string_match_part  1 if any reference is found: RULER's QA tasks only
InfiniteBench (src/compute_scores.py):
    first_int_match    passkey, number_string: the first run of digits in the prediction equals the answer
    kv_words           kv_retrieval: the answer is one of the prediction's words after punctuation, '</s>',
                       'The' and 'To' are replaced by spaces
apb_jax.tasks (the shipped retriever's language):
    exact_match        `apb_jax.tasks.score`: the answer's tokens exactly, cut at the first </s>
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")
_DIGITS = re.compile(r"[0-9]+")
_KV_SEPARATORS = ("\n", ":", '"', "'", ".", ",", "?", "!", "{", "}", "</s>", "The", "To")


def ruler_postprocess(prediction: str) -> str:
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    pred = ruler_postprocess(prediction).lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    pred = ruler_postprocess(prediction).lower()
    return float(max(r.lower() in pred for r in references))


def first_int_match(prediction: str, references: Sequence[str]) -> float:
    m = _DIGITS.search(prediction)
    return float(m is not None and m.group(0) == references[0])


def kv_words(prediction: str, references: Sequence[str]) -> float:
    for sep in _KV_SEPARATORS:
        prediction = prediction.replace(sep, " ")
    return float(references[0] in prediction.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    from apb_jax.tasks import score as exact

    return float(exact(prediction, references[0]))


METRICS = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "first_int_match": first_int_match,
    "kv_words": kv_words,
    "exact_match": exact_match,
}


def score(metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean of `metric` over the pairs, 0-100 (rounded to 2 decimals, as RULER reports)."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is unknown; allowed: {tuple(METRICS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        raise ValueError("a score of zero samples is undefined")
    fn = METRICS[metric]
    return round(100 * sum(fn(p, r) for p, r in zip(predictions, references)) / len(predictions), 2)
