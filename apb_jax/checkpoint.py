"""Hugging Face Llama/Qwen2 checkpoint (safetensors or pytorch_model.bin) -> Flax params -> orbax checkpoint.

Three layers, each usable alone:
  * `hf_to_flax_path` / `split_fused`: pure name mapping (no I/O).
  * `load_hf_params(src, config, dtype)`: every tensor of an HF directory as host numpy arrays keyed by Flax path,
    validated against `abstract_module(config, dtype)` before any tensor data is read, streamed one shard and one
    tensor at a time (one copy of the model in host memory, in the target dtype).
  * `convert(src, dst)`: the above, written as an orbax checkpoint `dst/params/` beside `config.json` and the
    tokenizer files.

Flax paths mirror HF names: `model.layers.3.self_attn.q_proj.weight` [out, in] -> ("layers", 3, "self_attn",
"q_proj", "kernel") [in, out].
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from apb_jax.config import ModelConfig

FlaxPath = tuple[Any, ...]

PARAMS_DIR = "params"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


# ----------------------------------------------------------------------------------------------- names (pure)


def _strip(hf_name: str) -> str:
    return hf_name[len("model.") :] if hf_name.startswith("model.") else hf_name


def is_ignored(hf_name: str, config: ModelConfig) -> bool:
    """Buffers and duplicates that carry no parameter: rotary `inv_freq`, and `lm_head.weight` of a tied model."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return True
    return config.tie_word_embeddings and _strip(hf_name) == "lm_head.weight"


def hf_to_flax_path(hf_name: str, config: ModelConfig) -> FlaxPath | None:
    """HF tensor name -> Flax param path, or None for a buffer that is ignored (see `is_ignored`).

    Fused tensors (`qkv_proj`, `gate_up_proj`) are split first with `split_fused`.  A name that is no parameter of a
    Llama/Qwen2 decoder is a ValueError.  The layer index is not checked against `config.num_layers` here (the
    shape/name validation against the module reports it as an extra tensor).
    """
    if is_ignored(hf_name, config):
        return None
    name = _strip(hf_name)
    if name == "embed_tokens.weight":
        return ("embed_tokens", "embedding")
    if name == "norm.weight":
        return ("norm", "scale")
    if name == "lm_head.weight":
        return ("lm_head", "kernel")
    m = _LAYER_RE.match(name)
    if m:
        i, rest = int(m.group(1)), m.group(2).split(".")
        if len(rest) == 2 and rest[0] in ("input_layernorm", "post_attention_layernorm") and rest[1] == "weight":
            return ("layers", i, rest[0], "scale")
        if (
            len(rest) == 3
            and rest[2] in ("weight", "bias")
            and ((rest[0] == "self_attn" and rest[1] in _ATTN) or (rest[0] == "mlp" and rest[1] in _MLP))
        ):
            return ("layers", i, rest[0], rest[1], "kernel" if rest[2] == "weight" else "bias")
    raise ValueError(
        f"unknown tensor {hf_name!r}: it is no parameter of a {config.model_type} decoder "
        f"(expected embed_tokens, layers.N.{{input,post_attention}}_layernorm, "
        f"layers.N.self_attn.{{q,k,v,o}}_proj, layers.N.mlp.{{gate,up,down}}_proj, norm, lm_head)"
    )


def flax_to_hf_name(path: FlaxPath) -> str:
    """The inverse of `hf_to_flax_path` (unfused names), for error messages."""
    if path[0] == "layers":
        *mid, leaf = path[2:]
        leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
        return ".".join(["model.layers", str(path[1]), *mid, leaf])
    if path == ("lm_head", "kernel"):
        return "lm_head.weight"
    return {("embed_tokens", "embedding"): "model.embed_tokens.weight", ("norm", "scale"): "model.norm.weight"}.get(
        tuple(path), ".".join(map(str, path))
    )


def split_fused(hf_name: str, config: ModelConfig) -> list[tuple[str, int]] | None:
    """A fused tensor's parts as (unfused HF name, rows along dim 0), or None when `hf_name` is not fused.

    `...self_attn.qkv_proj.{weight,bias}` -> q, k, v (H*D, KVH*D, KVH*D rows); `...mlp.gate_up_proj.weight` -> gate,
    up (intermediate rows each).
    """
    cfg = config
    for fused, parts in (
        (
            "self_attn.qkv_proj",
            (
                ("q_proj", cfg.num_heads * cfg.head_dim),
                ("k_proj", cfg.num_kv_heads * cfg.head_dim),
                ("v_proj", cfg.num_kv_heads * cfg.head_dim),
            ),
        ),
        ("mlp.gate_up_proj", (("gate_proj", cfg.intermediate_size), ("up_proj", cfg.intermediate_size))),
    ):
        key = f".{fused}."
        if key in hf_name:
            head, tail = hf_name.split(key)
            block = fused.split(".")[0]
            return [(f"{head}.{block}.{p}.{tail}", rows) for p, rows in parts]
    return None


