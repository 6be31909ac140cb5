"""WaveFT: Exploring Sparsity for Parameter Efficient Fine Tuning Using Wavelets (2025, arXiv:2505.12532;
authors not checked here, no copy of the paper offline), spec/waveft.md.

Symbols: W0 (out, in) frozen base weight, x (..., in); n_f = n_frequency (n_frequency_pattern per layer);
    c (n_f,) the trained wavelet coefficients (PEFT's waveft_spectrum); s the scaling; lo, hi the wavelet's
    reconstruction low / high pass filters of length L (hi_i = (-1)^i lo_{L-1-i}).
Positions (WAVEFT-1): FourierFT's (fourierft.seeded_positions): p = the first n_f entries of torch.randperm(out * in)
    seeded with random_loc_seed, u_k = p_k // in, v_k = p_k % in. Not saved: rebuilt on load, as PEFT does.
Coefficient grid (WAVEFT-2): the P x Q grid with P = out + L - 2, Q = in + L - 2, each rounded up to even (PEFT's
    WAVELET_REDUCTIONS), holds c_k at (u_k + (P - out) // 2, v_k + (Q - in) // 2), else 0; its quadrants
    (top-left, top-right, bottom-left, bottom-right) are the subbands cA, cH, cV, cD of one level.
Delta weight (WAVEFT-3): dW = s IDWT2(cA, (cH, cV, cD)) centre-cropped to (out, in). One level of the separable
    synthesis is linear: dW = s R M C^T with M = [[cA, cV], [cH, cD]] (the subband that a row filter multiplies:
    cH, cD take hi along rows; cV, cD take hi along columns, PEFT's lh = hi (x) lo stacking) and
    R[a, i] = lo[t_a - 2i], R[a, P/2 + i] = hi[t_a - 2i] (zero outside 0..L-1), t_a = a + L - 2 + the centre crop;
    C the same for columns; applied (synthesis) as L/2-tap polyphase sums of shifted rows, no matrix is formed.
    use_idwt=False: dW = s S, the grid without padding (R = C = I).
Forward (WAVEFT-4): h = W0 x + b + dW x, dW materialised each call (as PEFT).
Init (WAVEFT-5): init_weights=True (PEFT's default): c = 0; False: c ~ N(0, 0.01^2).
Merge (WAVEFT-6): W <- W0 + dW (dW^T for the gpt2 Conv1D layout, PEFT's fan_in_fan_out); unmerge subtracts it.
Gradients (WAVEFT-7): dL/dc = s (R^T G C)[positions in M], G = dL/d(dW) (the op CoefficientsToWeight).
Serialization (WAVEFT-8): peft_type "WAVEFT"; key <layer>.waveft_spectrum (n_f,).
Errors (WAVEFT-9): a wavelet_family other than db1..db10, sym2; proportional_parameters=True; FourierFT's.
PEFT parity: peft/tuners/waveft/layer.py WaveFTLayer.update_layer, get_delta_weight; waverec2d.py waverec2d.
Deviations: of PEFT's db1-db10, sym2-sym10, coif1-coif5 only db1-db10 and sym2 (db2's filter) are here;
    proportional_parameters is refused; c ~ N(0, 0.01^2) is drawn from minipeft's RNG, not torch's.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import backend
from ..autograd.function import Function
from .base import check, trainable
from .fourierft import FourierFTConfig, FourierFTLinear, seeded_positions
from .registry import register

def daubechies(N: int) -> tuple:
    """WAVEFT-3: db<N>'s reconstruction low-pass filter (length 2N), Daubechies' extremal-phase construction:
    lo ∝ (1 + z)^N Q(z), Q's roots the ones inside the unit circle of z^(N-1) P((2 - z - 1/z) / 4),
    P(y) = sum_{k<N} C(N-1+k, k) y^k; scaled to sum sqrt(2). Host NumPy, once at import (constants)."""
    poly, y_k, y = np.zeros(2 * N - 1), np.ones(1), np.array([-0.25, 0.5, -0.25])  # y_k: z^k y^k
    for k in range(N):
        poly[N - 1 - k:N + k] += math.comb(N - 1 + k, k) * y_k
        y_k = np.convolve(y_k, y)
    roots = np.roots(poly) if N > 1 else np.zeros(0)
    lo = np.real(np.convolve(np.poly(roots[np.abs(roots) < 1]), [math.comb(N, i) for i in range(N + 1)]))
    return tuple(float(v) for v in lo * math.sqrt(2) / lo.sum())


REC_LO = {f"db{N}": daubechies(N) for N in range(1, 11)}
REC_LO["sym2"] = REC_LO["db2"]  # PyWavelets' sym2 is db2's filter (the other symlets are not here)


@dataclasses.dataclass
class WaveFTConfig(FourierFTConfig):
    n_frequency: int = 2592  # trained wavelet coefficients per layer
    scaling: float = 25.0
    wavelet_family: str = "db1"  # db1 (Haar) .. db10, sym2
    use_idwt: bool = True  # False: dW = s S, the coefficients used as a sparse weight
    random_loc_seed: int = 777
    init_weights: bool = True  # True: c = 0 (PEFT's default); False: c ~ N(0, 0.01^2)
    proportional_parameters: bool = False  # PEFT's experimental per-layer budget; refused here
    bias: str = "none"  # "none" | "all" | "waveft_only"

    peft_type = "WAVEFT"
    BIASES = ("none", "all", "waveft_only")
    PEFT_FIELDS = {f: f for f in ("n_frequency", "scaling", "wavelet_family", "use_idwt", "random_loc_seed",
                                  "n_frequency_pattern", "init_weights", "proportional_parameters", "bias")}
    INIT_MOVES_OUTPUT = None

    def validate(self):
        super().validate()
        check(self.wavelet_family in REC_LO, "wavelet_family", self.wavelet_family,
              f"supported here: {', '.join(REC_LO)} (PEFT's sym3-sym10 and coif1-coif5 are not in minipeft)")
        check(self.proportional_parameters is False, "proportional_parameters", self.proportional_parameters,
              "is not supported by minipeft; set n_frequency_pattern per layer instead")


def padded(n: int, L: int) -> int:
    """WAVEFT-2: PEFT's padded size, n + L - 2 rounded up to even."""
    return n + L - 2 + (n + L - 2) % 2


