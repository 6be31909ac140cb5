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
Errors (WAVEFT-9): a wavelet_family other than db1..db10, sym2..sym10, coif1..coif4 (coif5: broken in PEFT);
    proportional_parameters not a bool; FourierFT's.
Budget (WAVEFT-10): proportional_parameters=True: n_f = max(1, round(in out / sum_T in out * n_frequency * T)).
PEFT parity: peft/tuners/waveft/layer.py WaveFTLayer.update_layer, get_delta_weight; waverec2d.py waverec2d.
Deviations: PEFT's coif4 table (not a coiflet) is kept as it is, for parity; coif5 is refused;
    c ~ N(0, 0.01^2) is drawn from minipeft's RNG, not torch's.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import backend
from ..autograd.function import Function
from ..nn.layers import Linear
from .base import check, trainable
from .fourierft import FourierFTConfig, FourierFTLinear, seeded_positions
from .registry import register

def daubechies(N: int, outside: str = "") -> tuple:
    """WAVEFT-3: a length-2N orthonormal low-pass filter with N vanishing moments, Daubechies' construction:
    lo ∝ (1 + z)^N Q(z), Q(z) Q(1/z) = z^(N-1) P((2 - z - 1/z) / 4), P(y) = sum_{k<N} C(N-1+k, k) y^k; scaled
    to sum sqrt(2). Q takes one root of each reciprocal pair: the roots inside the unit circle with Im >= 0,
    ordered by angle, form groups (a real root, or a conjugate pair); group i is taken outside (1/z) where
    outside[i] == "1", else inside. outside "" (all inside): db<N>, extremal phase. Host NumPy, at import."""
    poly, y_k, y = np.zeros(2 * N - 1), np.ones(1), np.array([-0.25, 0.5, -0.25])  # y_k: z^k y^k
    for k in range(N):
        poly[N - 1 - k:N + k] += math.comb(N - 1 + k, k) * y_k
        y_k = np.convolve(y_k, y)
    groups = sorted((z for z in (np.roots(poly) if N > 1 else ()) if abs(z) < 1 and z.imag >= -1e-12),
                    key=lambda z: (np.angle(z), abs(z)))
    roots = []
    for i, z in enumerate(groups):
        z = 1 / z if outside[i:i + 1] == "1" else z
        roots += [z.real] if abs(z.imag) < 1e-9 else [z, np.conj(z)]
    lo = np.real(np.convolve(np.poly(roots), [math.comb(N, i) for i in range(N + 1)]))
    return tuple(float(v) for v in lo * math.sqrt(2) / lo.sum())


# Symlets: Daubechies' filters of the same |Q|^2, another root choice (the near-linear-phase one of
# PyWavelets / PEFT; no simple phase criterion picks all nine, so the choice is recorded per N and
# tests/adapters/test_waveft.py checks each filter against PEFT's to 1e-10).
SYMLET_OUTSIDE = {2: "0", 3: "0", 4: "01", 5: "10", 6: "101", 7: "100", 8: "0101", 9: "0110", 10: "10101"}
# Coiflets coif1..coif3: the length-6K filters with sum sqrt(2), sum_k h_k h_(k+2m) = delta_m, scaling moments
# sum_k (k - 2K)^j h_k = 0 (j = 1..2K-1) and wavelet moments sum_k (-1)^k (k - 2K)^j h_k = 0 (j = 0..2K-1):
# the solution that Levenberg-Marquardt reaches from h = sqrt(2) delta_(2K) (the test re-solves it and checks
# these numbers and PEFT's). coif4 is PEFT's table as it is: it is not a coiflet (its taps sum to 1.4485, not
# sqrt(2), and it is not orthonormal), kept for parity with PEFT's folders (WAVEFT-3, deviations).
COIFLETS = {
    "coif1": (
        -0.07273261951252646, 0.33789766245748176, 0.8525720202116005, 0.3848648468648578,
        -0.07273261951252646, -0.015655728135791993,
    ),
    "coif2": (
        0.01638733646320364, -0.04146493678687178, -0.0673725547237256, 0.38611006682276283,
        0.8127236354494135, 0.41700518442323903, -0.07648859907828076, -0.059434418646431064,
        0.02368017194684776, 0.005611434819368828, -0.001823208870911029, -0.0007205494455203461,
    ),
    "coif3": (
        -0.003793512864447644, 0.007782596425789666, 0.023452696142416303, -0.06577191128215813,
        -0.06112339000360421, 0.4051769024107983, 0.7937772226264986, 0.4284834763752059,
        -0.07179982161892719, -0.08230192710475823, 0.03455502757278084, 0.01588054486310201,
        -0.009007976136434087, -0.0025745176880534746, 0.0011175187707719689, 0.00046621695981598904,
        -7.098330250692245e-05, -3.459977319441197e-05,
    ),
    "coif4": (
        0.000892313902537003, -0.001629492425226786, -0.007346167936268051, 0.016066782559655206,
        0.026792362270697267, -0.07314290441258073, -0.04877076756791383, 0.42747788393337943,
        0.7842491699914577, 0.4354613422154989, -0.0615536584279808, -0.09176542029839818,
        0.02811565972369683, 0.024945239305530328, -0.010417174666056649, -0.0032702731315608483,
        0.0020166775120449105, 0.0006600112966963782, -0.00017960623150243602, -0.0001598819866911797,
        4.3110389559021745e-05, 1.791447688858775e-05, -2.2414246658720156e-06, -1.5895026298510706e-06,
    ),
}

