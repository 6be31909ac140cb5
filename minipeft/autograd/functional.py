"""Fused ops of the transformer stack, each with a hand-derived backward (spec/autograd.md AG-9..AG-20).

Fusing a chain of primitives into one op saves the intermediates and the Python overhead of a
node per elementwise step; each backward below is the closed form derived in the spec, checked
against central finite differences in float64 by tests/test_autograd.py.
"""
from __future__ import annotations

import math

from .. import backend
from .function import Function
from .tensor import Tensor


def _xp(a):
    return backend.xp_of(a)


class Linear(Function):
    """y = x W^T + b with W (out, in) (AG-9). fan_in_fan_out: W is (in, out), y = x W + b (GPT-2 Conv1D).
    x is kept for backward only when W needs a gradient: a frozen layer keeps no activation."""

    def forward(self, x, W, b=None, fan_in_fan_out=False):
        xp = _xp(x)
        self.fifo, self.x_shape = fan_in_fan_out, x.shape
        x2 = xp.reshape(x, (-1, x.shape[-1]))  # (N, in)
        Wt = W if fan_in_fan_out else xp.matrix_transpose(W)  # (in, out)
        y = xp.matmul(x2, Wt)  # (N, out)
        if b is not None:
            y = y + b
        self.save_for_backward(x2 if self.needs_input_grad[1] else None, W)
        return xp.reshape(y, tuple(x.shape[:-1]) + (Wt.shape[1],))

    def backward(self, g):
        x2, W = self.saved
        xp = _xp(g)
        g2 = xp.reshape(g, (-1, g.shape[-1]))  # (N, out)
        gx = gW = gb = None
        if self.needs_input_grad[0]:
            Wm = xp.matrix_transpose(W) if self.fifo else W  # (out, in)
            gx = xp.reshape(xp.matmul(g2, Wm), self.x_shape)
        if self.needs_input_grad[1]:
            gW = xp.matmul(xp.matrix_transpose(x2), g2) if self.fifo else xp.matmul(xp.matrix_transpose(g2), x2)
        if len(self.needs_input_grad) > 2 and self.needs_input_grad[2]:
            gb = xp.sum(g2, axis=0)
        return gx, gW, gb


class Softmax(Function):
    """y = softmax(x) on the last axis; dx = y * (g - sum(g * y)) (AG-10)."""

    def forward(self, x):
        xp = _xp(x)
        e = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
        y = e / xp.sum(e, axis=-1, keepdims=True)
        self.save_for_backward(y)
        return y

    def backward(self, g):
        (y,) = self.saved
        return (y * (g - _xp(g).sum(g * y, axis=-1, keepdims=True)),)


class LogSoftmax(Function):
    """y = x - logsumexp(x) on the last axis; dx = g - softmax(x) * sum(g) (AG-11: d lse/dx = softmax)."""

    def forward(self, x):
        xp = _xp(x)
        m = xp.max(x, axis=-1, keepdims=True)
        y = x - (xp.log(xp.sum(xp.exp(x - m), axis=-1, keepdims=True)) + m)
        self.save_for_backward(y)
        return y

    def backward(self, g):
        (y,) = self.saved
        xp = _xp(g)
        return (g - xp.exp(y) * xp.sum(g, axis=-1, keepdims=True),)


