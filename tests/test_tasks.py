"""Synthetic tasks and their tokenizer: determinism, exact lengths, depths, well-posedness
(an independent parser solves every example from the document tokens), the scorer, the
training sampler, and the shipped tokenizer files."""

import collections
import dataclasses

import numpy as np
import pytest

from apb_jax import tasks
from apb_jax import tokenizer as tk

V = tk.TOKEN_TO_ID
DIGITS = {V[str(d)] for d in range(10)}
FILLER = {V[w] for w in tk.FILLER_WORDS}
KEYS = {V[w] for w in tk.KEY_WORDS}
NAMES = {V[w] for w in tk.VAR_NAMES}
QRY, ANS, EOS, DOT, EQ, KEY, IS = V["QRY"], V["ANS"], V["</s>"], V["."], V["="], V["KEY"], V["IS"]


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
            a, b = doc[i + 1], doc[i + 2]
            assert a in KEYS and b in KEYS and a != b
            if doc[i + 3] == EQ:  # KEY a b = VAR X .  (a deferred record opened on handle X)
                assert doc[i + 4] == V["VAR"] and doc[i + 5] in NAMES and doc[i + 6] == DOT
                out.append(("open", ((a, b), doc[i + 5]), i))
                i += 7
            else:  # KEY a b d1..d5 .
                assert doc[i + 8] == DOT
                out.append(("key", ((a, b), digits(i + 3)), i))
                i += 9
        elif t == V["VAR"]:
            name = doc[i + 1]
            assert name in NAMES and doc[i + 2] in (EQ, IS)
            if doc[i + 2] == IS:  # VAR X IS d1..d5 .  (the value of handle X's open record)
                assert doc[i + 8] == DOT
                out.append(("bind", (name, digits(i + 3)), i))
                i += 9
            elif doc[i + 3] == V["VAR"]:
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
    if q[1] == KEY and q[-1] == IS:  # QRY KEY a b IS: the value bound to a deferred record
        assert len(q) == 5
        return list(bind_records(stmts)[tuple(q[2:4])][1]) + [EOS]
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


def bind_records(stmts):
    """The binding rule of deferred_binding, from the parsed statements alone: a value statement
    `VAR X IS v` belongs to the most recent open statement of handle X, which must not have a
    value yet; every record gets exactly one. -> {key pair: (handle, value, open start, value start)}."""
    current, records = {}, {}
    for kind, f, pos in stmts:
        if kind == "open":
            key, handle = tuple(f[0]), f[1]
            assert key not in records, "a key opened twice"
            assert handle not in current, "a handle reopened before its record got a value"
            current[handle] = key
            records[key] = (handle, None, pos, None)
        elif kind == "bind":
            handle, value = f
            key = current.pop(handle)  # KeyError: a value with no open record on its handle
            records[key] = (handle, value, records[key][2], pos)
    assert not current, "a record never got its value"
    return records


def split_row(row):
    """A sample_batch row -> (document, [(query, answer), ...]) using only the grammar."""
    row = [int(t) for t in row]
    start = row.index(QRY)
    pairs, i = [], start
    while i < len(row):
        assert row[i] == QRY
        if row[i + 1] == KEY:  # QRY KEY k1 k2 [IS]
            a = i + 4 if row[i + 4] == IS else i + 3
        else:  # QRY ... ANS
            a = row.index(ANS, i)
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
        if task == "multikey_niah":
            assert list(ex.query[:2]) == [QRY, KEY]
        else:
            assert ex.query[0] == QRY and ex.query[-1] == (IS if task == "deferred_binding" else ANS)


