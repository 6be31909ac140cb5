"""spec/dvora.md (DVORA-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy
float64 from the spec's formula W' = m ⊙ V / ||V||_row, V = W0 + diag(lam_b) B_s diag(lam_d) A_s, and its
limits checked against minipeft's own VeRA and DoRA."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close
from minipeft.adapters.dvora import DVoRAConfig
from minipeft.errors import ConfigError
from minipeft.safetensors_io import read_safetensors
from test_dora import SETTINGS, targets
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, plain_logits, snapshot


def perturb(model, seed=1, magnitude=True):
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, "default"):
        d = layer.adapters["default"]
        for t in (d.vera_lambda_b, d.vera_lambda_d) + ((d.dvora_magnitude_vector,) if magnitude else ()):
            t.data = (t.data + rng.standard_normal(t.shape) * 0.3).astype(np.float32)


def dV_np(d):
    A, B = (np.asarray(t.data, np.float64) for t in d.projections)
    b, dd = (np.asarray(t.data, np.float64) for t in (d.vera_lambda_b, d.vera_lambda_d))
    return np.diag(b) @ B[:d.m, :] @ np.diag(dd) @ A[:, :d.n]


def dvora_update(d, W0, m=None):
    """W' - W0 with W' = m ⊙ V / ||V||_row (DVORA-1); m defaults to the adapter's."""
    V = W0.astype(np.float64) + dV_np(d)
    m = np.asarray(d.dvora_magnitude_vector.data, np.float64) if m is None else m
    return (m / np.linalg.norm(V, axis=1))[:, None] * V - W0


@pytest.mark.spec("DVORA-1", "DVORA-2", "DVORA-6")
@SETTINGS
@given(r=st.integers(1, 40), d0=st.sampled_from([0.1, 1.0]), tm=targets)
def test_forward_and_merge_are_m_times_the_normalised_vera_weight(r, d0, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_dvora(rank=r, d_initial=d0, target_modules=tm)
    perturb(model)
    updates = {p + ".weight": dvora_update(layer.adapters["default"], W[p + ".weight"]) for p, layer in layers(model, "default")}
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("DVORA-3", "DVORA-4", "DVORA-7")
def test_init_is_the_base_with_m_the_row_norm_and_only_lambdas_and_m_train():
    model = make_model()
    W = snapshot(model)
    base = model(IDS).numpy()
    model.apply_dvora(rank=16, target_modules=("q_proj", "v_proj", "down_proj"))
    assert_close(model(IDS), base, 1e-6, label="init = base")
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        assert not np.any(d.vera_lambda_b.numpy())
        assert_close(d.dvora_magnitude_vector, np.linalg.norm(W[path + ".weight"].astype(np.float64), axis=1), 1e-6)
    model(IDS).sum().backward()
    trained = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[-1] for n in trained} == {"vera_lambda_b", "vera_lambda_d", "dvora_magnitude_vector"}
    for n, p in trained.items():
        assert (np.abs(p.grad).max() > 0) == (not n.endswith("vera_lambda_d")), n  # lam_d waits for lam_b (VeRA's)
    outs = [layer.base_layer.out_features for _, layer in layers(model, "default")]
    assert model.parameter_counts()[0] == sum(2 * m + 16 for m in outs)


@pytest.mark.spec("DVORA-5", "DVORA-1")
@SETTINGS
@given(r=st.integers(1, 24), tm=targets)
def test_limits_vera_when_m_is_the_current_norm_and_dora_normalised_vera_at_init_m(r, tm):
    model, vera = make_model(), make_model()
    W = snapshot(model)
    model.apply_dvora(rank=r, target_modules=tm)
    vera.apply_vera(rank=r, target_modules=tm)  # the same projection_prng_key: the same A, B
    perturb(model, magnitude=False)  # (b): m stays ||W0||_row
    norm_w0 = {p: np.linalg.norm(W[p + ".weight"].astype(np.float64), axis=1) for p, _ in layers(model, "default")}
    updates = {p + ".weight": dvora_update(layer.adapters["default"], W[p + ".weight"], norm_w0[p])
               for p, layer in layers(model, "default")}
    assert_close(model(IDS), plain_logits(W, updates), 1e-5, label="(b) DoRA-normalised VeRA")
    for (p, mine), (_, theirs) in zip(layers(model, "default"), layers(vera, "default")):
        d, v = mine.adapters["default"], theirs.adapters["default"]
        v.vera_lambda_b.data, v.vera_lambda_d.data = np.array(d.vera_lambda_b.data), np.array(d.vera_lambda_d.data)
        V = W[p + ".weight"].astype(np.float64) + dV_np(d)
        d.dvora_magnitude_vector.data = np.linalg.norm(V, axis=1).astype(np.float32)  # (a): g = 1
    assert_close(model(IDS), vera(IDS), 1e-5, label="(a) VeRA")


