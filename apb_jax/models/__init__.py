from apb_jax.models.llama import AttnCall, LlamaForCausalLM

__all__ = ["AttnCall", "LlamaForCausalLM"]
