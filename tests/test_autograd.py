"""spec/autograd.md: every op's backward against central finite differences (float64, random shapes
and values drawn by hypothesis), each forward against its spec formula rebuilt in numpy, the engine
rules (AG-1, AG-2, AG-21), the array_api_strict guard, and the fused ops against torch (oracle)."""
import math
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

from helpers import assert_close
from minipeft import backend
from minipeft.autograd import Tensor, checkpoint, concat, embedding, no_grad, take_rows
from minipeft.autograd import functional as F
from minipeft.autograd.gradcheck import gradcheck

fast = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**32 - 1)
dims = st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple)


def leaf(rng, shape, grad=True, low=None):
    """A float64 leaf: standard normal, or uniform in [low, low + 1] (for Log, Pow, Div)."""
    x = rng.standard_normal(shape) if low is None else rng.uniform(low, low + 1.0, shape)
    return Tensor(x, requires_grad=grad)


def backward_with(out, rng):
    """Run out.backward(g) with a random cotangent g and return g."""
    g = rng.standard_normal(out.shape)
    out.backward(g)
    return g


# ---- engine ----------------------------------------------------------------------------------
@pytest.mark.spec("AG-1")
@fast
@given(seed=seeds, shape=dims)
def test_backward_sums_cotangents_of_every_use(seed, shape):
    rng = np.random.default_rng(seed)
    x, w = leaf(rng, shape, low=-0.5), leaf(rng, shape, low=-0.5)
    fn = lambda x, w: ((x * w + x) * x - w / (x * x + 1.0)).exp() * 0.1 + x  # x used 6 times
    gradcheck(fn, [x, w])
    out = fn(x, w)
    g = backward_with(out, rng)
    X, W = x.data, w.data
    u = X * X + 1.0
    e = np.exp((X * W + X) * X - W / u) * 0.1
    dx = g * (e * (2 * X * W + 2 * X + W * 2 * X / u**2) + 1.0)  # d/dx of every use, summed
    assert_close(x.grad, dx, rtol=1e-12, label="dx")
    assert_close(w.grad, g * e * (X * X - 1.0 / u), rtol=1e-12, label="dw")


@pytest.mark.spec("AG-1")
def test_backward_deeper_than_recursion_limit_and_releases_graph():
    x = Tensor(np.ones(3), requires_grad=True)
    y = x
    for _ in range(sys.getrecursionlimit() + 500):
        y = y + 1.0
    y.sum().backward()
    assert_close(x.grad, np.ones(3), label="dx")
    assert y._ctx is None  # released after its backward (no retain_graph)


@pytest.mark.spec("AG-1", "AG-2")
def test_retain_graph_and_leaf_accumulation():
    rng = np.random.default_rng(0)
    x = leaf(rng, (3, 2))
    y = (x * x).sum(axis=0)
    mul = y._ctx.parents[0]._ctx
    y.backward(np.ones(2), retain_graph=True)
    assert y._ctx is not None and mul.saved != ()  # kept for a second pass
    y.backward(np.ones(2))
    assert y._ctx is None and mul.saved == ()  # released
    assert_close(x.grad, 2 * (2 * x.data), rtol=1e-15, label="two passes accumulate")
    z = (x * 3.0).sum()  # a new graph: the leaf keeps accumulating
    z.backward()
    assert_close(x.grad, 4 * x.data + 3.0, rtol=1e-15, label="accumulate across graphs")


@pytest.mark.spec("AG-2", "AG-9")
def test_frozen_tensors_get_no_grad_and_no_work():
    rng = np.random.default_rng(1)
    x, W, b = leaf(rng, (2, 3, 4)), leaf(rng, (5, 4), grad=False), leaf(rng, (5,), grad=False)
    y = F.linear(x, W, b)
    assert y._ctx.needs_input_grad == (True, False, False)
    assert y._ctx.saved[0] is None  # no activation kept for a frozen weight
    (y * leaf(rng, (5,), grad=False)).sum().backward()
    assert W.grad is None and b.grad is None and x.grad is not None
    assert F.linear(x, leaf(rng, (5, 4)))._ctx.saved[0] is not None  # a trainable W keeps x
    frozen = F.linear(leaf(rng, (2, 4), grad=False), W)  # all inputs frozen: no graph
    assert not frozen.requires_grad and frozen._ctx is None
    with no_grad():
        z = x * x
    assert not z.requires_grad and z._ctx is None


MULTI_INPUT = {  # every op with two or more differentiable inputs: name -> (fn, input shapes)
    "add": (lambda a, b: a + b, [(2, 3), (3,)]), "sub": (lambda a, b: a - b, [(2, 3), (1, 3)]),
    "mul": (lambda a, b: a * b, [(2, 3), (3,)]), "div": (lambda a, b: a / (b * b + 1.0), [(3,), (2, 3)]),
    "matmul": (lambda a, b: a @ b, [(2, 3), (3, 2)]), "concat": (lambda a, b: concat([a, b], 1), [(2, 3), (2, 1)]),
    "linear": (lambda x, W, b: F.linear(x, W, b), [(2, 3), (4, 3), (4,)]),
    "silu_mul": (F.silu_mul, [(2, 3), (2, 3)]), "rms_norm": (F.rms_norm, [(2, 3), (3,)]),
    "layer_norm": (F.layer_norm, [(2, 3), (3,), (3,)]), "sdpa": (F.sdpa, [(1, 2, 3, 2), (1, 1, 3, 2), (1, 1, 3, 2)]),
}


