#!/usr/bin/env python
"""Accuracy benchmark (issue #6): exact-match accuracy of full / ring / star / APB on the synthetic tasks.

For every task x document length x strategy x host count, `--num` examples (`apb_jax.tasks.make_examples`, the same
examples for every strategy) are answered greedily with `Engine.generate(doc, query, max_new_tokens=len(answer))`,
`--batch` examples of one (task, length) per call (every row the same length; a short last batch is padded with
repeats, so one program serves the cell).  full runs on one device; ring / star / apb on H hosts: one host per device
(mode "mesh") when >= H devices exist, else the H hosts emulated on one device (mode "vmap", e.g. one GPU).
apb runs with the training-free query-aware compressor (apb-qa) and with the model's retaining heads (apb-rh; skipped,
with a note, when the heads file is missing); apb-rnd (asked for by name) passes P keys drawn uniformly at random, the
ablation that shows what choosing them is worth.  Everything else is the library's defaults (APB: A = L/32, P = L/64).

Writes a table (task x length rows, strategy x hosts columns, accuracy %), `accuracy_<device>_<date>.json` (per
cell: accuracy, n, every prediction as text, timings; disagreements of each strategy with full; the issue's
targets, reported, never asserted) and a plot (accuracy vs length per task).

    python benchmarks/accuracy_bench.py --smoke              # CI: 8 small cells on 4 fake CPU devices, < 1 min
    python benchmarks/accuracy_bench.py --cpu-devices 4 --lengths 4096,8192  # CPU: the short lengths
    python benchmarks/accuracy_bench.py --lengths 32768 --out $OUT/acc.json  # one GPU: H hosts by vmap
    python benchmarks/accuracy_bench.py --from-json a.json,b.json --out all.json  # one table + plot
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

K = 1024
TASKS = ("passkey", "multikey_niah", "variable_tracking")
STRATEGIES = ("full", "ring", "star", "apb-qa", "apb-rh")  # the default columns
ALLOWED = STRATEGIES + ("apb-rnd",)
DEFAULT_HEADS = ROOT / "apb_jax" / "assets" / "retriever" / "retaining_heads.safetensors"
TARGETS = {
    "full_min": {"passkey": 0.95, "multikey_niah": 0.95, "variable_tracking": 0.80},
    "apb_max_gap_points": 2.0,
    "apb_gap_length": 32 * K,
    "apb_gap_hosts": 4,
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="CI check: lengths 256/512, 4 examples, 4 fake CPU devices, the random stand-in allowed",
    )
    ap.add_argument(
        "--model",
        default=None,
        help="model directory (HF or converted); default: the shipped retriever (apb_jax/assets/retriever)",
    )
    ap.add_argument(
        "--allow-random",
        action="store_true",
        help="run on the random stand-in model when no trained retriever is shipped (plumbing checks only)",
    )
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--tasks", default=None, help=f"default {','.join(TASKS)}")
    ap.add_argument("--lengths", default=None, help="document lengths in tokens (default 4096,8192,16384,32768)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help=f"any of {','.join(ALLOWED)}")
    ap.add_argument("--hosts", default="2,4", help="host counts of the sequence-parallel strategies")
    ap.add_argument(
        "--columns",
        default=None,
        help="explicit columns instead of strategies x hosts, e.g. full,ring:4,star:2,apb-qa:4",
    )
    ap.add_argument("--num", type=int, default=None, help="examples per task and length (default 50)")
    ap.add_argument(
        "--batch",
        type=int,
        default=None,
        help="examples per Engine.generate call (default 10: 50 = 5 x 10, no padding)",
    )
    ap.add_argument("--seed", type=int, default=0, help="example seed (make_examples(task, seed, num, length))")
    ap.add_argument(
        "--mode",
        default="auto",
        choices=("auto", "mesh", "vmap"),
        help="auto: mesh when jax.device_count() >= H, else vmap (H hosts on one device)",
    )
    ap.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="run on the CPU with this many fake devices (set before jax starts)",
    )
    ap.add_argument(
        "--retaining-heads",
        default=None,
        help=f"retaining-heads file for apb-rh (default: <model dir>/retaining_heads.safetensors, "
        f"i.e. {DEFAULT_HEADS.relative_to(ROOT)} for the shipped model)",
    )
    ap.add_argument("--kernel-backend", default="auto", help="pallas_kernels backend (auto = fastest for the device)")
    ap.add_argument(
        "--precision",
        default="highest",
        choices=("highest", "default"),
        help="jax_default_matmul_precision (highest: float32 matmuls stay float32 on a GPU, no TF32)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop once this much wall time is spent; what was done is written (status 'partial')",
    )
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--out", default=None, help="JSON path (default <out-dir>/accuracy_<device>_<date>.json)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument(
        "--from-json",
        default=None,
        help="comma-separated result JSONs (e.g. a CPU run and a GPU run): merge their cells into --out "
        "(default <out-dir>/accuracy_merged_<date>.json), recompute targets, table and plot",
    )
    args = ap.parse_args(argv)
    # --smoke: 8 cells, every strategy and both host counts; a cell costs ~3.5 s on 2 CPU cores, nearly all of it
    # compiling its 3 programs (prefill, query step, decode step), so the task is the one with the longest answer
    defaults = (
        dict(lengths="256,512", tasks="variable_tracking", num=4, batch=4, columns="full,ring:4,star:2,apb-qa:4")
        if args.smoke
        else dict(lengths="4096,8192,16384,32768", tasks=",".join(TASKS), num=50, batch=10, columns=None)
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.smoke:
        args.allow_random = True
        args.cpu_devices = args.cpu_devices or 4
    words = lambda s: [x for x in s.split(",") if x]
    args.tasks = words(args.tasks)
    args.lengths = sorted(int(x) for x in words(args.lengths))
    args.hosts = sorted(int(x) for x in words(args.hosts))
    args.strategies = words(args.strategies)
    for t in args.tasks:
        if t not in TASKS:
            ap.error(f"--tasks: {t!r} is not one of {TASKS}")
    for s in args.strategies + [c.split(":")[0] for c in words(args.columns or "")]:
        if s not in ALLOWED:
            ap.error(f"--strategies/--columns: {s!r} is not one of {ALLOWED}")
    if args.columns:
        args.columns = words(args.columns)
        for c in args.columns:
            if c != "full" and (":" not in c or not c.split(":")[1].isdigit() or int(c.split(":")[1]) < 2):
                ap.error(f"--columns: {c!r} must be 'full' or STRATEGY:HOSTS with HOSTS >= 2 (e.g. apb-qa:4)")
    if args.num < 1 or args.batch < 1:
        ap.error(f"--num ({args.num}) and --batch ({args.batch}) must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------ grid


@dataclasses.dataclass(frozen=True)
class Config:
    """One column of the table: a strategy on a host count (apb with one compressor)."""

    name: str  # full | ring | star | apb-qa | apb-rh | apb-rnd
    hosts: int

    @property
    def strategy(self) -> str:
        return self.name.split("-")[0]

    @property
    def compressor(self) -> str | None:
        return {"apb-qa": "query_aware", "apb-rh": "retaining_heads", "apb-rnd": "random"}.get(self.name)

    @property
    def label(self) -> str:
        return "full" if self.name == "full" else f"{self.name} H={self.hosts}"


def configs(args) -> list[Config]:
    if args.columns:
        return [
            Config("full", 1) if c == "full" else Config(c.split(":")[0], int(c.split(":")[1])) for c in args.columns
        ]
    out = []
    for s in args.strategies:
        out += [Config("full", 1)] if s == "full" else [Config(s, h) for h in args.hosts]
    return out


def runnable(grid: list[Config], hfile: Path) -> tuple[list[Config], list[Config], list[str]]:
    """(columns to run, columns skipped, notes): apb-rh needs the retaining-heads file."""
    if not any(c.name == "apb-rh" for c in grid) or hfile.is_file():
        return grid, [], []
    missing = [c for c in grid if c.name == "apb-rh"]
    note = f"apb-rh skipped: no retaining-heads file at {hfile} (ship it, or pass --retaining-heads FILE)"
    return [c for c in grid if c.name != "apb-rh"], missing, [note]


def pick_mode(requested: str, hosts: int) -> str:
    import jax

    if hosts == 1:
        return "mesh"
    if requested != "auto":
        return requested
    return "mesh" if jax.device_count() >= hosts else "vmap"


def load_model(args):
    """(model, info): --model DIR, else the shipped retriever; the random stand-in only with --allow-random."""
    from apb_jax.demo import ASSET, default_model

    if args.model:
        import apb_jax

        model, trained, source = apb_jax.load(args.model, dtype=args.dtype), True, str(args.model)
    else:
        model, trained = default_model(args.dtype)
        source = _rel(ASSET) if trained else "random stand-in (apb_jax.demo.default_model)"
        if not trained and not args.allow_random:
            raise SystemExit(
                f"accuracy_bench: no trained retriever in {ASSET} (config.json + model.safetensors), so "
                "the only model is the random stand-in, whose accuracy means nothing. Pass --model DIR, "
                "or --allow-random to run the plumbing anyway (the smoke test does)"
            )
    import jax

    c = model.config
    info = {
        "source": source,
        "trained": trained,
        "dtype": str(model.dtype),
        "layers": c.num_layers,
        "hidden": c.hidden_size,
        "heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab": c.vocab_size,
        "rope_theta": c.rope.theta,
        "params": int(sum(x.size for x in jax.tree_util.tree_leaves(model.params))),
    }
    weights = Path(args.model or ASSET) / "model.safetensors"
    if trained and weights.is_file():  # which training run's weights these are
        info["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    return model, info


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def heads_path(args) -> Path:
    if args.retaining_heads:
        return Path(args.retaining_heads)
    if args.model:
        return Path(args.model) / "retaining_heads.safetensors"
    return DEFAULT_HEADS


# ------------------------------------------------------------------------------------------------ running


def batches(examples, size: int):
    """Index lists of at most `size` examples sharing query and answer lengths (one program shape each)."""
    groups: dict = {}
    for i, ex in enumerate(examples):
        groups.setdefault((len(ex.query), len(ex.answer)), []).append(i)
    for idx in groups.values():
        for lo in range(0, len(idx), size):
            yield idx[lo : lo + size]


def run_cell(engine, examples, batch: int, deadline: float | None, progress=None) -> dict:
    """Answer `examples` with `engine`; returns predictions (text, None where not run) and timings."""
    import numpy as np

    from apb_jax.tasks import score
    from apb_jax.tokenizer import ids_to_text

    n = len(examples)
    size = min(batch, n)
    preds: list = [None] * n
    t = {"prefill_s": 0.0, "decode_s": 0.0, "compile_s": 0.0}
    layout = None
    t0 = time.perf_counter()
    stopped = False
    for idx in batches(examples, size):
        if deadline is not None and time.perf_counter() > deadline:
            stopped = True
            break
        rows = idx + [idx[-1]] * (size - len(idx))  # pad a short batch: the same program shape
        doc = np.stack([examples[i].document for i in rows])
        query = np.stack([examples[i].query for i in rows])
        out = engine.generate(doc, query, max_new_tokens=max(len(examples[i].answer) for i in idx))
        for j, i in enumerate(idx):
            preds[i] = ids_to_text(out.tokens[j])
        t["prefill_s"] += out.prefill_seconds
        t["decode_s"] += out.decode_seconds
        t["compile_s"] += out.compile_seconds
        layout = out.layout
        if progress is not None:
            progress.update(len(idx))
    done = [i for i in range(n) if preds[i] is not None]
    correct = sum(score(preds[i], examples[i]) for i in done)
    cell = {
        "n": len(done),
        "correct": int(correct),
        "accuracy": correct / len(done) if done else None,
        "predictions": preds,
        "wall_s": round(time.perf_counter() - t0, 3),
        **{k: round(v, 4) for k, v in t.items()},
        "prefill_s_per_example": round(t["prefill_s"] / max(len(done), 1), 5),
    }
    if layout is not None:
        cell["layout"] = {"anchor": layout.anchor, "passing": layout.passing, "block": layout.block}
    if stopped:
        cell["partial"] = f"time budget reached after {len(done)} of {n} examples"
    return cell


def cell_base(cfg: Config, task: str, length: int, info: dict) -> dict:
    return {
        "task": task,
        "length": length,
        "label": cfg.label,
        "strategy": cfg.strategy,
        "compressor": cfg.compressor,
        "hosts": cfg.hosts,
        "device": info["name"],
    }


def make_engine(cfg: Config, model, args, heads_file: Path, backend):
    from apb_jax.engine import Engine

    if cfg.name == "full":
        return Engine(model, "full", kernel_backend=backend), "single device"
    mode = pick_mode(args.mode, cfg.hosts)
    kw = {}
    if cfg.compressor == "retaining_heads":
        kw["retaining_heads"] = str(heads_file)
    eng = Engine(
        model,
        cfg.strategy,
        devices=cfg.hosts,
        compressor=cfg.compressor if cfg.strategy == "apb" else None,
        mode=mode,
        kernel_backend=backend,
        **kw,
    )
    return eng, mode


def _is_oom(msg: str) -> bool:
    return "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()


# ------------------------------------------------------------------------------------------------ analysis


def cell_key(c: dict) -> tuple:
    return c["task"], c["length"], c["label"]


def disagreements(cells: list[dict]) -> list[dict]:
    """For every (task, length) and every strategy: examples whose answer text differs from full's."""
    full = {(c["task"], c["length"]): c for c in cells if c["label"] == "full" and c.get("predictions")}
    out = []
    for c in cells:
        f = full.get((c["task"], c["length"]))
        if c["label"] == "full" or f is None or not c.get("predictions"):
            continue
        pairs = [
            (i, a, b)
            for i, (a, b) in enumerate(zip(c["predictions"], f["predictions"]))
            if a is not None and b is not None
        ]
        diff = [i for i, a, b in pairs if a != b]
        out.append(
            {
                "task": c["task"],
                "length": c["length"],
                "label": c["label"],
                "vs": "full",
                "compared": len(pairs),
                "count": len(diff),
                "examples": diff[:20],
            }
        )
    return out


