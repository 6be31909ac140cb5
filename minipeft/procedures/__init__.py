"""Training procedures: hooks into model.train that change how LoRA trains, each one module holding its
options dataclass and its TrainingHook, ending in one registry.register(kind="procedure").

    hook = minipeft.procedures.ReLoRAHook(model, ReLoRAConfig(reset_every=200))
    model.train(data, TrainingConfig(hooks=[hook], schedule="cosine"))
    model.merge_and_unload().save("out")   # W took part of the training: save the merged model

Importing this package imports every module in it, so a new file here is a new procedure."""
import importlib as _importlib
import pkgutil as _pkgutil

from ..adapters import registry as _registry

for _info in _pkgutil.walk_packages(__path__, __name__ + "."):
    _importlib.import_module(_info.name)

from .chainlora import ChainLoRAConfig, ChainLoRAHook  # noqa: E402
from .deltalora import DeltaLoRAConfig, DeltaLoRAHook  # noqa: E402
from .dylora import DyLoRAConfig, DyLoRAHook, truncate_rank  # noqa: E402
from .relora import ReLoRAConfig, ReLoRAHook  # noqa: E402
from .lora_drop import LoRADropConfig, LoRADropHook  # noqa: E402


def procedures() -> list:
    """The registered procedures (kind "procedure"), in registration order."""
    return [m for m in _registry.methods() if m.kind == "procedure"]


__all__ = ["ReLoRAConfig", "ReLoRAHook", "DeltaLoRAConfig", "DeltaLoRAHook", "ChainLoRAConfig", "ChainLoRAHook",
           "DyLoRAConfig", "DyLoRAHook", "truncate_rank", "procedures",
           "LoRADropConfig", "LoRADropHook",
           ]