@pytest.mark.spec("AG-2")
@pytest.mark.parametrize("name", sorted(MULTI_INPUT))
def test_every_backward_skips_frozen_inputs(name):
    fn, shapes = MULTI_INPUT[name]
    rng = np.random.default_rng(0)
    for frozen in range(len(shapes)):
        ts = [leaf(rng, s, grad=i != frozen) for i, s in enumerate(shapes)]
        out = fn(*ts)
        grads = out._ctx.backward(rng.standard_normal(out.shape))  # the op's own VJPs: no work for frozen
        assert [g is None for g in grads] == [not p.requires_grad for p in out._ctx.parents]
        out.backward(rng.standard_normal(out.shape))
        assert ts[frozen].grad is None and all(t.grad is not None for i, t in enumerate(ts) if i != frozen)


# ---- primitives -------------------------------------------------------------------------------
@pytest.mark.spec("AG-3", "AG-5")
@fast
@given(seed=seeds, shapes=mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=3),
       op=st.sampled_from(["add", "sub", "mul", "div"]))
def test_broadcasting_binary_ops(seed, shapes, op):
    rng = np.random.default_rng(seed)
    a, b = leaf(rng, shapes.input_shapes[0]), leaf(rng, shapes.input_shapes[1], low=0.5)
    fn = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b,
          "mul": lambda a, b: a * b, "div": lambda a, b: a / b}[op]
    gradcheck(fn, [a, b])
    out = fn(a, b)
    assert out.shape == shapes.result_shape
    g = backward_with(out, rng)
    A, B = np.broadcast_to(a.data, out.shape), np.broadcast_to(b.data, out.shape)
    ga, gb = {"add": (g, g), "sub": (g, -g), "mul": (g * B, g * A), "div": (g / B, -g * A / B**2)}[op]

    def unbroadcast(full, shape):  # AG-3 rebuilt: sum added axes, then stretched ones
        full = full.sum(axis=tuple(range(full.ndim - len(shape))))
        return full.sum(axis=tuple(i for i, n in enumerate(shape) if n == 1), keepdims=True)

    assert_close(a.grad, unbroadcast(ga, a.shape), rtol=1e-12, label="da")
    assert_close(b.grad, unbroadcast(gb, b.shape), rtol=1e-12, label="db")


@pytest.mark.spec("AG-4", "AG-3")
@fast
@given(seed=seeds, batch=mutually_broadcastable_shapes(num_shapes=2, max_dims=2, max_side=3),
       mkn=st.tuples(*[st.integers(1, 4)] * 3))
def test_matmul(seed, batch, mkn):
    rng = np.random.default_rng(seed)
    m, k, n = mkn
    a, b = leaf(rng, batch.input_shapes[0] + (m, k)), leaf(rng, batch.input_shapes[1] + (k, n))
    gradcheck(lambda a, b: a @ b, [a, b])
    g = backward_with(a @ b, rng)
    A, B = np.broadcast_to(a.data, batch.result_shape + (m, k)), np.broadcast_to(b.data, batch.result_shape + (k, n))
    da, db = g @ np.swapaxes(B, -1, -2), np.swapaxes(A, -1, -2) @ g
    lead = len(batch.result_shape)
    for t, full in ((a, da), (b, db)):
        full = full.sum(axis=tuple(range(lead - (t.ndim - 2))))
        full = full.sum(axis=tuple(i for i, s in enumerate(t.shape[:-2]) if s == 1), keepdims=True)
        assert_close(t.grad, full, rtol=1e-12, label="matmul grad")


@pytest.mark.spec("AG-5")
@fast
@given(seed=seeds, shape=dims, p=st.sampled_from([2.0, 3.0, 0.5, -1.5]))
def test_unary_elementwise(seed, shape, p):
    rng = np.random.default_rng(seed)
    x = leaf(rng, shape, low=0.5)  # positive: Log, fractional Pow
    for fn, d in ((lambda t: -t, lambda X: -np.ones_like(X)), (lambda t: t ** p, lambda X: p * X ** (p - 1)),
                  (lambda t: t.exp(), np.exp), (lambda t: t.log(), lambda X: 1 / X),
                  (lambda t: t.sqrt(), lambda X: 0.5 / np.sqrt(X)), (lambda t: 2.0 / t - t * 3.0, lambda X: -2 / X**2 - 3),
                  (lambda t: 1.0 - t, lambda X: -np.ones_like(X))):
        gradcheck(fn, [x])
        x.grad = None
        g = backward_with(fn(x), rng)
        assert_close(x.grad, g * d(x.data), rtol=1e-12, label="unary grad")
    z = leaf(rng, shape)
    z.data = np.where(rng.random(shape) < 0.5, 0.0, np.abs(z.data) + 0.5)  # exact zeros among positives
    g = backward_with(z.sqrt(), rng)
    assert_close(z.grad, np.where(z.data > 0, g * 0.5 / np.sqrt(np.where(z.data > 0, z.data, 1.0)), 0.0),
                 rtol=1e-12, label="sqrt grad, 0 at 0")