def targets(cells: list[dict], dis: list[dict]) -> dict:
    """The issue's targets, reported (met: True / False / None when nothing was measured)."""
    acc = {cell_key(c): c["accuracy"] for c in cells if c.get("accuracy") is not None}
    t = {}
    for task, lo in TARGETS["full_min"].items():
        got = {f"{L}": a for (tk, L, lab), a in sorted(acc.items()) if tk == task and lab == "full"}
        t[f"full_{task}_ge_{round(lo * 100)}"] = {
            "target_min": lo,
            "got": got,
            "met": None if not got else all(a >= lo for a in got.values()),
        }
    ring = [d for d in dis if d["label"].startswith("ring")]
    t["ring_equals_full"] = {
        "what": "ring's answers equal full's on every example",
        "got": {f"{d['task']}@{d['length']} {d['label']}": d["count"] for d in ring},
        "met": None if not ring else all(d["count"] == 0 for d in ring),
    }
    L, H = TARGETS["apb_gap_length"], TARGETS["apb_gap_hosts"]
    for name in ("apb-qa", "apb-rh"):
        got = {}
        for task in TASKS:
            f, a = acc.get((task, L, "full")), acc.get((task, L, f"{name} H={H}"))
            if f is not None and a is not None:
                got[task] = round(100 * (f - a), 2)
        t[f"{name}_H{H}_within_{TARGETS['apb_max_gap_points']:g}pts_of_full_at_{L // K}K"] = {
            "what": "full minus apb accuracy, points",
            "got": got,
            "met": None if len(got) < len(TASKS) else all(g <= TARGETS["apb_max_gap_points"] for g in got.values()),
        }
    for name in ("apb-qa", "apb-rh"):
        got = {}
        for (task, length, lab), a in sorted(acc.items()):
            if task != "variable_tracking" or not lab.startswith(name + " "):
                continue
            s = acc.get((task, length, lab.replace(name, "star")))
            if s is not None:
                got[f"{length} {lab.split()[1]}"] = {"apb": a, "star": s}
        t[f"{name}_beats_star_on_variable_tracking"] = {
            "what": "apb accuracy > star accuracy on variable tracking (each length and host count)",
            "got": got,
            "met": None if not got else all(v["apb"] > v["star"] for v in got.values()),
        }
    return t


