"""Synthetic tasks and their tokenizer: determinism, exact lengths, depths, well-posedness
(an independent parser solves every example from the document tokens), the scorer, the
training sampler, and the shipped tokenizer files."""

import numpy as np
import pytest

from apb_jax import tasks
from apb_jax import tokenizer as tk

V = tk.TOKEN_TO_ID
DIGITS = {V[str(d)] for d in range(10)}
FILLER = {V[w] for w in tk.FILLER_WORDS}
KEYS = {V[w] for w in tk.KEY_WORDS}
NAMES = {V[w] for w in tk.VAR_NAMES}
QRY, ANS, EOS, DOT, EQ, KEY = V["QRY"], V["ANS"], V["</s>"], V["."], V["="], V["KEY"]


# --- an independent oracle: a grammar for the document body, and a solver per query ---------


def parse_document(doc):
    """-> list of statements (kind, fields, start index); fails on anything ill-formed."""
    doc = [int(t) for t in doc]
    assert [tk.VOCAB[t] for t in doc[: len(tasks.SYSTEM_PREFIX)]] == list(tasks.SYSTEM_PREFIX)
    i, out = len(tasks.SYSTEM_PREFIX), []

    def digits(j):
        val = doc[j : j + 5]
        assert len(val) == 5 and all(t in DIGITS for t in val), (j, val)
        return tuple(val)

    while i < len(doc):
        t = doc[i]
        if t in FILLER or t == DOT:
            i += 1
        elif t == V["PASSKEY"]:
            assert doc[i + 1] == V["IS"] and doc[i + 7] == DOT
            out.append(("passkey", digits(i + 2), i))
            i += 8
        elif t == V["KEY"]:
            a, b = doc[i + 1], doc[i + 2]  # KEY a b d1..d5 .
            assert a in KEYS and b in KEYS and a != b and doc[i + 8] == DOT
            out.append(("key", ((a, b), digits(i + 3)), i))
            i += 9
        elif t == V["VAR"]:
            name = doc[i + 1]
            assert name in NAMES and doc[i + 2] == EQ
            if doc[i + 3] == V["VAR"]:
                assert doc[i + 4] in NAMES and doc[i + 5] == DOT
                out.append(("copy", (name, doc[i + 4]), i))
                i += 6
            else:
                assert doc[i + 8] == DOT
                out.append(("assign", (name, digits(i + 3)), i))
                i += 9
        else:
            raise AssertionError(f"unexpected token {tk.VOCAB[t]!r} at {i}")
    return out


def oracle(doc, query):
    """Solve the query from the document alone: answer ids ending with </s>."""
    stmts = parse_document(doc)
    q = [int(t) for t in query]
    assert q[0] == QRY
    if q[1] == KEY:  # QRY KEY a b: the needle up to its value
        assert len(q) == 4
        (val,) = [f[1] for k, f, _ in stmts if k == "key" and list(f[0]) == q[2:]]
        return list(val) + [EOS]
    assert q[-1] == ANS
    body = q[1:-1]
    if body == [V["PASSKEY"]]:
        (val,) = [f for k, f, _ in stmts if k == "passkey"]  # exactly one passkey
        return list(val) + [EOS]
    if body[:2] == [V["VAR"], EQ]:
        env, order = {}, []
        for k, f, _ in stmts:
            if k == "assign":
                env[f[0]] = f[1]
            elif k == "copy":
                assert f[1] in env, "copy of an unassigned variable"
                env[f[0]] = env[f[1]]
            if k in ("assign", "copy"):
                assert f[0] not in order, "variable assigned twice"
                order.append(f[0])
        names = [n for n in order if env[n] == tuple(body[2:])]
        assert names
        return names + [EOS]
    raise AssertionError(f"unknown query {tk.ids_to_text(q)!r}")


def split_row(row):
    """A sample_batch row -> (document, [(query, answer), ...]) using only the grammar."""
    row = [int(t) for t in row]
    start = row.index(QRY)
    pairs, i = [], start
    while i < len(row):
        assert row[i] == QRY
        a = i + 3 if row[i + 1] == KEY else row.index(ANS, i)  # QRY KEY k1 k2 | QRY ... ANS
        e = row.index(EOS, a)
        pairs.append((row[i : a + 1], row[a + 1 : e + 1], a + 1))
        i = e + 1
    return row[:start], pairs


def make(task, seed, length, depth=None, **kw):
    return tasks.generate(task, np.random.default_rng(seed), length, depth, **kw)


# --- generator --------------------------------------------------------------------------------


