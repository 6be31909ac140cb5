"""DyLoRA (spec/dylora.md DYLORA-1..6): the seeded rank draw, the truncated forward rebuilt in NumPy, the update of
the truncated factors only (and of the b-th rank only in frozen mode), truncate_rank to a plain LoRA that PEFT
loads with r = b, an exact resume mid-procedure, refusals before any step."""
import json

import numpy as np
import pytest

import minipeft as mp
from helpers import max_rel_err
from minipeft.adapters.inject import adapted_layers
from minipeft.errors import ConfigError
from minipeft.nn.optim import AdamW
from minipeft.procedures import DyLoRAConfig, DyLoRAHook, truncate_rank
from minipeft.procedures.dylora import DyLoRALinear
from minipeft.train import TrainingConfig
from tests.helpers import assert_close, tiny_llama
from tests.procedure_helpers import DATA, RUN, resumed_equals_full
from tests.test_qlora import quantized_llama
from tests.test_peft_oracle import IDS, base, hf_logits, hf_model, lib, report  # noqa: F401
from tests.test_train import lora_model, token_data, trainable

X = np.random.default_rng(7).standard_normal((2, 3, 32)).astype(np.float32)  # (B, T, hidden)


class Spy(DyLoRAHook):
    """Records each step's rank, and each factor and its first moment before the step and after DYLORA-3."""

    def __init__(self, model, opts):
        super().__init__(model, opts)
        self.ranks, self.steps = [], []

    def after_step(self, step):
        host = lambda a: None if a is None else mp.backend.to_host(a)  # noqa: E731
        self.ranks.append(self.b)
        before = {self.names[id(t)]: (host(self.prev[id(t)][0]), host(self.prev[id(t)][1])) for t, _ in self.factors()}
        super().after_step(step)
        after = {self.names[id(t)]: (t.numpy(), host(self.opt.m[self.names[id(t)]])) for t, _ in self.factors()}
        self.steps.append((before, after))


def layer_of(m, path="model.layers.0.self_attn.q_proj"):
    return dict(adapted_layers(m.net))[path]


@pytest.mark.spec("DYLORA-1")
def test_each_step_draws_one_rank_from_the_seeded_uniform():
    m = lora_model()
    spy = Spy(m, DyLoRAConfig(r_min=2, seed=3))
    m.train(DATA, TrainingConfig(hooks=[spy], **{**RUN, "max_steps": 24}))
    g = np.random.default_rng(3)
    assert spy.ranks == [int(g.integers(2, 4, endpoint=True)) for _ in range(24)]
    assert set(spy.ranks) == {2, 3, 4}  # r_max defaults to the adapter's rank 4


@pytest.mark.spec("DYLORA-2")
@pytest.mark.parametrize("b, rslora", [(1, False), (3, False), (2, True), (4, False)])
def test_the_forward_is_the_truncated_lora_scaled_alpha_over_b(b, rslora):
    m = tiny_llama()
    m.apply_lora(mp.LoRAConfig(rank=4, alpha=8, target_modules=["q_proj"], use_rslora=rslora))
    layer = layer_of(m)
    lora = layer.adapters["default"]
    r = np.random.default_rng(b)
    lora.lora_B.weight.data = r.standard_normal((32, 4)).astype(np.float32)
    dy = DyLoRALinear(lora, 8, rslora, False, 4)
    dy.b, dy.training = b, True  # in eval mode it runs at r_max
    x = mp.autograd.tensor.Tensor(X)
    A, B = lora.lora_A.weight.numpy().astype(np.float64), lora.lora_B.weight.numpy().astype(np.float64)
    W0 = layer.base_layer.weight.numpy().astype(np.float64)
    s_b = 8 / np.sqrt(b) if rslora else 8 / b
    bias = 0 if layer.base_layer.bias is None else layer.base_layer.bias.numpy()
    ref = X @ W0.T + bias + s_b * (X @ A[:b].T) @ B[:, :b].T  # DYLORA-2 rebuilt
    got = dy.adapt(x, layer.base_layer(x), layer.base_layer).numpy()
    assert_close(got, ref, rtol=1e-5, label=f"b={b}")
    if b == 4 and not rslora:  # at b = r: LoRA's forward bit for bit
        assert np.array_equal(got, lora.adapt(x, layer.base_layer(x), layer.base_layer).numpy())