def print_table(doc: dict) -> None:
    from apb_jax.bench.common import format_table

    cells = doc["cells"]
    labels = []
    for c in cells:
        if c["label"] not in labels:
            labels.append(c["label"])
    order = {s: i for i, s in enumerate(ALLOWED)}
    labels.sort(key=lambda lab: (order.get(lab.split()[0], 9), lab))
    by = {cell_key(c): c for c in cells}
    rows = sorted({(c["task"], c["length"]) for c in cells}, key=lambda r: (TASKS.index(r[0]), r[1]))
    table = [{"task": t, "length": L, **{lab: by.get((t, L, lab)) for lab in labels}} for t, L in rows]

    def acc(lab):
        def get(r):
            c = r[lab]
            if c is None:
                return None
            if c.get("accuracy") is not None:
                return f"{100 * c['accuracy']:.1f}" + ("*" if c.get("partial") else "")
            if c.get("skipped") and c["skipped"] != "time budget":
                return "skip"  # e.g. no retaining-heads file (see the notes)
            return "ERR" if c.get("error") else None

        return get

    cols = [("task", "s", lambda r: r["task"]), ("length", "d", lambda r: r["length"])]
    cols += [(lab, "s", acc(lab)) for lab in labels]
    n = sorted({c["n"] for c in cells if c.get("n")})
    print(
        f"accuracy % (exact match; n = {'/'.join(map(str, n)) or '-'} examples per cell; '-' not run (time "
        f"budget), '*' cut short by it, 'skip' see notes)"
    )
    print(format_table(table, cols))
    timed = [c for c in cells if c.get("n")]
    if timed:
        by_len = sorted({c["length"] for c in timed})
        trow = [
            {
                "length": L,
                **{
                    lab: [c["prefill_s_per_example"] for c in timed if c["length"] == L and c["label"] == lab]
                    for lab in labels
                },
            }
            for L in by_len
        ]
        mean = lambda lab: lambda r: sum(r[lab]) / len(r[lab]) if r[lab] else None
        print("prefill seconds per example (document + query -> first token; mean over tasks; compile apart)")
        print(
            format_table(trow, [("length", "d", lambda r: r["length"])] + [(lab, ".3f", mean(lab)) for lab in labels])
        )
    dis = [d for d in doc.get("disagreements", []) if d["count"]]
    ring = [d for d in doc.get("disagreements", []) if d["label"].startswith("ring")]
    if ring:
        print(
            f"ring vs full: {sum(d['count'] for d in ring)} differing answers in "
            f"{sum(d['compared'] for d in ring)} compared"
        )
    if dis:
        worst = sorted(dis, key=lambda d: -d["count"])[:6]
        print(
            "answers differing from full: "
            + ", ".join(f"{d['label']} {d['task']}@{d['length']}: {d['count']}/{d['compared']}" for d in worst)
        )
    for note in doc.get("notes", []):
        print(f"note: {note}")
    for c in cells:
        if c.get("error"):
            print(f"  {c['label']} {c['task']}@{c['length']}: {c['error'][:300]}")
    tg = doc.get("targets", {})
    if tg:
        print(
            "targets: "
            + "; ".join(
                f"{k}: {'-' if v['met'] is None else ('met' if v['met'] else 'NOT met')}" for k, v in tg.items()
            )
        )