@pytest.mark.spec("AG-6")
@fast
@given(seed=seeds, shape=dims, data=st.data())
def test_sum_mean_reshape_permute(seed, shape, data):
    rng = np.random.default_rng(seed)
    x = leaf(rng, shape)
    n = len(shape)
    axes = data.draw(st.sets(st.integers(0, n - 1)).map(lambda s: tuple(sorted(s)) or None))
    if axes is not None:  # some as negative axes
        axes = tuple(a - n if data.draw(st.booleans()) else a for a in axes)
    keep = data.draw(st.booleans())
    perm = tuple(data.draw(st.permutations(range(n))))
    gradcheck(lambda t: t.sum(axis=axes, keepdims=keep), [x])
    gradcheck(lambda t: t.mean(axis=axes, keepdims=keep) * 2.0, [x])
    gradcheck(lambda t: t.reshape(-1).reshape(shape[::-1]), [x])
    gradcheck(lambda t: t.permute(perm), [x])
    gradcheck(lambda t: t.transpose(0, -1).T, [x])
    g = backward_with(x.permute(perm), rng)
    assert_close(x.grad, np.transpose(g, np.argsort(perm)), rtol=0, label="permute grad")
    x.grad = None
    g = backward_with(x.sum(axis=axes, keepdims=keep), rng)
    ref = np.broadcast_to(g if keep else np.expand_dims(g, axes if axes is not None else tuple(range(n))), shape)
    assert_close(x.grad, ref, rtol=0, label="sum grad")


@pytest.mark.spec("AG-6")
@fast
@given(seed=seeds, shape=dims, data=st.data())
def test_getitem_and_concat(seed, shape, data):
    rng = np.random.default_rng(seed)
    x = leaf(rng, shape)
    index = []
    for n in shape:
        kind = data.draw(st.sampled_from(["int", "slice", "all"]))
        start = data.draw(st.integers(0, n - 1))
        start -= n * data.draw(st.booleans())  # negative positions too
        index.append(start if kind == "int" else slice(start, None, data.draw(st.integers(1, 2))) if kind == "slice"
                     else slice(None))
    index = tuple(index)
    gradcheck(lambda t: t[index] * 1.0, [x])
    g = backward_with(x[index], rng)
    ref = np.zeros(shape)
    ref[index] = g
    assert_close(x.grad, ref, rtol=0, label="getitem grad")
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    parts = []
    for i, s in enumerate(sizes):
        shp = list(shape)
        shp[axis] = s
        parts.append(leaf(rng, tuple(shp), grad=i != 1))  # the second part frozen
    gradcheck(lambda *ts: concat(ts, axis=axis), parts)
    for p in parts:
        p.grad = None
    g = backward_with(concat(parts, axis=axis), rng)
    assert len(parts) == 1 or parts[1].grad is None
    start = 0
    for p, s in zip(parts, sizes):
        if p.requires_grad:
            assert_close(p.grad, np.take(g, np.arange(start, start + s), axis=axis), rtol=0, label="concat grad")
        start += s


@pytest.mark.spec("AG-7", "BACKEND-3")
@fast
@given(seed=seeds, V=st.integers(1, 5), D=st.integers(1, 4), ids_shape=dims)
def test_embedding_scatter_adds_repeated_ids(seed, V, D, ids_shape):
    rng = np.random.default_rng(seed)
    W = leaf(rng, (V, D))
    ids = rng.integers(0, V, ids_shape)  # small V: repeats are the rule
    gradcheck(lambda W: embedding(W, ids), [W])
    out = embedding(W, ids)
    assert_close(out, W.data[ids], rtol=0, label="embedding forward")
    g = backward_with(out, rng)
    ref = np.zeros((V, D))
    for t, v in enumerate(ids.reshape(-1)):
        ref[v] += g.reshape(-1, D)[t]
    assert_close(W.grad, ref, rtol=1e-14, label="dW")


@pytest.mark.spec("AG-8")
def test_cast_gradient_has_input_dtype():
    rng = np.random.default_rng(2)
    x32 = Tensor(rng.standard_normal((3, 4)).astype(np.float32), requires_grad=True)
    y = x32.astype("float64") * 2.0
    assert y.dtype == np.float64
    g = backward_with(y, rng)
    assert x32.grad.dtype == np.float32
    assert np.array_equal(x32.grad, (2.0 * g).astype(np.float32))
    x64 = leaf(rng, (5,))
    x64.astype("float32").backward(np.arange(5, dtype=np.float32))
    assert x64.grad.dtype == np.float64 and np.array_equal(x64.grad, np.arange(5.0))


