"""apb-jax: APB long-context prefill (anchor + compressed passing blocks) in JAX/Pallas over a device mesh.

    import apb_jax
    apb_jax.use_cpu_devices(4)                       # no GPUs: 4 fake CPU devices (before any jax computation)
    model = apb_jax.load(path)                       # HF directory or converted (orbax) directory
    engine = apb_jax.Engine(model, strategy="apb", devices=4)
    out = engine.generate(doc_ids, query_ids, max_new_tokens=16)
    ans = engine.generate_text(context, question)    # through the tokenizer's chat template

Names resolve lazily, so `import apb_jax.cli` does not start jax (the CLI may still set XLA flags).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "APBConfig": "apb_jax.config",
    "ModelConfig": "apb_jax.config",
    "Engine": "apb_jax.engine",
    "GenerateOutput": "apb_jax.engine",
    "TextOutput": "apb_jax.engine",
    "use_cpu_devices": "apb_jax.parallel",
    "Model": "apb_jax.model",
    "make_mesh": "apb_jax.parallel",
}


def load(path, dtype=None):
    """Load an HF checkpoint directory or a converted one (see `apb-jax convert`) as a `Model`; dtype None
    keeps the checkpoint's, or "float32"/"bfloat16"/a jnp dtype."""
    from apb_jax.loading import load as _load

    return _load(path, dtype=dtype)


def __getattr__(name):
    if name in ("distributed", "strategies", "tasks", "evaluation", "prompting"):
        return importlib.import_module(f"apb_jax.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'apb_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*_EXPORTS, "load", "__version__"])


__all__ = [
    "APBConfig",
    "Engine",
    "GenerateOutput",
    "Model",
    "ModelConfig",
    "TextOutput",
    "load",
    "make_mesh",
    "use_cpu_devices",
]