@pytest.mark.parametrize("task", tasks.TASKS)
def test_deterministic_per_seed(task):
    a = tasks.make_examples(task, seed=7, num=3, length=600)
    b = tasks.make_examples(task, seed=7, num=5, length=600)[:3]  # independent of num
    c = tasks.make_examples(task, seed=8, num=3, length=600)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.document, y.document)
        np.testing.assert_array_equal(x.query, y.query)
        np.testing.assert_array_equal(x.answer, y.answer)
        assert x.depth == y.depth and x.needle_positions == y.needle_positions
    assert any(not np.array_equal(x.document, z.document) for x, z in zip(a, c))
    b1 = tasks.sample_batch(np.random.default_rng(3), tasks.TASKS, 256, 8)
    b2 = tasks.sample_batch(np.random.default_rng(3), tasks.TASKS, 256, 8)
    for u, w in zip(b1, b2):
        np.testing.assert_array_equal(u, w)


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("length", [120, 257, 1000, 4096, 16384])
def test_length_is_exact(task, length):
    for seed in range(3):
        ex = make(task, seed, length)
        assert ex.document.shape == (length,) and ex.document.dtype == np.int32
        assert ex.document[0] == tk.BOS_ID and ex.answer[-1] == EOS
        assert ex.query[-1] == ANS if task != "multikey_niah" else list(ex.query[:2]) == [QRY, KEY]


@pytest.mark.parametrize(
    "task,kw,minimum",
    [
        ("passkey", {}, 16 + 8),
        ("multikey_niah", {"num_keys": 4}, 16 + 36),
        ("variable_tracking", {"num_chains": 2, "num_hops": 3}, 16 + 2 * (9 + 18)),
    ],
)
def test_too_short_is_a_clear_error(task, kw, minimum):
    assert len(make(task, 0, minimum, **kw).document) == minimum  # exactly enough: no filler
    with pytest.raises(ValueError, match=f"length={minimum - 1} is too short.*at least {minimum}"):
        make(task, 0, minimum - 1, **kw)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.77, 1.0])
def test_passkey_depth_is_exact(depth):
    length = 2000
    ex = make("passkey", 1, length, depth)
    filler = length - tasks.PREFIX_LEN - 8
    (pos,) = ex.needle_positions
    assert pos == tasks.PREFIX_LEN + int(np.floor(depth * filler + 0.5))
    assert tk.ids_to_text(ex.document[pos : pos + 2]) == "PASSKEY IS"
    assert list(ex.document[pos + 2 : pos + 7]) + [EOS] == list(ex.answer)


@pytest.mark.parametrize("task", ["multikey_niah", "variable_tracking"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.6, 1.0])
def test_queried_needle_sits_at_depth(task, depth):
    length = 8192
    ex = make(task, 2, length, depth)
    stmts = {s[2]: s for s in parse_document(ex.document)}
    first = ex.needle_positions[0]
    assert first in stmts  # a statement starts there
    if task == "multikey_niah":
        assert stmts[first][0] == "key" and list(stmts[first][1][0]) == list(ex.query[2:4])
    else:
        assert stmts[first][0] == "assign" and stmts[first][1][0] == ex.answer[0]
    size = {"passkey": 8, "key": 9, "assign": 9, "copy": 6}
    needle_tokens = sum(size[k] for k, _, _ in stmts.values())
    before = sum(size[k] for k, _, p in stmts.values() if p < first)
    filler = length - tasks.PREFIX_LEN - needle_tokens
    filler_before = first - tasks.PREFIX_LEN - before
    assert filler_before == int(np.floor(depth * filler + 0.5))


@pytest.mark.parametrize("task", tasks.TASKS)
def test_oracle_solves_every_example(task):
    rng = np.random.default_rng(0)
    for seed in range(25):
        length = int(rng.integers(200, 3000))
        depth = float(rng.uniform()) if seed % 2 else None
        ex = make(task, seed, length, depth)
        assert oracle(ex.document, ex.query) == list(ex.answer), (seed, length, depth)


def test_multikey_has_distinct_pairs_and_values():
    ex = make("multikey_niah", 4, 3000, num_keys=30)
    keys = [s[1] for s in parse_document(ex.document) if s[0] == "key"]
    assert len(keys) == 30
    assert len({k for k, _ in keys}) == 30 and len({v for _, v in keys}) == 30


