"""LoRA+, LoRA-FA and the Riemannian preconditioner (spec/loraplus.md, spec/lorafa.md, spec/riemannian.md):
their groups, projections and update rules against hand computations in float64, model.train with
TrainingConfig(optimizer=...), exact resume, refusals, and their registry entries. PEFT parity:
tests/test_peft_oracle_optimizers.py."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minipeft as mp
from minipeft import optimizers as O
from minipeft.adapters import registry
from minipeft.errors import ConfigError
from minipeft.models.blocks import causal_lm_loss
from minipeft.models.config import config_from_dict
from minipeft.models.gpt2 import GPT2LMHeadModel
from minipeft.optimizers.lorafa import LoraFAAdamW, projected_grad_B
from minipeft.optimizers.riemannian import precondition
from minipeft.train import TrainingConfig
from tests.helpers import assert_close, tiny_llama
from tests.test_train import QUIET, token_data, trainable

RUN = dict(learning_rate=1e-2, batch_size=2, max_steps=4, shuffle=False, **QUIET)
IDS = np.random.default_rng(5).integers(0, 48, (2, 7))


def tiny_gpt2(seed=0):
    net = GPT2LMHeadModel(config_from_dict(dict(model_type="gpt2", vocab_size=48, n_embd=32, n_layer=2, n_head=4,
                                                n_inner=None, n_positions=64)))
    r = mp.backend.RNG(seed)
    for _, p in net.named_parameters():
        p.data = r.normal(p.shape, std=0.3)
    return mp.Model(net, seed=seed)


def one_step_grads(model):
    """Gradients of the LM loss on IDS, {name: array}."""
    model.net.train()
    causal_lm_loss(model.net(IDS), IDS).backward()
    return {n: p.grad for n, p in model.net.named_parameters() if p.requires_grad}


# ---- LoRA+ -------------------------------------------------------------------------------------
@pytest.mark.spec("LORAPLUS-1", "LORAPLUS-2")
@settings(max_examples=8, deadline=None)
@given(ratio=st.floats(0.5, 64), wd=st.sampled_from([0.0, 0.01, 0.3]))
def test_loraplus_groups_follow_the_rule(ratio, wd):
    m = tiny_gpt2()
    m.apply_lora(mp.LoRAConfig(rank=2, target_modules=["c_attn", "c_fc"], bias="lora_only", modules_to_save=["ln_f"]))
    opt = O.create_loraplus_optimizer(m, lr=1e-3, loraplus_lr_ratio=ratio, loraplus_weight_decay=wd)
    names = list(opt.params)
    lora_B = [n for n in names if "lora_B" in n]
    one_d = [n for n in names if opt.params[n].ndim == 1]
    assert lora_B and one_d and any("ln_f" in n for n in one_d)  # the cases are there
    for n in names:
        in_b = "lora_B" in n or opt.params[n].ndim == 1
        assert opt.scale[n] == (ratio if in_b else 1.0), n
        no_decay = in_b and ("bias" in n or "ln_f" in n)  # ln_f: a LayerNorm copy (modules_to_save)
        assert opt.wd[n] == (0.0 if no_decay else wd), n


@pytest.mark.spec("LORAPLUS-1")
def test_loraplus_llama_norms_decay_and_dora_magnitude_goes_with_B():
    m = tiny_llama()
    m.apply_dora(rank=2, target_modules=["q_proj"], modules_to_save=["model.norm"])
    opt = O.create_loraplus_optimizer(m, lr=1e-3, loraplus_lr_ratio=8, loraplus_weight_decay=0.1)
    mag = [n for n in opt.params if "magnitude" in n]
    norm = [n for n in opt.params if "model.norm" in n]
    assert mag and norm
    for n in mag + norm:  # 1-d: B's learning rate; RMSNorm is not a LayerNorm, so it decays (as in PEFT)
        assert (opt.scale[n], opt.wd[n]) == (8.0, 0.1), n


@pytest.mark.spec("LORAPLUS-4")
def test_loraplus_in_model_train_steps_B_ratio_times_faster():
    """One step from zero moments: |dp| = lr * lr_scale for every element with a gradient above eps."""
    m = tiny_llama()
    m.apply_lora(rank=2, target_modules=["q_proj", "v_proj"])
    for n, p in m.net.named_parameters():
        if "lora_B" in n:  # B = 0 at init would give A no gradient
            p.data = np.random.default_rng(1).standard_normal(p.shape).astype(np.float32)
    before = trainable(m)
    m.train(token_data(2), TrainingConfig(**{**RUN, "max_steps": 1}, max_grad_norm=None, schedule="constant",
                                          optimizer=O.LoraPlusConfig(loraplus_lr_ratio=4.0)))
    after = trainable(m)
    for n in before:
        step = np.abs(after[n] - before[n])
        big = step > 1e-6
        assert big.mean() > 0.5, n
        assert_close(step[big], np.full(big.sum(), 1e-2 * (4.0 if "lora_B" in n else 1.0)), rtol=1e-3, label=n)


@pytest.mark.spec("LORAPLUS-3")
def test_loraplus_embedding_group_is_empty_and_its_rate_is_checked():
    m = tiny_llama()
    m.apply_lora(rank=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    opt = O.create_loraplus_optimizer(m, lr=1e-3, loraplus_lr_ratio=4, loraplus_lr_embedding=0.5)
    emb = [n for n in opt.params if "embed_tokens" in n]
    assert emb and all(opt.scale[n] == 1.0 for n in emb)  # a trained embedding copy is group A (2-d), as in PEFT
    assert set(opt.scale.values()) == {1.0, 4.0}
    for bad in (0.0, -1e-6, None):
        with pytest.raises(ConfigError, match="loraplus_lr_embedding"):
            O.LoraPlusConfig(loraplus_lr_embedding=bad)


@pytest.mark.spec("LORAPLUS-4")
def test_loraplus_refusals():
    m = tiny_llama()
    m.apply_lora(rank=2, target_modules=["q_proj"])
    for bad in (0, -1.0, True, "16"):
        with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
            O.LoraPlusConfig(loraplus_lr_ratio=bad)
    with pytest.raises(ConfigError, match="loraplus_weight_decay"):
        O.LoraPlusConfig(loraplus_weight_decay=-0.1)
    with pytest.raises(ConfigError, match="no effect in PEFT.*loraplus_weight_decay"):
        O.create_loraplus_optimizer(m, lr=1e-3, loraplus_lr_ratio=4, weight_decay=0.01)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        O.create_loraplus_optimizer(tiny_llama(), lr=1e-3, loraplus_lr_ratio=4)


# ---- LoRA-FA -----------------------------------------------------------------------------------
@pytest.mark.spec("LORAFA-2")
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), r=st.integers(1, 4), s=st.floats(0.25, 8.0))
def test_lorafa_projection_is_the_least_squares_gradient(seed, r, s):
    """g~ = (1/s^2) g_B (A A^T)^-1 with g_B = s G A^T (G = dL/dW) minimises ||s g~ A - G||_F: the residual is
    orthogonal to A's rows, (s g~ A - G) A^T = 0 (the paper's optimal B-gradient for a frozen A)."""
    rng = np.random.default_rng(seed)
    A, G = rng.standard_normal((r, 6)), rng.standard_normal((5, 6))
    g = projected_grad_B(s * G @ A.T, A, s)
    assert_close((s * g @ A - G) @ A.T, np.zeros((5, r)), atol=1e-6, label="normal equations (up to delta)")
    assert_close(g, (G @ A.T) @ np.linalg.inv(A @ A.T) / s, rtol=1e-7, label="closed form")


@pytest.mark.spec("LORAFA-3")
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), wd=st.sampled_from([0.0, 0.2]), steps=st.integers(1, 4))
def test_lorafa_adamw_is_hugging_face_s_rule(seed, wd, steps):
    r = np.random.default_rng(seed)
    A = mp.Tensor(r.standard_normal((2, 4)))
    B, b = mp.Tensor(r.standard_normal((3, 2)), requires_grad=True), mp.Tensor(r.standard_normal(3), requires_grad=True)
    opt = LoraFAAdamW({"B": B, "b": b}, {"B": (A, 0.5)}, lr=0.01, weight_decay=wd)
    ref, m, v = {"B": B.numpy().copy(), "b": b.numpy().copy()}, {"B": 0.0, "b": 0.0}, {"B": 0.0, "b": 0.0}
    for t in range(1, steps + 1):
        grads = {"B": r.standard_normal((3, 2)), "b": r.standard_normal(3)}
        B.grad, b.grad = grads["B"], grads["b"]
        opt.step()
        grads["B"] = grads["B"] @ np.linalg.pinv(A.numpy() @ A.numpy().T + 1e-8 * np.eye(2)) / 0.25
        for k in ref:
            m[k] = 0.9 * m[k] + 0.1 * grads[k]
            v[k] = 0.999 * v[k] + 0.001 * grads[k] ** 2
            ref[k] = ref[k] - 0.01 * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) * m[k] / (np.sqrt(v[k]) + 1e-6)
            ref[k] = ref[k] * (1 - 0.01 * wd)  # after the step, 1-d parameters too
    assert_close(B, ref["B"], rtol=1e-10, label="B")
    assert_close(b, ref["b"], rtol=1e-10, label="b")


@pytest.mark.spec("LORAFA-1")
def test_lorafa_keeps_A_and_trains_B_then_gives_A_back():
    m = tiny_llama()
    m.apply_lora(rank=2, target_modules=["q_proj", "v_proj"])
    before = trainable(m)
    m.train(token_data(4), TrainingConfig(**RUN, optimizer="lorafa"))
    after = trainable(m)
    assert set(after) == set(before)  # lora_A trainable again after model.train, as before it
    for n in before:
        moved = not np.array_equal(after[n], before[n])
        assert moved == ("lora_B" in n), n
    opt = O.create_lorafa_optimizer(m, r=2, lora_alpha=16, lr=1e-3)  # PEFT's function freezes A for good
    assert all("lora_B" in n for n in opt.params) and not any("lora_A" in n for n in trainable(m))


@pytest.mark.spec("LORAFA-1")
def test_lorafa_refusals_change_nothing():
    for apply, message in [(lambda m: m.apply_dora(rank=2, target_modules=["q_proj"]), "DoRALinear"),
                           (lambda m: m.apply_lora(rank=2, target_modules=["q_proj"], lora_bias=True), "lora_bias"),
                           (lambda m: m.apply_ia3(target_modules=["q_proj"], feedforward_modules=[]), "needs trainable LoRA")]:
        m = tiny_llama()
        apply(m)
        before = trainable(m)
        with pytest.raises(ConfigError, match=message):
            m.train(token_data(2), TrainingConfig(**RUN, optimizer="lorafa"))
        assert set(trainable(m)) == set(before)
    m = tiny_llama()
    m.apply_lora(rank=2, alpha=16, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="r=4 but .* has rank 2"):
        O.create_lorafa_optimizer(m, r=4, lora_alpha=16)
    with pytest.raises(ConfigError, match="lora_alpha=4 gives scaling 2 but .* has 8"):
        O.create_lorafa_optimizer(m, lora_alpha=4)
    with pytest.raises(ConfigError, match="LoraFAConfig.r"):
        O.LoraFAConfig(r=0)


# ---- Riemannian --------------------------------------------------------------------------------
@pytest.mark.spec("RIEM-1")
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), r=st.integers(1, 4), reg=st.sampled_from([0.0, 1e-2, 1.0]))
def test_riemannian_preconditioner_solves_the_damped_systems(seed, r, reg):
    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal((r, 6)), rng.standard_normal((5, r))
    gA, gB = rng.standard_normal((r, 6)), rng.standard_normal((5, r))
    pA, pB = precondition(A, B, gA, gB, reg)
    assert_close((B.T @ B + reg * np.eye(r)) @ pA, gA, rtol=1e-8, label="(B^T B + reg I) g~_A = g_A")
    assert_close(pB @ (A @ A.T + reg * np.eye(r)), gB, rtol=1e-8, label="g~_B (A A^T + reg I) = g_B")
    assert precondition(A, B, None, gB, reg)[0] is None


@pytest.mark.spec("RIEM-2")
def test_riemannian_step_is_adamw_on_preconditioned_gradients_and_decays_everything():
    m = tiny_llama(attention_bias=True)
    m.apply_lora(rank=2, target_modules=["q_proj"], bias="lora_only")
    opt = O.create_riemannian_optimizer(m, lr=1e-2, reg=0.1, weight_decay=0.5)
    assert all(w == 0.5 for w in opt.wd.values()) and any(p.ndim == 1 for p in opt.params.values())
    grads = one_step_grads(m)
    ref = mp.nn.optim.AdamW(dict(opt.params), lr=1e-2, weight_decay=0.5, no_decay=lambda n, p: False)
    expect = {}
    for n, p in opt.params.items():  # what AdamW does with the hand-preconditioned gradients
        if ".lora_A." in n:
            B = opt.params[n.replace(".lora_A.", ".lora_B.")]
            grads[n] = np.linalg.inv(B.numpy().T @ B.numpy() + 0.1 * np.eye(2)) @ grads[n]
        elif ".lora_B." in n:
            A = opt.params[n.replace(".lora_B.", ".lora_A.")]
            grads[n] = grads[n] @ np.linalg.inv(A.numpy() @ A.numpy().T + 0.1 * np.eye(2))
        expect[n] = (1 - 1e-2 * 0.5) * p.numpy() - 1e-2 * np.sign(grads[n]) * (np.abs(grads[n]) > 0)
    del ref
    opt.step()
    for n, p in opt.params.items():  # first step from zero moments: m^/(sqrt(v^)+eps) = g/(|g|+eps)
        assert_close(p, expect[n], rtol=1e-5, label=n)
    with pytest.raises(ConfigError, match="reg"):
        O.RiemannianConfig(reg=-1)
    with pytest.raises(ConfigError, match="lora_A/lora_B pairs"):
        O.create_riemannian_optimizer(tiny_llama(), lr=1e-3)


# ---- all three ---------------------------------------------------------------------------------
@pytest.mark.spec("LORAPLUS-4", "LORAFA-1", "RIEM-2")
@pytest.mark.parametrize("optimizer", ["loraplus", "lorafa", "riemannian"])
def test_resume_mid_training_is_exact(tmp_path, optimizer):
    run = dict(RUN, max_steps=6, optimizer=optimizer)
    data = token_data(6)
    full = tiny_llama()
    full.apply_lora(rank=2, target_modules=["q_proj", "v_proj"])
    whole = full.train(data, TrainingConfig(**run, output_dir=str(tmp_path), save_steps=3))
    again = tiny_llama()
    again.apply_lora(rank=2, target_modules=["q_proj", "v_proj"])
    resumed = again.train(data, TrainingConfig(**run, resume_from=str(tmp_path / "checkpoint-3")))
    assert resumed["loss"] == whole["loss"]  # bit for bit
    assert all(np.array_equal(a, b) for a, b in zip(trainable(again).values(), trainable(full).values()))


@pytest.mark.spec("METHOD-2")
def test_optimisers_are_registered_but_are_not_adapters():
    got = {m.name: (m.kind, m.peft_type, m.config) for m in mp.methods() if m.kind == "optimiser"}
    assert got == {"loraplus": ("optimiser", None, O.LoraPlusConfig), "lorafa": ("optimiser", None, O.LoraFAConfig),
                   "riemannian": ("optimiser", None, O.RiemannianConfig), "flora": ("optimiser", None, O.FloraConfig)}
    for name in got:
        m = registry.method(name)
        assert "arXiv" in m.paper and m.hook and not m.is_adapter
        assert name not in registry.METHODS and not hasattr(mp.Model, f"apply_{name}")
    with pytest.raises(ConfigError, match="use adamw or one of"):
        tiny_llama().train(token_data(2), TrainingConfig(**RUN, optimizer="lion"))
    class Options:
        pass
    before = list(registry._METHODS)
    with pytest.raises(ConfigError, match="hook="):
        registry.register("odd", Options, kind="optimiser")
    with pytest.raises(ConfigError, match="hook= is for kinds"):
        registry.register("odd", Options, kind="layer", hook=O.loraplus.LoraPlusHook)
    assert list(registry._METHODS) == before
