"""Model and APB configuration as frozen dataclasses.

`ModelConfig` is read from a Hugging Face `config.json` (Llama-2/3.x, Qwen2/2.5; old `rope_theta`/`rope_scaling`
fields and transformers-5 `rope_parameters` both understood).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings (HF `rope_parameters`)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r} is not supported; allowed: {SUPPORTED_ROPE_TYPES}")
        if self.theta <= 0:
            raise ValueError(f"rope theta={self.theta} must be > 0")
        if self.factor <= 0:
            raise ValueError(f"rope factor={self.factor} must be > 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder shape and flags.

    Shapes: hidden [T, hidden_size], q [T, num_heads, head_dim], k/v [T, num_kv_heads, head_dim].
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 8192
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "bfloat16"  # the checkpoint's dtype

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not supported; allowed: {SUPPORTED_MODEL_TYPES}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (GQA groups)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; allowed: {SUPPORTED_ACTIVATIONS}")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json model_type={model_type!r} is not supported; allowed: {SUPPORTED_MODEL_TYPES}"
            )
        heads = int(d["num_attention_heads"])
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        rope = _rope_from_hf(d)
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            dtype = "float32"
        if model_type == "qwen2" and d.get("use_sliding_window"):
            raise ValueError("qwen2 with use_sliding_window=True is not supported (sliding-window attention)")
        return cls(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=rope,
            max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
            qkv_bias=True if model_type == "qwen2" else bool(d.get("attention_bias", False)),
            o_bias=False if model_type == "qwen2" else bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            hidden_act=d.get("hidden_act", "silu"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
            dtype=dtype,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"model directory {str(root)!r} does not exist")
        f = root / "config.json"
        if not f.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{f} is not valid JSON ({e}); restore the model's config.json") from None
        if not isinstance(d, dict):
            raise ValueError(f"{f} holds a JSON {type(d).__name__}, not an object; restore the model's config.json")
        try:
            return cls.from_hf_dict(d)
        except KeyError as e:
            raise ValueError(f"{f} lacks the field {e.args[0]!r} a Llama/Qwen2 config has") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF-style config.json this config came from (enough for transformers to rebuild the model)."""
        rope_params: dict[str, Any] = {"rope_type": self.rope.rope_type, "rope_theta": self.rope.theta}
        if self.rope.rope_type != "default":
            rope_params["factor"] = self.rope.factor
        if self.rope.rope_type == "llama3":
            rope_params.update(
                low_freq_factor=self.rope.low_freq_factor,
                high_freq_factor=self.rope.high_freq_factor,
                original_max_position_embeddings=self.rope.original_max_position_embeddings,
            )
        d = {
            "model_type": self.model_type,
            "architectures": ["LlamaForCausalLM" if self.model_type == "llama" else "Qwen2ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "rope_scaling": None if self.rope.rope_type == "default" else rope_params,
            "rope_parameters": rope_params,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.dtype,
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = self.mlp_bias
        return d

    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h


def _rope_from_hf(d: dict[str, Any]) -> RopeConfig:
    params = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or {}
    if scaling:
        params = params if params else {**scaling, **{k: v for k, v in params.items() if k == "rope_theta"}}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=(
            int(params["original_max_position_embeddings"])
            if params.get("original_max_position_embeddings")
            else int(d.get("max_position_embeddings", 8192))
        ),
    )


# APB's ways of choosing the P local keys a host passes: trained retaining heads, the training-free query-aware
# score, or uniformly at random (the ablation that shows what the scoring is worth)
COMPRESSORS = ("query_aware", "retaining_heads", "random")
# each compressor's short name in result labels (the prefill benchmark's apb-qa, apb eval's apb[qa] H=4)
COMPRESSOR_TAGS = {"query_aware": "qa", "retaining_heads": "rh", "random": "rnd"}
PASS_ALL = "block"  # passing_len that passes every local key, whatever the block length


@dataclasses.dataclass(frozen=True)
class APBConfig:
    """How a prefill is spread over hosts.

    strategy: a name of `apb_jax.strategies` (None: the registry's default, full attention on one device).
    anchor_len / passing_len None pick the strategy's defaults at prefill time (APB: A = L/32, P = L/64, clipped
    to what the block length allows; Star: A = B); passing_len="block" passes every local key (with anchor_len=0,
    APB is then exact attention, for any document length).  `q_insert` is how many leading document tokens stay
    before the query inside the anchor (APB reference default 16).  Settings a strategy has no use for are rejected
    by it.
    """

    strategy: str | None = None
    devices: int = 1
    anchor_len: int | None = None
    passing_len: int | None = None
    compressor: str = "query_aware"
    q_insert: int = 16
    pool_kernel: int = 5

    def __post_init__(self):
        from apb_jax import strategies

        if self.strategy is None:
            object.__setattr__(self, "strategy", strategies.DEFAULT)
        strategy = strategies.get(self.strategy)
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"compressor={self.compressor!r} is unknown; allowed: {COMPRESSORS}")
        if self.devices < 1:
            raise ValueError(f"devices={self.devices} must be >= 1")
        if self.anchor_len is not None and self.anchor_len < 0:
            raise ValueError(f"anchor_len={self.anchor_len} must be >= 0")
        if (
            self.passing_len is not None
            and self.passing_len != PASS_ALL
            and (not isinstance(self.passing_len, int) or self.passing_len < 0)
        ):
            raise ValueError(
                f"passing_len={self.passing_len!r} must be an int >= 0, None (the default) or "
                f"{PASS_ALL!r} (every local key: with anchor_len=0, exact attention)"
            )
        if self.q_insert < 0:
            raise ValueError(f"q_insert={self.q_insert} must be >= 0")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel={self.pool_kernel} must be a positive odd number")
        strategy.check_config(self)
