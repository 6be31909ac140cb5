"""spec/monteclora.md (MONTECLORA-n): on one layer, the training forward rebuilt in NumPy float64 from given draws and
the statistics of seeded draws (chi^2_r diagonal, unbiased A~, standard-normal noise, logistic-normal weights); on
tiny random Llama models (test_lora.py's set-up) eval and merge are LoRA's and, with the draws held, the training
gradients with the regulariser equal float64 finite differences; and (oracle) against PEFT 0.21.2's
LoraConfig(monteclora_config=...): both ways and merge in eval, and in training with PEFT's sampler handed the same
draws, logits, regulariser and gradients."""
import json
import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close, max_rel_err
from one_layer import check_refuses_a_4bit_base, check_train_moves_every_leaf
from minipeft import backend
from minipeft.adapters.lora import LoRAConfig
from minipeft.adapters.monteclora import MonteCLoRAConfig, MonteCLoRAHook, MonteCLoRALinear, _digamma
from minipeft.autograd import Tensor
from minipeft.errors import ConfigError
from minipeft.nn.layers import Linear
from minipeft.safetensors_io import read_safetensors
from test_dora import SETTINGS, targets
from test_hira import randomize
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import V, base, lib  # noqa: F401 (fixtures)
from test_peft_oracle import check_both_ways_and_merged, perturbed_peft_model
from test_peft_oracle import IDS as OIDS, report, report_gradients


def one_layer(n, m, r, N, lam=0.3, seed=0):
    rng = np.random.default_rng(seed)
    base = Linear(n, m, bias=True)
    base.weight.data, base.bias.data = (rng.standard_normal(s).astype(np.float32) for s in ((m, n), (m,)))
    cfg = MonteCLoRAConfig(rank=r, alpha=8, monteclora_config={"num_samples": N, "sample_scaler": lam})
    d = MonteCLoRALinear.create(base, cfg, "q_proj", backend.RNG(seed))
    d.lora_B.weight.data = rng.standard_normal((m, r)).astype(np.float32)
    smp = d.lora_monteclora_sampler
    smp.std_prior.data, smp.expert_weights_prior.data = (rng.uniform(-1, 1, k).astype(np.float32) for k in (r, N))
    return base, d


def sampled_np(A, sigma, rho, d, z, zeta, lam):
    """MONTECLORA-3 in float64: (A~ (r, in), g (r,), w (N,))."""
    N = rho.size
    g = np.maximum(np.exp(2 * sigma) * d, 1e-3)
    eps = lam * z * np.sqrt(g)[None, None, :]  # (N, in, r)
    alpha = np.maximum(np.exp(rho), 1e-6)
    mu = np.log(alpha) - np.log(alpha).mean()
    t = np.maximum((1 / alpha) * (1 - 2 / N) + (1 / alpha).sum() / N ** 2, 1e-6)
    logits = mu + np.sqrt(t + 1e-6) * zeta
    w = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    return np.einsum("n,nio->io", w, A.T[None] + eps).T, g, w


def held_draws(d, seed):
    """Replace d.draw by one fixed draw (d, z, zeta), returned as float64 arrays."""
    r, n = d.lora_A.weight.shape
    N = d.c["num_samples"]
    rng = np.random.default_rng(seed)
    draw = (rng.chisquare(r, r), rng.standard_normal((N, n, r)), rng.standard_normal(N))
    d.draw = lambda: tuple(a.astype(np.float32) for a in draw)
    return draw


def f64(t):
    return np.asarray(t.data, np.float64)


@pytest.mark.spec("MONTECLORA-3")
@SETTINGS
@given(n=st.integers(4, 24), m=st.integers(4, 12), r=st.integers(1, 4), N=st.integers(1, 6),
       lam=st.floats(0.0, 2.0), seed=st.integers(0, 10_000))
