"""spec/pvera.md (PVERA-n) on tiny random Llama models (test_lora.py's set-up) and, marked oracle, against PEFT's
PVERA on Llama and GPT-2 (Conv1D).

Each claim is rebuilt in NumPy (float64) from the spec's formulas: [mu; logvar] = lam_d ⊙ (A_s x), eval output
lam_b ⊙ (B_s mu), training output lam_b ⊙ (B_s (mu + eps ⊙ exp(logvar / 2))), dW = diag(lam_b) B_s diag(lam_d[:r])
A_s[:r], with A, B redrawn here from NumPy's PCG64 with the key."""
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close
from lycoris_checks import check_merge_unmerge, updates
from one_layer import check_train_moves_every_leaf
from minipeft import backend
from minipeft.adapters.pvera import PVeRAConfig
from minipeft.autograd import Tensor
from minipeft.errors import CheckpointError, ConfigError
from minipeft.safetensors_io import read_safetensors
from test_dora import SETTINGS, targets  # 12 examples, no shrinking; 1-3 target names
from test_lora import IDS, SHAPES, layers, make_model, plain_logits, snapshot
from test_peft_oracle import (base, check_both_ways_and_merged, check_init_is_base_and_count,  # noqa: F401
                              check_step_gradients, lib, perturbed_peft_model)
from test_vera import dims


def perturb(model, name="default", seed=1):
    """Random lam_b, lam_d (std 0.5), so that dW != 0 and sigma = exp(logvar / 2) varies per unit."""
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, name):
        d = layer.adapters[name]
        for t in (d.pvera_lambda_b, d.pvera_lambda_d):
            t.data = (rng.standard_normal(t.shape) * 0.5).astype(np.float32)


def parts(d):
    """(A_s (2r, in), B_s (out, r), lam_b, lam_d) in float64."""
    A, B = (np.asarray(t.data, np.float64) for t in d.projections)
    lb, ld = (np.asarray(t.data, np.float64) for t in (d.pvera_lambda_b, d.pvera_lambda_d))
    return A[:, :d.n], B[:d.m, :], lb, ld


def delta_np(d):
    """PVERA-4: diag(lam_b) B_s diag(lam_d[:r]) A_s[:r], (out, in)."""
    A_s, B_s, lb, ld = parts(d)
    r = B_s.shape[1]
    return lb[:, None] * B_s @ (ld[:r, None] * A_s[:r])


def mean_and_sigma(d, x):
    """mu (..., r) and sigma = exp(logvar / 2) (..., r) of the spec, for rows x (..., in)."""
    A_s, _, _, ld = parts(d)
    u = ld * (np.asarray(x, np.float64) @ A_s.T)
    r = u.shape[-1] // 2
    return u[..., :r], np.exp(0.5 * u[..., r:])


def one_layer(model, path="model.layers.0.mlp.up_proj"):
    layer = model.net.get_submodule(path)
    return layer, layer.adapters["default"], layer.base_layer.in_features


# ---- PVERA-1: init ---------------------------------------------------------------------------------------------
@pytest.mark.spec("PVERA-1")
@SETTINGS
@given(r=st.integers(1, 20), tm=targets, key=st.integers(0, 2**31), d0=st.floats(-1, 1))
def test_init_is_the_base_and_projections_have_2r_rows(r, tm, key, d0):
    model = make_model()
    before = model(IDS).data
    model.apply_pvera(PVeRAConfig(rank=r, target_modules=tm, projection_prng_key=key, d_initial=d0))
    assert np.array_equal(model(IDS).data, before)  # lam_b = 0
    shared = model.shared_tensors["default"]
    max_in, max_out = dims(tm)
    g = np.random.default_rng(key)  # VERA-1's draws, A first, with A's 2r rows
    A_ref = g.uniform(-math.sqrt(6 / max_in), math.sqrt(6 / max_in), (2 * r, max_in)).astype(np.float32)
    B_ref = g.uniform(-math.sqrt(6 / r), math.sqrt(6 / r), (max_out, r)).astype(np.float32)
    assert np.array_equal(shared["pvera_A"].data, A_ref) and np.array_equal(shared["pvera_B"].data, B_ref)
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        assert d.projections[0] is shared["pvera_A"] and d.projections[1] is shared["pvera_B"]  # one object
        assert np.array_equal(d.pvera_lambda_b.data, np.zeros(SHAPES[path.split(".", 3)[3]][0], np.float32))
        assert np.array_equal(d.pvera_lambda_d.data, np.full(2 * r, d0, np.float32))  # both halves


