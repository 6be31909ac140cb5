"""ModelConfig: the architecture fields minipeft reads from an HF config.json (spec/transformer.md MODEL-1).

One dataclass for every architecture; each family names its fields differently in config.json
(GPT-2 says n_embd where llama says hidden_size), so `FIELD_NAMES` maps our field to the keys
that may hold it, tried in order. transformers 5 moved rope_theta under rope_parameters; both
layouts are read. Every value is type- and range-checked before any array is allocated.
"""
from __future__ import annotations

import dataclasses
import math
import os

from ..errors import CheckpointError
from ..fileio import read_json

ARCHITECTURES = ("llama", "mistral", "qwen2", "phi", "gpt2", "bert")

# our field -> config.json keys that may hold it, first present wins
FIELD_NAMES = {
    "vocab_size": ("vocab_size",),
    "hidden_size": ("hidden_size", "n_embd"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "intermediate_size": ("intermediate_size", "n_inner"),
    "num_key_value_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "max_position_embeddings": ("max_position_embeddings", "n_positions"),
    "norm_eps": ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"),
    "hidden_act": ("hidden_act", "activation_function"),
    "tie_word_embeddings": ("tie_word_embeddings",),
    "attention_bias": ("attention_bias",),
    "mlp_bias": ("mlp_bias",),
    "sliding_window": ("sliding_window",),
    "use_sliding_window": ("use_sliding_window",),
    "partial_rotary_factor": ("partial_rotary_factor",),
    "qk_layernorm": ("qk_layernorm",),
    "type_vocab_size": ("type_vocab_size",),
    "scale_attn_weights": ("scale_attn_weights",),
    "scale_attn_by_inverse_layer_idx": ("scale_attn_by_inverse_layer_idx",),
    "pad_token_id": ("pad_token_id",),
    "bos_token_id": ("bos_token_id",),
    "eos_token_id": ("eos_token_id",),
}

REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
LIMITS = {"vocab_size": 10_000_000, "hidden_size": 1_000_000, "num_hidden_layers": 10_000,
          "num_attention_heads": 10_000, "intermediate_size": 10_000_000, "num_key_value_heads": 10_000,
          "head_dim": 100_000, "max_position_embeddings": 100_000_000, "type_vocab_size": 1_000}


@dataclasses.dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool = True
    partial_rotary_factor: float = 1.0
    qk_layernorm: bool = False
    type_vocab_size: int = 2
    scale_attn_weights: bool = True  # GPT-2: scores * 1/sqrt(D) (else * 1)
    scale_attn_by_inverse_layer_idx: bool = False  # GPT-2: scores further / (layer index + 1)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    pad_token_id: int | None = None
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None
    raw: dict = dataclasses.field(default_factory=dict, repr=False)  # config.json as read, saved back

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


_DEFAULTS = {  # what transformers assumes when config.json omits a field, per family
    "gpt2": {"hidden_act": "gelu_new", "tie_word_embeddings": True, "norm_eps": 1e-5, "max_position_embeddings": 1024},
    "bert": {"hidden_act": "gelu", "norm_eps": 1e-12, "max_position_embeddings": 512},
    "phi": {"hidden_act": "gelu_new", "norm_eps": 1e-5, "partial_rotary_factor": 0.5},
    "qwen2": {"norm_eps": 1e-6, "sliding_window": None},
    "mistral": {"norm_eps": 1e-6},
    "llama": {"norm_eps": 1e-6},
}


# hidden_act (HF ACT2FN names) -> the GELU form F.gelu computes; llama-family MLPs are SiLU-gated
GELU_APPROXIMATE = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
# config.json options that change the computation in ways minipeft does not implement: allowed values
UNSUPPORTED = {"position_embedding_type": ("absolute",), "is_decoder": (False,), "add_cross_attention": (False,)}


def _check_type(name, value, path):
    field = ModelConfig.__dataclass_fields__[name]
    kind = str(field.type)
    if kind.startswith("int") and not kind.startswith("int |"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"{path}: field {name!r} must be an integer, got {value!r}")
        if value < 0 or value > LIMITS.get(name, 2**62):
            raise CheckpointError(f"{path}: field {name!r}={value} is out of range "
                                  f"(0..{LIMITS.get(name, 2**62)}); is this file a model config?")
    elif kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value)):
        raise CheckpointError(f"{path}: field {name!r} must be a finite number, got {value!r}")
    elif kind == "bool" and not isinstance(value, bool):
        raise CheckpointError(f"{path}: field {name!r} must be true or false, got {value!r}")
    elif kind.startswith("int |"):  # optional token ids and window sizes: a non-negative integer (or a list)
        items = value if isinstance(value, list) and "list" in kind else [value]
        if not items or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**62 for v in items):
            raise CheckpointError(f"{path}: field {name!r} must be a non-negative integer"
                                  f"{' or a list of them' if 'list' in kind else ''} or null, got {value!r}")
    elif kind == "str" and not isinstance(value, str):
        raise CheckpointError(f"{path}: field {name!r} must be a string, got {value!r}")