def _hf_shape_to_flax(path: FlaxPath, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[::-1]) if path[-1] == "kernel" else tuple(shape)


def _fmt(path: FlaxPath) -> str:
    return "/".join(map(str, path))


# ----------------------------------------------------------------------------------------------- plan (pure)


@dataclasses.dataclass(frozen=True)
class Part:
    path: FlaxPath
    hf_name: str  # the unfused HF name (for a fused tensor: the part's name)
    rows: tuple[int, int] | None  # row range of the fused tensor, None when not fused
    transpose: bool


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_name: str
    file: Path
    parts: tuple[Part, ...]


def expected_params(config: ModelConfig, dtype) -> dict[FlaxPath, Any]:
    """Flax path -> jax.ShapeDtypeStruct of every param of the module (no memory allocated)."""
    from flax import nnx

    from apb_jax.model import abstract_module

    state = nnx.state(abstract_module(config, dtype), nnx.Param)
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def plan(
    tensors: dict[str, tuple[tuple[int, ...], Path]], config: ModelConfig, expected: dict[FlaxPath, Any]
) -> list[Entry]:
    """Map every HF tensor (name -> (shape, file)) to Flax params and check names and shapes, reading no data.

    Raises ValueError naming the HF tensor, the Flax path and both shapes on an unknown, extra, duplicate,
    mis-shaped or missing tensor.
    """
    entries: list[Entry] = []
    seen: dict[FlaxPath, str] = {}
    for hf_name, (shape, file) in tensors.items():
        if is_ignored(hf_name, config):
            continue
        fused = split_fused(hf_name, config)
        if fused is not None:
            total = sum(r for _, r in fused)
            if len(shape) not in (1, 2) or shape[0] != total:
                split = " + ".join(f"{n.rsplit('.', 2)[-2]} {r}" for n, r in fused)
                raise ValueError(
                    f"fused tensor {hf_name!r} in {file.name} has shape {list(shape)}; expected {total} rows ({split})"
                )
        parts, start = [], 0
        for part_name, rows in fused or [(hf_name, None)]:
            try:
                path = hf_to_flax_path(part_name, config)
            except ValueError as e:
                raise ValueError(f"{e}; found in {file.name} with shape {list(shape)}") from None
            part_shape = shape if rows is None else (rows, *shape[1:])
            if path not in expected:
                raise ValueError(
                    f"extra tensor {part_name!r} in {file.name} (shape {list(part_shape)}): Flax path "
                    f"{_fmt(path)} is not in this {config.model_type} model "
                    f"(num_layers={config.num_layers}, tie_word_embeddings={config.tie_word_embeddings}, "
                    f"qkv_bias={config.qkv_bias}, o_bias={config.o_bias}, mlp_bias={config.mlp_bias})"
                )
            want = tuple(expected[path].shape)
            got = _hf_shape_to_flax(path, part_shape)
            if got != want:
                raise ValueError(
                    f"tensor {part_name!r} in {file.name} has HF shape {list(part_shape)} (Flax {got}) "
                    f"but Flax path {_fmt(path)} expects {want} (HF {list(_hf_shape_to_flax(path, want))})"
                )
            if path in seen:
                raise ValueError(
                    f"tensor {part_name!r} in {file.name} maps to Flax path {_fmt(path)}, already set by {seen[path]!r}"
                )
            seen[path] = part_name
            parts.append(
                Part(
                    path=path,
                    hf_name=part_name,
                    rows=None if rows is None else (start, start + rows),
                    transpose=path[-1] == "kernel",
                )
            )
            start += rows or 0
        entries.append(Entry(hf_name=hf_name, file=file, parts=tuple(parts)))
    missing = [p for p in expected if p not in seen]
    if missing:
        lines = [f"{flax_to_hf_name(p)} (Flax {_fmt(p)}, shape {tuple(expected[p].shape)})" for p in missing[:8]]
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): " + "; ".join(lines) + more)
    return entries


# ----------------------------------------------------------------------------------------------- reading


def _np_dtype(dtype) -> np.dtype:
    from apb_jax.model import resolve_dtype

    return np.dtype(resolve_dtype(dtype))