@pytest.mark.spec("AG-8", "BACKEND-6")
@fast
@given(seed=seeds, shape=dims, p=st.sampled_from([0.1, 0.5, 0.9]))
def test_dropout(seed, shape, p):
    rng = np.random.default_rng(seed)
    x = leaf(rng, shape)
    gradcheck(lambda t: F.dropout(t, p, backend.RNG(seed), training=True), [x])
    mask = (np.random.default_rng(seed).random(shape) >= p) / (1 - p)  # the spec's M, rebuilt
    out = F.dropout(x, p, backend.RNG(seed), training=True)
    assert_close(out, x.data * mask, rtol=0, label="dropout forward")
    g = backward_with(out, rng)
    assert_close(x.grad, g * mask, rtol=0, label="dropout grad")
    assert F.dropout(x, p, backend.RNG(seed), training=False) is x
    assert F.dropout(x, 0.0, backend.RNG(seed), training=True) is x


# ---- fused ops: gradcheck + forward formula rebuilt in numpy ---------------------------------
def np_softmax(X):
    e = np.exp(X - X.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_sigmoid(X):
    return 1 / (1 + np.exp(-X))


@pytest.mark.spec("AG-9", "AG-3")
@fast
@given(seed=seeds, lead=st.lists(st.integers(1, 3), max_size=2).map(tuple), n_in=st.integers(1, 4),
       n_out=st.integers(1, 4), bias=st.booleans(), fifo=st.booleans())
def test_linear(seed, lead, n_in, n_out, bias, fifo):
    rng = np.random.default_rng(seed)
    x, W = leaf(rng, lead + (n_in,)), leaf(rng, (n_in, n_out) if fifo else (n_out, n_in))
    b = leaf(rng, (n_out,)) if bias else None
    inputs = [x, W] + ([b] if bias else [])
    gradcheck(lambda x, W, b=None: F.linear(x, W, b, fan_in_fan_out=fifo), inputs)
    Wt = W.data if fifo else W.data.T  # (in, out)
    out = F.linear(x, W, b, fan_in_fan_out=fifo)
    assert_close(out, x.data @ Wt + (b.data if bias else 0.0), rtol=1e-13, label="linear forward")


@pytest.mark.spec("AG-10", "AG-11")
@fast
@given(seed=seeds, shape=dims, shift=st.sampled_from([0.0, 300.0]))
def test_softmax_and_log_softmax(seed, shape, shift):
    rng = np.random.default_rng(seed)
    x = Tensor(rng.standard_normal(shape) * 3 + shift, requires_grad=True)  # +300: no overflow (max shift)
    gradcheck(F.softmax, [x], rtol=1e-4)
    gradcheck(F.log_softmax, [x], rtol=1e-4)
    X = x.data - shift
    assert_close(F.softmax(x), np.exp(X) / np.exp(X).sum(-1, keepdims=True), rtol=1e-12, label="softmax")
    lse = np.log(np.exp(X).sum(-1, keepdims=True)) + shift
    assert_close(F.log_softmax(x), x.data - lse, rtol=1e-12, atol=1e-12, label="log_softmax")
    g = backward_with(F.log_softmax(x), rng)  # d lse = softmax
    assert_close(x.grad, g - np_softmax(x.data) * g.sum(-1, keepdims=True), rtol=1e-12, label="dlogsoftmax")


@pytest.mark.spec("AG-12")
@fast
@given(seed=seeds, N=st.integers(1, 5), V=st.integers(1, 5), p_ignore=st.sampled_from([0.0, 0.4, 1.0]),
       ignore_index=st.sampled_from([-100, -1]))
def test_cross_entropy_ignore_index(seed, N, V, p_ignore, ignore_index):
    rng = np.random.default_rng(seed)
    x = leaf(rng, (N, V))
    t = np.where(rng.random(N) < p_ignore, ignore_index, rng.integers(0, V, N))
    gradcheck(lambda x: F.cross_entropy(x, t, ignore_index=ignore_index), [x])
    loss = F.cross_entropy(x, t, ignore_index=ignore_index)
    valid = t != ignore_index
    X = x.data
    lse = np.log(np.exp(X).sum(-1))
    per_row = [lse[i] - X[i, t[i]] for i in range(N) if valid[i]]
    assert_close(loss, np.mean(per_row) if per_row else 0.0, rtol=1e-13, atol=1e-15, label="ce forward")
    loss.backward(np.float64(2.0))
    ref = np_softmax(X) - np.eye(V)[np.where(valid, t, 0)]
    ref = 2.0 * ref * valid[:, None] / max(valid.sum(), 1)
    assert_close(x.grad, ref, rtol=1e-13, label="ce grad")  # all rows ignored: loss 0, grad 0


ELEMENTWISE = {  # name: (ours, numpy forward from the spec)
    "silu": (F.silu, lambda X: X * np_sigmoid(X)),
    "gelu": (F.gelu, lambda X: 0.5 * X * (1 + np.vectorize(math.erf)(X / np.sqrt(2)))),
    "gelu_tanh": (lambda t: F.gelu(t, approximate="tanh"),
                  lambda X: 0.5 * X * (1 + np.tanh(np.sqrt(2 / np.pi) * (X + 0.044715 * X**3)))),
}


@pytest.mark.spec("AG-13", "AG-15", "AG-16", "BACKEND-4")
@fast
@given(seed=seeds, shape=dims, name=st.sampled_from(sorted(ELEMENTWISE)))
def test_activations(seed, shape, name):
    ours, ref = ELEMENTWISE[name]
    x = Tensor(np.random.default_rng(seed).standard_normal(shape) * 3, requires_grad=True)
    gradcheck(ours, [x])
    assert_close(ours(x), ref(x.data), rtol=1e-13, atol=1e-15, label=name)


@pytest.mark.spec("AG-14")
@fast
@given(seed=seeds, shape=dims, frozen_b=st.booleans())
def test_silu_mul(seed, shape, frozen_b):
    rng = np.random.default_rng(seed)
    a, b = leaf(rng, shape), leaf(rng, shape, grad=not frozen_b)
    gradcheck(F.silu_mul, [a, b])
    out = F.silu_mul(a, b)
    assert_close(out, a.data * np_sigmoid(a.data) * b.data, rtol=1e-13, label="silu_mul")
    backward_with(out, rng)
    assert (b.grad is None) == frozen_b


@pytest.mark.spec("AG-17", "AG-18")
@fast
@given(seed=seeds, lead=st.lists(st.integers(1, 3), max_size=2).map(tuple), D=st.integers(1, 6),
       eps=st.sampled_from([1e-6, 1e-5, 0.1]))
def test_rms_norm_and_layer_norm(seed, lead, D, eps):
    rng = np.random.default_rng(seed)
    x, w, b = leaf(rng, lead + (D,)), leaf(rng, (D,)), leaf(rng, (D,))
    gradcheck(lambda x, w: F.rms_norm(x, w, eps), [x, w], rtol=1e-4)
    gradcheck(lambda x, w, b: F.layer_norm(x, w, b, eps), [x, w, b], rtol=1e-4)
    X = x.data
    assert_close(F.rms_norm(x, w, eps), w.data * X / np.sqrt((X**2).mean(-1, keepdims=True) + eps),
                 rtol=1e-13, label="rms_norm")
    mu, var = X.mean(-1, keepdims=True), X.var(-1, keepdims=True)
    assert_close(F.layer_norm(x, w, b, eps), w.data * (X - mu) / np.sqrt(var + eps) + b.data,
                 rtol=1e-12, label="layer_norm")


def rope_tables(rng, T, R, batch=None):
    """HF-style cos/sin (T, R) or (B, 1, T, R): angles pos * theta^(-2i/R), the halves repeated."""
    pos = rng.integers(0, 50, (T,) if batch is None else (batch, 1, T)).astype(np.float64)
    inv_freq = 10000.0 ** (-np.arange(0, R, 2) / R)
    ang = pos[..., None] * inv_freq
    return np.cos(ang), np.sin(ang), np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))


