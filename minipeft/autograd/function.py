"""The Function base class: one differentiable op = forward + backward, side by side (spec/autograd.md).

`Op.apply(*tensors, **params)` runs `forward` on the arrays, and when any input needs a gradient
(and grad mode is on) records the op as the output's `_ctx` so that `Tensor.backward` can call
`backward(grad)`. `backward` returns one gradient per tensor input, None where the input needs none
(needs_input_grad tells which), so frozen weights cost no gradient work (AG-2).
"""
from __future__ import annotations

import contextlib

_grad_enabled = [True]  # grad mode: a one-element stack top, switched only by no_grad()


def is_grad_enabled() -> bool:
    return _grad_enabled[0]


@contextlib.contextmanager
def no_grad():
    """Within this block no op records a graph (inference, merges, optimizer updates)."""
    prev = _grad_enabled[0]
    _grad_enabled[0] = False
    try:
        yield
    finally:
        _grad_enabled[0] = prev


@contextlib.contextmanager
def enable_grad():
    prev = _grad_enabled[0]
    _grad_enabled[0] = True
    try:
        yield
    finally:
        _grad_enabled[0] = prev


class Function:
    def __init__(self, *parents):
        self.parents = parents
        self.needs_input_grad = tuple(p.requires_grad for p in parents)
        self.saved = ()

    def save_for_backward(self, *arrays):
        self.saved = arrays

    def forward(self, *arrays, **params):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **params):
        from .tensor import Tensor

        parents = tuple(t if isinstance(t, Tensor) else Tensor(t) for t in inputs)
        ctx = cls(*parents)
        data = ctx.forward(*[p.data for p in parents], **params)
        needs = is_grad_enabled() and any(ctx.needs_input_grad)
        out = Tensor(data, requires_grad=needs)
        if needs:
            out._ctx = ctx
        return out
