"""InfiniteBench's synthetic retrieval tasks (Zhang et al. 2024, github OpenBMB/InfiniteBench), generated locally.

    passkey        a 5-digit pass key in the repeated noise passage        scored: first integer == key
    number_string  a 10-digit sequence (5 digits, each of 5 repeated once)  scored: first integer == sequence
    kv_retrieval   a JSON object of UUID -> UUID pairs; one key is asked     scored: the value is one of the words

Instructions, needles and questions follow `data/construct_synthetic_dataset.py` and the prompt templates of
InfiniteBench; the answer prefixes ("The pass key is", ...) are the ones thunlp/APB put after the assistant header.
InfiniteBench ships these at fixed lengths (passkey 8K-128K, the others ~128K); here each is generated at the asked
length, the needle at a uniform random depth.
"""

from __future__ import annotations

from apb_jax.evaluation import text as T
from apb_jax.evaluation.base import Haystack, Sample, noise_haystack
from apb_jax.evaluation.ruler import Builder, _rngs

INSTRUCTION = {
    "passkey": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information.\n\n",
    "number_string": "There is an important info hidden inside a lot of irrelevant text. Find it. "
    "I will quiz you about the important information there.\n\n",
    "kv_retrieval": "Extract the value corresponding to the specified key in the JSON object below.\n\n",
}
MAX_NEW_TOKENS = {"passkey": 6, "number_string": 12, "kv_retrieval": 50}


def _digits(rng, name: str) -> str:
    digits = [str(d) for d in rng.integers(0, 10, size=5)]
    if name == "number_string":  # InfiniteBench: each insertion repeats a digit next to itself
        for k in range(5):
            pos = int(rng.integers(0, 5 + k))
            digits.insert(pos, digits[pos])
    return "".join(digits)


def retrieval(name: str, seed, length: int) -> Builder:
    """passkey / number_string: the needle sentence between passages of the noise haystack."""
    rng, hay_rng = _rngs(seed)
    key = _digits(rng, name)
    what = "pass key" if name == "passkey" else "sequence of digits"
    needle = f"The {what} is {key}. Remember it. {key} is the {what}."
    depth = float(rng.uniform())
    hay = noise_haystack(hay_rng)

    def build(size: int) -> Sample:
        return Sample(
            task=name,
            context=INSTRUCTION[name] + hay.text(size, [(depth, needle)]) + "\n\n",
            question=f"What is the {what}?",
            answers=(key,),
            answer_prefix=f"\n\nThe {what} is",
            metadata={"depth": round(depth, 4), "haystack_size": size},
        )

    return Builder(build)


def kv_retrieval(name: str, seed, length: int) -> Builder:
    """size = JSON pairs besides the asked one, which sits at a uniform random depth."""
    rng, hay_rng = _rngs(seed)
    key, value = T.uuids(rng, 2)
    depth = float(rng.uniform())

    def pairs(r, k):
        u = T.uuids(r, 2 * k)
        return [f'"{a}": "{b}"' for a, b in zip(u[::2], u[1::2]) if a != key]

    hay = Haystack(pairs, hay_rng, ", ", split=False)

    def build(size: int) -> Sample:
        body = hay.text(size, [(depth, f'"{key}": "{value}"')])
        return Sample(
            task=name,
            context=INSTRUCTION[name] + "JSON data:\n{" + body + "}\n\n",
            question=f'Key: "{key}"',
            answers=(value,),
            answer_prefix="\nThe value associated with the specified key is:",
            metadata={"depth": round(depth, 4), "pairs": size + 1, "key": key},
        )

    return Builder(build)