# ---- PVERA-2, PVERA-4: eval forward and merge ------------------------------------------------------------------
@pytest.mark.spec("PVERA-2", "PVERA-4")
@SETTINGS
@given(r=st.integers(1, 20), tm=targets)
def test_eval_forward_is_the_mean_and_equals_the_merge(r, tm):
    model = make_model()
    weights = snapshot(model)
    model.apply_pvera(rank=r, target_modules=tm)
    perturb(model)
    assert_close(model(IDS), plain_logits(weights, updates(model, ["default"], delta_np)), 1e-5, label="eval = mean")
    check_merge_unmerge(PVeRAConfig(rank=r, target_modules=tm), perturb, delta_np)


# ---- PVERA-2, PVERA-3: training forward and its noise ----------------------------------------------------------
@pytest.mark.spec("PVERA-2", "PVERA-3")
@SETTINGS
@given(r=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_training_forward_is_the_reparameterised_sample(r, seed):
    """Train mode: h = W0 x + b + lam_b ⊙ (B_s (mu + eps ⊙ sigma)), eps the layer's RNG's next normal draw
    (..., r)."""
    model = make_model()
    model.apply_pvera(rank=r, target_modules=("up_proj",))
    perturb(model)
    layer, d, n = one_layer(model)
    layer.train()
    x = np.random.default_rng(3).standard_normal((2, 5, n)).astype(np.float32)
    d.noise = backend.RNG(seed)
    eps = np.asarray(backend.RNG(seed).normal((2, 5, r)), np.float64)
    mu, sigma = mean_and_sigma(d, x)
    _, B_s, lb, _ = parts(d)
    W0, b = (np.asarray(t.data, np.float64) for t in (layer.base_layer.weight, layer.base_layer.bias))
    assert_close(layer(Tensor(x)), x @ W0.T + b + lb * ((mu + eps * sigma) @ B_s.T), 1e-5, label="sampled forward")
    assert model.rng is not d.noise


@pytest.mark.spec("PVERA-3")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_outputs_have_the_stated_mean_and_variance(seed):
    """Over N = 4000 draws of one input row: the adapter's output j has mean lam_b_j (B_s mu)_j and variance
    lam_b_j² Σ_k B_jk² sigma_k² (the eps_k independent N(0, 1)); both within 5 standard errors."""
    model = make_model()
    model.apply_pvera(rank=6, target_modules=("up_proj",))
    perturb(model, seed=seed + 1)
    layer, d, n = one_layer(model)
    layer.train()
    d.noise = backend.RNG(seed)
    N = 4000
    x = np.repeat(np.random.default_rng(seed).standard_normal((1, n)), N, 0).astype(np.float32)
    out = np.asarray(layer(Tensor(x)).data, np.float64) - np.asarray(layer.base_layer(Tensor(x)).data, np.float64)
    mu, sigma = mean_and_sigma(d, x[:1])
    _, B_s, lb, _ = parts(d)
    mean, var = lb * (mu @ B_s.T)[0], lb**2 * ((sigma[0] ** 2) @ (B_s**2).T)
    sd = np.sqrt(var)
    assert np.all(np.abs(out.mean(0) - mean) <= 5 * sd / math.sqrt(N) + 1e-6)
    assert np.all(np.abs(out.var(0) - var) <= 5 * var * math.sqrt(2 / N) + 1e-9)
    centred = (out - mean) / np.maximum(sd, 1e-12)  # PVERA-3: normal, so about 68.3% within one sd
    assert abs(np.mean(np.abs(centred) < 1) - 0.6827) < 0.05


@pytest.mark.spec("PVERA-2", "PVERA-3")
def test_generator_seed_and_sample_at_inference():
    """generator_seed: each layer its own backend.RNG(seed) (equal draws in every layer, repeatable across models);
    sample_at_inference: eval samples too; without it eval is deterministic."""
    outs = []
    for _ in range(2):
        model = make_model()
        model.apply_pvera(rank=4, target_modules=("q_proj", "up_proj"), generator_seed=7, sample_at_inference=True)
        perturb(model)
        deltas = [layer.adapters["default"] for _, layer in layers(model, "default")]
        assert all(type(d.noise) is backend.RNG and d.noise is not deltas[0].noise for d in deltas[1:])
        outs.append((model(IDS).numpy(), model(IDS).numpy()))
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])
    assert not np.allclose(outs[0][0], outs[0][1])  # eval samples: two calls differ
    model = make_model()
    model.apply_pvera(rank=4, target_modules=("q_proj",))
    perturb(model)
    assert np.array_equal(model(IDS).numpy(), model(IDS).numpy())
    (_, layer), = [x for x in layers(model, "default") if x[0].startswith("model.layers.0")]
    assert layer.adapters["default"].noise is model.rng  # PVERA-3: the model's explicit RNG


