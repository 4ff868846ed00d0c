"""Every evaluation task under one name, and `make_samples` to generate a task's samples at a length.

Names: RULER's `niah_single_1` ... `fwe`, InfiniteBench's `passkey`, `number_string`, `kv_retrieval`, and the
project's own task-language tasks as `lang:<name>` (every name in `apb_jax.tasks.TASKS`). Groups usable wherever a
list of tasks is read: `ruler`, `infinitebench`, `lang`.

Length: for RULER and InfiniteBench tasks the rendered prompt plus the task's generation budget is at most
`length` tokens and as close to it as the haystack's granularity allows (RULER's `max_seq_length`); for `lang:`
tasks the document is exactly `length` tokens (as in `apb_jax.tasks`), the query and answer come on top.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from apb_jax.evaluation import infinitebench as ib
from apb_jax.evaluation import ruler
from apb_jax.evaluation.base import Sample, TooShort, fit_sample

LANG_PREFIX = "lang:"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """name; benchmark ("ruler" | "infinitebench" | "lang"); metric (a key of scoring.METRICS); max_new_tokens:
    the benchmark's generation budget (None: the answer's length, for lang tasks); make(seed, length) -> Builder
    for text tasks (None for lang tasks)."""

    name: str
    benchmark: str
    metric: str
    max_new_tokens: int | None
    make: Callable | None = None


def _ruler_specs() -> dict[str, TaskSpec]:
    specs = {}
    for name in ruler.NIAH_TASKS:
        specs[name] = TaskSpec(
            name, "ruler", "string_match_all", ruler.MAX_NEW_TOKENS["niah"], lambda s, L, n=name: ruler.niah(n, s, L)
        )
    specs["vt"] = TaskSpec(
        "vt", "ruler", "string_match_all", ruler.MAX_NEW_TOKENS["vt"], lambda s, L: ruler.vt("vt", s, L)
    )
    specs["cwe"] = TaskSpec(
        "cwe", "ruler", "string_match_all", ruler.MAX_NEW_TOKENS["cwe"], lambda s, L: ruler.cwe("cwe", s, L)
    )
    specs["fwe"] = TaskSpec(
        "fwe", "ruler", "string_match_all", ruler.MAX_NEW_TOKENS["fwe"], lambda s, L: ruler.fwe("fwe", s, L)
    )
    return specs


def _ib_specs() -> dict[str, TaskSpec]:
    return {
        "passkey": TaskSpec(
            "passkey", "infinitebench", "first_int_match", ib.MAX_NEW_TOKENS["passkey"],
            lambda s, L: ib.retrieval("passkey", s, L),
        ),
        "number_string": TaskSpec(
            "number_string", "infinitebench", "first_int_match", ib.MAX_NEW_TOKENS["number_string"],
            lambda s, L: ib.retrieval("number_string", s, L),
        ),
        "kv_retrieval": TaskSpec(
            "kv_retrieval", "infinitebench", "kv_words", ib.MAX_NEW_TOKENS["kv_retrieval"],
            lambda s, L: ib.kv_retrieval("kv_retrieval", s, L),
        ),
    }  # fmt: skip


def _lang_specs() -> dict[str, TaskSpec]:
    from apb_jax.tasks import TASKS

    return {LANG_PREFIX + t: TaskSpec(LANG_PREFIX + t, "lang", "exact_match", None) for t in TASKS}


def registry() -> dict[str, TaskSpec]:
    """name -> TaskSpec for every task (lang tasks read from apb_jax.tasks.TASKS at call time)."""
    return {**_ruler_specs(), **_ib_specs(), **_lang_specs()}


def groups() -> dict[str, tuple[str, ...]]:
    reg = registry()
    return {b: tuple(n for n, s in reg.items() if s.benchmark == b) for b in ("ruler", "infinitebench", "lang")}


def get_task(name: str) -> TaskSpec:
    reg = registry()
    if name not in reg:
        raise ValueError(f"task {name!r} does not exist; valid tasks: {', '.join(reg)} (groups: {', '.join(groups())})")
    return reg[name]


def resolve_tasks(tasks: str | Sequence[str]) -> list[str]:
    """'niah_single_1,ruler' or a list of names/groups -> task names in order, groups expanded, no repeats."""
    items = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    grp = groups()
    for t in items:
        if not t:
            continue
        for name in grp.get(t, (t,)):
            get_task(name)
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError(f"no task given; valid tasks: {', '.join(registry())} (groups: {', '.join(grp)})")
    return out


def sample_seed(seed: int, task: str, index: int) -> list[int]:
    """The seed of sample `index` of `task`: independent of how many samples are made."""
    return [int(seed), zlib.crc32(task.encode()), int(index)]


def make_samples(task: str, length: int, n: int, seed: int = 0, renderer=None) -> list[Sample]:
    """`n` samples of `task` at `length` (see the module docstring for what length means).

    renderer: an `apb_jax.prompting.PromptRenderer` (the model's tokenizer and template); text tasks are fitted to
    the length in its tokens. lang tasks ignore it.
    """
    spec = get_task(task)
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    if length < 1:
        raise ValueError(f"length={length} must be >= 1")
    if spec.benchmark == "lang":
        return _lang_samples(spec.name[len(LANG_PREFIX) :], length, n, seed)
    if renderer is None:
        raise ValueError(f"task {task!r} is text: make_samples needs renderer= (a prompting.PromptRenderer)")
    target = length - spec.max_new_tokens
    samples, guess = [], None
    for i in range(n):
        builder = spec.make(sample_seed(seed, task, i), length)
        try:
            fitted = fit_sample(builder.build, renderer, target, lo=builder.min_size, hi=builder.max_size, guess=guess)
        except TooShort as e:
            raise ValueError(
                f"length={length} is too short for task {task!r}: {e} after reserving {spec.max_new_tokens} tokens "
                f"to generate; use a longer length"
            ) from None
        guess = fitted.size
        s = fitted.sample
        meta = {**s.metadata, "prompt_tokens": fitted.prompt_tokens, "seed": sample_seed(seed, task, i)}
        samples.append(dataclasses.replace(s, metadata=meta))
    return samples


def _lang_samples(task: str, length: int, n: int, seed: int) -> list[Sample]:
    from apb_jax.tasks import make_examples
    from apb_jax.tokenizer import EOS_ID, ids_to_text

    out = []
    for i, ex in enumerate(make_examples(task, seed, n, length)):
        answer = ex.answer[:-1] if len(ex.answer) and ex.answer[-1] == EOS_ID else ex.answer
        out.append(
            Sample(
                task=LANG_PREFIX + task,
                context=ex.document_text,
                question=ex.query_text,
                answers=(ids_to_text(answer),),
                metadata={
                    "depth": round(ex.depth, 4),
                    "needle_positions": list(ex.needle_positions),
                    "answer_tokens": len(ex.answer),
                    "index": i,
                },
                doc_ids=np.asarray(ex.document),
                query_ids=np.asarray(ex.query),
            )
        )
    return out
