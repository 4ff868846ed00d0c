"""apb_jax.evaluation: RULER / InfiniteBench generators (length in a BPE tokenizer's tokens, answers really in the
context), the scoring rules, and the runner on a tiny random Llama (4 fake CPU devices) and, through the
`apb-jax eval` command, on the shipped retriever with its own tasks: APB variants side by side, the exact strategies
answering exactly as full attention does."""

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from apb_jax.config import COMPRESSORS
from apb_jax.evaluation import groups, make_samples, resolve_tasks
from apb_jax.evaluation import scoring as S
from apb_jax.evaluation.base import fit_size
from apb_jax.evaluation.registry import get_task, registry
from apb_jax.evaluation.runner import (
    Prepared,
    _grid,
    add_agreement,
    add_eval_arguments,
    add_split_scores,
    check_variants,
    compressor_tag,
    format_table,
    main_eval,
    plan_batches,
    prepare,
    run_cell,
    run_eval,
)
from apb_jax.model import Model
from apb_jax.prompting import PromptRenderer
from tests.tokenizer_fixtures import build_bpe_tokenizer, load, tiny_config, write_model_dir

TEXT_TASKS = groups()["ruler"] + groups()["infinitebench"]
COARSE = {"niah_multikey_2", "niah_multikey_3", "kv_retrieval", "cwe", "fwe"}  # haystack units of many tokens


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    return {f: build_bpe_tokenizer(tmp_path_factory.mktemp(f), f) for f in ("llama3", "qwen2")}


@pytest.fixture(scope="module")
def llama_tok(tok_dirs):
    return load(tok_dirs["llama3"])


@pytest.fixture(scope="module")
def tiny_model(llama_tok):
    return Model.random(tiny_config(llama_tok), dtype="float32", seed=0)


# ------------------------------------------------------------------------------------------------ generators


def _check_answers(s):
    """The references are what the context says (parsed back out of the text)."""
    ctx, q = s.context, s.question
    if s.task.startswith("niah"):
        keys = s.metadata["keys"]
        assert all(k in q for k in keys)
        found = [v for k in keys for v in re.findall(rf"for {re.escape(k)} is: (\S+)\.", ctx)]
        assert sorted(found) == sorted(s.answers) and len(found) == len(s.answers)
    elif s.task == "vt":
        main = ctx.rsplit("Memorize and track", 1)[1]
        held = {a for a, v in re.findall(r"VAR (\w+) = (\d+)", main) if v == s.metadata["value"]}
        for a, b in re.findall(r"VAR (\w+) = VAR (\w+)", main):
            if b in held:
                held.add(a)
        assert held == set(s.answers) and len(s.answers) == 5
    elif s.task == "cwe":
        words = re.findall(r"\d+\. (\S+)", ctx.rsplit("appear most often.\n", 1)[1])
        counts = collections.Counter(words).most_common()
        assert {w for w, _ in counts[:10]} == set(s.answers) and counts[9][1] > counts[10][1]
    elif s.task == "fwe":
        words = ctx.split("coded words. ", 1)[1].split()
        counts = collections.Counter(w for w in words if w != "...").most_common()
        assert [w for w, _ in counts[:3]] == list(s.answers) and counts[2][1] > counts[3][1]
    elif s.task in ("passkey", "number_string"):
        assert ctx.count(s.answers[0]) == 2 and f"is {s.answers[0]}. Remember it." in ctx
    elif s.task == "kv_retrieval":
        body = ctx[ctx.index("JSON data:\n") + len("JSON data:\n") : ctx.rindex("}") + 1]
        data = json.loads(body)
        key = re.fullmatch(r'Key: "(.+)"', q).group(1)
        assert data[key] == s.answers[0] and len(data) == s.metadata["pairs"]
    else:
        raise AssertionError(s.task)


@pytest.mark.parametrize(
    "flavor,tasks", [("llama3", TEXT_TASKS), ("qwen2", ("niah_single_1", "niah_multikey_3", "vt", "kv_retrieval"))]
)
def test_generators_hit_the_length_and_hold_their_answers(tok_dirs, flavor, tasks):
    tok = load(tok_dirs[flavor])
    renderer = PromptRenderer(tok)
    length = 1536
    for task in tasks:
        budget = get_task(task).max_new_tokens
        samples = make_samples(task, length, 2, seed=1, renderer=renderer)
        for s in samples:
            total = len(renderer.render(s.context, s.question, s.answer_prefix, prompt_format=s.prompt_format))
            tol = 0.04 * length if task in COARSE else 8
            assert length - tol <= total + budget <= length, (task, total, budget)
            assert s.metadata["prompt_tokens"] == total
            _check_answers(s)
        assert samples[0].answers != samples[1].answers
        assert make_samples(task, length, 1, seed=1, renderer=renderer)[0].context == samples[0].context


