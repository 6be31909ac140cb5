"""spec/backend.md: backend choice and namespace derivation, host transfer, scatter-add, erf,
bfloat16 rounding on the bit pattern (vs ml_dtypes and torch) and the seeded RNG, on NumPy and the
array_api_strict guard (fixture `any_backend`)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minipeft import backend
from minipeft.autograd import Tensor
from minipeft.errors import BackendError

ROOT = Path(__file__).resolve().parents[1]


def kind(a) -> str:
    return type(a).__module__.split(".")[0]


# ---- BACKEND-1 ---------------------------------------------------------------------------------
@pytest.mark.spec("BACKEND-1")
def test_set_backend_rejects_unknown_names_and_keeps_the_choice():
    before = backend.get_backend()
    with pytest.raises(BackendError, match="numpy, cupy, array_api_strict"):
        backend.set_backend("jax")
    assert backend.get_backend() == before
    if importlib.util.find_spec("cupy") is None:
        with pytest.raises(BackendError, match="pip install"):
            backend.set_backend("cupy")
        assert backend.get_backend() == before


@pytest.mark.spec("BACKEND-1")
def test_namespace_comes_from_the_inputs(any_backend):
    made = backend.asarray(np.arange(3.0))
    assert kind(made) == any_backend and kind(Tensor([1.0, 2.0]).data) == any_backend
    assert backend.dtype_name(Tensor([1.0]).data) == "float32"  # host data defaults to float32
    host = np.arange(3.0)
    assert backend.xp_of(host) is np  # a numpy array stays numpy whatever the choice
    assert backend.xp_of(2.0, None, made) is backend.xp_of(made)  # non-arrays are skipped
    assert backend.xp_of() is backend.xp() and backend.xp_of(1.0) is backend.xp()
    t = Tensor(host) * 2.0  # ops follow their inputs, not the global
    assert kind(t.data) == "numpy"


_PROBE = """
import importlib, json, pkgutil, sys
tried = []
class Watch:  # records every attempt to import cupy, even where cupy is not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("cupy", "cupyx"):
            tried.append(name)
        return None
sys.meta_path.insert(0, Watch())
import minipeft
failed = {}
for m in pkgutil.walk_packages(minipeft.__path__, "minipeft."):
    try:
        importlib.import_module(m.name)
    except Exception as e:  # another module's missing optional dependency is not this test's business
        failed[m.name] = repr(e)
from minipeft import backend
from minipeft.autograd import Tensor, functional as F
x = Tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
F.cross_entropy(F.linear(x, x), backend.asarray([0, 1], "int64")).backward()
print(json.dumps({"tried": tried, "failed": failed, "backend": backend.get_backend(),
                  "kind": type(x.grad).__module__.split(".")[0]}))
