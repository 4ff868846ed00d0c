"""Word-level tokenizer of the synthetic task language (see `apb_jax.tasks`).

The language is whitespace-separated words; every word is one token and every digit is its
own token (`3 1 4 1 5`; the text `31415` encodes to the same five ids). The vocabulary is
built in code, deterministically, with no downloads:

    ids 0..3      <pad> <s> </s> <unk>
    ids 4..13     the digits 0..9
    then          punctuation  . , : =
                  keywords     SYS TXT KEY IS QRY ANS VAR PASSKEY
                  prefix words read the text and remember every
                  40 key words (apple, river, ...)
                  64 variable names (two capital letters: QX, BK, ...)
                  filler pseudo-words (bako, temu, ...) up to VOCAB_SIZE = 512

`build_tokenizer(out_dir)` writes a `tokenizers` WordLevel model as `tokenizer.json` plus
`tokenizer_config.json` and `special_tokens_map.json`, so that
`transformers.AutoTokenizer.from_pretrained(out_dir)` loads it as a fast tokenizer. The
shipped copy lives in `apb_jax/assets/retriever/`; regenerate it with
`python -m apb_jax.tokenizer [out_dir]` (byte-identical output on every run).

The tokenizer adds no special tokens by itself: documents carry their own `<s>` (the
task generator puts it first) and answers their own `</s>`. Decoding joins tokens with
single spaces, so `decode(encode(text)) == text` for text in canonical form (one space
between tokens, digits spaced).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

DIGITS: tuple[str, ...] = tuple("0123456789")
PUNCTUATION: tuple[str, ...] = (".", ",", ":", "=")
KEYWORDS: tuple[str, ...] = ("SYS", "TXT", "KEY", "IS", "QRY", "ANS", "VAR", "PASSKEY")
PREFIX_WORDS: tuple[str, ...] = ("read", "the", "text", "and", "remember", "every")
KEY_WORDS: tuple[str, ...] = (
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "maple",
    "ocean",
    "amber",
    "cedar",
    "delta",
    "eagle",
    "flame",
    "grape",
    "honey",
    "ivory",
    "jade",
    "koala",
    "lemon",
    "mango",
    "noble",
    "olive",
    "pearl",
    "quartz",
    "raven",
    "sugar",
    "tulip",
    "umber",
    "violet",
    "walnut",
    "xenon",
    "yacht",
    "zebra",
    "birch",
    "coral",
    "frost",
    "glade",
    "harbor",
    "iris",
    "lotus",
    "meadow",
)
NUM_VAR_NAMES = 64
VOCAB_SIZE = 512  # a multiple of 64 (embedding tables tile evenly)
MODEL_MAX_LENGTH = 1 << 20
DEFAULT_ASSET_DIR = Path(__file__).resolve().parent / "assets" / "retriever"


def _var_names(n: int, reserved: frozenset[str]) -> tuple[str, ...]:
    """`n` distinct two-capital-letter names, a fixed stride through AA..ZZ (no RNG)."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names: list[str] = []
    for i in range(26 * 26):
        j = (i * 227 + 113) % (26 * 26)  # 227 is prime, coprime with 676: a permutation
        name = letters[j // 26] + letters[j % 26]
        if name not in reserved and name[0] != name[1]:
            names.append(name)
        if len(names) == n:
            return tuple(names)
    raise AssertionError("not enough variable names")


def _filler_words(n: int, reserved: frozenset[str]) -> tuple[str, ...]:
    """`n` distinct consonant-vowel-consonant-vowel pseudo-words, a fixed stride (no RNG)."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]  # 70
    total = len(syllables) ** 2  # 4900 = 2^2 5^2 7^2
    words: list[str] = []
    for i in range(total):
        j = (i * 1009) % total  # 1009 is prime, coprime with 4900: a permutation
        word = syllables[j // len(syllables)] + syllables[j % len(syllables)]
        if word not in reserved:
            words.append(word)
        if len(words) == n:
            return tuple(words)
    raise AssertionError("not enough filler words")


def _build_vocab() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    head = SPECIAL_TOKENS + DIGITS + PUNCTUATION + KEYWORDS + PREFIX_WORDS + KEY_WORDS
    var_names = _var_names(NUM_VAR_NAMES, frozenset(head))
    head = head + var_names
    filler = _filler_words(VOCAB_SIZE - len(head), frozenset(head))
    vocab = head + filler
    assert len(vocab) == VOCAB_SIZE and len(set(vocab)) == VOCAB_SIZE
    return vocab, var_names, filler


VOCAB, VAR_NAMES, FILLER_WORDS = _build_vocab()
TOKEN_TO_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}
assert tuple(TOKEN_TO_ID[s] for s in SPECIAL_TOKENS) == (PAD_ID, BOS_ID, EOS_ID, UNK_ID)


def token_id(word: str) -> int:
    """Id of one vocabulary word; KeyError naming the word if it is not in the vocabulary."""
    try:
        return TOKEN_TO_ID[word]
    except KeyError:
        raise KeyError(f"{word!r} is not in the task vocabulary ({VOCAB_SIZE} words)") from None


def ids_to_text(ids) -> str:
    """Token ids (any int sequence / 1-D array) -> canonical text, tokens joined by spaces.

    Same result as the shipped tokenizer's `decode(ids, skip_special_tokens=False)`.
    Raises ValueError for an id outside [0, VOCAB_SIZE).
    """
    words = []
    for i in ids:
        i = int(i)
        if not 0 <= i < VOCAB_SIZE:
            raise ValueError(f"token id {i} outside the vocabulary range [0, {VOCAB_SIZE})")
        words.append(VOCAB[i])
    return " ".join(words)


_SPLIT_CHARS = frozenset(string.digits + string.punctuation)


def text_to_ids(text: str) -> list[int]:
    """Canonical or loose task-language text -> token ids, without the `tokenizers` library.

    Splits on whitespace, isolates each punctuation character and each digit, and keeps the
    specials `<s>`, `</s>`, `<pad>`, `<unk>` whole; unknown words map to `<unk>`. Agrees with
    the shipped `tokenizer.json` on the task language (the tests check it).
    """
    ids: list[int] = []
    for chunk in text.split():
        word = ""
        k = 0
        while k < len(chunk):
            special = next((s for s in SPECIAL_TOKENS if chunk.startswith(s, k)), None)
            ch = chunk[k]
            if special is not None or ch in _SPLIT_CHARS:
                if word:
                    ids.append(TOKEN_TO_ID.get(word, UNK_ID))
                    word = ""
                piece = special or ch
                ids.append(TOKEN_TO_ID.get(piece, UNK_ID))
                k += len(piece)
            else:
                word += ch
                k += 1
        if word:
            ids.append(TOKEN_TO_ID.get(word, UNK_ID))
    return ids


def _backend_tokenizer():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=dict(TOKEN_TO_ID), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return tok


def build_tokenizer(out_dir: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json into `out_dir`.

    Deterministic: the same bytes on every run. Returns `out_dir` as a Path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _backend_tokenizer().save(str(out / "tokenizer.json"), pretty=True)
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "model_input_names": ["input_ids", "attention_mask"],
    }
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        (out / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return out


def load_tokenizer(path: str | Path | None = None):
    """The task tokenizer as a `transformers` fast tokenizer (AutoTokenizer).

    path: a directory holding tokenizer.json (+ configs); default: the shipped
    `apb_jax/assets/retriever/`.
    """
    from transformers import AutoTokenizer

    path = Path(path) if path is not None else DEFAULT_ASSET_DIR
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}; build one with `python -m apb_jax.tokenizer {path}`")
    return AutoTokenizer.from_pretrained(str(path))


if __name__ == "__main__":
    import sys

    target = build_tokenizer(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_ASSET_DIR)
    print(f"wrote tokenizer ({VOCAB_SIZE} tokens) to {target}")