# ---- PVERA-5: trainable, count, gradients ----------------------------------------------------------------------
@pytest.mark.spec("PVERA-5")
@SETTINGS
@given(r=st.integers(1, 20), tm=targets)
def test_only_lambdas_train_and_the_count_is_out_plus_2r(r, tm):
    model = make_model()
    model.apply_pvera(rank=r, target_modules=tm)
    adapted = [p for p, _ in layers(model, "default")]
    assert {n for n, p in model.net.named_parameters() if p.requires_grad} == {
        f"{p}.adapters.default.{leaf}" for p in adapted for leaf in ("pvera_lambda_b", "pvera_lambda_d")}
    assert model.parameter_counts()[0] == sum(2 * r + SHAPES[p.split(".", 3)[3]][0] for p in adapted)
    assert not any(t.requires_grad for t in model.shared_tensors["default"].values())


@pytest.mark.spec("PVERA-5")
def test_gradients_of_the_sampled_layer():
    """u = lam_d ⊙ (A_s x), z = mu + eps sigma, L = Σ G ⊙ h: dlam_b = Σ G ⊙ (B_s z); with
    g = B_sᵀ (lam_b ⊙ G),
    dlam_d[:r] = Σ (A_s[:r] x) ⊙ g, dlam_d[r:] = Σ (A_s[r:] x) ⊙ g ⊙ eps sigma / 2; W0, A, B get none."""
    model = make_model()
    model.apply_pvera(rank=5, target_modules=("up_proj",))
    perturb(model)
    layer, d, n = one_layer(model)
    layer.train()
    rng = np.random.default_rng(4)
    X = rng.standard_normal((4, n)).astype(np.float32)
    G = rng.standard_normal((4, d.m)).astype(np.float32)
    d.noise = backend.RNG(9)
    eps = np.asarray(backend.RNG(9).normal((4, 5)), np.float64)
    (layer(Tensor(X)) * Tensor(G)).sum().backward()
    A_s, B_s, lb, _ = parts(d)
    mu, sigma = mean_and_sigma(d, X)
    g = (G * lb) @ B_s  # (4, r)
    assert_close(d.pvera_lambda_b.grad, (G * ((mu + eps * sigma) @ B_s.T)).sum(0), 1e-5, label="dlam_b")
    a = X @ A_s.T
    want = np.concatenate([(a[:, :5] * g).sum(0), (a[:, 5:] * g * eps * sigma / 2).sum(0)])
    assert_close(d.pvera_lambda_d.grad, want, 1e-5, label="dlam_d")
    assert layer.base_layer.weight.grad is None
    assert all(t.grad is None for t in model.shared_tensors["default"].values())


@pytest.mark.spec("PVERA-5")
def test_training_moves_both_vectors():
    """At r = 8 the sampled noise (sigma ~ 1 at d_initial 0.1) keeps the loss near 3.2 of 4.05; PEFT's default
    r = 256 on every linear layer drops it to 2.75 in 16 steps at lr 0.2 (VeRA's: 0.41 at lr 0.3)."""
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_pvera(rank=256, target_modules="all-linear")
    check_train_moves_every_leaf(model, lr=0.2)


