"""Optimisers for adapters: each one module holding its options dataclass, its optimizer, PEFT's
create_<name>_optimizer and a TrainingHook for model.train, ending in one registry.register(kind="optimiser").

    opt = minipeft.optimizers.create_loraplus_optimizer(model, lr=2e-4, loraplus_lr_ratio=16)   # own loop
    model.train(data, TrainingConfig(optimizer=LoraPlusConfig(loraplus_lr_ratio=16)))            # or "loraplus"

Importing this package imports every module in it, so a new file here is a new optimiser."""
import importlib as _importlib
import pkgutil as _pkgutil

from ..adapters import registry as _registry
from ..errors import ConfigError as _ConfigError

for _info in _pkgutil.walk_packages(__path__, __name__ + "."):
    _importlib.import_module(_info.name)

from .flora import FloraConfig, create_flora_optimizer  # noqa: E402
from .lorafa import LoraFAConfig, create_lorafa_optimizer  # noqa: E402
from .loraplus import LoraPlusConfig, create_loraplus_optimizer  # noqa: E402
from .riemannian import RiemannianConfig, create_riemannian_optimizer  # noqa: E402


def optimisers() -> list:
    """The registered optimisers (kind "optimiser"), in registration order."""
    return [m for m in _registry.methods() if m.kind == "optimiser"]


def training_hook(model, optimizer):
    """The TrainingHook of TrainingConfig.optimizer: None (AdamW: no hook), a registered optimiser's name
    (its defaults) or an instance of its options class."""
    if optimizer is None or optimizer == "adamw":
        return None
    known = optimisers()
    names = ", ".join(m.name for m in known)
    for m in known:
        if optimizer == m.name or isinstance(optimizer, m.config):
            return m.hook(model, m.config() if optimizer == m.name else optimizer)
    if isinstance(optimizer, str):
        raise _ConfigError(f"TrainingConfig.optimizer={optimizer!r}: use adamw or one of {names}")
    raise _ConfigError(f"TrainingConfig.optimizer={optimizer!r}: give an optimiser's name ({names}) or its options "
                       f"({', '.join(m.config.__name__ + '(...)' for m in known)})")


__all__ = ["create_loraplus_optimizer", "create_lorafa_optimizer", "create_riemannian_optimizer",
           "create_flora_optimizer", "LoraPlusConfig", "LoraFAConfig", "RiemannianConfig", "FloraConfig", "optimisers",
           "training_hook"]