def test_training_forward_is_the_weighted_mixture_of_sampled_A_and_keeps_g_and_w(n, m, r, N, lam, seed):
    base, d = one_layer(n, m, r, N, lam, seed)
    draw = held_draws(d, seed + 1)
    x = np.random.default_rng(seed + 2).standard_normal((2, 3, n))
    d.train()
    h = d.adapt(Tensor(x.astype(np.float32)), base(Tensor(x.astype(np.float32))), base)
    smp = d.lora_monteclora_sampler
    At, g, w = sampled_np(f64(d.lora_A.weight), f64(smp.std_prior), f64(smp.expert_weights_prior), *draw, lam)
    W0, b0, B = f64(base.weight), f64(base.bias), f64(d.lora_B.weight)
    assert_close(h, x @ W0.T + b0 + d.s * x @ At.T @ B.T, 1e-4, atol=1e-4, label="h with A~")
    assert_close(smp.state[0].data, np.diag(g), 1e-5, atol=1e-7, label="G <- diag(g)")
    assert_close(smp.state[1].data, w, 1e-5, atol=1e-7, label="w")


@pytest.mark.spec("MONTECLORA-8")
def test_seeded_draws_have_the_stated_statistics():
    n, r, N, lam, T = 6, 3, 4, 0.5, 3000
    _, d = one_layer(n, 8, r, N, lam, seed=3)
    smp, A = d.lora_monteclora_sampler, f64(d.lora_A.weight)
    sigma, rho = f64(smp.std_prior), f64(smp.expert_weights_prior)
    alpha = np.exp(rho)
    mu = rho - rho.mean()
    t = np.maximum((1 / alpha) * (1 - 2 / N) + (1 / alpha).sum() / N ** 2, 1e-6)
    ds, noise, ratios = [], [], []
    for _ in range(T):
        draw = d.draw()
        ds.append(np.asarray(draw[0], np.float64))
        d.draw = lambda draw=draw: draw
        At = f64(d.sampled_A())
        g, w = f64(smp.state[0]).diagonal(), f64(smp.state[1])
        noise.append((At - A) / (lam * np.sqrt(g)[:, None] * np.linalg.norm(w)))
        ratios.append(np.log(w[0]) - np.log(w[1]))
        del d.draw
    ds, noise, ratios = np.array(ds), np.array(noise), np.array(ratios)
    # 5-sigma bounds of the sample means / variances over T draws
    assert np.all(np.abs(ds.mean(0) - r) < 5 * np.sqrt(2 * r / T)) and np.all(np.abs(ds.var(0) / (2 * r) - 1) < 0.25)
    assert np.all(np.abs(noise.mean(0)) < 5 / np.sqrt(T)) and abs(noise.var() - 1) < 0.05
    assert np.all(np.abs((noise * np.linalg.norm(w) * lam).mean(0)) < 5 * lam / np.sqrt(T))  # E[A~] = A
    assert abs(ratios.mean() - (mu[0] - mu[1])) < 5 * np.sqrt((t[0] + t[1]) / T)
    assert abs(ratios.var() / (t[0] + t[1] + 2e-6) - 1) < 0.15
    _, again = one_layer(n, 8, r, N, lam, seed=3)  # the same seed: the same draws; another seed: others
    assert all(np.array_equal(a, b) for a, b in zip(again.draw(), one_layer(n, 8, r, N, lam, seed=3)[1].draw()))
    assert not np.array_equal(again.draw()[1], one_layer(n, 8, r, N, lam, seed=4)[1].draw()[1])


@pytest.mark.spec("MONTECLORA-1")
def test_init_is_the_base_in_eval_and_in_training_and_the_prior_state_is_I_and_uniform():
    model = make_model()
    before = model(IDS).numpy()
    model.apply_monteclora(rank=4, target_modules=("q_proj", "v_proj"), monteclora_config={"num_samples": 5})
    assert np.array_equal(model(IDS).numpy(), before)
    model.net.train()
    assert_close(model(IDS), before, 1e-6, label="training forward at init (B = 0)")
    for _, layer in layers(model, "default"):
        smp = MonteCLoRALinear.create(layer.base_layer, model.peft_configs["default"], "q", backend.RNG(1))\
            .lora_monteclora_sampler
        for t in (smp.std_prior, smp.expert_weights_prior):
            assert np.all((0 <= t.data) & (t.data < 1)) and t.data.std() > 0.05
        assert np.array_equal(smp.state[0].data, np.eye(4)) and np.allclose(smp.state[1].data, 0.2)


