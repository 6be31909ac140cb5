"""spec/road.md (ROAD-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy float64
from the spec's pairing (an explicit (out, out) matrix R built entry by entry); and (oracle) against PEFT's ROAD."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close, max_rel_err
from minipeft import backend
from minipeft.adapters.road import VARIANTS, RoadConfig, RoadLinear
from minipeft.errors import ConfigError
from minipeft.nn.layers import Linear
from minipeft.safetensors_io import read_safetensors
from test_dora import SETTINGS, targets
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import IDS as IDS_O, base, lib  # noqa: F401 (fixtures)

variants = st.sampled_from(sorted(VARIANTS))
groups = st.sampled_from([2, 4, 8, 16])  # every tiny-llama width (16, 32, 64) is a multiple


def randomize(model, seed=1):
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, "default"):
        d = layer.adapters["default"]
        d.road_theta.data = rng.uniform(-np.pi, np.pi, d.road_theta.shape).astype(np.float32)
        d.road_alpha.data = (1 + 0.5 * rng.standard_normal(d.road_alpha.shape)).astype(np.float32)


def R_np(d, m):
    """ROAD-1..3 as a matrix: R[j, j] = c1_j, R[j, j+h] = -c2_j, R[j+h, j+h] = c1_{j+h}, R[j+h, j] = c2_{j+h}."""
    t, a = (np.asarray(v.data, np.float64) for v in (d.road_theta, d.road_alpha))
    g, h = d.group_size, d.group_size // 2
    c1, c2 = np.zeros(m), np.zeros(m)
    for k in range(m // g):
        for e in range(g):
            j = k * g + e
            if d.variant == "road_1":
                p = k * h + e % h
                c1[j], c2[j] = a[p] * np.cos(t[p]), a[p] * np.sin(t[p])
            elif d.variant == "road_2":
                c1[j], c2[j] = a[j] * np.cos(t[j]), a[j] * np.sin(t[j])
            else:
                p, q = 2 * g * k + e, 2 * g * k + g + e
                c1[j], c2[j] = a[p] * np.cos(t[p]), a[q] * np.sin(t[q])
    R = np.diag(c1)
    for k in range(m // g):
        for i in range(h):
            j, j2 = k * g + i, k * g + i + h
            R[j, j2], R[j2, j] = -c2[j], c2[j2]
    return R


def one_layer(variant, g, m=16, n=8, seed=0):
    rng = np.random.default_rng(seed)
    base = Linear(n, m, bias=True)
    base.weight.data = rng.standard_normal((m, n)).astype(np.float32)
    base.bias.data = rng.standard_normal(m).astype(np.float32)
    d = RoadLinear.create(base, RoadConfig(variant=variant, group_size=g, init_weights=False), "q", backend.RNG(seed))
    return base, d


@pytest.mark.spec("ROAD-1", "ROAD-2", "ROAD-3", "ROAD-6")
@SETTINGS
@given(variant=variants, g=groups, tm=targets)
def test_forward_and_merge_are_R_times_W0(variant, g, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_road(variant=variant, group_size=g, target_modules=tm)
    randomize(model)
    updates = {}
    for p, layer in layers(model, "default"):
        W0 = W[p + ".weight"].astype(np.float64)
        R = R_np(layer.adapters["default"], W0.shape[0])
        updates[p + ".weight"] = R @ W0 - W0
        if p + ".bias" in W:  # the tiny llama's attention has biases: b <- R b
            b = W[p + ".bias"].astype(np.float64)
            updates[p + ".bias"] = R @ b - b
    check_forward_merge_unmerge(model, W, updates)
    model.merge_adapter()
    model.unmerge_adapter()
    for path, layer in layers(model, "default"):  # ROAD-6: W0 comes back bit for bit
        assert np.array_equal(layer.base_layer.weight.data, W[path + ".weight"])


@pytest.mark.spec("ROAD-3", "ROAD-6")
@SETTINGS
@given(variant=variants, g=st.sampled_from([2, 4, 8, 16]), seed=st.integers(0, 100))
def test_a_biased_layer_rotates_its_bias_and_merges_into_R_W0_and_R_b(variant, g, seed):
    base, d = one_layer(variant, g, seed=seed)
    x = np.random.default_rng(seed + 1).standard_normal((3, 8)).astype(np.float32)
    W0, b = np.asarray(base.weight.data, np.float64), np.asarray(base.bias.data, np.float64)
    R = R_np(d, 16)
    want = (x.astype(np.float64) @ W0.T + b) @ R.T
    assert_close(d.adapt(None, base(mp.Tensor(x)), base), want, 1e-5, label="R y")
    d.merge_into(base)
    assert_close(base.weight.data, R @ W0, 1e-5, atol=1e-6, label="R W0")
    assert_close(base.bias.data, R @ b, 1e-5, atol=1e-6, label="R b")
    d.unmerge_from(base)
    assert np.array_equal(base.weight.data, W0.astype(np.float32)) and np.array_equal(base.bias.data, b.astype(np.float32))


@pytest.mark.spec("ROAD-4")
@SETTINGS
@given(variant=st.sampled_from(["road_1", "road_2"]), g=groups, seed=st.integers(0, 100))
def test_each_pair_is_rotated_by_theta_and_its_norm_scaled_by_alpha(variant, g, seed):
    """road_1: the pair z = y_i + i y_{i+h} becomes α e^{iθ} z (|z'| = |α| |z|); road_2: each output has its own
    (θ, α): y'_i = α_i Re(e^{iθ_i} z), y'_{i+h} = α_{i+h} Im(e^{iθ_{i+h}} z), a rotation where θ, α agree."""
    _, d = one_layer(variant, g, seed=seed)
    y = np.random.default_rng(seed).standard_normal((2, 16))
    out = np.asarray(d.rotate(y.astype(np.float32)), np.float64)
    t, a = (np.asarray(v.data, np.float64) for v in (d.road_theta, d.road_alpha))
    h = g // 2
    for k in range(16 // g):
        for i in range(h):
            j, j2 = k * g + i, k * g + i + h
            z, z2 = y[:, j] + 1j * y[:, j2], out[:, j] + 1j * out[:, j2]
            if variant == "road_1":
                p = k * h + i
                assert np.allclose(np.abs(z2), abs(a[p]) * np.abs(z), rtol=1e-5, atol=1e-6)  # |R z| = |α| |z|
                assert np.allclose(z2, a[p] * np.exp(1j * t[p]) * z, rtol=1e-5, atol=1e-5)  # a rotation by θ
            else:
                assert np.allclose(out[:, j], a[j] * (np.exp(1j * t[j]) * z).real, rtol=1e-5, atol=1e-5)
                assert np.allclose(out[:, j2], a[j2] * (np.exp(1j * t[j2]) * z).imag, rtol=1e-5, atol=1e-5)


@pytest.mark.spec("ROAD-5")
def test_init_is_the_base_and_the_random_init_draws_peft_s_distributions():
    model = make_model()
    base = model(IDS).numpy()
    model.apply_road(variant="road_4", group_size=8, target_modules=("q_proj", "up_proj"))
    assert np.array_equal(model(IDS).numpy(), base)  # θ = 0, α = 1: R = I exactly
    for _, layer in layers(model, "default"):
        d = layer.adapters["default"]
        assert np.all(d.road_theta.data == 0) and np.all(d.road_alpha.data == 1)
    rnd = make_model()
    rnd.apply_road(variant="road_4", group_size=8, init_weights=False, target_modules=("up_proj",))
    t = np.concatenate([np.asarray(m.adapters["default"].road_theta.data) for _, m in layers(rnd, "default")])
    a = np.concatenate([np.asarray(m.adapters["default"].road_alpha.data) for _, m in layers(rnd, "default")])
    assert abs(t.std() - 0.5) < 0.05 and abs(t.mean()) < 0.05 and abs(a.std() - 0.5) < 0.05 and abs(a.mean() - 1) < 0.05
    assert max_rel_err(rnd(IDS), base) > 1e-3


@pytest.mark.spec("ROAD-7")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_only_theta_and_alpha_train_and_the_count_is_m_2m_4m(variant):
    model = make_model()
    model.apply_road(variant=variant, group_size=8, target_modules=("q_proj", "v_proj"))
    randomize(model)
    model(IDS).sum().backward()
    trained = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith((".road_theta", ".road_alpha")) for n in trained)
    assert all(p.grad is not None and np.abs(p.grad).max() > 0 for p in trained.values())
    # q_proj (32 outputs), v_proj (16 outputs), two layers: out, 2 out, 4 out numbers per layer
    assert model.parameter_counts()[0] == 2 * VARIANTS[variant] * (32 + 16)


@pytest.mark.spec("ROAD-7")
@pytest.mark.parametrize("kwargs, field", [(dict(variant="road_3"), "variant"), (dict(group_size=0), "group_size"),
                                           (dict(group_size=7), "group_size"),
                                           (dict(layers_to_transform=(0,)), "layers_to_transform")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        RoadConfig(**kwargs)


@pytest.mark.spec("ROAD-1")
def test_a_group_size_not_dividing_out_features_and_a_conv1d_are_refused():
    with pytest.raises(ConfigError, match="group_size"):
        make_model().apply_road(target_modules=("v_proj",))  # 16 outputs, group_size 64
    base, _ = one_layer("road_1", 2)
    base.fan_in_fan_out = True  # GPT-2's Conv1D layout
    with pytest.raises(ConfigError, match="torch.nn.Linear"):
        RoadLinear.create(base, RoadConfig(group_size=2), "c_attn", backend.RNG(0))


@pytest.mark.spec("ROAD-8")
def test_saved_keys_and_fields_are_peft_names(tmp_path):
    model = make_model()
    model.apply_road(variant="road_2", group_size=8, target_modules=("q_proj",))
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ROAD" and cfg["variant"] == "road_2" and cfg["group_size"] == 8 and cfg["init_weights"]
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in keys.items()} == {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.road_{m}": (32,) for i in (0, 1) for m in ("theta", "alpha")}


# ---- against PEFT (test_peft_oracle.py's tiny random Llama with q/k/v/o biases, so R b is exercised) -------
ORACLE = {v: ("llama", dict(variant=v, group_size=8, target_modules=["q_proj", "v_proj", "down_proj"]))
          for v in sorted(VARIANTS)}


@pytest.mark.oracle
@pytest.mark.spec("ROAD-3", "ROAD-6", "ROAD-7", "ROAD-8")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peft_and_minipeft_agree_both_ways_on_gradients_and_on_merge(lib, base, variant, tmp_path):
    from test_peft_oracle import (report_merge_and_unload, check_step_gradients, hf_logits, minipeft_saved_in_peft,
                                  perturbed_peft_model, report)
    kind, kw = ORACLE[variant]
    pm = perturbed_peft_model(lib, base, ORACLE[variant], "RoadConfig").eval()  # every road_theta, road_alpha moved
    pm.save_pretrained(tmp_path / "peft")
    model = mp.load_model(base(kind))
    model.load_adapters(str(tmp_path / "peft"))
    assert type(model.peft_configs["default"]) is RoadConfig
    assert model.parameter_counts()[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    report(f"RoAd {variant} PEFT -> minipeft", max_rel_err(model(IDS_O), hf_logits(lib, pm)))
    ours, theirs = minipeft_saved_in_peft(lib, base(kind), RoadConfig.from_peft(dict(peft_type="ROAD", **kw)),
                                          tmp_path / "ours")
    report(f"RoAd {variant} minipeft -> PEFT", max_rel_err(ours(IDS_O), hf_logits(lib, theirs)))
    check_step_gradients(lib, pm, base(kind), tmp_path / "grad", "road_theta|road_alpha", f"RoAd {variant}")
    report_merge_and_unload(lib, pm, base(kind), tmp_path / "merge", f"RoAd {variant}")


@pytest.mark.oracle
@pytest.mark.spec("ROAD-3")
def test_a_mixed_batch_equals_peft_s_adapter_names_forward(lib, base, tmp_path):
    """Two RoAd adapters (road_1, road_4) and the base in one batch: each row as PEFT's adapter_names gives it."""
    from test_peft_oracle import perturb_peft, report
    torch, _, peft = lib
    kind = "llama"
    from test_peft_oracle import hf_model
    pm = peft.get_peft_model(hf_model(lib, base(kind)), peft.RoadConfig(task_type="CAUSAL_LM", **ORACLE["road_1"][1]))
    pm.add_adapter("other", peft.RoadConfig(task_type="CAUSAL_LM", **ORACLE["road_4"][1]))
    perturb_peft(lib, pm)  # the active adapter's tensors only are trainable: move "other" too
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".other" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    pm.eval().save_pretrained(tmp_path)
    model = mp.load_model(base(kind))
    model.load_adapters(str(tmp_path))  # default, and other/ under its name (PEFT-7)
    assert sorted(model.peft_configs) == ["default", "other"]
    names = ["default", "other", "__base__"]
    ids = np.random.default_rng(2).integers(0, 64, (3, 9))
    with torch.no_grad():
        theirs = pm(torch.tensor(ids), adapter_names=names).logits.numpy()
        plain = pm(torch.tensor(ids), adapter_names=["__base__"] * 3).logits.numpy()
    assert all(max_rel_err(theirs[b], plain[b]) > 1e-3 for b in (0, 1)) and np.allclose(theirs[2], plain[2])
    report("RoAd mixed batch vs PEFT adapter_names", max_rel_err(model(ids, adapter_names=names), theirs))
