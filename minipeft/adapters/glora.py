"""GLoRA: One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning (Chavan, Liu, Gupta, Xing, Shen 2023,
arXiv:2306.07967), as PEFT 0.21.2's GLORA tuner; spec/glora.md.

Symbols: W0 (out, in) = (m, n) frozen base weight, b (m,) its bias (absent: no bias part), x (..., n); ⊙ elementwise
    with broadcasting; five support tensors A, B (of W's shape), C (n, 1), D, E (of b's shape), each of a kind:
    "lora" Xd Xu (rows, r) (r, cols), "vector" X (a column (rows, 1); D, E: (m,)), "constant" X (1,), "none" a frozen
    zero tensor of the full shape (PEFT's buffer "zeros", saved too).
Update (GLORA-1): W' = W0 + W0 ⊙ A + B, b' = b + b ⊙ D + E + W0 C; A, B by config_A_B, C by config_C, D, E by
    config_D_E; a layer without a bias has C, D, E "none" whatever the config.
Forward (GLORA-2): h = W0 x + b + (W0 ⊙ A + B) x + (b ⊙ D + E + W0 C); no scaling, no dropout (PEFT has none).
Init (GLORA-3): init_weights=True: every Xd = 0, vectors and constants 0 (h = W0 x + b at step 0), each Xu (r, cols)
    ~ U(+-1/sqrt(cols)) (kaiming-uniform, a = sqrt 5: C's Xu (r, 1) ~ U(-1, 1)). init_weights=False ("random"): Xd
    (rows, r) ~ U(+-1/sqrt(r)), a column vector (rows, 1) ~ U(-1, 1), D, E (m,) ~ U(+-1/sqrt(m)), constants N(0, 0.02²).
Merge (GLORA-4): W <- W0 + W0 ⊙ A + B, b <- b + b ⊙ D + E + W0 C; unmerge puts back the W0 and b kept at merge time.
Trainable (GLORA-5): per layer A, B: 2 r (n + m) | 2 m | 2 | 0 (lora | vector | constant | none); with a bias
    C: r (n + 1) | n | 0 and D, E: 2 m | 2 | 0.
Serialization (GLORA-6): peft_type "GLORA"; keys <layer>.glora_{A..E}.Xd / .Xu / .X / .zeros; fields r, config_A_B,
    config_C, config_D_E, init_weights, bias, target_modules, modules_to_save.
PEFT parity: peft/tuners/glora/layer.py GloraLayer.update_layer, the Glora*Path classes, GloraLinear.forward, merge.
Deviations: unmerge restores the kept W0, b (PEFT divides by 1 + A, which fails where an entry of A is -1); several
    GLoRA adapters merged into one layer each read the weight as it stands when merged (PEFT: the weight before the
    first merge). torch.nn.Linear only, as PEFT (GPT-2's Conv1D and a 4-bit base are ConfigErrors).
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..autograd import functional as F
from ..autograd.function import no_grad
from ..autograd.tensor import Tensor
from ..nn.module import Module
from .base import AdapterConfig, Delta, check, check_peft_linear, fan_in_uniform, put_back, trainable
from .registry import register

KINDS = {"config_A_B": ("lora", "vector", "constant", "none"), "config_C": ("lora", "vector", "none"),
         "config_D_E": ("vector", "constant", "none")}
INITS = ("default", "random")


@dataclasses.dataclass
class GLoRAConfig(AdapterConfig):
    rank: int = 8  # PEFT's default r, the rank of every "lora" support tensor
    config_A_B: str = "lora"  # A, B (W0 ⊙ A + B): one of KINDS["config_A_B"]
    config_C: str = "lora"  # C (W0 C into the bias)
    config_D_E: str = "constant"  # D, E (b ⊙ D + E)
    init: str = "default"  # one of INITS (GLORA-3)
    bias: str = "none"  # "none" | "all" | "glora_only"

    peft_type = "GLORA"
    PEFT_FIELDS = {"rank": "r", "config_A_B": "config_A_B", "config_C": "config_C", "config_D_E": "config_D_E",
                   "init": "init_weights", "bias": "bias"}
    PEFT_VALUES = {"init": {"default": True, "random": False}}
    PEFT_COMMON = ("target_modules", "modules_to_save")  # PeftConfig's GloraConfig has no layer-selection fields

    def validate(self):
        check(self.rank > 0, "rank", self.rank, "must be a positive integer")
        for field, kinds in KINDS.items():
            check(getattr(self, field) in kinds, field, getattr(self, field), f"use one of {', '.join(kinds)}")
        check(self.init in INITS, "init", self.init, f"use one of {', '.join(INITS)} (PEFT: True, False)")
        check(self.bias in ("none", "all", "glora_only"), "bias", self.bias, "use 'none', 'all' or 'glora_only'")

    def trainable_count(self, layers: dict, mc) -> int:
        """GLORA-5, per layer; a layer has a bias part when the model gives it a bias (has_bias)."""
        r = self.rank
        total = 0
        for path, (n, m) in layers.items():
            total += {"lora": 2 * r * (n + m), "vector": 2 * m, "constant": 2, "none": 0}[self.config_A_B]
            if has_bias(path, mc):
                total += {"lora": r * (n + 1), "vector": n, "none": 0}[self.config_C]
                total += {"vector": 2 * m, "constant": 2, "none": 0}[self.config_D_E]
        return total


def has_bias(path: str, mc) -> bool:
    """Whether the Linear at `path` has a bias: Llama-family q/k/v (attention_bias, or Qwen2), o_proj
    (attention_bias), the MLP (mlp_bias), lm_head (never), as models/llama.py builds them; BERT and Phi: every one."""
    if mc.model_type not in ("llama", "mistral", "qwen2"):
        return True
    name = path.rsplit(".", 1)[-1]
    if name in ("q_proj", "k_proj", "v_proj"):
        return mc.attention_bias or mc.model_type == "qwen2"
    return {"o_proj": mc.attention_bias, "lm_head": False}.get(name, mc.mlp_bias)


class Support(Module):
    """One support tensor of GLORA-1, under PEFT's leaf names: Xd, Xu ("lora"), X ("vector", "constant") or the
    frozen zeros ("none")."""

    def __init__(self, kind: str, rows: int, cols: int, r: int, rng, init: str | None, xp, column: bool = True):
        f32 = backend.dtype("float32", xp)
        self.kind = kind
        if kind == "lora":
            self.Xd = trainable(fan_in_uniform(rng, (rows, r), r) if init == "random" else xp.zeros((rows, r), dtype=f32))
            self.Xu = trainable(fan_in_uniform(rng, (r, cols), cols) if init else xp.zeros((r, cols), dtype=f32))
        elif kind == "vector":  # torch's fan-in of a column (rows, 1) is 1, of PEFT's unsqueezed (1, m) row m
            shape = (rows, 1) if column else (rows,)
            self.X = trainable(fan_in_uniform(rng, shape, 1 if column else rows) if init == "random"
                               else xp.zeros(shape, dtype=f32))
        elif kind == "constant":
            self.X = trainable(rng.normal((1,), std=0.02) if init == "random" else xp.zeros((1,), dtype=f32))
        else:  # "none": PEFT's buffer, saved as .zeros and used as it is; in a tuple: frozen, not walked
            self.zeros = (Tensor(xp.zeros((rows, cols) if column else (rows,), dtype=f32)),)

    def value(self) -> Tensor:  # broadcasts against W0 (m, n), C's (n, 1) or b (m,)
        return {"lora": lambda: self.Xd @ self.Xu, "none": lambda: self.zeros[0]}.get(self.kind, lambda: self.X)()


class GLoRALinear(Delta):
    MIXED_BATCH = True  # y_rows + the rows' own update (METHOD-6)

    def __init__(self, parts: dict):
        for name, part in parts.items():
            setattr(self, name, part)  # glora_A .. glora_E
        self.kept = None  # (W0, b) while merged (GLORA-4)

    def saved_parameters(self):  # GLORA-6: PEFT saves a "none" part's zeros buffer beside the trained tensors
        frozen = [(f"{name}.zeros", part.zeros[0]) for name, part in self.named_children() if part.kind == "none"]
        return list(self.named_parameters()) + frozen

    @classmethod
    def create(cls, base, cfg: GLoRAConfig, path: str, rng, init_weights: bool = True):
        check_peft_linear(base, path, "GLORA", "GLoRA")
        n, m, r = base.in_features, base.out_features, cfg.rank
        xp = backend.xp_of(base.weight.data)
        init = cfg.init if init_weights else None  # a load fills them
        biased = base.bias is not None
        c_kind, de_kind = (cfg.config_C, cfg.config_D_E) if biased else ("none", "none")
        return cls({"glora_A": Support(cfg.config_A_B, m, n, r, rng, init, xp),
                    "glora_B": Support(cfg.config_A_B, m, n, r, rng, init, xp),
                    "glora_C": Support(c_kind, n, 1, r, rng, init, xp),
                    "glora_D": Support(de_kind, m, 1, r, rng, init, xp, column=False),
                    "glora_E": Support(de_kind, m, 1, r, rng, init, xp, column=False)})

    def updates(self, base):
        """GLORA-1's W' - W0 (m, n) and b' - b (m,) (None without a bias), as Tensors with gradients."""
        W0 = Tensor(base.weight_out_in())  # (m, n)
        dW = W0 * self.glora_A.value() + self.glora_B.value()
        if base.bias is None:
            return dW, None
        WC = (W0 @ self.glora_C.value()).reshape(-1)  # (m,)
        return dW, base.bias * self.glora_D.value() + self.glora_E.value() + WC

    def adapt(self, x, y, base):  # GLORA-2
        dW, db = self.updates(base)
        y = y + F.linear(x, dW)
        return y if db is None else y + db

    def merge_into(self, base):  # GLORA-4
        with no_grad():
            dW, db = self.updates(base)
        self.kept = (base.weight.data, None if db is None else base.bias.data)
        base.weight.data = base.weight.data + dW.data
        if db is not None:
            base.bias.data = base.bias.data + db.data

    def unmerge_from(self, base):
        put_back(base, self.kept)
        self.kept = None


register("glora", GLoRAConfig, GLoRALinear,
         paper="One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning, Chavan, Liu, Gupta, Xing, Shen "
               "2023, arXiv:2306.07967",
         summary="GLoRA, W' = W0 + W0 ⊙ A + B and b' = b + b ⊙ D + E + W0 C, each support tensor low-rank, a vector, "
                 "a constant or none (spec/glora.md).")
