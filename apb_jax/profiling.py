"""Where a jitted program's time goes: a `jax.profiler` trace of N runs, split into categories of work.

`profile(fn, *args)` compiles `fn` for `args`, times it the usual way (block_until_ready, median of N), then runs it
N more times under `jax.profiler.trace` (one `TraceAnnotation` per run marks the run's window on the host
timeline) and reads the trace JSON that jaxlib itself writes (`perfetto_trace.json.gz`; no TensorBoard needed).

Which trace events count as device work:
- GPU: the kernel / memcpy events on the "Stream #N(...)" lines of the "/device:GPU:k" process.  XLA annotates each
  launch, so an event's args hold `hlo_op` (the HLO instruction, e.g. "loop_multiply_fusion.3") and `hlo_module`.
  Kernels launched inside a CUDA graph (an XLA command buffer) may carry the command buffer's annotation or none:
  they are matched by kernel name (XLA names a fusion's kernel after it), else classified by the name alone; run
  with XLA_FLAGS=--xla_gpu_enable_command_buffer= for full attribution (`prefill_bench.py --profile` does).
- CPU: the XLA thunk executor's events (args `hlo_op`, `hlo_module`, `device_ordinal`) on the XLA threads.  Control
  flow thunks (while / conditional / call) only contain other thunks and are left out; a dot offloaded to the
  thread pool is one event.

Each event maps to its HLO instruction in the compiled HLO text (`compiled.as_text()`), and from there to the
`jax.named_scope` path in its `metadata={op_name=...}` (a fusion: its own op_name, else its fused root's), its
opcode, custom-call target and the ops fused inside.  The first rule of `RULES` that matches files it under a
category.  Time is attributed on a sweep over the run's window: on each thread the innermost (latest started)
event owns the instant, instants where several threads run are shared equally, and instants where no event runs
are "idle/gaps" (launch gaps, host overhead, executor hand-offs).  So the categories of a run sum exactly to its
window; `covered_fraction` compares that sum with the unprofiled wall time.

Result (JSON-able): {"wall_s", "profiled_wall_s", "device_busy_s", "categories": {name: seconds},
"covered_fraction", "top_kernels": [[name, category, seconds, count], ...], "unmatched": {...}, "scopes", ...}.
`format_breakdown(result)` prints it as a table.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import glob
import gzip
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = [
    "CATEGORIES",
    "IDLE",
    "RULES",
    "Classified",
    "DeviceEvent",
    "HloIndex",
    "HloInstr",
    "Rule",
    "analyse_trace",
    "attribute",
    "classify",
    "describe_rules",
    "device_events",
    "format_breakdown",
    "load_trace",
    "parse_hlo",
    "profile",
    "run_windows",
    "scope",
    "summarise",
]

CATEGORIES = (
    "gemm",
    "attention",
    "compression_scoring",
    "topk_gather",
    "kv_concat_copy",
    "norm_rope_elementwise",
    "collectives",
    "other",
)
IDLE = "idle/gaps"
RUN_MARK = "apb_jax.profile/run_"
RULE_FIELDS = ("scope", "kernel", "target", "kind", "opcode", "ops", "root", "hlo")
CONTAINER_OPS = frozenset({"while", "conditional", "call"})
# ops a fusion's root is looked through to find what it produces
_PASS_THROUGH = frozenset({"bitcast", "reshape", "convert", "tuple", "get-tuple-element"})


# ---------------------------------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class Rule:
    """One line of the category table: `pattern` (a regex) tested on one `field` of a kernel event.

    field: "scope" (the op_name path, searched), "kernel" (the trace event's name, searched), "target" (a
    custom-call's target, searched), "kind" (a fusion's backend-config kind such as "__triton_gemm", searched),
    "opcode" (the instruction's own opcode, full match), "ops" (any opcode of the instruction or inside the
    computations it calls, full match), "root" (the opcodes a fusion's root produces, looking through
    bitcast/reshape/convert/tuple; else the opcode; full match), "hlo" (any event whose HLO instruction was found;
    the pattern is ignored).  `also`: more (field, pattern) pairs that must match too."""

    field: str
    pattern: str
    category: str
    note: str = ""
    also: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        for field, pattern in ((self.field, self.pattern), *self.also):
            if field not in RULE_FIELDS:
                raise ValueError(f"Rule field={field!r} must be one of {', '.join(RULE_FIELDS)}")
            re.compile(pattern)
        if self.category not in CATEGORIES:
            raise ValueError(f"Rule category={self.category!r} must be one of {', '.join(CATEGORIES)}")


def scope(path: str) -> str:
    """Regex for a named-scope path as whole segments of an op_name: "compress/score" matches
    "jit(f)/layer_3/compress/score/dot_general", not "jit(f)/decompress/scores"."""
    return r"(?:^|/)" + re.escape(path) + r"(?:/|$)"


_GEMM_KERNELS = r"gemm|nvjet|cublas|cutlass|xmma|matmul|wgmma_gemm"
_ATTN_KERNELS = r"apb_attention|mosaic|flash|fmha|sdpa|cudnn"
_COLL_KERNELS = r"nccl|all_?gather|all_?reduce|all_?to_?all|reduce_?scatter|ppermute|collective|sendrecv"

RULES: tuple[Rule, ...] = (
    # the named scopes of the model and strategies: purpose first (a matmul of a retaining head is compression)
    Rule("scope", scope("attention/kernel"), "attention", "the attention dispatcher call"),
    # XLA may name a compressor's matmul after an op folded into it (a transpose of the scores under compress/topk)
    Rule("scope", scope("compress"), "compression_scoring", "the compressor's matmuls", also=(("ops", "dot"),)),
    Rule("scope", scope("compress"), "compression_scoring", also=(("target", r"cublas|gemm|matmul"),)),
    Rule("scope", scope("compress/score"), "compression_scoring", "retaining heads / query-aware scores"),
    Rule("scope", scope("compress/topk"), "topk_gather"),
    Rule("scope", scope("compress/gather"), "topk_gather"),
    Rule("scope", scope("passing/all_gather"), "collectives", "the all_gather of passing blocks or its stand-in"),
    Rule("scope", scope("passing/concat"), "kv_concat_copy"),
    Rule("scope", scope("embed"), "other", "token embedding lookup"),
    Rule("scope", scope("rope"), "norm_rope_elementwise"),
    # before the scopes exist: names the code already puts in the op_name path
    Rule("scope", r"(?:^|/)jit\(apb_attention[^)/]*\)", "attention", "the kernel's jitted entry point"),
    Rule("scope", r"(?:^|/)jit\(take_along_axis\)", "topk_gather", "compression.gather_kv"),
    Rule("scope", r"(?:^|/)jit\(_take\)", "other", "jnp.take: the embedding lookup"),
    # what the instruction is
    Rule(
        "opcode",
        r"(all-gather|all-reduce|all-to-all|collective-permute|collective-broadcast|reduce-scatter|send|recv)"
        r"(-start|-done)?|ragged-all-to-all",
        "collectives",
    ),
    Rule("target", r"cublas|gemm|matmul|cudnn\$conv", "gemm", "library GEMM custom calls"),
    Rule("target", r"(?i)topk|sort", "topk_gather"),
    Rule("target", r"fmha|flash|pallas|mosaic|triton", "attention", "Pallas (Triton / Mosaic) or cuDNN attention"),
    Rule("ops", r"dot|convolution", "gemm", "XLA dot or a fusion around one"),
    Rule("ops", r"sort|topk", "topk_gather"),
    Rule("root", r"gather", "topk_gather"),
    Rule(
        "root",
        r"concatenate|copy|copy-start|copy-done|transpose|dynamic-update-slice|pad|slice|dynamic-slice",
        "kv_concat_copy",
    ),
    Rule("opcode", r"while|conditional|call|parameter|constant|tuple|get-tuple-element|after-all", "other"),
    # no HLO instruction (library kernels launched inside a custom call, memcpys): the kernel name
    Rule("kernel", _COLL_KERNELS, "collectives"),
    Rule("kernel", _GEMM_KERNELS, "gemm"),
    Rule("kernel", _ATTN_KERNELS, "attention"),
    Rule("kernel", r"(?i)topk|top_k|radix|\bsort|cub::", "topk_gather"),
    Rule("kernel", r"(?i)memcpy.?d(evice)?.?(2|to).?d", "kv_concat_copy", "device-to-device copies"),
    # any other XLA op or fusion: RMSNorm, RoPE, activations, residual adds, reductions
    Rule("hlo", "", "norm_rope_elementwise"),
)


# ------------------------------------------------------------------------------------------------------ HLO


@dataclasses.dataclass(frozen=True)
class HloInstr:
    """One instruction of a compiled HLO module: name, opcode, op_name metadata, the computations whose ops it runs
    as one launch (`calls=`: fusions, async wrappers), those it runs as control flow (while body / condition,
    conditional branches, call), its custom-call target and backend-config kind."""

    name: str
    opcode: str
    op_name: str = ""
    computation: str = ""
    calls: tuple[str, ...] = ()
    control: tuple[str, ...] = ()
    target: str = ""
    backend_kind: str = ""
    is_root: bool = False


@dataclasses.dataclass(frozen=True)
class HloIndex:
    """Instructions of one module by name (names are unique in a module), each computation's instruction names in
    order, and each instruction's operand names."""

    module: str
    instrs: dict[str, HloInstr]
    computations: dict[str, tuple[str, ...]]
    operands: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def get(self, name: str | None) -> HloInstr | None:
        return self.instrs.get(name) if name else None

    def root(self, comp: str) -> HloInstr | None:
        names = self.computations.get(comp, ())
        roots = [n for n in names if self.instrs[n].is_root]
        return self.instrs[(roots or names)[-1]] if names else None

    def inner(self, ins: HloInstr, _seen: frozenset = frozenset()) -> list[HloInstr]:
        """Instructions inside the computations `ins` calls, recursively (a fusion's fused ops)."""
        out = []
        for comp in ins.calls:
            if comp in _seen:
                continue
            for n in self.computations.get(comp, ()):
                sub = self.instrs[n]
                out.append(sub)
                out += self.inner(sub, _seen | {comp})
        return out

    def scope(self, ins: HloInstr) -> str:
        """The named-scope path of `ins`: its op_name, else its called root's, else the first inside."""
        if ins.op_name:
            return ins.op_name
        for comp in ins.calls:
            root = self.root(comp)
            if root is not None and root.op_name:
                return root.op_name
        return next((i.op_name for i in self.inner(ins) if i.op_name), "")

    def ops(self, ins: HloInstr) -> frozenset[str]:
        """The opcode of `ins` and of every instruction inside what it calls."""
        return frozenset([ins.opcode] + [i.opcode for i in self.inner(ins)])

    def roots(self, ins: HloInstr) -> frozenset[str]:
        """Opcodes a fusion produces: its fused root, looking through bitcast/reshape/convert/tuple."""
        if ins.opcode != "fusion" or not ins.calls:
            return frozenset([ins.opcode])
        comp = ins.calls[0]
        local = set(self.computations.get(comp, ()))
        out, todo, seen = set(), [self.root(comp)], set()
        while todo:
            cur = todo.pop()
            if cur is None or cur.name in seen:
                continue
            seen.add(cur.name)
            feeds = [self.instrs[o] for o in self.operands.get(cur.name, ()) if o in local]
            if cur.opcode in _PASS_THROUGH and feeds:
                todo += feeds
            else:
                out.add(cur.opcode)
        return frozenset(out)


