"""spec/kasa.md (KASA-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy
float64 from the spec's formula: W0_t = W0 without its r smallest singular directions, dW = s B diag(d) A;
and (oracle) against PEFT 0.21.2's LoraConfig(kasa_config=...) on a random Llama."""
import json
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close, max_rel_err
from one_layer import check_refuses_a_4bit_base, check_train_moves_every_leaf
from minipeft import backend
from minipeft.adapters.kasa import KaSAConfig, KaSALinear
from minipeft.adapters.lora import LoRAConfig
from minipeft.errors import ConfigError
from minipeft.safetensors_io import read_safetensors
from test_dora import SETTINGS, targets
from test_hira import randomize
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, plain_logits, snapshot
from test_peft_oracle import V, base, lib  # noqa: F401 (fixtures)
from test_peft_oracle import check_both_ways_and_merged, hf_logits, hf_model, perturbed_peft_model
from test_peft_oracle import IDS as OIDS, report, report_gradients


PEFT_NAME = re.compile(r"base_model\.model\.(.+)\.(lora_A|lora_B|lora_diag)\.default(\.weight|\.bias)?$")


def our_name(peft_name: str) -> str:
    """minipeft's name of a PEFT LoRA-variant parameter (<path>.lora_A.default.weight: <path>.adapters.default.lora_A.weight)."""
    return "{}.adapters.default.{}{}".format(*PEFT_NAME.match(peft_name).groups(default=""))


def truncated_np(W0, r):
    """KASA-1 in float64: W0 without its r smallest singular directions."""
    U, S, Vh = np.linalg.svd(W0.astype(np.float64), full_matrices=False)
    k = S.size - r
    return (U[:, :k] * S[:k]) @ Vh[:k]


def factors(d):
    A, B, diag = (np.asarray(t.data, np.float64) for t in (d.lora_A.weight, d.lora_B.weight, d.lora_diag))
    return A, B, diag


def truncated_weights(model, W, r):
    """W with each adapted layer's weight replaced by truncated_np (the base the adapter runs on)."""
    out = dict(W)
    for path, _ in layers(model, "default"):
        out[path + ".weight"] = truncated_np(W[path + ".weight"], r).astype(np.float32)
    return out


@pytest.mark.spec("KASA-1", "KASA-3", "KASA-4")
@SETTINGS
@given(r=st.integers(1, 8), alpha=st.floats(0.5, 32), tm=targets, rslora=st.booleans())
def test_forward_and_merge_are_truncated_W0_plus_s_B_diag_A(r, alpha, tm, rslora):
    model = make_model()
    W = snapshot(model)
    model.apply_kasa(rank=r, alpha=alpha, target_modules=tm, use_rslora=rslora)
    Wt = truncated_weights(model, W, r)
    for path, layer in layers(model, "default"):
        W0 = np.asarray(layer.base_layer.weight.data, np.float64)
        assert_close(W0, Wt[path + ".weight"], 1e-5, atol=1e-6, label="W0_t")
        S = np.linalg.svd(W0, compute_uv=False)
        S0 = np.linalg.svd(W[path + ".weight"].astype(np.float64), compute_uv=False)
        assert np.all(S[-r:] < 1e-5 * S0[0]) and np.allclose(S[:-r], S0[:-r], rtol=1e-5)  # the r smallest are gone
    randomize(model)
    updates = {}
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        A, B, diag = factors(d)
        s = alpha / np.sqrt(r) if rslora else alpha / r
        assert d.s == pytest.approx(s)
        updates[path + ".weight"] = s * (B * diag) @ A
    check_forward_merge_unmerge(model, Wt, updates)


@pytest.mark.spec("KASA-2")
def test_init_is_the_truncated_base_with_B_zero_and_d_standard_normal():
    model = make_model()
    W = snapshot(model)
    before = model(IDS).numpy()
    model.apply_kasa(rank=4, target_modules=("q_proj", "up_proj"))
    assert max_rel_err(model(IDS), before) > 1e-3  # the truncation moves the output at step 0
    assert_close(model(IDS), plain_logits(truncated_weights(model, W, 4)), 1e-5, label="init vs truncated base")
    diag = np.concatenate([np.asarray(m.adapters["default"].lora_diag.data) for _, m in layers(model, "default")])
    for _, layer in layers(model, "default"):
        assert np.all(layer.adapters["default"].lora_B.weight.data == 0)
    wide = make_model()
    wide.apply_kasa(rank=30, target_modules=("q_proj", "o_proj", "up_proj", "gate_proj", "down_proj"))
    d = np.concatenate([np.asarray(m.adapters["default"].lora_diag.data) for _, m in layers(wide, "default")])
    assert d.size == 300 and abs(d.std() - 1) < 0.15 and abs(d.mean()) < 0.2 and diag.size == 16  # N(0, 1)