def weight_files(src: str | Path) -> tuple[str, list[Path]]:
    """("safetensors" | "bin", files) of an HF directory; safetensors win over pytorch_model.bin."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(src)!r} does not exist")
    for kind, index, single, pattern in (
        ("safetensors", SAFETENSORS_INDEX, "model.safetensors", "*.safetensors"),
        ("bin", BIN_INDEX, "pytorch_model.bin", "pytorch_model*.bin"),
    ):
        if (src / index).is_file():
            names = sorted(set(json.loads((src / index).read_text())["weight_map"].values()))
            files = [src / n for n in names]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise FileNotFoundError(f"{index} in {src} lists shard(s) that are not there: {absent}")
            return kind, files
        if (src / single).is_file():
            return kind, [src / single]
        found = sorted(src.glob(pattern))
        if found:
            return kind, found
    raise FileNotFoundError(
        f"no weights in {src}: expected model.safetensors, {SAFETENSORS_INDEX} with shards, or pytorch_model.bin"
    )


def _read_safetensors_raw(file: Path, name: str) -> np.ndarray:
    """One tensor straight from the file bytes (for safetensors builds whose numpy backend lacks bfloat16)."""
    import ml_dtypes

    dtypes = {
        "F32": np.float32,
        "F16": np.float16,
        "BF16": ml_dtypes.bfloat16,
        "F64": np.float64,
        "I64": np.int64,
        "I32": np.int32,
        "I16": np.int16,
        "I8": np.int8,
        "U8": np.uint8,
        "BOOL": np.bool_,
    }
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))[name]
        begin, end = meta["data_offsets"]
        f.seek(8 + n + begin)
        buf = f.read(end - begin)
    return np.frombuffer(buf, dtype=dtypes[meta["dtype"]]).reshape(meta["shape"])


def _torch_to_numpy(t) -> np.ndarray:
    import ml_dtypes
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _list_tensors(kind: str, files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    out: dict[str, tuple[tuple[int, ...], Path]] = {}
    for file in files:
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="numpy") as f:
                items = [(k, tuple(f.get_slice(k).get_shape())) for k in f.keys()]  # noqa: SIM118 - safe_open is no mapping
        else:
            items = [(k, tuple(v.shape)) for k, v in _torch_load(file).items()]
        for k, shape in items:
            if k in out:
                raise ValueError(f"tensor {k!r} appears in both {out[k][1].name} and {file.name}")
            out[k] = (shape, file)
    return out


def _torch_load(file: Path) -> dict:
    import torch

    try:
        return torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
        return torch.load(str(file), map_location="cpu", weights_only=True)


def _iter_file(kind: str, file: Path, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) one tensor at a time, in the checkpoint's own dtype."""
    if kind == "safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="numpy") as f:
            for name in names:
                try:
                    arr = f.get_tensor(name)
                except Exception:  # older safetensors: no bfloat16 in numpy
                    arr = _read_safetensors_raw(file, name)
                yield name, arr
    else:
        sd = _torch_load(file)
        for name in names:
            yield name, _torch_to_numpy(sd.pop(name))
        del sd


def load_hf_params(
    src: str | Path, config: ModelConfig | None = None, dtype=None, *, progress: bool = False
) -> dict[FlaxPath, np.ndarray]:
    """Every param of the HF checkpoint in `src` as {Flax path: host numpy array in `dtype`}.

    `config` defaults to `src/config.json`; `dtype` None keeps the checkpoint's (`config.dtype`).  Names and shapes
    are validated (ValueError) before any tensor data is read; shards are then read one tensor at a time.
    """
    from tqdm.auto import tqdm

    src = Path(src)
    config = config or ModelConfig.from_pretrained(src)
    dt = _np_dtype(dtype if dtype is not None else config.dtype)
    kind, files = weight_files(src)
    entries = plan(_list_tensors(kind, files), config, expected_params(config, dt))
    by_file: dict[Path, list[Entry]] = {}
    for e in entries:
        by_file.setdefault(e.file, []).append(e)
    out: dict[FlaxPath, np.ndarray] = {}
    with tqdm(total=len(entries), desc=f"reading {src.name}", unit="tensor", disable=not progress) as bar:
        for file in files:
            file_entries = {e.hf_name: e for e in by_file.get(file, [])}
            for name, arr in _iter_file(kind, file, list(file_entries)):
                for part in file_entries[name].parts:
                    a = arr if part.rows is None else arr[part.rows[0] : part.rows[1]]
                    a = a.astype(dt, copy=False)
                    out[part.path] = np.ascontiguousarray(a.T if part.transpose else a)
                del arr
                bar.update(1)
    return out


# ----------------------------------------------------------------------------------------------- orbax


