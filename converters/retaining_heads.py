"""Convert released retaining heads (Locret / APB: `model.layers.{i}.self_attn.fc{1,2}.weight` in a `.bin` / `.pt` /
`.safetensors` file, possibly a whole-model or sharded checkpoint) into the `retaining_heads.safetensors` file that
`apb_jax` finds beside a model directory.

    python -m converters.retaining_heads heads.bin ./llama-8b        # writes ./llama-8b/retaining_heads.safetensors

Reading and validation live in the library (`apb_jax.retaining_heads`), which the engine uses to load heads given
by path; this module is the conversion entry point and re-exports those functions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apb_jax.retaining_heads import (
    HEADS_FILE,
    heads_from_state_dict,
    load_retaining_heads,
    random_retaining_heads,
    read_state_dict,
    save_retaining_heads,
)

__all__ = [
    "HEADS_FILE",
    "heads_from_state_dict",
    "load_retaining_heads",
    "main",
    "random_retaining_heads",
    "read_state_dict",
    "save_retaining_heads",
]


def main(argv=None) -> int:
    from apb_jax.config import ModelConfig

    ap = argparse.ArgumentParser(prog="python -m converters.retaining_heads", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "src",
        help="released retaining-heads file (.bin / .pt / .safetensors), or a directory holding one or a sharded "
        "checkpoint with its *.index.json",
    )
    ap.add_argument("model", help="the model directory the heads belong to (its config.json is checked)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        config = ModelConfig.from_pretrained(args.model)
        heads = load_retaining_heads(args.src, config, dtype="float32")
        out = Path(args.model) / HEADS_FILE
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
        save_retaining_heads(heads, out)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {len(heads.fc1)} layers, hidden {heads.fc1[0].shape[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
