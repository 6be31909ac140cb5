"""Shared test set-up: the `spec` and `oracle` markers, backends, seeded RNGs."""
import importlib.util

import numpy as np
import pytest

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