_COMP_RE = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OP_NAME_RE = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_TARGET_RE = re.compile(r'custom_call_target="((?:[^"\\]|\\.)*)"')
_KIND_RE = re.compile(r'"kind"\s*:\s*"([^"]+)"')
_CALLS_RE = re.compile(
    r"\b(calls|to_apply|body|condition|branch_computations|true_computation|false_computation)=(\{[^}]*\}|%?[\w.\-]+)"
)
_NAME_RE = re.compile(r"%?([\w.\-]+)")


def _skip_shape(rest: str) -> str:
    """`rest` after "name = ": drop the result shape (a tuple shape has spaces inside parentheses)."""
    rest = rest.lstrip()
    if rest.startswith("("):
        depth = 0
        for i, c in enumerate(rest):
            depth += c == "("
            depth -= c == ")"
            if depth == 0:
                return rest[i + 1 :].lstrip()
        return ""
    parts = rest.split(None, 1)
    return parts[1] if len(parts) > 1 else ""


def _operand_names(args: str) -> tuple[str, ...]:
    """Operand names of "opcode(%a, %b.1), attr=..." (up to the closing parenthesis of the operand list)."""
    depth, end = 0, len(args)
    for i, c in enumerate(args):
        depth += c in "({["
        depth -= c in ")}]"
        if depth < 0:
            end = i
            break
    return tuple(m.group(1) for m in re.finditer(r"%([\w.\-]+)", args[:end]))