def test_generators_follow_the_tokenizer(tok_dirs):
    """One seed, two tokenizers: the same needles, a haystack cut to each tokenizer's length."""
    a = make_samples("niah_single_2", 3000, 1, seed=0, renderer=PromptRenderer(load(tok_dirs["llama3"])))[0]
    b = make_samples("niah_single_2", 3000, 1, seed=0, renderer=PromptRenderer(load(tok_dirs["qwen2"])))[0]
    assert a.answers == b.answers and a.question == b.question
    assert a.metadata["haystack_size"] != b.metadata["haystack_size"]


def test_too_short_and_unknown_tasks(llama_tok):
    with pytest.raises(ValueError, match=r"length=600 is too short for task 'cwe'.*120 tokens to generate"):
        make_samples("cwe", 600, 1, renderer=PromptRenderer(llama_tok))
    with pytest.raises(ValueError, match=r"task 'niah_single_9' does not exist; valid tasks: niah_single_1, .*kv_"):
        resolve_tasks("passkey,niah_single_9")
    assert resolve_tasks("infinitebench,passkey") == ["passkey", "number_string", "kv_retrieval"]
    from apb_jax.tasks import TASKS

    assert resolve_tasks(["lang"]) == [f"lang:{t}" for t in TASKS] and "lang:multikey_niah" in resolve_tasks("lang")
    with pytest.raises(ValueError, match="needs renderer"):
        make_samples("passkey", 1000, 1)


def test_lang_samples_are_apb_jax_tasks():
    from apb_jax.tasks import make_examples

    s = make_samples("lang:variable_tracking", 512, 2, seed=3)
    ex = make_examples("variable_tracking", 3, 2, 512)
    assert np.array_equal(s[1].doc_ids, ex[1].document) and np.array_equal(s[1].query_ids, ex[1].query)
    assert s[1].answers == (ex[1].answer_text.removesuffix(" </s>"),)


def test_fit_size_finds_the_largest_fitting_size():
    for slope, base, target in [(1.0, 10, 500), (2.7, 300, 10_000), (55.0, 20, 4000), (1.3, 0, 7)]:
        calls = []

        def count(n, slope=slope, base=base, calls=calls):
            calls.append(n)
            return base + int(slope * n + 3 * np.sin(n))  # nearly linear, a little bumpy

        n = fit_size(count, target)
        assert count(n) <= target and count(n + 1) > target
        assert len(calls) < 30
    with pytest.raises(ValueError, match="smallest prompt is 20 tokens"):
        fit_size(lambda n: 20 + n, 10)
    seen = []
    assert fit_size(lambda n: seen.append(n) or 2 * n, 10_000, lo=3, hi=50) == 50  # capped: never asked above hi
    assert max(seen) == 50


# ------------------------------------------------------------------------------------------------ scoring


def test_ruler_metrics_per_task():
    """RULER scores every synthetic task with string_match_all (string_match_part is for its QA tasks only)."""
    for name in groups()["ruler"]:
        assert get_task(name).metric == "string_match_all"
    assert get_task("passkey").metric == "first_int_match" and get_task("number_string").metric == "first_int_match"
    assert get_task("kv_retrieval").metric == "kv_words"
    assert all(get_task(t).metric == "exact_match" for t in groups()["lang"])
    assert set(registry()) == set(TEXT_TASKS) | set(groups()["lang"])


