"""C3A: Chen et al. 2024, "Parameter-Efficient Fine-Tuning via Circular Convolution", arXiv:2407.19342;
spec/c3a.md. As PEFT 0.21.2's C3A.

Symbols: W0 (out, in) frozen base weight, b its bias, x (..., in); b_s the block size (PEFT's block_size), which
    divides in and out; m' = out / b_s, n' = in / b_s; K (m', n', b_s) the trained kernels (PEFT's c3a_kernel);
    x_j = x[j b_s:(j+1) b_s]; FFT / IFFT over the last axis (the array API's fft extension, backend.fft_last).
Update (C3A-1): dW = C / in, C block-circulant: block (i, j) is C_ij[p, q] = K_ij[(q - p) mod b_s] (row 0 is K_ij,
    each next row the previous one rolled right by one).
Forward (C3A-2): h = W0 x + b + y / in, y_i = Re(FFT(sum_j IFFT(x_j) * FFT(K_ij))) = C x, computed by FFT
    (O(in log b_s) per output block row, as PEFT's BlockCircularConvolution).
Gradients (C3A-3): G_i = FFT(g_i); dx_j = Re(IFFT(sum_i G_i * FFT(K_ij))) = C^T g (a circular convolution),
    dK_ij = Re(FFT(sum_batch G_i * IFFT(x_j))).
Init (C3A-4): "xavier_uniform" (PEFT's default, and its init_weights=False): K ~ U(-a, a), a = sqrt(6 / (in + out));
    "kaiming_uniform": U(-1/sqrt(in), 1/sqrt(in)); "gaussian": N(0, 1); "zeros" (PEFT True): K = 0, the base model.
Merge (C3A-5): W <- W0 + dW, dW = (the forward applied to the rows of I_in)^T / in (PEFT's get_circulant_fast);
    unmerge subtracts it.
Trainable (C3A-6): K, out in / b_s per layer; block_size_pattern sets b_s per layer; bias "none" | "all" |
    "c3a_only".
Serialization (C3A-7): peft_type "C3A", key <layer>.c3a_kernel (m', n', b_s), fields block_size, block_size_pattern,
    init_weights, bias.
PEFT parity: peft/tuners/c3a/layer.py C3ALinear.forward, get_delta_weight; utils.py BlockCircularConvolution.
Deviations: PEFT 0.21.2's BlockCircularConvolution.backward returns Re(FFT(sum_i G_i * IFFT(K_ij))) as the input
    gradient, which is not C^T g (torch's gradcheck fails on it); minipeft's dx is C^T g, so the kernels' gradients
    equal PEFT's in the topmost adapted layer and torch autograd's (through PEFT's forward) everywhere.
Targets: float Linear layers; GPT-2's Conv1D is a ConfigError (PEFT's C3A takes torch.nn.Linear only).
"""
from __future__ import annotations

import dataclasses
import math

from .. import backend
from ..autograd.function import Function
from ..autograd.tensor import Tensor
from .base import COMMON_FIELDS, AdapterConfig, Delta, check, check_peft_linear, fan_in_uniform, trainable
from .lora import _first_match
from .registry import register

INITS = ("xavier_uniform", "kaiming_uniform", "gaussian", "zeros")


