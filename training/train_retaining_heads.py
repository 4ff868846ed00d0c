"""Train retaining heads (Locret, arXiv 2410.01805) for a frozen model, the compressor of APB.

    python training/train_retaining_heads.py --model apb_jax/assets/retriever \\
        --out apb_jax/assets/retriever/retaining_heads.safetensors --length 8192 --steps 3000 --time-budget-s 100

Only the per-layer heads `fc2(act(fc1(concat(q_raw, k_raw, v))))` train (`apb_jax.compression.RetainingHeads`,
predictions through `retaining_head_scores` itself, so training and inference score alike); the model is frozen.
Every step: sample a batch of synthetic retrieval tasks (`apb_jax.tasks.sample_batch`), run the frozen model once
under jit with full causal attention, and keep, per layer, its own pre-RoPE (q_raw, k_raw, v) and the target; then
update the heads on those features (`updates_per_batch` times). No gradient ever reaches the model: the features
come out of a separate jitted function and only the heads are differentiated.

Target.  For layer l, key position j and KV head g: the log of the largest softmax attention probability key j
receives from any later query row i >= j (causal) and any query head of group g,

    target[l, j, g] = max_{i >= j, h in g} log p_l[i, h, j],    log p = q.k/sqrt(d) - logsumexp_row,

computed in float32 from the post-RoPE q and k the model attends with (`attention_with_importance`: a scan over
chunks of query rows, each against all keys with a causal mask, so memory is O(chunk * T) per layer, never [T, T];
the same pass returns the attention output the next layer needs).  `rows="all"` (default, the issue's definition)
takes every later row.  `rows="answers"` keeps only the rows of the query/answer tail (positions from the first
`QRY` on) and trains on the document's keys only: Locret's own choice of rows (its data_gen takes the answer
tokens' rows, with pre-softmax scores).  For APB the default is the better fit: at decode time the
query reads every host's exact cache, so what a passing block serves is the prefill of later document rows on
later hosts, not the answer.

Transformed space.  Predictions regress onto the *log* importance: top-k is unchanged by a monotone map, and
probabilities span orders of magnitude (most keys receive tiny ones, a few receive most of a row), so a regression
on raw p is decided by the few large values while the ranking among the many small ones (exactly where a passing
budget of P = B/16 cuts) is left to noise.  Log-probabilities live on the scale of Locret's own labels (its labels
are pre-softmax logits q.k/sqrt(d); ours subtract the row's logsumexp, which makes "importance" comparable across
rows whatever their length), so Smooth-L1 with beta 1 suits them as it does in Locret.  The targets are centred
per (sequence, layer, KV head) over the keys that count: the mean log-importance moves with the sequence length
(about -log T), which per-token pre-RoPE features cannot see, and a constant shift changes no ranking.

Loss (Locret's, from its train.py): SmoothL1(pred, target) (beta 1) averaged over tokens, layers and KV heads, plus
0.0025 x the mean squared difference of adjacent predictions (per layer, summed over layers as Locret sums it).
Optimiser as Locret: AdamW lr 5e-4, betas (0.9, 0.95), weight decay 0.01, each gradient value clipped to +-0.5,
linear warm-up then linear decay to 0 at the end: `steps`, or the time budget when that comes first (the decay
follows whichever of step count and elapsed time is further along, so a time-limited run still anneals).

What APB needs is the ranking: the top-P keys per KV head within each host's block.  Logged: `recall` = |predicted
top-k  and  true top-k| / k in blocks of `length // hosts` positions with k = block * keep (default 4 hosts and
keep 1/16, APB's P/B at 4 hosts), per layer and KV head; `recall_pooled` the same after APB's max-pool (kernel 5) of
the predictions; `needle_recall` = the fraction of the document's needle-value digits inside the predicted top-k
(`needle_recall_target`: the same for the true top-k, i.e. what perfect heads would keep).  A random-heads
baseline (the initial heads) is measured the same way on the same held-out batch; random ranking gives `keep`.

Hidden size: `default_hidden(config)` = half the input width rounded up to a power of two, between 128 and 1024
(Llama-3.1-8B: input (32 + 16) * 128 = 6144 -> 1024, the released heads' width; the tiny retriever (8 + 4) * 32 =
384 -> 256).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from apb_jax.compression import RetainingHeads, max_pool, retaining_head_scores  # noqa: E402
from apb_jax.models.llama import AttnCall  # noqa: E402

DEFAULT_TASK_MIX = ("passkey", "multikey_niah", "variable_tracking")
ROWS = ("all", "answers")
MIN_LENGTH = 128  # room for the longest needle + query + answer (variable tracking, 4 hops) in sample_batch
MIN_BLOCK = 16
SMOOTH_WEIGHT = 0.0025  # Locret's weight of the adjacent-prediction MSE
_CHUNK_ELEMS = 1 << 27  # float32 elements of one chunk's score block [B, H, chunk, T] (512 MiB)


# ------------------------------------------------------------------------------------------------ targets


def default_chunk(batch: int, heads: int, length: int) -> int:
    """Query rows per chunk: the largest power of two in [16, 1024] whose [batch, heads, chunk, length] float32
    block stays within 512 MiB (and no more than the sequence needs)."""
    c = 1 << max(0, math.floor(math.log2(max(1, _CHUNK_ELEMS // max(1, batch * heads * length)))))
    c = min(max(c, 16), 1024)
    return min(c, 1 << math.ceil(math.log2(max(length, 1))))


def attention_with_importance(
    q: jax.Array, k: jax.Array, v: jax.Array, *, chunk: int, row_mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Causal GQA attention and each key's log-importance, in float32, one chunk of query rows at a time.

    q [B, T, H, D] and k, v [B, T, KVH, D] (post-RoPE, as the model attends); row_mask bool [B, T] or None: which
    rows count for the importance (None: all).  Returns out [B, T, H, D] (q.dtype, full causal attention over all
    rows) and log_imp float32 [B, T, KVH]: max over rows i >= j with row_mask[i] and over the query heads of each
    KV group of log softmax(q k^T / sqrt(D))[i, h, j]; -inf where no counted row sees key j.  Memory per step of the
    scan: O(B * H * chunk * T); `chunk` need not divide T.
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    n = -(-t // chunk)
    tp = n * chunk
    hi = jax.lax.Precision.HIGHEST
    qf = q.astype(jnp.float32) / jnp.sqrt(jnp.float32(d))
    qf = jnp.pad(qf, ((0, 0), (0, tp - t), (0, 0), (0, 0))).reshape(b, n, chunk, kvh, g, d)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    rows = jnp.ones((b, t), bool) if row_mask is None else row_mask.astype(bool)
    rows = jnp.pad(rows, ((0, 0), (0, tp - t))).reshape(b, n, chunk)  # padded rows never count
    key_pos = jnp.arange(t, dtype=jnp.int32)

    def step(best, xs):
        qc, rc, lo = xs  # [B, C, KVH, G, D], [B, C], ()
        s = jnp.einsum("bckgd,bskd->bkgcs", qc, kf, precision=hi)  # [B, KVH, G, C, T]
        q_pos = lo + jnp.arange(chunk, dtype=jnp.int32)
        s = jnp.where(key_pos[None, :] <= q_pos[:, None], s, -jnp.inf)  # every row sees key 0: rows stay finite
        m = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - m)
        l = jnp.sum(e, axis=-1, keepdims=True)
        o = jnp.einsum("bkgcs,bskd->bckgd", e, vf, precision=hi) / jnp.moveaxis(l, 3, 1)  # normalise [C, D] not [C, T]
        logp = jnp.where(rc[:, None, None, :, None], s - (m + jnp.log(l)), -jnp.inf)
        return jnp.maximum(best, jnp.max(logp, axis=(2, 3))), o  # best [B, KVH, T]

    xs = (jnp.moveaxis(qf, 1, 0), jnp.moveaxis(rows, 1, 0), jnp.arange(n, dtype=jnp.int32) * chunk)
    best, outs = jax.lax.scan(step, jnp.full((b, kvh, t), -jnp.inf, jnp.float32), xs)
    out = jnp.moveaxis(outs, 0, 1).reshape(b, tp, h, d)[:, :t]
    return out.astype(q.dtype), jnp.swapaxes(best, 1, 2)


class Features(NamedTuple):
    """One batch as the heads see it.  q_raw [L, B, T, H, D], k_raw and v [L, B, T, KVH, D] (model dtype); target
    float32 [L, B, T, KVH] (centred log-importance, 0 where key_mask is False); key_mask bool [B, T]: keys that are
    trained on and ranked; needle bool [B, T]: the document's needle-value digits."""

    q_raw: jax.Array
    k_raw: jax.Array
    v: jax.Array
    target: jax.Array
    key_mask: jax.Array
    needle: jax.Array


