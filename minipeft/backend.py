"""The array shim: the one place in minipeft that knows NumPy from CuPy (spec/backend.md).

Everything else calls array-API functions on a namespace `xp`, derived from the arrays at hand
with `xp_of(*arrays)` (new arrays are made with `xp()`, the namespace of the chosen backend).
What the array API standard lacks lives here, once per backend:

- scatter_add  (embedding gradients)          BACKEND-3
- erf          (exact GELU)                   BACKEND-4
- bf16 <-> f32 on the bit pattern             BACKEND-5 (CuPy has no bfloat16 dtype)
- random numbers (explicit, seeded, host side) BACKEND-6
- the FFT extension, in the input's precision  BACKEND-10
- torch.randperm's seeded stream (host side)   BACKEND-11
- host transfer (to_host / asarray)           BACKEND-2
- the host allocator (glibc malloc tuning)    BACKEND-7

Backends: "numpy" (CPU), "cupy" (NVIDIA GPU) and "array_api_strict" (a CPU guard in the tests:
code that only NumPy accepts fails there). The one global is the backend name, chosen with
`set_backend` or the environment variable MINIPEFT_BACKEND, and read when arrays are created.
"""
from __future__ import annotations

import importlib
import os

import numpy as np

from .errors import BackendError

BACKENDS = ("numpy", "cupy", "array_api_strict")
_name = os.environ.get("MINIPEFT_BACKEND", "numpy")

# BACKEND-7: glibc's mallopt parameters (malloc.h) and the values minipeft sets
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOPT = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: -1, _M_TOP_PAD: 64 << 20}  # -1: never trim


def _glibc():
    """The C library, for mallopt and malloc_trim (OSError where there is no glibc)."""
    import ctypes
    return ctypes.CDLL("libc.so.6")


def tune_host_allocator() -> str:
    """Keep freed NumPy buffers in the heap for reuse instead of returning them to the OS (BACKEND-7).

    A training step allocates the same activation and gradient buffers again every step. By default
    glibc serves each one above 128 KiB with a fresh mmap and returns it with munmap on free, so
    every step page-faults all its buffers in again, zero-filled by the kernel; on a busy virtual
    machine that cost 2.7x the CPU time of a whole LoRA step. Buffers under 32 MiB now come from
    the heap, and freed heap is kept however large it grew: a bound (512 MiB before) only moved the
    faults to bigger steps (the medium llama step of bench_step frees about 540 MiB, and took
    80,000 faults a step). `release_host_memory()` gives it back; `train` calls it at the end.
    Set MINIPEFT_MALLOC_TUNING=0 to leave malloc alone. Returns what was done, also kept in
    HOST_ALLOCATOR."""
    if os.environ.get("MINIPEFT_MALLOC_TUNING", "1") == "0":
        return "untouched (MINIPEFT_MALLOC_TUNING=0)"
    try:
        ok = all(_glibc().mallopt(param, value) == 1 for param, value in _MALLOPT.items())
    except (OSError, AttributeError):
        return "untouched (no glibc)"
    return "glibc: mmap threshold 32 MiB, no trimming, top pad 64 MiB" if ok else "untouched (mallopt refused)"


HOST_ALLOCATOR = tune_host_allocator()


def release_host_memory() -> bool:
    """Return the freed heap that BACKEND-7 keeps to the OS (glibc malloc_trim); True if any was.
    Nothing to do (False) with the tuning off or without glibc."""
    return HOST_ALLOCATOR.startswith("glibc:") and bool(_glibc().malloc_trim(0))


def set_backend(name: str) -> None:
    """Choose where new arrays live: "numpy", "cupy" or "array_api_strict"."""
    global _name
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _module(name)  # fail now, not at the first array, when the library is missing
    _name = name


def get_backend() -> str:
    return _name


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        hint = {"cupy": "pip install 'minipeft[cuda12]'", "array_api_strict": "pip install array-api-strict"}
        raise BackendError(f"backend {name!r} is not installed ({e}); {hint.get(name, '')}") from e