@pytest.mark.spec("AG-19")
@fast
@given(seed=seeds, B=st.integers(1, 2), H=st.integers(1, 2), T=st.integers(1, 3), half_D=st.integers(1, 3),
       data=st.data())
def test_rope_full_and_partial(seed, B, H, T, half_D, data):
    rng = np.random.default_rng(seed)
    D = 2 * half_D
    R = 2 * data.draw(st.integers(1, half_D))  # R < D: partial rotary
    per_batch = data.draw(st.booleans())
    c, s, cos, sin = rope_tables(rng, T, R, B if per_batch else None)
    x = leaf(rng, (B, H, T, D))
    gradcheck(lambda x: F.rope(x, cos, sin), [x])
    out = F.rope(x, cos, sin)
    z = (x.data[..., : R // 2] + 1j * x.data[..., R // 2: R]) * (c + 1j * s)  # pair (i, i + R/2) rotated by angle i
    ref = np.concatenate([z.real, z.imag, x.data[..., R:]], -1)
    assert_close(out, ref, rtol=1e-13, atol=1e-14, label="rope forward")
    g = backward_with(out, rng)
    zg = (g[..., : R // 2] + 1j * g[..., R // 2: R]) * (c - 1j * s)  # the inverse rotation
    assert_close(x.grad, np.concatenate([zg.real, zg.imag, g[..., R:]], -1), rtol=1e-13, label="rope grad")


def np_attention(q, k, v, mask, scale):
    B, H, T, D = q.shape
    G = H // k.shape[1]
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    for b in range(B):
        for h in range(H):
            S = q[b, h] @ k[b, h // G].T * scale + (0.0 if mask is None else mask[b % mask.shape[0], 0])
            out[b, h] = np_softmax(S) @ v[b, h // G]
    return out


def attention_mask(rng, kind, B, T, S):
    if kind == "causal":  # query i sees keys j <= i + S - T (a kv cache of S - T earlier tokens)
        return np.where(np.arange(S)[None] <= np.arange(T)[:, None] + S - T, 0.0, -np.inf)[None, None]
    if kind == "padding":  # (B, 1, 1, S), the first key always kept
        keep = rng.random((B, 1, 1, S)) < 0.6
        keep[..., 0] = True
        return np.where(keep, 0.0, -1e9)
    return None


@pytest.mark.spec("AG-20")
@fast
@given(seed=seeds, B=st.integers(1, 2), heads=st.sampled_from([(1, 1), (2, 2), (4, 2), (4, 1), (3, 1)]),
       T=st.integers(1, 3), extra=st.integers(0, 2), D=st.integers(1, 3),
       mask_kind=st.sampled_from([None, "causal", "padding"]), scale=st.sampled_from([None, 0.3]))
def test_sdpa_gqa_and_masks(seed, B, heads, T, extra, D, mask_kind, scale):
    rng = np.random.default_rng(seed)
    H, Hkv = heads
    S = T + extra
    q, k, v = leaf(rng, (B, H, T, D)), leaf(rng, (B, Hkv, S, D)), leaf(rng, (B, Hkv, S, D))
    mask = attention_mask(rng, mask_kind, B, T, S)
    gradcheck(lambda q, k, v: F.sdpa(q, k, v, mask, scale), [q, k, v])
    out = F.sdpa(q, k, v, mask, scale)
    ref = np_attention(q.data, k.data, v.data, mask, 1 / np.sqrt(D) if scale is None else scale)
    assert_close(out, ref, rtol=1e-13, label="sdpa forward")


@pytest.mark.spec("AG-21", "AG-8")
@pytest.mark.parametrize("p_drop", [0.0, 0.3])
def test_checkpoint_gives_equal_gradients(p_drop):
    rng = np.random.default_rng(3)
    x0, W0, w0 = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4)), rng.standard_normal(5)

    def run(use_checkpoint):
        x, W, w = Tensor(x0, requires_grad=True), Tensor(W0, requires_grad=True), Tensor(w0, requires_grad=True)
        drop_rng = backend.RNG(7)
        block = lambda t: F.dropout(F.rms_norm(F.silu(F.linear(t, W)), w), p_drop, drop_rng, training=True)
        out = checkpoint(block, x, params=(W, w), rngs=(drop_rng,)) if use_checkpoint else block(x)
        if use_checkpoint:  # the forward kept no graph inside the block
            assert [id(p) for p in out._ctx.parents] == [id(x), id(W), id(w)]
        before = drop_rng.get_state()
        (out * out).sum().backward()
        assert drop_rng.get_state() == before
        return out.data, x.grad, W.grad, w.grad

    for name, a, b in zip(["out", "dx", "dW", "dw"], run(True), run(False)):
        assert_close(a, b, rtol=1e-14, label=name)


# ---- the array_api_strict guard ----------------------------------------------------------------
def run_on(name, fn, arrays):
    """Forward and backward (a seeded cotangent) of fn(put, *tensors) with every array made on backend
    `name`; the output and the gradients, on the host."""
    backend.set_backend(name)
    ts = [Tensor(backend.asarray(a), requires_grad=True) for a in arrays]
    out = fn(backend.asarray, *ts)
    assert type(out.data).__module__.split(".")[0] == name  # computed where the inputs live
    g = np.random.default_rng(5).standard_normal(out.shape)
    out.backward(backend.asarray(g, backend.dtype_name(out.data)))
    return [out.numpy()] + [t.numpy() for t in ts]


def small_transformer_loss(put, x, Wq, Wk, Wv, Wo, w):
    """linear -> rms_norm -> sdpa (GQA 4/2, causal) -> linear -> cross_entropy, ignore_index rows."""
    B, T, E = x.shape
    mask = put(np.where(np.tril(np.ones((T, T))) > 0, 0.0, -np.inf)[None, None])
    h = F.rms_norm(x, w)
    q = F.linear(h, Wq).reshape(B, T, 4, 2).permute(0, 2, 1, 3)  # (B, 4, T, 2)
    k = F.linear(h, Wk).reshape(B, T, 2, 2).permute(0, 2, 1, 3)  # (B, 2, T, 2)
    v = F.linear(h, Wv).reshape(B, T, 2, 2).permute(0, 2, 1, 3)
    o = F.sdpa(q, k, v, mask).permute(0, 2, 1, 3).reshape(B * T, 8)  # (B*T, H*D)
    return F.cross_entropy(F.linear(o, Wo), put(np.array([1, 4, -100, 0, 2, -100])))


def backend_cases(rng):
    """name -> (fn(put, *tensors), input arrays): every op once, constants made with put()."""
    r = rng.standard_normal
    ids, cos, sin = np.array([[0, 2, 2], [1, 0, 2]]), r((3, 4)), r((3, 4))
    return {
        "composite": (small_transformer_loss, [r(s) for s in [(2, 3, 4), (8, 4), (4, 4), (4, 4), (5, 8), (4,)]]),
        "arith": (lambda put, a, b: (a * b - a / (b * b + 1.0)) ** 2 + (1.0 - a).exp() + (b * b + 1).log(),
                  [r((2, 3)), r((3,))]),
        "matmul": (lambda put, a, b: a @ b, [r((2, 3, 4)), r((4, 2))]),
        "structural": (lambda put, a, b: concat([a[1:, ::2].T, b.reshape(2, 3)], axis=1).sum(axis=0, keepdims=True)
                       .mean(), [r((3, 4)), r((6,))]),
        "cast": (lambda put, a: a.astype("float32").astype("float64") * 2.0, [r((3,))]),
        "embedding": (lambda put, W: embedding(W, put(ids)), [r((3, 2))]),
        "dropout": (lambda put, x: F.dropout(x, 0.5, backend.RNG(0), training=True), [r((3, 4))]),
        "linear_fifo": (lambda put, x, W, b: F.linear(x, W, b, fan_in_fan_out=True), [r((2, 3)), r((3, 4)), r(4)]),
        "softmaxes": (lambda put, x: F.softmax(x) * F.log_softmax(x), [r((3, 4))]),
        "activations": (lambda put, a, b: F.silu(a) + F.silu_mul(a, b) + F.gelu(b) + F.gelu(a, "tanh"),
                        [r((3, 4)) * 3, r((3, 4)) * 3]),
        "norms": (lambda put, x, w, b: F.layer_norm(F.rms_norm(x, w), w, b), [r((3, 4)), r(4), r(4)]),
        "rope_partial": (lambda put, x: F.rope(x, put(cos), put(sin)), [r((1, 2, 3, 6))]),
    }


@pytest.mark.spec("BACKEND-1", "AG-1", "AG-5", "AG-6", "AG-7", "AG-8", "AG-12", "AG-19", "AG-20")
@pytest.mark.parametrize("case", sorted(backend_cases(np.random.default_rng(0))))
def test_every_op_on_every_backend_equals_numpy(any_backend, case):
    fn, arrays = backend_cases(np.random.default_rng(4))[case]
    ours = run_on(any_backend, fn, arrays)
    ref = run_on("numpy", fn, arrays)
    for i, (a, r) in enumerate(zip(ours, ref)):
        assert_close(a, r, rtol=1e-13, atol=1e-15, label=f"{case} {'output' if i == 0 else f'grad {i - 1}'}")
    if case == "composite" and any_backend == "numpy":  # the chain rule through all of it (x and the norm weight)
        leaves = [Tensor(a, requires_grad=i in (0, 5)) for i, a in enumerate(arrays)]
        gradcheck(lambda *ts: small_transformer_loss(np.asarray, *ts), leaves)


# ---- oracle: the fused ops against torch in float64 -------------------------------------------
def oracle_cases(rng):
    """name -> (ours(*tensors), torch(*tensors), differentiable inputs)."""
    import torch
    tF = torch.nn.functional
    t = rng.integers(0, 6, 7)
    t[[1, 4]] = -100
    c, s, cos, sin = rope_tables(rng, 3, 4, batch=2)

    def rotate_half(x):  # transformers.models.llama.modeling_llama.rotate_half
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    def torch_rope(x):  # phi's partial rotary: rotate the first 4 of 6 features
        C, S = torch.from_numpy(cos), torch.from_numpy(sin)
        xr, xp = x[..., :4], x[..., 4:]
        return torch.cat((xr * C + rotate_half(xr) * S, xp), dim=-1)

    mask = attention_mask(rng, "causal", 2, 3, 5)
    r = rng.standard_normal
    return {
        "linear": (lambda x, W, b: F.linear(x, W, b), tF.linear, [r((2, 3, 4)), r((5, 4)), r(5)]),
        "linear_fifo": (lambda x, W, b: F.linear(x, W, b, fan_in_fan_out=True),
                        lambda x, W, b: x @ W + b, [r((2, 3, 4)), r((4, 5)), r(5)]),
        "embedding": (lambda W: embedding(W, t.clip(0)), lambda W: tF.embedding(torch.from_numpy(t.clip(0)), W),
                      [r((6, 3))]),
        "softmax": (F.softmax, lambda x: torch.softmax(x, -1), [r((3, 6)) * 4]),
        "log_softmax": (F.log_softmax, lambda x: torch.log_softmax(x, -1), [r((3, 6)) * 4]),
        "cross_entropy": (lambda x: F.cross_entropy(x, t), lambda x: tF.cross_entropy(x, torch.from_numpy(t)),
                          [r((7, 6)) * 3]),
        "silu": (F.silu, tF.silu, [r((4, 5)) * 4]),
        "silu_mul": (F.silu_mul, lambda a, b: tF.silu(a) * b, [r((4, 5)) * 4, r((4, 5))]),
        "gelu": (F.gelu, tF.gelu, [r((4, 5)) * 4]),
        "gelu_tanh": (lambda x: F.gelu(x, "tanh"), lambda x: tF.gelu(x, approximate="tanh"), [r((4, 5)) * 4]),
        "rms_norm": (lambda x, w: F.rms_norm(x, w, 1e-6), lambda x, w: tF.rms_norm(x, (6,), w, 1e-6),
                     [r((2, 3, 6)), r(6)]),
        "layer_norm": (lambda x, w, b: F.layer_norm(x, w, b, 1e-5), lambda x, w, b: tF.layer_norm(x, (6,), w, b, 1e-5),
                       [r((2, 3, 6)), r(6), r(6)]),
        "rope_partial": (lambda x: F.rope(x, cos, sin), torch_rope, [r((2, 2, 3, 6))]),
        "sdpa_gqa_causal": (lambda q, k, v: F.sdpa(q, k, v, mask),
                            lambda q, k, v: tF.scaled_dot_product_attention(q, k, v, torch.from_numpy(mask),
                                                                            enable_gqa=True),
                            [r((2, 4, 3, 3)), r((2, 2, 5, 3)), r((2, 2, 5, 3))]),
    }


@pytest.mark.oracle
@pytest.mark.spec("AG-7", "AG-9", "AG-10", "AG-11", "AG-12", "AG-13", "AG-14", "AG-15", "AG-16", "AG-17",
                  "AG-18", "AG-19", "AG-20")
def test_fused_ops_match_torch_float64():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    for name, (ours, theirs, arrays) in oracle_cases(rng).items():
        mine = [Tensor(a, requires_grad=True) for a in arrays]
        ref = [torch.tensor(a, requires_grad=True) for a in arrays]
        out, ref_out = ours(*mine), theirs(*ref)
        g = rng.standard_normal(out.shape)
        out.backward(g)
        ref_out.backward(torch.from_numpy(g))
        assert_close(out, ref_out.detach().numpy(), rtol=1e-12, atol=1e-14, label=f"{name} forward")
        for i, (a, r) in enumerate(zip(mine, ref)):
            assert_close(a.grad, r.grad.numpy(), rtol=1e-12, atol=1e-14, label=f"{name} grad {i}")


@pytest.mark.spec("AG-20")
@fast
@given(seed=seeds, B=st.integers(1, 2), heads=st.sampled_from([(2, 2), (4, 2), (3, 1)]), T=st.integers(4, 9),
       past=st.integers(0, 3), mask_kind=st.sampled_from(["causal", "causal_min", "padding", "left_pad"]))
def test_sdpa_in_blocks_of_rows_skips_only_hidden_keys(seed, B, heads, T, past, mask_kind):
    """With blocks of 3 query rows, values and gradients equal one pass (the reference and finite
    differences), and a causal mask lets early blocks skip the keys after their last row."""
    rng = np.random.default_rng(seed)
    H, Hkv = heads
    S, D = T + past, 2
    q, k, v = leaf(rng, (B, H, T, D)), leaf(rng, (B, Hkv, S, D)), leaf(rng, (B, Hkv, S, D))
    causal = np.arange(S)[None] <= np.arange(T)[:, None] + past  # (T, S)
    low = np.finfo(np.float64).min
    if mask_kind == "left_pad":  # the first key of batch 0 is a pad: its query row sees nothing when past = 0
        keep = causal[None, None] & (np.arange(S) >= (1 if past == 0 else 0))[None, None, None]
        mask = np.where(np.concatenate([keep, np.broadcast_to(causal, (B - 1, 1, T, S))])
                        if B > 1 else keep, 0.0, low)
    elif mask_kind == "padding":
        mask = attention_mask(rng, "padding", B, T, S)
    else:
        mask = np.where(causal, 0.0, -np.inf if mask_kind == "causal" else low)[None, None]
    blocks = F.key_blocks(mask, T, S, 3)
    assert [(i, j) for i, j, _ in blocks] == [(i, min(i + 3, T)) for i in range(0, T, 3)]
    if mask_kind in ("causal", "causal_min"):
        assert [n for _, _, n in blocks] == [min(j + past, S) for _, j, _ in blocks]
    if mask_kind == "left_pad" and past == 0:
        assert blocks[0][2] == S  # a block with a row that sees nothing keeps every key
    saved, F.ATTN_BLOCK = F.ATTN_BLOCK, 3
    try:  # a row that sees nothing has a flat softmax whatever q is (min + s == min): values only there
        if not (mask_kind == "left_pad" and past == 0):
            gradcheck(lambda q, k, v: F.sdpa(q, k, v, mask, None), [q, k, v])
        out = F.sdpa(q, k, v, mask)
    finally:
        F.ATTN_BLOCK = saved
    assert_close(out, np_attention(q.data, k.data, v.data, mask, 1 / np.sqrt(D)), rtol=1e-12, label="blocked sdpa")


@pytest.mark.spec("AG-22")
@fast
@given(seed=seeds, n=st.integers(1, 6), rest=dims, data=st.data())
def test_take_rows(seed, n, rest, data):
    rng = np.random.default_rng(seed)
    x = leaf(rng, (n,) + rest)
    index = data.draw(st.permutations(range(n)))[:data.draw(st.integers(1, n))]  # distinct rows, any order
    gradcheck(lambda t: take_rows(t, index) * 1.0, [x])
    assert np.array_equal(take_rows(x, index).data, x.data[index])
    g = backward_with(take_rows(x, index), rng)
    ref = np.zeros(x.shape)
    ref[index] = g
    assert_close(x.grad, ref, rtol=0, label="take_rows grad")
    perm = data.draw(st.permutations(range(n)))
    back = take_rows(take_rows(x, perm), list(np.argsort(perm)))  # a permutation, then its inverse
    assert np.array_equal(back.data, x.data)
