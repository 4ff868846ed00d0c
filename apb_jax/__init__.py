"""apb-jax: APB long-context prefill (anchor + compressed passing blocks) in JAX/Pallas over a device mesh.

    import apb_jax
    model = apb_jax.load(path)                       # HF directory or converted (orbax) directory
    engine = apb_jax.Engine(model, strategy="apb", devices=4)
    out = engine.generate(doc_ids, query_ids, max_new_tokens=16)
"""
from apb_jax.config import APBConfig, ModelConfig
from apb_jax.engine import Engine, GenerateOutput
from apb_jax.model import Model
from apb_jax.parallel import make_mesh

__version__ = "0.1.0"


def load(path, dtype=None) -> Model:
    """Load an HF checkpoint directory or a converted one (see converters.hf_to_flax); dtype None keeps the
    checkpoint's, or "float32"/"bfloat16"/a jnp dtype."""
    from apb_jax.loading import load as _load

    return _load(path, dtype=dtype)


__all__ = ["APBConfig", "Engine", "GenerateOutput", "Model", "ModelConfig", "load", "make_mesh"]