@dataclasses.dataclass
class C3AConfig(AdapterConfig):
    block_size: int = 256  # PEFT's default; it must divide every target's in and out
    block_size_pattern: dict = dataclasses.field(default_factory=dict)  # module name/regex -> block_size
    init: str = "xavier_uniform"  # one of INITS (C3A-4)
    bias: str = "none"  # "none" | "all" | "c3a_only"

    peft_type = "C3A"
    PEFT_FIELDS = {"block_size": "block_size", "block_size_pattern": "block_size_pattern", "init": "init_weights",
                   "bias": "bias"}
    PEFT_VALUES = {"init": {"zeros": True}}
    PEFT_COMMON = tuple(f for f in COMMON_FIELDS if f != "exclude_modules")  # PEFT's C3AConfig has neither this
    # nor fan_in_fan_out
    INIT_MOVES_OUTPUT = "PEFT's default init_weights='xavier_uniform' draws the kernels at random (C3A-4)"

    def validate(self):
        for field, v in [("block_size", self.block_size)] + [(f"block_size_pattern[{k!r}]", v)
                                                             for k, v in self.block_size_pattern.items()]:
            check(isinstance(v, int) and not isinstance(v, bool) and v > 0, field, v, "must be a positive integer")
        check(self.init in INITS, "init", self.init, f"use one of {', '.join(INITS)} (PEFT: 'xavier_uniform' or "
              f"False, 'kaiming_uniform', 'gaussian', True)")
        check(self.bias in ("none", "all", "c3a_only"), "bias", self.bias, "use 'none', 'all' or 'c3a_only'")

    @classmethod
    def from_peft(cls, d: dict):
        if d.get("init_weights") is False:  # PEFT's False is its xavier_uniform
            d = dict(d, init_weights="xavier_uniform")
        return super().from_peft(d)

    def block_size_for(self, path: str) -> int:
        """b_s of one module: the first block_size_pattern key matching `(.*\\.)?(key)$`."""
        return _first_match(self.block_size_pattern, path, self.block_size)

    def trainable_count(self, layers: dict, mc) -> int:
        """C3A-6: out in / b_s per layer."""
        return sum(n * m // self.block_size_for(p) for p, (n, m) in layers.items())


def _blocks_last(a):  # (B, k, b) -> (b, B, k): one matrix per frequency
    return backend.xp_of(a).permute_dims(a, (2, 0, 1))


class BlockCircularConv(Function):
    """y = C x for x (B, in), K (m', n', b_s), by FFT (C3A-2); backward (C3A-3) by FFT too."""

    def forward(self, x, K):
        xp = backend.xp_of(x)
        m, n, b = K.shape
        xb = xp.reshape(x, (x.shape[0], n, b))  # (B, n', b)
        self.save_for_backward(xb, K)
        Kf = xp.permute_dims(backend.fft_last(K), (2, 1, 0))  # (b, n', m')
        Y = xp.matmul(_blocks_last(backend.fft_last(xb, inverse=True)), Kf)  # (b, B, m'): sum over j, per frequency
        y = backend.real_part(backend.fft_last(xp.permute_dims(Y, (1, 2, 0))))  # (B, m', b)
        return xp.reshape(y, (x.shape[0], m * b))

    def backward(self, g):
        xp = backend.xp_of(g)
        xb, K = self.saved
        m, n, b = K.shape
        Gk = _blocks_last(backend.fft_last(xp.reshape(g, (g.shape[0], m, b))))  # (b, B, m')
        dx = dK = None
        if self.needs_input_grad[0]:
            Kf = xp.permute_dims(backend.fft_last(K), (2, 0, 1))  # (b, m', n')
            dx = backend.fft_last(xp.permute_dims(xp.matmul(Gk, Kf), (1, 2, 0)), inverse=True)  # (B, n', b): C^T g
            dx = backend.real_part(dx)
            dx = xp.reshape(dx, (g.shape[0], n * b))
        if self.needs_input_grad[1]:
            Xi = _blocks_last(backend.fft_last(xb, inverse=True))  # (b, B, n')
            dK = xp.matmul(xp.matrix_transpose(Gk), Xi)  # (b, m', n'): summed over the batch
            dK = backend.real_part(backend.fft_last(xp.permute_dims(dK, (1, 2, 0))))  # (m', n', b)
        return dx, dK


class C3ALinear(Delta):
    def __init__(self, K, in_features: int):
        self.c3a_kernel = trainable(K)  # (m', n', b_s)
        self.n = in_features

    @classmethod
    def create(cls, base, cfg: C3AConfig, path: str, rng, init_weights: bool = True):
        check_peft_linear(base, path, "C3A", "C3A")
        n, m, b = base.in_features, base.out_features, cfg.block_size_for(path)
        check(n % b == 0 and m % b == 0, f"block_size (for {path})", b,
              f"must divide the layer's in_features {n} and out_features {m}; set block_size (or block_size_pattern "
              f"for this layer) to a common divisor, e.g. {math.gcd(n, m)}")
        xp = backend.xp_of(base.weight.data)
        shape = (m // b, n // b, b)
        if not init_weights or cfg.init == "zeros":
            K = xp.zeros(shape, dtype=backend.dtype("float32", xp))
        elif cfg.init == "xavier_uniform":
            a = math.sqrt(6.0 / (n + m))
            K = rng.uniform(shape, -a, a)
        elif cfg.init == "kaiming_uniform":
            K = fan_in_uniform(rng, shape, n)
        else:  # "gaussian"
            K = rng.normal(shape)
        return cls(K, n)

    def conv(self, x, K):  # C3A-2: C x / in for x (..., in)
        lead = x.shape[:-1]
        y = BlockCircularConv.apply(x.reshape(-1, self.n), K)
        return y.reshape(*lead, y.shape[-1]) * (1.0 / self.n)

    def adapt(self, x, y, base):
        return y + self.conv(x, self.c3a_kernel)

    def delta_weight(self):  # C3A-5: (C I)^T / in, (out, in)
        xp = backend.xp_of(self.c3a_kernel.data)
        eye = Tensor(xp.eye(self.n, dtype=self.c3a_kernel.data.dtype))
        return xp.matrix_transpose(self.conv(eye, Tensor(self.c3a_kernel.data)).data)


register("c3a", C3AConfig, C3ALinear,
         paper="Parameter-Efficient Fine-Tuning via Circular Convolution, Chen et al. 2024, arXiv:2407.19342",
         summary="C3A, dW block-circulant (block size b) from kernels c3a_kernel (out/b, in/b, b), applied by FFT "
                 "(spec/c3a.md).")