def parse_hlo(text: str) -> HloIndex:
    """Index the instructions of an HLO module's text (as `jax.stages.Compiled.as_text()` prints it)."""
    module = ""
    m = re.search(r"^HloModule\s+([^\s,]+)", text, re.M)
    if m:
        module = m.group(1)
    instrs: dict[str, HloInstr] = {}
    comps: dict[str, list[str]] = {}
    operands: dict[str, tuple[str, ...]] = {}
    comp = None
    for line in text.splitlines():
        cm = _COMP_RE.match(line)
        if cm and " = " not in line.split("(", 1)[0]:
            comp = cm.group(2)
            comps[comp] = []
            continue
        if comp is None:
            continue
        if line.strip() == "}":
            comp = None
            continue
        im = _INSTR_RE.match(line)
        if not im:
            continue
        root, name, rest = bool(im.group(1)), im.group(2), im.group(3)
        body = _skip_shape(rest)
        om = re.match(r"([\w\-]+)\((.*)$", body)
        if not om:
            continue
        opcode, args = om.group(1), om.group(2)
        calls, control = [], []
        for cm2 in _CALLS_RE.finditer(line):
            if cm2.group(1) == "calls":
                calls += _NAME_RE.findall(cm2.group(2))
            elif cm2.group(1) != "to_apply" or opcode == "call":  # a reduce's to_apply is a scalar reducer
                control += _NAME_RE.findall(cm2.group(2))
        opm, tm, km = _OP_NAME_RE.search(line), _TARGET_RE.search(line), _KIND_RE.search(line)
        instrs[name] = HloInstr(
            name=name,
            opcode=opcode,
            op_name=opm.group(1).replace('\\"', '"') if opm else "",
            computation=comp,
            calls=tuple(calls),
            control=tuple(control),
            target=tm.group(1) if tm else "",
            backend_kind=km.group(1) if km else "",
            is_root=root,
        )
        operands[name] = _operand_names(args)
        comps[comp].append(name)
    return HloIndex(module, instrs, {k: tuple(v) for k, v in comps.items()}, operands)