@pytest.mark.spec("KASA-5")
def test_A_B_and_d_train_and_the_count_is_r_in_plus_out_plus_1():
    model = make_model()
    model.apply_kasa(rank=4, target_modules=("q_proj", "v_proj"))
    randomize(model)
    model(IDS).sum().backward()
    trained = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith((".lora_A.weight", ".lora_B.weight", ".lora_diag")) for n in trained)
    assert all(p.grad is not None and np.abs(p.grad).max() > 0 for p in trained.values())
    assert model.parameter_counts()[0] == 2 * 4 * ((32 + 32 + 1) + (32 + 16 + 1))  # q (32 -> 32), v (32 -> 16)


@pytest.mark.spec("KASA-5")
def test_training_moves_every_leaf():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_kasa(rank=4, target_modules=("q_proj", "v_proj"))
    check_train_moves_every_leaf(model)


@pytest.mark.spec("KASA-6")
@pytest.mark.parametrize("beta, gamma", [(1e-4, 1e-3), (0.5, 0.25), (0.0, 0.0)])
def test_the_regulariser_is_beta_d_squared_plus_gamma_orthogonality(beta, gamma):
    model = make_model()
    model.apply_kasa(rank=3, target_modules=("k_proj", "down_proj"), kasa_config={"beta": beta, "gamma": gamma})
    randomize(model)
    want = 0.0
    for _, layer in layers(model, "default"):
        A, B, diag = factors(layer.adapters["default"])
        I = np.eye(3)
        want += beta * np.sum(diag ** 2) + gamma * (np.linalg.norm(B.T @ B - I) + np.linalg.norm(A @ A.T - I))
    assert float(model.regularization().numpy()) == pytest.approx(want, rel=1e-5, abs=1e-12)
    model.regularization().backward()  # d/dd of beta ||d||^2 = 2 beta d
    for _, layer in layers(model, "default"):
        d = layer.adapters["default"].lora_diag
        assert_close(d.grad, 2 * beta * np.asarray(d.data, np.float64), 1e-5, atol=1e-12, label="dR/dd")


@pytest.mark.spec("KASA-1", "KASA-5")
@pytest.mark.parametrize("kwargs, field", [
    (dict(rank=16, target_modules=("v_proj",)), r"rank \(for model.layers.0.self_attn.v_proj\)"),  # min(32, 16) = 16
    (dict(kasa_config={"beta": -1.0}), r"kasa_config\['beta'\]"),
    (dict(kasa_config={"gamma": "big"}), r"kasa_config\['gamma'\]"),
    (dict(kasa_config={"delta": 1.0}), "kasa_config"),
    (dict(init="pissa"), "init"),
    (dict(rank=0), "rank")])
def test_bad_config_names_the_field_and_leaves_the_model_as_it_was(kwargs, field):
    model = make_model()
    W = snapshot(model)
    with pytest.raises(ConfigError, match=field):
        model.apply_kasa(**{"target_modules": ("q_proj", "v_proj"), **kwargs})
    assert all(np.array_equal(p.data, W[n]) for n, p in model.net.named_parameters())  # nothing truncated


@pytest.mark.spec("KASA-1")
def test_a_4bit_base_and_gpt2_conv1d_are_refused():
    check_refuses_a_4bit_base("kasa")
    from minipeft.nn.layers import Conv1D
    with pytest.raises(ConfigError, match=r"c_attn.*torch.nn.Linear only"):
        KaSALinear.create_all({"h.0.attn.c_attn": Conv1D(8, 24)}, KaSAConfig(rank=2), backend.RNG(0))


