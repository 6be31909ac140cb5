"""Every adapter method end to end on the array_api_strict guard (BACKEND-1): the carried model loads,
takes the method, trains two steps (dropout, optimizer, the method's own hooks), saves and reloads its
adapter, runs forward and generates, with standard array-API calls only, and gives NumPy's numbers bit
for bit. This is the CPU stand-in for the CuPy path of each method."""
import numpy as np
import pytest

import minipeft as mp
from minipeft import backend
from minipeft.adapters.registry import METHODS

IDS = np.array([[3, 4, 5, 6, 7, 8], [9, 10, 11, 3, 4, 5]])
ROWS = [{"input_ids": [3, 4, 5, 6, 7, 8, 9]}, {"input_ids": [10, 11, 12, 13, 14]}] * 2
EXTRA = {"adalora": {"total_step": 2}, "lora": {"dropout": 0.2}}


def run(method, tmp_path):
    quant = mp.QuantizationConfig(compute_dtype="float32") if method == "qlora" else None
    model = mp.load_model(mp.DEMO_MODEL, quantization=quant)
    model.apply_adapter(METHODS[method](**EXTRA.get(method, {})))
    hist = model.train(ROWS, mp.TrainingConfig(learning_rate=1e-2, batch_size=2, max_steps=2, progress=False))
    folder = str(tmp_path / f"{method}-{backend.get_backend()}")
    model.save_adapters(folder)
    again = mp.load_model(mp.DEMO_MODEL, quantization=quant)
    again.load_adapters(folder)
    return {"loss": hist["loss"], "logits": backend.to_host(again(IDS).data),
            "tokens": backend.to_host(again.generate(IDS, max_new_tokens=3))}


@pytest.mark.spec("BACKEND-1")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_on_the_guard_and_equals_numpy(method, tmp_path):
    pytest.importorskip("array_api_strict")
    ref = run(method, tmp_path)
    try:
        backend.set_backend("array_api_strict")
        ours = run(method, tmp_path)
    finally:
        backend.set_backend("numpy")
    assert ours["loss"] == ref["loss"]
    assert np.array_equal(ours["logits"], ref["logits"])
    assert np.array_equal(ours["tokens"], ref["tokens"])
    assert np.isfinite(ref["logits"]).all() and ref["loss"][1] != ref["loss"][0]
