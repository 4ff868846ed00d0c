"""training/train_retriever.py: the curriculum, the train step (it learns), export (transformers reads the same
model), checkpoint resume, evaluation and argument errors, on a tiny model on the CPU."""

import json

import numpy as np
import pytest

from tests.scripts import load_script


def _load():
    return load_script("training/train_retriever.py")


tr = _load()
TINY = dict(
    layers=2,
    hidden=64,
    intermediate=128,
    heads=4,
    kv_heads=2,
    head_dim=16,
    compute_dtype="float32",
    start_len=128,
    max_len=512,
    tokens_per_step=1024,
)


def test_curriculum_advances_on_accuracy_and_on_step_limit():
    cfg = tr.TrainConfig(**TINY, min_stage_steps=3, max_stage_steps=5, advance_acc=0.9, replay=0.0)
    cur = tr.Curriculum(cfg)
    assert cur.lengths == [128, 256, 512] and cur.batch(128) == 8 and cur.batch(512) == 2
    for s in range(3):
        cur.observe(128, 10, 10, s)  # perfect: advances after min_stage_steps
    assert cur.length == 256 and cur.events[-1]["reason"] == "accuracy"
    cur.observe(128, 10, 10, 3)  # a replayed length does not count
    assert cur.steps_in_stage == 0
    for s in range(5):
        cur.observe(256, 1, 10, 4 + s)  # poor: advances after max_stage_steps
    assert cur.length == 512 and cur.events[-1]["reason"] == "max_stage_steps"
    for s in range(10):
        cur.observe(512, 10, 10, 9 + s)  # last stage: stays
    assert cur.length == 512
    st = cur.state()
    other = tr.Curriculum(cfg)
    other.load_state(json.loads(json.dumps(st)))
    assert other.state() == st


def test_curriculum_min_gate_waits_for_the_weakest_task():
    """gate=min: two tasks perfect and one at chance hold the stage; the pooled gate (mean) would have moved on."""
    pk, mk, vt = (tr.TASKS.index(t) for t in ("passkey", "multikey_niah", "variable_tracking"))
    hits, count = np.zeros(len(tr.TASKS)), np.zeros(len(tr.TASKS))
    hits[[pk, vt]], count[[pk, mk, vt]] = 40, 40
    hits[mk] = 10
    for gate in ("min", "mean"):
        cur = tr.Curriculum(tr.TrainConfig(**TINY, min_stage_steps=2, max_stage_steps=50, advance_acc=0.7, gate=gate))
        for s in range(10):
            cur.observe(128, hits, count, s)
        assert cur.length == (256 if gate == "mean" else 128), gate  # pooled: 90/120 = 0.75 passes
    cur = tr.Curriculum(tr.TrainConfig(**TINY, min_stage_steps=2, max_stage_steps=50, advance_acc=0.7))
    for s in range(10):
        cur.observe(128, hits, count, s)
    assert cur.stage == 0 and abs(cur.ema - 0.25) < 1e-9
    full = hits.copy()
    full[mk] = 40
    cur.observe(128, full, count, 10)  # one step cannot lift the running mean past 0.7 ...
    assert cur.stage == 0
    for s in range(11, 40):
        cur.observe(128, full, count, s)  # ... a run of good steps does
    ev = cur.events[-1]
    seen = {"passkey", "multikey_niah", "variable_tracking"}  # a task with no answers in the stage does not gate
    assert cur.length == 256 and ev["reason"] == "accuracy" and set(ev["task_ema"]) == seen
    with pytest.raises(ValueError, match="gate"):
        tr.TrainConfig(**TINY, gate="max")


def test_curriculum_replays_shorter_lengths_and_grows_needles():
    cfg = tr.TrainConfig(**TINY, replay=0.5)
    cur = tr.Curriculum(cfg)
    rng = np.random.default_rng(0)
    assert {cur.propose(rng)[0] for _ in range(20)} == {128}  # stage 0 never replays
    cur.stage = 2
    props = [cur.propose(rng) for _ in range(400)]
    lengths = [p[0] for p in props]
    assert set(lengths) == {128, 256, 512}
    assert 0.4 < np.mean([p[3] for p in props]) < 0.6
    assert all(p[3] == (p[0] != 512) for p in props)
    assert cur.needles(0) == 2 and cur.needles(10) == cfg.max_needles