@pytest.mark.spec("KASA-7")
def test_saved_keys_and_fields_are_peft_names_and_the_folder_loads_as_kasa(tmp_path):
    model = make_model()
    model.apply_kasa(rank=4, target_modules=("q_proj",), kasa_config={"gamma": 0.01})
    randomize(model)
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["kasa_config"] == {"beta": 1e-4, "gamma": 0.01}
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in keys.items()} == {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.{m}": s for i in (0, 1)
        for m, s in (("lora_A.weight", (4, 32)), ("lora_B.weight", (32, 4)), ("lora_diag", (4,)))}
    again = make_model()
    again.load_adapters(str(tmp_path))  # the original base: truncated again as the adapter is made
    assert type(again.peft_configs["default"]) is KaSAConfig
    assert np.array_equal(again(IDS).numpy(), model(IDS).numpy())
    cfg["kasa_config"] = None  # PEFT's plain LoRA: kasa_config null, so lora_diag is a key no LoRA has
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    plain = make_model()
    with pytest.raises(Exception, match="lora_diag"):
        plain.load_adapters(str(tmp_path))
    assert KaSAConfig.from_peft(dict(cfg, kasa_config={})).kasa_config == {"beta": 1e-4, "gamma": 1e-3}
    assert type(LoRAConfig.from_peft(cfg)) is LoRAConfig


# ---- against PEFT ---------------------------------------------------------------------------------------
CASES = {"basic": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], kasa_config={})),
         "rslora_mlp": ("llama", dict(r=3, lora_alpha=6, use_rslora=True,
                                      target_modules=["q_proj", "gate_proj", "down_proj"],
                                      kasa_config={"beta": 0.01, "gamma": 0.1})),
         "patterns_bias": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                         rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 3}, lora_bias=True,
                                         kasa_config={"beta": 0.5, "gamma": 0.2})),
         "all_linear_dropout": ("llama64", dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear",
                                                kasa_config={}))}


@pytest.mark.oracle
@pytest.mark.spec("KASA-1", "KASA-3", "KASA-4", "KASA-7")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, case, tmp_path):
    kind, _ = CASES[case]
    pm = perturbed_peft_model(lib, base, CASES[case], "LoraConfig").eval()  # every lora_A, lora_B, lora_diag moved
    check_both_ways_and_merged(lib, pm, base(kind), tmp_path, f"KaSA {case}")
    model = mp.load_model(base(kind))
    model.load_adapters(str(tmp_path / "peft"))
    assert type(model.peft_configs["default"]) is KaSAConfig


@pytest.mark.oracle
@pytest.mark.spec("KASA-1", "KASA-2", "KASA-5")
@pytest.mark.parametrize("case", ["basic", "patterns_bias"])
def test_init_equals_peft_s_truncated_base_and_the_count_is_peft_s(lib, base, case):
    peft = lib[2]
    kind, kw = CASES[case]
    hf = peft.get_peft_model(hf_model(lib, base(kind)), peft.LoraConfig(task_type="CAUSAL_LM", **kw)).eval()
    model = mp.load_model(base(kind))
    model.apply_adapter(KaSAConfig.from_peft(dict(peft_type="LORA", **kw)))
    report(f"KaSA {case} init vs PEFT's init", max_rel_err(model(OIDS), hf_logits(lib, hf)))
    sd = {k: v.detach().numpy() for k, v in hf.base_model.model.state_dict().items()}
    for path, layer in layers(model, "default"):  # W0_t itself, not only the logits
        report(f"KaSA {case} W0_t {path}", max_rel_err(layer.base_layer.weight.data, sd[f"{path}.base_layer.weight"]))
    assert model.parameter_counts()[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)


@pytest.mark.oracle
@pytest.mark.spec("KASA-5", "KASA-6")
@pytest.mark.parametrize("case", ["rslora_mlp", "patterns_bias"])
def test_gradients_of_loss_plus_regulariser_equal_peft_s(lib, base, case, tmp_path):
    """Cross-entropy + PEFT's LoraModel._get_kasa_loss() in PEFT, + model.regularization() here (KASA-6)."""
    from minipeft.autograd import Tensor
    from minipeft.autograd import functional as F
    torch = lib[0]
    kind, _ = CASES[case]
    pm = perturbed_peft_model(lib, base, CASES[case], "LoraConfig").eval()
    pm.save_pretrained(tmp_path)
    reg = pm.base_model._get_kasa_loss()
    logits = pm(torch.tensor(OIDS)).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), torch.tensor(OIDS[:, 1:]).reshape(-1))
    (ce + reg).backward()
    theirs = {our_name(n): p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
    model = mp.load_model(base(kind))
    model.load_adapters(str(tmp_path))
    ours = model.regularization()
    report(f"KaSA {case} regulariser vs _get_kasa_loss", max_rel_err(ours, reg.detach().numpy()))
    out = model(OIDS)
    (F.cross_entropy(out[:, :-1].reshape(-1, V), Tensor(OIDS[:, 1:].reshape(-1))) + ours).backward()
    report_gradients(f"KaSA {case}", model, theirs)
