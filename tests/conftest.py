"""Shared test set-up: the `spec` and `oracle` markers, backends, seeded RNGs."""
import importlib.util
import os

# One BLAS / OpenMP thread per test process: pytest runs one worker per core (pyproject addopts),
# and spinning BLAS threads on busy cores cost up to 17x the CPU time (measured, bench_step.py).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402  (after the thread settings, which numpy reads at import)
import pytest
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run (HYPOTHESIS_PROFILE=explore draws new ones): a CI
# run is then repeatable, and a failure a run finds stays found instead of flickering.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

ORACLE_PACKAGES = ("torch", "transformers", "peft")
_missing = [p for p in ORACLE_PACKAGES if importlib.util.find_spec(p) is None]


def pytest_collection_modifyitems(config, items):
    if not _missing:
        return
    skip = pytest.mark.skip(reason=f"oracle extra not installed ({', '.join(_missing)} missing): "
                                   "pip install torch==2.13.0 && pip install -e '.[oracle]'")
    for item in items:
        if "oracle" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def require_backend(name: str) -> None:
    """Skip unless backend `name` can run here: the package imports and, for CuPy, a GPU answers."""
    mod = pytest.importorskip(name)
    if name == "cupy":
        try:
            mod.cuda.runtime.getDeviceCount()
        except Exception as e:  # noqa: BLE001  (no driver, no device: CuPy raises its own runtime errors)
            pytest.skip(f"CuPy is installed but no GPU answers ({type(e).__name__})")


@pytest.fixture(params=["numpy", "array_api_strict", "cupy"])
def any_backend(request):
    """Run a test on NumPy, on the array_api_strict guard and, where a GPU is, on CuPy; restore NumPy after."""
    import minipeft.backend as B
    require_backend(request.param)
    B.set_backend(request.param)
    yield request.param
    B.set_backend("numpy")