def test_scorers_on_known_answers():
    refs = ["7354120", "1189023", "5512837", "9001234"]
    assert S.score("string_match_all", [" 7354120, 1189023, 5512837 and 9001234."], [refs]) == 100
    assert S.score("string_match_all", ["I do not know."], [refs]) == 0
    assert S.score("string_match_all", ["7354120 and 5512837"], [refs]) == 50  # 2 of 4 found
    assert S.score("string_match_part", ["7354120 and 5512837"], [refs]) == 100  # any one
    assert S.score("string_match_all", ["ABCDE\x00bcdef"], [["abcde", "BCDEF"]]) == 100  # case, control chars
    assert S.score("string_match_all", ["7354120", "nothing"], [refs[:1], refs[:1]]) == 50  # mean over samples
    assert S.score("first_int_match", ["71432.", " 71432 is it", "714321", "key 7143 2", "no"], [["71432"]] * 5) == 40
    assert S.score("first_int_match", ["0111113133"], [["0111113133"]]) == 100
    u = "9f1c2e3a-1b2c-4d5e-8f90-a1b2c3d4e5f6"
    kv = [f'"{u}"', f"The value is: {u}.", f"{u}abc", "none", f"{{'{u}'}}"]
    assert S.score("kv_words", kv, [[u]] * 5) == 60
    assert S.score("exact_match", ["3 1 4 1 5 </s> 9", "3 1 4 1 5 9"], [["3 1 4 1 5"]] * 2) == 50
    with pytest.raises(ValueError, match="metric='bleu' is unknown"):
        S.score("bleu", ["a"], [["a"]])
    with pytest.raises(ValueError, match="2 predictions for 1"):
        S.score("kv_words", ["a", "b"], [["a"]])


