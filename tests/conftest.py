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


@pytest.fixture(params=["numpy", "array_api_strict"])
def any_backend(request):
    """Run a test on NumPy and on the array_api_strict guard; restore NumPy after."""
    import minipeft.backend as B
    pytest.importorskip(request.param)
    B.set_backend(request.param)
    yield request.param
    B.set_backend("numpy")
