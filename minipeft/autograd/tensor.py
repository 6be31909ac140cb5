"""Tensor: an array from the chosen backend plus what reverse-mode autodiff needs (spec/autograd.md).

backward() is a topological sort of the graph recorded by ops and a reverse loop that hands each
op the gradient of its output (AG-1); leaves that require grad accumulate into `.grad` (AG-2).
Gradients of intermediate tensors are dropped as soon as they are used, and each op's saved
arrays are released after its backward, so memory falls while backward runs.
"""
from __future__ import annotations

from .. import backend


class Tensor:
    __slots__ = ("data", "grad", "requires_grad", "_ctx", "__weakref__")
    __array_priority__ = 1000  # numpy scalars defer to Tensor's reflected operators

    def __init__(self, data, requires_grad: bool = False):
        if isinstance(data, Tensor):
            data = data.data
        if not hasattr(data, "__array_namespace__"):
            data = backend.asarray(data, "float32")
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self._ctx = None

    # ---- properties --------------------------------------------------------------------
    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def ndim(self):
        return len(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def xp(self):
        return backend.xp_of(self.data)

    def numpy(self):
        """A NumPy copy of the data (from any backend)."""
        return backend.to_host(self.data)

    def item(self) -> float:
        return float(self.numpy().reshape(-1)[0])

    def detach(self) -> "Tensor":
        return Tensor(self.data)

    def __repr__(self):
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad})"

    # ---- reverse mode ------------------------------------------------------------------
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) * grad into every leaf's .grad (grad defaults to ones)."""
        xp = self.xp
        if grad is None:
            grad = xp.ones(self.data.shape, dtype=self.data.dtype)
        order, seen, stack = [], set(), [(self, False)]
        while stack:  # iterative post-order DFS: deep models must not hit Python's recursion limit
            node, done = stack.pop()
            if done:
                order.append(node)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.append((node, True))
            if node._ctx is not None:
                stack.extend((p, False) for p in node._ctx.parents if p.requires_grad)
        grads = {id(self): grad}
        for node in reversed(order):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            ctx = node._ctx
            if ctx is None:  # a leaf
                node.grad = g if node.grad is None else node.grad + g
                continue
            in_grads = ctx.backward(g)
            if not isinstance(in_grads, tuple):
                in_grads = (in_grads,)
            for p, pg in zip(ctx.parents, in_grads):
                if pg is None or not p.requires_grad:
                    continue
                prev = grads.get(id(p))
                grads[id(p)] = pg if prev is None else prev + pg
            if not retain_graph:
                ctx.saved = ()
                node._ctx = None

    # ---- operators (delegate to ops) -----------------------------------------------------
    def __add__(self, other):
        from .ops import Add
        return Add.apply(self, _lift(other, self))

    __radd__ = __add__

    def __sub__(self, other):
        from .ops import Sub
        return Sub.apply(self, _lift(other, self))

    def __rsub__(self, other):
        from .ops import Sub
        return Sub.apply(_lift(other, self), self)

    def __mul__(self, other):
        from .ops import Mul
        return Mul.apply(self, _lift(other, self))

    __rmul__ = __mul__

    def __truediv__(self, other):
        from .ops import Div
        return Div.apply(self, _lift(other, self))

    def __rtruediv__(self, other):
        from .ops import Div
        return Div.apply(_lift(other, self), self)

    def __neg__(self):
        from .ops import Neg
        return Neg.apply(self)

    def __matmul__(self, other):
        from .ops import MatMul
        return MatMul.apply(self, other)

    def __pow__(self, exponent: float):
        from .ops import Pow
        return Pow.apply(self, exponent=exponent)

    def __getitem__(self, index):
        from .ops import GetItem
        return GetItem.apply(self, index=index)

    def sum(self, axis=None, keepdims: bool = False):
        from .ops import Sum
        return Sum.apply(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims: bool = False):
        n = 1
        for a in ((axis,) if isinstance(axis, int) else (axis or range(self.ndim))):
            n *= self.shape[a]
        return self.sum(axis, keepdims) * (1.0 / n)

    def exp(self):
        from .ops import Exp
        return Exp.apply(self)

    def log(self):
        from .ops import Log
        return Log.apply(self)

    def sqrt(self):
        from .ops import Sqrt
        return Sqrt.apply(self)

    def reshape(self, *shape):
        from .ops import Reshape
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return Reshape.apply(self, shape=tuple(shape))

    def permute(self, *axes):
        from .ops import Permute
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        return Permute.apply(self, axes=tuple(axes))

    def transpose(self, a: int, b: int):
        axes = list(range(self.ndim))
        axes[a], axes[b] = axes[b], axes[a]
        return self.permute(axes)

    @property
    def T(self):
        return self.transpose(-2 % self.ndim, -1 % self.ndim)

    def astype(self, dtype_name: str):
        from .ops import Cast
        return Cast.apply(self, dtype_name=dtype_name)


def _lift(x, like: Tensor) -> Tensor:
    """Python scalars become 0-d tensors of like's dtype (no gradient)."""
    if isinstance(x, Tensor):
        return x
    xp = like.xp
    return Tensor(xp.asarray(x, dtype=like.dtype))