@pytest.mark.spec("MONTECLORA-2")
@SETTINGS
@given(r=st.integers(1, 8), alpha=st.floats(0.5, 32), tm=targets, rslora=st.booleans(), N=st.integers(1, 8))
def test_eval_forward_and_merge_are_lora_s(r, alpha, tm, rslora, N):
    model = make_model()
    W = snapshot(model)
    model.apply_monteclora(rank=r, alpha=alpha, target_modules=tm, use_rslora=rslora,
                           monteclora_config={"num_samples": N, "sample_scaler": 0.5})
    randomize(model)
    updates = {}
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        updates[path + ".weight"] = (alpha / np.sqrt(r) if rslora else alpha / r) * f64(d.lora_B.weight) @ f64(
            d.lora_A.weight)
    check_forward_merge_unmerge(model, W, updates)
    model.net.train()  # training draws: another output each forward
    assert max_rel_err(model(IDS), model(IDS)) > 1e-6


@pytest.mark.spec("MONTECLORA-4", "MONTECLORA-5")
@pytest.mark.parametrize("use_entropy", [False, True])
def test_training_gradients_with_the_regulariser_equal_finite_differences_with_the_draws_held(use_entropy):
    from test_every_method import finite_differences
    model = make_model()
    model.apply_monteclora(rank=3, target_modules=("q_proj", "down_proj"), monteclora_config={
        "num_samples": 3, "sample_scaler": 0.5, "kl_loss_weight": 0.1, "use_entropy": use_entropy})
    randomize(model)
    for i, (_, layer) in enumerate(layers(model, "default")):
        held_draws(layer.adapters["default"], i)
    model.net.train()
    for _, p in model.net.named_parameters():
        p.data = p.data.astype(np.float64)
    params = list(model.net.named_trainable_parameters().values())
    assert len(params) == 4 * 4  # A, B, sigma, rho of 4 layers
    C = np.random.default_rng(0).standard_normal(model(IDS).shape)

    def loss():
        return (model(IDS) * Tensor(C)).sum() + model.regularization()
    loss().backward()
    grads = [np.asarray(p.grad) for p in params]
    assert all(np.abs(g).max() > 0 for g in grads)
    pairs = finite_differences(lambda: float(loss().numpy()), params, grads, np.random.default_rng(1), 3, 1e-6)
    for analytic, numeric in pairs:
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


@pytest.mark.spec("MONTECLORA-4")
def test_the_regulariser_is_peft_s_formula_and_zero_outside_training():
    model = make_model()
    model.apply_monteclora(rank=3, target_modules=("q_proj", "v_proj"), monteclora_config={
        "num_samples": 4, "kl_loss_weight": 0.01, "use_entropy": True, "dirichlet_prior": 0.7})
    randomize(model)
    assert float(model.regularization().numpy()) == 0.0  # eval, no draw yet
    model.net.train()
    model(IDS)
    want = []
    for _, layer in layers(model, "default"):
        smp = layer.adapters["default"].lora_monteclora_sampler
        sigma, a2 = f64(smp.std_prior), np.exp(f64(smp.expert_weights_prior))
        g, w = f64(smp.state[0]).diagonal(), f64(smp.state[1])
        lg = np.vectorize(math.lgamma)
        kl_d = (math.lgamma(a2.sum()) - math.lgamma(4 * 0.7) + (lg(a2) - math.lgamma(0.7)).sum()
                + ((a2 - 0.7) * (psi_fd(a2) - psi_fd(a2.sum()))).sum())
        kl_w = 3 / 2 * (np.exp(2 * sigma).sum() - 2 * sigma.sum() - 3)
        kl_g = 4 / 2 * (g.sum() - np.log(g).sum() - 3)
        want.append(0.01 * (kl_d + kl_w + kl_g) + (w ** 2).sum())
    assert_close(model.regularization(), np.mean(want), 1e-5, label="mean over layers")
    assert any(isinstance(h, MonteCLoRAHook) for h in model.training_hooks())  # model.train adds it


def psi_fd(x, h=1e-5):
    """psi by central differences of math.lgamma (independent of the module's series)."""
    lg = np.vectorize(math.lgamma)
    return (lg(np.asarray(x) + h) - lg(np.asarray(x) - h)) / (2 * h)


@pytest.mark.spec("MONTECLORA-4")
@given(x=st.floats(1e-3, 200.0))
def test_digamma_and_trigamma_series_equal_differences_of_lgamma(x):
    assert abs(_digamma(x) - psi_fd(x, 1e-5 * max(x, 1e-2))) <= 1e-5 * max(1, abs(_digamma(x)))
    h = 1e-4 * max(x, 1e-2)
    assert abs(_digamma(x, 1) - (_digamma(x + h) - _digamma(x - h)) / (2 * h)) <= 1e-4 * max(1, _digamma(x, 1))