"""


def run_probe(env_backend=None):
    env = {k: v for k, v in os.environ.items() if k != "MINIPEFT_BACKEND"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if env_backend:
        env["MINIPEFT_BACKEND"] = env_backend
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.spec("BACKEND-1")
def test_importing_minipeft_never_imports_cupy():
    res = run_probe()
    assert res["tried"] == [], f"modules tried to import cupy: {res['tried']} (import errors: {res['failed']})"
    assert res["backend"] == "numpy" and res["kind"] == "numpy"


@pytest.mark.spec("BACKEND-1")
def test_environment_variable_chooses_the_backend():
    pytest.importorskip("array_api_strict")
    res = run_probe("array_api_strict")
    assert res["backend"] == "array_api_strict" and res["kind"] == "array_api_strict" and res["tried"] == []


# ---- BACKEND-2 ---------------------------------------------------------------------------------
@pytest.mark.spec("BACKEND-2")
@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "uint16", "uint32"])
def test_host_round_trip_is_bit_exact(any_backend, dtype):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, 5)) * 1e3
    if dtype.startswith("u"):
        h = np.abs(h)
    dev = backend.asarray(h, dtype)
    assert kind(dev) == any_backend and backend.dtype_name(dev) == dtype
    back = backend.to_host(dev)
    assert isinstance(back, np.ndarray) and back.dtype == np.dtype(dtype) and back.shape == h.shape
    assert back.tobytes() == h.astype(dtype).tobytes()
    assert backend.to_host(h) is h


# ---- BACKEND-3 ---------------------------------------------------------------------------------
@pytest.mark.spec("BACKEND-3")
@pytest.mark.parametrize("seed", range(5))
def test_scatter_add_accumulates_repeated_indices(any_backend, seed):
    rng = np.random.default_rng(seed)
    V, N, D = int(rng.integers(1, 6)), int(rng.integers(1, 20)), int(rng.integers(1, 4))
    idx = rng.integers(0, V, N)  # N > V: repeats
    for values, target, exact in ((rng.integers(-9, 9, (N, D)).astype(float), rng.integers(-9, 9, (V, D)).astype(float), True),
                                  (rng.standard_normal((N, D)), rng.standard_normal((V, D)), False)):
        ref = target.copy()
        for i, v in enumerate(idx):
            ref[v] += values[i]
        got = backend.to_host(backend.scatter_add(backend.asarray(target, "float64"), backend.asarray(idx),
                                                  backend.asarray(values, "float64")))
        if exact:
            assert np.array_equal(got, ref)
        else:
            np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-13)


# ---- BACKEND-4 ---------------------------------------------------------------------------------
@pytest.mark.spec("BACKEND-4")
def test_erf_matches_math_erf(any_backend):
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-7, 7, 20001), rng.standard_normal(5000) * 3, rng.standard_normal(500) * 30,
                        [0.0, -0.0, 2.0, -2.0, np.nextafter(2.0, 0), np.nextafter(2.0, 3), 1e-300, 5e-324, 10.0,
                         27.0, 1e308, -1e308]])
    ref = np.array([math.erf(v) for v in x])
    got = backend.to_host(backend.erf(backend.asarray(x, "float64")))
    err = np.abs(got - ref)
    assert err.max() < 1e-13, f"max |erf - math.erf| = {err.max():.3e} at x = {x[err.argmax()]!r}"
    assert np.array_equal(backend.to_host(backend.erf(backend.asarray(-x, "float64"))), -got)  # odd
    special = backend.to_host(backend.erf(backend.asarray([np.inf, -np.inf, np.nan], "float64")))
    assert special[0] == 1.0 and special[1] == -1.0 and np.isnan(special[2])


# ---- BACKEND-5 ---------------------------------------------------------------------------------
def bf16_patterns():
    """float32 bit patterns: every bf16 prefix with low halves that are exact, ties (0x8000), just
    below and above a tie, and the largest; plus a million random patterns. Covers ±0, subnormals,
    ties to even and odd, rounding up to inf, ±inf and NaNs (quiet, signalling, sign bit set)."""
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    rand = np.random.default_rng(0).integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([(hi[:, None] | low[None, :]).reshape(-1), rand])


@pytest.mark.spec("BACKEND-5")
def test_bf16_rounding_equals_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    u = bf16_patterns()
    f = u.view(np.float32)
    ours = backend.bf16_bits_from_float32(f)
    assert ours.dtype == np.uint16
    with np.errstate(invalid="ignore"):
        ref = f.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(f)
    bad = np.flatnonzero((ours != ref) & ~nan)
    assert len(bad) == 0, (f"{len(bad)} of {u.size} differ from ml_dtypes; first: {u[bad[0]]:#010x} -> ours "
                           f"{ours[bad[0]]:#06x}, ml_dtypes {ref[bad[0]]:#06x}")
    nan_out = ours[nan]  # quiet NaN, sign kept
    assert np.all((nan_out & 0x7F80) == 0x7F80) and np.all(nan_out & 0x40) and np.all(nan_out >> 15 == u[nan] >> 31)
    assert np.all(np.isnan(backend.float32_from_bf16_bits(nan_out)))
    every = np.arange(1 << 16, dtype=np.uint16)  # bf16 -> float32 is exact for all patterns
    assert np.array_equal(backend.float32_from_bf16_bits(every).view(np.uint32),
                          every.view(ml_dtypes.bfloat16).astype(np.float32).view(np.uint32))
    assert np.array_equal(backend.round_to_bf16(f[~nan]), backend.float32_from_bf16_bits(ours[~nan]))


@pytest.mark.spec("BACKEND-5")
def test_bf16_rounding_is_the_same_on_every_backend(any_backend):
    u = bf16_patterns()[::7]
    ref = backend.bf16_bits_from_float32(u.view(np.float32))  # numpy
    got = backend.to_host(backend.bf16_bits_from_float32(backend.asarray(u.view(np.float32))))
    assert np.array_equal(got, ref)
    back = backend.to_host(backend.float32_from_bf16_bits(backend.asarray(ref)))
    assert np.array_equal(back.view(np.uint32), ref.astype(np.uint32) << 16)


# ---- BACKEND-8 ---------------------------------------------------------------------------------
@pytest.mark.spec("BACKEND-8")
@settings(max_examples=20, deadline=None)
@given(st.integers(0, 50), st.integers(0, 2**32 - 1))
def test_bitcast_pairs_and_round_trip(n, seed):
    words = np.random.default_rng(seed).integers(0, 2**63, n, dtype=np.uint64)
    for name in ("numpy", "array_api_strict"):
        backend.set_backend(name)
        try:
            a = backend.asarray(words)
            halves = backend.to_host(backend.bitcast(a, "float32"))
            assert halves.shape == (2 * n,)
            assert halves.tobytes() == words.tobytes()  # element 2k, 2k + 1: the halves of k in memory order
            assert backend.to_host(backend.bitcast(backend.bitcast(a, "float32"), "uint64")).tobytes() == words.tobytes()
        finally:
            backend.set_backend("numpy")


@pytest.mark.spec("BACKEND-8")
def test_chunk_length_is_the_host_chunk_on_the_cpu(any_backend):
    a = backend.asarray(np.zeros(1000, np.float32))
    assert backend.chunk_length(a, 64) == 64
    assert backend.chunk_length(a, 4096) == 4096


# ---- BACKEND-9 ---------------------------------------------------------------------------------
@pytest.mark.spec("BACKEND-9")
@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_map_chunks_gives_the_serial_values_on_any_thread_count(any_backend, threads, monkeypatch):
    monkeypatch.setenv("MINIPEFT_NUM_THREADS", threads)
    xp = backend.xp()
    x = backend.asarray(np.arange(1000, dtype=np.float32))
    out = xp.zeros((1000,), dtype=xp.float32)
    seen = []

    def chunk(start):
        seen.append(start)
        piece = x[start:min(start + 96, 1000)]
        backend.multiply_into(out, start, xp.reshape(piece, (-1, 1)), piece[:, None] * 0 + 2.0)

    backend.map_chunks(chunk, range(0, 1000, 96), x)
    assert sorted(seen) == list(range(0, 1000, 96))
    assert np.array_equal(backend.to_host(out), 2 * np.arange(1000, dtype=np.float32))
    assert backend.host_threads() == int(threads)


@pytest.mark.spec("BACKEND-9")
def test_map_chunks_raises_a_chunks_exception(monkeypatch):
    monkeypatch.setenv("MINIPEFT_NUM_THREADS", "2")

    def chunk(start):
        if start == 3:
            raise ValueError("chunk 3 failed")

    with pytest.raises(ValueError, match="chunk 3 failed"):
        backend.map_chunks(chunk, range(6), np.zeros(6))


@pytest.mark.spec("BACKEND-9", "NF4-7")
@settings(max_examples=10, deadline=None)
@given(st.integers(1, 6), st.sampled_from([64, 128]), st.integers(0, 2**32 - 1))
def test_nf4_dequantize_is_the_same_bit_for_bit_on_one_thread_and_several(rows, block, seed):
    from minipeft.quant import nf4_dequantize, nf4_quantize
    w = np.random.default_rng(seed).standard_normal((rows * 700 + 3,)).astype(np.float32)
    t = nf4_quantize(w, block_size=block)
    old = os.environ.get("MINIPEFT_NUM_THREADS")
    try:
        os.environ["MINIPEFT_NUM_THREADS"] = "1"
        one = backend.to_host(nf4_dequantize(t))
        os.environ["MINIPEFT_NUM_THREADS"] = "3"
        from minipeft.quant import nf4 as nf4_module
        chunk = nf4_module.DEQUANT_CHUNK
        nf4_module.DEQUANT_CHUNK = block  # many chunks, so the threads share the work
        try:
            several = backend.to_host(nf4_dequantize(t))
        finally:
            nf4_module.DEQUANT_CHUNK = chunk
    finally:
        os.environ.pop("MINIPEFT_NUM_THREADS") if old is None else os.environ.__setitem__("MINIPEFT_NUM_THREADS", old)
    assert one.tobytes() == several.tobytes()


@pytest.mark.oracle
@pytest.mark.spec("BACKEND-5")
def test_bf16_rounding_equals_torch():
    torch = pytest.importorskip("torch")
    u = bf16_patterns()
    f = u.view(np.float32)
    keep = ~np.isnan(f)
    ours = backend.bf16_bits_from_float32(f[keep])
    ref = torch.from_numpy(f[keep].copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    bad = np.flatnonzero(ours != ref)
    assert len(bad) == 0, f"{len(bad)} differ from torch; first {u[keep][bad[0]]:#010x}: {ours[bad[0]]:#06x} vs {ref[bad[0]]:#06x}"
    assert torch.isnan(torch.from_numpy(f[~keep].copy()).to(torch.bfloat16).float()).all()


# ---- BACKEND-6 ---------------------------------------------------------------------------------
def draws(r):
    return [backend.to_host(a) for a in (r.normal((3, 4)), r.uniform((5,), -2.0, 3.0, "float64"),
                                         r.keep_mask((4, 4), 0.25), r.normal((2,), std=0.1, dtype="float64"))]


@pytest.mark.spec("BACKEND-6")
def test_seeded_rng_is_equal_on_every_backend_and_replays(any_backend):
    ours = draws(backend.RNG(42))
    backend.set_backend("numpy")
    ref = draws(backend.RNG(42))
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    g = np.random.default_rng(42)  # the spec's definition, rebuilt
    assert np.array_equal(ours[0], (g.standard_normal((3, 4)) * 1.0).astype(np.float32))
    assert np.array_equal(ours[1], g.uniform(-2.0, 3.0, (5,)))
    assert np.array_equal(ours[2], ((g.random((4, 4)) >= 0.25) / 0.75).astype(np.float32))
    r = backend.RNG(7)
    state = r.get_state()
    first = draws(r)
    r.set_state(state)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(draws(r), first))
    assert not np.array_equal(draws(backend.RNG(8))[0], draws(backend.RNG(7))[0])


ALLOC_PROBE = """
import resource, sys, numpy as np, minipeft.backend as b
n, mib = int(sys.argv[1]), int(sys.argv[2])
def round_():  # a step's worth of buffers: n arrays of mib MiB each, written, then all freed
    bufs = [np.ones(mib << 18, np.float32) for _ in range(n)]
    del bufs
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / (1 << 20)
round_()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    round_()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
kept = rss_mib()
released = b.release_host_memory()
print(b.HOST_ALLOCATOR, "|", faults, kept - rss_mib(), released)
"""


def _alloc_probe(tuning, n, mib):
    env = dict(os.environ, MINIPEFT_MALLOC_TUNING=tuning)
    out = subprocess.run([sys.executable, "-c", ALLOC_PROBE, str(n), str(mib)], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    state, rest = out.rsplit("|", 1)
    faults, freed, released = rest.split()
    return state.strip(), int(faults), float(freed), released == "True"


@pytest.mark.spec("BACKEND-7")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
@pytest.mark.parametrize("n, mib", [(40, 1), (20, 30)], ids=["40MiB", "600MiB"])
def test_freed_buffers_are_reused_without_page_faults(n, mib):
    """A round of 600 MiB is above the 512 MiB the kept heap was once bounded by (the medium llama
    step frees about 540 MiB): it is reused too, and release_host_memory() gives it back."""
    (tuned_state, tuned, freed, released), (plain_state, plain, _, plain_released) = (
        _alloc_probe("1", n, mib), _alloc_probe("0", n, mib))
    if tuned_state.startswith("untouched (no glibc"):
        pytest.skip("not glibc")
    assert tuned_state.startswith("glibc:") and plain_state.startswith("untouched")
    # malloc's default maps and faults the buffers in afresh every round (2 MiB pages where NumPy asks the
    # kernel for huge pages, so fewer faults than the 768 n mib 4 KiB pages of 3 rounds)
    assert plain > 10_000, plain
    assert tuned < 0.01 * plain, (tuned, plain)
    assert released and not plain_released
    assert freed > 0.9 * n * mib, freed  # the kept heap went back to the OS
    print(f"faults over 3 rounds: tuned {tuned}, untuned {plain}; released {freed:.0f} MiB")


@pytest.mark.spec("BACKEND-1")
def test_every_namespace_name_the_package_calls_is_in_the_array_api_standard():
    """Every `xp.<name>` in minipeft/ exists in array_api_strict, which holds the standard's names and no
    others: CuPy 14's root namespace has them all (CuPy 13 lacked astype, bool, concat, matrix_transpose,
    hence `cupy-cuda12x>=14` in the cuda12 extra). float16 is the one optional dtype used, guarded."""
    import re
    strict = pytest.importorskip("array_api_strict")
    root = Path(__file__).resolve().parent.parent / "minipeft"
    names = {m for f in root.rglob("*.py") for m in re.findall(r"\bxp\.([A-Za-z_][A-Za-z_0-9]*)", f.read_text())}
    assert {"matmul", "concat", "matrix_transpose", "astype"} <= names  # the scan sees the code
    assert sorted(n for n in names if not hasattr(strict, n)) == ["float16"]


@pytest.mark.spec("BACKEND-1")
def test_a_cupy_array_names_cupy_although_it_has_no_array_namespace(monkeypatch):
    """CuPy 14's ndarray has no __array_namespace__ (checked on the 14.2 wheel): xp_of knows it by its
    module, so an op on a CuPy array uses CuPy whatever the chosen backend."""
    from minipeft import backend as B
    cupy_like = type("ndarray", (), {"__module__": "cupy._core.core"})()
    sentinel = object()
    monkeypatch.setattr(B, "_module", lambda name: sentinel if name == "cupy" else B.importlib.import_module(name))
    assert B.get_backend() == "numpy" and B.xp_of(cupy_like) is sentinel
    assert B.xp_of(1.5, cupy_like) is sentinel and B.xp_of(np.zeros(2), cupy_like) is np


# ---- BACKEND-10, BACKEND-11 --------------------------------------------------------------------------
@pytest.mark.spec("BACKEND-10")
@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 9), seed=st.integers(0, 99), name=st.sampled_from(["numpy", "array_api_strict"]))
def test_ifft2_real_is_the_cosine_sum_in_float32(m, n, seed, name):
    a = np.random.default_rng(seed).standard_normal((2, m, n)).astype(np.float32)
    P, U = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")  # (m, m): p u
    Q, V = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")  # (n, n): q v
    phase = 2 * np.pi * ((P * U / m)[:, None, :, None] + (Q * V / n)[None, :, None, :])  # (p, q, u, v)
    ref = np.einsum("pquv,buv->bpq", np.cos(phase), a.astype(np.float64)) / (m * n)
    previous = backend.get_backend()
    backend.set_backend(name)
    try:
        out = backend.ifft2_real(backend.xp().asarray(a))
        assert backend.dtype_name(out) == "float32"
        out = backend.to_host(out)
    finally:
        backend.set_backend(previous)
    assert np.max(np.abs(out - ref)) <= 1e-5 * max(1.0, np.max(np.abs(ref)))


@pytest.mark.oracle
@pytest.mark.spec("BACKEND-10")
def test_ifft2_real_equals_torch():
    torch = pytest.importorskip("torch")
    a = np.random.default_rng(0).standard_normal((12, 20)).astype(np.float32)
    assert np.allclose(backend.ifft2_real(a), torch.fft.ifft2(torch.tensor(a)).real.numpy(), atol=1e-7)


def fisher_yates_prefix(n, k, seed):
    """BACKEND-11 rebuilt with a full list and NumPy's legacy MT19937 (RandomState's 32-bit outputs)."""
    rs, r = np.random.RandomState(seed & 0xFFFFFFFF), list(range(n))
    for i in range(min(k, n - 1)):
        z = int(rs.randint(0, 2**32, dtype=np.uint32)) % (n - i)  # one 32-bit output each
        r[i], r[i + z] = r[i + z], r[i]
    return np.array(r[:k], dtype=np.int64)


@pytest.mark.spec("BACKEND-11")
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), frac=st.floats(0, 1), seed=st.integers(0, 2**64 - 1))
def test_torch_randperm_prefix_is_the_forward_shuffle(n, frac, seed):
    k = int(frac * n)
    out = backend.torch_randperm_prefix(n, k, seed)
    assert out.dtype == np.int64 and len(set(out.tolist())) == k and all(0 <= v < n for v in out)
    assert np.array_equal(out, fisher_yates_prefix(n, k, seed))
    assert np.array_equal(backend.torch_randperm_prefix(n, n, seed)[:k], out)  # a prefix of the longer one


@pytest.mark.spec("BACKEND-11")
@pytest.mark.parametrize("n, k", [(5, 6), (5, -1), (backend.TORCH_RANDPERM_SMALL, 1)])
def test_torch_randperm_prefix_refuses_what_it_cannot_rebuild(n, k):
    with pytest.raises(BackendError, match="torch_randperm_prefix"):
        backend.torch_randperm_prefix(n, k, 0)


@pytest.mark.oracle
@pytest.mark.spec("BACKEND-11")
@pytest.mark.parametrize("n, k, seed", [(1, 1, 0), (2, 2, 5), (1000, 10, 777), (2048, 2048, 0), (45056, 1000, 2**40 + 3)])
def test_torch_randperm_prefix_equals_torch(n, k, seed):
    torch = pytest.importorskip("torch")
    ref = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].numpy()
    assert np.array_equal(backend.torch_randperm_prefix(n, k, seed), ref)