# ---- PVERA-6: serialization ------------------------------------------------------------------------------------
@pytest.mark.spec("PVERA-6")
def test_saved_keys_and_fields_are_peft_names(tmp_path):
    model = make_model()
    model.apply_pvera(rank=3, target_modules=("q_proj", "down_proj"), dropout=0.1, sample_at_inference=True,
                      generator_seed=5, bias="pvera_only", projection_prng_key=2)
    perturb(model)
    model.save_adapters(str(tmp_path))
    tensors, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    want = {f"base_model.model.{p}.pvera_lambda_{v}": (s,) for p, _ in layers(model, "default")
            for v, s in (("b", SHAPES[p.split(".", 3)[3]][0]), ("d", 6))}
    bias = {f"base_model.model.{p}.base_layer.bias" for p, _ in layers(model, "default")} & set(tensors)
    max_in, max_out = dims(("q_proj", "down_proj"))
    want |= {"base_model.pvera_A": (6, max_in), "base_model.pvera_B": (max_out, 3)}
    assert {k: v.shape for k, v in tensors.items() if k not in bias} == want
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PVERA" and cfg["r"] == 3 and cfg["pvera_dropout"] == 0.1
    assert cfg["sample_at_inference"] is True and cfg["generator_seed"] == 5 and cfg["bias"] == "pvera_only"
    again = make_model()
    again.load_adapters(str(tmp_path))
    loaded = again.peft_configs["default"]
    assert type(loaded) is PVeRAConfig and (loaded.generator_seed, loaded.sample_at_inference) == (5, True)
    for m in (model, again):  # compare the means: the sample differs by the RNGs' states
        for _, layer in layers(m, "default"):
            layer.adapters["default"].sample_at_inference = False
    assert np.array_equal(again(IDS).data, model(IDS).data)


# ---- PVERA-7: errors -------------------------------------------------------------------------------------------
BAD = [dict(rank=0), dict(d_initial=float("nan")), dict(dropout=1.0), dict(projection_prng_key=-1),
       dict(bias="vera_only"), dict(sample_at_inference="yes"), dict(generator_seed=-1), dict(generator_seed=1.5),
       dict(save_projection=1), dict(layers_pattern="layers")]


@pytest.mark.spec("PVERA-7")
@pytest.mark.parametrize("fields", BAD, ids=[str(f) for f in BAD])
def test_bad_config_values(fields):
    with pytest.raises(ConfigError, match=list(fields)[0]):
        PVeRAConfig(**{"target_modules": ("q_proj",), **fields})


@pytest.mark.spec("PVERA-7")
def test_unsaved_projections_are_refused(tmp_path):
    model = make_model()
    model.apply_pvera(rank=4, target_modules=("q_proj",), save_projection=False)
    model.save_adapters(str(tmp_path))
    tensors, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert not any(k.startswith("base_model.pvera_") for k in tensors)
    with pytest.raises(CheckpointError, match="save_projection.*pvera_A / pvera_B"):
        make_model().load_adapters(str(tmp_path))


# ---- against PEFT (eval mode: PEFT's training noise is torch's stream) -----------------------------------------
CASES = {"llama": ("llama", dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"], projection_prng_key=3,
                                 d_initial=0.2)),
         "gpt2": ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, bias="pvera_only"))}


@pytest.mark.oracle
@pytest.mark.spec("PVERA-2", "PVERA-4", "PVERA-6")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, case, tmp_path):
    pm = perturbed_peft_model(lib, base, CASES[case], "PveraConfig").eval()  # every lambda (and bias) moved
    check_both_ways_and_merged(lib, pm, base(CASES[case][0]), tmp_path, f"PVeRA {case}")
    saved, _ = read_safetensors(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert np.array_equal(saved["base_model.pvera_A"], pm.base_model.pvera_A["default"].numpy())


@pytest.mark.oracle
@pytest.mark.spec("PVERA-1", "PVERA-5")
@pytest.mark.parametrize("case", list(CASES))
def test_init_is_the_base_and_the_count_is_peft_s(lib, base, case):
    check_init_is_base_and_count(lib, base, CASES[case], "PveraConfig", PVeRAConfig, f"PVeRA {case}")


@pytest.mark.oracle
@pytest.mark.spec("PVERA-5")
def test_eval_step_gradients_agree(lib, base, tmp_path):
    check_step_gradients(lib, perturbed_peft_model(lib, base, CASES["llama"], "PveraConfig").eval(), base("llama"),
                         tmp_path, "pvera_lambda_b|pvera_lambda_d", "PVeRA llama", 1e-4)