def test_train_step_learns_a_fixed_batch():
    """The step (loss, grads, clip, AdamW, lr) drives the answer loss of one batch down: it can fail."""
    import jax.numpy as jnp

    cfg = tr.TrainConfig(**TINY)
    graphdef, params = tr.build(cfg)
    opt = tr.make_optimizer(cfg)
    state = opt.init(params)
    step = tr.make_train_step(graphdef, opt, first_token_weight=3.0)
    b = tr.sample_batch(np.random.default_rng(0), "passkey", 128, 4)
    tok, mask = jnp.asarray(b.tokens), jnp.asarray(b.loss_mask)
    losses = []
    for _ in range(40):
        params, state, stats = step(params, state, tok, mask, jnp.asarray(b.task_ids), jnp.float32(3e-3))
        losses.append(float(stats[0]))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses
    assert float(stats[2]) == b.loss_mask[:, 1:].sum()  # every answer token counted once
    assert float(stats[5]) == 4  # one passkey answer per row: four first tokens
    per_count = np.asarray(stats[6 + len(tr.TASKS) :])
    np.testing.assert_array_equal(per_count, [4.0 if t == "passkey" else 0.0 for t in tr.TASKS])
    assert float(stats[6 + tr.TASKS.index("passkey")]) == float(stats[4])  # all first hits are passkey's


def test_train_step_on_deferred_binding_counts_its_first_tokens():
    """deferred_binding trains through the same step: its first answer tokens are counted under its own index."""
    import jax.numpy as jnp

    cfg = tr.TrainConfig(**TINY, task_mix="passkey:1,deferred_binding:2")
    assert tr.parse_mix(cfg.task_mix) == {"passkey": 1.0, "deferred_binding": 2.0}
    graphdef, params = tr.build(cfg)
    opt = tr.make_optimizer(cfg)
    step = tr.make_train_step(graphdef, opt, first_token_weight=3.0)
    b = tr.sample_batch(np.random.default_rng(0), tr.parse_mix(cfg.task_mix), 256, 8)
    _, _, stats = step(
        params, opt.init(params), jnp.asarray(b.tokens), jnp.asarray(b.loss_mask), jnp.asarray(b.task_ids), 1e-3
    )
    assert np.isfinite(np.asarray(stats)).all()
    per_count = np.asarray(stats[6 + len(tr.TASKS) :])
    want = [
        ((b.task_ids == i)[:, None] * (b.loss_mask[:, 1:] > b.loss_mask[:, :-1])).sum() for i in range(len(tr.TASKS))
    ]
    np.testing.assert_array_equal(per_count, want)  # one first token per answer, each under its task
    assert per_count[tr.TASKS.index("deferred_binding")] >= 2 * (b.task_ids == tr.TASKS.index("deferred_binding")).sum()


def test_eval_tasks_default_to_the_mix():
    assert tr.eval_task_list(None, "passkey:1,deferred_binding:2,multikey_niah:0") == ["passkey", "deferred_binding"]
    assert tr.eval_task_list("deferred_binding, passkey", "passkey") == ["deferred_binding", "passkey"]
    for bad, word in (("nope", "nope"), (",", "names no task")):
        with pytest.raises(ValueError, match=word):
            tr.eval_task_list(bad, "passkey")


def test_first_answer_tokens_marks_the_start_of_each_answer():
    mask = np.array([[0, 0, 1, 1, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0, 1, 0]], np.float32)
    got = np.asarray(tr.first_answer_tokens(mask))
    np.testing.assert_array_equal(got, [[0, 1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1, 0]])


