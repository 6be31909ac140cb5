"""A small reverse-mode autograd engine over the backend's arrays (spec/autograd.md)."""
from .checkpoint import checkpoint
from .function import Function, enable_grad, is_grad_enabled, no_grad
from .ops import concat, embedding, take_rows
from .tensor import Tensor

__all__ = ["Tensor", "Function", "no_grad", "enable_grad", "is_grad_enabled", "checkpoint", "concat", "embedding", "take_rows"]
