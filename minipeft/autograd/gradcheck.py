"""Check an op's backward against central finite differences in float64 (spec/autograd.md).

For a function fn(*inputs) -> Tensor and a fixed random cotangent c of the output's shape, the
scalar L(inputs) = sum(fn(*inputs) * c) has the gradient that `backward(c)` computes (a
vector-Jacobian product). gradcheck compares it, for every input that requires grad, with

    dL/dx[j] ~ (L(x + eps e_j) - L(x - eps e_j)) / (2 eps)

element by element: |analytic - numeric| <= atol + rtol |numeric|. Central differences are exact up to
O(eps^2 L''') plus rounding O(1e-16 |L| / eps), about 1e-10 with eps = 1e-6, hence float64 inputs.

    x = Tensor(np.random.default_rng(0).standard_normal((3, 4)), requires_grad=True)
    gradcheck(lambda t: (t * t).sum(axis=1), [x])   # -> [max error of x], about 1e-10

The inputs themselves are not touched: fn gets fresh leaf tensors on the same data. Anything in
`inputs` that is not a Tensor with requires_grad (integer targets, masks) is passed through as is.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from .function import no_grad
from .tensor import Tensor


def gradcheck(fn, inputs, eps: float = 1e-6, rtol: float = 1e-5, atol: float = 1e-6, seed: int = 0):
    """Max |analytic - numeric| per differentiable input, in order; AssertionError on a mismatch."""
    checked = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input requires grad")
    for i in checked:
        if backend.dtype_name(inputs[i].data) != "float64":
            raise ValueError(f"gradcheck: input {i} is {backend.dtype_name(inputs[i].data)}; use float64")

    def fresh(replace=None):  # new leaves, so fn builds its own graph and the caller's .grad stays clean
        args = []
        for i, t in enumerate(inputs):
            if replace is not None and i in replace:
                args.append(Tensor(replace[i]))
            elif isinstance(t, Tensor):
                args.append(Tensor(t.data, requires_grad=t.requires_grad))
            else:
                args.append(t)
        return args

    args = fresh()
    out = fn(*args)
    c_host = np.random.default_rng(seed).standard_normal(out.shape)  # the cotangent
    c = backend.xp_of(out.data).asarray(c_host, dtype=out.data.dtype)
    out.backward(c)
    analytic = {i: np.zeros(args[i].shape) if args[i].grad is None else backend.to_host(args[i].grad)
                for i in checked}

    def loss(i, host):  # L with input i replaced by the host array `host`
        ns = backend.xp_of(inputs[i].data)
        with no_grad():
            y = fn(*fresh({i: ns.asarray(host)}))
        return float(np.sum(np.asarray(backend.to_host(y.data), dtype=np.float64) * c_host))

    errors = []
    for i in checked:
        x = np.array(backend.to_host(inputs[i].data), dtype=np.float64)  # a copy we perturb
        flat, numeric = x.reshape(-1), np.zeros(x.size)
        for j in range(x.size):
            v = flat[j]
            flat[j] = v + eps
            up = loss(i, x)
            flat[j] = v - eps
            down = loss(i, x)
            flat[j] = v
            numeric[j] = (up - down) / (2 * eps)
        numeric = numeric.reshape(x.shape)
        got = np.asarray(analytic[i], dtype=np.float64)
        if got.shape != x.shape:
            raise AssertionError(f"gradcheck: input {i}: gradient shape {got.shape} != input shape {x.shape}")
        err = np.abs(got - numeric)
        excess = np.where(np.isnan(err), np.inf, err - (atol + rtol * np.abs(numeric)))  # > 0: off
        if np.any(excess > 0):
            j = np.unravel_index(int(np.argmax(excess)), x.shape)  # the worst element, relative to its tolerance
            raise AssertionError(
                f"gradcheck: input {i} (shape {x.shape}): {int(np.sum(excess > 0))} of {x.size} elements off; "
                f"worst at {tuple(int(k) for k in j)}: |analytic - numeric| = {float(err[j]):.3e}, "
                f"analytic {float(got[j]):.10g}, numeric {float(numeric[j]):.10g} (atol {atol:g}, rtol {rtol:g})")
        errors.append(float(np.max(err)) if err.size else 0.0)
    return errors