def xp():
    """The namespace of the chosen backend, for creating arrays."""
    if _name not in BACKENDS:
        raise BackendError(f"MINIPEFT_BACKEND={_name!r} is not one of {', '.join(BACKENDS)}")
    return _module(_name)


def xp_of(*arrays):
    """The namespace the arrays belong to (array_namespace style); the chosen one if none is an array."""
    for a in arrays:
        mod = _kind(a)
        if mod == "cupy" and type(a).__name__ == "ndarray":  # CuPy 14's ndarray has no __array_namespace__
            return _module("cupy")
        if hasattr(a, "__array_namespace__"):
            return np if mod == "numpy" else a.__array_namespace__()
    return xp()


def _kind(a) -> str:
    return type(a).__module__.split(".")[0]


# ---- host transfer (BACKEND-2) -------------------------------------------------------------
def to_host(a) -> np.ndarray:
    """A NumPy copy (or view) of any backend's array."""
    kind = _kind(a)
    if kind == "numpy":
        return a
    if kind == "cupy":
        return a.get()
    return np.asarray(a)  # array_api_strict supports the buffer protocol via __array__/__dlpack__


def asarray(host, dtype: str | None = None):
    """Put a host (NumPy) array on the chosen backend, optionally cast to dtype (a name)."""
    ns = xp()
    host = np.asarray(host)
    if dtype is not None:
        host = host.astype(dtype, copy=False)
    if ns is np:
        return host
    return ns.asarray(host)


def dtype(name: str, ns=None):
    """The backend dtype object for a name such as "float32"."""
    ns = ns or xp()
    try:
        return getattr(ns, name)
    except AttributeError:
        raise BackendError(f"dtype {name!r} is not available on backend {ns.__name__}") from None


def dtype_name(a) -> str:
    return str(a.dtype).replace("array_api_strict.", "")


def argsort_stable(a, axis: int = -1):
    """Indices that sort a ascending along axis, equal entries kept in index order. CuPy's argsort is always
    stable and takes no `stable` keyword; NumPy and the array API take stable=True."""
    if _kind(a) == "cupy":
        return _module("cupy").argsort(a, axis=axis)
    return xp_of(a).argsort(a, axis=axis, stable=True)


# ---- scatter-add (BACKEND-3) ---------------------------------------------------------------
def scatter_add(target, indices, values):
    """target[indices[i]] += values[i] along axis 0, repeated indices accumulating. Returns target."""
    kind = _kind(target)
    if kind == "numpy":
        np.add.at(target, indices, values)
        return target
    if kind == "cupy":
        _module("cupyx").scatter_add(target, indices, values)
        return target
    # array_api_strict: a one-hot matmul, (V, N) @ (N, D), exact for float sums of few terms.
    ns = xp_of(target)
    onehot = ns.astype(ns.arange(target.shape[0])[:, None] == indices[None, :], target.dtype)  # (V, N)
    return target + onehot @ values


# ---- erf (BACKEND-4) -----------------------------------------------------------------------
def erf(x):
    """The error function, elementwise. CuPy: its own erf. NumPy and the strict guard: the
    Maclaurin series for |x| < 2 and the continued fraction of erfc for |x| >= 2 (both to
    float64 rounding, |error| < 1e-13)."""
    if _kind(x) == "cupy":
        return _module("cupyx.scipy.special").erf(x)
    ns = xp_of(x)
    a = ns.abs(x)
    sa = ns.where(a < 2.0, a, 0.0)  # keep the series away from large a, where it overflows
    s, term = ns.zeros_like(a), sa
    for n in range(64):  # erf(a) = 2/sqrt(pi) * sum_n (-1)^n a^(2n+1) / (n! (2n+1))
        s = s + term / (2 * n + 1)
        term = -term * sa * sa / (n + 1)
    series = s * (2.0 / 1.7724538509055159)
    big = ns.where(a < 2.0, 2.0, ns.where(a > 10.0, 10.0, a))  # erf(10) = 1 in float64
    k = big
    for n in range(60, 0, -1):  # erfc(a) = exp(-a^2)/sqrt(pi) / (a + (1/2)/(a + 1/(a + (3/2)/(a + ...))))
        k = big + (n / 2) / k
    tail = 1.0 - ns.exp(-big * big) / (1.7724538509055159 * k)
    return ns.sign(x) * ns.where(a < 2.0, series, tail)


