"""Every adapter method end to end on the array_api_strict guard, and on CuPy where a GPU is (BACKEND-1): the carried model loads,
takes the method, trains two steps (dropout, optimizer, the method's own hooks), saves and reloads its
adapter, runs forward and generates, with standard array-API calls only, and gives NumPy's numbers bit
for bit (CuPy: to float32 tolerance, the same greedy tokens). The guard is the CPU stand-in for the
CuPy path of each method; benchmarks/gpu_check.sh runs the CuPy cases on a GPU machine."""
import numpy as np
import pytest

import minipeft as mp
from conftest import require_backend
from minipeft import backend
from minipeft.adapters.registry import METHODS

IDS = np.array([[3, 4, 5, 6, 7, 8], [9, 10, 11, 3, 4, 5]])
ROWS = [{"input_ids": [3, 4, 5, 6, 7, 8, 9]}, {"input_ids": [10, 11, 12, 13, 14]}] * 2
EXTRA = {"adalora": {"total_step": 2}, "lora": {"dropout": 0.2}, "road": {"group_size": 8}, "c3a": {"block_size": 16},
         "vblora": {"num_vectors": 32, "vector_length": 16},  # RoAd: 64 does not divide 96
         "trainable_tokens": {"token_indices": [3, 5, 7]},
         "cpt": {"cpt_token_ids": [3, 4, 5, 6], "cpt_tokens_type_mask": [1, 2, 3, 4]},  # PEFT's types give no labels
         "alora": {"alora_invocation_tokens": [5]},  # in IDS and ROWS: both rows are adapted from a 5 on
         "rosa": {"warmup": 0},  # the mask chosen after step 0, S trained in step 1
         "adamss": {"rank": 8},
         "bdlora": {"use_bdlora": {"target_modules_bd_b": ["q_proj", "v_proj"], "nblocks": 2}},
         }


def run(method, tmp_path):
    quant = mp.QuantizationConfig(compute_dtype="float32") if method == "qlora" else None
    model = mp.load_model(mp.DEMO_MODEL, quantization=quant)
    cfg = METHODS[method](**EXTRA.get(method, {}))
    model.apply_adapter(cfg, **({"data": ROWS} if getattr(cfg, "NEEDS_DATA", False) else {}))  # EVA: from data
    hist = model.train(ROWS, mp.TrainingConfig(learning_rate=1e-2, batch_size=2, max_steps=2, progress=False))
    folder = str(tmp_path / f"{method}-{backend.get_backend()}")
    model.save_adapters(folder)
    again = mp.load_model(mp.DEMO_MODEL, quantization=quant)
    again.load_adapters(folder)
    return {"loss": hist["loss"], "logits": backend.to_host(again(IDS).data),
            "tokens": backend.to_host(again.generate(IDS, max_new_tokens=3))}


@pytest.mark.spec("BACKEND-1")
@pytest.mark.parametrize("other", ["array_api_strict", "cupy"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_on_the_guard_and_equals_numpy(method, other, tmp_path):
    require_backend(other)
    ref = run(method, tmp_path)
    try:
        backend.set_backend(other)
        ours = run(method, tmp_path)
    finally:
        backend.set_backend("numpy")
    if other == "array_api_strict":  # NumPy underneath: the same operations give the same bits
        assert ours["loss"] == ref["loss"]
        assert np.array_equal(ours["logits"], ref["logits"])
        assert np.array_equal(ours["tokens"], ref["tokens"])
    else:  # a GPU sums in another order: float32 agreement, and the same greedy tokens
        assert np.allclose(ours["loss"], ref["loss"], rtol=1e-4)
        assert np.abs(ours["logits"] - ref["logits"]).max() <= 1e-4 * np.abs(ref["logits"]).max()
        assert np.array_equal(ours["tokens"], ref["tokens"])
    assert np.isfinite(ref["logits"]).all() and ref["loss"][1] != ref["loss"][0]