# -------------------------------------------------------------------------------------------- classification


@dataclasses.dataclass(frozen=True)
class Classified:
    category: str
    rule: int  # index into the rule table; -1: no rule matched (category "other")
    scope: str
    instr: str | None  # the HLO instruction found, if any


def _field_values(field: str, kernel: str, ins: HloInstr | None, index: HloIndex | None, scope_path: str):
    if field == "kernel":
        return [kernel]
    if field == "scope":
        return [scope_path] if scope_path else []
    if ins is None or index is None:
        return []
    if field == "target":
        return [ins.target] if ins.target else []
    if field == "kind":
        return [ins.backend_kind] if ins.backend_kind else []
    if field == "opcode":
        return [ins.opcode]
    if field == "ops":
        return sorted(index.ops(ins))
    if field == "root":
        return sorted(index.roots(ins))
    return [ins.name]  # "hlo"


def _matches(field: str, pattern: str, kernel: str, ins, index, scope_path: str) -> bool:
    vals = _field_values(field, kernel, ins, index, scope_path)
    if field == "hlo":
        return bool(vals)
    rx = re.compile(pattern)
    full = field in ("opcode", "ops", "root")
    return any((rx.fullmatch(v) if full else rx.search(v)) for v in vals)


def classify(
    kernel: str,
    ins: HloInstr | None = None,
    index: HloIndex | None = None,
    rules: Sequence[Rule] = RULES,
    scope_path: str | None = None,
) -> Classified:
    """Category of one kernel event named `kernel` whose HLO instruction is `ins` (None: unknown).

    scope_path: the op_name path (default: `index.scope(ins)`; pass the trace's own op_name when the instruction
    is unknown).  The first matching rule wins; nothing matching -> "other"."""
    if scope_path is None:
        scope_path = index.scope(ins) if (ins is not None and index is not None) else ""
    for i, r in enumerate(rules):
        if all(_matches(f, p, kernel, ins, index, scope_path) for f, p in ((r.field, r.pattern), *r.also)):
            return Classified(r.category, i, scope_path, ins.name if ins else None)
    return Classified("other", -1, scope_path, ins.name if ins else None)


# ------------------------------------------------------------------------------------------------ the trace


@dataclasses.dataclass(frozen=True)
class DeviceEvent:
    """One kernel / op execution: [start, start + dur) in microseconds on `thread` of `device`."""

    name: str
    start: float
    dur: float
    thread: Any
    device: Any = 0
    hlo_op: str | None = None
    hlo_module: str | None = None
    op_name: str | None = None  # the annotation's op_name / name, when the trace carries one
    long_name: str | None = None  # the full name when the trace shows a short display name

    @property
    def kernel(self) -> str:
        """What the "kernel" rules read: the name, and the long name on a second line when there is one."""
        return self.name if not self.long_name else f"{self.name}\n{self.long_name}"

    @property
    def end(self) -> float:
        return self.start + self.dur


def load_trace(log_dir: str) -> tuple[dict, str]:
    """The newest trace JSON under `log_dir` (perfetto_trace.json.gz, else *.trace.json.gz): (dict, path)."""
    found = []
    for pat in ("**/perfetto_trace.json.gz", "**/*.trace.json.gz"):
        found = sorted(glob.glob(os.path.join(log_dir, pat), recursive=True), key=os.path.getmtime)
        if found:
            break
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz or *.trace.json.gz under log_dir={log_dir!r}")
    with gzip.open(found[-1], "rt") as f:
        doc = json.load(f)
    if isinstance(doc, list):
        doc = {"traceEvents": doc}
    return doc, found[-1]


def _names(events: list[dict]) -> tuple[dict, dict]:
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") != "M":
            continue
        if e.get("name") == "process_name":
            procs[e.get("pid")] = (e.get("args") or {}).get("name", "")
        elif e.get("name") == "thread_name":
            threads[(e.get("pid"), e.get("tid"))] = (e.get("args") or {}).get("name", "")
    return procs, threads


