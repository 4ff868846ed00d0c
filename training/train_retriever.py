"""Train the embedded retriever: a tiny Llama on the synthetic long-context tasks.

    python training/train_retriever.py --out apb_jax/assets/retriever --time-budget-s 480

The model is the project's own `LlamaForCausalLM` (float32 params, bfloat16 matmuls, cuDNN attention on a GPU), so
what is trained is exactly what `apb_jax.load` runs. Recipe (what worked in the §10 probe):
- data: `apb_jax.tasks.sample_batch`, several needles per row and one query per needle, loss on the answer tokens
  only (dense supervision); a task mix of passkey, multikey NIAH and variable tracking (and deferred binding, the
  task Star Attention cannot solve across hosts: `--task-mix ...,deferred_binding:2`);
- curriculum: start at 128 tokens with a fixed token budget per step (the batch halves as the length doubles);
  move to the next length once the running accuracy on each answer's *first* token at the current one passes
  `advance_acc` for every task of the mix (`gate=min`; or after `max_stage_steps`); a fraction `replay` of the
  steps revisits a shorter length; the number of needles per row grows with the stage. The first token is the one
  that needs the lookup (which key, which chain); the rest of an answer is copied from the needle once its start is
  known. Gating on all answer tokens let the first model leave 128 tokens with 5 of 6 tokens right and the lookup
  at chance, and it never learned it; pooling the tasks' first tokens (`gate=mean`, runs 3-4) let it leave each
  length with passkey and variable tracking learned and multikey at chance;
- AdamW (b2 0.95), gradient-norm clip 1.0, linear warm-up then constant, and a linear cool-down over the last
  `cooldown` fraction of the time budget.
Batches are built by worker processes ahead of the step that needs them. Training stops at `--steps` or at
`--time-budget-s`, whichever comes first, then evaluates exact-match accuracy (teacher-forced: every answer token
is the argmax, which is the same as greedy decoding getting the whole answer) on fresh examples and exports an HF
directory (`config.json` with model_type llama, `model.safetensors`, the tokenizer files) that `transformers` and
`apb_jax.load` both read. `--ckpt-dir` keeps an orbax checkpoint (params, optimizer state, curriculum) to resume
from. The loss/accuracy history goes to a JSON file and a plot.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from apb_jax.tasks import TASKS, make_examples, sample_batch  # noqa: E402  (numpy only: safe in spawned workers)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # model (Llama with GQA, the shape of a small retrieval probe)
    layers: int = 4
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 32
    intermediate: int = 768
    rope_theta: float = 1e6
    max_position_embeddings: int = 131072
    # optimisation
    lr: float = 1e-3
    warmup: int = 100
    cooldown: float = 0.15  # fraction of the time budget (or of --steps) over which lr falls to 10%
    weight_decay: float = 0.01
    clip: float = 1.0
    # curriculum
    tokens_per_step: int = 32768
    start_len: int = 128
    max_len: int = 16384
    advance_acc: float = 0.9
    min_stage_steps: int = 100
    max_stage_steps: int = 3000
    replay: float = 0.3
    max_needles: int = 8
    min_needles: int = 1  # needles per row are uniform in [min_needles, the stage's max] (max_needles caps both)
    max_hops: int = 4
    first_token_weight: float = 1.0  # loss weight of each answer's first token (the one that needs the lookup)
    task_mix: str = "passkey:1,multikey_niah:2,variable_tracking:2"
    gate: str = "min"  # advance when every task's first-token accuracy passes advance_acc ("min") or their mean
    seed: int = 0
    compute_dtype: str = "bfloat16"

    def __post_init__(self):
        def need(ok, what):
            if not ok:
                raise ValueError(what)

        need(self.layers >= 1, f"layers={self.layers} must be >= 1")
        need(self.heads % self.kv_heads == 0, f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        need(self.lr > 0, f"lr={self.lr} must be > 0")
        need(self.warmup >= 0, f"warmup={self.warmup} must be >= 0")
        need(0 <= self.cooldown < 1, f"cooldown={self.cooldown} must be in [0, 1)")
        need(
            self.start_len >= 64 and self.start_len & (self.start_len - 1) == 0,
            f"start_len={self.start_len} must be a power of two >= 64",
        )
        need(self.max_len >= self.start_len, f"max_len={self.max_len} must be >= start_len={self.start_len}")
        need(
            self.tokens_per_step >= self.max_len,
            f"tokens_per_step={self.tokens_per_step} must be >= max_len={self.max_len} (one row per step at least)",
        )
        need(0 < self.advance_acc <= 1, f"advance_acc={self.advance_acc} must be in (0, 1]")
        need(
            1 <= self.min_stage_steps <= self.max_stage_steps,
            f"need 1 <= min_stage_steps ({self.min_stage_steps}) <= max_stage_steps ({self.max_stage_steps})",
        )
        need(0 <= self.replay < 1, f"replay={self.replay} must be in [0, 1)")
        need(
            1 <= self.min_needles <= self.max_needles,
            f"need 1 <= min_needles ({self.min_needles}) <= max_needles ({self.max_needles})",
        )
        need(self.first_token_weight > 0, f"first_token_weight={self.first_token_weight} must be > 0")
        need(self.gate in ("min", "mean"), f"gate={self.gate!r} must be 'min' or 'mean'")
        need(
            self.compute_dtype in ("bfloat16", "float32"),
            f"compute_dtype={self.compute_dtype!r} must be 'bfloat16' or 'float32'",
        )
        parse_mix(self.task_mix)

    def model_config(self):
        from apb_jax.config import ModelConfig, RopeConfig
        from apb_jax.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

        return ModelConfig(
            model_type="llama",
            vocab_size=VOCAB_SIZE,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_layers=self.layers,
            num_heads=self.heads,
            num_kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=1e-5,
            rope=RopeConfig(theta=self.rope_theta),
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=True,
            bos_token_id=BOS_ID,
            eos_token_ids=(EOS_ID,),
            pad_token_id=PAD_ID,
            dtype="float32",
        )


def parse_mix(text: str) -> dict[str, float]:
    """'passkey:1,multikey_niah:2' (or 'passkey,multikey_niah' for equal weights) -> {task: weight}."""
    mix = {}
    for part in text.split(","):
        name, _, w = part.strip().partition(":")
        if name not in TASKS:
            raise ValueError(f"task_mix names {name!r}; allowed tasks: {TASKS}")
        try:
            mix[name] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"task_mix weight {w!r} of {name!r} is not a number") from None
        if not mix[name] >= 0:
            raise ValueError(f"task_mix weight of {name!r} is {mix[name]}; must be >= 0")
    if sum(mix.values()) <= 0:
        raise ValueError(f"task_mix={text!r} gives no task a positive weight")
    return mix


def eval_task_list(text: str | None, task_mix: str) -> list[str]:
    """The tasks to evaluate: 'a,b' (`--eval-tasks`), or when None those of `task_mix` with a positive weight, in
    TASKS order."""
    if text is None:
        mix = parse_mix(task_mix)
        return [t for t in TASKS if mix.get(t, 0) > 0]
    names = [t.strip() for t in text.split(",") if t.strip()]
    for t in names:
        if t not in TASKS:
            raise ValueError(f"--eval-tasks names {t!r}; allowed tasks: {TASKS}")
    if not names:
        raise ValueError(f"--eval-tasks={text!r} names no task; allowed tasks: {TASKS}")
    return names


class Curriculum:
    """Length stages start_len, 2*start_len, ... max_len; batch = tokens_per_step // length.

    `propose(rng)` picks the next step's (length, batch, max_needles, replay?); `observe(length, correct, count)`
    feeds back the accuracy of finished steps on the answers' first tokens (only steps at the current stage's length
    count).
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.lengths = []
        n = cfg.start_len
        while n <= cfg.max_len:
            self.lengths.append(n)
            n *= 2
        if self.lengths[-1] != cfg.max_len:
            self.lengths.append(cfg.max_len)
        self.stage = 0
        self.steps_in_stage = 0
        self.task_ema: dict[str, float] = {}  # running first-token accuracy per task ("all" when pooled)
        self.events: list[dict] = []

    @property
    def length(self) -> int:
        return self.lengths[self.stage]

    def needles(self, stage: int) -> int:
        return max(self.cfg.min_needles, min(self.cfg.max_needles, 2 + stage))

    def batch(self, length: int) -> int:
        return max(1, self.cfg.tokens_per_step // length)

    def propose(self, rng: np.random.Generator) -> tuple[int, int, int, bool]:
        stage, replay = self.stage, False
        if stage > 0 and rng.uniform() < self.cfg.replay:
            stage, replay = int(rng.integers(0, self.stage)), True
        length = self.lengths[stage]
        return length, self.batch(length), self.needles(self.stage), replay

    @property
    def ema(self) -> float | None:
        """The gate: the lowest running accuracy of the tasks seen at this stage (or the pooled one)."""
        return min(self.task_ema.values()) if self.task_ema else None

    def observe(self, length: int, correct, count, step: int) -> None:
        """correct/count: first-token hits and answers of one step, scalars (pooled) or one entry per task (TASKS
        order).

        Per task, a running mean (EMA 0.9) of the accuracy; the stage is passed when the gate (`min`: every task
        seen at this stage, `mean`: all answers pooled) reaches `advance_acc` after `min_stage_steps`."""
        correct, count = np.asarray(correct, float), np.asarray(count, float)
        if length != self.length or count.sum() <= 0:
            return
        if self.cfg.gate == "mean" or correct.ndim == 0:
            per_task = {"all": (correct.sum(), count.sum())}
        else:
            per_task = dict(zip(TASKS, zip(correct, count)))
        for name, (c, n) in per_task.items():
            if n > 0:
                old = self.task_ema.get(name)
                self.task_ema[name] = c / n if old is None else 0.9 * old + 0.1 * c / n
        self.steps_in_stage += 1
        last = self.stage == len(self.lengths) - 1
        ready = self.steps_in_stage >= self.cfg.min_stage_steps and self.ema >= self.cfg.advance_acc
        if not last and (ready or self.steps_in_stage >= self.cfg.max_stage_steps):
            self.events.append(
                {
                    "step": step,
                    "from": self.length,
                    "to": self.lengths[self.stage + 1],
                    "ema_acc": round(self.ema, 4),
                    "steps_in_stage": self.steps_in_stage,
                    "task_ema": {t: round(float(v), 4) for t, v in self.task_ema.items()},
                    "reason": "accuracy" if ready else "max_stage_steps",
                }
            )
            self.stage += 1
            self.steps_in_stage = 0
            self.task_ema = {}

    def state(self) -> dict:
        return {
            "stage": self.stage,
            "steps_in_stage": self.steps_in_stage,
            "task_ema": dict(self.task_ema),
            "events": self.events,
        }

    def load_state(self, st: dict) -> None:
        self.stage = min(int(st["stage"]), len(self.lengths) - 1)
        self.steps_in_stage = int(st["steps_in_stage"])
        self.task_ema = {str(t): float(v) for t, v in st.get("task_ema", {}).items()}
        self.events = list(st["events"])


def _make_batch(job):
    """Worker: one training batch (numpy only)."""
    seed, mix, length, batch, min_needles, needles, hops = job
    b = sample_batch(
        np.random.default_rng(seed), mix, length, batch, min_needles=min_needles, max_needles=needles, max_hops=hops
    )
    return b.tokens, b.loss_mask, b.task_ids


class Batches:
    """Batches built `depth` steps ahead by `workers` processes (0: in this process)."""

    def __init__(self, cfg: TrainConfig, curriculum: Curriculum, workers: int, depth: int, seed: int):
        self.cfg, self.cur = cfg, curriculum
        self.mix = parse_mix(cfg.task_mix)
        self.rng = np.random.default_rng([seed, 1])
        self.counter = 0
        self.seed = seed
        self.pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) if workers > 0 else None
        self.queue: deque = deque()
        self.depth = depth if workers > 0 else 0

    def _job(self):
        length, batch, needles, replay = self.cur.propose(self.rng)
        self.counter += 1
        job = ((self.seed, 2, self.counter), self.mix, length, batch, self.cfg.min_needles, needles, self.cfg.max_hops)
        return job, {"length": length, "batch": batch, "needles": needles, "replay": replay}

    def next(self):
        if self.pool is None:
            job, info = self._job()
            return _make_batch(job), info
        while len(self.queue) < self.depth + 1:
            job, info = self._job()
            self.queue.append((self.pool.submit(_make_batch, job), info))
        fut, info = self.queue.popleft()
        return fut.result(), info

    def close(self):
        if self.pool is not None:
            for fut, _ in self.queue:
                fut.cancel()
            self.pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------------ model & steps


