"""Chain of LoRA (spec/chainlora.md CHAINLORA-1..5): knots at the links' ends, the optimizer reset, W as W0
plus the links' deltas, an exact resume mid-chain, refusals before any step."""
import math

import numpy as np
import pytest

import minipeft as mp
from minipeft.errors import ConfigError
from minipeft.nn.optim import AdamW
from minipeft.procedures import ChainLoRAConfig, ChainLoRAHook
from minipeft.train import TrainingConfig
from tests.helpers import assert_close
from tests.procedure_helpers import DATA, RUN, base_W, resumed_equals_full, sBA
from tests.test_qlora import quantized_llama
from tests.test_train import lora_model


class Spy(ChainLoRAHook):
    """Records s B A of every layer at each knot (NumPy, from the factors) and the steps of the knots."""

    def __init__(self, model, opts):
        super().__init__(model, opts)
        self.links, self.steps = [], []

    def after_step(self, step):
        if step + 1 in self.ends:
            self.links.append(sBA(self.model))
            self.steps.append(step)
        super().after_step(step)


@pytest.mark.spec("CHAINLORA-1", "CHAINLORA-3")
def test_W_is_W0_plus_the_sum_of_the_links_deltas():
    m = lora_model()
    W0 = base_W(m)
    spy = Spy(m, ChainLoRAConfig(links=(3, 4, 2)))
    m.train(DATA, TrainingConfig(**{**RUN, "max_steps": 9}, hooks=[spy]))
    assert spy.steps == [2, 6, 8]
    assert all(not t.pair.B.numpy().any() for t in spy.targets)  # the last knot left B = 0
    worst = 0.0
    for p, w in base_W(m).items():
        ref = W0[p] + sum(link[p] for link in spy.links)
        assert_close(w, ref, rtol=1e-5, atol=1e-6, label=p)
        worst = max(worst, float(np.abs(w - ref).max()))
    for t in spy.targets:
        assert np.abs(t.pair.A.numpy()).max() <= 1 / math.sqrt(t.pair.A.shape[1])
    W = base_W(m)
    m.merge_and_unload()  # B = 0: merging adds nothing
    assert all(np.array_equal(np.asarray(m.net.get_submodule(p).weight.numpy(), np.float64), W[p]) for p in W)
    assert worst < 1e-6


@pytest.mark.spec("CHAINLORA-2")
def test_a_knot_resets_the_optimizer_so_the_next_step_is_adamws_first():
    m = lora_model()
    m.train(DATA, TrainingConfig(**{**RUN, "max_steps": 2}))
    named = m.net.named_trainable_parameters()
    opt = AdamW(named, lr=0.01)
    hook = ChainLoRAHook(m, ChainLoRAConfig(links=(1, 5)))
    hook.attach(opt)
    r = np.random.default_rng(1)
    for p in named.values():
        p.grad = mp.backend.asarray(r.standard_normal(p.shape).astype(np.float32))
    opt.step()
    hook.after_step(0)
    assert opt.m == {} and opt.v == {} and opt.t == 0
    before = {n: p.numpy().copy() for n, p in named.items()}
    grads = {n: r.standard_normal(p.shape).astype(np.float32) for n, p in named.items()}
    for n, p in named.items():
        p.grad = mp.backend.asarray(grads[n])
    opt.step()
    for n, p in named.items():  # t = 1: m/(1-b1) = g, v/(1-b2) = g^2
        assert_close(p, before[n] - 0.01 * grads[n] / (np.abs(grads[n]) + 1e-8), rtol=1e-5, atol=1e-7, label=n)


@pytest.mark.spec("CHAINLORA-4", "TRAIN-13")
def test_a_run_resumed_inside_a_link_gives_the_same_losses_and_W(tmp_path):
    make = lambda m: ChainLoRAHook(m, ChainLoRAConfig(links=(3, 3, 4)))  # noqa: E731
    resumed_equals_full(make, tmp_path, "Chain of LoRA", ckpt_step=4)  # after one knot, inside link 2


@pytest.mark.spec("CHAINLORA-5")
@pytest.mark.parametrize("links", [(), "3,3", (3, 0), (2, 1.5), (True,), 5])
def test_bad_links_are_config_errors(links):
    with pytest.raises(ConfigError, match=r"ChainLoRAConfig.links"):
        ChainLoRAConfig(links=links)


@pytest.mark.spec("CHAINLORA-5")
def test_a_4bit_base_is_refused_before_any_step():
    q = quantized_llama()
    q.apply_lora(mp.LoRAConfig(rank=4, target_modules="all-linear"))
    with pytest.raises(ConfigError, match="4-bit"):
        ChainLoRAHook(q, ChainLoRAConfig(links=(2, 2)))
    with pytest.raises(ConfigError, match="ChainLoRAConfig.seed"):
        ChainLoRAConfig(links=(2,), seed=-1)
