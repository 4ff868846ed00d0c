"""A (context, question) pair -> the model's prompt, split into the document APB shards and the query.

With a chat template (`tokenizer.chat_template`, e.g. Llama-3.1-Instruct or Qwen2.5-Instruct) the user turn holds
`prompt_format` filled with the context and the question — context first, as in RULER and InfiniteBench — and the
template's generation prompt (the assistant header) follows, then `answer_prefix` if one is given:

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>...<|eot_id|><|start_header_id|>user<|end_header_id|>
    {context}\\n\\n{question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n{answer_prefix}
    |------------------------ doc_ids ---------------------------|------------- query_ids -------------------------|

`doc_ids` is everything before the question (sharded over the hosts), `query_ids` the question and everything after
it (APB also puts it in every host's anchor). The two are cut from ONE tokenization of the rendered text, so
`doc_ids ++ query_ids` is exactly `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` plus the
answer prefix's tokens, with the template's special tokens once (its own BOS; none added by the tokenizer). When a
token would straddle the cut (a BPE merge across it), it goes to the query.

Without a chat template (raw mode, base models) the context part is tokenized with the tokenizer's special tokens
(its BOS) and the question part without, as `apb-jax generate` always did; `answer_prefix` is appended verbatim
(with a template, its leading whitespace is dropped: it starts the assistant turn).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

DEFAULT_CHAT_FORMAT = "{context}\n\n{question}"
DEFAULT_RAW_FORMAT = "{context}{question}"
# end-of-turn / end-of-text tokens of common chat models; those in the tokenizer's vocabulary become stop tokens
END_OF_TURN_TOKENS = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|end|>",
    "</s>",
)
_SPLIT_MARK = "\u2063APB\u2063QUESTION\u2063"  # invisible separators: never part of real text


@dataclasses.dataclass(frozen=True, eq=False)
class Prompt:
    """A rendered prompt. doc_ids: int32 [doc_len], query_ids: int32 [query_len] (read-only arrays);
    stop_token_ids: where generation should stop; chat_template: whether the tokenizer's template was used;
    text: the whole prompt as text (document then query)."""

    doc_ids: np.ndarray
    query_ids: np.ndarray
    stop_token_ids: tuple[int, ...]
    chat_template: bool
    text: str

    @property
    def ids(self) -> np.ndarray:
        """doc_ids ++ query_ids: int32 [doc_len + query_len], what a single-device model reads."""
        return np.concatenate([self.doc_ids, self.query_ids])

    def __len__(self) -> int:
        return len(self.doc_ids) + len(self.query_ids)


@dataclasses.dataclass(frozen=True, eq=False)
class PromptRenderer:
    """How prompts are rendered for one tokenizer (see `render` for the arguments)."""

    tokenizer: Any
    chat_template: bool | None = None
    prompt_format: str | None = None
    system_prompt: str | None = None
    max_positions: int | None = None
    extra_stop_token_ids: tuple[int, ...] = ()

    @property
    def uses_chat_template(self) -> bool:
        return _use_template(self.tokenizer, self.chat_template)

    def format_for(self, prompt_format: str | None) -> str | None:
        """The renderer's own prompt_format when set (the user's choice), else `prompt_format` (a sample's)."""
        return self.prompt_format if self.prompt_format is not None else prompt_format

    def render(
        self,
        context: str,
        question: str,
        answer_prefix: str = "",
        max_new_tokens: int = 0,
        prompt_format: str | None = None,
    ) -> Prompt:
        return render(
            self.tokenizer,
            context,
            question,
            answer_prefix=answer_prefix,
            prompt_format=self.format_for(prompt_format),
            chat_template=self.chat_template,
            system_prompt=self.system_prompt,
            max_positions=self.max_positions,
            max_new_tokens=max_new_tokens,
            extra_stop_token_ids=self.extra_stop_token_ids,
        )

    def count(self, context: str, question: str, answer_prefix: str = "", prompt_format: str | None = None) -> int:
        """Tokens of the rendered prompt (doc + query), without the checks and the split (for fitting lengths)."""
        fmt = self.format_for(prompt_format)
        doc_text, query_text, chat = _texts(
            self.tokenizer, context, question, answer_prefix, fmt, self.chat_template, self.system_prompt
        )
        if chat:
            return len(_encode(self.tokenizer, doc_text + query_text, special=False))
        return len(_encode(self.tokenizer, doc_text, special=True)) + len(
            _encode(self.tokenizer, query_text, special=False)
        )


def render(
    tokenizer,
    context: str,
    question: str,
    *,
    answer_prefix: str = "",
    prompt_format: str | None = None,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    max_positions: int | None = None,
    max_new_tokens: int = 0,
    extra_stop_token_ids=(),
) -> Prompt:
    """Render (context, question) for `tokenizer` (a transformers tokenizer) and split it into doc and query ids.

    prompt_format: the user turn, with `{context}` before `{question}` (each exactly once); default
      "{context}\\n\\n{question}" with a chat template, "{context}{question}" without.
    chat_template: True uses the tokenizer's chat template (an error if it has none), False renders raw, None
      (default) uses it when the tokenizer has one.
    system_prompt: a system message before the user turn (None: the template's default, if any).
    answer_prefix: text that starts the answer (e.g. RULER's " The special magic number for X is").
    max_positions: the model's max_position_embeddings; a prompt plus `max_new_tokens` longer than it is an error.
    extra_stop_token_ids: added to the stop tokens (e.g. the model config's eos ids).
    """
    if not isinstance(context, str) or not isinstance(question, str):
        raise TypeError(f"context and question must be str; got {type(context).__name__} and {type(question).__name__}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    for name, text in (("context", context), ("question", question)):
        if not _encode(tokenizer, text, special=False):
            raise ValueError(f"the {name} tokenizes to no tokens (got {text[:80]!r}); give a non-empty {name}")
    doc_text, query_text, chat = _texts(
        tokenizer, context, question, answer_prefix, prompt_format, chat_template, system_prompt
    )
    if chat:
        ids = _encode(tokenizer, doc_text + query_text, special=False)
        head = _encode(tokenizer, doc_text, special=False)
        cut = _common_prefix(head, ids)
        doc, query = ids[:cut], ids[cut:]
    else:
        doc = _encode(tokenizer, doc_text, special=True)
        query = _encode(tokenizer, query_text, special=False)
    if not query:
        raise ValueError("the rendered query is empty; the question must tokenize to at least one token")
    total = len(doc) + len(query)
    if max_positions is not None and total + max_new_tokens > max_positions:
        raise ValueError(
            f"the prompt is {total} tokens (document {len(doc)} + query {len(query)})"
            + (f" + {max_new_tokens} to generate" if max_new_tokens else "")
            + f" = {total + max_new_tokens}, longer than the model's max positions {max_positions}; "
            "shorten the context"
        )
    return Prompt(
        doc_ids=_ro(doc),
        query_ids=_ro(query),
        stop_token_ids=stop_token_ids(tokenizer, chat, extra_stop_token_ids),
        chat_template=chat,
        text=doc_text + query_text,
    )


def stop_token_ids(tokenizer, chat_template: bool, extra=()) -> tuple[int, ...]:
    """eos, plus (with a chat template) the end-of-turn tokens the vocabulary has, plus `extra`; sorted, unique."""
    ids = {int(i) for i in extra}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if chat_template:
        added = tokenizer.get_added_vocab()
        ids.update(int(added[t]) for t in END_OF_TURN_TOKENS if t in added)
    return tuple(sorted(ids))


def _use_template(tokenizer, chat_template: bool | None) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has:
        raise ValueError(
            "chat_template=True but the tokenizer has no chat template (tokenizer.chat_template is empty); "
            "render raw with chat_template=False, or give the tokenizer a template"
        )
    return has if chat_template is None else bool(chat_template)


def _split_format(prompt_format: str) -> tuple[str, str, str]:
    """'A{context}B{question}C' -> ('A', 'B', 'C'); other braces are literal text."""
    for name in ("{context}", "{question}"):
        if prompt_format.count(name) != 1:
            raise ValueError(
                f"prompt_format must hold {name} exactly once; got {prompt_format.count(name)} in {prompt_format!r}"
            )
    ci, qi = prompt_format.index("{context}"), prompt_format.index("{question}")
    if qi < ci:
        raise ValueError(
            f"prompt_format must put {{context}} before {{question}} (the document is prefilled first); "
            f"got {prompt_format!r}"
        )
    return prompt_format[:ci], prompt_format[ci + 9 : qi], prompt_format[qi + 10 :]


def _texts(tokenizer, context, question, answer_prefix, prompt_format, chat_template, system_prompt):
    """(doc text, query text, chat?) with doc text ending right before the question."""
    chat = _use_template(tokenizer, chat_template)
    fmt = prompt_format if prompt_format is not None else (DEFAULT_CHAT_FORMAT if chat else DEFAULT_RAW_FORMAT)
    before, between, after = _split_format(fmt)
    if not chat:
        return before + context + between, question + after + answer_prefix, False
    marked = _apply_template(tokenizer, before + context + between + _SPLIT_MARK + question + after, system_prompt)
    if marked.count(_SPLIT_MARK) != 1:
        raise ValueError("the chat template changed the user message so that the question cannot be located in it")
    full = _apply_template(tokenizer, before + context + between + question + after, system_prompt)
    cut = marked.index(_SPLIT_MARK)
    if marked[:cut] + marked[cut + len(_SPLIT_MARK) :] != full:
        raise ValueError(
            "the chat template rewrites the user message depending on its content, so the document/query split "
            "is not well defined; use chat_template=False"
        )
    return full[:cut], full[cut:] + answer_prefix.lstrip(), True


def _apply_template(tokenizer, user: str, system_prompt: str | None) -> str:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + [
        {"role": "user", "content": user}
    ]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:
        raise ValueError(f"the tokenizer's chat template failed to render: {type(e).__name__}: {e}") from e
    if not isinstance(text, str):
        raise ValueError(f"the tokenizer's chat template rendered {type(text).__name__}, not text")
    return text


def _encode(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def _ro(ids) -> np.ndarray:
    a = np.asarray(ids, np.int32)
    a.flags.writeable = False
    return a
