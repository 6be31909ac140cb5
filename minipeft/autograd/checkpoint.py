"""Gradient checkpointing (AG-21): run a block without recording its graph, and in backward run it
again with the graph on, so activations inside the block are kept only for the block being
differentiated. The recomputed forward is the same computation, so gradients are equal."""
from __future__ import annotations

from .function import Function, enable_grad, no_grad
from .tensor import Tensor


class Checkpoint(Function):
    def forward(self, *arrays, fn=None, n_inputs=0, rngs=()):
        arrays = arrays[:n_inputs]  # the rest are fn's parameters, parents only so the graph is kept
        self.fn, self.arrays, self.rngs = fn, arrays, rngs
        self.rng_states = [r.get_state() for r in rngs]  # replay the same dropout masks in backward
        with no_grad():
            out = fn(*[Tensor(a) for a in arrays])
        return out.data

    def backward(self, g):
        inputs = [Tensor(a, requires_grad=need) for a, need in zip(self.arrays, self.needs_input_grad)]
        after = [r.get_state() for r in self.rngs]
        for r, s in zip(self.rngs, self.rng_states):
            r.set_state(s)
        with enable_grad():
            out = self.fn(*inputs)
        for r, s in zip(self.rngs, after):
            r.set_state(s)
        out.backward(g)  # parameters inside fn (leaves) accumulate their .grad here
        self.arrays = ()
        n_params = len(self.needs_input_grad) - len(inputs)
        return tuple(t.grad for t in inputs) + (None,) * n_params


def checkpoint(fn, *inputs, params=(), rngs=()):
    """fn(*inputs) -> Tensor, recomputed in backward instead of stored. `params` are the trainable
    tensors fn uses (their .grad is accumulated during the recomputation); the RNGs fn draws from
    (dropout) are rewound for the recomputation, so it sees the same masks."""
    return Checkpoint.apply(*inputs, *params, fn=fn, n_inputs=len(inputs), rngs=tuple(rngs))
