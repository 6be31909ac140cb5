"""Linear4bit: a frozen linear layer whose weight is stored in 4 bits (spec/qlora.md, QLoRA arXiv 2305.14314).

Symbols: W0 (out, in) the float weight, t = nf4_quantize(W0) its 4-bit form (NF4Tensor), b (out,) the
float bias or none, cd the compute dtype, rd(v) = v rounded to cd (nearest-even; bfloat16 values are
held in float32 arrays, as CuPy has no bfloat16), x (..., in) the input.
Forward (QLORA-4): y = cast_to_dtype_of_x(rd(rd(x) dequant(t, cd)^T + rd(b))), the products summed in float32.
Frozen (QLORA-6, QLORA-7): t is the only copy of W0: no parameter, no gradient, no float copy between calls.
Quantize (QLORA-3): every Linear / Conv1D except the output head (lm_head) becomes a Linear4bit.
bitsandbytes parity: bitsandbytes/nn/modules.py Linear4bit.forward: x.to(compute_dtype), the bias
    cast to it, bnb.matmul_4bit (its CPU default gemm_4bit: dequantize_4bit(W, dtype=x.dtype), then
    torch.nn.functional.linear(x, W, bias)), then .to(input dtype).
Deviations: bitsandbytes' CPU fast path for eval-mode inference on AVX512-BF16 machines (weights
    repacked, x and absmax cast to bfloat16 whatever the compute dtype) is not mirrored; the
    gradient of x through the base layer is not rounded to cd (spec/qlora.md).
"""
from __future__ import annotations

from .. import backend
from ..autograd import functional as F
from ..autograd.function import Function
from ..autograd.tensor import Tensor
from ..errors import ConfigError
from ..nn.layers import Linear
from ..nn.module import Module
from .config import QuantizationConfig
from .nf4 import COMPUTE_DTYPES, NF4Tensor, nf4_dequantize, nf4_quantize


def round_to(a, compute_dtype: str):
    """rd(a): a's values rounded to the compute dtype, as a float32 array (exact for every cd)."""
    xp = backend.xp_of(a)
    a = xp.astype(a, xp.float32, copy=False)
    if compute_dtype == "bfloat16":
        return backend.round_to_bf16(a)
    if compute_dtype == "float16":
        return xp.astype(xp.astype(a, xp.float16), xp.float32)
    return a


class RoundTo(Function):
    """rd(x) in float32; its backward passes g through, cast to x's dtype (as torch's .to() does)."""

    def forward(self, x, compute_dtype="float32"):
        self.in_dtype = x.dtype
        return round_to(x, compute_dtype)

    def backward(self, g):
        return (backend.xp_of(g).astype(g, self.in_dtype),)


class Linear4bit(Module):
    """y = x W^T + b with W held as an NF4Tensor and dequantized in every forward (QLORA-4)."""

    fan_in_fan_out = False  # the 4-bit weight is always (out, in), as bitsandbytes' quant_state.shape

    def __init__(self, weight: NF4Tensor, bias: Tensor | None = None, compute_dtype: str = "float32",
                 float_class=Linear):
        if not isinstance(weight, NF4Tensor) or len(weight.shape) != 2:
            raise ConfigError(f"Linear4bit needs a 2-D NF4Tensor weight (out, in), got {weight!r:.80}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"unsupported compute dtype {compute_dtype!r}; use one of {', '.join(COMPUTE_DTYPES)}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight  # an NF4Tensor, not a Tensor: no parameter, no gradient (QLORA-6)
        self.bias = bias
        self.compute_dtype = compute_dtype
        self.float_class = float_class  # Linear, or GPT-2's Conv1D: what to_float() gives back

    @classmethod
    def from_linear(cls, lin: Linear, qcfg: QuantizationConfig) -> "Linear4bit":
        t = nf4_quantize(lin.weight_out_in(), qcfg.block_size, qcfg.double_quantization, qcfg.quant_type)
        return cls(t, lin.bias, qcfg.compute_dtype, type(lin))

    def forward(self, x):  # QLORA-4
        cd = self.compute_dtype
        W = nf4_dequantize(self.weight, cd)  # (out, in) dequant(t, cd), NF4-7; float16 for cd = float16
        W = Tensor(backend.xp_of(W).astype(W, backend.xp_of(W).float32, copy=False))  # frozen, dropped after the call
        b = None if self.bias is None else RoundTo.apply(self.bias, compute_dtype=cd)  # (out,)
        y = F.linear(RoundTo.apply(x, compute_dtype=cd), W, b)  # (..., out) float32
        y = RoundTo.apply(y, compute_dtype=cd)
        return y if y.dtype == x.dtype else y.astype(backend.dtype_name(x.data))  # back to x's dtype

    def weight_out_in(self):
        """dequant(t) in the dtype that was quantized (float32 or float16), (out, in)."""
        return nf4_dequantize(self.weight, self.weight.dtype)

    def to_float(self) -> Linear:
        """A float layer of the original class holding dequant(t) and the same bias (QLORA-8)."""
        lin = self.float_class(self.in_features, self.out_features, bias=False)
        W = self.weight_out_in()  # (out, in)
        lin.weight = Tensor(backend.xp_of(W).matrix_transpose(W) if lin.fan_in_fan_out else W)
        lin.bias = self.bias
        return lin


def _float_linears(net):
    from ..adapters.inject import OUTPUT_HEADS, adapted_layers  # here: inject imports Linear4bit
    if adapted_layers(net):
        raise ConfigError("quantize the model before applying adapters (load_model(..., quantization=...))")
    return [p for p, m in net.named_modules() if isinstance(m, Linear) and p.split(".")[-1] not in OUTPUT_HEADS]


def quantize_model(net, qcfg: QuantizationConfig):
    """QLORA-3: replace every Linear (and Conv1D) but the output head by a Linear4bit, in place."""
    if not isinstance(qcfg, QuantizationConfig):
        raise ConfigError(f"quantization= takes a minipeft.QuantizationConfig, got {type(qcfg).__name__}")
    for path in _float_linears(net):
        net.set_submodule(path, Linear4bit.from_linear(net.get_submodule(path), qcfg))
    return net


def dequantize_model(net):
    """Replace every Linear4bit (also inside adapter layers) by its float layer, in place (QLORA-8)."""
    for path, m in list(net.named_modules()):
        if isinstance(m, Linear4bit):
            net.set_submodule(path, m.to_float())
    return net


def is_quantized(net) -> bool:
    return any(isinstance(m, Linear4bit) for _, m in net.named_modules())
