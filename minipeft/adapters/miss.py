"""MiSS (ex-Bone): Kang et al. 2024, "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing"
(first "Bone: Block-Affine Adaptation of Large Language Models"), arXiv:2409.15371; spec/miss.md. As PEFT 0.21.2's MISS.

Symbols: W0 (out, in) frozen base weight, b its bias, x (..., in); r the shard size; n_b = ceil(in / r);
    D the trainable block (PEFT's miss_block): (r, out) for init "default" / "random", (r, mini_r) for "mini",
    (out/r, r, r) for "bat". For "mini", D+ = [D D ... D] (r, out), out / mini_r copies side by side; else D+ = D.
Update (MISS-1), default / random / mini: h = W0 x + b + (sum_j x_j) D+, x_j = x[j r:(j+1) r] the j-th shard of
    dropout(x), the last zero-padded where r does not divide in. So dW = [D+^T D+^T ... D+^T][:, :in] (out, in):
    every shard of in columns gets the same D+^T, the last one its first in mod r columns.
Update (MISS-2), bat: W0 in (r, r) blocks W_ij (i over out/r, j over in/r); dW_ij = W_ij D_i + D_i, so
    W = W0 + dW has blocks W_ij (I + D_i) + D_i; h = (W0 + dW) x + b (no dropout, as PEFT). r must divide in and out.
Init (MISS-3): "default" (PEFT init_weights=True), "bat", "mini": D = 0, the base model at step 0. "random"
    (init_weights=False): D (r, out) ~ U(-1/sqrt(out), 1/sqrt(out)), torch's kaiming_uniform(a=sqrt 5) on (r, out).
Merge (MISS-4): W <- W0 + dW; unmerge: default / mini subtract dW (as PEFT); bat puts back the W0 kept at merge
    time (PEFT computes (W - D_i)(I + D_i)^-1 blockwise: the same W0 in exact arithmetic; it fails where I + D_i is
    singular, the kept W0 does not).
Trainable (MISS-5): D: r out per layer (default, random, bat: (out/r) r r = r out), r mini_r (mini).
Serialization (MISS-6): peft_type "MISS", key <layer>.miss_block (shape as above), PEFT's fields r, mini_r,
    miss_dropout, init_weights (true / false / "bat" / "mini"), bias.
PEFT parity: peft/tuners/miss/layer.py MissLinear.forward, get_delta_weight (bat), get_delta_weight_miss, merge.
Targets: float Linear layers; GPT-2's Conv1D is a ConfigError (PEFT's MISS takes torch.nn.Linear only).
Deviations: a 4-bit base is refused (PEFT takes quantized Linear layers). Two "bat" adapters active on one layer
    each adds W0's blockwise product (PEFT's second one multiplies the weight with the first one's dW added).
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..autograd import concat
from ..autograd import functional as F
from ..autograd.tensor import Tensor
from .base import COMMON_FIELDS, AdapterConfig, Delta, check, check_peft_linear, fan_in_uniform, orient, trainable
from .registry import register

INITS = ("default", "bat", "mini", "random")
BIASES = ("none", "all", "miss_only", "MiSS_only")


@dataclasses.dataclass
class MiSSConfig(AdapterConfig):
    rank: int = 64  # PEFT's default r: the shard size along in_features
    mini_r: int = 1  # init="mini": D is (r, mini_r), repeated out / mini_r times along out_features
    dropout: float = 0.0
    init: str = "default"  # one of INITS (MISS-3)
    bias: str = "none"  # one of BIASES

    peft_type = "MISS"
    PEFT_FIELDS = {"rank": "r", "mini_r": "mini_r", "dropout": "miss_dropout", "init": "init_weights", "bias": "bias"}
    PEFT_VALUES = {"init": {"default": True, "random": False}}
    PEFT_COMMON = COMMON_FIELDS  # PEFT's MissConfig has no fan_in_fan_out

    def validate(self):
        check(isinstance(self.rank, int) and self.rank > 0, "rank", self.rank, "must be a positive integer")
        check(isinstance(self.mini_r, int) and self.mini_r > 0, "mini_r", self.mini_r, "must be a positive integer")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        check(self.init in INITS, "init", self.init, f"use one of {', '.join(INITS)} (PEFT: True, 'bat', 'mini', "
              f"False)")
        check(self.bias in BIASES, "bias", self.bias, f"use one of {', '.join(BIASES)}")

    def trainable_count(self, layers: dict, mc) -> int:
        """MISS-5: r out per layer; r mini_r with init='mini'."""
        return sum(self.rank * (self.mini_r if self.init == "mini" else m) for _, m in layers.values())


def check_widths(cfg: MiSSConfig, n: int, m: int, path: str) -> None:
    """PEFT's shape rules, as ConfigErrors naming the layer."""
    r = cfg.rank
    check(r <= n, f"rank (for {path})", r, f"must be at most the layer's in_features {n}")
    if cfg.init == "bat":
        check(n % r == 0 and m % r == 0, f"rank (for {path})", r,
              f"init='bat' cuts W0 into (r, r) blocks, so r must divide in_features {n} and out_features {m}; "
              f"use such an r, or init='default' (any r: the last shard is zero-padded)")
    if cfg.init == "mini":
        check(m % cfg.mini_r == 0, f"mini_r (for {path})", cfg.mini_r,
              f"init='mini' repeats D (r, mini_r) along out_features, so mini_r must divide out_features {m}")


