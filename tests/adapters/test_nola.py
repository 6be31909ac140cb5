"""spec/nola.md (NOLA-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy
float64 from the spec's formula: bases drawn again from the seed, A = A_0 + Σ α_i A_i, B = Σ β_j B_j,
dW = s B A."""
import json
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_close
from minipeft.adapters.nola import NOLAConfig
from minipeft.errors import ConfigError
from minipeft.safetensors_io import read_safetensors
from test_dora import SETTINGS, targets
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot


def randomize_coefficients(model, seed=1):
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, "default"):
        d = layer.adapters["default"]
        for c in (d.nola_alpha, d.nola_beta):
            c.data = (rng.standard_normal(c.shape) * 0.5).astype(np.float32)


def bases_np(seed, path, r, n, m, k, l):
    """NOLA-1 rebuilt: one PCG64 stream per layer, A_0 then the A basis then the B basis."""
    g = np.random.default_rng([seed, zlib.crc32(path.encode())])
    A0 = g.uniform(-1 / np.sqrt(n), 1 / np.sqrt(n), (r, n)).astype(np.float32)
    Ai = g.uniform(-1 / np.sqrt(k), 1 / np.sqrt(k), (k, r * n)).astype(np.float32).reshape(k, r, n)
    Bj = g.uniform(-1 / np.sqrt(l), 1 / np.sqrt(l), (l, m * r)).astype(np.float32).reshape(l, m, r)
    return A0, Ai, Bj


def delta_np(d, path, cfg):
    A0, Ai, Bj = (b.astype(np.float64) for b in bases_np(cfg.basis_seed, path, cfg.rank, d.n, d.m,
                                                         cfg.num_basis_a, cfg.num_basis_b))
    a, b = (np.asarray(c.data, np.float64) for c in (d.nola_alpha, d.nola_beta))
    A = A0 + np.einsum("i,irn->rn", a, Ai)  # NOLA-2
    B = np.einsum("j,jmr->mr", b, Bj)
    return cfg.alpha / cfg.rank * B @ A


@pytest.mark.spec("NOLA-1", "NOLA-2", "NOLA-3", "NOLA-5")
@SETTINGS
@given(r=st.integers(1, 6), k=st.integers(1, 40), l=st.integers(1, 40), alpha=st.sampled_from([1, 8, 16]),
       seed=st.integers(0, 2 ** 40), tm=targets)
def test_forward_and_merge_are_W0_plus_s_B_A_over_the_seeded_bases(r, k, l, alpha, seed, tm):
    model = make_model()
    W = snapshot(model)
    cfg = NOLAConfig(rank=r, num_basis_a=k, num_basis_b=l, alpha=alpha, basis_seed=seed, target_modules=tm)
    model.apply_nola(cfg)
    randomize_coefficients(model)
    updates = {path + ".weight": delta_np(layer.adapters["default"], path, cfg) for path, layer in layers(model, "default")}
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("NOLA-1")
def test_the_bases_are_bit_for_bit_those_of_the_seed_and_differ_per_layer_and_seed():
    model = make_model()
    model.apply_nola(rank=2, num_basis_a=5, num_basis_b=3, basis_seed=11, target_modules=("q_proj", "v_proj"))
    seen = []
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        A0, Ai, Bj = bases_np(11, path, 2, d.n, d.m, 5, 3)
        assert np.array_equal(d.bases[0], A0) and np.array_equal(d.bases[1], Ai.reshape(5, -1))
        assert np.array_equal(d.bases[2], Bj.reshape(3, -1))
        seen.append(d.bases[0][0, :4].tolist())
    assert len({tuple(s) for s in seen}) == len(seen)  # each layer its own stream
    other = make_model()
    other.apply_nola(rank=2, num_basis_a=5, num_basis_b=3, basis_seed=12, target_modules=("q_proj",))
    assert not np.array_equal(layers(other, "default")[0][1].adapters["default"].bases[1],
                              layers(model, "default")[0][1].adapters["default"].bases[1])


@pytest.mark.spec("NOLA-4", "NOLA-6")
def test_coefficients_start_at_zero_beta_has_a_gradient_and_only_they_train():
    model = make_model()
    base = model(IDS).numpy()
    model.apply_nola(rank=4, num_basis_a=16, num_basis_b=24, target_modules=("q_proj", "v_proj", "down_proj"))
    assert np.array_equal(model(IDS).numpy(), base)  # beta = 0: B = 0, exactly the base
    model(IDS).sum().backward()
    trained = dict((n, p) for n, p in model.net.named_parameters() if p.requires_grad)
    assert trained and all(n.endswith(("nola_alpha", "nola_beta")) for n in trained)
    for n, p in trained.items():
        peak = np.abs(p.grad).max()
        assert (peak > 0) if n.endswith("nola_beta") else (peak == 0), n  # alpha waits for beta (as LoRA's A)
    assert model.parameter_counts()[0] == (16 + 24) * 6


@pytest.mark.spec("NOLA-6")
def test_the_count_is_k_plus_l_per_layer_and_the_authors_70b_figure():
    cfg = NOLAConfig(rank=16, num_basis_a=512, num_basis_b=512, alpha=4)  # their 70B script
    layers70b = {f"model.layers.{i}.{n}": (8192, 8192) for i in range(80)
                 for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    assert cfg.trainable_count(layers70b, None) == 573_440  # their README's "only 0.6M parameters"
    assert NOLAConfig(rank=1, num_basis_a=3, num_basis_b=7).trainable_count({"a": (10, 20), "b": (4096, 11008)}, None) == 20


@pytest.mark.spec("NOLA-6")
@pytest.mark.parametrize("kw,match", [({"rank": 0}, "rank"), ({"num_basis_a": 0}, "num_basis_a"),
                                      ({"num_basis_b": -2}, "num_basis_b"), ({"basis_seed": -1}, "basis_seed"),
                                      ({"basis_seed": 1.5}, "basis_seed"), ({"dropout": 1.0}, "dropout"),
                                      ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"), ({"num_basis": 4}, "num_basis")])
def test_bad_configs_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        NOLAConfig(**kw)


@pytest.mark.spec("NOLA-7")
def test_files_hold_only_the_coefficients_and_load_by_regenerating_the_bases(tmp_path):
    model = make_model()
    model.apply_nola(rank=3, num_basis_a=6, num_basis_b=9, basis_seed=5, target_modules=("q_proj", "k_proj"))
    randomize_coefficients(model)
    out = model(IDS).numpy()
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "MINIPEFT_NOLA" and (cfg["r"], cfg["num_basis_a"], cfg["num_basis_b"], cfg["basis_seed"]) == (3, 6, 9, 5)
    tensors, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    want = {f"base_model.model.{p}.{leaf}": shape for p, _ in layers(model, "default")
            for leaf, shape in (("nola_alpha", (6,)), ("nola_beta", (9,)))}
    assert {k: v.shape for k, v in tensors.items()} == want
    again = make_model()
    again.load_adapters(str(tmp_path))
    assert_close(again(IDS), out, 1e-6, label="reloaded")