@pytest.mark.spec("DVORA-5")
@pytest.mark.parametrize("r,alpha", [(2, 4), (5, 16)])
def test_limit_dora_when_the_projections_are_lora_factors(r, alpha):
    """One adapted layer (VeRA's projections are shared: one layer can hold a LoRA pair of its own)."""
    dora, dvora = make_model(), make_model()
    tm = dict(target_modules=("q_proj",), layers_to_transform=(1,))
    dora.apply_dora(rank=r, alpha=alpha, **tm)
    dvora.apply_dvora(rank=r, **tm)
    rng = np.random.default_rng(3)
    (_, ld), (_, lv) = layers(dora, "default")[0], layers(dvora, "default")[0]
    d, v = ld.adapters["default"], lv.adapters["default"]
    d.lora_A.weight.data = rng.standard_normal(d.lora_A.weight.shape).astype(np.float32) * 0.3
    d.lora_B.weight.data = rng.standard_normal(d.lora_B.weight.shape).astype(np.float32) * 0.3
    m = d.lora_magnitude_vector
    m.data = (m.data * rng.uniform(0.5, 1.5, m.shape)).astype(np.float32)
    A, B = v.projections
    A.data, B.data = np.array(d.lora_A.weight.data), (d.s * np.array(d.lora_B.weight.data)).astype(np.float32)
    v.vera_lambda_b.data, v.vera_lambda_d.data = np.ones_like(v.vera_lambda_b.data), np.ones_like(v.vera_lambda_d.data)
    v.dvora_magnitude_vector.data = np.array(d.lora_magnitude_vector.data)
    assert_close(dvora(IDS), dora(IDS), 1e-5, label="(c) DoRA")


@pytest.mark.spec("DVORA-7")
def test_the_count_is_vera_s_plus_out_and_the_papers_llama_7b_shares():
    names = {"q_proj": 4096, "k_proj": 4096, "v_proj": 4096, "o_proj": 4096, "gate_proj": 11008, "up_proj": 11008,
             "down_proj": 4096}
    layers_7b = {f"model.layers.{i}.{n}": (0, out) for i in range(32) for n, out in names.items()}
    vera, dvora = mp.VeRAConfig(rank=1024).trainable_count(layers_7b, None), DVoRAConfig(rank=1024).trainable_count(layers_7b, None)
    assert (vera, dvora) == (1_589_248, 2_949_120)
    total = 6_738_415_616  # LLaMA-7B
    assert (round(100 * vera / total, 2), round(100 * dvora / total, 2)) == (0.02, 0.04)


@pytest.mark.spec("DVORA-7")
def test_bad_configs_and_a_4bit_base_are_refused():
    with pytest.raises(ConfigError, match="rank"):
        DVoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="d_initial"):
        DVoRAConfig(d_initial=float("nan"))
    q = mp.load_model(mp.DEMO_MODEL, quantization=mp.QuantizationConfig(compute_dtype="float32"))
    with pytest.raises(ConfigError, match="DVoRA needs a float Linear base"):
        q.apply_dvora()


@pytest.mark.spec("DVORA-8")
def test_files_hold_veras_keys_and_the_magnitude(tmp_path):
    model = make_model()
    model.apply_dvora(rank=6, target_modules=("q_proj", "k_proj"))
    perturb(model)
    out = model(IDS).numpy()
    model.save_adapters(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "MINIPEFT_DVORA"
    tensors, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    want = {"base_model.vera_A", "base_model.vera_B"}
    for path, _ in layers(model, "default"):
        want |= {f"base_model.model.{path}.{leaf}" for leaf in ("vera_lambda_b", "vera_lambda_d", "dvora_magnitude_vector")}
    assert set(tensors) == want
    again = make_model()
    again.load_adapters(str(tmp_path))
    assert_close(again(IDS), out, 1e-6, label="reloaded")