# ---- bfloat16 on the bit pattern (BACKEND-5) -----------------------------------------------
def bitcast(a, to_name: str):
    """The bytes of a read as dtype `to_name` (the last axis scales by the size ratio), no copy
    on NumPy and CuPy (BACKEND-8)."""
    kind = _kind(a)
    if kind in ("numpy", "cupy"):
        return a.view(to_name)
    ns = xp_of(a)
    return ns.asarray(np.asarray(a).view(to_name))


def bf16_bits_from_float32(x):
    """Round float32 to bfloat16, nearest-even, as uint16 bit patterns (NaN stays NaN)."""
    ns = xp_of(x)
    bits = bitcast(ns.astype(x, ns.float32), "uint32")
    lsb = (bits >> 16) & 1
    rounded = (bits + 0x7FFF + lsb) >> 16
    nan = ns.isnan(x)
    rounded = ns.where(nan, (bits >> 16) | 0x40, rounded)  # keep a quiet NaN
    return ns.astype(rounded, ns.uint16)


def float32_from_bf16_bits(bits):
    """The float32 value of uint16 bfloat16 bit patterns (exact)."""
    ns = xp_of(bits)
    return bitcast(ns.astype(bits, ns.uint32) << 16, "float32")


def round_to_bf16(x):
    """float32 -> nearest bfloat16 value, kept in float32."""
    return float32_from_bf16_bits(bf16_bits_from_float32(x))


def chunk_length(a, host: int) -> int:
    """How many elements of `a` a memory-bound loop takes per step (BACKEND-8): `host` on the CPU,
    so that each step's temporaries stay in cache; all of `a` on a GPU, where one kernel over the
    whole array beats a Python loop of small launches."""
    return max(a.shape[0], 1) if _kind(a) == "cupy" else host


def host_threads() -> int:
    """Threads a host loop may use (BACKEND-9): MINIPEFT_NUM_THREADS, else OMP_NUM_THREADS, else the
    cores this process may run on."""
    for var in ("MINIPEFT_NUM_THREADS", "OMP_NUM_THREADS"):
        v = os.environ.get(var, "")
        if v.isdigit() and int(v) > 0:
            return int(v)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_POOLS: dict = {}  # thread count -> the executor of map_chunks (made once, reused)


def _openblas():
    """NumPy's OpenBLAS (a ctypes handle to the copy this process has loaded), or None where NumPy uses
    another BLAS (MKL, Accelerate)."""
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return None
    for path in paths:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def _openblas_symbol(lib, *names):
    for name in names:
        fn = getattr(lib, name, None)
        if fn is not None:
            return fn
    return None