def test_plan_batches_groups_equal_shapes():
    def ex(d, q, m=4):
        return Prepared(None, np.zeros(d, np.int32), np.zeros(q, np.int32), (2,), m)

    exs = [ex(10, 3), ex(11, 3), ex(10, 3), ex(10, 4), ex(10, 3), ex(10, 3, 5)]
    assert plan_batches(exs, 2) == [[0, 2], [4], [1], [3], [5]]
    assert plan_batches(exs, 8, ragged=True) == [[0, 1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="batch_size=0"):
        plan_batches(exs, 0)


# ------------------------------------------------------------------------------------------------ runner


class ScriptedEngine:
    """Stands in for apb_jax.Engine: answers each row with `script(example)` token ids and records the calls."""

    def __init__(self, examples, script):
        self.by_doc = {ex.doc_ids.tobytes(): ex for ex in examples}
        self.script, self.calls = script, []

    def generate(self, doc, query, max_new_tokens, stop_tokens):
        rows = list(doc)
        self.calls.append((type(doc).__name__, len(rows), max_new_tokens, tuple(stop_tokens)))
        tokens = [list(self.script(self.by_doc[np.asarray(r).tobytes()]))[:max_new_tokens] for r in rows]
        layout = SimpleNamespace(anchor=0, passing=0, block=len(rows[0]))
        return SimpleNamespace(
            tokens=tokens, prefill_seconds=0.5, decode_seconds=0.25, compile_seconds=0.0, layout=layout
        )


def test_run_eval_argument_errors(tiny_model, llama_tok):
    run = lambda **kw: run_eval(
        tiny_model, kw.pop("tasks", "passkey"), kw.pop("lengths", [512]), kw.pop("strategies", ["apb"]),
        kw.pop("hosts", [4]), tokenizer=llama_tok, progress=False, **kw,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"strategies: \['flash'\] not allowed; allowed: full, ring, star, apb"):
        run(strategies=["full", "flash"])
    with pytest.raises(ValueError, match="hosts=8 in mode 'mesh' needs 8 devices; jax has 4"):
        run(hosts=[2, 8])
    with pytest.raises(ValueError, match="length 9000 is longer than the model's max positions 8192"):
        run(lengths=[1024, 9000])
    with pytest.raises(ValueError, match=r"lang: tasks use the task-language vocabulary \(512 ids\)"):
        run_eval(
            Model.random(dataclasses.replace(tiny_config(llama_tok), vocab_size=256)),
            "lang:passkey",
            [512],
            ["full"],
            [],
        )
    with pytest.raises(ValueError, match="max_new_tokens=0 must be >= 1"):
        run(max_new_tokens=0)


def test_run_cell_decodes_scores_and_batches(llama_tok):
    """Through the runner's batching, decoding and scoring, without compiling: right answers score 100, an answer
    after the stop token scores 0, and same-shape examples share (padded) batches."""
    renderer = PromptRenderer(llama_tok)
    eot = llama_tok.convert_tokens_to_ids("<|eot_id|>")
    exs = prepare(make_samples("passkey", 1024, 3, renderer=renderer), renderer, None, [7])
    enc = lambda text: llama_tok(text, add_special_tokens=False)["input_ids"]
    right = ScriptedEngine(exs, lambda ex: enc(f" {ex.sample.answers[0]}.") + [eot] + enc("12345"))
    cell = run_cell(right, exs, 2, llama_tok)
    assert cell["score"] == 100 and cell["predictions"][0] == f" {exs[0].sample.answers[0]}."
    assert cell["prefill_seconds"] == 1.0 and cell["n"] == 3
    assert 7 in exs[0].stop_token_ids and eot in exs[0].stop_token_ids  # the model's eos ids join the template's
    assert right.calls == [("ndarray", 2, 6, exs[0].stop_token_ids)] * 2  # [0, 1], then [2] padded to 2
    late = ScriptedEngine(exs, lambda ex: [eot] + enc(f" {ex.sample.answers[0]}."))
    assert run_cell(late, exs, 2, llama_tok)["score"] == 0
    niah = prepare(make_samples("niah_multivalue", 1024, 3, renderer=renderer), renderer, 40, [])
    half = ScriptedEngine(niah, lambda ex: enc(" " + ", ".join(ex.sample.answers[:2]) + "."))
    assert run_cell(half, niah, 8, llama_tok, ragged=True)["score"] == 50  # 2 of the 4 values each
    assert half.calls == [("list", 3, 40, niah[0].stop_token_ids)]


def _check_result(r, tasks, labels):
    assert json.loads(json.dumps(r)) == r
    for c in r["cells"]:
        assert c.get("error") is None, c.get("error")
        assert c["n"] == len(c["predictions"]) and 0 <= c["score"] <= 100
        assert all(isinstance(p, str) for p in c["predictions"])
    header = r["table"].splitlines()[1]
    assert all(t in header for t in tasks)
    assert all(any(line.startswith(lab) for line in r["table"].splitlines()) for lab in labels)
    assert r["device"]["platform"] == "cpu" and r["jax_version"] and r["date"]


@pytest.mark.parametrize(
    "tasks,length",
    [
        (["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1"], 1024),
        (["niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery"], 1024),
        (["vt", "cwe", "fwe"], 1536),
        (["passkey", "number_string", "kv_retrieval"], 1024),
    ],
)
def test_runner_every_text_task_apb(tiny_model, llama_tok, tasks, length):
    r = run_eval(tiny_model, tasks, [length], ["apb"], [4], n=1, tokenizer=llama_tok, max_new_tokens=1, progress=False)
    _check_result(r, tasks, ["apb H=4"])
    assert [c["task"] for c in r["cells"]] == tasks
    assert all(sum(c["doc_tokens"]) + sum(c["query_tokens"]) + 1 <= length for c in r["cells"])


# ------------------------------------------------------------------------------------------------ variants, agreement


def test_columns_expand_the_strategies_that_take_the_option():
    """Compressors and passing lengths multiply only the columns of strategies that take them (registry options)."""
    grid = _grid(["full", "star", "apb"], [2, 4], "vmap", ["query_aware", "retaining_heads"], [0, "block"])
    labels = [col.label for col in grid]
    assert labels[:3] == ["full", "star H=2", "star H=4"]
    assert labels[3:7] == ["apb[qa,P=0] H=2", "apb[qa,P=block] H=2", "apb[rh,P=0] H=2", "apb[rh,P=block] H=2"]
    assert len(labels) == len(set(labels)) == 3 + 2 * 2 * 2
    assert [col.label for col in _grid(["apb"], [4], "mesh")] == ["apb H=4"]  # nothing asked: no brackets
    assert [col.label for col in _grid(["apb"], [4], "mesh", None, [None, 0])] == ["apb H=4", "apb[P=0] H=4"]
    assert _parse(["--model", "m", "--passing-lens", "default,0,block"]).passing_lens == "default,0,block"
    tags = [compressor_tag(c) for c in COMPRESSORS]  # every compressor the config knows stays apart in labels
    assert len(set(tags)) == len(tags) and compressor_tag("query_aware") == "qa"


def test_variant_argument_errors():
    allowed = ", ".join(COMPRESSORS)
    with pytest.raises(ValueError, match=rf"compressors: \['exact'\] not allowed; allowed: {allowed}"):
        check_variants(["apb"], ["query_aware", "exact"])
    with pytest.raises(ValueError, match=r"--passing-lens: \[-1\] not allowed; allowed: integers >= 0, 'block' or"):
        check_variants(["apb"], None, [0, -1], flags=True)
    with pytest.raises(ValueError, match=r"compressors=\['query_aware'\] apply to none of the strategies"):
        check_variants(["full", "star"], ["query_aware"])
    with pytest.raises(ValueError, match="--passing-lens must list integers >= 0, 'block' or 'default'; got '0,x'"):
        main_eval(_parse(["--model", "m", "--passing-lens", "0,x"]))


def test_agreement_counts_predictions_unlike_the_reference():
    def cell(label, strategy, preds, task="lang:passkey"):
        return dict(task=task, length=512, label=label, strategy=strategy, hosts=4, n=len(preds), score=50.0,
                    predictions=preds)  # fmt: skip

    cells = [
        cell("ring H=4", "ring", ["a", "b"]),  # before the reference: compared all the same
        cell("full", "full", ["a", "b"]),
        cell("apb[qa] H=4", "apb", ["a", "c"]),
        cell("apb[qa] H=4", "apb", ["x", "y"], task="lang:variable_tracking"),  # no reference cell for this task
        dict(cell("apb[rh] H=4", "apb", []), error="ValueError: no heads", score=None, n=0),
    ]
    assert add_agreement(cells) == "full" and "agreement" not in cells[1]
    assert cells[0]["agreement"] == {"reference": "full", "compared": 2, "differ": 0, "differing": []}
    assert cells[2]["agreement"]["differ"] == 1 and cells[2]["agreement"]["differing"] == [1]
    assert "agreement" not in cells[3] and "agreement" not in cells[4]
    table = format_table({"cells": cells, "reference": "full"}).splitlines()
    assert table[0].endswith("diff: predictions unlike full's on the same examples / compared")
    assert table[1].split()[-1] == "diff" and table[2].split()[-1] == "0/2" and table[3].split()[-1] == "ref"
    assert table[4].split()[-1] == "1/2" and table[5].split()[-4:] == ["ERR", "-", "-", "-"]  # no avg, no diff
    assert add_agreement([cells[0], cells[2]]) is None and "agreement" not in cells[0]  # no full in the run


@pytest.fixture(scope="module")
def eval_smoke(tmp_path_factory):
    """`apb-jax eval` through the CLI entry on the shipped retriever, one of its own tasks, the 4 fake CPU devices:
    full, the exact ring, and APB with each of two compressors, side by side on the same examples. Compiling is
    nearly all of its ~50 s (three programs per column and query length), hence one task, one length."""
    from apb_jax.cli import main
    from apb_jax.demo import ASSET

    tmp = tmp_path_factory.mktemp("eval")
    out, png = tmp / "eval.json", tmp / "eval.png"
    argv = ["eval", "--model", str(ASSET), "--tasks", "lang:variable_tracking", "--lengths", "512"]
    argv += ["--strategies", "full,ring,apb", "--compressors", "query_aware,retaining_heads", "--hosts", "4"]
    argv += ["--n", "4", "--batch-size", "4", "--cpu-devices", "4", "--no-progress", "--out", str(out)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([*argv, "--plot", str(png)])
    return rc, json.loads(out.read_text()), buf.getvalue(), png


def test_eval_cli_on_the_shipped_retriever(eval_smoke):
    from apb_jax import strategies

    rc, doc, printed, png = eval_smoke
    assert rc == 0, printed
    labels = ["full", "ring H=4", "apb[qa] H=4", "apb[rh] H=4"]
    assert doc["kind"] == "apb-jax eval" and doc["config"]["columns"] == labels and doc["reference"] == "full"
    _check_result(doc, ["lang:variable_tracking"], labels)
    assert doc["config"]["chat_template"] is None  # no tokenizer was needed
    by = {(c["label"], c["task"]): c for c in doc["cells"]}
    assert len(by) == len(doc["cells"]) == 4
    for c in doc["cells"]:
        assert c["n"] == 4 and c["layout"]["block"] == 512 // c["hosts"]
        assert c["compressor"] == {"apb[qa] H=4": "query_aware", "apb[rh] H=4": "retaining_heads"}.get(c["label"])
        if c["label"] == "full":
            assert "agreement" not in c
            continue
        agree = c["agreement"]
        assert agree["reference"] == "full" and agree["compared"] == 4
        if strategies.get(c["strategy"]).exact:  # ring: full's answers, token for token
            assert agree["differ"] == 0 and c["predictions"] == by[("full", c["task"])]["predictions"]
    assert {c["score"] for c in doc["cells"] if c["strategy"] == "apb"} == {100}, doc["cells"]
    table = printed.strip().splitlines()[-5:]  # the table comes last: the header, then a row per column
    assert table[0].split()[-2:] == ["avg", "diff"] and [r.split("  ")[0] for r in table[1:]] == labels
    assert table[1].split()[-1] == "ref" and table[2].split()[-1] == "0/4"
    assert png.stat().st_size > 1000


def _parse(argv):
    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    return p.parse_args(argv)


def test_main_eval_writes_json_and_table(tok_dirs, llama_tok, tmp_path, capsys):
    model_dir = write_model_dir(tmp_path / "tiny", tok_dirs["llama3"], tiny_config(llama_tok))
    out = tmp_path / "results.json"
    argv = ["--model", str(model_dir), "--tasks", "passkey", "--lengths", "512", "--strategies", "full,star,apb"]
    argv += ["--hosts", "4", "--n", "2", "--batch-size", "2", "--max-new-tokens", "3", "--anchor-len", "5"]
    rc = main_eval(_parse([*argv, "--cpu-devices", "4", "--out", str(out)]))
    captured = capsys.readouterr()
    assert rc == 1  # APB's anchor must hold the query: anchor_len=5 fails that cell, and only that cell
    doc = json.loads(out.read_text())
    full, star, apb = doc["cells"]
    for c in (full, star):
        assert c["n"] == 2 and c.get("error") is None and 0 <= c["score"] <= 100 and len(c["predictions"]) == 2
        assert len(set(c["doc_tokens"])) == 1 and c["prefill_seconds"] > 0  # one batch of two
    assert apb["score"] is None and "anchor_len=5 must be 0 or in" in apb["error"]
    assert doc["model"]["path"] == str(model_dir) and doc["model"]["layers"] == 1
    assert doc["config"]["chat_template"] is True and doc["config"]["anchor_len"] == 5
    assert doc["device"] == {"kind": "cpu", "platform": "cpu", "count": 4} and doc["jax_version"] and doc["date"]
    lines = captured.out.strip().splitlines()  # the table comes last
    assert lines[-3].startswith("full") and lines[-2].startswith("star H=4") and lines[-1].startswith("apb H=4")
    assert "ERR" in lines[-1] and "anchor_len=5" in captured.err and "eval" in captured.err  # the bar


def test_main_eval_flag_errors(tmp_path):
    with pytest.raises(ValueError, match=r"--tasks: task 'niah' does not exist; valid tasks: niah_single_1"):
        main_eval(_parse(["--model", str(tmp_path), "--tasks", "niah"]))
    with pytest.raises(ValueError, match=r"--strategies: \['flash'\] not allowed; allowed: full, ring, star, apb"):
        main_eval(_parse(["--model", str(tmp_path), "--strategies", "full,flash"]))
    with pytest.raises(ValueError, match="--lengths must list integers >= 1"):
        main_eval(_parse(["--model", str(tmp_path), "--lengths", "0"]))


def test_deferred_binding_cells_report_scores_by_host_split():
    """Each lang:deferred_binding cell breaks its score down by where the asked record falls for the column's host
    blocks (a one-device column: for every host count of the run), as apb_jax.tasks.host_split says."""
    from apb_jax import tasks

    n, length = 24, 4096
    exs = prepare(make_samples("lang:deferred_binding", length, n, 0, None), None, None)
    truth = tasks.make_examples("deferred_binding", 0, n, length)  # the same seeds: the same documents
    scores = [float(i % 3 == 0) for i in range(n)]
    base = {"task": "lang:deferred_binding", "length": length, "scores": scores, "n": n, "score": 0.0}
    apb = {**base, "label": "apb H=4", "strategy": "apb", "hosts": 4}
    full = {**base, "label": "full", "strategy": "full", "hosts": 1}
    add_split_scores(apb, exs, [2, 4])
    add_split_scores(full, exs, [1, 2, 4])
    for h in (2, 4):
        want = collections.defaultdict(list)
        for ex, sc in zip(truth, scores):
            want[tasks.host_split(ex, h)].append(sc)
        got = full["by_split"][str(h)]
        assert {k: v["n"] for k, v in got.items()} == {k: len(v) for k, v in want.items()}
        assert {k: v["score"] for k, v in got.items()} == pytest.approx(
            {k: 100 * sum(v) / len(v) for k, v in want.items()}, abs=0.01
        )
    assert set(full["by_split"]) == {"2", "4"} and apb["by_split"] == {"4": full["by_split"]["4"]}
    assert len(apb["by_split"]["4"]) >= 2, "random placements over 4 blocks fall into more than one split"
    other = {**base, "label": "apb H=4", "strategy": "apb", "hosts": 4, "task": "lang:passkey"}
    add_split_scores(other, exs, [4])
    assert "by_split" not in other
    table = format_table({"cells": [full, apb], "reference": None})
    assert "by where the asked record falls" in table and "apb H=4 @4096, blocks of H=4" in table