@pytest.mark.spec("MONTECLORA-5")
def test_only_a_b_sigma_rho_train_the_count_and_training_moves_every_leaf():
    model = make_model()
    model.apply_monteclora(rank=4, target_modules=("q_proj", "down_proj"), monteclora_config={"num_samples": 5})
    trained = model.net.named_trainable_parameters()
    assert all(n.endswith((".lora_A.weight", ".lora_B.weight", ".std_prior", ".expert_weights_prior"))
               for n in trained)
    assert model.parameter_counts()[0] == 2 * (4 * (32 + 32) + 4 * (64 + 32) + 2 * (4 + 5))
    demo = mp.load_model(mp.DEMO_MODEL)
    demo.apply_monteclora(rank=4, target_modules=("q_proj", "v_proj"), monteclora_config={"sample_scaler": 0.01})
    check_train_moves_every_leaf(demo)


@pytest.mark.spec("MONTECLORA-7")
@pytest.mark.parametrize("kwargs, field", [
    (dict(monteclora_config={"num_samples": 0}), r"monteclora_config\['num_samples'\]"),
    (dict(monteclora_config={"buffer_size": 1.5}), r"monteclora_config\['buffer_size'\]"),
    (dict(monteclora_config={"dirichlet_prior": 0}), r"monteclora_config\['dirichlet_prior'\]"),
    (dict(monteclora_config={"sample_scaler": -1}), r"monteclora_config\['sample_scaler'\]"),
    (dict(monteclora_config={"kl_loss_weight": "big"}), r"monteclora_config\['kl_loss_weight'\]"),
    (dict(monteclora_config={"use_entropy": 1}), r"monteclora_config\['use_entropy'\]"),
    (dict(monteclora_config={"samples": 4}), "monteclora_config")])
def test_bad_config_names_the_field_and_leaves_the_model_as_it_was(kwargs, field):
    model = make_model()
    W = snapshot(model)
    with pytest.raises(ConfigError, match=field):
        model.apply_monteclora(**{"target_modules": ("q_proj", "v_proj"), **kwargs})
    assert all(np.array_equal(p.data, W[n]) for n, p in model.net.named_parameters())
    assert not model.peft_configs


@pytest.mark.spec("MONTECLORA-7")
def test_a_4bit_base_is_refused():
    check_refuses_a_4bit_base("monteclora")


@pytest.mark.spec("MONTECLORA-6")
def test_saved_keys_and_fields_are_peft_names_and_the_folder_loads_as_monteclora(tmp_path):
    model = make_model()
    model.apply_monteclora(rank=4, target_modules=("q_proj",), monteclora_config={"num_samples": 3})
    randomize(model)
    model.net.train()
    model(IDS)  # a training draw: G and w are the draw's
    model.net.eval()
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["monteclora_config"] == {
        "num_samples": 3, "use_entropy": False, "dirichlet_prior": 0.1, "sample_scaler": 1e-4,
        "kl_loss_weight": 1e-5, "buffer_size": 150}
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    smp = "lora_monteclora_sampler."
    assert {k: v.shape for k, v in keys.items()} == {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.{m}": s for i in (0, 1)
        for m, s in (("lora_A.weight", (4, 32)), ("lora_B.weight", (32, 4)), (smp + "std_prior", (4,)),
                     (smp + "expert_weights_prior", (3,)), (smp + "gaussian_var_prior", (4, 4)),
                     (smp + "expert_weights", (3,)))}
    again = make_model()
    again.load_adapters(str(tmp_path))
    assert type(again.peft_configs["default"]) is MonteCLoRAConfig
    for (_, a), (_, b) in zip(layers(again, "default"), layers(model, "default")):
        for x, y in zip(a.adapters["default"].saved_parameters(), b.adapters["default"].saved_parameters()):
            assert x[0] == y[0] and np.array_equal(x[1].data, y[1].data)
    assert np.array_equal(again(IDS).numpy(), model(IDS).numpy())
    cfg["monteclora_config"] = None
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="lora_monteclora_sampler"):
        make_model().load_adapters(str(tmp_path))
    assert type(LoRAConfig.from_peft(cfg)) is LoRAConfig