def build(cfg: TrainConfig):
    """(graphdef, params f32 nnx.State) of the model, seeded."""
    import jax.numpy as jnp
    from flax import nnx

    from apb_jax.models.llama import LlamaForCausalLM

    dt = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32
    module = LlamaForCausalLM(cfg.model_config(), dtype=dt, param_dtype=jnp.float32, rngs=nnx.Rngs(cfg.seed))
    return nnx.split(module)


def _masked_stats(logits, tokens, mask):
    """Cross-entropy and argmax hits of logits[:, :-1] against tokens[:, 1:] where mask[:, 1:]."""
    import jax
    import jax.numpy as jnp

    lg, tgt, m = logits[:, :-1], tokens[:, 1:], mask[:, 1:]
    lse = jax.nn.logsumexp(lg, axis=-1)
    picked = jnp.take_along_axis(lg, tgt[..., None], axis=-1)[..., 0]
    ce = (lse - picked) * m
    hits = (jnp.argmax(lg, axis=-1) == tgt).astype(jnp.float32) * m
    return ce, hits, m


def make_optimizer(cfg: TrainConfig):
    """Gradient clip + AdamW direction; the learning rate is applied by the step (it follows the clock)."""
    import optax

    return optax.chain(
        optax.clip_by_global_norm(cfg.clip),
        optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8),
        optax.add_decayed_weights(cfg.weight_decay),
    )