@pytest.mark.parametrize("num_chains,num_hops", [(1, 1), (2, 4), (4, 6)])
def test_variable_tracking_is_multi_hop(num_chains, num_hops):
    for seed in range(5):
        ex = make("variable_tracking", seed, 1500, num_chains=num_chains, num_hops=num_hops)
        stmts = parse_document(ex.document)
        assigns = [s for s in stmts if s[0] == "assign"]
        copies = [s for s in stmts if s[0] == "copy"]
        assert len(assigns) == num_chains and len({f[1] for _, f, _ in assigns}) == num_chains
        assert len(copies) == num_chains * num_hops
        # the asked chain: one assignment then num_hops copies, each of the previous name
        names = [int(t) for t in ex.answer[:-1]]
        assert len(names) == num_hops + 1
        by_pos = {p: f for _, f, p in stmts}
        chain = [by_pos[p] for p in ex.needle_positions]
        assert list(ex.needle_positions) == sorted(ex.needle_positions)
        assert chain[0] == (names[0], tuple(ex.query[3:8]))
        for h in range(1, num_hops + 1):
            assert chain[h] == (names[h], names[h - 1])  # VAR names[h] = VAR names[h-1]


def test_text_view_matches_ids():
    ex = make("variable_tracking", 5, 300, 0.5)
    assert ex.document_text.startswith(" ".join(tasks.SYSTEM_PREFIX) + " ")
    assert ex.query_text.startswith("QRY VAR = ") and ex.query_text.endswith(" ANS")
    assert ex.answer_text.endswith(" </s>")
    assert tk.text_to_ids(ex.document_text) == list(ex.document)
    np.testing.assert_array_equal(ex.prompt, np.concatenate([ex.document, ex.query]))
    assert not ex.document.flags.writeable


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"depth=1\.5"):
        make("passkey", 0, 100, 1.5)
    with pytest.raises(ValueError, match="task='nope'"):
        make("nope", 0, 100)
    with pytest.raises(ValueError, match="num_keys=0"):
        make("multikey_niah", 0, 100, num_keys=0)
    with pytest.raises(ValueError, match="num_hops=0"):
        make("variable_tracking", 0, 100, num_hops=0)
    with pytest.raises(ValueError, match="at most 64"):
        make("variable_tracking", 0, 5000, num_chains=13, num_hops=4)


# --- scorer -----------------------------------------------------------------------------------


def test_score_and_accuracy():
    ex = make("passkey", 0, 200)
    right = list(ex.answer)
    digits = tk.ids_to_text(ex.answer[:-1])  # "d d d d d"
    assert tasks.score(right, ex) and tasks.score(np.array(right), ex.answer)
    assert tasks.score(right + [V["KEY"], 5], ex)  # stops at </s>
    assert tasks.score(right[:-1], ex)  # generation cut at the answer's length
    assert tasks.score(digits, ex.answer_text) and tasks.score(digits.replace(" ", ""), ex)
    wrong = right.copy()
    wrong[2] = V[str((int(tk.VOCAB[wrong[2]]) + 1) % 10)]
    assert not tasks.score(wrong, ex)
    assert not tasks.score(right[:-2], ex)  # a digit short
    assert not tasks.score(right[:-1] + [V["7"]], ex)  # a digit too many
    assert not tasks.score([], ex) and not tasks.score("", ex)
    vt = make("variable_tracking", 0, 400)
    names = tk.ids_to_text(vt.answer[:-1]).split()
    assert tasks.score(" ".join(names), vt)
    assert not tasks.score(" ".join(names[::-1]), vt)  # canonical order matters
    assert tasks.accuracy([right, wrong, right[:-1], "0"], [ex] * 4) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        tasks.accuracy([right], [ex, ex])


# --- training sampler -------------------------------------------------------------------------


@pytest.mark.parametrize("length,batch", [(128, 64), (1024, 8), (8192, 2)])
def test_sample_batch(length, batch):
    rng = np.random.default_rng(length)
    out = tasks.sample_batch(rng, {"passkey": 1, "multikey_niah": 2, "variable_tracking": 2}, length, batch)
    assert out.tokens.shape == (batch, length) and out.tokens.dtype == np.int32
    assert out.loss_mask.shape == (batch, length) and out.loss_mask.dtype == np.float32
    assert out.task_ids.shape == (batch,)
    assert set(np.unique(out.loss_mask)) <= {0.0, 1.0}
    counts = []
    for row, mask, t in zip(out.tokens, out.loss_mask, out.task_ids):
        doc, pairs = split_row(row)
        expect = np.zeros(length, np.float32)
        for q, a, start in pairs:
            assert oracle(doc, q) == a  # every answer in the row is right and recoverable
            expect[start : start + len(a)] = 1.0
        np.testing.assert_array_equal(mask, expect)
        assert pairs[-1][2] + len(pairs[-1][1]) == length  # the row ends with the last answer
        n = len(pairs)
        assert 1 <= n <= 8
        if tasks.TASKS[t] == "passkey":
            assert n == 1
        stmts = parse_document(doc)
        roots = [s for s in stmts if s[0] in ("passkey", "key", "assign")]
        assert len(roots) == n  # as many queries as needles (multikey: keys drawn with replacement)
        counts.append(n)
    if length >= 1024:
        assert max(counts) > 2  # several needles per sequence (dense supervision)


