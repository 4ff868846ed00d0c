"""Offline byte-level BPE tokenizers shaped like Llama-3's and Qwen2.5's, for prompt and benchmark tests.

`build_bpe_tokenizer(out_dir, flavor)` trains a byte-level BPE (the `tokenizers` library, well under 2 s) on
generated English-like text mixed with the material the benchmarks use (numbers, UUIDs, JSON, `VAR X = 1`), and
saves an HF tokenizer directory: `tokenizer.json` and `tokenizer_config.json` holding a chat template.

    llama3: <|begin_of_text|> added in front by the post-processor (like Llama-3's tokenizer), digits split in
            groups of up to 3; template: BOS, a system header with the knowledge-date lines, trimmed messages
            between <|start_header_id|>role<|end_header_id|>\\n\\n and <|eot_id|> (Llama-3.1's structure);
            eos_token <|eot_id|> (as in the Instruct release), <|end_of_text|> and <|eom_id|> also present.
    qwen2:  no BOS, single digits; template: <|im_start|>role\\n...<|im_end|>\\n with a default system prompt when
            none is given (Qwen2.5's structure); eos_token <|im_end|>, <|endoftext|> also present.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

FLAVORS = ("llama3", "qwen2")
VOCAB_SIZE = 1024  # the tiny test models' vocab; specials included
QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_SPECIALS = {
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    + ["<|eom_id|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}


def _corpus(seed: int = 0) -> list[str]:
    """Training text: English-like prose plus the benchmarks' numbers, UUIDs, JSON and variable statements."""
    from apb_jax.evaluation import text

    rng = np.random.default_rng(seed)
    lines = [" ".join(text.english_sentences(rng, 8)) for _ in range(300)]
    lines += [text.NOISE_PASSAGE] * 20
    for _ in range(100):
        key, value = text.key_words(rng, 1)[0], text.numbers(rng, 1, 7)[0]
        lines.append(f"One of the special magic numbers for {key} is: {value}.")
        a, b = text.uuids(rng, 2)
        lines.append(f'"{a}": "{b}", ')
        v1, v2 = text.letter_words(rng, 2, 5, "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
        lines.append(f"VAR {v1} = {text.numbers(rng, 1, 5)[0]}\nVAR {v2} = VAR {v1}")
        lines.append(" ".join(f"{i + 1}. {w}" for i, w in enumerate(text.letter_words(rng, 6, 6))))
    lines += [
        "What are all the special magic numbers mentioned in the provided text? Question: Answer: The pass key is",
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.",
        "Extract the value corresponding to the specified key in the JSON object below. JSON data:",
    ] * 10
    return lines


def build_bpe_tokenizer(out_dir, flavor: str = "llama3", vocab_size: int = VOCAB_SIZE) -> Path:
    """Train and save a byte-level BPE tokenizer directory of `flavor` ("llama3" or "qwen2"); returns its path."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if flavor not in FLAVORS:
        raise ValueError(f"flavor={flavor!r}; allowed: {FLAVORS}")
    specials = _SPECIALS[flavor]
    tok = Tokenizer(models.BPE())
    split = _LLAMA3_SPLIT if flavor == "llama3" else _QWEN2_SPLIT
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens(specials)
    if flavor == "llama3":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
                ),
            ]
        )
        config = {
            "bos_token": bos,
            "eos_token": "<|eot_id|>",
            "pad_token": "<|end_of_text|>",
            "chat_template": LLAMA3_TEMPLATE,
        }
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        config["chat_template"] = QWEN2_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def load(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def tiny_config(tok, layers: int = 1):
    from apb_jax.config import ModelConfig, RopeConfig

    return ModelConfig(
        model_type="llama",
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope=RopeConfig(theta=1e4),
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_ids=(tok.eos_token_id,),
        dtype="float32",
    )


def write_model_dir(path, tok_dir, cfg):
    """An HF Llama directory (config.json, model.safetensors, the tokenizer) of a random tiny model."""
    from flax import nnx
    from safetensors.numpy import save_file

    from converters.hf_to_flax import flax_to_hf_name

    path.mkdir()
    from apb_jax import Model

    m = Model.random(cfg, dtype="float32", seed=1)
    tensors = {}
    for p, var in nnx.to_flat_state(m.params):
        arr = np.asarray(var.get_value() if hasattr(var, "get_value") else var.value, np.float32)
        tensors[flax_to_hf_name(tuple(p))] = np.ascontiguousarray(arr.T if p[-1] == "kernel" else arr)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, path / f)
    return path
