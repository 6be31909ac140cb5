"""The apply_<name> shorthands of Model, one per registered method (spec/methods.md METHOD-3): written
here once from each method's registry record, never by hand."""
from __future__ import annotations

from .adapters import registry
from .errors import ConfigError
from .quant.linear4bit import is_quantized


def installer(model_cls):
    """The registry listener that adds (and, for an unregistered method, removes) model_cls.apply_<name>."""
    def shorthand(method, registered: bool) -> None:
        """apply_<name>(cfg=None, name="default", data=None, **fields) while a method is registered (METHOD-3;
        data= for a data-driven initialiser, METHOD-11)."""
        attr = f"apply_{method.name}"
        if not registered:
            delattr(model_cls, attr)
            return
        if hasattr(model_cls, attr) and not getattr(getattr(model_cls, attr), "is_shorthand", False):
            raise ConfigError(f"method name {method.name!r} would replace {model_cls.__name__}.{attr}; pick another name")

        def apply(self, cfg=None, name: str = "default", data=None, **fields):
            if cfg is not None and fields:
                raise ConfigError(f"apply_{method.name}: pass a config or its fields, not both ({sorted(fields)})")
            cfg = method.config(**fields) if cfg is None else cfg
            if method.quantized_base and not is_quantized(self.net):
                parent = registry.method_of_class(method.config.__mro__[1]).name
                raise ConfigError(f"apply_{method.name} needs a 4-bit model: load it with minipeft.load_model(path, "
                                  f"quantization=minipeft.QuantizationConfig(...)), or use apply_{parent} on a float model")
            return self.apply_adapter(cfg, name, data=data)
        apply.__name__ = apply.__qualname__ = attr
        apply.is_shorthand = True
        apply.__doc__ = (f"{method.summary}\n\nSame as apply_adapter({method.config.__name__}(**fields), name, "
                         f"data=data); {method.config.__name__} also takes PEFT's field names. Paper: {method.paper}.")
        setattr(model_cls, attr, apply)
    return shorthand
