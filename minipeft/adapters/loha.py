"""LoHa: Low-rank Hadamard product (FedPara, Hyeon-Woo et al. 2021, arXiv:2108.06098; LyCORIS).

Symbols: W0 (out, in) frozen base weight, W1a (out, r), W1b (r, in), W2a (out, r), W2b (r, in),
    s scaling, x (..., in); * is the elementwise (Hadamard) product.
Delta weight (LOHA-1): dW = s (W1a W1b) * (W2a W2b), (out, in); its rank can reach r^2 with 2 r (out + in) numbers.
Scaling (LOHA-2): s = alpha / r, with r and alpha per module from rank_pattern / alpha_pattern (LoRA's rule).
Forward (LOHA-3): h = W0 x + b + dW x; dW is materialised (a Hadamard product of two rank-r
    matrices has no cheaper exact form), as PEFT does.
Dropouts (LOHA-4): in training, module_dropout skips the term, rank_dropout masks its output features
    and divides by the mask's mean (adapters/lycoris.py).
Merge (LOHA-5): W <- W0 + dW (dW^T for the gpt2 Conv1D layout); unmerge subtracts it.
Init (LOHA-6): init_weights=True: W1a, W1b, W2a kaiming-uniform, W2b = 0, so dW = 0 at step 0;
    False: all four kaiming-uniform.
Gradients (LOHA-7): with G = dL/d(dW) (out, in) and P1 = W1a W1b, P2 = W2a W2b:
    dW1a = s (G * P2) W1b^T, dW1b = s W1a^T (G * P2), dW2a = s (G * P1) W2b^T, dW2b = s W2a^T (G * P1).
    PEFT writes this as a custom autograd function (HadaWeight); here the forward is composed of
    MatMul and Mul, whose backward rules give the same four lines.
Trainable (LOHA-8): the four leaves, 2 r (out + in) numbers per layer; W0 and b get no gradient.
PEFT parity: peft/tuners/loha/layer.py (LoHaLayer.update_layer, reset_adapter_parameters, get_delta_weight,
    Linear._get_delta_activations); keys hada_w1_a (out, r), hada_w1_b (r, in), hada_w2_a (out, r), hada_w2_b (r, in).
Deviations: PEFT refuses the gpt2 Conv1D layer (it takes nn.Linear, nn.Conv1d, nn.Conv2d only); minipeft
    adapts it (LOHA-5). No Conv layers, so no use_effective_conv2d or hada_t1 / hada_t2. See lycoris.py.
"""
from __future__ import annotations

import dataclasses

from ..autograd import functional as F
from ..autograd.function import no_grad
from .lycoris import LycorisConfig, LycorisDelta
from .registry import register


@dataclasses.dataclass
class LoHaConfig(LycorisConfig):
    peft_type = "LOHA"
    ZEROED = {True: ("hada_w2_b",), False: ()}  # init_weights -> leaves set to zero (LOHA-6)

    def leaf_count(self, r: int, n: int, m: int) -> int:
        """LOHA-8: W1a, W2a (out, r) and W1b, W2b (r, in): 2 r (in + out)."""
        return 2 * r * (n + m)


class LoHaLinear(LycorisDelta):
    def __init__(self, in_features, out_features, r, s, cfg, rng):
        super().__init__(s, cfg, rng)
        for i in ("1", "2"):
            self.leaf(f"hada_w{i}_a", (out_features, r))  # (out, r)
            self.leaf(f"hada_w{i}_b", (r, in_features))  # (r, in)

    def weight(self):  # LOHA-1: s (W1a W1b) * (W2a W2b), a Tensor (out, in)
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.s

    def term(self, x):  # LOHA-3: dW x, (..., out)
        return F.linear(x, self.weight())

    def delta_weight(self):
        with no_grad():
            return self.weight().data


register("loha", LoHaConfig, LoHaLinear, paper="FedPara (LoHa), Hyeon-Woo et al. 2021, arXiv:2108.06098; LyCORIS",
         summary="LoHa, dW = s (W1a W1b) * (W2a W2b) (spec/loha.md).")