_SKIP_DEVICE_LINES = re.compile(r"(?i)modules|steps|overhead|framework|source|traceme|launch stats|sparsecore")


def device_events(trace: dict) -> tuple[list[DeviceEvent], str]:
    """Kernel / op events of the trace and where they came from ("gpu": device stream lines, "cpu": XLA thunk
    events on host threads).  Control-flow thunks and executor bookkeeping are not included."""
    evs = [e for e in trace.get("traceEvents", []) if isinstance(e, dict)]
    procs, threads = _names(evs)
    dev_pids = {p for p, n in procs.items() if str(n).startswith("/device:")}
    out: list[DeviceEvent] = []
    if dev_pids:
        lines = {k: n for k, n in threads.items() if k[0] in dev_pids}
        keep = {k for k, n in lines.items() if n.startswith("Stream")}
        if not keep:
            ops = {k for k, n in lines.items() if n == "XLA Ops"}
            keep = ops or {k for k, n in lines.items() if not _SKIP_DEVICE_LINES.search(n)}
        for e in evs:
            if e.get("ph") != "X" or e.get("pid") not in dev_pids:
                continue
            if lines and (e.get("pid"), e.get("tid")) not in keep:
                continue
            a = e.get("args") or {}
            out.append(_event(e, a, device=e.get("pid")))
        if out:
            return out, "gpu"
    for e in evs:
        a = e.get("args") or {}
        if e.get("ph") != "X" or "hlo_op" not in a or str(e.get("name", "")).startswith("end: "):
            continue
        out.append(_event(e, a, device=a.get("device_ordinal", 0)))
    return out, "cpu"


def _event(e: dict, a: dict, device) -> DeviceEvent:
    return DeviceEvent(
        name=str(e.get("name", "")),
        start=float(e.get("ts", 0.0)),
        dur=float(e.get("dur", 0.0)),
        thread=(e.get("pid"), e.get("tid")),
        device=device,
        hlo_op=a.get("hlo_op"),
        hlo_module=a.get("hlo_module"),
        op_name=a.get("op_name") or a.get("name"),
        long_name=a.get("long_name"),
    )