class MiSSLinear(Delta):
    def __init__(self, D, mode: str, in_features: int, out_features: int, dropout: float, rng):
        self.miss_block = trainable(D)
        self.mode, self.n, self.m = mode, in_features, out_features
        self.p, self.rng = dropout, rng
        self.w0 = None  # bat: W0 as stored, kept while merged (MISS-4)

    @classmethod
    def create(cls, base, cfg: MiSSConfig, path: str, rng, init_weights: bool = True):
        check_peft_linear(base, path, "MISS", "MiSS")
        n, m, r = base.in_features, base.out_features, cfg.rank
        check_widths(cfg, n, m, path)
        xp = backend.xp_of(base.weight.data)
        shape = {"bat": (m // r, r, r), "mini": (r, cfg.mini_r)}.get(cfg.init, (r, m))
        if init_weights and cfg.init == "random":
            D = fan_in_uniform(rng, shape, m)  # kaiming_uniform(a=sqrt 5) on (r, out): fan_in = out
        else:  # MISS-3: zeros (a load fills it)
            D = xp.zeros(shape, dtype=backend.dtype("float32", xp))
        return cls(D, cfg.init, n, m, cfg.dropout, rng)

    def full_block(self, D: Tensor) -> Tensor:  # D+ (r, out): "mini" repeats D (r, mini_r) along out
        return concat([D] * (self.m // D.shape[1]), axis=1) if self.mode == "mini" else D

    def bat_update(self, W0: Tensor, D: Tensor) -> Tensor:  # MISS-2: dW_ij = W_ij D_i + D_i, (out, in)
        r = D.shape[-1]
        Wb = W0.reshape(self.m // r, r, self.n // r, r).permute(2, 0, 1, 3)  # (in/r, out/r, r, r): [j, i] = W_ij
        return (Wb @ D + D).permute(1, 2, 0, 3).reshape(self.m, self.n)

    def shard_update(self, D: Tensor) -> Tensor:  # MISS-1: dW = [D+^T ... D+^T][:, :in], (out, in)
        Dt = self.full_block(D).T  # (out, r)
        return concat([Dt] * -(-self.n // Dt.shape[1]), axis=1)[:, :self.n]

    def adapt(self, x, y, base):
        D = self.miss_block
        if self.mode == "bat":
            return y + F.linear(x, self.bat_update(Tensor(base.weight_out_in()), D))
        h = F.dropout(x, self.p, self.rng, self.training)
        r = D.shape[0]
        pad = -self.n % r
        if pad:  # the last shard zero-padded to r, as PEFT pads x
            h = concat([h, Tensor(h.xp.zeros(h.shape[:-1] + (pad,), dtype=h.data.dtype))], axis=-1)
        shards = h.reshape(*h.shape[:-1], (self.n + pad) // r, r).sum(axis=-2)  # (..., r): sum_j x_j
        return y + shards @ self.full_block(D)

    def delta_weight_of(self, base):
        D = Tensor(self.miss_block.data)
        return (self.bat_update(Tensor(base.weight_out_in()), D) if self.mode == "bat" else self.shard_update(D)).data

    def merge_into(self, base):  # MISS-4
        if self.mode == "bat":
            self.w0 = base.weight.data
        base.weight.data = base.weight.data + orient(self.delta_weight_of(base), base)

    def unmerge_from(self, base):
        if self.mode != "bat":
            base.weight.data = base.weight.data - orient(self.delta_weight_of(base), base)
        elif self.w0 is not None:
            base.weight.data, self.w0 = self.w0, None


register("miss", MiSSConfig, MiSSLinear,
         paper="MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing (ex-Bone), Kang et al. 2024, "
               "arXiv:2409.15371",
         summary="MiSS, h = W0 x + (sum of x's r-shards) D with one shared block D (r, out); 'bat' W_ij (I + D_i) + D_i, "
                 "'mini' D (r, mini_r) repeated (spec/miss.md).")