@pytest.mark.parametrize(
    "task,kw,minimum",
    [
        ("passkey", {}, 16 + 8),
        ("multikey_niah", {"num_keys": 4}, 16 + 36),
        ("variable_tracking", {"num_chains": 2, "num_hops": 3}, 16 + 2 * (9 + 18)),
        ("deferred_binding", {"num_records": 4, "num_handles": 2}, 16 + 4 * (7 + 9)),
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


@pytest.mark.parametrize("task", ["multikey_niah", "variable_tracking", "deferred_binding"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.6, 1.0])
def test_queried_needle_sits_at_depth(task, depth):
    length = 8192
    ex = make(task, 2, length, depth)
    stmts = {s[2]: s for s in parse_document(ex.document)}
    first = ex.needle_positions[0]
    assert first in stmts  # a statement starts there
    if task == "multikey_niah":
        assert stmts[first][0] == "key" and list(stmts[first][1][0]) == list(ex.query[2:4])
    elif task == "deferred_binding":
        assert stmts[first][0] == "open" and list(stmts[first][1][0]) == list(ex.query[2:4])
    else:
        assert stmts[first][0] == "assign" and stmts[first][1][0] == ex.answer[0]
    size = {"passkey": 8, "key": 9, "assign": 9, "copy": 6, "open": 7, "bind": 9}
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
    mix = {"passkey": 1, "multikey_niah": 2, "variable_tracking": 2, "deferred_binding": 2}
    out = tasks.sample_batch(rng, mix, length, batch)
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
        roots = [s for s in stmts if s[0] in ("passkey", "key", "assign", "open")]
        assert len(roots) == n  # as many queries as needles (multikey, deferred: keys drawn with replacement)
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


# --- deferred binding -------------------------------------------------------------------------


def deferred(seed, length=2048, depth=None, **kw):
    return make("deferred_binding", seed, length, depth, **kw)


def asked_key(ex):
    return tuple(int(t) for t in ex.query[2:4])


@pytest.mark.parametrize("num_records,num_handles", [(2, 1), (6, 2), (9, 3), (16, 8)])
def test_deferred_layout(num_records, num_handles):
    for seed in range(10):
        ex = deferred(seed, 3000, num_records=num_records, num_handles=num_handles)
        stmts = parse_document(ex.document)
        assert {k for k, _, _ in stmts} == {"open", "bind"}
        records = bind_records(stmts)  # every value follows its handle's open, one value per record
        assert len(records) == num_records
        per_handle = collections.Counter(r[0] for r in records.values())
        assert len(per_handle) == num_handles
        assert min(per_handle.values()) >= 2 and max(per_handle.values()) - min(per_handle.values()) <= 1
        assert len({r[1] for r in records.values()}) == num_records  # distinct values
        key = asked_key(ex)
        handle, value, p_open, p_value = records[key]
        assert ex.needle_positions == (p_open, p_value) and p_open < p_value
        a, b = (tk.VOCAB[t] for t in key)
        assert ex.query_text == f"QRY KEY {a} {b} IS"
        assert ex.answer_text == " ".join(tk.VOCAB[t] for t in value) + " </s>"
        h = tk.VOCAB[handle]
        assert tk.ids_to_text(ex.document[p_open : p_open + 7]) == f"KEY {a} {b} = VAR {h} ."
        assert tk.ids_to_text(ex.document[p_value : p_value + 9]) == f"VAR {h} IS {ex.answer_text[:-5]} ."
        # the key words appear once in the document (the value statement does not repeat them)
        doc = list(ex.document)
        assert sum(doc[i : i + 2] == list(key) for i in range(len(doc) - 1)) == 1


def nearest_open_answer(stmts, key):
    """Shortcut 1: a value belongs to the nearest open statement before it, whatever its handle."""
    last, found = None, []
    for kind, f, _ in stmts:
        if kind == "open":
            last = tuple(f[0])
        elif kind == "bind" and last == key:
            found.append(list(f[1]) + [EOS])
    return found[0] if len(found) == 1 else None


def first_value_after(stmts, key):
    """Shortcut 2: the first value statement after the key's open statement."""
    (start,) = [p for k, f, p in stmts if k == "open" and tuple(f[0]) == key]
    return next(list(f[1]) + [EOS] for k, f, p in stmts if k == "bind" and p > start)


def test_deferred_needs_the_binding_rule():
    """The rule resolves every example; the nearest-record shortcuts fail on a good fraction; the handle alone
    always leaves several candidate values (so a query that finds the key's handle cannot pick the value)."""
    n, wrong_nearest, wrong_first = 200, 0, 0
    for seed in range(n):
        ex = deferred(seed, 1024)
        stmts = parse_document(ex.document)
        key = asked_key(ex)
        assert oracle(ex.document, ex.query) == list(ex.answer)
        wrong_nearest += nearest_open_answer(stmts, key) != list(ex.answer)
        wrong_first += first_value_after(stmts, key) != list(ex.answer)
        handle = bind_records(stmts)[key][0]
        candidates = {tuple(f[1]) for k, f, _ in stmts if k == "bind" and f[0] == handle}
        assert len(candidates) >= 3  # six records over two handles: three values per handle
    assert wrong_nearest / n > 0.3 and wrong_first / n > 0.3, (wrong_nearest, wrong_first)


def test_deferred_answer_follows_the_statement_order():
    """Swapping the value digits of two records of the asked handle changes the resolved answer, and a value
    moved before its record's open statement is rejected: the resolver reads the order, not the tokens alone."""
    ex = deferred(3, 1024)
    stmts = parse_document(ex.document)
    records = bind_records(stmts)
    handle, value, _, p_value = records[asked_key(ex)]
    other = next(r for k, r in records.items() if r[0] == handle and k != asked_key(ex))
    doc = np.array(ex.document)
    doc[p_value + 3 : p_value + 8], doc[other[3] + 3 : other[3] + 8] = other[1], value
    assert oracle(doc, ex.query) == list(other[1]) + [EOS] != list(ex.answer)
    first_open = min(p for k, _, p in stmts if k == "open")
    doc = np.array(ex.document)
    moved = np.concatenate([doc[:first_open], doc[p_value : p_value + 9], doc[first_open:p_value], doc[p_value + 9 :]])
    with pytest.raises(KeyError):
        oracle(moved, ex.query)


def star_visible(layout, p):
    """Document positions a Star host's row at document position p attends to: anchor doc[:A] and its block up
    to p."""
    blk = p // layout.block
    return set(range(layout.anchor)) | set(range(blk * layout.block, p + 1))


def token_split(ex, hosts):
    """host_split by brute force over every token: visibility sets instead of block indices."""
    from apb_jax.strategies import make_layout

    lay = make_layout("star", hosts, len(ex.document), len(ex.query)) if hosts > 1 else None
    block = -(-len(ex.document) // hosts)
    k, v = ex.needle_positions
    key, val = set(range(k, k + 7)), range(v, v + 9)
    if len({p // block for p in key} | {p // block for p in val}) == 1:
        return "same_host"
    if max(key) < block and min(val) >= block:
        return "key_in_anchor"
    if min(key) >= block and all(not key & star_visible(lay, p) for p in val):
        return "cross_host"
    return "mixed"


@pytest.mark.parametrize("hosts", [1, 3, 4, 8])
def test_host_split_reports_where_the_record_falls(hosts):
    got = collections.Counter()
    for seed in range(300):
        ex = deferred(seed, 2048)
        split = tasks.host_split(ex, hosts)
        assert split == token_split(ex, hosts), (seed, ex.needle_positions)
        got[split] += 1
    if hosts == 1:
        assert set(got) == {"same_host"}
    else:
        assert got["same_host"] and got["key_in_anchor"] and got["cross_host"], got
    ex = deferred(0, 2048)
    block = -(-2048 // 4)
    straddle = dataclasses.replace(ex, needle_positions=(block - 3, ex.needle_positions[1] + 2 * block))
    assert tasks.host_split(straddle, 4) == token_split(straddle, 4) == "mixed"


@pytest.mark.parametrize("hosts", [3, 4, 8])
@pytest.mark.parametrize("split", tasks.DEFERRED_SPLITS)
def test_deferred_split_is_forced(split, hosts):
    length = 4096
    block = -(-length // hosts)
    pairs = set()
    for seed in range(30):
        ex = deferred(seed, length, split=split, hosts=hosts)
        assert tasks.host_split(ex, hosts) == token_split(ex, hosts) == split
        assert oracle(ex.document, ex.query) == list(ex.answer)
        k, v = ex.needle_positions
        pairs.add((k // block, v // block))
        size = {"open": 7, "bind": 9}
        stmts = parse_document(ex.document)
        filler_before = k - tasks.PREFIX_LEN - sum(size[kind] for kind, _, p in stmts if p < k)
        assert ex.depth == filler_before / (length - tasks.PREFIX_LEN - sum(size[kind] for kind, _, _ in stmts))
    want = {
        "same_host": {(h, h) for h in range(hosts)},
        "key_in_anchor": {(0, h) for h in range(1, hosts)},
        "cross_host": {(a, b) for a in range(1, hosts) for b in range(a + 1, hosts)},
    }[split]
    assert pairs <= want and len(pairs) >= min(len(want), 3)  # several block pairs, all of the asked kind


@pytest.mark.parametrize("hosts", [3, 4])
def test_cross_host_key_is_invisible_to_star_value_rows(hosts):
    """The attention-mask argument, on the real layouts: for cross_host examples no row of the value statement
    can attend to the key under Star (anchor = block 0, then its own block causally) nor through APB's anchor or
    own block (only its passing blocks can carry it), while full attention (causal) sees it. same_host and
    key_in_anchor examples give Star's value rows the whole key."""
    from apb_jax.strategies import make_layout

    length = 2048
    for seed in range(10):
        for split in tasks.DEFERRED_SPLITS:
            ex = deferred(seed, length, split=split, hosts=hosts)
            q = len(ex.query)
            k, v = ex.needle_positions
            key, val = set(range(k, k + 7)), range(v, v + 9)
            star = make_layout("star", hosts, length, q)
            apb = make_layout("apb", hosts, length, q)
            assert star.anchor == star.block == -(-length // hosts)
            assert all(key <= set(range(p + 1)) for p in val)  # full attention: causal
            if split == "cross_host":
                for p in val:
                    assert not key & star_visible(star, p)
                    blk = p // apb.block  # APB: doc[:A - Q] in the anchor (the query inserted), own block causally
                    apb_sees = set(range(apb.anchor - q)) | set(range(blk * apb.block, p + 1))
                    assert not key & apb_sees
            else:
                assert all(key <= star_visible(star, p) for p in val)


def test_deferred_is_deterministic_and_bad_arguments_raise():
    kw = dict(split="cross_host", hosts=4)
    a = tasks.make_examples("deferred_binding", 5, 3, 2048, **kw)
    b = tasks.make_examples("deferred_binding", 5, 4, 2048, **kw)[:3]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.document, y.document)
        assert x.needle_positions == y.needle_positions and x.depth == y.depth
    assert deferred(1, 2048, 0.25).depth == 0.25
    for kw, msg in [
        (dict(num_records=3, num_handles=2), r"num_records=3 must be in \[2 \* num_handles"),
        (dict(num_handles=0), "num_handles=0"),
        (dict(num_handles=65, num_records=130), "num_handles=65"),
        (dict(split="far"), "split='far' must be None or one of"),
        (dict(split="cross_host", hosts=2), r"hosts >= 3, got hosts=2"),
        (dict(split="key_in_anchor"), r"hosts >= 2, got hosts=None"),
        (dict(hosts=4), "hosts=4 is only used with split"),
        (dict(depth=0.5, split="same_host", hosts=2), "cannot both be set"),
        (dict(depth=-0.1), r"depth=-0\.1"),
    ]:
        with pytest.raises(ValueError, match=msg):
            tasks.deferred_binding(np.random.default_rng(0), 2048, **kw)
    with pytest.raises(ValueError, match=r"length=300 over hosts=8 .* too short for split='cross_host'"):
        tasks.deferred_binding(np.random.default_rng(0), 300, split="cross_host", hosts=8)
    with pytest.raises(ValueError, match="task='passkey'"):
        tasks.host_split(make("passkey", 0, 200), 4)
    with pytest.raises(ValueError, match="hosts=0"):
        tasks.host_split(deferred(0), 0)


def test_sample_batch_deferred_binding():
    rng = np.random.default_rng(0)
    out = tasks.sample_batch(rng, "deferred_binding", 1024, 24, min_needles=1, max_needles=8)
    assert (out.task_ids == tasks.TASKS.index("deferred_binding")).all()
    handles, repeats = set(), 0
    for row, mask in zip(out.tokens, out.loss_mask):
        doc, pairs = split_row(row)
        records = bind_records(parse_document(doc))
        n = len(records)
        assert 2 <= n <= 8 and len(pairs) == n  # at least two records (a handle names two), a query per record
        per_handle = collections.Counter(r[0] for r in records.values())
        assert min(per_handle.values()) >= 2
        handles.add(len(per_handle))
        expect = np.zeros(len(row), np.float32)
        for q, a, start in pairs:
            assert q[-1] == IS and oracle(doc, q) == a
            expect[start : start + len(a)] = 1.0  # the digits and </s>, not the query
        np.testing.assert_array_equal(mask, expect)
        assert mask.sum() == 6 * n
        repeats += len({tuple(q[2:4]) for q, _, _ in pairs}) < n
    assert len(handles) > 1 and repeats > 0  # handle counts vary; keys asked with replacement
    with pytest.raises(ValueError, match="length=100 is too short for deferred_binding: two records"):
        tasks.sample_batch(rng, "deferred_binding", 100, 2)


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