def test_sample_batch_options_and_errors():
    rng = np.random.default_rng(0)
    out = tasks.sample_batch(rng, "multikey_niah", 4096, 16, min_needles=8, max_needles=8)
    assert (out.task_ids == tasks.TASKS.index("multikey_niah")).all()
    assert ((out.tokens == QRY).sum(axis=1) == 8).all()  # eight needles, eight queries
    assert ((out.tokens == KEY).sum(axis=1) == 1 + 8 + 8).all()  # the system prefix's, the needles', the queries'
    assert (out.loss_mask.sum(axis=1) == 8 * 6).all()
    # keys asked with replacement (asking each key once would let the last query be answered by exclusion)
    asked = [{tuple(q[2:4]) for q, _, _ in split_row(row)[1]} for row in out.tokens]
    assert min(len(a) for a in asked) < 8
    out = tasks.sample_batch(rng, ["variable_tracking"], 4096, 4, max_hops=1)
    assert all(len(a) == 3 for row in out.tokens for _, a, _ in split_row(row)[1])  # 2 names + </s>
    with pytest.raises(ValueError, match="length=40 is too short for multikey_niah"):
        tasks.sample_batch(rng, "multikey_niah", 40, 2)
    with pytest.raises(ValueError, match="task='bad'"):
        tasks.sample_batch(rng, {"bad": 1.0}, 256, 2)
    with pytest.raises(ValueError, match="positive weight"):
        tasks.sample_batch(rng, {"passkey": 0.0}, 256, 2)
    with pytest.raises(ValueError, match="min_needles"):
        tasks.sample_batch(rng, "passkey", 256, 2, min_needles=3, max_needles=2)


# --- tokenizer --------------------------------------------------------------------------------


def test_vocabulary_layout():
    assert len(tk.VOCAB) == tk.VOCAB_SIZE == 512 and tk.VOCAB_SIZE % 64 == 0
    assert tk.VOCAB[:4] == ("<pad>", "<s>", "</s>", "<unk>")
    assert (tk.PAD_ID, tk.BOS_ID, tk.EOS_ID, tk.UNK_ID) == (0, 1, 2, 3)
    assert len(tk.KEY_WORDS) == 40 and len(tk.VAR_NAMES) == 64 and len(tk.FILLER_WORDS) >= 300
    assert all(len(n) == 2 and n.isupper() for n in tk.VAR_NAMES)
    groups = [FILLER, KEYS, NAMES, DIGITS, {V[w] for w in tk.KEYWORDS}]
    assert sum(map(len, groups)) == len(set().union(*groups))  # disjoint
    assert len(tasks.SYSTEM_PREFIX) == 16


def test_shipped_tokenizer_is_reproducible(tmp_path):
    built = tk.build_tokenizer(tmp_path / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (built / name).read_bytes() == (tk.DEFAULT_ASSET_DIR / name).read_bytes(), name


def test_tokenizer_loads_and_round_trips():
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(str(tk.DEFAULT_ASSET_DIR))
    assert isinstance(tok, PreTrainedTokenizerFast) and tok.is_fast
    assert isinstance(tk.load_tokenizer(), PreTrainedTokenizerFast)
    assert len(tok) == 512
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    for task in tasks.TASKS:
        ex = make(task, 11, 700)
        for ids in (ex.document, ex.query, ex.answer):
            text = tk.ids_to_text(ids)
            enc = tok(text, add_special_tokens=True)["input_ids"]  # adds nothing by design
            assert enc == list(ids)
            assert tok.decode(enc) == text
    assert tok("KEY apple river 31415.", add_special_tokens=False)["input_ids"] == tk.text_to_ids(
        "KEY apple river 3 1 4 1 5 ."
    )
    assert len(tok("90210", add_special_tokens=False)["input_ids"]) == 5  # one token per digit
    for text in ("hello QX=BK, <unk></s>", "<s> SYS: x_y 12.", "PASSKEY!!"):
        assert tok(text, add_special_tokens=False)["input_ids"] == tk.text_to_ids(text)
    assert tok.decode(tok("zebra 7 </s>")["input_ids"], skip_special_tokens=True) == "zebra 7"


def test_load_tokenizer_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m apb_jax\.tokenizer"):
        tk.load_tokenizer(tmp_path)