class CrossEntropy(Function):
    """loss = mean over rows with target != ignore_index of (logsumexp(x_i) - x_i[t_i]) (AG-12).
    dx_i = (softmax(x_i) - onehot(t_i)) / n_valid; no one-hot is built (a flat scatter-add of -1).
    With no valid row the loss is 0 and so is the gradient. On the CPU both passes go over blocks of
    rows (CE_CHUNK elements each, BACKEND-8), so the (N, V) temporaries of exp stay in cache and only
    the gradient itself is a new (N, V) array."""

    def forward(self, logits, targets, ignore_index=-100):
        xp = _xp(logits)
        N, V = logits.shape
        valid = targets != ignore_index
        safe_t = xp.where(valid, targets, xp.zeros_like(targets))
        flat_idx = xp.arange(N, dtype=safe_t.dtype) * V + safe_t
        rows = max(backend.chunk_length(logits, CE_CHUNK) // max(V, 1), 1)
        blocks = [(i, min(i + rows, N)) for i in range(0, N, rows)]
        lse = xp.concat([logsumexp_rows(logits[i:j, ...]) for i, j in blocks], axis=0)  # (N, 1)
        picked = xp.take(xp.reshape(logits, (-1,)), flat_idx)  # (N,)
        validf = xp.astype(valid, logits.dtype)
        n = max(int(backend.to_host(xp.sum(validf))), 1)
        self.save_for_backward(logits, lse, flat_idx, validf)
        self.n, self.blocks = n, blocks
        return xp.sum((lse[:, 0] - picked) * validf) / n

    def backward(self, g):
        logits, lse, flat_idx, validf = self.saved
        xp = _xp(logits)
        scale = validf * (g / self.n)  # (N,)
        dx = xp.empty(logits.shape, dtype=logits.dtype)
        for i, j in self.blocks:  # softmax rows, scaled
            dx[i:j, ...] = xp.exp(logits[i:j, ...] - lse[i:j, ...]) * scale[i:j, None]
        return xp.reshape(backend.scatter_add(xp.reshape(dx, (-1,)), flat_idx, -scale), logits.shape), None


CE_CHUNK = 1 << 18  # elements of logits per block on the CPU (1 MiB of float32)


def logsumexp_rows(x):
    """log(sum(exp(x), axis=-1)) per row, (R, 1), shifted by the row max for range."""
    xp = _xp(x)
    m = xp.max(x, axis=-1, keepdims=True)
    return xp.log(xp.sum(xp.exp(x - m), axis=-1, keepdims=True)) + m


class SiLU(Function):
    """y = x sigmoid(x); dy/dx = s (1 + x (1 - s)) (AG-13)."""

    def forward(self, x):
        s = 1.0 / (1.0 + _xp(x).exp(-x))
        self.save_for_backward(x, s)
        return x * s

    def backward(self, g):
        x, s = self.saved
        return (g * s * (1.0 + x * (1.0 - s)),)


class SiLUMul(Function):
    """y = silu(a) * b, the SwiGLU gate of llama's MLP, fused (AG-14)."""

    def forward(self, a, b):
        s = 1.0 / (1.0 + _xp(a).exp(-a))
        self.save_for_backward(a, b, s)
        return a * s * b

    def backward(self, g):
        a, b, s = self.saved
        ga = g * b * s * (1.0 + a * (1.0 - s)) if self.needs_input_grad[0] else None
        gb = g * a * s if self.needs_input_grad[1] else None
        return ga, gb


class GELU(Function):
    """Exact GELU: y = x Phi(x) = x/2 (1 + erf(x/sqrt 2)); dy/dx = Phi(x) + x phi(x) (AG-15)."""

    def forward(self, x):
        self.save_for_backward(x)
        return 0.5 * x * (1.0 + backend.erf(x * (1.0 / math.sqrt(2.0))))

    def backward(self, g):
        (x,) = self.saved
        xp = _xp(x)
        cdf = 0.5 * (1.0 + backend.erf(x * (1.0 / math.sqrt(2.0))))
        pdf = xp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
        return (g * (cdf + x * pdf),)


class GELUTanh(Function):
    """GELU, tanh form (GPT-2 "gelu_new"): y = x/2 (1 + tanh(c (x + 0.044715 x^3))), c = sqrt(2/pi) (AG-16)."""

    C = math.sqrt(2.0 / math.pi)

    def forward(self, x):
        t = _xp(x).tanh(self.C * (x + 0.044715 * x * x * x))
        self.save_for_backward(x, t)
        return 0.5 * x * (1.0 + t)

    def backward(self, g):
        x, t = self.saved
        dinner = self.C * (1.0 + 3 * 0.044715 * x * x)
        return (g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner),)


class RMSNorm(Function):
    """y = w * x / sqrt(mean(x^2) + eps) over the last axis (AG-17).
    With r = 1/sqrt(mean(x^2)+eps), xh = x r, h = g w: dx = r (h - xh mean(h xh)), dw = sum(g xh)."""

    def forward(self, x, w, eps=1e-6):
        xp = _xp(x)
        r = 1.0 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)
        xh = x * r
        self.save_for_backward(xh, r, w)
        return xh * w

    def backward(self, g):
        xh, r, w = self.saved
        xp = _xp(g)
        h = g * w
        gx = r * (h - xh * xp.mean(h * xh, axis=-1, keepdims=True)) if self.needs_input_grad[0] else None
        gw = xp.sum(xp.reshape(g * xh, (-1, w.shape[0])), axis=0) if self.needs_input_grad[1] else None
        return gx, gw


