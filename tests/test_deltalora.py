"""Delta-LoRA (spec/deltalora.md DELTALORA-1..5): W follows lambda times the delta of s B A from step K on,
the telescoped total, LoRA's forward, an exact resume, refusals before any step."""
import numpy as np
import pytest

import minipeft as mp
from minipeft.errors import ConfigError
from minipeft.procedures import DeltaLoRAConfig, DeltaLoRAHook
from minipeft.train import TrainingConfig
from tests.helpers import assert_close
from tests.procedure_helpers import DATA, RUN, base_W, resumed_equals_full, sBA
from tests.test_qlora import quantized_llama
from tests.test_train import lora_model


class Spy(DeltaLoRAHook):
    """Records s B A (NumPy, from the factors) after every step, and W before the hook's update."""

    def __init__(self, model, opts):
        super().__init__(model, opts)
        self.after, self.W_before = [], []

    def after_step(self, step):
        self.after.append(sBA(self.model))
        self.W_before.append(base_W(self.model))
        super().after_step(step)


@pytest.mark.spec("DELTALORA-1", "DELTALORA-3")
def test_W_follows_lambda_times_the_delta_of_sBA_from_step_K_and_telescopes():
    m = lora_model()
    W0, start = base_W(m), sBA(m)
    spy = Spy(m, DeltaLoRAConfig(update_delta_start=3, delta_lambda=0.7))
    m.train(DATA, TrainingConfig(**RUN, hooks=[spy]))  # 10 steps
    for k in range(10):
        W_next = spy.W_before[k + 1] if k < 9 else base_W(m)
        prev = spy.after[k - 1] if k else start
        for p in W0:
            ref = spy.W_before[k][p] + (0.7 * (spy.after[k][p] - prev[p]) if k >= 3 else 0)
            assert_close(W_next[p], ref, rtol=1e-5, atol=1e-6, label=f"step {k} {p}")
    for p, w in base_W(m).items():  # DELTALORA-3: W0 + lambda (s B A - s B_K A_K)
        assert_close(w, W0[p] + 0.7 * (spy.after[-1][p] - spy.after[2][p]), rtol=1e-5, atol=1e-6, label=p)


@pytest.mark.spec("DELTALORA-2")
def test_the_forward_is_W_x_plus_sBAx_with_the_changed_W():
    m = lora_model()
    m.train(DATA, TrainingConfig(**{**RUN, "max_steps": 4}, hooks=[DeltaLoRAHook(m, DeltaLoRAConfig())]))
    W, dW = base_W(m), sBA(m)
    path = next(iter(W))
    layer = m.net.get_submodule(path)
    x = np.random.default_rng(0).standard_normal((3, W[path].shape[1])).astype(np.float32)
    got = layer(mp.Tensor(mp.backend.asarray(x))).numpy()
    assert_close(got, x @ (W[path] + dW[path]).T, rtol=1e-5, atol=1e-5, label="h = (W + s B A) x")


@pytest.mark.spec("DELTALORA-4", "TRAIN-13")
def test_a_run_resumed_mid_procedure_gives_the_same_losses_and_W(tmp_path):
    make = lambda m: DeltaLoRAHook(m, DeltaLoRAConfig(update_delta_start=2, delta_lambda=0.5))  # noqa: E731
    resumed_equals_full(make, tmp_path, "Delta-LoRA")


@pytest.mark.spec("DELTALORA-5")
@pytest.mark.parametrize("kw, field", [(dict(update_delta_start=-1), "update_delta_start"),
                                       (dict(update_delta_start=1.5), "update_delta_start"),
                                       (dict(delta_lambda=0), "delta_lambda"), (dict(delta_lambda="1"), "delta_lambda")])
def test_bad_options_are_config_errors(kw, field):
    with pytest.raises(ConfigError, match=f"DeltaLoRAConfig.{field}"):
        DeltaLoRAConfig(**kw)


@pytest.mark.spec("DELTALORA-5")
def test_dropout_and_a_4bit_base_are_refused_before_any_step():
    with pytest.raises(ConfigError, match="dropout=0"):
        DeltaLoRAHook(lora_model(dropout=0.1), DeltaLoRAConfig())
    q = quantized_llama()
    q.apply_lora(mp.LoRAConfig(rank=4, target_modules="all-linear"))
    with pytest.raises(ConfigError, match="4-bit"):
        DeltaLoRAHook(q, DeltaLoRAConfig())