@pytest.mark.spec("DYLORA-3")
@pytest.mark.parametrize("frozen", [False, True])
def test_only_the_truncated_factors_and_their_moments_change(frozen):
    m = lora_model()
    spy = Spy(m, DyLoRAConfig(frozen=frozen, seed=1))
    m.train(DATA, TrainingConfig(hooks=[spy], **{**RUN, "max_steps": 8}))
    assert len(set(spy.ranks)) > 1
    for b, (before, after) in zip(spy.ranks, spy.steps):
        lo = b - 1 if frozen else 0
        for name, (w0, m0) in before.items():
            w1, m1 = after[name]
            if "lora_B" in name:  # rank i is a column of B: look at B^T
                w0, w1, m1 = w0.T, w1.T, m1.T
                m0 = None if m0 is None else m0.T
            learns = (np.arange(w0.shape[0]) >= lo) & (np.arange(w0.shape[0]) < b)
            assert np.array_equal(w1[~learns], w0[~learns]), name  # the rest keeps its value ...
            assert np.array_equal(m1[~learns], np.zeros_like(m1[~learns]) if m0 is None else m0[~learns]), name
            if "lora_B" in name:  # ... and B's learning ranks move (A's gradient is 0 while B is)
                assert not np.array_equal(w1[learns], w0[learns]), name


@pytest.mark.spec("DYLORA-3")
def test_frozen_mode_gives_the_lower_ranks_no_gradient():
    m = tiny_llama()
    m.apply_lora(mp.LoRAConfig(rank=4, target_modules=["q_proj"]))
    lora = layer_of(m).adapters["default"]
    lora.lora_B.weight.data = np.ones((32, 4), np.float32)
    for frozen, rows in ((True, [2]), (False, [0, 1, 2])):
        dy = DyLoRALinear(lora, 16, False, frozen, 4)
        dy.b, dy.training = 3, True
        bl = layer_of(m).base_layer
        x = mp.autograd.tensor.Tensor(X)
        lora.lora_A.weight.grad = lora.lora_B.weight.grad = None
        dy.adapt(x, bl(x), bl).sum().backward()
        gA, gB = lora.lora_A.weight.grad, lora.lora_B.weight.grad
        assert [i for i in range(4) if np.abs(gA[i]).max() > 0] == rows
        assert [i for i in range(4) if np.abs(gB[:, i]).max() > 0] == rows


@pytest.mark.spec("DYLORA-4")
@pytest.mark.parametrize("b", [1, 2, 3])
def test_truncate_rank_gives_a_plain_lora_equal_to_the_truncated_forward(b):
    m = lora_model()
    m.train(DATA, TrainingConfig(hooks=[DyLoRAHook(m, DyLoRAConfig())], **{**RUN, "max_steps": 6}))
    ids = mp.backend.asarray(IDS % 48)
    refs = {}
    for path, layer in adapted_layers(m.net):
        d = layer.adapters["default"]
        assert type(d) is mp.adapters.lora.LoRALinear  # end() gave the plain LoRA layers back
        refs[path] = (8 / b) * d.lora_B.weight.numpy()[:, :b].astype(np.float64) @ d.lora_A.weight.numpy()[:b]
    truncate_rank(m, b)
    assert m.peft_configs["default"].rank == b
    for path, layer in adapted_layers(m.net):
        d = layer.adapters["default"]
        assert d.lora_A.weight.shape[0] == d.lora_B.weight.shape[1] == b
        assert_close(d.delta_weight(), refs[path], rtol=1e-6, label=path)
    m.net(ids)  # a plain LoRA forward runs at rank b


