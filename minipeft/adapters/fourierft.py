"""FourierFT: Parameter-Efficient Fine-Tuning with Discrete Fourier Transform (Gao et al. 2024,
arXiv:2405.03003), spec/fourierft.md.

Symbols: W0 (out, in) frozen base weight, x (..., in); n_f = n_frequency (n_frequency_pattern per layer);
    c (n_f,) the trained spectral coefficients (PEFT's fourierft_spectrum); (u_k, v_k) their fixed
    positions in the out x in spectrum; s the scaling.
Positions (FOURIERFT-1): p = the first n_f entries of torch.randperm(out * in) seeded with random_loc_seed
    (backend.torch_randperm_prefix, torch's stream rebuilt without torch); u_k = p_k // in, v_k = p_k % in.
    The same seed gives every layer of one shape the same positions. Not saved: rebuilt on load, as PEFT does.
Delta weight (FOURIERFT-2): S (out, in) = 0 except S[u_k, v_k] = c_k; dW = s Re(IDFT2(S)),
    dW[a, b] = s / (out in) sum_k c_k cos(2 pi (a u_k / out + b v_k / in)).
Forward (FOURIERFT-3): h = W0 x + b + dW x, dW materialised each call (as PEFT).
Init (FOURIERFT-4): init_weights=False (PEFT's default): c ~ N(0, 1), so the output moves at step 0;
    init_weights=True: c = 0, h = W0 x + b.
Merge (FOURIERFT-5): W <- W0 + dW (dW^T for the gpt2 Conv1D layout); unmerge subtracts it.
Gradients (FOURIERFT-6): dW is linear in c and Re IDFT2 is its own adjoint, so with G = dL/d(dW):
    dL/dc_k = s Re(IDFT2(G))[u_k, v_k] (the op SpectrumToWeight). n_f trained numbers per layer.
Serialization (FOURIERFT-7): peft_type "FOURIERFT"; key <layer>.fourierft_spectrum (n_f,); config
    n_frequency, scaling, random_loc_seed, n_frequency_pattern, init_weights, bias.
Errors (FOURIERFT-8): n_f > in * out of a target, a non-positive n_frequency, a seed outside [0, 2**64).
PEFT parity: peft/tuners/fourierft/layer.py FourierFTLayer.update_layer (randperm, // and % in_features),
    get_delta_weight (ifft2(dense).real * scaling), FourierFTLinear.forward.
Deviations: c ~ N(0, 1) is drawn from minipeft's RNG, not torch's global one (a file carries c).
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..autograd import functional as F
from ..autograd.function import Function, no_grad
from ..nn.layers import Linear
from .base import AdapterConfig, Delta, check, trainable
from .lora import _first_match
from .registry import register


@dataclasses.dataclass
class FourierFTConfig(AdapterConfig):
    n_frequency: int = 1000  # trained spectral coefficients per layer
    scaling: float = 150.0
    random_loc_seed: int = 777  # seed of the positions (torch's randperm stream)
    n_frequency_pattern: dict = dataclasses.field(default_factory=dict)  # module name/regex -> n_frequency
    init_weights: bool = False  # False: c ~ N(0, 1) (PEFT's default); True: c = 0
    fan_in_fan_out: bool = False  # accepted for PEFT's sake: each layer's own storage decides
    bias: str = "none"  # "none" | "all" | "fourier_only"

    peft_type = "FOURIERFT"
    BIASES = ("none", "all", "fourier_only")
    PEFT_FIELDS = {f: f for f in ("n_frequency", "scaling", "random_loc_seed", "n_frequency_pattern",
                                  "init_weights", "bias")}
    INIT_MOVES_OUTPUT = "PEFT's default init_weights=False draws the spectrum from N(0, 1) (FOURIERFT-4)"

    def validate(self):
        check(isinstance(self.n_frequency, int) and not isinstance(self.n_frequency, bool) and self.n_frequency > 0,
              "n_frequency", self.n_frequency, "must be a positive integer")
        for k, v in self.n_frequency_pattern.items():
            check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"n_frequency_pattern[{k!r}]", v,
                  "must be a positive integer")
        check(isinstance(self.random_loc_seed, int) and 0 <= self.random_loc_seed < 2**64, "random_loc_seed", self.random_loc_seed,
              "must be an integer in [0, 2**64) (torch.Generator.manual_seed's range)")
        check(self.bias in self.BIASES, "bias", self.bias, "use one of " + ", ".join(map(repr, self.BIASES)))
        check(self.layers_pattern is None or self.layers_to_transform is not None, "layers_pattern",
              self.layers_pattern, "needs layers_to_transform (PEFT's rule)")

    def n_frequency_for(self, path: str) -> int:
        """n_f of one module: the first n_frequency_pattern key matching `(.*\\.)?(key)$` (LoRA's rule)."""
        return _first_match(self.n_frequency_pattern, path, self.n_frequency)

    def trainable_count(self, layers: dict, mc) -> int:
        """FOURIERFT-6: n_f coefficients per layer."""
        return sum(self.n_frequency_for(p) for p in layers)


def seeded_positions(base, cfg, path: str, method: str, n_f: int | None = None):
    """FOURIERFT-1 (WAVEFT-1 too): the first n_f entries of torch.randperm(out * in) seeded with random_loc_seed,
    flat p_k = u_k in + v_k, after the checks both methods share (a float Linear base, n_f <= in * out).
    n_f None: cfg.n_frequency_for(path)."""
    check(isinstance(base, Linear), f"target_modules (for {path})", type(base).__name__,
          f"{method} needs a float Linear (or gpt2 Conv1D) base")
    n, m = base.in_features, base.out_features
    n_f = cfg.n_frequency_for(path) if n_f is None else n_f
    check(n_f <= n * m, "n_frequency", n_f, f"must be <= in * out = {n * m} of {path} ({n} -> {m}); lower it "
          f"or set n_frequency_pattern for that layer")
    check(n * m < backend.TORCH_RANDPERM_SMALL, f"target_modules (for {path})", (n, m),
          f"in * out must be < {backend.TORCH_RANDPERM_SMALL}: torch.randperm shuffles larger ranges another way")
    return backend.torch_randperm_prefix(n * m, n_f, cfg.random_loc_seed)


class SpectrumToWeight(Function):
    """dW = s Re(IDFT2(S)) with S (out, in) zero but S.flat[flat] = c (FOURIERFT-2); backward (FOURIERFT-6):
    dc = s Re(IDFT2(G)).flat[flat], Re IDFT2 being self-adjoint on real arrays."""

    def forward(self, c, flat, shape, s):
        xp = backend.xp_of(c)
        self.flat, self.s = flat, s
        S = backend.scatter_add(xp.zeros((shape[0] * shape[1],), dtype=c.dtype), flat, c)  # (out * in,)
        return backend.ifft2_real(xp.reshape(S, shape)) * s  # (out, in)

    def backward(self, g):
        xp = backend.xp_of(g)
        return (xp.take(xp.reshape(backend.ifft2_real(g), (-1,)), self.flat) * self.s,)  # (n_f,)


class FourierFTLinear(Delta):
    def __init__(self, n: int, m: int, positions, s: float):
        self.shape, self.s = (m, n), s
        self.positions = (backend.asarray(positions, "int64"),)  # flat p_k = u_k in + v_k; a tuple: no parameter
        self.fourierft_spectrum = trainable(backend.xp().zeros((len(positions),), dtype=backend.dtype("float32")))

    @classmethod
    def create(cls, base, cfg: FourierFTConfig, path: str, rng, init_weights: bool = True):
        delta = cls(base.in_features, base.out_features, seeded_positions(base, cfg, path, "FourierFT"), cfg.scaling)
        if init_weights and not cfg.init_weights:  # FOURIERFT-4
            delta.fourierft_spectrum.data = rng.normal(delta.fourierft_spectrum.shape)
        return delta

    def weight(self):  # FOURIERFT-2: a Tensor (out, in)
        return SpectrumToWeight.apply(self.fourierft_spectrum, flat=self.positions[0], shape=self.shape, s=self.s)

    def adapt(self, x, y, base):  # FOURIERFT-3
        return y + F.linear(x, self.weight())

    def delta_weight(self):
        with no_grad():
            return self.weight().data


register("fourierft", FourierFTConfig, FourierFTLinear,
         paper="Parameter-Efficient Fine-Tuning with Discrete Fourier Transform, Gao et al. 2024, arXiv:2405.03003",
         summary="FourierFT, dW = s Re(IDFT2(S)) with S sparse at n_frequency seeded positions (spec/fourierft.md).")