# ---- against PEFT ---------------------------------------------------------------------------------------
CASES = {"basic": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], monteclora_config={})),
         "mlp_rslora": ("llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"],
                                      monteclora_config={"num_samples": 3, "sample_scaler": 0.3,
                                                         "kl_loss_weight": 0.1, "use_entropy": True,
                                                         "buffer_size": 4})),
         "patterns_bias": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj"],
                                         rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 3}, lora_bias=True,
                                         monteclora_config={"num_samples": 2, "dirichlet_prior": 1.5})),
         "gpt2": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                               monteclora_config={"num_samples": 4}))}


@pytest.mark.oracle
@pytest.mark.spec("MONTECLORA-2", "MONTECLORA-6", "MONTECLORA-9")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge_in_eval(lib, base, case, tmp_path):
    kind, _ = CASES[case]
    pm = perturbed_peft_model(lib, base, CASES[case], "LoraConfig").eval()
    trained = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    check_both_ways_and_merged(lib, pm, base(kind), tmp_path, f"MonteCLoRA {case}")
    model = mp.load_model(base(kind))
    model.load_adapters(str(tmp_path / "peft"))
    assert type(model.peft_configs["default"]) is MonteCLoRAConfig and model.parameter_counts()[0] == trained


@pytest.mark.oracle
@pytest.mark.spec("MONTECLORA-3", "MONTECLORA-4", "MONTECLORA-5", "MONTECLORA-9")
@pytest.mark.parametrize("case", ["mlp_rslora", "patterns_bias"])  # GPT-2 trains with its own dropout
def test_training_with_the_same_draws_equals_peft_logits_regulariser_and_gradients(lib, base, case, tmp_path):
    """In float64 on both sides: rho's gradient is the residue of the softmax Jacobian applied to sum_n w_n A^T
    (which cancels exactly), about sample_scaler times the terms it is left from, so in float32 both libraries
    carry cancellation noise (measured on patterns_bias: minipeft 1.8e-4, PEFT 4.4e-4 from the float64 value).
    In float64 the two agree to about 1e-6 (the two base models alone differ by 1.1e-7 in float64: some float32
    constant on one side, not traced here)."""
    from minipeft.autograd import functional as F
    torch = lib[0]
    kind, _ = CASES[case]
    pm = perturbed_peft_model(lib, base, CASES[case], "LoraConfig")
    pm.save_pretrained(tmp_path)
    pm.double()
    model = mp.load_model(base(kind))
    model.load_adapters(str(tmp_path))
    for _, p in model.net.named_parameters():
        p.data = p.data.astype(np.float64)
    for i, (path, layer) in enumerate(layers(model, "default")):  # one draw per layer, given to both samplers
        d, z, zeta = (a.astype(np.float32) for a in held_draws(layer.adapters["default"], i))
        W = np.diag(d) + np.triu(np.full((d.size, d.size), 0.3), 1) + np.tril(np.full((d.size, d.size), 0.3), -1)
        draw = {"z_mvn": torch.tensor(z), "z_wishart": torch.tensor(W),
                "z_dirichlet": torch.tensor(zeta)}  # PEFT reads W's diagonal only; it casts to std_prior's dtype
        pm.base_model.model.get_submodule(path).lora_monteclora_sampler["default"].sampler.get = lambda draw=draw: draw
    pm.train()
    logits = pm(torch.tensor(OIDS)).logits
    reg = pm.base_model._get_monteclora_loss()
    (torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), torch.tensor(OIDS[:, 1:]).reshape(-1))
     + reg).backward()
    pattern = re.compile(r"base_model\.model\.(.+)\.(lora_A|lora_B|lora_monteclora_sampler)\.default\.(.+)$")
    theirs = {"{}.adapters.default.{}.{}".format(*pattern.match(n).groups()): p.grad.numpy()
              for n, p in pm.named_parameters() if p.requires_grad}
    model.net.train()
    out = model(OIDS)
    report(f"MonteCLoRA {case} training logits (same draws)", max_rel_err(out, logits.detach().numpy()))
    ours = model.regularization()
    report(f"MonteCLoRA {case} regulariser vs _get_monteclora_loss", max_rel_err(ours, reg.detach().numpy()))
    (F.cross_entropy(out[:, :-1].reshape(-1, V), Tensor(OIDS[:, 1:].reshape(-1))) + ours).backward()
    report_gradients(f"MonteCLoRA {case} (training, same draws)", model, theirs)