def _token_masks(tokens: jax.Array, rows: str):
    """(row_mask or None, key_mask, needle) for `tokens` [B, T] of `apb_jax.tasks` (the tail starts at the first
    QRY; the document holds no QRY and its only digits are needle values)."""
    from apb_jax.tokenizer import token_id

    tail = jnp.cumsum(tokens == token_id("QRY"), axis=1) > 0
    digits = jnp.isin(tokens, jnp.asarray([token_id(str(i)) for i in range(10)], jnp.int32))
    needle = digits & ~tail
    if rows == "all":
        return None, jnp.ones(tokens.shape, bool), needle
    return tail, ~tail, needle


def make_feature_fn(model, *, rows: str = "all", chunk: int | None = None):
    """jitted (params, tokens int32 [B, T]) -> Features: the frozen model's forward with full causal attention,
    recording every layer's (q_raw, k_raw, v) and its target."""
    if rows not in ROWS:
        raise ValueError(f"rows={rows!r} is unknown; allowed: {ROWS}")
    from flax import nnx

    graphdef = model.graphdef
    heads = model.config.num_heads

    @jax.jit
    def features(params, tokens):
        b, t = tokens.shape
        c = chunk or default_chunk(b, heads, t)
        module = nnx.merge(graphdef, params)
        row_mask, key_mask, needle = _token_masks(tokens, rows)
        raw, targets = [], []

        def attention(call: AttnCall) -> jax.Array:
            out, imp = attention_with_importance(call.q, call.k, call.v, chunk=c, row_mask=row_mask)
            raw.append((call.q_raw, call.k_raw, call.v))
            targets.append(imp)
            return out

        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        module(tokens, pos, attention, rope_seq_len=t)
        target = jnp.stack(targets)  # [L, B, T, KVH]
        w = key_mask[None, :, :, None]
        target = jnp.where(w, target, 0.0)
        mean = jnp.sum(target, axis=2, keepdims=True) / jnp.maximum(jnp.sum(w, axis=2, keepdims=True), 1)
        target = jnp.where(w, target - mean, 0.0)
        q_raw, k_raw, v = (jnp.stack(x) for x in zip(*raw))
        return jax.lax.stop_gradient(Features(q_raw, k_raw, v, target, key_mask, needle))

    return features