def run_windows(trace: dict, mark: str = RUN_MARK) -> list[tuple[float, float]]:
    """[start, end) in microseconds of each `TraceAnnotation(mark + str(i))` of the trace, in run order."""
    wins = {}
    for e in trace.get("traceEvents", []):
        if isinstance(e, dict) and e.get("ph") == "X" and str(e.get("name", "")).startswith(mark):
            suffix = str(e["name"])[len(mark) :]
            if suffix.isdigit():
                wins[int(suffix)] = (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
    return [wins[k] for k in sorted(wins)]


def attribute(spans: Sequence[tuple[float, float, Any]], t0: float, t1: float) -> tuple[list[float], float]:
    """Split the window [t0, t1) among `spans` (start, end, thread): on each thread the latest-started active span
    owns the instant (nesting: the innermost), threads running at once share it equally.  Returns (seconds per
    span, seconds covered by any span); spans are clipped to the window.  Times in microseconds in, seconds out."""
    edges = []
    for i, (s, e, _th) in enumerate(spans):
        s, e = max(s, t0), min(e, t1)
        if e > s:
            edges.append((s, 1, i))
            edges.append((e, 0, i))
    edges.sort(key=lambda x: (x[0], x[1]))
    share = [0.0] * len(spans)
    busy = 0.0
    active: dict[Any, list[tuple[float, int]]] = defaultdict(list)
    prev = None
    for t, kind, i in edges:
        if prev is not None and t > prev and active:
            dt = (t - prev) * 1e-6
            busy += dt
            each = dt / len(active)
            for stack in active.values():
                share[max(stack)[1]] += each
        th = spans[i][2]
        item = (max(spans[i][0], t0), i)
        if kind == 1:
            bisect.insort(active[th], item)
        else:
            active[th].remove(item)
            if not active[th]:
                del active[th]
        prev = t
    return share, busy


# -------------------------------------------------------------------------------------------------- analysis


def analyse_trace(
    trace: dict,
    index: HloIndex | None,
    rules: Sequence[Rule] = RULES,
    mark: str = RUN_MARK,
    top: int = 25,
) -> dict:
    """Per-run breakdown of a trace: device events of `index.module` inside each run window (see `run_windows`;
    no marks: one window spanning the events), attributed by `attribute` and classified by `rules`.

    Returns {"source", "device", "runs": [{"window_s", "busy_s", "categories", "top_kernels", "scopes",
    "unmatched", "events"}...]} with categories including IDLE (window - busy)."""
    events, source = device_events(trace)
    module = index.module if index is not None else None
    windows = run_windows(trace, mark)
    if not windows and events:
        windows = [(min(e.start for e in events), max(e.end for e in events))]
    starts = [w[0] for w in windows]

    def run_of(ev: DeviceEvent) -> int | None:
        k = bisect.bisect_right(starts, ev.start) - 1
        return k if k >= 0 and ev.start < windows[k][1] else None

    def foreign(ev: DeviceEvent) -> bool:
        return bool(module and ev.hlo_module and ev.hlo_module != module)

    module_found = not module or any(not foreign(e) and e.hlo_module for e in events if run_of(e) is not None)
    if not module_found:  # the trace spells the module differently: every event in the windows counts
        module = None
    ours = [e for e in events if not foreign(e)]
    other_module = [e for e in events if foreign(e)]
    # the program's device: the one busiest with this module's events inside the windows
    per_dev: dict[Any, float] = defaultdict(float)
    for e in ours:
        if run_of(e) is not None:
            per_dev[e.device] += e.dur
    device = max(per_dev, key=per_dev.get) if per_dev else None
    ours = [e for e in ours if e.device == device]

    cache: dict[tuple[str, str | None, str | None], Classified] = {}
    found: dict[tuple[str, str | None, str | None], HloInstr | None] = {}

    def cls(e: DeviceEvent) -> tuple[Classified, HloInstr | None]:
        key = (e.kernel, e.hlo_op, e.op_name)
        if key not in cache:
            ins = _find_instr(index, e, kernels=source != "cpu")
            sp = index.scope(ins) if (ins is not None and index is not None) else (e.op_name or "")
            cache[key] = classify(e.kernel, ins, index, rules, scope_path=sp)
            found[key] = ins
        return cache[key], found[key]

    by_run: dict[int | None, list] = defaultdict(list)
    for e in ours:
        by_run[run_of(e)].append(e)
    runs = []
    for k, (t0, t1) in enumerate(windows):
        evs = []
        for e in by_run[k]:
            c, ins = cls(e)
            if ins is not None and ins.opcode in CONTAINER_OPS:
                continue  # a loop / call only holds other ops; its own time is executor overhead (gaps)
            evs.append((e, c, ins))
        share, busy = attribute([(e.start, e.end, e.thread) for e, _, _ in evs], t0, t1)
        cats = dict.fromkeys(CATEGORIES, 0.0)
        kern: dict[tuple[str, str], list] = {}
        scopes: dict[str, float] = defaultdict(float)
        no_hlo: dict[str, list] = {}
        other: dict[str, list] = {}
        for (e, c, ins), s in zip(evs, share):
            cats[c.category] += s
            kk = kern.setdefault((e.name, c.category), [0.0, 0])
            kk[0] += s
            kk[1] += 1
            scopes[_scope_key(c.scope)] += s
            if ins is None:
                v = no_hlo.setdefault(e.name, [0.0, 0])
                v[0] += s
                v[1] += 1
            if c.category == "other":
                v = other.setdefault(e.hlo_op or e.name, [0.0, 0])
                v[0] += s
                v[1] += 1
        window = (t1 - t0) * 1e-6
        cats[IDLE] = max(window - busy, 0.0)
        ranked = sorted(kern.items(), key=lambda kv: -kv[1][0])
        runs.append(
            {
                "window_s": window,
                "busy_s": busy,
                "kernel_sum_s": sum(e.dur for e, _, _ in evs) * 1e-6,
                "no_hlo_s": sum(v[0] for v in no_hlo.values()),
                "events": len(evs),
                "categories": cats,
                "top_kernels": [[n[:300], c, v[0], v[1]] for (n, c), v in ranked[:top]],
                "scopes": dict(sorted(scopes.items(), key=lambda kv: -kv[1])),
                "unmatched": {
                    "no_hlo": _ranked(no_hlo, top),
                    "other": _ranked(other, top),
                },
            }
        )
    return {
        "source": source,
        "device": device,
        "module": index.module if index is not None else None,
        "module_found": module_found,
        "windows": len(windows),
        "marked": bool(run_windows(trace, mark)),
        "outside_runs_s": sum(e.dur for e in by_run[None]) * 1e-6,
        "other_modules_s": sum(e.dur for e in other_module if run_of(e) is not None) * 1e-6,
        "runs": runs,
    }


def _ranked(d: dict[str, list], top: int) -> list:
    return [[n[:300], v[0], v[1]] for n, v in sorted(d.items(), key=lambda kv: -kv[1][0])[:top]]


def _find_instr(index: HloIndex | None, e: DeviceEvent, kernels: bool) -> HloInstr | None:
    """The event's HLO instruction: its hlo_op arg, else its name (CPU thunks are named after the instruction; an
    XLA GPU kernel after its fusion, "loop_add_fusion.3" -> "loop_add_fusion_3").

    kernels: the events are device kernels, so an hlo_op naming a control-flow instruction (a command buffer's
    call, whose CUDA graph hides the kernels' own annotations) is passed over for the kernel's name."""
    if index is None:
        return None
    name = e.name.split("(", 1)[0].strip()
    cands = [*re.split(r"[,;\s]+", e.hlo_op or ""), name, re.sub(r"_(\d+)$", r".\1", name)]
    cands.append(re.sub(r"_(\d+)_\d+$", r".\1", name))
    for c in cands:
        ins = index.instrs.get(c)
        if ins is not None and not (kernels and ins.opcode in CONTAINER_OPS):
            return ins
    return None


_SCOPE_NAMES = (
    "embed",
    "qkv_proj",
    "rope",
    "attention/kernel",
    "compress/score",
    "compress/topk",
    "compress/gather",
    "passing/all_gather",
    "passing/concat",
    "attention",
    "o_proj",
    "mlp",
    "norm",
    "lm_head",
)


@functools.lru_cache(maxsize=4096)
def _scope_key(path: str) -> str:
    """The most specific of the model's scope names in an op_name path ("(none)" if none)."""
    for s in _SCOPE_NAMES:
        if re.search(scope(s), path):
            return s
    return "(none)"


# -------------------------------------------------------------------------------------------------- profile


def profile(
    fn: Callable,
    *args,
    repeats: int = 5,
    warmup: int = 1,
    rules: Sequence[Rule] = RULES,
    log_dir: str | None = None,
    top: int = 25,
    python_tracer: bool = False,
    compiler_options: dict | None = None,
) -> dict:
    """Time and profile `fn(*args)` (a jitted function, or an already compiled `jax.stages.Compiled`).

    The program is compiled once (with `compiler_options`, XLA debug options, if given); `warmup` runs, `repeats`
    timed runs (wall_s: their median, host clock after block_until_ready), then `repeats` runs under
    `jax.profiler.trace`.  The breakdown is that of the profiled run with the median window.  log_dir: keep the
    trace there (default: a temporary directory, removed).  Returns a JSON-able dict (see the module docstring)."""
    import jax

    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must be >= 0")
    compiled = fn.lower(*args).compile(compiler_options) if hasattr(fn, "lower") else fn
    index = parse_hlo(compiled.as_text())

    out = None
    for _ in range(warmup):
        del out
        out = compiled(*args)
        jax.block_until_ready(out)
    walls = []
    for _ in range(repeats):
        del out
        t0 = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        walls.append(time.perf_counter() - t0)
    del out
    out = None

    tmp = log_dir or tempfile.mkdtemp(prefix="apb_profile_")
    opts = jax.profiler.ProfileOptions()
    if not python_tracer:
        with contextlib.suppress(AttributeError):
            opts.python_tracer_level = 0  # the Python tracer slows host-side dispatch (it would show up as gaps)
    prof_walls = []
    try:
        with jax.profiler.trace(tmp, create_perfetto_trace=True, profiler_options=opts):
            for i in range(repeats):
                del out
                with jax.profiler.TraceAnnotation(f"{RUN_MARK}{i}"):
                    t0 = time.perf_counter()
                    out = compiled(*args)
                    jax.block_until_ready(out)
                    prof_walls.append(time.perf_counter() - t0)
        del out
        trace, path = load_trace(tmp)
        res = analyse_trace(trace, index, rules, top=top)
    finally:
        if log_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    res["trace_path"] = path if log_dir else None
    return summarise(res, walls, prof_walls, platform=jax.default_backend())


def summarise(analysis: dict, walls: Sequence[float], prof_walls: Sequence[float] = (), platform: str = "") -> dict:
    """The result dict: the median profiled run's breakdown against the unprofiled wall time (median of `walls`)."""
    runs = analysis["runs"]
    wall = statistics.median(walls) if walls else float("nan")
    res = {
        "platform": platform,
        "trace_source": analysis["source"],
        "module": analysis["module"],
        "wall_s": wall,
        "wall_runs_s": list(walls),
        "profiled_runs_wall_s": list(prof_walls),
        "profiled_run": None,
        "notes": [],
    }
    if not runs:
        res.update(
            profiled_wall_s=None,
            device_busy_s=0.0,
            categories={**dict.fromkeys(CATEGORIES, 0.0), IDLE: 0.0},
            covered_fraction=0.0,
            top_kernels=[],
            unmatched={},
        )
        res["notes"].append("the trace holds no device events of this program")
        return res
    order = sorted(range(len(runs)), key=lambda k: runs[k]["window_s"])
    k = order[(len(order) - 1) // 2]
    r = runs[k]
    total = sum(r["categories"].values())
    res.update(
        {
            "profiled_wall_s": r["window_s"],
            "profiled_run": k,
            "device_busy_s": r["busy_s"],
            "kernel_sum_s": r["kernel_sum_s"],
            "events_per_run": r["events"],
            "categories": r["categories"],
            "categories_sum_s": total,
            "covered_fraction": total / wall if wall > 0 else float("nan"),
            "busy_fraction": r["busy_s"] / wall if wall > 0 else float("nan"),
            "idle_vs_unprofiled_wall_s": max(wall - r["busy_s"], 0.0),
            "top_kernels": r["top_kernels"],
            "scopes": r["scopes"],
            "unmatched": {
                **r["unmatched"],
                "outside_runs_s": analysis["outside_runs_s"],
                "other_modules_s": analysis["other_modules_s"],
            },
            "runs": [{"window_s": x["window_s"], "busy_s": x["busy_s"]} for x in runs],
            "trace_path": analysis.get("trace_path"),
        }
    )
    if analysis["source"] != "cpu" and r["no_hlo_s"] > 0.2 * r["busy_s"]:
        res["notes"].append(
            f"{r['no_hlo_s'] / r['busy_s']:.0%} of the device time is in kernels with no HLO instruction (kernels "
            "inside CUDA graphs lose XLA's annotation): profile with XLA_FLAGS=--xla_gpu_enable_command_buffer= "
            "for op-level attribution"
        )
    if r["events"] == 0:
        res["notes"].append("no device events in the runs (on GPU: could the profiler load CUPTI?)")
    if not analysis.get("module_found", True):
        res["notes"].append(f"no event of module {analysis['module']!r} in the runs: all events in them counted")
    if not analysis.get("marked"):
        res["notes"].append("no run marks in the trace: one window spans all device events")
    if wall > 0 and abs(total / wall - 1) > 0.05:
        if analysis["source"] == "cpu":
            why = "CPU runs of one program vary this much on shared cores; the traced run is self-consistent"
        elif total > wall:
            why = "tracing overhead (XLA may run command buffers op by op while tracing): idle/gaps is inflated"
        else:
            why = "the traced run was faster than the unprofiled median (run-to-run variation)"
        res["notes"].append(
            f"categories sum to {total:.4g} s = {total / wall:.1%} of the wall time {wall:.4g} s: {why}; "
            f"wall minus device busy time is {max(wall - r['busy_s'], 0.0):.4g} s"
        )
    return res


# ---------------------------------------------------------------------------------------------------- table


def format_breakdown(res: dict, top: int = 15, title: str = "") -> str:
    """A plain-text table of a `profile` result: categories (seconds, % of wall), top kernels, unmatched."""
    wall = res.get("wall_s") or float("nan")
    lines = []
    if title:
        lines.append(title)
    lines.append(
        f"wall {wall:.4f} s (unprofiled median of {len(res.get('wall_runs_s', []))}), "
        f"profiled run {res.get('profiled_wall_s') or float('nan'):.4f} s, "
        f"device busy {res.get('device_busy_s', 0.0):.4f} s ({res.get('trace_source', '?')} trace)"
    )
    cats = res.get("categories", {})
    w = max([len(c) for c in cats] + [8])
    lines.append(f"  {'category':<{w}}  {'seconds':>9}  {'% wall':>7}")
    for c in (*CATEGORIES, IDLE):
        if c in cats:
            lines.append(f"  {c:<{w}}  {cats[c]:>9.4f}  {cats[c] / wall:>7.1%}")
    lines.append(
        f"  {'sum':<{w}}  {sum(cats.values()):>9.4f}  {res.get('covered_fraction', float('nan')):>7.1%}"
        "  (covered_fraction)"
    )
    tk = res.get("top_kernels", [])[:top]
    if tk:
        lines.append(f"  top kernels of the profiled run ({res.get('events_per_run', '?')} events):")
        for name, cat, s, n in tk:
            short = name if len(name) <= 70 else name[:67] + "..."
            lines.append(f"    {s:>9.4f} s {n:>5}x  {cat:<22} {short}")
    scopes = {k: v for k, v in res.get("scopes", {}).items() if k != "(none)"}
    if scopes:
        lines.append("  by named scope: " + ", ".join(f"{k} {v:.4f}s" for k, v in scopes.items()))
    um = res.get("unmatched", {})
    for key, label in (("no_hlo", "events with no HLO instruction"), ("other", "events in 'other'")):
        rows = um.get(key) or []
        if rows:
            lines.append(f"  {label}: " + ", ".join(f"{n[:40]} {s:.4f}s/{c}x" for n, s, c in rows[:5]))
    for note in res.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def describe_rules(rules: Iterable[Rule] = RULES) -> str:
    """The rule table as text, one numbered line per rule (first match wins)."""
    return "\n".join(f"{i:>2}. {r.field:<6} {r.pattern!r} -> {r.category}" for i, r in enumerate(rules))