def plot(doc: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in doc["cells"] if c.get("accuracy") is not None]
    tasks = [t for t in TASKS if any(c["task"] == t for c in cells)]
    if not tasks:
        return
    colors = {"full": "k", "ring": "tab:green", "star": "tab:blue", "apb-qa": "tab:red", "apb-rh": "tab:purple"}
    styles = {1: "-", 2: "--", 4: "-", 8: ":"}
    marks = {1: "o", 2: "s", 4: "^", 8: "D"}
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        series: dict = {}
        for c in sorted((c for c in cells if c["task"] == task), key=lambda c: c["length"]):
            series.setdefault(c["label"], []).append((c["length"], 100 * c["accuracy"]))
        order = {s: i for i, s in enumerate(ALLOWED)}
        for label in sorted(series, key=lambda lab: (order.get(lab.split()[0], 9), lab)):
            pts, name = series[label], label.split()[0]
            hosts = int(label.split("=")[1]) if "=" in label else 1
            wide = name == "full"  # drawn wide underneath: exact strategies (ring) sit on it
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                label=label,
                color=colors.get(name, "gray"),
                linestyle=styles.get(hosts, "-."),
                marker=marks.get(hosts, "x"),
                alpha=0.4 if wide else 0.9,
                linewidth=6 if wide else 1.5,
                markersize=9 if wide else 5,
                zorder=1 if wide else 2,
            )
        ax.set_xscale("log", base=2)
        xs = sorted({p[0] for pts in series.values() for p in pts})
        ax.set_xticks(xs, [f"{x // K}K" if x >= K else str(x) for x in xs])
        ax.minorticks_off()
        ax.set_ylim(-3, 103)
        ax.set_title(task)
        ax.set_xlabel("document length (tokens)")
        ax.set_ylabel("exact-match accuracy (%)")
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    model = doc.get("model", {})
    fig.suptitle(
        f"APB accuracy: {model.get('source', '?')} ({'trained' if model.get('trained') else 'RANDOM'}), "
        f"{doc.get('device', {}).get('name', '?')}",
        fontsize=9,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish(doc: dict, out_path: Path, no_plot: bool) -> None:
    from apb_jax.bench import common

    doc["disagreements"] = disagreements(doc["cells"])
    doc["targets"] = targets(doc["cells"], doc["disagreements"])
    common.write_json(out_path, doc)
    if not no_plot:
        try:
            plot(doc, out_path.with_suffix(".png"))
        except Exception as e:
            print(f"plot failed: {e}")


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return merge(args)
    if args.cpu_devices:
        from apb_jax.cli import _set_cpu_devices

        _set_cpu_devices(args.cpu_devices)
    t_start = time.perf_counter()
    deadline = None if args.budget_s is None else t_start + args.budget_s
    import jax

    if args.precision == "highest":
        jax.config.update("jax_default_matmul_precision", "highest")
    from apb_jax.bench import common
    from apb_jax.tasks import make_examples

    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional
        tqdm = None

    model, model_info = load_model(args)
    info = common.device_info()
    out_path = (
        Path(args.out)
        if args.out
        else Path(args.out_dir) / f"accuracy_{common.slug(info['name'])}_{common.today()}.json"
    )
    backend = None if args.kernel_backend == "auto" else args.kernel_backend
    hfile = heads_path(args)
    grid, missing, notes = runnable(configs(args), hfile)
    if not model_info["trained"]:
        notes.append("RANDOM stand-in model (--allow-random): accuracies are meaningless, only the plumbing is checked")
    doc = {
        "benchmark": "accuracy",
        "issue": 6,
        "device": info,
        "jax_version": jax.__version__,
        "date": common.today(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "status": "running",
        "model": model_info,
        "settings": {
            "tasks": args.tasks,
            "lengths": args.lengths,
            "hosts": args.hosts,
            "num": args.num,
            "batch": args.batch,
            "seed": args.seed,
            "dtype": args.dtype,
            "mode": args.mode,
            "precision": args.precision,
            "kernel_backend": args.kernel_backend,
            "retaining_heads": str(hfile) if hfile.is_file() else None,
            "columns": [c.label for c in grid],
            "skipped_columns": [c.label for c in missing],
        },
        "notes": notes,
        "cells": [],
    }
    print(
        f"{info['name']} x{info['count']}, jax {jax.__version__}; model {model_info['source']} "
        f"({model_info['params'] / 1e6:.1f}M params, {model_info['dtype']}); {len(args.tasks)} tasks x "
        f"{len(args.lengths)} lengths x {len(grid)} columns x {args.num} examples",
        flush=True,
    )
    for n in notes:
        print(f"note: {n}", flush=True)
    finish(doc, out_path, no_plot=True)

    total = len(args.tasks) * len(args.lengths) * len(grid) * args.num
    bar = (
        tqdm(
            total=total,
            desc="accuracy",
            unit="ex",
            file=sys.stdout,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stdout.isatty() else 30,
        )
        if tqdm
        else None
    )
    engines: dict = {}
    batch_size: dict = {}
    for length in args.lengths:
        for task in args.tasks:
            examples = make_examples(task, args.seed, args.num, length)
            truth = [ex.answer_text for ex in examples]
            for cfg in missing:
                doc["cells"].append(
                    {**cell_base(cfg, task, length, info), "skipped": "no retaining-heads file", "n": 0}
                )
            for cfg in grid:
                base = cell_base(cfg, task, length, info)
                if deadline is not None and time.perf_counter() > deadline:
                    doc["cells"].append({**base, "skipped": "time budget", "n": 0})
                    if bar is not None:
                        bar.update(args.num)
                    continue
                if bar is not None:
                    bar.set_postfix_str(f"{task}@{length} {cfg.label}")
                try:
                    if cfg not in engines:
                        engines[cfg] = make_engine(cfg, model, args, hfile, backend)
                    engine, mode = engines[cfg]
                    size = batch_size.get((cfg, length), args.batch)
                    while True:
                        try:
                            cell = run_cell(engine, examples, size, deadline, bar)
                            break
                        except Exception as e:
                            if not _is_oom(str(e)) or size == 1:
                                raise
                            size = max(1, size // 2)
                            gc.collect()
                            print(f"\n{cfg.label} {task}@{length}: out of memory, batch -> {size}", flush=True)
                    batch_size[(cfg, length)] = size  # the next task of this length starts there
                    doc["cells"].append({**base, "mode": mode, "batch": min(size, args.num), **cell, "truth": truth})
                except Exception as e:
                    msg = f"{type(e).__name__}: {e}"
                    doc["cells"].append({**base, "error": msg[:2000], "n": 0})
                    print(f"\n{cfg.label} {task}@{length} failed: {msg[:400]}", flush=True)
                    traceback.print_exc()
                finish(doc, out_path, no_plot=True)
        gc.collect()
    if bar is not None:
        bar.close()
    partial = any(c.get("skipped") == "time budget" or c.get("partial") for c in doc["cells"])
    doc["status"] = "partial" if partial else "complete"
    doc["elapsed_s"] = round(time.perf_counter() - t_start, 2)
    finish(doc, out_path, args.no_plot)
    print(f"\nJSON: {out_path}" + ("" if args.no_plot else f"\nplot: {out_path.with_suffix('.png')}"))
    print_table(doc)
    print(f"[{doc['status']} in {doc['elapsed_s']:.0f}s]")
    if args.smoke:
        return check_smoke(out_path)
    return 0


def merge(args) -> int:
    """--from-json: one table / JSON / plot from several runs (later files fill what earlier ones lack)."""
    from apb_jax.bench import common

    paths, docs = common.read_jsons(args.from_json)
    merged: dict = {}
    for d in docs:
        for c in d["cells"]:
            have = merged.get(cell_key(c))
            if (
                have is None
                or (have.get("accuracy") is None and c.get("accuracy") is not None)
                or (c.get("accuracy") is not None and c.get("n", 0) > have.get("n", 0))
            ):
                merged[cell_key(c)] = {"device": d["device"]["name"], **c}
    d0 = docs[0]
    doc = {
        **{k: v for k, v in d0.items() if k not in ("cells", "disagreements", "targets")},
        "argv": ["--from-json", args.from_json],
        "devices": sorted({d["device"]["name"] for d in docs}),
        "merged_from": [
            {
                "path": str(p),
                "device": d["device"]["name"],
                "date": d.get("date"),
                "status": d.get("status"),
                "argv": d.get("argv"),
                "elapsed_s": d.get("elapsed_s"),
            }
            for p, d in zip(paths, docs)
        ],
        "notes": sorted({n for d in docs for n in d.get("notes", [])}),
        "cells": sorted(merged.values(), key=lambda c: (c["length"], c["task"], c["label"])),
    }
    # complete when every merged cell is (a later run may fill what a partial one left out)
    whole = all(
        c.get("accuracy") is not None and not (c.get("partial") or c.get("skipped") or c.get("error"))
        for c in doc["cells"]
    )
    doc["status"] = "complete" if whole else "partial"
    if len({json.dumps(d.get("model", {}).get("source")) for d in docs}) > 1:
        doc["notes"].append(
            "merged runs used different models: " + ", ".join(str(d.get("model", {}).get("source")) for d in docs)
        )
    out = Path(args.out) if args.out else Path(args.out_dir) / f"accuracy_merged_{common.today()}.json"
    finish(doc, out, args.no_plot)
    print(f"JSON: {out}" + ("" if args.no_plot else f"\nplot: {out.with_suffix('.png')}"))
    print_table(doc)
    return 0


def check_smoke(path) -> int:
    """The smoke's own check: no cell failed or ran out of time, ring's answers equal full's."""
    from apb_jax.bench import common

    d = json.loads(Path(path).read_text())
    problems = []
    errors = [c for c in d["cells"] if c.get("error") or c.get("skipped") == "time budget"]
    if errors:
        what = [(c["label"], c["task"], c["length"], (c.get("error") or c["skipped"])[:200]) for c in errors]
        problems.append(f"{len(errors)} cell(s) failed or ran out of time: {what}")
    ring = [x for x in d["disagreements"] if x["label"].startswith("ring")]
    want_ring = any(c.startswith("ring") for c in d["settings"]["columns"])
    if (want_ring and not ring) or any(x["count"] for x in ring):
        problems.append(f"ring's answers differ from full's: {ring}")
    return common.smoke_verdict(problems, f"{len(d['cells'])} cells in {path}")


if __name__ == "__main__":
    sys.exit(main())