def nest(flat: dict[FlaxPath, Any]) -> dict[str, Any]:
    """{("layers", 0, "mlp", ...): x} -> {"layers": {"0": {"mlp": ...}}} (string keys, as orbax stores them)."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = value
    return tree


def save_params(flat: dict[FlaxPath, np.ndarray], directory: str | Path) -> Path:
    """Write {Flax path: numpy array} as an orbax PyTree checkpoint at `directory` (which must not exist)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).resolve()
    ocp.PyTreeCheckpointer().save(directory, nest(flat))
    return directory


def restore_params(directory: str | Path, expected: dict[FlaxPath, Any]) -> dict[FlaxPath, np.ndarray]:
    """Read an orbax checkpoint written by `save_params` into host numpy arrays of the dtypes in `expected`.

    Names and shapes are checked against `expected` (Flax path -> ShapeDtypeStruct); a mismatch is a ValueError.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).resolve()
    ckpt = ocp.PyTreeCheckpointer()
    stored = _stored_shapes(ckpt, directory)
    if stored is not None:
        want = {tuple(map(str, p)): (p, tuple(s.shape)) for p, s in expected.items()}
        extra = sorted(set(stored) - set(want))
        missing = sorted(set(want) - set(stored))
        if extra or missing:
            raise ValueError(
                f"orbax checkpoint {directory} does not match the model: missing "
                f"{['/'.join(p) for p in missing[:8]]}, extra {['/'.join(p) for p in extra[:8]]}"
            )
        for key, (path, shape) in want.items():
            if stored[key] is not None and tuple(stored[key]) != shape:
                raise ValueError(
                    f"orbax checkpoint {directory}: {_fmt(path)} has shape {tuple(stored[key])}, "
                    f"the model expects {shape}"
                )
    args = nest({p: ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.dtype(s.dtype)) for p, s in expected.items()})
    tree = ckpt.restore(directory, restore_args=args)
    out: dict[FlaxPath, np.ndarray] = {}
    for path, s in expected.items():
        node = tree
        for key in path:
            node = node[str(key)]
        arr = np.asarray(node)
        if arr.shape != tuple(s.shape):
            raise ValueError(
                f"orbax checkpoint {directory}: {_fmt(path)} has shape {arr.shape}, the model expects {tuple(s.shape)}"
            )
        out[path] = arr
    return out


def _stored_shapes(ckpt, directory: Path) -> dict[tuple[str, ...], tuple[int, ...] | None] | None:
    """{path of str keys: shape} from the checkpoint's metadata, or None if this orbax version hides it."""
    try:
        meta = ckpt.metadata(directory)
    except Exception:
        return None
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
    if not isinstance(tree, dict):
        return None
    out: dict[tuple[str, ...], tuple[int, ...] | None] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, prefix + (str(k),))
        else:
            shape = getattr(node, "shape", None)
            out[prefix] = None if shape is None else tuple(shape)

    walk(tree, ())
    return out


# ----------------------------------------------------------------------------------------------- convert


def convert(src: str | Path, dst: str | Path, *, dtype=None, progress: bool = True, overwrite: bool = False) -> Path:
    """Convert the HF directory `src` into `dst`: `params/` (orbax), `config.json`, tokenizer files.

    `dtype` None keeps the checkpoint's dtype (config `dtype`/`torch_dtype`, else float32); "float32"/"bfloat16"/
    "float16" or a jnp dtype casts.  The written config.json records the stored dtype.  Prints a one-line summary
    and returns `dst`.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    config = ModelConfig.from_pretrained(src)
    dt = _np_dtype(dtype if dtype is not None else config.dtype)
    if src.resolve() == dst.resolve():
        raise ValueError(f"dst {str(dst)!r} is the source directory; pick another")
    if (dst / PARAMS_DIR).exists():
        if not overwrite:
            raise FileExistsError(f"{dst / PARAMS_DIR} already exists; remove it or pass overwrite=True (--overwrite)")
        shutil.rmtree(dst / PARAMS_DIR)
    flat = load_hf_params(src, config, dt, progress=progress)
    dst.mkdir(parents=True, exist_ok=True)
    save_params(flat, dst / PARAMS_DIR)
    hf_cfg = json.loads((src / "config.json").read_text())
    dtype_name = str(np.dtype(dt))
    hf_cfg["dtype"] = dtype_name
    if "torch_dtype" in hf_cfg:
        hf_cfg["torch_dtype"] = dtype_name
    (dst / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    n_params = sum(a.size for a in flat.values())
    n_bytes = sum(a.nbytes for a in flat.values())
    n_tensors = len(flat)
    del flat
    print(
        f"converted {src} -> {dst}: {n_tensors} tensors, {n_params:,} params, {n_bytes / 2**20:.1f} MiB "
        f"{dtype_name}, {time.perf_counter() - t0:.1f}s"
    )
    return dst