def synthesis(xp, X, lo, n: int):
    """WAVEFT-3 along axis 0: rows [start, start + n) of one level of 1-D inverse DWT of X (P, k), its first
    P/2 rows the low-pass coefficients, the rest the high-pass ones (R X in the spec). Polyphase: the even and
    odd output rows are L/2-tap sums of shifted coefficient rows, interleaved."""
    L, h, k = len(lo), X.shape[0] // 2, X.shape[1]
    hi = [(-1) ** i * lo[L - 1 - i] for i in range(L)]
    e, z = L // 2 - 1, xp.zeros((L // 2 - 1, X.shape[1]), dtype=X.dtype)
    A, B = xp.concat([z, X[:h, :], z]), xp.concat([z, X[h:, :], z])  # (h + 2e, k)
    m = h + e
    phases = [sum(lo[2 * q + r] * A[e - q:e - q + m, :] + hi[2 * q + r] * B[e - q:e - q + m, :] for q in range(L // 2))
              for r in (0, 1)]
    start = L - 2 + (2 * h - L + 2 - n) // 2
    return xp.reshape(xp.stack(phases, axis=1), (2 * m, k))[start:start + n, :]


def synthesis_adjoint(xp, G, lo, P: int):
    """WAVEFT-7: R^T G for synthesis's R (n, P), G (n, k): (P, k)."""
    L, (n, k), h = len(lo), G.shape, P // 2
    hi = [(-1) ** i * lo[L - 1 - i] for i in range(L)]
    e = L // 2 - 1
    m = h + e
    start = L - 2 + (P - L + 2 - n) // 2
    full = xp.concat([xp.zeros((start, k), dtype=G.dtype), G, xp.zeros((2 * m - start - n, k), dtype=G.dtype)])
    g = xp.reshape(full, (m, 2, k))
    lows, highs = ([sum(f[2 * q + r] * g[q:q + h, r, :] for q in range(L // 2) for r in (0, 1))] for f in (lo, hi))
    return xp.concat(lows + highs)


def grid_positions(p, n: int, m: int, P: int, Q: int):
    """WAVEFT-2, WAVEFT-3: the flat index in M (P, Q) of each seeded position p (flat in the m x n weight)."""
    r, c = p // n + (P - m) // 2, p % n + (Q - n) // 2
    h, w = P // 2, Q // 2
    qr, qc = r >= h, c >= w  # grid quadrant; M swaps the off-diagonal ones
    return (qc * h + r % h) * Q + qr * w + c % w


class CoefficientsToWeight(Function):
    """dW = s R M C^T with M (P, Q) zero but M.flat[flat] = c (WAVEFT-3); backward (WAVEFT-7):
    dc = s (R^T G C).flat[flat]. lo None: use_idwt=False, R = C = I."""

    def forward(self, c, flat, grid, lo, shape, s):
        xp = backend.xp_of(c)
        self.flat, self.grid, self.lo, self.s = flat, grid, lo, s
        M = xp.reshape(backend.scatter_add(xp.zeros((grid[0] * grid[1],), dtype=c.dtype), flat, c), grid)
        if lo is None:
            return M * s
        RM = synthesis(xp, M, lo, shape[0])  # (out, Q)
        return xp.matrix_transpose(synthesis(xp, xp.matrix_transpose(RM), lo, shape[1])) * s  # (out, in)

    def backward(self, g):
        xp = backend.xp_of(g)
        if self.lo is not None:
            g = synthesis_adjoint(xp, xp.matrix_transpose(synthesis_adjoint(xp, xp.matrix_transpose(g), self.lo,
                                                                            self.grid[1])), self.lo, self.grid[0])
        return (xp.take(xp.reshape(g, (-1,)), self.flat) * self.s,)  # (n_f,)


class WaveFTLinear(FourierFTLinear):  # FourierFT's adapt and delta_weight (WAVEFT-4), its own dW
    def __init__(self, n: int, m: int, positions, s: float, wavelet_family: str = "db1", use_idwt: bool = True):
        self.shape, self.s = (m, n), s
        p = np.asarray(positions, np.int64)
        self.lo = REC_LO[wavelet_family] if use_idwt else None
        L = len(self.lo) if use_idwt else 2
        self.grid = (padded(m, L), padded(n, L)) if use_idwt else (m, n)
        flat = grid_positions(p, n, m, *self.grid) if use_idwt else p
        self.positions = (backend.asarray(flat, "int64"),)  # flat positions in M; a tuple: no parameter
        self.waveft_spectrum = trainable(backend.xp().zeros((len(p),), dtype=backend.dtype("float32")))

    @classmethod
    def create(cls, base, cfg: WaveFTConfig, path: str, rng, init_weights: bool = True):
        delta = cls(base.in_features, base.out_features, seeded_positions(base, cfg, path, "WaveFT"), cfg.scaling,
                    cfg.wavelet_family, cfg.use_idwt)
        if init_weights and not cfg.init_weights:  # WAVEFT-5
            delta.waveft_spectrum.data = rng.normal(delta.waveft_spectrum.shape, std=0.01)
        return delta

    def weight(self):  # WAVEFT-3: a Tensor (out, in)
        return CoefficientsToWeight.apply(self.waveft_spectrum, flat=self.positions[0], grid=self.grid, lo=self.lo,
                                          shape=self.shape, s=self.s)


register("waveft", WaveFTConfig, WaveFTLinear,
         paper="Exploring Sparsity for Parameter Efficient Fine Tuning Using Wavelets, 2025, "
               "arXiv:2505.12532",
         summary="WaveFT, dW = s IDWT2(S) with S sparse at n_frequency seeded positions (spec/waveft.md).")