def first_answer_tokens(mask):
    """[B, T] mask -> [B, T - 1] float: 1 where target t + 1 is the first token of an answer."""
    import jax.numpy as jnp

    prev = jnp.pad(mask, ((0, 0), (1, 0)))[:, :-1]
    return (mask * (1.0 - prev))[:, 1:]


def _backend() -> str | None:
    """cuDNN on a GPU (the Pallas kernels have no backward pass); the dispatcher's choice elsewhere."""
    import jax

    return "cudnn" if jax.default_backend() == "gpu" else None


def make_train_step(graphdef, optimizer, first_token_weight: float = 1.0):
    """jit step(params, opt_state, tokens, mask, task_ids, lr) -> (params, opt_state, stats) with stats =
    [loss, hits, count, gnorm, first_hits, first_count, first_hits per task..., first_count per task...] (tasks in
    TASKS order); the loss weighs each answer's first token by `first_token_weight` (hits/counts are unweighted)."""
    import jax
    import jax.numpy as jnp
    import optax

    from apb_jax.model import forward_logits

    def loss_fn(params, tokens, mask, task_ids):
        ce, hits, m = _masked_stats(forward_logits(graphdef, params, tokens, _backend()), tokens, mask)
        first = first_answer_tokens(mask)
        w = m + (first_token_weight - 1.0) * first
        loss = (ce * w).sum() / jnp.maximum(w.sum(), 1.0)
        onehot = jax.nn.one_hot(task_ids, len(TASKS), dtype=jnp.float32)  # [B, tasks]
        per_hits, per_count = (hits * first).sum(1) @ onehot, first.sum(1) @ onehot
        return loss, (hits.sum(), m.sum(), (hits * first).sum(), first.sum(), per_hits, per_count)

    @jax.jit
    def step(params, opt_state, tokens, mask, task_ids, lr):
        (loss, (hits, count, fh, fc, ph, pc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, tokens, mask, task_ids
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: -lr * u, updates)
        gnorm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        stats = jnp.concatenate([jnp.stack([loss, hits, count, gnorm, fh, fc]), ph, pc])
        return optax.apply_updates(params, updates), opt_state, stats

    return step


def make_eval_fn(graphdef):
    import jax
    import jax.numpy as jnp

    from apb_jax.model import forward_logits

    @jax.jit
    def f(params, tokens, mask):
        _, hits, m = _masked_stats(forward_logits(graphdef, params, tokens, _backend()), tokens, mask)
        return jnp.all((hits == m) | (m == 0), axis=1), hits.sum(1), m.sum(1)

    return f


def evaluate(
    graphdef,
    params,
    *,
    lengths,
    tasks=TASKS,
    num: int = 20,
    seed: int = 1234,
    tokens_per_batch: int = 65536,
    eval_fn=None,
    progress=None,
) -> dict:
    """Exact-match accuracy per task and length: {task: {length: {"exact": .., "token": .., "n": ..}}}.

    Teacher-forced: an example counts when the argmax is right at every answer token, which is exactly when greedy
    decoding produces the whole answer. Examples come from `make_examples(task, seed + length, ...)`, disjoint
    from training batches (those use sample_batch's own seeds) with overwhelming probability.
    """
    eval_fn = eval_fn or make_eval_fn(graphdef)
    out: dict = {}
    for task in tasks:
        out[task] = {}
        for length in lengths:
            exs = make_examples(task, seed + length, num, length)
            rows = [np.concatenate([e.document, e.query, e.answer]) for e in exs]
            n_ans = [len(e.answer) for e in exs]
            width = max(len(r) for r in rows)
            tok = np.zeros((len(rows), width), np.int32)
            msk = np.zeros((len(rows), width), np.float32)
            for i, (r, a) in enumerate(zip(rows, n_ans)):
                tok[i, : len(r)] = r
                msk[i, len(r) - a : len(r)] = 1.0
            bs = max(1, tokens_per_batch // width)
            exact, hits, count = [], 0.0, 0.0
            for lo in range(0, len(rows), bs):
                tb, mb = tok[lo : lo + bs], msk[lo : lo + bs]
                if len(tb) < bs and lo > 0:  # keep one compiled shape per length
                    pad = bs - len(tb)
                    tb = np.concatenate([tb, np.zeros((pad, width), np.int32)])
                    mb = np.concatenate([mb, np.zeros((pad, width), np.float32)])
                    e, h, c = (np.asarray(x)[: bs - pad] for x in eval_fn(params, tb, mb))
                else:
                    e, h, c = (np.asarray(x) for x in eval_fn(params, tb, mb))
                exact += list(e)
                hits += float(h.sum())
                count += float(c.sum())
            out[task][int(length)] = {"exact": float(np.mean(exact)), "token": hits / max(count, 1.0), "n": len(rows)}
            if progress is not None:
                progress(task, length, out[task][int(length)])
    return out


# ------------------------------------------------------------------------------------------------ export / ckpt


def export_hf(cfg: TrainConfig, params, out_dir: str | Path) -> Path:
    """Write an HF Llama directory: config.json, model.safetensors (HF names, torch [out, in] layout), tokenizer."""
    from flax import nnx
    from safetensors.numpy import save_file

    from apb_jax.tokenizer import build_tokenizer
    from converters.hf_to_flax import flax_to_hf_name

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, var in nnx.to_flat_state(params):
        path = tuple(path)
        arr = np.asarray(var.get_value() if hasattr(var, "get_value") else var.value, np.float32)
        if path[-1] == "kernel":
            arr = arr.T
        tensors[flax_to_hf_name(path)] = np.ascontiguousarray(arr)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.model_config().to_hf_dict()
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen = {
        "bos_token_id": hf["bos_token_id"],
        "eos_token_id": hf["eos_token_id"],
        "pad_token_id": hf["pad_token_id"],
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    build_tokenizer(out)
    return out


def save_checkpoint(ckpt_dir: str | Path, params, opt_state, meta: dict) -> None:
    import orbax.checkpoint as ocp

    d = Path(ckpt_dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    target = d / "state"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(target, {"params": params, "opt_state": opt_state}, force=True)
    ckptr.wait_until_finished()
    (d / "meta.json").write_text(json.dumps(meta))


def load_checkpoint(ckpt_dir: str | Path, params, opt_state):
    import orbax.checkpoint as ocp

    d = Path(ckpt_dir).resolve()
    restored = ocp.StandardCheckpointer().restore(d / "state", {"params": params, "opt_state": opt_state})
    return restored["params"], restored["opt_state"], json.loads((d / "meta.json").read_text())


# ------------------------------------------------------------------------------------------------ training loop


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Warm-up over `warmup` steps, constant, then linear to 10% over the last `cooldown` of `progress` in [0, 1]."""
    lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
    if cfg.cooldown > 0 and progress > 1 - cfg.cooldown:
        lr *= 1.0 - 0.9 * min(1.0, (progress - (1 - cfg.cooldown)) / cfg.cooldown)
    return lr


def init_params(cfg: TrainConfig, init_from: str | Path):
    """(graphdef, float32 params) of `cfg`'s model, with the weights of an exported model directory `init_from`
    (what `export_hf` wrote, or any HF Llama of exactly cfg's shape)."""
    import jax
    import jax.numpy as jnp

    import apb_jax

    graphdef, params = build(cfg)
    loaded = apb_jax.load(init_from, dtype="float32")
    want, got = cfg.model_config(), loaded.config
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
    diff = [f"{f} {getattr(got, f)} != {getattr(want, f)}" for f in fields if getattr(got, f) != getattr(want, f)]
    if diff:
        raise ValueError(
            f"init_from={str(init_from)!r} is not this config's model shape: {', '.join(diff)} "
            "(pass the same --layers/--hidden/... it was trained with)"
        )
    return graphdef, jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype), params, loaded.params)


def train(
    cfg: TrainConfig,
    *,
    steps: int | None = None,
    time_budget_s: float | None = None,
    workers: int = 0,
    ckpt_dir: str | Path | None = None,
    ckpt_every_s: float = 120.0,
    log_every: int = 10,
    progress: bool = True,
    init_from: str | Path | None = None,
):
    """Train from scratch, from the weights of an exported model `init_from` (fresh optimizer and curriculum: a
    fine-tune), or resume from `ckpt_dir` (which wins when it holds a checkpoint), until `steps` or `time_budget_s`.

    Returns (graphdef, params, history) with history = {"steps": [...], "curriculum": [...], ...}.
    """
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    if steps is None and time_budget_s is None:
        raise ValueError("give steps or time_budget_s (or both)")
    if steps is not None and steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if time_budget_s is not None and time_budget_s <= 0:
        raise ValueError(f"time_budget_s={time_budget_s} must be > 0")
    graphdef, params = build(cfg) if init_from is None else init_params(cfg, init_from)
    optimizer = make_optimizer(cfg)
    opt_state = optimizer.init(params)
    cur = Curriculum(cfg)
    start_step, records = 0, []
    if ckpt_dir is not None and (Path(ckpt_dir) / "meta.json").is_file():
        params, opt_state, meta = load_checkpoint(ckpt_dir, params, opt_state)
        start_step = int(meta["step"])
        cur.load_state(meta["curriculum"])
        records = meta.get("records", [])
    step_fn = make_train_step(graphdef, optimizer, cfg.first_token_weight)
    feed = Batches(cfg, cur, workers, depth=2 * max(workers, 1), seed=cfg.seed + 7919 * start_step)
    pending: list = []
    t0 = time.perf_counter()
    last_ckpt = t0
    compile_s = 0.0
    seen_shapes: set = set()
    bar = tqdm(total=steps, disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    step = start_step

    def flush():
        for s, info, stats in pending:
            stats = np.asarray(stats, np.float64)
            loss, hits, count, gnorm, fh, fc = (float(x) for x in stats[:6])
            per_hits, per_count = stats[6 : 6 + len(TASKS)], stats[6 + len(TASKS) :]
            cur.observe(info["length"], per_hits, per_count, s)
            records.append(
                {
                    "step": s,
                    "length": info["length"],
                    "batch": info["batch"],
                    "replay": info["replay"],
                    "needles": info["needles"],
                    "loss": round(loss, 5),
                    "acc": round(hits / max(count, 1.0), 5),
                    "first_acc": round(fh / max(fc, 1.0), 5),
                    "first_acc_task": {t: round(h / c, 4) for t, h, c in zip(TASKS, per_hits, per_count) if c > 0},
                    "gnorm": round(gnorm, 4),
                    "lr": info["lr"],
                    "time_s": round(info["t"], 2),
                }
            )
        pending.clear()
        if records:
            r = records[-1]
            bar.set_postfix(
                len=cur.length,
                loss=f"{r['loss']:.3f}",
                acc=f"{r['acc']:.3f}",
                first=f"{r['first_acc']:.3f}",
                ema=f"{cur.ema:.3f}" if cur.ema is not None else "-",
            )

    try:
        while True:
            elapsed = time.perf_counter() - t0 - compile_s
            if steps is not None and step - start_step >= steps:
                break
            if time_budget_s is not None and time.perf_counter() - t0 >= time_budget_s:
                break
            frac = [0.0]
            if steps is not None:
                frac.append((step - start_step) / steps)
            if time_budget_s is not None:
                frac.append(elapsed / max(time_budget_s - compile_s, 1e-9))
            lr = lr_at(cfg, step, max(frac))
            (tokens, mask, task_ids), info = feed.next()
            shape = tokens.shape
            tc = time.perf_counter()
            params, opt_state, stats = step_fn(
                params, opt_state, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(task_ids), jnp.float32(lr)
            )
            if shape not in seen_shapes:  # first call of a shape: compile time, kept out of the lr clock
                seen_shapes.add(shape)
                jax.block_until_ready(stats)
                compile_s += time.perf_counter() - tc
            info.update(lr=round(lr, 7), t=time.perf_counter() - t0)
            pending.append((step, info, stats))
            step += 1
            bar.update(1)
            if len(pending) >= log_every:
                flush()
            if ckpt_dir is not None and time.perf_counter() - last_ckpt > ckpt_every_s:
                flush()
                save_checkpoint(
                    ckpt_dir, params, opt_state, {"step": step, "curriculum": cur.state(), "records": records}
                )
                last_ckpt = time.perf_counter()
        flush()
    finally:
        bar.close()
        feed.close()
    if ckpt_dir is not None:
        save_checkpoint(ckpt_dir, params, opt_state, {"step": step, "curriculum": cur.state(), "records": records})
    history = {
        "steps": records,
        "curriculum": cur.events,
        "final_stage_length": cur.length,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "compile_seconds": round(compile_s, 1),
        "start_step": start_step,
        "end_step": step,
    }
    return graphdef, params, history


def plot_history(history: dict, evals: dict | None, path: str | Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = history["steps"]
    if not recs:
        return None
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(16 if evals else 11, 4))
    s = np.array([r["step"] for r in recs])
    main = np.array([not r["replay"] for r in recs])
    for ax, key in zip(axes[:2], ("loss", "acc")):
        y = np.array([r[key] for r in recs])
        ax.plot(s[main], y[main], ".", ms=1.5, alpha=0.4, label="current length")
        k = 50
        if main.sum() > k:
            sm = np.convolve(y[main], np.ones(k) / k, mode="valid")
            ax.plot(s[main][k - 1 :], sm, "-", lw=1.2, label=f"mean of {k}")
        for e in history["curriculum"]:
            ax.axvline(e["step"], color="grey", lw=0.5, alpha=0.5)
        ax.set_xlabel("step")
        ax.set_ylabel({"loss": "answer-token cross-entropy", "acc": "answer-token accuracy"}[key])
        if key == "loss":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[1].set_title("grey lines: curriculum doubles the length", fontsize=8)
    if evals:
        ax = axes[2]
        for task, per in evals.items():
            ls = sorted(per, key=int)
            ax.plot([int(x) for x in ls], [per[x]["exact"] for x in ls], "o-", label=task)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("document tokens")
        ax.set_ylabel("exact match (full attention)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="HF directory to export to (e.g. apb_jax/assets/retriever)")
    ap.add_argument(
        "--log", default=None, help="history JSON, a PNG beside it (default training/results/train_log_<date>.json)"
    )
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--time-budget-s", type=float, default=None)
    ap.add_argument("--workers", type=int, default=None, help="batch-building processes (default: cores - 2, max 8)")
    ap.add_argument("--ckpt-dir", default=None, help="orbax checkpoint directory (resumed from if it exists)")
    ap.add_argument("--ckpt-every-s", type=float, default=120.0)
    ap.add_argument("--eval-lengths", default="1024,4096,16384,32768")
    ap.add_argument("--eval-num", type=int, default=20)
    ap.add_argument(
        "--eval-tasks", default=None, help=f"comma-separated, of {','.join(TASKS)} (default: the --task-mix tasks)"
    )
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--init-from",
        default=None,
        help="exported model directory to start from (a fine-tune: fresh optimizer and curriculum)",
    )
    for f in dataclasses.fields(TrainConfig):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = ap.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    if args.steps is None and args.time_budget_s is None:
        ap.error("give --steps or --time-budget-s")
    eval_lengths = [int(x) for x in args.eval_lengths.split(",") if x]
    try:
        eval_tasks = eval_task_list(args.eval_tasks, cfg.task_mix)
    except ValueError as e:
        ap.error(str(e))
    workers = args.workers if args.workers is not None else max(0, min(8, (os.cpu_count() or 2) - 2))

    import jax

    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
        f"model {cfg.layers}L h{cfg.hidden} {cfg.heads}q/{cfg.kv_heads}kv d{cfg.head_dim}; workers {workers}",
        flush=True,
    )
    graphdef, params, history = train(
        cfg,
        steps=args.steps,
        time_budget_s=args.time_budget_s,
        workers=workers,
        ckpt_dir=args.ckpt_dir,
        ckpt_every_s=args.ckpt_every_s,
        progress=not args.no_progress,
        init_from=args.init_from,
    )
    print(
        f"trained {history['end_step'] - history['start_step']} steps in {history['train_seconds']} s "
        f"(compile {history['compile_seconds']} s); curriculum reached length {history['final_stage_length']}",
        flush=True,
    )
    for e in history["curriculum"]:
        acc = e.get("task_ema", e["ema_acc"])
        print(f"  step {e['step']}: {e['from']} -> {e['to']} ({e['reason']}, ema acc {acc})")
    t0 = time.perf_counter()
    evals = evaluate(
        graphdef,
        params,
        lengths=eval_lengths,
        tasks=eval_tasks,
        num=args.eval_num,
        progress=lambda t, n, r: print(
            f"  eval {t:<18} {n:>6}: exact {r['exact']:.3f} token {r['token']:.3f} (n={r['n']})", flush=True
        ),
    )
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    record = {
        "config": dataclasses.asdict(cfg),
        "params": n_params,
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "eval": evals,
        "eval_seconds": round(time.perf_counter() - t0, 1),
        **history,
    }
    log = Path(args.log) if args.log else ROOT / "training" / "results" / f"train_log_{time.strftime('%Y-%m-%d')}.json"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(json.dumps(record))
    png = plot_history(history, evals, log.with_suffix(".png"))
    print(f"log: {log}" + (f", plot: {png}" if png else ""))
    if args.out:
        out = export_hf(cfg, params, args.out)
        size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        print(f"exported {out} ({size / 2**20:.1f} MiB, {n_params / 1e6:.2f}M params)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