def host_blas() -> str:
    """The BLAS under NumPy, for benchmark records: OpenBLAS's configuration and the kernel it chose
    for this CPU, or NumPy's own account of its BLAS."""
    import ctypes
    lib = _openblas()
    config = lib and _openblas_symbol(lib, "scipy_openblas_get_config64_", "scipy_openblas_get_config",
                                      "openblas_get_config64_", "openblas_get_config")
    core = lib and _openblas_symbol(lib, "scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                                    "openblas_get_corename64_", "openblas_get_corename")
    if config is not None and core is not None:
        config.restype = core.restype = ctypes.c_char_p
        return f"{config().decode().strip()} (kernel {core().decode()})"
    blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
    return f"{blas.get('name', 'unknown BLAS')} {blas.get('version', '')}".strip()




def map_chunks(fn, starts, a) -> None:
    """fn(start) for every start (BACKEND-9). On NumPy arrays, over a pool of host_threads() threads:
    NumPy releases the GIL in take and in ufunc loops, so chunks that write disjoint slices run on
    several cores; elsewhere (CuPy, the strict guard) one after the other. Either way the same values."""
    starts = list(starts)
    k = min(host_threads(), len(starts))
    if _kind(a) != "numpy" or k <= 1:
        for s in starts:
            fn(s)
        return
    if k not in _POOLS:
        from concurrent.futures import ThreadPoolExecutor
        _POOLS[k] = ThreadPoolExecutor(k, thread_name_prefix="minipeft")
    for _ in _POOLS[k].map(fn, starts):  # re-raises a chunk's exception here
        pass


def multiply_into(out, start: int, x, y) -> None:
    """out[start : start + size] = reshape(x * y, (-1,)) for a 1-D out (BACKEND-9): NumPy writes the
    product straight into out (no temporary); other libraries assign it."""
    n = 1
    for d in x.shape:
        n *= d
    if _kind(out) == "numpy":
        np.multiply(x, y, out=out[start:start + n].reshape(x.shape))
    else:
        out[start:start + n] = xp_of(out).reshape(x * y, (-1,))


# ---- the array API's FFT extension (BACKEND-10) ------------------------------------------
def _fft(a):
    """The fft namespace of a's library (numpy.fft, cupy.fft, array_api_strict.fft, the standard's
    extension) and the complex and real dtypes of a's precision (NumPy before 2.0 returns float32
    transforms as complex128: the result is cast back)."""
    xp = xp_of(a)
    single = a.dtype in (xp.float32, xp.complex64)
    return xp, xp.fft, (xp.complex64 if single else xp.complex128), (xp.float32 if single else xp.float64)


def ifft2_real(a):
    """Re(IDFT2(a)) over the last two axes of a real array, in a's precision:
    out[.., p, q] = 1/(M N) sum_{u,v} a[.., u, v] cos(2 pi (p u / M + q v / N))."""
    xp, fft, cdtype, rdtype = _fft(a)
    return xp.astype(xp.real(fft.ifftn(xp.astype(a, cdtype), axes=(-2, -1))), rdtype)


def fft_last(a, inverse: bool = False):
    """The DFT (inverse=True: the inverse DFT, with its 1/n) over the last axis of a real or complex array, as a
    complex array of a's precision (spec/c3a.md C3A-2 applies its block-circulant kernels with it)."""
    xp, fft, cdtype, _ = _fft(a)
    return xp.astype((fft.ifft if inverse else fft.fft)(xp.astype(a, cdtype), axis=-1), cdtype)


def real_part(a):
    """Re(a) of a complex array, as a real array of a's precision."""
    xp, _, _, rdtype = _fft(a)
    return xp.astype(xp.real(a), rdtype)


# ---- random numbers (BACKEND-6) ------------------------------------------------------------
class RNG:
    """Seeded random numbers, drawn on the host with NumPy's PCG64 and moved to the backend, so
    the same seed gives the same numbers on every backend. Its state can be saved and restored."""

    def __init__(self, seed: int = 0):
        self.gen = np.random.default_rng(seed)

    def normal(self, shape, std: float = 1.0, dtype: str = "float32"):
        return asarray(self.gen.standard_normal(shape) * std, dtype)

    def uniform(self, shape, low: float, high: float, dtype: str = "float32"):
        return asarray(self.gen.uniform(low, high, shape), dtype)

    def keep_mask(self, shape, p_drop: float, dtype: str = "float32"):
        """A dropout mask: 1/(1-p) where kept, 0 where dropped."""
        keep = self.gen.random(shape) >= p_drop
        return asarray(keep / (1.0 - p_drop), dtype)

    def permutation(self, n: int) -> np.ndarray:
        return self.gen.permutation(n)

    def integer(self, low: int, high: int) -> int:
        """One integer drawn uniformly from {low, ..., high} (both ends included)."""
        return int(self.gen.integers(low, high, endpoint=True))

    def get_state(self) -> dict:
        return self.gen.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.gen.bit_generator.state = state


# ---- torch's seeded permutation (BACKEND-11) -----------------------------------------------
TORCH_RANDPERM_SMALL = (2**32 - 1) // 20  # below this n torch.randperm takes the shuffle rebuilt here


def torch_mt19937_outputs(seed: int, k: int) -> np.ndarray:
    """The first k 32-bit outputs (uint64 array, host) of torch.Generator().manual_seed(seed) on the CPU: MT19937
    seeded with the seed's low 32 bits (init_genrand, as NumPy's legacy RandomState)."""
    key, pos = np.random.RandomState(seed & 0xFFFFFFFF).get_state()[1:3]
    bits = np.random.MT19937()
    bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": pos}}
    return bits.random_raw(k).astype(np.uint64)


def torch_normal(shape, std: float, seed: int) -> np.ndarray:
    """torch.normal(0, std, size=shape, generator=torch.Generator().manual_seed(seed)) on the CPU, float32, host,
    without torch (spec/tinylora.md TINYLORA-3). n = prod(shape) >= 16: n uniforms f = (out & (2^24 - 1)) / 2^24,
    each block of 16 made normal by Box-Muller (z_j = sqrt(-2 log(1 - f_j)) cos(2 pi f_{j+8}) and sin for z_{j+8},
    j < 8), a last partial block redrawn as 16 fresh uniforms over the final 16 places (torch's normal_fill; its
    AVX2 log and sincos round to within a few float32 ulps of these); n < 16: one double normal per entry, u1, u2
    from two 64-bit draws (hi << 32 | lo) & (2^53 - 1) / 2^53, z = sqrt(-2 log1p(-u2)) cos(2 pi u1), then the
    cached sin(...) for the next entry (normal_distribution<double>)."""
    n = int(np.prod(shape))

    def box_muller(f):  # (blocks, 16) uniforms -> normals
        radius, theta = np.sqrt(-2.0 * np.log(1.0 - f[:, :8])), 2.0 * np.pi * f[:, 8:]
        return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1)

    if n >= 16:
        u = torch_mt19937_outputs(seed, n + (16 if n % 16 else 0))
        f = (u & np.uint64(2**24 - 1)).astype(np.float64) * 2.0**-24  # exact float32 uniforms in [0, 1)
        out = np.empty(n)
        whole = n - n % 16
        out[:whole] = box_muller(f[:whole].reshape(-1, 16)).reshape(-1)
        if n % 16:
            out[n - 16:] = box_muller(f[n:].reshape(1, 16))[0]
        return (out * std).reshape(shape).astype(np.float32)
    u = torch_mt19937_outputs(seed, 4 * ((n + 1) // 2)).reshape(-1, 2, 2)  # (pairs, (u1, u2), (hi, lo))
    bits = (u[..., 0] << np.uint64(32) | u[..., 1]) & np.uint64(2**53 - 1)
    u1, u2 = (bits.astype(np.float64) * 2.0**-53).T
    r, theta = np.sqrt(-2.0 * np.log1p(-u2)), 2.0 * np.pi * u1
    z = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1).reshape(-1)[:n]
    return (z * std).reshape(shape).astype(np.float32)


def torch_randperm_prefix(n: int, k: int, seed: int, skip: int = 0) -> np.ndarray:
    """The first k entries of torch.randperm(n, generator=torch.Generator().manual_seed(seed)) on the
    CPU, without torch (int64, host). torch's CPU generator is MT19937 seeded with the low 32 bits of
    the seed (init_genrand, as NumPy's legacy RandomState); for n < TORCH_RANDPERM_SMALL its randperm
    is the forward Fisher-Yates shuffle: for i = 0 .. n-2, z = u_i mod (n - i) with u_i its next
    32-bit output, swap r[i] and r[i + z]. Entry i is final after step i, so k steps suffice, kept in
    a dict of the positions moved (O(k) memory for any n). skip: the generator's outputs used before (randperm(n')
    on the same generator takes n' - 1), as for FRoD's per-category draws (FROD-4)."""
    if not 0 <= k <= n < TORCH_RANDPERM_SMALL:
        raise BackendError(f"torch_randperm_prefix: need 0 <= k <= n < {TORCH_RANDPERM_SMALL} (got k={k}, n={n}); "
                           "above that torch.randperm uses another shuffle")
    u = torch_mt19937_outputs(seed, skip + k)[skip:]  # (k,)
    moved, out = {}, np.empty(k, dtype=np.int64)
    for i in range(k):
        j = i + int(u[i]) % (n - i)
        out[i], moved[j] = moved.get(j, j), moved.get(i, i)
    return out
