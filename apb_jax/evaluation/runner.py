"""`run_eval`: benchmark scores of strategies x host counts x lengths x tasks, and the `apb-jax eval` command.

For every (task, length) the samples are generated once (in the model's tokenizer, through its chat template) and
answered by every column's engine with `apb_jax.Engine(...).generate(doc_ids, query_ids, ...)`, greedily,
stopping at the template's end-of-turn tokens. A column is a strategy on a host count; a strategy that compresses
(its registry entry lists the option) runs once per compressor of `compressors` and per passing length of
`passing_lens`, so variants such as APB with the query-aware compressor and APB with retaining heads are scored
side by side on the same samples. Examples of one cell whose document and query lengths are equal go into one batch
(the Engine needs equal lengths; `ragged_batches=True` passes examples of any lengths together, for an Engine that
takes ragged batches). One engine lives at a time (each holds its own copy of the weights on its devices).

The result is a JSON-ready dict: one cell per (task, length, column) with n, the score (0-100, the benchmark's
metric), every prediction and, against the one-device exact strategy of the run (full attention), how many
predictions differ from its own on the same examples; the model, the device, the jax version and the date; and a
table shaped like the paper's (tasks as columns), printed last. `plot_result` draws score against length.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apb_jax.config import COMPRESSOR_TAGS, COMPRESSORS, PASS_ALL
from apb_jax.evaluation.base import Sample
from apb_jax.evaluation.registry import LANG_PREFIX, get_task, make_samples, resolve_tasks
from apb_jax.evaluation.scoring import METRICS
from apb_jax.prompting import PromptRenderer
from apb_jax.strategies import COMPARISON

DEFAULT_PASSING = "default"  # in --passing-lens: the strategy's own passing length (None in the Python API)


def strategy_names() -> tuple[str, ...]:
    """The strategies an Engine accepts: the one place the runner and the CLI look them up."""
    from apb_jax import strategies

    return strategies.names()


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
    """One example ready for the engine: doc_ids int32 [doc_len], query_ids int32 [query_len]."""

    sample: Sample
    doc_ids: np.ndarray
    query_ids: np.ndarray
    stop_token_ids: tuple[int, ...]
    max_new_tokens: int

    @property
    def shape_key(self) -> tuple[int, int, int]:
        return len(self.doc_ids), len(self.query_ids), self.max_new_tokens


def prepare(
    samples: Sequence[Sample], renderer: PromptRenderer | None, max_new_tokens: int | None, eos_ids=()
) -> list[Prepared]:
    """Render text samples (token-level samples pass through); max_new_tokens None: the task's budget."""
    out = []
    for s in samples:
        spec = get_task(s.task)
        if s.doc_ids is not None:
            from apb_jax.tokenizer import EOS_ID

            budget = max_new_tokens or int(s.metadata["answer_tokens"])
            out.append(
                Prepared(s, np.asarray(s.doc_ids, np.int32), np.asarray(s.query_ids, np.int32), (EOS_ID,), budget)
            )
            continue
        budget = max_new_tokens or spec.max_new_tokens
        p = renderer.render(s.context, s.question, s.answer_prefix, budget, prompt_format=s.prompt_format)
        out.append(Prepared(s, p.doc_ids, p.query_ids, tuple(sorted({*p.stop_token_ids, *eos_ids})), budget))
    return out


