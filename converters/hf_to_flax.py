"""Convert a Hugging Face Llama/Qwen2 checkpoint directory into apb-jax's format (orbax `params/`, config.json,
tokenizer files).

    python -m converters.hf_to_flax /path/to/Llama-3.1-8B-Instruct ./llama-8b [--dtype bfloat16] [--overwrite]

The reading, validation and writing live in the library (`apb_jax.checkpoint`), which `apb_jax.load` and the
`apb-jax convert` command use too; this module is the conversion entry point and re-exports those functions.
"""

from __future__ import annotations

import argparse
import sys

from apb_jax.checkpoint import (
    PARAMS_DIR,
    TOKENIZER_FILES,
    Entry,
    Part,
    convert,
    expected_params,
    flax_to_hf_name,
    hf_to_flax_path,
    is_ignored,
    load_hf_params,
    nest,
    plan,
    restore_params,
    save_params,
    split_fused,
    weight_files,
)

__all__ = [
    "PARAMS_DIR",
    "TOKENIZER_FILES",
    "Entry",
    "Part",
    "convert",
    "expected_params",
    "flax_to_hf_name",
    "hf_to_flax_path",
    "is_ignored",
    "load_hf_params",
    "main",
    "nest",
    "plan",
    "restore_params",
    "save_params",
    "split_fused",
    "weight_files",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m converters.hf_to_flax", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="HF checkpoint directory (config.json + safetensors / pytorch_model.bin)")
    ap.add_argument("dst", help="output directory")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing dst/params")
    args = ap.parse_args(argv)
    try:
        convert(args.src, args.dst, dtype=args.dtype, progress=True, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