def config_from_dict(raw: dict, path: str = "config.json") -> ModelConfig:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not supported; "
                              f"minipeft supports {', '.join(ARCHITECTURES)}")
    values = dict(_DEFAULTS.get(model_type, {}))
    for field, keys in FIELD_NAMES.items():
        for k in keys:
            if k in raw and raw[k] is not None:
                values[field] = raw[k]
                break
    missing = [f for f in REQUIRED if f not in values]
    if missing:
        raise CheckpointError(f"{path}: missing required field(s) {', '.join(missing)} for {model_type}")
    rope = raw.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{path}: field 'rope_parameters' must be an object")
    values["rope_theta"] = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
    if model_type == "phi" and "partial_rotary_factor" in rope:
        values["partial_rotary_factor"] = rope["partial_rotary_factor"]
    scaling = raw.get("rope_scaling") or ({k: v for k, v in rope.items() if k not in ("rope_theta",)} or None)
    if scaling is not None and not isinstance(scaling, dict):
        raise CheckpointError(f"{path}: field 'rope_scaling' must be an object or null, got {scaling!r}")
    values["rope_scaling"] = scaling
    for name, value in values.items():
        if value is not None and name in ModelConfig.__dataclass_fields__:
            _check_type(name, value, path)
    cfg = ModelConfig(model_type=model_type, raw=dict(raw), **values)
    for name in REQUIRED:
        if getattr(cfg, name) <= 0:
            raise CheckpointError(f"{path}: field {name!r} must be positive, got {getattr(cfg, name)}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise CheckpointError(f"{path}: hidden_size {cfg.hidden_size} is not divisible by "
                              f"num_attention_heads {cfg.num_attention_heads}")
    cfg.num_key_value_heads = cfg.num_key_value_heads or cfg.num_attention_heads
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise CheckpointError(f"{path}: num_attention_heads {cfg.num_attention_heads} is not a multiple "
                              f"of num_key_value_heads {cfg.num_key_value_heads}")
    cfg.head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    cfg.intermediate_size = cfg.intermediate_size or 4 * cfg.hidden_size
    _check_computation(cfg, raw, path)
    kind = rope_type(cfg.rope_scaling)
    if kind not in ("default", "linear", "llama3"):
        raise CheckpointError(f"{path}: field 'rope_scaling' (or rope_parameters) has rope_type {kind!r}, "
                              f"which is not supported (default, linear, llama3)")
    return cfg


def _check_computation(cfg, raw, path):
    """Refuse options that would make minipeft compute something other than transformers does."""
    acts = ("silu",) if cfg.model_type in ("llama", "mistral", "qwen2") else tuple(GELU_APPROXIMATE)
    if cfg.hidden_act not in acts:
        raise CheckpointError(f"{path}: field 'hidden_act' is {cfg.hidden_act!r}; "
                              f"{cfg.model_type} supports {', '.join(acts)}")
    for key, allowed in UNSUPPORTED.items():
        if raw.get(key, allowed[0]) not in allowed:
            raise CheckpointError(f"{path}: field {key!r}={raw[key]!r} is not supported (only {allowed[0]!r})")
    if not cfg.rope_theta > 0 or cfg.norm_eps < 0:
        raise CheckpointError(f"{path}: field 'rope_theta'={cfg.rope_theta} must be > 0 and field "
                              f"'norm_eps' (rms_norm_eps / layer_norm_eps)={cfg.norm_eps} must be >= 0")
    if cfg.pad_token_id is not None and cfg.pad_token_id >= cfg.vocab_size:
        raise CheckpointError(f"{path}: field 'pad_token_id'={cfg.pad_token_id} must be below vocab_size "
                              f"{cfg.vocab_size} (padding is embedded as a token)")
    _check_rope_scaling(cfg.rope_scaling or {}, path)
    if not 0.0 < cfg.partial_rotary_factor <= 1.0 or cfg.rotary_dim % 2:
        raise CheckpointError(f"{path}: field 'partial_rotary_factor'={cfg.partial_rotary_factor} must lie in "
                              f"(0, 1] and give an even rotary dimension (head_dim {cfg.head_dim})")


def rope_type(scaling) -> str:
    """The RoPE scaling kind of a config's rope_scaling dict (HF writes `rope_type`, older files `type`)."""
    s = scaling or {}
    return s.get("rope_type") or s.get("type") or "default"


def _check_rope_scaling(s: dict, path):
    """The numbers RoPE scaling divides by (MODEL-3): factor > 0; llama3 also low < high frequency
    factors, both > 0, and a positive original context."""
    kind = rope_type(s)
    if not isinstance(kind, str):
        raise CheckpointError(f"{path}: field 'rope_scaling.rope_type' must be a string, got {kind!r}")
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings")}.get(kind, ())
    defaults = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for key in need:
        v = s.get(key, defaults.get(key))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v > 0:
            raise CheckpointError(f"{path}: field 'rope_scaling.{key}'={v!r} must be a positive number "
                                  f"for rope_type {kind!r}")
    if kind == "llama3" and not s.get("low_freq_factor", 1.0) < s.get("high_freq_factor", 4.0):
        raise CheckpointError(f"{path}: field 'rope_scaling.low_freq_factor' must be below high_freq_factor")


def read_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    raw = read_json(path, f"{folder}: no config.json; a model folder needs config.json and model.safetensors")
    return config_from_dict(raw, path)