REC_LO = {f"db{N}": daubechies(N) for N in range(1, 11)}
REC_LO.update({f"sym{N}": daubechies(N, outside) for N, outside in SYMLET_OUTSIDE.items()})
REC_LO.update(COIFLETS)
# PEFT's WAVELET_REDUCTIONS: the grid padding, len(lo) - 2 for every family here (PEFT's coif5, 48 taps against a
# padding of 28, fails in PEFT's own forward and is refused).
REFUSED = {"coif5": "PEFT 0.21.2's coif5 table has 48 taps against its padding of 28, and its forward fails"}


@dataclasses.dataclass
class WaveFTConfig(FourierFTConfig):
    n_frequency: int = 2592  # trained wavelet coefficients per layer
    scaling: float = 25.0
    wavelet_family: str = "db1"  # db1 (Haar) .. db10, sym2 .. sym10, coif1 .. coif4
    use_idwt: bool = True  # False: dW = s S, the coefficients used as a sparse weight
    random_loc_seed: int = 777
    init_weights: bool = True  # True: c = 0 (PEFT's default); False: c ~ N(0, 0.01^2)
    proportional_parameters: bool = False  # True: n_f proportional to in * out, n_frequency on average (WAVEFT-10)
    bias: str = "none"  # "none" | "all" | "waveft_only"

    peft_type = "WAVEFT"
    BIASES = ("none", "all", "waveft_only")
    PEFT_FIELDS = {f: f for f in ("n_frequency", "scaling", "wavelet_family", "use_idwt", "random_loc_seed",
                                  "n_frequency_pattern", "init_weights", "proportional_parameters", "bias")}
    INIT_MOVES_OUTPUT = None

    def validate(self):
        super().validate()
        check(self.wavelet_family not in REFUSED, "wavelet_family", self.wavelet_family,
              f"is not supported: {REFUSED.get(self.wavelet_family)}; use coif4 or another family")
        check(self.wavelet_family in REC_LO, "wavelet_family", self.wavelet_family, f"supported: {', '.join(REC_LO)}")
        check(isinstance(self.proportional_parameters, bool), "proportional_parameters",
              self.proportional_parameters, "must be True or False")

    def n_frequency_all(self, shapes: dict) -> dict:
        """WAVEFT-10: n_f of each targeted layer {path: (in, out)}: n_frequency_for(path), or under
        proportional_parameters PEFT's share max(1, round(in out / sum(in out) * n_frequency * layers))
        (Python's round, ties to even), n_frequency_pattern then unused (as PEFT)."""
        if not self.proportional_parameters:
            return {p: self.n_frequency_for(p) for p in shapes}
        total, budget = sum(n * m for n, m in shapes.values()), self.n_frequency * len(shapes)
        return {p: max(1, round((n * m) / total * budget)) for p, (n, m) in shapes.items()}


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
    def create_all(cls, bases: dict, cfg: WaveFTConfig, rng, init_weights: bool = True):
        n_f = cfg.n_frequency_all({p: (b.in_features, b.out_features) for p, b in bases.items()
                                   if isinstance(b, Linear)})  # WAVEFT-10; the others: seeded_positions refuses
        return {p: cls.create(b, cfg, p, rng, init_weights, n_f.get(p)) for p, b in bases.items()}, {}

    @classmethod
    def create(cls, base, cfg: WaveFTConfig, path: str, rng, init_weights: bool = True, n_f: int | None = None):
        delta = cls(base.in_features, base.out_features, seeded_positions(base, cfg, path, "WaveFT", n_f),
                    cfg.scaling, cfg.wavelet_family, cfg.use_idwt)
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