class LayerNorm(Function):
    """y = w (x - mu) / sqrt(var + eps) + b over the last axis, biased variance (AG-18).
    dx = r (h - mean(h) - xh mean(h xh)) with h = g w."""

    def forward(self, x, w, b, eps=1e-5):
        xp = _xp(x)
        mu = xp.mean(x, axis=-1, keepdims=True)
        xc = x - mu
        r = 1.0 / xp.sqrt(xp.mean(xc * xc, axis=-1, keepdims=True) + eps)
        xh = xc * r
        self.save_for_backward(xh, r, w)
        return xh * w + b

    def backward(self, g):
        xh, r, w = self.saved
        xp = _xp(g)
        h = g * w
        gx = None
        if self.needs_input_grad[0]:
            gx = r * (h - xp.mean(h, axis=-1, keepdims=True) - xh * xp.mean(h * xh, axis=-1, keepdims=True))
        flat = (-1, w.shape[0])
        gw = xp.sum(xp.reshape(g * xh, flat), axis=0) if self.needs_input_grad[1] else None
        gb = xp.sum(xp.reshape(g, flat), axis=0) if self.needs_input_grad[2] else None
        return gx, gw, gb


def _rotate_half(x, sign):
    """sign=+1: (-x2, x1), the HF rotate_half; sign=-1: its transpose (x2, -x1)."""
    xp = _xp(x)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return xp.concat((-x2, x1) if sign > 0 else (x2, -x1), axis=-1)


class RoPE(Function):
    """Rotary embedding on the first `cos.shape[-1]` features of x (B, H, T, D) (AG-19):
    y = x cos + rotate_half(x) sin; rotate_half is orthogonal-antisymmetric, so dx = g cos + rotate_half^T(g sin)."""

    def forward(self, x, cos, sin):
        xp = _xp(x)
        rot = cos.shape[-1]
        self.save_for_backward(cos, sin)
        xr = x[..., :rot]
        yr = xr * cos + _rotate_half(xr, +1) * sin
        return yr if rot == x.shape[-1] else xp.concat((yr, x[..., rot:]), axis=-1)

    def backward(self, g):
        cos, sin = self.saved
        xp = _xp(g)
        rot = cos.shape[-1]
        gr = g[..., :rot]
        dr = gr * cos + _rotate_half(gr * sin, -1)
        return (dr if rot == g.shape[-1] else xp.concat((dr, g[..., rot:]), axis=-1)), None, None


class SDPA(Function):
    """Scaled dot-product attention with grouped KV heads (AG-20).
    q (B, H, T, D), k and v (B, Hkv, S, D), H = G Hkv; query head h reads kv head h // G.
    P = softmax(q k^T * scale + mask) with mask additive (B|1, 1, T, S); out O = P v.
    Backward: dP = dO v^T, dS = P (dP - rowsum(dO O)), dq = dS k scale, dk = dS^T q scale, dv = P^T dO.
    rowsum(dO O) equals rowsum(dP P) (= sum_s P_s (dO . v_s)) and costs (T, D) work instead of (T, S);
    the (T, S) arrays are updated in place, so a step makes no more of them than it must.
    Long queries go in blocks of ATTN_BLOCK rows; a block reads only the keys before the last one the
    mask lets any of its rows see (key_blocks): under a causal mask about half of P is never computed."""

    def forward(self, q, k, v, mask=None, scale=1.0, blocks=None):
        xp = _xp(q)
        B, H, T, D = q.shape
        Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
        G = H // Hkv
        self.shape, self.scale = (B, H, T, D, Hkv, S, G), scale
        self.blocks = blocks if blocks is not None else key_blocks(mask, T, S, ATTN_BLOCK)
        q5 = xp.reshape(q, (B, Hkv, G, T, D))  # (B, Hkv, G, T, D)
        kt, v5 = xp.matrix_transpose(k)[:, :, None, ...], v[:, :, None, ...]  # (B, Hkv, 1, D, S), (B, Hkv, 1, S, Dv)
        o = xp.empty((B, Hkv, G, T, Dv), dtype=q.dtype)
        ps = []
        for i, j, n in self.blocks:
            s = xp.matmul(q5[:, :, :, i:j, :] * scale, kt[..., :n])  # (B, Hkv, G, r, n), a new array
            if mask is not None:  # a mask of one row (B, 1, 1, S) holds for every query
                s += mask[:, :, None, i:j, :n] if mask.shape[2] > 1 else mask[:, :, None, :, :n]
            s -= xp.max(s, axis=-1, keepdims=True)
            p = xp.exp(s)
            p /= xp.sum(p, axis=-1, keepdims=True)
            o[:, :, :, i:j, :] = xp.matmul(p, v5[:, :, :, :n, :])
            ps.append(p)
        self.save_for_backward(q5, k, v, ps, o)
        return xp.reshape(o, (B, H, T, Dv))

    def backward(self, g):
        q5, k, v, ps, o = self.saved
        xp = _xp(g)
        B, H, T, D, Hkv, S, G = self.shape
        g5 = xp.reshape(g, (B, Hkv, G, T, v.shape[-1]))  # (B, Hkv, G, T, Dv)
        vt, k5 = xp.matrix_transpose(v)[:, :, None, ...], k[:, :, None, ...]
        need_q, need_k, need_v = self.needs_input_grad[:3]
        dq = xp.empty(q5.shape, dtype=q5.dtype) if need_q else None
        dk = xp.zeros(k.shape, dtype=k.dtype) if need_k else None
        dv = xp.zeros(v.shape, dtype=v.dtype) if need_v else None
        for (i, j, n), p in zip(self.blocks, ps):
            gb = g5[:, :, :, i:j, :]
            ds = xp.matmul(gb, vt[..., :n])  # dP (B, Hkv, G, r, n), a new array
            ds -= xp.sum(gb * o[:, :, :, i:j, :], axis=-1, keepdims=True)
            ds *= p  # dS / scale
            if need_q:
                dq[:, :, :, i:j, :] = xp.matmul(ds, k5[:, :, :, :n, :]) * self.scale
            if need_k:
                dk[:, :, :n, :] += xp.sum(xp.matmul(xp.matrix_transpose(ds), q5[:, :, :, i:j, :]), axis=2) * self.scale
            if need_v:
                dv[:, :, :n, :] += xp.sum(xp.matmul(xp.matrix_transpose(p), gb), axis=2)
        return (None if dq is None else xp.reshape(dq, (B, H, T, D))), dk, dv