def test_train_export_load_and_resume(tmp_path):
    """A short run exports an HF directory that apb_jax.load and transformers read to the same logits; resuming
    from the orbax checkpoint continues the step count and the curriculum."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import apb_jax

    cfg = tr.TrainConfig(**TINY, min_stage_steps=2, max_stage_steps=3)
    ck = tmp_path / "ckpt"
    graphdef, _params, hist = tr.train(cfg, steps=4, ckpt_dir=ck, progress=False, log_every=2)
    assert hist["start_step"] == 0 and hist["end_step"] == 4 and len(hist["steps"]) == 4
    assert all(np.isfinite(r["loss"]) for r in hist["steps"])
    assert hist["curriculum"] and hist["curriculum"][0]["to"] == 256
    _, params2, hist2 = tr.train(cfg, steps=3, ckpt_dir=ck, progress=False)
    assert hist2["start_step"] == 4 and hist2["end_step"] == 7 and len(hist2["steps"]) == 7
    assert hist2["curriculum"][0] == hist["curriculum"][0]

    out = tr.export_hf(cfg, params2, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == "llama" and hf_cfg["tie_word_embeddings"] is True
    ids = np.random.default_rng(1).integers(0, 512, (2, 33))
    ours = np.asarray(apb_jax.load(out, dtype="float32").logits(ids))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        theirs = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-4)
    # the trained params themselves (bf16 compute off here) give the same logits as the export
    from apb_jax.model import forward_logits

    direct = np.asarray(forward_logits(graphdef, params2, ids.astype(np.int32)))
    np.testing.assert_allclose(ours, direct, atol=2e-5, rtol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.decode([1, 4, 5]) == "<s> 0 1"

    # a fine-tune starts from the export's weights, and a model of another shape is refused by name
    _, init = tr.init_params(cfg, out)
    np.testing.assert_array_equal(np.asarray(forward_logits(graphdef, init, ids.astype(np.int32))), direct)
    with pytest.raises(ValueError, match=r"init_from=.*num_layers 2 != 3"):
        tr.init_params(tr.TrainConfig(**{**TINY, "layers": 3}), out)
    _, _, hist3 = tr.train(cfg, steps=2, progress=False, init_from=out)
    assert hist3["start_step"] == 0 and all(np.isfinite(r["loss"]) for r in hist3["steps"])


def test_evaluate_is_teacher_forced_exact_match():
    """With an eval function that is right everywhere / wrong at one answer token, exact is 1 / 0."""

    def perfect(params, tokens, mask):
        return np.ones(len(tokens), bool), mask[:, 1:].sum(1), mask[:, 1:].sum(1)

    res = tr.evaluate(None, None, lengths=[200], tasks=["passkey"], num=3, eval_fn=perfect)
    assert res["passkey"][200] == {"exact": 1.0, "token": 1.0, "n": 3}

    cfg = tr.TrainConfig(**TINY)
    graphdef, params = tr.build(cfg)
    res = tr.evaluate(
        graphdef, params, lengths=[160, 200], tasks=["passkey", "variable_tracking"], num=3, tokens_per_batch=400
    )
    for task in ("passkey", "variable_tracking"):
        for n in (160, 200):
            r = res[task][n]
            assert r["n"] == 3 and 0 <= r["exact"] <= r["token"] <= 1


@pytest.mark.parametrize(
    "kw, word",
    [
        (dict(start_len=100), "start_len"),
        (dict(max_len=64), "max_len"),
        (dict(tokens_per_step=256), "tokens_per_step"),
        (dict(heads=6, kv_heads=4), "kv_heads"),
        (dict(replay=1.0), "replay"),
        (dict(task_mix="passkey:1,nope:2"), "nope"),
        (dict(task_mix="passkey:x"), "not a number"),
        (dict(compute_dtype="float16"), "compute_dtype"),
        (dict(min_stage_steps=5, max_stage_steps=2), "min_stage_steps"),
    ],
)
def test_bad_config_is_a_clear_error(kw, word):
    with pytest.raises(ValueError, match=word):
        tr.TrainConfig(**{**TINY, **kw})


def test_bad_run_arguments():
    cfg = tr.TrainConfig(**TINY)
    with pytest.raises(ValueError, match="steps"):
        tr.train(cfg, steps=0, progress=False)
    with pytest.raises(ValueError, match="time_budget_s"):
        tr.train(cfg, time_budget_s=-1, progress=False)
    with pytest.raises(ValueError, match="steps or time_budget_s"):
        tr.train(cfg, progress=False)
