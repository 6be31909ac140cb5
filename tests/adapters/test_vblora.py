"""spec/vblora.md (VBLORA-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy
float64 from the spec's formulas; and (oracle) against PEFT's VBLORA on Llama and GPT-2, both ways, on merge,
on PEFT's init, its parameter count and its save_only_topk_weights files."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_close, max_rel_err
from minipeft.adapters.vblora import VBLoRAConfig, mix
from minipeft.autograd import Tensor
from minipeft.errors import CheckpointError, ConfigError, TrainingError
from minipeft.safetensors_io import read_safetensors, write_safetensors
from test_dora import SETTINGS, targets
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import V, base, check_both_ways_and_merged, lib, perturbed_peft_model  # noqa: F401 (fixtures)

SMALL = dict(num_vectors=16, vector_length=8)


def mix_np(z, bank, k):
    """VBLORA-1 in float64: top-k (stable, lower index on ties), softmax, weighted sum of bank rows."""
    z, bank = np.asarray(z, np.float64), np.asarray(bank, np.float64)
    idx = np.argsort(-z, axis=-1, kind="stable")[..., :k]
    zk = np.take_along_axis(z, idx, -1)
    w = np.exp(zk - zk.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return (w[..., None] * bank[idx]).sum(-2)


def factors_np(d):
    """VBLORA-2: A (r, in), B (out, r)."""
    bank, k = d.vblora_vector_bank.data, d.k
    zA, zB = d.vblora_logits_A.data, d.vblora_logits_B.data
    A = mix_np(zA, bank, k).reshape(zA.shape[0], -1)
    B = mix_np(zB, bank, k).transpose(0, 2, 1).reshape(-1, zB.shape[1])
    return A, B


@pytest.mark.spec("VBLORA-1")
@SETTINGS
@given(k=st.integers(1, 4), N=st.integers(4, 12), seed=st.integers(0, 99))
def test_mix_is_a_topk_softmax_of_bank_rows_and_its_gradient_reaches_only_them(k, N, seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((5, N)).astype(np.float32)
    z[0, :] = 0.0  # all tied: the lower indices win
    bank = rng.standard_normal((N, 3)).astype(np.float32)
    zt, bt = Tensor(z, requires_grad=True), Tensor(bank, requires_grad=True)
    out = mix(zt, bt, k)
    assert_close(out, mix_np(z, bank, k), 1e-5, atol=1e-6, label="mix")
    assert_close(out.data[0], bank[:k].astype(np.float64).mean(0), 1e-5, atol=1e-6, label="ties -> lower indices")
    G = rng.standard_normal(out.shape)
    (out * Tensor(G.astype(np.float32))).sum().backward()
    idx = np.argsort(-z, -1, kind="stable")[:, :k]
    chosen = np.zeros(z.shape, bool)
    np.put_along_axis(chosen, idx, True, -1)
    assert np.all(zt.grad[~chosen] == 0) and np.all(bt.grad[np.setdiff1d(np.arange(N), idx)] == 0)
    eps = 1e-6  # central differences in float64 on the reference formula
    for (t, x) in ((zt, z), (bt, bank)):
        v = rng.standard_normal(x.shape)
        v[0] *= t is bt  # row 0 of z is a tie: moving it changes the choice (mix is not smooth there)
        f = (lambda y: np.sum(mix_np(y, bank, k) * G)) if t is zt else (lambda y: np.sum(mix_np(z, y, k) * G))
        num = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
        assert abs(np.sum(t.grad * v) - num) <= 1e-4 * (1 + abs(num))


@pytest.mark.spec("VBLORA-2", "VBLORA-3", "VBLORA-4")
@SETTINGS
@given(r=st.integers(1, 4), k=st.integers(1, 3), tm=targets)
def test_forward_and_merge_are_W0_plus_B_A(r, k, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_vblora(rank=r, topk=k, target_modules=tm, **SMALL)
    updates = {}
    for p, layer in layers(model, "default"):
        A, B = factors_np(layer.adapters["default"])
        updates[p + ".weight"] = B @ A
        assert A.shape == (r, layer.base_layer.in_features) and B.shape == (layer.base_layer.out_features, r)
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("VBLORA-5")
def test_init_draws_the_bank_uniform_and_the_logits_normal():
    model = make_model()
    base = model(IDS).numpy()
    model.apply_vblora(target_modules=("q_proj", "up_proj"), num_vectors=64, vector_length=16,
                       init_vector_bank_bound=0.05, init_logits_std=0.3)
    bank = np.asarray(model.shared_tensors["default"]["vblora_vector_bank"].data)
    assert bank.shape == (64, 16) and np.abs(bank).max() <= 0.05 and abs(bank.std() - 0.05 / np.sqrt(3)) < 0.003
    z = np.concatenate([np.asarray(t.data).ravel() for _, m in layers(model, "default")
                        for t in (m.adapters["default"].vblora_logits_A, m.adapters["default"].vblora_logits_B)])
    assert abs(z.std() - 0.3) < 0.01 and abs(z.mean()) < 0.01
    assert max_rel_err(model(IDS), base) > 1e-4  # dW = B A != 0 at step 0, as PEFT


@pytest.mark.spec("VBLORA-6")
def test_only_the_bank_and_logits_train_and_the_count():
    model = make_model()
    model.apply_vblora(rank=4, target_modules=("q_proj", "v_proj"), **SMALL)
    model(IDS).sum().backward()
    trained = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert all(n.endswith((".vblora_logits_A", ".vblora_logits_B", ".vblora_vector_bank")) for n in trained)
    assert sum(n.endswith(".vblora_vector_bank") for n in trained) == 1  # one bank, shared
    assert all(p.grad is not None and np.abs(p.grad).max() > 0 for p in trained.values())
    # bank 16 x 8; q_proj (32 -> 32), v_proj (32 -> 16) at r = 4, N = 16, L = 8, two layers
    assert model.parameter_counts()[0] == 16 * 8 + 2 * 4 * 16 * ((32 + 32) + (32 + 16)) // 8


@pytest.mark.spec("VBLORA-6")
@pytest.mark.parametrize("kwargs, field", [(dict(rank=0), "rank"), (dict(topk=0), "topk"), (dict(topk=20), "topk"),
                                           (dict(num_vectors=0), "num_vectors"), (dict(dropout=1.0), "dropout"),
                                           (dict(init_logits_std=-1.0), "init_logits_std"), (dict(bias="x"), "bias")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        VBLoRAConfig(**{**SMALL, **kwargs})


@pytest.mark.spec("VBLORA-6")
def test_a_vector_length_that_does_not_divide_a_layer_names_it():
    model = make_model()
    with pytest.raises(ConfigError, match=r"vector_length.*v_proj has out_features=16"):
        model.apply_vblora(num_vectors=8, vector_length=32, target_modules=("v_proj",))
    assert not model.peft_configs


@pytest.mark.spec("VBLORA-7")
def test_saved_keys_and_fields_are_peft_names(tmp_path):
    model = make_model()
    model.apply_vblora(rank=4, dropout=0.1, target_modules=("q_proj",), **SMALL)
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "VBLORA" and cfg["r"] == 4 and cfg["vblora_dropout"] == 0.1 and cfg["topk"] == 2
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    want = {f"base_model.model.model.layers.{i}.self_attn.q_proj.vblora_logits_{m}": s for i in (0, 1)
            for m, s in (("A", (4, 4, 16)), ("B", (4, 4, 16)))}
    assert {k: v.shape for k, v in keys.items()} == {**want, "base_model.vblora_vector_bank": (16, 8)}


@pytest.mark.spec("VBLORA-8")
def test_topk_files_rebuild_the_forward_and_refuse_training(tmp_path):
    model = make_model()
    model.apply_vblora(rank=2, topk=3, save_only_topk_weights=True, target_modules=("q_proj", "down_proj"), **SMALL)
    out = model(IDS).numpy()
    model.save_adapters(str(tmp_path))
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.vblora_logits_A"
    assert keys[key + "_topk_indices"].dtype == np.uint8 and keys[key + "_topk_indices"].shape == (2, 4, 3)
    assert keys[key + "_topk_weights"].shape == (2, 4, 2) and key not in keys
    z = model.net.get_submodule("model.layers.0.self_attn.q_proj").adapters["default"].vblora_logits_A.data
    top = np.sort(z, -1)[..., ::-1][..., :3]
    w = np.exp(top - top.max(-1, keepdims=True))
    assert_close(keys[key + "_topk_weights"], (w / w.sum(-1, keepdims=True))[..., :2], 1e-6, label="weights")
    again = make_model()
    again.load_adapters(str(tmp_path))
    assert_close(again(IDS), out, 1e-5, label="top-k file -> forward")
    again.net.train()
    with pytest.raises(TrainingError, match="save_only_topk_weights"):
        again(IDS)
    keys[key + "_topk_indices"] = (keys[key + "_topk_indices"] + 20).astype(np.uint8)  # outside the 16 vectors
    write_safetensors(str(tmp_path / "adapter_model.safetensors"), keys, {"format": "pt"})
    with pytest.raises(CheckpointError, match="outside the bank"):
        make_model().load_adapters(str(tmp_path))


# ---- against PEFT ---------------------------------------------------------------------------------------
CASES = {"llama": ("llama", dict(r=4, num_vectors=16, vector_length=8, topk=2,
                                 target_modules=["q_proj", "v_proj", "down_proj"])),
         "gpt2": ("gpt2", dict(r=3, num_vectors=12, vector_length=16, topk=3, target_modules=["c_attn", "c_fc"],
                               fan_in_fan_out=True))}


@pytest.mark.oracle
@pytest.mark.spec("VBLORA-2", "VBLORA-3", "VBLORA-4", "VBLORA-7")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, case, tmp_path):
    kind, kw = CASES[case]
    pm = perturbed_peft_model(lib, base, CASES[case], "VBLoRAConfig").eval()  # the bank and every logit moved
    moved = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert any("vblora_vector_bank" in n for n in moved) and any("vblora_logits_B" in n for n in moved)
    ids = np.random.default_rng(1).integers(0, V, (2, 7))
    check_both_ways_and_merged(lib, pm, base(kind), tmp_path, f"VB-LoRA {case}", ids)


@pytest.mark.oracle
@pytest.mark.spec("VBLORA-5", "VBLORA-6")
def test_init_and_parameter_count_are_peft_s(lib, base):
    import minipeft
    peft = lib[2]
    kw = dict(r=4, num_vectors=32, vector_length=8, init_vector_bank_bound=0.05, init_logits_std=0.2,
              target_modules=["q_proj", "v_proj", "down_proj"])
    pm = peft.get_peft_model(
        __import__("test_peft_oracle").hf_model(lib, base()), peft.VBLoRAConfig(task_type="CAUSAL_LM", **kw))
    model = minipeft.load_model(base())
    model.apply_adapter(VBLoRAConfig.from_peft(dict(peft_type="VBLORA", **kw)))
    assert model.parameter_counts()[0] == pm.get_nb_trainable_parameters()[0]
    theirs = {n: p.detach().numpy() for n, p in pm.named_parameters() if p.requires_grad}
    bank_t = next(v for n, v in theirs.items() if "vector_bank" in n)
    bank_o = np.asarray(model.shared_tensors["default"]["vblora_vector_bank"].data)
    assert bank_t.shape == bank_o.shape and max(np.abs(bank_t).max(), np.abs(bank_o).max()) <= 0.05
    assert abs(bank_t.std() - bank_o.std()) < 0.004  # both U(-0.05, 0.05): std 0.029
    z_t = np.concatenate([v.ravel() for n, v in theirs.items() if "logits" in n])
    z_o = np.concatenate([np.asarray(p.data).ravel() for n, p in model.net.named_parameters() if "logits" in n])
    assert z_t.size == z_o.size and abs(z_t.std() - 0.2) < 0.01 and abs(z_o.std() - 0.2) < 0.01


@pytest.mark.oracle
@pytest.mark.spec("VBLORA-8")
def test_topk_files_go_both_ways_with_peft(lib, base, tmp_path):
    import minipeft
    torch, _, peft = lib
    case = ("llama", dict(r=4, num_vectors=300, vector_length=8, topk=3, save_only_topk_weights=True,
                          target_modules=["q_proj", "v_proj"]))  # N >= 256: int16 indices
    pm = perturbed_peft_model(lib, base, case, "VBLoRAConfig").eval()
    pm.save_pretrained(tmp_path / "peft")
    again = peft.PeftModel.from_pretrained(__import__("test_peft_oracle").hf_model(lib, base()), str(tmp_path / "peft"))
    with torch.no_grad():
        theirs = again.eval()(torch.tensor(IDS % V)).logits.numpy()  # PEFT's own reading of its top-k file
    model = minipeft.load_model(base())
    model.load_adapters(str(tmp_path / "peft"))
    err = max_rel_err(model(IDS % V), theirs)
    print(f"\n  VB-LoRA top-k PEFT->minipeft: max rel err {err:.2e}")
    assert err < 1e-5
    model.save_adapters(str(tmp_path / "ours"))
    ours, _ = read_safetensors(str(tmp_path / "ours" / "adapter_model.safetensors"))
    peft_keys, _ = read_safetensors(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in peft_keys.items()}
    back = peft.PeftModel.from_pretrained(__import__("test_peft_oracle").hf_model(lib, base()), str(tmp_path / "ours"))
    with torch.no_grad():
        err = max_rel_err(model(IDS % V), back.eval()(torch.tensor(IDS % V)).logits.numpy())
    print(f"  VB-LoRA top-k minipeft->PEFT: max rel err {err:.2e}")
    assert err < 1e-5