@pytest.mark.oracle
@pytest.mark.spec("DYLORA-4")
def test_a_truncated_adapter_loads_in_peft_with_r_b_and_equal_logits(lib, base, tmp_path):  # noqa: F811
    peft = lib[2]
    model = mp.load_model(base())
    model.apply_lora(mp.LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    data = token_data(8, vocab=64)
    model.train(data, TrainingConfig(learning_rate=2e-2, batch_size=2, max_steps=8, progress=False,
                                     hooks=[DyLoRAHook(model, DyLoRAConfig())]))
    truncate_rank(model, 2)
    model.save_adapters(str(tmp_path))
    with open(tmp_path / "adapter_config.json", encoding="utf-8") as f:
        assert json.load(f)["r"] == 2
    theirs = peft.PeftModel.from_pretrained(hf_model(lib, base()), str(tmp_path)).eval()
    assert theirs.peft_config["default"].r == 2
    ours = model(mp.backend.asarray(IDS)).numpy()
    report("DyLoRA truncated to r=2 vs PEFT", max_rel_err(ours, hf_logits(lib, theirs)))


@pytest.mark.spec("DYLORA-5", "TRAIN-13")
@pytest.mark.parametrize("frozen", [False, True])
def test_a_run_resumed_mid_procedure_gives_the_same_losses_and_factors(tmp_path, frozen):
    make = lambda m: DyLoRAHook(m, DyLoRAConfig(frozen=frozen, seed=2))  # noqa: E731
    full, again = resumed_equals_full(make, tmp_path, None, ckpt_step=5)
    assert all(np.array_equal(a, b) for a, b in zip(trainable(full).values(), trainable(again).values()))


@pytest.mark.spec("DYLORA-5")
def test_dylora_runs_on_every_backend(any_backend):
    def run():
        m = lora_model()
        hook = DyLoRAHook(m, DyLoRAConfig(frozen=True))
        return m.train(DATA, TrainingConfig(hooks=[hook], **{**RUN, "max_steps": 3}))
    losses = run()["loss"]
    mp.backend.set_backend("numpy")
    assert losses == pytest.approx(run()["loss"], rel=1e-5)


@pytest.mark.spec("DYLORA-6")
@pytest.mark.parametrize("kw, field", [(dict(r_min=0), "r_min"), (dict(r_min=3, r_max=2), "r_min=3 must be <= r_max"),
                                       (dict(r_max=0), "r_max"), (dict(r_min=1.5), "r_min"),
                                       (dict(frozen=1), "frozen"), (dict(seed=-1), "seed")])
def test_bad_options_are_config_errors(kw, field):
    with pytest.raises(ConfigError, match=f"DyLoRAConfig.{field}"):
        DyLoRAConfig(**kw)


@pytest.mark.spec("DYLORA-6")
def test_models_dylora_cannot_truncate_are_refused_before_any_step():
    with pytest.raises(ConfigError, match="r_max=5 exceeds the rank 4"):
        DyLoRAHook(lora_model(), DyLoRAConfig(r_max=5))
    d = tiny_llama()
    d.apply_dora(mp.DoRAConfig(rank=4, target_modules="all-linear"))
    with pytest.raises(ConfigError, match="DoRALinear"):
        DyLoRAHook(d, DyLoRAConfig())
    with pytest.raises(ConfigError, match="DoRALinear"):
        truncate_rank(d, 2)
    with pytest.raises(ConfigError, match="apply_lora first"):
        DyLoRAHook(tiny_llama(), DyLoRAConfig())
    with pytest.raises(ConfigError, match="lora_bias"):
        DyLoRAHook(lora_model(lora_bias=True), DyLoRAConfig())
    with pytest.raises(ConfigError, match="b=5 exceeds"):
        truncate_rank(lora_model(), 5)
    with pytest.raises(ConfigError, match="moment"):
        DyLoRAHook(lora_model(), DyLoRAConfig()).attach(object())
    m = lora_model()
    hook = DyLoRAHook(m, DyLoRAConfig())
    hook.attach(AdamW(m.net.named_trainable_parameters()))
    hook.end()
    assert all(type(layer.adapters["default"]).__name__ == "LoRALinear" for _, layer in adapted_layers(m.net))
    assert "dylora" in [p.name for p in mp.procedures.procedures()]
    q = quantized_llama()
    q.apply_lora(mp.LoRAConfig(rank=4, target_modules=["q_proj"]))
    assert DyLoRAHook(q, DyLoRAConfig(r_max=2)).r_max == 2  # LoRA over a 4-bit base truncates as well