def plan_batches(examples: Sequence[Prepared], batch_size: int, ragged: bool = False) -> list[list[int]]:
    """Index lists of at most `batch_size` examples. ragged=False: one batch holds equal doc and query lengths and
    budgets (what the Engine takes today); ragged=True: any examples, in order (for an Engine with ragged batches)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    groups: dict[Any, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(None if ragged else ex.shape_key, []).append(i)
    return [idx[lo : lo + batch_size] for idx in groups.values() for lo in range(0, len(idx), batch_size)]


def decode_prediction(tokens: Sequence[int], ex: Prepared, tokenizer) -> str:
    """Generated ids -> text: cut at the first stop token; task-language samples keep their own vocabulary."""
    tokens = [int(t) for t in tokens]
    if ex.sample.doc_ids is not None:
        from apb_jax.tokenizer import ids_to_text

        return ids_to_text(tokens)
    stops = set(ex.stop_token_ids)
    cut = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
    return tokenizer.decode(tokens[:cut], skip_special_tokens=True)


def run_cell(engine, examples: Sequence[Prepared], batch_size: int, tokenizer, on_batch=None, ragged=False) -> dict:
    """Answer `examples` with `engine`; returns predictions, the score, timings and the layout of the cell.

    ragged=False stacks equal-length examples into [batch, len] arrays; ragged=True passes lists of 1-D arrays of
    any lengths (for an Engine that takes ragged batches), with the batch's largest budget and every stop token.
    """
    preds: list[str | None] = [None] * len(examples)
    t = {"prefill_seconds": 0.0, "decode_seconds": 0.0, "compile_seconds": 0.0}
    t0 = time.perf_counter()
    layout = None
    batches = plan_batches(examples, batch_size, ragged)
    # a short last batch of a shape that also fills whole batches is padded with repeats: one program serves both
    full = {examples[b[0]].shape_key for b in batches if len(b) == batch_size}
    for idx in batches:
        exs = [examples[i] for i in idx]
        if ragged:
            doc, query = [e.doc_ids for e in exs], [e.query_ids for e in exs]
        else:
            pad = batch_size - len(idx) if exs[0].shape_key in full else 0
            doc = np.stack([e.doc_ids for e in exs + exs[-1:] * pad])
            query = np.stack([e.query_ids for e in exs + exs[-1:] * pad])
        stops = sorted({s for e in exs for s in e.stop_token_ids})
        budget = max(e.max_new_tokens for e in exs)
        out = engine.generate(doc, query, max_new_tokens=budget, stop_tokens=stops)
        for j, i in enumerate(idx):
            preds[i] = decode_prediction(out.tokens[j][: examples[i].max_new_tokens], examples[i], tokenizer)
        t["prefill_seconds"] += out.prefill_seconds
        t["decode_seconds"] += out.decode_seconds
        t["compile_seconds"] += out.compile_seconds
        layout = out.layout
        if on_batch is not None:
            on_batch(len(idx))
    metric = METRICS[get_task(examples[0].sample.task).metric]
    per = [metric(p, ex.sample.answers) for p, ex in zip(preds, examples)]
    return {
        "n": len(examples),
        "score": round(100 * sum(per) / len(per), 2),
        "scores": per,
        "predictions": preds,
        **{k: round(v, 4) for k, v in t.items()},
        "wall_seconds": round(time.perf_counter() - t0, 3),
        # the anchor, passing and block lengths the strategy chose (for the last batch)
        "layout": {"anchor": layout.anchor, "passing": layout.passing, "block": layout.block},
    }


def compressor_tag(name: str) -> str:
    """A compressor's short name in column labels (`apb_jax.config.COMPRESSOR_TAGS`: query_aware -> qa), or its
    whole name where it has none."""
    return COMPRESSOR_TAGS.get(name, name)


@dataclasses.dataclass(frozen=True)
class Column:
    """One line of the table: a strategy on a host count, with the compressor and the passing length asked for
    (None: the Engine's own choice, the retaining heads beside the model or else the query-aware scores, and the
    strategy's default passing length)."""

    strategy: str
    hosts: int
    compressor: str | None = None
    passing_len: int | str | None = None

    @property
    def label(self) -> str:
        """`full`, `ring H=4`, or with the variant settings that were asked for: `apb[qa] H=4`, `apb[rh,P=0] H=4`."""
        tags = [compressor_tag(self.compressor)] if self.compressor is not None else []
        tags += [f"P={self.passing_len}"] if self.passing_len is not None else []
        name = f"{self.strategy}[{','.join(tags)}]" if tags else self.strategy
        return name if _single(self.strategy) else f"{name} H={self.hosts}"


def _single(strategy: str) -> bool:
    from apb_jax import strategies

    return strategies.get(strategy).single_device


def _is_reference(strategy: str) -> bool:
    """Whether `strategy` is what other columns are compared with: one device and exact attention."""
    from apb_jax import strategies

    unit = strategies.get(strategy)
    return unit.single_device and unit.exact


def add_agreement(cells: list[dict]) -> str | None:
    """Give every cell (but the reference's own) an "agreement" entry: how many of its predictions differ from the
    reference's on the same examples. The reference is the first column of a one-device exact strategy (full
    attention); an exact strategy on any host count should differ in none. Returns the reference's label (None when
    the run has no such column: then no cell gets an entry)."""
    for c in cells:
        c.pop("agreement", None)
    ref = next((c["label"] for c in cells if _is_reference(c["strategy"])), None)
    if ref is None:
        return None
    refs = {(c["task"], c["length"]): c for c in cells if c["label"] == ref and c.get("predictions")}
    for c in cells:
        r = refs.get((c["task"], c["length"]))
        if c["label"] == ref or r is None or not c.get("predictions"):
            continue
        differ = [i for i, (a, b) in enumerate(zip(c["predictions"], r["predictions"])) if a != b]
        compared = min(len(c["predictions"]), len(r["predictions"]))
        c["agreement"] = {"reference": ref, "compared": compared, "differ": len(differ), "differing": differ[:20]}
    return ref


SPLIT_TASK = LANG_PREFIX + "deferred_binding"


def add_split_scores(cell: dict, examples: Sequence[Prepared], hosts: Sequence[int]) -> None:
    """For `lang:deferred_binding`: the cell's score by where each example's asked record falls
    (`apb_jax.tasks.host_split`: same_host, key_in_anchor, cross_host, mixed), as cell["by_split"] =
    {"H": {split: {"n", "score"}}}, for the cell's own host count, or for every host count of the run where the
    column runs on one device (full attention: its reference score on each split)."""
    from apb_jax.tasks import record_split

    if cell["task"] != SPLIT_TASK or not cell.get("scores"):
        return
    counts = [cell["hosts"]] if cell["hosts"] > 1 else [h for h in hosts if h > 1]
    by: dict[str, dict[str, dict]] = {}
    for h in counts:
        groups: dict[str, list[float]] = {}
        for ex, score in zip(examples, cell["scores"]):
            split = record_split(len(ex.doc_ids), ex.sample.metadata["needle_positions"], h)
            groups.setdefault(split, []).append(score)
        by[str(h)] = {k: {"n": len(v), "score": round(100 * sum(v) / len(v), 2)} for k, v in sorted(groups.items())}
    if by:
        cell["by_split"] = by


def format_splits(cells: list[dict]) -> list[str]:
    """Lines of the table for the cells that have a split breakdown (see `add_split_scores`)."""
    out = []
    for c in cells:
        for h, groups in c.get("by_split", {}).items():
            parts = " · ".join(f"{k} {v['score']:.1f} (n={v['n']})" for k, v in groups.items())
            out.append(f"  {c['label']} @{c['length']}, blocks of H={h}: {parts}")
    if out:
        out.insert(0, f"{SPLIT_TASK} by where the asked record falls (score, n):")
    return out


def format_table(result: dict) -> str:
    """Scores as the paper lays them out: one row per (column, length), tasks as columns, then the mean; with a
    reference column in the run, a last column `diff` counts the predictions unlike the reference's (of those
    compared, over the row's tasks)."""
    cells = result["cells"]
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    rows = list(dict.fromkeys((c["label"], c["length"]) for c in cells))
    by = {(c["label"], c["length"], c["task"]): c for c in cells}
    ref = result.get("reference")
    head = ["method", "length", *tasks, "avg", *(["diff"] if ref else [])]
    body = []
    for label, L in rows:
        vals = [by.get((label, L, t)) for t in tasks]
        scores = [c["score"] for c in vals if c is not None and c.get("score") is not None]
        cols = [
            "ERR" if c is not None and c.get("error") else ("-" if c is None else f"{c['score']:.1f}") for c in vals
        ]
        cols.append(f"{sum(scores) / len(scores):.1f}" if scores and len(scores) == len(vals) else "-")
        if ref:
            agree = [c["agreement"] for c in vals if c is not None and "agreement" in c]
            diff = "ref" if label == ref else "-"
            if agree:
                diff = f"{sum(a['differ'] for a in agree)}/{sum(a['compared'] for a in agree)}"
            cols.append(diff)
        body.append([label, str(L), *cols])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    line = lambda r: "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths)))
    n = sorted({c["n"] for c in cells if c.get("n")})
    title = f"scores 0-100 (n = {'/'.join(map(str, n)) or '-'} per cell; each task's own metric)"
    if ref:
        title += f"; diff: predictions unlike {ref}'s on the same examples / compared"
    return "\n".join([title, line(head), *(line(r) for r in body), *format_splits(cells)])


def plot_result(result: dict, path) -> Path:
    """Score against length, one panel per task, one line per column label; written to `path` (any format
    matplotlib writes, by its suffix). The reference column is drawn wide and pale underneath, so the exact
    strategies that follow it exactly stay visible on top. Needs matplotlib; returns the path."""
    from matplotlib.figure import Figure

    cells = [c for c in result["cells"] if c.get("score") is not None]
    if not cells:
        raise ValueError("no cell has a score to plot (every cell failed)")
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    lengths = sorted({c["length"] for c in cells})
    ref = result.get("reference")
    fig = Figure(figsize=(max(5.5, 4.2 * len(tasks)), 3.8))
    axes = fig.subplots(1, len(tasks), sharey=True, squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        for label in dict.fromkeys(c["label"] for c in cells):
            pts = sorted((c["length"], c["score"]) for c in cells if c["task"] == task and c["label"] == label)
            if not pts:
                continue
            wide = dict(linewidth=6, alpha=0.35, zorder=1) if label == ref else dict(linewidth=1.5, zorder=2)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=4, label=label, **wide)
        if len(lengths) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{x // 1024}K" if x % 1024 == 0 else str(x) for x in lengths])
        ax.minorticks_off()
        ax.set_ylim(-3, 103)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("length (tokens)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("score (0-100)")
    axes[-1].legend(fontsize=7, loc="best")
    model, dev = result.get("model", {}), result.get("device", {})
    n = "/".join(map(str, sorted({c["n"] for c in cells})))
    name = Path(model["path"]).name if model.get("path") else model.get("model_type", "?")
    fig.suptitle(
        f"{name} on {dev.get('kind', '?')} x{dev.get('count', '?')}, n = {n} per point, {result.get('date', '')[:10]}",
        fontsize=8,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _device_info() -> dict:
    import jax

    dev = jax.devices()[0]
    return {"kind": dev.device_kind, "platform": dev.platform, "count": jax.device_count()}


def _model_info(model) -> dict:
    import jax

    c = model.config
    return {
        "path": None if model.path is None else str(model.path),
        "model_type": c.model_type,
        "layers": c.num_layers,
        "hidden": c.hidden_size,
        "heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "vocab": c.vocab_size,
        "max_positions": c.max_position_embeddings,
        "dtype": str(np.dtype(model.dtype)),
        "params": int(sum(x.size for x in jax.tree_util.tree_leaves(model.params))),
    }


def _write_json(path, doc: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def run_eval(
    model,
    tasks: str | Sequence[str],
    lengths: Sequence[int],
    strategies: Sequence[str],
    hosts: Sequence[int],
    n: int = 50,
    mode: str = "mesh",
    seed: int = 0,
    *,
    tokenizer=None,
    chat_template: bool | None = None,
    prompt_format: str | None = None,
    system_prompt: str | None = None,
    batch_size: int = 1,
    max_new_tokens: int | None = None,
    max_positions: int | None = None,
    compressors: str | Sequence[str] | None = None,
    retaining_heads=None,
    anchor_len: int | None = None,
    passing_lens: int | str | Sequence[int | str] | None = None,
    ragged_batches: bool = False,
    progress: bool = True,
    print_table: bool = True,
    out=None,
) -> dict:
    """Scores of `strategies` x `hosts` x `lengths` x `tasks`, `n` samples per cell.

    model: an apb_jax Model. tasks: names or groups (see `apb_jax.evaluation.registry`). lengths: tokens (RULER's
    meaning for text tasks: prompt + generation budget). strategies: names from `strategy_names()`; a one-device
    strategy (full) runs once, the others on each host count of `hosts`. mode: "mesh" (one host per device) or
    "vmap" (hosts emulated on one device). tokenizer: default `model.tokenizer()`. chat_template / prompt_format /
    system_prompt: see `apb_jax.prompting.render`. batch_size: examples per generate call. max_new_tokens: overrides
    every task's budget. max_positions: default the model's max_position_embeddings.

    compressors: one name or several of `apb_jax.config.COMPRESSORS`; every strategy that compresses (APB) runs
    once per name, as its own column (`apb[qa] H=4`, `apb[rh] H=4`); None: one column, with the Engine's choice.
    passing_lens: likewise one or several passing lengths (ints >= 0, "block": every local key, or None: the
    strategy's default), each its own column (`[None, 0]`: `apb H=4` and `apb[P=0] H=4`); None alone: the default.
    retaining_heads: the heads file of the retaining_heads compressor (None: the one beside the model).
    anchor_len: passed to the strategies that take an anchor.
    ragged_batches: batch examples of different lengths together (needs an Engine that takes ragged batches).
    out: a JSON path rewritten after every cell. Returns the result dict (also written to `out`); a cell that fails
    holds "error" and no score."""
    from tqdm import tqdm

    names = resolve_tasks(tasks)
    if n < 1 or batch_size < 1:
        raise ValueError(f"n={n} and batch_size={batch_size} must be >= 1")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1 (or None: each task's budget)")
    lengths = [int(x) for x in lengths]
    hosts = [int(h) for h in hosts]
    compressors, passing_lens = _as_list(compressors), _as_list(passing_lens)
    grid = _grid(strategies, hosts, mode, compressors, passing_lens)
    max_pos = max_positions or model.config.max_position_embeddings
    for L in lengths:
        if max_pos < L:
            raise ValueError(
                f"length {L} is longer than the model's max positions {max_pos}; use shorter lengths, or raise "
                "max_positions if the model was trained (or scaled) for longer contexts"
            )
    if any(get_task(t).benchmark == "lang" for t in names):
        from apb_jax.tokenizer import VOCAB_SIZE

        if model.config.vocab_size < VOCAB_SIZE:
            raise ValueError(
                f"lang: tasks use the task-language vocabulary ({VOCAB_SIZE} ids); the model's vocab has "
                f"{model.config.vocab_size}"
            )
    if tokenizer is None and any(get_task(t).benchmark != "lang" for t in names):
        tokenizer = model.tokenizer()
    renderer = None
    if tokenizer is not None:
        renderer = PromptRenderer(
            tokenizer,
            chat_template=chat_template,
            prompt_format=prompt_format,
            system_prompt=system_prompt,
            max_positions=max_pos,
            extra_stop_token_ids=tuple(model.config.eos_token_ids),
        )
    import jax

    import apb_jax

    result: dict[str, Any] = {
        "kind": "apb-jax eval",
        "model": _model_info(model),
        "device": _device_info(),
        "jax_version": jax.__version__,
        "apb_jax_version": apb_jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": {
            "tasks": names,
            "lengths": lengths,
            "strategies": list(strategies),
            "hosts": hosts,
            "columns": [col.label for col in grid],
            "n": n,
            "mode": mode,
            "seed": seed,
            "batch_size": batch_size,
            "chat_template": None if renderer is None else renderer.uses_chat_template,
            "prompt_format": prompt_format,
            "system_prompt": system_prompt,
            "max_new_tokens": max_new_tokens,
            "max_positions": max_pos,
            "compressors": compressors,
            "retaining_heads": None if retaining_heads is None else str(retaining_heads),
            "anchor_len": anchor_len,
            "passing_lens": passing_lens,
            "ragged_batches": ragged_batches,
        },
        "reference": None,
        "cells": [],
    }
    prepared: dict[tuple[str, int], list[Prepared]] = {}
    gen_bar = tqdm(total=len(names) * len(lengths), desc="samples", disable=not progress, file=sys.stderr)
    for L in lengths:
        for t in names:
            gen_bar.set_postfix_str(f"{t}@{L}")
            samples = make_samples(t, L, n, seed, renderer)
            prepared[(t, L)] = prepare(samples, renderer, max_new_tokens, model.config.eos_token_ids)
            gen_bar.update(1)
    gen_bar.close()

    bar = tqdm(total=len(grid) * len(lengths) * len(names) * n, desc="eval", disable=not progress, file=sys.stderr)
    for col in grid:
        try:
            engine, err = _engine(model, col, mode, retaining_heads, anchor_len), None
        except Exception as e:  # one configuration that cannot run does not stop the others
            engine, err = None, f"{type(e).__name__}: {e}"
        for L in lengths:
            for t in names:
                exs = prepared[(t, L)]
                cell = {
                    "task": t,
                    "benchmark": get_task(t).benchmark,
                    "metric": get_task(t).metric,
                    "length": L,
                    "label": col.label,
                    "strategy": col.strategy,
                    "hosts": col.hosts,
                    # what the engine runs with (its own pick when none was asked for); None: no compression
                    "compressor": col.compressor if engine is None else _engine_compressor(engine),
                    "passing_len": col.passing_len,
                    "max_new_tokens": exs[0].max_new_tokens,
                }
                bar.set_postfix_str(f"{col.label} {t}@{L}")
                if err is None:
                    try:
                        cell.update(run_cell(engine, exs, batch_size, tokenizer, bar.update, ragged_batches))
                    except Exception as e:
                        cell["error"] = f"{type(e).__name__}: {e}"
                else:
                    cell["error"] = err
                if "error" in cell:
                    cell.update(n=0, score=None)
                    bar.update(len(exs))
                    tqdm.write(f"{col.label} {t}@{L}: {cell['error'][:500]}", file=sys.stderr)
                add_split_scores(cell, exs, hosts)
                cell["answers"] = [list(ex.sample.answers) for ex in exs]
                cell["doc_tokens"] = [len(ex.doc_ids) for ex in exs]
                cell["query_tokens"] = [len(ex.query_ids) for ex in exs]
                cell["metadata"] = [dict(ex.sample.metadata) for ex in exs]
                result["cells"].append(cell)
                result["reference"] = add_agreement(result["cells"])
                if out is not None:
                    _write_json(out, result)
        del engine
    bar.close()
    result["table"] = format_table(result)
    if out is not None:
        _write_json(out, result)
    if print_table:
        print(result["table"])
    return result


def _as_list(value) -> list | None:
    """None -> None; one value -> [value]; a sequence (not a string) -> a list."""
    if value is None:
        return None
    return [value] if isinstance(value, (str, int)) else list(value)


def check_strategies(strategies: Sequence[str], what: str = "strategies") -> None:
    known = strategy_names()
    bad = [s for s in strategies if s not in known]
    if bad or not strategies:
        raise ValueError(f"{what}: {bad or 'none given'} not allowed; allowed: {', '.join(known)}")


def check_variants(strategies: Sequence[str], compressors=None, passing_lens=None, flags: bool = False) -> None:
    """Raise a ValueError naming the argument for compressors not in `apb_jax.config.COMPRESSORS`, passing lengths
    that are neither ints >= 0, "block" nor None (the default), or either given to a run none of whose strategies
    takes it. flags: name the arguments as the command line's flags (--compressors, --passing-lens)."""
    from apb_jax import strategies as known

    for option, values, flag in (
        ("compressor", compressors, "--compressors"),
        ("passing_len", passing_lens, "--passing-lens"),
    ):
        if values is None:
            continue
        what = flag if flags else f"{option}s"
        if option == "compressor":
            bad, allowed = [c for c in values if c not in COMPRESSORS], ", ".join(COMPRESSORS)
        else:
            bad = [
                p
                for p in values
                if p is not None and p != PASS_ALL and (isinstance(p, bool) or not isinstance(p, int) or p < 0)
            ]
            default = repr(DEFAULT_PASSING) if flags else "None (the default)"
            allowed = f"integers >= 0, {PASS_ALL!r} or {default}"
        if bad or not values:
            raise ValueError(f"{what}: {bad or 'none given'} not allowed; allowed: {allowed}")
        takers = [s for s in known.names() if option in known.get(s).options]
        if not any(s in takers for s in strategies):
            raise ValueError(
                f"{what}={list(values)} apply to none of the strategies {list(strategies)}; the strategies that take "
                f"a {option}: {', '.join(takers)}"
            )


def _grid(strategies, hosts, mode, compressors=None, passing_lens=None) -> list[Column]:
    """The columns to run, in order: per strategy, per host count (a one-device strategy once), per compressor and
    per passing length where the strategy takes them (see `apb_jax.strategies.get(name).options`)."""
    from apb_jax import strategies as known

    check_strategies(strategies)
    if mode not in ("mesh", "vmap"):
        raise ValueError(f"mode={mode!r} is unknown; allowed: 'mesh', 'vmap'")
    if any(h < 1 for h in hosts) or (any(not _single(s) for s in strategies) and not hosts):
        raise ValueError(f"hosts={list(hosts)}: give host counts >= 1 for the sequence-parallel strategies")
    check_variants(strategies, compressors, passing_lens)
    grid = []
    for s in dict.fromkeys(strategies):
        options = known.get(s).options
        for h in [1] if _single(s) else hosts:
            for c in compressors if compressors and "compressor" in options else [None]:
                for p in passing_lens if passing_lens and "passing_len" in options else [None]:
                    grid.append(Column(s, h, c, p))
    if mode == "mesh":
        import jax

        need = max(col.hosts for col in grid)
        if need > jax.device_count():
            raise ValueError(
                f"hosts={need} in mode 'mesh' needs {need} devices; jax has {jax.device_count()} "
                f"({jax.devices()[0].platform}); use mode 'vmap', fewer hosts, or more (fake CPU) devices"
            )
    return grid


def _engine(model, col: Column, mode: str, retaining_heads, anchor_len):
    """The Engine of one column; settings the strategy does not take (its registry `options`) stay unset."""
    import apb_jax

    given = dict(
        anchor_len=anchor_len, passing_len=col.passing_len, compressor=col.compressor, retaining_heads=retaining_heads
    )
    options = apb_jax.strategies.get(col.strategy).options
    kw: dict[str, Any] = {k: v for k, v in given.items() if k in options}
    mode = "mesh" if col.hosts == 1 else mode
    return apb_jax.Engine(model, strategy=col.strategy, devices=col.hosts, mode=mode, **kw)


def _engine_compressor(engine) -> str | None:
    """The compressor `engine` runs with, or None for a strategy that does not compress."""
    return engine.config.compressor if "compressor" in engine.strategy.options else None


# ---------------------------------------------------------------------------------------------------- CLI


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `apb-jax eval`."""
    p.add_argument("--model", required=True, help="HF or converted model directory (its tokenizer is used)")
    p.add_argument(
        "--tasks",
        default="ruler",
        help="comma-separated tasks or groups: ruler, infinitebench, lang (the shipped retriever's tasks), or names "
        "such as niah_single_1,kv_retrieval (default: ruler)",
    )
    p.add_argument("--lengths", default="32768", help="comma-separated lengths in tokens (default 32768)")
    p.add_argument(
        "--strategies", default=",".join(COMPARISON), help=f"comma-separated, of {','.join(strategy_names())}"
    )
    p.add_argument("--hosts", default="4", help="comma-separated host counts of the parallel strategies (default 4)")
    p.add_argument("--n", type=int, default=50, help="samples per task and length (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mode", default="mesh", choices=["mesh", "vmap"], help="mesh: one host per device; vmap: hosts on one device"
    )
    p.add_argument("--cpu-devices", type=int, default=None, help="run on the CPU with this many fake devices")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=1, help="examples per generate call (equal lengths only)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override every task's generation budget")
    p.add_argument(
        "--chat-template",
        default="auto",
        choices=["auto", "on", "off"],
        help="render through the tokenizer's chat template (auto: when it has one)",
    )
    p.add_argument("--prompt-format", default=None, help="the user turn, with {context} and {question}")
    p.add_argument("--system-prompt", default=None, help="a system message (default: the template's)")
    p.add_argument("--max-positions", type=int, default=None, help="default: the model's max_position_embeddings")
    p.add_argument(
        "--compressors",
        "--compressor",
        default=None,
        help=f"comma-separated, of {','.join(COMPRESSORS)}: APB runs once per compressor, each its own column "
        "(apb[qa] H=4, apb[rh] H=4; default: one column, the retaining heads beside the model or else query_aware)",
    )
    p.add_argument(
        "--retaining-heads", default=None, help="retaining-heads file (default: retaining_heads.safetensors beside it)"
    )
    p.add_argument("--anchor-len", type=int, default=None, help="APB/Star anchor length (default: the paper's)")
    p.add_argument(
        "--passing-lens",
        "--passing-len",
        default=None,
        help=f"comma-separated APB passing lengths: integers >= 0, {PASS_ALL!r} (every local key) or "
        f"{DEFAULT_PASSING!r} (the paper's P = L/64, the default), each its own column ({DEFAULT_PASSING},0: "
        "apb H=4 and apb[P=0] H=4)",
    )
    p.add_argument("--out", default=None, help="JSON results file, rewritten after every cell")
    p.add_argument(
        "--plot", default=None, help="also draw score against length per task to this file (PNG; needs matplotlib)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _ints(flag: str, text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers; got {text!r}") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"{flag} must list integers >= 1; got {text!r}")
    return vals


def _passing_lens(text: str) -> list[int | str | None]:
    """--passing-lens: integers >= 0, PASS_ALL, or DEFAULT_PASSING (None: the strategy's default)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or not all(x.isdigit() or x in (PASS_ALL, DEFAULT_PASSING) for x in items):
        raise ValueError(f"--passing-lens must list integers >= 0, {PASS_ALL!r} or {DEFAULT_PASSING!r}; got {text!r}")
    return [int(x) if x.isdigit() else (None if x == DEFAULT_PASSING else x) for x in items]


def main_eval(args: argparse.Namespace) -> int:
    """`apb-jax eval`: returns 0, or 1 when a cell failed (its error is in the JSON and on stderr)."""
    try:
        names = resolve_tasks(args.tasks)
    except ValueError as e:
        raise ValueError(f"--tasks: {e}") from None
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    check_strategies(strategies, "--strategies")
    lengths, hosts = _ints("--lengths", args.lengths), _ints("--hosts", args.hosts)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1; got {args.n}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    compressors = None if args.compressors is None else [c.strip() for c in args.compressors.split(",") if c.strip()]
    passing_lens = None if args.passing_lens is None else _passing_lens(args.passing_lens)
    check_variants(strategies, compressors, passing_lens, flags=True)
    if args.plot is not None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError(f"--plot {args.plot} needs matplotlib: pip install matplotlib (or the bench extra)")
    if args.cpu_devices is not None:
        from apb_jax.cli import _set_cpu_devices

        _set_cpu_devices(args.cpu_devices)
    import apb_jax

    model = apb_jax.load(args.model, dtype=args.dtype)
    chat = {"auto": None, "on": True, "off": False}[args.chat_template]
    result = run_eval(
        model,
        names,
        lengths,
        strategies,
        hosts,
        n=args.n,
        mode=args.mode,
        seed=args.seed,
        chat_template=chat,
        prompt_format=args.prompt_format,
        system_prompt=args.system_prompt,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_positions=args.max_positions,
        compressors=compressors,
        retaining_heads=args.retaining_heads,
        anchor_len=args.anchor_len,
        passing_lens=passing_lens,
        progress=not args.no_progress,
        print_table=False,
        out=args.out,
    )
    if args.out:
        print(f"wrote {os.fspath(args.out)}", file=sys.stderr)
    if args.plot is not None:
        try:
            print(f"wrote {plot_result(result, args.plot)}", file=sys.stderr)
        except ValueError as e:
            print(f"--plot: {e}", file=sys.stderr)
    print(result["table"])
    return 1 if any(c.get("error") for c in result["cells"]) else 0
