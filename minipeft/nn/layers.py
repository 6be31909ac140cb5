"""The layers of the transformer stack. Attribute names are the HF parameter names."""
from __future__ import annotations

from .. import backend
from ..autograd import functional as F
from ..autograd.ops import embedding
from ..autograd.tensor import Tensor
from .module import Module


def _param(shape, dtype="float32", fill=0.0) -> Tensor:
    xp = backend.xp()  # zeros: on the host, pages no one writes cost no memory (a checkpoint replaces them)
    make = xp.zeros(shape, dtype=backend.dtype(dtype, xp)) if fill == 0.0 else xp.full(shape, fill, dtype=backend.dtype(dtype, xp))
    return Tensor(make, requires_grad=True)


class Linear(Module):
    """y = x W^T + b, W (out, in)."""

    fan_in_fan_out = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: str = "float32"):
        self.in_features, self.out_features = in_features, out_features
        shape = (in_features, out_features) if self.fan_in_fan_out else (out_features, in_features)
        self.weight = _param(shape, dtype)
        self.bias = _param((out_features,), dtype) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias, fan_in_fan_out=self.fan_in_fan_out)

    def weight_out_in(self):
        """W as (out, in), whatever the storage layout (an array, not a Tensor)."""
        w = self.weight.data
        return backend.xp_of(w).matrix_transpose(w) if self.fan_in_fan_out else w


class Conv1D(Linear):
    """GPT-2's "Conv1D": a Linear whose weight is stored transposed, (in, out): y = x W + b.
    This is the one place the transposed layout exists (PEFT calls it fan_in_fan_out)."""

    fan_in_fan_out = True


class Embedding(Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: str = "float32"):
        self.in_features, self.out_features = num_embeddings, embedding_dim  # as PEFT's _get_in_out_features
        self.weight = _param((num_embeddings, embedding_dim), dtype)

    def forward(self, ids):
        return embedding(self.weight, ids)


class RMSNorm(Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype: str = "float32"):
        self.eps = eps
        self.in_features = self.out_features = dim  # as PEFT's _get_in_out_features reads a norm (LN tuning)
        self.weight = _param((dim,), dtype, 1.0)

    def forward(self, x):
        return F.rms_norm(x, self.weight, self.eps)


class LayerNorm(Module):
    def __init__(self, dim: int, eps: float = 1e-5, dtype: str = "float32"):
        self.eps = eps
        self.in_features = self.out_features = dim  # as PEFT's _get_in_out_features reads a norm (LN tuning)
        self.weight = _param((dim,), dtype, 1.0)
        self.bias = _param((dim,), dtype, 0.0)

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)
