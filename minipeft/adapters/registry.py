"""The registry: each adapter config class -> its layer class. Dispatch is on config types, and
PEFT's `peft_type` strings map back to config classes when an adapter folder is loaded; where
several classes share one peft_type (LORA, and DoRA as LORA + use_dora), their PEFT_FLAGS decide."""
from __future__ import annotations

from ..errors import CheckpointError
from .adalora import AdaLoRAConfig, AdaLoRALinear
from .dora import DoRAConfig, DoRALinear
from .ia3 import IA3Config, IA3Linear
from .loha import LoHaConfig, LoHaLinear
from .lokr import LoKrConfig, LoKrLinear
from .lora import LoRAConfig, LoRALinear
from .prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .prompt_tuning import PromptEmbedding, PromptTuningConfig
from .ptuning import PromptEncoder, PTuningConfig
from .ptuning_v2 import PTuningV2Config
from .qlora import QLoRAConfig
from .vera import VeRAConfig, VeRALinear

REGISTRY = {
    LoRAConfig: LoRALinear,
    LoHaConfig: LoHaLinear,
    LoKrConfig: LoKrLinear,
    DoRAConfig: DoRALinear,
    IA3Config: IA3Linear,
    VeRAConfig: VeRALinear,
    PromptTuningConfig: PromptEmbedding,  # prompt learning: InputAdapters, no layer wrapped
    PrefixTuningConfig: PrefixEncoder,  # also P-tuning v2 (PTuningV2Config is a PrefixTuningConfig)
    PTuningConfig: PromptEncoder,
    AdaLoRAConfig: AdaLoRALinear,
}


# method name (the stem of apply_<name>, adapters/<name>.py, spec/<name>.md) -> config class: the CLI's --method
METHODS = {
    "lora": LoRAConfig, "qlora": QLoRAConfig, "dora": DoRAConfig, "adalora": AdaLoRAConfig, "vera": VeRAConfig,
    "loha": LoHaConfig, "lokr": LoKrConfig, "ia3": IA3Config, "prompt_tuning": PromptTuningConfig,
    "prefix_tuning": PrefixTuningConfig, "ptuning": PTuningConfig, "ptuning_v2": PTuningV2Config,
}


def layer_class(cfg):
    for cls in type(cfg).__mro__:
        if cls in REGISTRY:
            return REGISTRY[cls]
    raise CheckpointError(f"no adapter method is registered for {type(cfg).__name__}")


def config_class(peft_type: str, where: str = "adapter_config.json", fields: dict | None = None):
    """The config class for an adapter_config.json: its peft_type, then the class whose PEFT_FLAGS
    all hold in `fields` (an absent key counts as false), the one with the most flags winning."""
    fits = [cls for cls in REGISTRY if cls.peft_type == peft_type and
            all(bool((fields or {}).get(k, False)) == v for k, v in cls.PEFT_FLAGS.items())]
    if fits:
        return max(fits, key=lambda cls: len(cls.PEFT_FLAGS))
    known = sorted({c.peft_type for c in REGISTRY})
    raise CheckpointError(f"{where}: peft_type {peft_type!r} is not supported; minipeft reads {', '.join(known)}")