ATTN_BLOCK = 128  # query rows per attention block (AG-20)


def key_blocks(mask, T: int, S: int, rows: int) -> list:
    """[(i, j, n)]: query rows i..j-1 read keys 0..n-1. n is the last key any row of the block may see,
    + 1, where the mask hides the rest with the dtype's minimum (their probability is exactly 0); a
    block with a row that sees nothing keeps all S keys (its softmax runs over every score)."""
    if mask is None or T <= rows:
        return [(0, T, S)]
    xp = _xp(mask)
    seen = xp.where(mask > xp.finfo(mask.dtype).min, xp.arange(1, S + 1, dtype=xp.int64), 0)  # (B|1, 1, T|1, S)
    reach = xp.max(seen, axis=-1)  # (B|1, 1, T|1): the last key each row sees, + 1 (0: none)
    reach = backend.to_host(xp.broadcast_to(reach, tuple(reach.shape[:2]) + (T,)))
    blocks = []
    for i in range(0, T, rows):
        j = min(i + rows, T)
        r = reach[..., i:j]
        blocks.append((i, j, S if int(r.min()) == 0 else int(r.max())))
    return blocks


# ---- function forms ---------------------------------------------------------------------------
def linear(x, W, b=None, fan_in_fan_out=False):
    args = (x, W) if b is None else (x, W, b)
    return Linear.apply(*args, fan_in_fan_out=fan_in_fan_out)


def softmax(x):
    return Softmax.apply(x)


def log_softmax(x):
    return LogSoftmax.apply(x)


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean token cross-entropy of (N, V) logits against (N,) int targets, HF semantics."""
    t = targets.data if isinstance(targets, Tensor) else targets
    return CrossEntropy.apply(logits, Tensor(t), ignore_index=ignore_index)


def silu(x):
    return SiLU.apply(x)


def silu_mul(a, b):
    return SiLUMul.apply(a, b)


def gelu(x, approximate: str = "none"):
    return GELUTanh.apply(x) if approximate == "tanh" else GELU.apply(x)


def rms_norm(x, w, eps=1e-6):
    return RMSNorm.apply(x, w, eps=eps)


def layer_norm(x, w, b, eps=1e-5):
    return LayerNorm.apply(x, w, b, eps=eps)


def rope(x, cos, sin):
    return RoPE.apply(x, cos, sin)


def sdpa(q, k, v, mask=None, scale=None, blocks=None):
    """blocks: key_blocks(mask, ...) when the caller has them already (one mask serves every layer)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return SDPA.apply(q, k, v, mask=mask, scale=scale, blocks=blocks)


def dropout(x, p: float, rng, training: bool):
    """Inverted dropout: zero each element with probability p and scale the rest by 1/(1-p)."""
    if not training or p == 0.0:
        return x
    return x * Tensor(rng.keep_mask(x.shape, p, backend.dtype_name(x.data)))
