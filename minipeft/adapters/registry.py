"""The registry: each adapter config class -> its layer class. Dispatch is on config types, and
PEFT's `peft_type` strings map back to config classes when an adapter folder is loaded."""
from __future__ import annotations

from ..errors import CheckpointError
from .lora import LoRAConfig, LoRALinear

REGISTRY = {
    LoRAConfig: LoRALinear,
}


def layer_class(cfg):
    for cls in type(cfg).__mro__:
        if cls in REGISTRY:
            return REGISTRY[cls]
    raise CheckpointError(f"no adapter method is registered for {type(cfg).__name__}")


def config_class(peft_type: str, where: str = "adapter_config.json"):
    for cls in REGISTRY:
        if cls.peft_type == peft_type:
            return cls
    known = sorted({c.peft_type for c in REGISTRY})
    raise CheckpointError(f"{where}: peft_type {peft_type!r} is not supported; minipeft reads {', '.join(known)}")
