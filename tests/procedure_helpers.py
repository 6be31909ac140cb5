"""What the procedure tests (test_relora.py, test_deltalora.py, test_chainlora.py) share: a LoRA model, the
base weights W of its LoRA layers as NumPy, s B A of each (rebuilt from the spec's formula), and a run that
is checkpointed mid-procedure and resumed."""
import numpy as np
import pytest

from minipeft.adapters.inject import adapted_layers
from minipeft.train import TrainingConfig
from tests.test_train import QUIET, lora_model, token_data

DATA = token_data(24, seed=5)
RUN = dict(learning_rate=5e-3, batch_size=2, max_steps=10, **QUIET)


def base_W(model) -> dict:
    """{layer path: W (out, in)} of every adapted layer's base, as float64 NumPy copies."""
    return {p: np.array(layer.base_layer.weight.numpy(), dtype=np.float64) for p, layer in adapted_layers(model.net)}


def sBA(model) -> dict:
    """{layer path: s B A} of the default adapter, from the factors (spec LORA-4, rebuilt in NumPy)."""
    out = {}
    for p, layer in adapted_layers(model.net):
        d = layer.adapters["default"]
        out[p] = d.s * (np.asarray(d.lora_B.weight.numpy(), np.float64) @ np.asarray(d.lora_A.weight.numpy(), np.float64))
    return out


def resumed_equals_full(make_hook, tmp_path, procedure, ckpt_step=4, make_model=lora_model, **run):
    """Train RUN with a hook, checkpointing every ckpt_step; resume a fresh model (make_model()) from
    checkpoint-<ckpt_step>. Asserts the losses and W are equal bit for bit and that save_adapters warns that
    `procedure` changed W (procedure=None: a procedure that leaves W alone, so no warning is checked). Returns
    both models."""
    cfg = {**RUN, **run}
    full_model = make_model()
    full = full_model.train(DATA, TrainingConfig(hooks=[make_hook(full_model)], output_dir=str(tmp_path / "a"),
                                                 save_steps=ckpt_step, **cfg))
    again = make_model()
    resumed = again.train(DATA, TrainingConfig(hooks=[make_hook(again)], **cfg,
                                               resume_from=str(tmp_path / "a" / f"checkpoint-{ckpt_step}")))
    assert len(full["loss"]) == cfg["max_steps"] and resumed["loss"] == full["loss"]  # bit for bit
    Wa, Wb = base_W(full_model), base_W(again)
    assert all(np.array_equal(Wa[p], Wb[p]) for p in Wa)
    if procedure is not None:
        with pytest.warns(UserWarning, match=f"{procedure} changed the base weights"):
            full_model.save_adapters(str(tmp_path / "adapter"))
    return full_model, again
