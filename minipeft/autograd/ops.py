"""Primitive differentiable ops, one class each, forward next to backward (spec/autograd.md AG-3..AG-8).

Every backward returns the vector-Jacobian product for each input; broadcasting inputs get their
gradient summed back to their own shape by `unbroadcast` (AG-3).
"""
from __future__ import annotations

from .. import backend
from .function import Function


def unbroadcast(grad, shape):
    """Sum grad over the axes that broadcasting added or stretched, so it has `shape` (AG-3)."""
    xp = backend.xp_of(grad)
    lead = grad.ndim - len(shape)
    if lead > 0:
        grad = xp.sum(grad, axis=tuple(range(lead)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = xp.sum(grad, axis=stretched, keepdims=True)
    return grad


class Add(Function):
    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return a + b

    def backward(self, g):
        na, nb = self.needs_input_grad
        return (unbroadcast(g, self.shapes[0]) if na else None), (unbroadcast(g, self.shapes[1]) if nb else None)


class Sub(Function):
    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return a - b

    def backward(self, g):
        na, nb = self.needs_input_grad
        return (unbroadcast(g, self.shapes[0]) if na else None), (unbroadcast(-g, self.shapes[1]) if nb else None)


class Mul(Function):
    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a * b

    def backward(self, g):
        a, b = self.saved
        ga = unbroadcast(g * b, a.shape) if self.needs_input_grad[0] else None
        gb = unbroadcast(g * a, b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a / b

    def backward(self, g):
        a, b = self.saved
        ga = unbroadcast(g / b, a.shape) if self.needs_input_grad[0] else None
        gb = unbroadcast(-g * a / (b * b), b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, g):
        return (-g,)


class Sqrt(Function):
    """sqrt(a); dA = g / (2 sqrt(a)) where sqrt(a) > 0 and 0 where a = 0 (the subgradient torch takes for
    a norm at 0), so a norm can reach 0 without a host check."""

    def forward(self, a):
        xp = backend.xp_of(a)
        y = xp.sqrt(a)
        self.save_for_backward(y)
        return y

    def backward(self, g):
        (y,) = self.saved
        xp = backend.xp_of(y)
        return (xp.where(y > 0, g / (2 * xp.where(y > 0, y, xp.ones_like(y))), xp.zeros_like(y)),)


class Pow(Function):
    """a ** p for a constant exponent p."""

    def forward(self, a, exponent):
        self.save_for_backward(a)
        self.p = exponent
        return a ** exponent

    def backward(self, g):
        (a,) = self.saved
        return (g * self.p * a ** (self.p - 1),)


class Exp(Function):
    def forward(self, a):
        out = backend.xp_of(a).exp(a)
        self.save_for_backward(out)
        return out

    def backward(self, g):
        return (g * self.saved[0],)


class Log(Function):
    def forward(self, a):
        self.save_for_backward(a)
        return backend.xp_of(a).log(a)

    def backward(self, g):
        return (g / self.saved[0],)


class MatMul(Function):
    """a @ b with batch broadcasting; d a = g @ b^T, d b = a^T @ g (AG-4)."""

    def forward(self, a, b):
        self.save_for_backward(a, b)
        return backend.xp_of(a).matmul(a, b)

    def backward(self, g):
        a, b = self.saved
        xp = backend.xp_of(g)
        ga = unbroadcast(xp.matmul(g, xp.matrix_transpose(b)), a.shape) if self.needs_input_grad[0] else None
        gb = unbroadcast(xp.matmul(xp.matrix_transpose(a), g), b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Sum(Function):
    def forward(self, a, axis=None, keepdims=False):
        self.shape, self.axis, self.keepdims = a.shape, axis, keepdims
        return backend.xp_of(a).sum(a, axis=axis, keepdims=keepdims)

    def backward(self, g):
        xp = backend.xp_of(g)
        n = len(self.shape)
        if not self.keepdims:  # put back the summed axes as size 1, then broadcast
            axes = range(n) if self.axis is None else ((self.axis,) if isinstance(self.axis, int) else self.axis)
            axes = {a % n for a in axes}
            g = xp.reshape(g, tuple(1 if i in axes else s for i, s in enumerate(self.shape)))
        return (xp.broadcast_to(g, self.shape),)


class Reshape(Function):
    def forward(self, a, shape):
        self.shape = a.shape
        return backend.xp_of(a).reshape(a, shape)

    def backward(self, g):
        return (backend.xp_of(g).reshape(g, self.shape),)


class Permute(Function):
    def forward(self, a, axes):
        self.axes = axes
        return backend.xp_of(a).permute_dims(a, axes)

    def backward(self, g):
        inverse = [0] * len(self.axes)
        for i, a in enumerate(self.axes):
            inverse[a] = i
        return (backend.xp_of(g).permute_dims(g, tuple(inverse)),)


class GetItem(Function):
    """Basic indexing (slices, ints); the gradient is scattered into zeros of the input's shape."""

    def forward(self, a, index):
        index = index if isinstance(index, tuple) else (index,)
        if not any(i is Ellipsis for i in index):  # the array API wants every axis named: x[0] is x[0, ...]
            index = index + (Ellipsis,)
        self.shape, self.index, self.dtype = a.shape, index, a.dtype
        return a[index]

    def backward(self, g):
        xp = backend.xp_of(g)
        out = xp.zeros(self.shape, dtype=self.dtype)
        out[self.index] = g
        return (out,)


class Concat(Function):
    def forward(self, *arrays, axis=0):
        self.axis = axis
        self.sizes = [a.shape[axis] for a in arrays]
        return backend.xp_of(arrays[0]).concat(arrays, axis=axis)

    def backward(self, g):
        out, start = [], 0
        ax = self.axis % g.ndim
        for n, need in zip(self.sizes, self.needs_input_grad):
            idx = (slice(None),) * ax + (slice(start, start + n), Ellipsis)
            out.append(g[idx] if need else None)
            start += n
        return tuple(out)


class TakeRows(Function):
    """Rows `index` of a along axis 0 (AG-22); index holds distinct row numbers (a subset or a permutation).
    Its gradient puts g's rows back where they came from: g extended by one zero row, gathered by each
    input row's position in index (the zero row for rows index does not hold), with no scatter."""

    def forward(self, a, index):
        xp = backend.xp_of(a)
        pos = [len(index)] * a.shape[0]  # where each input row is in the output: the zero row if absent
        for j, i in enumerate(index):
            pos[i] = j
        self.pos = backend.asarray(pos, "int64")
        return xp.take(a, backend.asarray(list(index), "int64"), axis=0)

    def backward(self, g):
        xp = backend.xp_of(g)
        padded = xp.concat([g, xp.zeros((1,) + tuple(g.shape[1:]), dtype=g.dtype)], axis=0)
        return (xp.take(padded, self.pos, axis=0),)


class Cast(Function):
    """Change dtype; the gradient is cast back to the input's dtype."""

    def forward(self, a, dtype_name):
        xp = backend.xp_of(a)
        self.dtype = a.dtype
        return xp.astype(a, backend.dtype(dtype_name, xp))

    def backward(self, g):
        return (backend.xp_of(g).astype(g, self.dtype),)


class Embedding(Function):
    """out[..., :] = W[ids[...], :]; dW = scatter-add of the output gradient rows (AG-7)."""

    def forward(self, W, ids):
        xp = backend.xp_of(W)
        self.ids = xp.reshape(ids, (-1,))
        self.W_shape, self.dtype = W.shape, W.dtype
        out = xp.take(W, self.ids, axis=0)  # (N, D)
        return xp.reshape(out, tuple(ids.shape) + (W.shape[1],))

    def backward(self, g):
        xp = backend.xp_of(g)
        dW = xp.zeros(self.W_shape, dtype=self.dtype)
        dW = backend.scatter_add(dW, self.ids, xp.reshape(g, (-1, self.W_shape[1])))
        return dW, None


def concat(tensors, axis=0):
    return Concat.apply(*tensors, axis=axis)


def take_rows(a, index):
    """a[index] along axis 0 for a list of distinct row numbers (AG-22)."""
    return TakeRows.apply(a, index=list(index))


def embedding(W, ids):
    """Rows of W picked by integer ids (ids is a Tensor or array of ints, never differentiated)."""
    return Embedding.apply(W, ids)