# ------------------------------------------------------------------------------------------------ heads, loss, metrics


def default_hidden(config) -> int:
    """Half the retaining head's input width, rounded up to a power of two, within [128, 1024]."""
    d_in = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    return int(min(1024, max(128, 2 ** math.ceil(math.log2(d_in)) // 2)))


def predict(heads: RetainingHeads, feats: Features) -> jax.Array:
    """float32 [L, B, T, KVH]: every layer's head on its own features, through `retaining_head_scores`."""
    out = []
    for i in range(feats.q_raw.shape[0]):
        call = AttnCall(
            layer=i, q=feats.q_raw[i], k=feats.k_raw[i], v=feats.v[i], q_raw=feats.q_raw[i], k_raw=feats.k_raw[i]
        )
        out.append(retaining_head_scores(call, heads))
    return jnp.stack(out)


def locret_loss(pred: jax.Array, feats: Features, smooth_weight: float = SMOOTH_WEIGHT):
    """(total, (smooth_l1, adjacent_mse)).  pred, target [L, B, T, KVH]; masked by key_mask.

    smooth_l1: SmoothL1 (beta 1) averaged over counted tokens, layers and heads; adjacent_mse: per layer the mean of
    (pred[t+1] - pred[t])^2 over adjacent counted pairs and heads, summed over layers (as Locret's train.py)."""
    w = feats.key_mask.astype(jnp.float32)[None, :, :, None]
    n_layers, n_heads = pred.shape[0], pred.shape[-1]
    d = jnp.abs(pred - feats.target)
    hub = jnp.where(d < 1.0, 0.5 * d * d, d - 0.5)
    main = jnp.sum(hub * w) / (jnp.maximum(jnp.sum(w), 1.0) * n_layers * n_heads)
    pw = w[:, :, 1:] * w[:, :, :-1]
    sq = jnp.square(pred[:, :, 1:] - pred[:, :, :-1]) * pw
    adj = jnp.sum(jnp.sum(sq, axis=(1, 2, 3)) / (jnp.maximum(jnp.sum(pw), 1.0) * n_heads))
    return main + smooth_weight * adj, (main, adj)


def _topk_sets(x: jax.Array, valid: jax.Array, block: int, k: int) -> jax.Array:
    """x [..., T] -> bool [..., T // block, block]: each block's top-k among valid positions (all valid ones when
    a block has fewer than k)."""
    nb = x.shape[-1] // block
    xs = jnp.where(valid, x, -jnp.inf)[..., : nb * block].reshape(*x.shape[:-1], nb, block)
    vs = jnp.broadcast_to(valid, x.shape)[..., : nb * block].reshape(*x.shape[:-1], nb, block)
    kth = jax.lax.top_k(xs, k)[0][..., -1:]
    return vs & (xs >= kth)


def ranking_metrics(pred: jax.Array, feats: Features, *, block: int, k: int, pool_kernel: int = 5) -> dict:
    """Per (layer, KV head) float32 [L, KVH]: recall, recall_pooled, needle_recall, needle_recall_target."""
    valid = feats.key_mask[None, :, None, :]  # [1, B, 1, T]
    p = jnp.moveaxis(pred, 3, 2)  # [L, B, KVH, T]
    n_layers, b, t, kvh = pred.shape
    pooled = max_pool(
        jnp.where(feats.key_mask[None, :, :, None], pred, -jnp.inf).reshape(n_layers * b, t, kvh), pool_kernel
    ).reshape(pred.shape)
    true = _topk_sets(jnp.moveaxis(feats.target, 3, 2), valid, block, k)  # [L, B, KVH, nb, block]
    sel = _topk_sets(p, valid, block, k)
    sel_pool = _topk_sets(jnp.moveaxis(pooled, 3, 2), valid, block, k)
    nb = t // block
    needle = feats.needle[:, : nb * block].reshape(1, b, 1, nb, block)

    def frac(a, ref):
        hits = jnp.sum(a & ref, axis=(1, 3, 4))
        return hits / jnp.maximum(jnp.sum(jnp.broadcast_to(ref, a.shape), axis=(1, 3, 4)), 1)

    return {
        "recall": frac(sel, true),
        "recall_pooled": frac(sel_pool, true),
        "needle_recall": frac(sel, needle),
        "needle_recall_target": frac(true, needle),
    }


def _summary(metrics: dict, loss, main, adj) -> dict:
    """Device metrics -> plain floats (means over layers and heads; per-layer lists; best head per layer)."""
    m = {k: np.asarray(v, np.float64) for k, v in jax.device_get(metrics).items()}
    out = {"loss": float(loss), "smooth_l1": float(main), "adjacent_mse": float(adj)}
    for k, v in m.items():
        out[k] = float(v.mean())
        out[k + "_per_layer"] = [round(float(x), 4) for x in v.mean(axis=1)]
    out["needle_recall_best_head"] = float(m["needle_recall"].max(axis=1).mean())
    return out


# ------------------------------------------------------------------------------------------------ training


def _check(name: str, value, ok: bool, allowed: str):
    if not ok:
        raise ValueError(f"{name}={value!r} is out of range; allowed: {allowed}")


def _mix_str(task_mix) -> Any:
    if isinstance(task_mix, str):
        return task_mix
    if isinstance(task_mix, dict):
        return dict(task_mix)
    return list(task_mix)


def init_heads(config, *, hidden: int, seed: int) -> RetainingHeads:
    """Random float32 heads of the released shape (fc1 ~ N(0, 1/d_in), fc2 ~ N(0, 1/R))."""
    from converters.retaining_heads import random_retaining_heads

    return random_retaining_heads(config, hidden=hidden, seed=seed, dtype=jnp.float32)


def train(
    model,
    *,
    steps: int,
    length: int,
    batch: int = 1,
    lr: float = 5e-4,
    hidden: int | None = None,
    seed: int = 0,
    task_mix=DEFAULT_TASK_MIX,
    time_budget_s: float | None = None,
    rows: str = "all",
    chunk: int | None = None,
    hosts: int = 4,
    keep: float = 1 / 16,
    eval_every: int | None = None,
    eval_batch: int | None = None,
    updates_per_batch: int = 1,
    warmup: int | None = None,
    weight_decay: float = 0.01,
    clip: float = 0.5,
    smooth_weight: float = SMOOTH_WEIGHT,
    heads: RetainingHeads | None = None,
    progress: bool = True,
    log_every: int = 10,
):
    """Train retaining heads for the frozen `model` (an `apb_jax.Model`).  Returns (RetainingHeads float32, history).

    steps: batches (each `updates_per_batch` optimiser updates); length: tokens per row; batch: rows per step;
    hidden: head width R (None: `default_hidden`); rows: "all" | "answers" (see the module docstring); hosts, keep:
    the ranking metrics' blocks (length // hosts) and kept fraction; eval_every: steps between held-out evaluations
    (None: steps // 20); eval_batch: held-out rows (None: max(batch, 2); rounded up to a multiple of batch);
    time_budget_s: stop after this many seconds from the call (compilation included) and return what was trained;
    heads: start from these instead of random ones.

    history (JSON-ready): config; baseline (held-out metrics of the initial random heads); train (per step: lr,
    loss, smooth_l1, adjacent_mse, recall on the training batch); eval (held-out metrics every eval_every steps and
    at the end: loss, recall, recall_pooled, needle_recall, needle_recall_best_head, needle_recall_target, each also
    per layer); final (the last eval); steps_done; stopped ("steps" | "time_budget" | "interrupted"); seconds;
    first_step_seconds (set-up, held-out features and compilation); steps_per_second (after the first step).
    """
    import optax
    from tqdm import tqdm

    from apb_jax.tasks import sample_batch

    cfg = model.config
    _check("steps", steps, isinstance(steps, int) and steps >= 1, "an integer >= 1")
    _check("length", length, isinstance(length, int) and length >= MIN_LENGTH, f"an integer >= {MIN_LENGTH}")
    _check("batch", batch, isinstance(batch, int) and batch >= 1, "an integer >= 1")
    _check("lr", lr, lr > 0 and math.isfinite(lr), "a finite number > 0")
    hidden = default_hidden(cfg) if hidden is None else hidden
    _check("hidden", hidden, isinstance(hidden, int) and hidden >= 1, "an integer >= 1")
    _check("rows", rows, rows in ROWS, f"one of {ROWS}")
    _check("chunk", chunk, chunk is None or (isinstance(chunk, int) and chunk >= 1), "None or an integer >= 1")
    _check(
        "hosts",
        hosts,
        isinstance(hosts, int) and 1 <= hosts <= length // MIN_BLOCK,
        f"an integer in [1, length // {MIN_BLOCK}] = [1, {length // MIN_BLOCK}]",
    )
    _check("keep", keep, 0 < keep <= 1, "a fraction in (0, 1]")
    _check(
        "updates_per_batch",
        updates_per_batch,
        isinstance(updates_per_batch, int) and updates_per_batch >= 1,
        "an integer >= 1",
    )
    _check("time_budget_s", time_budget_s, time_budget_s is None or time_budget_s > 0, "None or seconds > 0")
    _check("clip", clip, clip > 0, "a number > 0")
    _check("log_every", log_every, isinstance(log_every, int) and log_every >= 1, "an integer >= 1")
    eval_every = max(1, steps // 20) if eval_every is None else eval_every
    _check("eval_every", eval_every, isinstance(eval_every, int) and eval_every >= 1, "an integer >= 1")
    eval_batch = max(batch, 2) if eval_batch is None else eval_batch
    _check("eval_batch", eval_batch, isinstance(eval_batch, int) and eval_batch >= 1, "an integer >= 1")
    total_updates = steps * updates_per_batch
    warmup = min(100, max(1, total_updates // 10)) if warmup is None else warmup
    _check(
        "warmup",
        warmup,
        isinstance(warmup, int) and 0 <= warmup <= total_updates,
        f"an integer in [0, steps * updates_per_batch] = [0, {total_updates}]",
    )
    sample_batch(np.random.default_rng(0), task_mix, length, 1)  # a bad task mix fails here, before compiling

    t_start = time.perf_counter()
    block = length // hosts
    k = max(1, round(block * keep))
    if heads is None:
        heads = init_heads(cfg, hidden=hidden, seed=seed)
    else:
        heads = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), heads)
        hidden = int(heads.fc1[0].shape[1])
    # AdamW at unit rate, its update scaled by the step's rate (decoupled weight decay scales with it, as in AdamW)
    opt = optax.chain(optax.clip(clip), optax.adamw(1.0, b1=0.9, b2=0.95, weight_decay=weight_decay))
    opt_state = opt.init(heads)
    features = make_feature_fn(model, rows=rows, chunk=chunk)

    def rate(u: int) -> float:
        """Locret's schedule: linear warm-up over `warmup` updates, then linear decay to 0 at the end of training,
        where the end is `steps` or the time budget, whichever is nearer."""
        progress = u / total_updates
        if time_budget_s is not None:
            progress = max(progress, (time.perf_counter() - t_start) / time_budget_s)
        warm = (u + 1) / warmup if warmup else 1.0
        decay = (1.0 - progress) / max(1.0 - warmup / total_updates, 1e-9)
        return lr * float(np.clip(min(warm, decay), 0.0, 1.0))

    @jax.jit
    def update(heads, opt_state, feats, lr_t):
        def loss_fn(hd):
            pred = predict(hd, feats)
            total, parts = locret_loss(pred, feats, smooth_weight)
            return total, (parts, pred)

        (loss, ((main, adj), pred)), grads = jax.value_and_grad(loss_fn, has_aux=True)(heads)
        updates, opt_state = opt.update(grads, opt_state, heads)
        heads = optax.apply_updates(heads, jax.tree_util.tree_map(lambda x: lr_t * x, updates))
        recall = ranking_metrics(jax.lax.stop_gradient(pred), feats, block=block, k=k)["recall"].mean()
        return heads, opt_state, (loss, main, adj, recall)

    @jax.jit
    def evaluate(heads, feats):
        pred = predict(heads, feats)
        loss, (main, adj) = locret_loss(pred, feats, smooth_weight)
        return ranking_metrics(pred, feats, block=block, k=k), loss, main, adj

    rng = np.random.default_rng(seed)
    # held-out rows, computed `batch` rows at a time so the training step's compiled forward serves them too
    eval_rng = np.random.default_rng([seed, 1])
    parts = [
        features(model.params, jnp.asarray(sample_batch(eval_rng, task_mix, length, batch).tokens))
        for _ in range(-(-eval_batch // batch))
    ]
    eval_feats = Features(*(jnp.concatenate(xs, axis=1 if x.ndim > 2 else 0) for xs, x in zip(zip(*parts), parts[0])))
    eval_batch = int(eval_feats.key_mask.shape[0])
    baseline = _summary(*evaluate(heads, eval_feats))
    history: dict[str, Any] = {
        "config": {
            "model": str(getattr(model, "path", None)),
            "steps": steps,
            "length": length,
            "batch": batch,
            "lr": lr,
            "hidden": hidden,
            "seed": seed,
            "task_mix": _mix_str(task_mix),
            "rows": rows,
            "chunk": chunk or default_chunk(batch, cfg.num_heads, length),
            "hosts": hosts,
            "block": block,
            "keep": keep,
            "k": k,
            "updates_per_batch": updates_per_batch,
            "warmup": warmup,
            "weight_decay": weight_decay,
            "clip": clip,
            "smooth_weight": smooth_weight,
            "time_budget_s": time_budget_s,
            "eval_batch": eval_batch,
            "model_dtype": str(model.dtype),
            "device": str(jax.devices()[0]),
        },
        "baseline": baseline,
        "train": {"step": [], "lr": [], "loss": [], "smooth_l1": [], "adjacent_mse": [], "recall": []},
        "eval": [],
    }
    bar = tqdm(total=steps, disable=not progress, desc="retaining heads", dynamic_ncols=True)
    pending: list = []
    stopped = "steps"
    step = n_updates = 0
    t_first = None

    def flush():
        vals = jax.device_get([m for _, _, m in pending])
        for (s, lr_s, _), (loss, main, adj, rec) in zip(pending, vals):
            tr = history["train"]
            tr["step"].append(s)
            tr["lr"].append(lr_s)
            tr["loss"].append(float(loss))
            tr["smooth_l1"].append(float(main))
            tr["adjacent_mse"].append(float(adj))
            tr["recall"].append(float(rec))
        if pending:
            bar.set_postfix(loss=f"{history['train']['loss'][-1]:.4f}", recall=f"{history['train']['recall'][-1]:.3f}")
        pending.clear()

    def run_eval(s):
        ev = _summary(*evaluate(heads, eval_feats))
        ev["step"] = s
        ev["seconds"] = round(time.perf_counter() - t_start, 2)
        history["eval"].append(ev)
        bar.write(
            f"step {s}: eval loss {ev['loss']:.4f}  recall {ev['recall']:.3f} (random heads "
            f"{baseline['recall']:.3f})  needle recall {ev['needle_recall']:.3f} (target "
            f"{ev['needle_recall_target']:.3f})"
        )

    try:
        while step < steps:
            tokens = sample_batch(rng, task_mix, length, batch).tokens
            feats = features(model.params, jnp.asarray(tokens))
            for _ in range(updates_per_batch):
                lr_t = rate(n_updates)
                heads, opt_state, m = update(heads, opt_state, feats, jnp.float32(lr_t))
                n_updates += 1
            step += 1
            pending.append((step, lr_t, m))
            bar.update(1)
            if step == 1 or step % log_every == 0 or step == steps:
                flush()
                if step == 1:
                    t_first = time.perf_counter()
            if step % eval_every == 0 and step < steps:
                flush()
                run_eval(step)
            if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s and step < steps:
                stopped = "time_budget"
                break
    except KeyboardInterrupt:
        stopped = "interrupted"
    flush()
    t_loop = time.perf_counter()
    bar.close()
    if step and (not history["eval"] or history["eval"][-1]["step"] != step):
        run_eval(step)
    seconds = time.perf_counter() - t_start
    history.update(
        steps_done=step,
        stopped=stopped,
        seconds=round(seconds, 2),
        first_step_seconds=round(t_first - t_start, 2) if t_first else None,
        steps_per_second=round((step - 1) / (t_loop - t_first), 2) if t_first and step > 1 else None,
        final=history["eval"][-1] if history["eval"] else baseline,
    )
    return heads, history


# ------------------------------------------------------------------------------------------------ outputs, CLI


def plot_history(history: dict, path: str | Path) -> Path | None:
    """Loss and recall curves as a PNG (None when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tr, base = history["train"], history["baseline"]
    ev = [{**base, "step": 0}] + history["eval"]  # the initial (random) heads start the held-out curves
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(tr["step"], tr["loss"], lw=0.8, label="train")
    a1.plot([e["step"] for e in ev], [e["loss"] for e in ev], "o-", ms=3, label="held-out")
    a1.axhline(base["loss"], ls=":", c="gray", label="random heads")
    a1.set_yscale("log")
    a1.set_xlabel("step")
    a1.set_title("Locret loss (SmoothL1 + 0.0025 adjacent MSE)")
    a1.legend()
    a2.plot(tr["step"], tr["recall"], lw=0.8, alpha=0.6, label="train recall")
    a2.plot([e["step"] for e in ev], [e["recall"] for e in ev], "o-", ms=3, label="held-out recall")
    a2.plot([e["step"] for e in ev], [e["recall_pooled"] for e in ev], "s-", ms=3, label="held-out, max-pooled")
    a2.plot([e["step"] for e in ev], [e["needle_recall"] for e in ev], "^-", ms=3, label="needle digits kept")
    a2.axhline(base["recall"], ls=":", c="gray", label="random heads")
    a2.axhline(ev[-1]["needle_recall_target"], ls="--", c="C3", lw=0.8, label="needle digits in the true top-k")
    a2.set_ylim(0, 1)
    a2.set_xlabel("step")
    c = history["config"]
    a2.set_title(f"top-{c['k']} of {c['block']} recall per KV head")
    a2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _parse_mix(s: str):
    parts = [p.strip() for p in s.split(",") if p.strip()]
    if not parts:
        raise ValueError(
            f"--task-mix={s!r} names no task; allowed: a comma list of {DEFAULT_TASK_MIX}, each optionally name:weight"
        )
    if any(":" in p for p in parts):
        out = {}
        for p in parts:
            name, _, w = p.partition(":")
            out[name] = float(w) if w else 1.0
        return out
    return parts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model directory (HF or converted) for apb_jax.load")
    ap.add_argument("--out", required=True, help="where the heads go (.safetensors, the released format)")
    ap.add_argument("--steps", type=int, default=1000, help="batches (default 1000)")
    ap.add_argument("--length", type=int, default=8192, help="tokens per row (default 8192)")
    ap.add_argument("--batch", type=int, default=1, help="rows per step (default 1, as Locret)")
    ap.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate (default 5e-4, Locret's)")
    ap.add_argument("--hidden", type=int, default=None, help="head width R (default: from the model, see the doc)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--task-mix",
        default=",".join(DEFAULT_TASK_MIX),
        help="comma list of tasks, optionally name:weight (default: all three, equal weights)",
    )
    ap.add_argument(
        "--rows",
        choices=ROWS,
        default="all",
        help="which query rows define importance: all later rows (default) or the query/answer tail",
    )
    ap.add_argument("--time-budget-s", type=float, default=None, help="stop after this many seconds, then save")
    ap.add_argument("--log", default=None, help="history JSON (default: OUT with .json); a PNG plot goes beside it")
    ap.add_argument("--dtype", default="float32", help="dtype of the frozen forward (default float32)")
    ap.add_argument("--chunk", type=int, default=None, help="query rows per attention chunk (default: auto)")
    ap.add_argument("--hosts", type=int, default=4, help="blocks of the ranking metric (default 4)")
    ap.add_argument("--keep", type=float, default=1 / 16, help="kept fraction of a block (default 1/16)")
    ap.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations")
    ap.add_argument(
        "--eval-batch",
        type=int,
        default=None,
        help="held-out rows (default max(batch, 2), rounded up to a multiple of batch)",
    )
    ap.add_argument("--updates-per-batch", type=int, default=1, help="optimiser updates per batch of features")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up updates (default min(100, 10%%))")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    from apb_jax.loading import load
    from converters.retaining_heads import save_retaining_heads

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out={args.out!r} must end in .safetensors (the released-heads format)")
    log = Path(args.log) if args.log else out.with_suffix(".json")
    model = load(args.model, dtype=args.dtype)
    heads, history = train(
        model,
        steps=args.steps,
        length=args.length,
        batch=args.batch,
        lr=args.lr,
        hidden=args.hidden,
        seed=args.seed,
        task_mix=_parse_mix(args.task_mix),
        time_budget_s=args.time_budget_s,
        rows=args.rows,
        chunk=args.chunk,
        hosts=args.hosts,
        keep=args.keep,
        eval_every=args.eval_every,
        eval_batch=args.eval_batch,
        updates_per_batch=args.updates_per_batch,
        warmup=args.warmup,
        progress=not args.quiet,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_retaining_heads(heads, out)
    history["out"] = str(out)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(json.dumps(history, indent=1))
    png = plot_history(history, log.with_suffix(".png"))
    b, f = history["baseline"], history["final"]
    print(
        f"{history['steps_done']} steps in {history['seconds']:.0f}s ({history['stopped']}); held-out top-"
        f"{history['config']['k']}/{history['config']['block']} recall {f['recall']:.3f} (random heads "
        f"{b['recall']:.3f}), max-pooled {f['recall_pooled']:.3f}, needle digits kept {f['needle_recall']:.3f} "
        f"(target ceiling {f['needle_recall_target']:.3f}); loss {f['loss']:.4f} (from {b['loss']:.4f})"
    )
    print(f"heads -> {out}\nlog   -> {log}" + (f"\nplot  -> {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
