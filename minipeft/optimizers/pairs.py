"""The LoRA factor pairs an optimiser works on: for each adapted layer and adapter, its A (r, in)
and B (out, r) with their parameter names, as PEFT pairs `<module>.lora_A.<adapter>` with
`<module>.lora_B.<adapter>` (peft/optimizers/riemannian.py, lorafa.py)."""
from __future__ import annotations

from typing import NamedTuple

from ..adapters.inject import adapted_layers
from ..autograd.tensor import Tensor


class LoRAPair(NamedTuple):
    path: str  # the adapted layer, e.g. "model.layers.0.self_attn.q_proj"
    adapter: str  # the adapter's name
    delta: object  # its Delta module (LoRALinear, DoRALinear, ...)
    a_name: str  # the parameter names, as model.net.named_parameters() gives them
    A: Tensor  # (r, in)
    b_name: str
    B: Tensor  # (out, r)


def _factor(delta, attr: str):
    """(suffix of the parameter name, Tensor) of delta.lora_A / delta.lora_B: a Linear's weight or a Tensor."""
    f = getattr(delta, attr, None)
    if isinstance(f, Tensor):
        return attr, f
    weight = getattr(f, "weight", None)
    return (f"{attr}.weight", weight) if isinstance(weight, Tensor) else (None, None)


def lora_pairs(model) -> list[LoRAPair]:
    """Every (A, B) pair of 2-d factors held by an adapted layer, in model order (trainable or not)."""
    out = []
    for path, layer in adapted_layers(model.net):
        for name in layer.adapters.keys():
            delta = layer.adapters[name]
            (a_suffix, A), (b_suffix, B) = _factor(delta, "lora_A"), _factor(delta, "lora_B")
            if A is not None and B is not None and A.ndim == 2 and B.ndim == 2:
                prefix = f"{path}.adapters.{name}."
                out.append(LoRAPair(path, name, delta, prefix + a_suffix, A, prefix + b_suffix, B))
    return out
