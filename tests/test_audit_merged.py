"""`minipeft audit merged` (spec/audit.md AUDIT-1..AUDIT-7): merged checkpoints written by minipeft for every
mergeable method pass with no findings; planted defects (one value merged wrong by 1e-3, a missing tensor, a
changed tensor the adapter does not touch, a layer left unmerged or scaled, bf16 rounding in a float32 file)
give the finding that names the tensor, and the exit status 1; bad input exits 2; the oracle tests audit
merged models written by PEFT's merge_and_unload + transformers' save_pretrained (float32 and bfloat16)."""
import json
import mmap
import os

import numpy as np
import pytest

import minipeft as mp
from minipeft.adapters.inject import linear_paths
from minipeft.adapters.registry import method, methods
from minipeft.audit import Checkpoint, audit_merged
from minipeft.audit.files import EMBEDDINGS
from minipeft.cli import main
from minipeft.safetensors_io import TensorFile, read_safetensors, write_safetensors
from tests.helpers import data_for, hf_llama_folder, tiny_llama
from tests.test_every_method import SMALL
from tests.test_models import CONFIGS, random_weights, write_folder

MERGEABLE = [m.name for m in methods() if m.is_adapter and m.mergeable and m.kind != "prompt"
             and not m.quantized_base and m.config.__module__.startswith("minipeft.")
             and not m.config.TARGET_TYPES]  # a method of norms (LN tuning) has no dW to audit
LORA_CASES = {"pissa": dict(init="pissa"), "olora": dict(init="olora"), "rslora": dict(use_rslora=True),
              "bias_all": dict(bias="all"), "lora_only": dict(bias="lora_only"), "lora_bias": dict(lora_bias=True),
              "modules_to_save": dict(modules_to_save=("lm_head",)),
              "all_linear": dict(target_modules="all-linear", rank_pattern={"down_proj": 2})}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random llama with q/k/v/o biases, saved as an HF folder by minipeft."""
    folder = str(tmp_path_factory.mktemp("base"))
    tiny_llama(0, attention_bias=True).save(folder)
    return folder


def perturb(model, seed=0, scale=0.1):
    rng = np.random.default_rng(seed)
    for _, p in model.net.named_parameters():
        if p.requires_grad:
            p.data = (p.data + rng.standard_normal(p.shape) * scale).astype(np.float32)


def written(base, tmp_path, name="lora", **kw):
    """(adapter folder, merged folder) of a perturbed `name` adapter on base, merged by minipeft."""
    model = mp.load_model(base)
    extra = {"total_step": 10} if name == "adalora" else data_for(method(name).config)  # EVA: from data
    extra.update(SMALL.get(name, {}))  # sizes that fit the tiny llama (FourierFT, SHiRA)
    getattr(model, f"apply_{name}")(**extra, **kw)
    perturb(model)
    model.save_adapters(str(tmp_path / "adapter"))
    model.merge_and_unload().save(str(tmp_path / "merged"))
    return str(tmp_path / "adapter"), str(tmp_path / "merged")


def rewrite(folder, change, dtypes=None):
    """Apply change(tensors) to folder's model.safetensors and write it back."""
    path = os.path.join(folder, "model.safetensors")
    tensors, meta = read_safetensors(path)
    change(tensors)
    write_safetensors(path, tensors, meta, dtypes)


def only(report, kind):
    found = [f for f in report.findings if f.kind == kind]
    assert len(found) == 1 and len(report.findings) == 1, [f.line() for f in report.findings]
    return found[0]


Q = "model.layers.1.self_attn.q_proj.weight"


@pytest.mark.spec("AUDIT-2", "AUDIT-4", "AUDIT-6")
@pytest.mark.parametrize("name", MERGEABLE)
def test_every_mergeable_method_merged_by_minipeft_passes(name, base, tmp_path):
    adapter, merged = written(base, tmp_path, name)
    r = audit_merged(base, adapter, merged)
    assert r.status == 0 and r.findings == [], [f.line() for f in r.findings]
    touched = [t for t in r.tensors if t.touched]
    moved = [t for t in touched if not (name == "beft" and t.name.endswith(".weight"))]  # BEFT moves biases only
    assert moved and all(t.changed > 1e-3 for t in moved)  # the adapter did change them
    assert max(t.max_rel for t in r.tensors) < 1e-6
    assert len(r.tensors) == len(Checkpoint(base).keys())


@pytest.mark.spec("AUDIT-2", "AUDIT-4")
@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_variants_merged_by_minipeft_pass(case, base, tmp_path):
    adapter, merged = written(base, tmp_path, **LORA_CASES[case])
    r = audit_merged(base, adapter, merged)
    assert r.status == 0 and r.findings == [], [f.line() for f in r.findings]
    if case in ("bias_all", "lora_bias", "modules_to_save"):  # the bias / head is among the changed tensors
        assert any(t.touched and not t.name.endswith("proj.weight") for t in r.tensors)


@pytest.mark.spec("AUDIT-2")
def test_a_rewriting_init_is_audited_against_the_original_base(base, tmp_path):
    """PiSSA's merged weight is W0 - s B0 A0 + s B A: the audit recomputes the residual as the load does."""
    adapter, merged = written(base, tmp_path, init="pissa")
    r = audit_merged(base, adapter, merged)
    B, A = read_safetensors(os.path.join(adapter, "adapter_model.safetensors"))[0], None
    assert r.status == 0
    W0 = read_safetensors(os.path.join(base, "model.safetensors"))[0][Q].astype(np.float64)
    W = read_safetensors(os.path.join(merged, "model.safetensors"))[0][Q].astype(np.float64)
    key = "base_model.model.model.layers.1.self_attn.q_proj."
    naive = W0 + 2.0 * B[key + "lora_B.weight"].astype(np.float64) @ B[key + "lora_A.weight"].astype(np.float64)
    assert np.max(np.abs(W - naive)) > 1e-2  # so plain W0 + s B A would have been the wrong expectation


@pytest.mark.spec("AUDIT-3", "AUDIT-4")
def test_one_value_merged_wrong_by_1e_3_is_named(base, tmp_path):
    adapter, merged = written(base, tmp_path)
    rewrite(merged, lambda t: t[Q].__setitem__((3, 5), t[Q][3, 5] + np.float32(1e-3)))
    r = audit_merged(base, adapter, merged)
    f = only(r, "wrong-merge")
    assert r.status == 1 and f.tensor == Q and f.file.endswith("model.safetensors")
    assert "(3, 5)" in f.message and "merge again" in f.message
    row = next(t for t in r.tensors if t.name == Q)
    assert not row.ok and abs(row.max_abs - 1e-3) < 1e-6 and row.max_rel == pytest.approx(row.max_abs / np.max(np.abs(
        read_safetensors(os.path.join(merged, "model.safetensors"))[0][Q])), rel=1e-3)


@pytest.mark.spec("AUDIT-4")
@pytest.mark.parametrize("factor,said", [(0.0, "not merged"), (2.0, "2 x dW")])
def test_a_layer_not_merged_or_scaled_is_diagnosed(factor, said, base, tmp_path):
    adapter, merged = written(base, tmp_path)
    W0 = read_safetensors(os.path.join(base, "model.safetensors"))[0][Q]
    rewrite(merged, lambda t: t.__setitem__(Q, W0 + np.float32(factor) * (t[Q] - W0)))
    f = only(audit_merged(base, adapter, merged), "wrong-merge")
    assert f.tensor == Q and said in f.message


@pytest.mark.spec("AUDIT-5")
def test_a_changed_tensor_the_adapter_does_not_touch_is_named(base, tmp_path):
    adapter, merged = written(base, tmp_path)  # q_proj and v_proj adapted
    key = "model.layers.0.mlp.down_proj.weight"
    rewrite(merged, lambda t: t[key].__setitem__((0, 0), t[key][0, 0] + np.float32(1e-3)))
    r = audit_merged(base, adapter, merged)
    f = only(r, "untouched-changed")
    assert r.status == 1 and f.tensor == key and "does not change" in f.message


@pytest.mark.spec("AUDIT-6")
def test_missing_extra_and_reshaped_tensors_are_named(base, tmp_path):
    adapter, merged = written(base, tmp_path)
    key = "model.layers.0.post_attention_layernorm.weight"
    rewrite(merged, lambda t: (t.pop(key), t.__setitem__("model.extra.weight", np.zeros(3, np.float32))))
    r = audit_merged(base, adapter, merged)
    assert r.status == 1
    assert sorted((f.kind, f.tensor) for f in r.findings) == [("extra-tensor", "model.extra.weight"),
                                                              ("missing-tensor", key)]
    rewrite(merged, lambda t: (t.pop("model.extra.weight"), t.__setitem__(key, np.ones(5, np.float32))))
    assert only(audit_merged(base, adapter, merged), "shape").tensor == key


@pytest.mark.spec("AUDIT-3")
def test_a_bf16_merge_is_judged_by_bf16_rounding_and_a_float32_one_by_tol(base, tmp_path):
    adapter, merged = written(base, tmp_path)
    names = read_safetensors(os.path.join(merged, "model.safetensors"))[0]
    rewrite(merged, lambda t: None, {k: "BF16" for k in names})  # the same merge stored in bfloat16
    r = audit_merged(base, adapter, merged)
    assert r.status == 0 and "BF16" in r.rule and "16-bit rounding" in r.rule
    assert max(t.max_rel for t in r.tensors if t.touched) > 1e-4  # bf16 rounding, allowed
    bf16 = read_safetensors(os.path.join(merged, "model.safetensors"))[0]
    rewrite(merged, lambda t: t.update(bf16))  # the bf16 values stored as float32: now judged by tol
    r = audit_merged(base, adapter, merged)
    assert r.status == 1 and {f.kind for f in r.findings} <= {"wrong-merge", "untouched-changed"}
    assert "BF16" not in r.rule


@pytest.mark.spec("AUDIT-1")
def test_cli_exit_status_text_and_json(base, tmp_path, capsys):
    adapter, merged = written(base, tmp_path)
    assert main(["audit", "merged", base, adapter, merged, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "audit merged: OK (no findings)" in out and "model.layers.0.self_attn.q_proj.weight" in out
    rewrite(merged, lambda t: t[Q].__setitem__((0, 0), t[Q][0, 0] + np.float32(1e-3)))
    assert main(["audit", "merged", base, adapter, merged, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["command"] == "audit merged" and report["status"] == 1
    assert [(f["kind"], f["tensor"]) for f in report["findings"]] == [("wrong-merge", Q)]
    assert main(["audit", "merged", base, str(tmp_path / "nowhere"), merged]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minipeft: error: ") and err.count("\n") == 1 and "nowhere" in err
    assert main(["audit", "merged", base, adapter, merged, "--tol", "1e-2"]) == 0  # a looser tolerance passes


@pytest.mark.spec("AUDIT-6")
def test_an_adapter_that_does_not_load_is_bad_input(base, tmp_path, capsys):
    adapter, merged = written(base, tmp_path)
    path = os.path.join(adapter, "adapter_model.safetensors")
    tensors, meta = read_safetensors(path)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][0, 0] = np.nan
    write_safetensors(path, tensors, meta)
    assert main(["audit", "merged", base, adapter, merged]) == 2
    assert "NaN" in capsys.readouterr().err


@pytest.mark.spec("AUDIT-7")
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_the_skeleton_has_the_models_linear_layers(family, tmp_path):
    folder = write_folder(tmp_path / family, CONFIGS[family], random_weights(CONFIGS[family]))
    net = mp.load_model(folder).net
    saved = set(read_safetensors(os.path.join(folder, "model.safetensors"))[0])

    def layers(root):
        return {p: (m.in_features, m.out_features, m.fan_in_fan_out, m.bias is not None)
                for p, m in ((p, root.get_submodule(p)) for p in linear_paths(root))}
    real = {p: v for p, v in layers(net).items() if f"{p}.weight" in saved}  # not a tied head
    assert layers(Checkpoint(folder).skeleton()) == real
    assert not any(p.rsplit(".", 1)[-1] in EMBEDDINGS for p in real)


@pytest.mark.spec("AUDIT-7")
def test_tensors_are_read_one_at_a_time_from_their_own_mapping(base, tmp_path, monkeypatch):
    f = TensorFile(os.path.join(base, "model.safetensors"))
    for key, info in f.infos.items():
        a = f.get(key)
        assert isinstance(a.base, mmap.mmap) and len(a.base) <= info.end - info.begin + mmap.ALLOCATIONGRANULARITY
    adapter, merged = written(base, tmp_path)
    whole = []
    import minipeft.audit.files as files
    monkeypatch.setattr(files, "read_safetensors", lambda p: whole.append(p) or read_safetensors(p))
    assert audit_merged(base, adapter, merged).status == 0
    assert whole == [os.path.join(adapter, "adapter_model.safetensors")]  # only the adapter is read whole


@pytest.mark.spec("AUDIT-7")
def test_tensors_the_adapter_does_not_touch_are_read_in_blocks_never_mapped(base, tmp_path, monkeypatch):
    """A mapping keeps every page it touched resident (a 0.5B audit peaked at 1277 MB RSS that way, two mapped
    embeddings): untouched tensors and MERGED's are read BLOCK values at a time instead."""
    import minipeft.audit.merged as merged_mod
    from minipeft.safetensors_io import TensorFile as TF
    adapter, merged = written(base, tmp_path)
    mapped, ranges = [], []
    get, read_flat = TF.get, TF.read_flat
    monkeypatch.setattr(TF, "get", lambda self, key: mapped.append(key) or get(self, key))
    monkeypatch.setattr(TF, "read_flat", lambda self, key, s, n: ranges.append((key, n)) or read_flat(self, key, s, n))
    monkeypatch.setattr(merged_mod, "BLOCK", 100)
    assert audit_merged(base, adapter, merged).status == 0
    embed = "model.embed_tokens.weight"
    assert embed not in mapped and (embed, 100) in ranges  # the embedding: in blocks of BLOCK values
    assert all(n == 100 for _, n in ranges)
    assert set(mapped) <= {f"{p}.{leaf}" for p in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                                  "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj")
                           for leaf in ("weight", "bias")}  # only the adapted layers' W0 and b0 (read whole, small)


# ---- oracle: merged models written by PEFT + transformers ------------------------------------------------------
HF = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64, attention_bias=True, tie_word_embeddings=False)
PEFT_CASES = {"lora": ("LoraConfig", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
              "rslora_bias": ("LoraConfig", dict(r=4, lora_alpha=8, use_rslora=True, bias="all",
                                                 target_modules=["q_proj", "k_proj"], modules_to_save=["lm_head"])),
              "dora": ("LoraConfig", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])),
              "loha": ("LoHaConfig", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
              "lokr": ("LoKrConfig", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
              "ia3": ("IA3Config", dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
              "vera": ("VeraConfig", dict(r=4, target_modules=["q_proj", "v_proj"], save_projection=True))}


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return hf_llama_folder(str(tmp_path_factory.mktemp("hf-base")), **HF)


def peft_merged(hf_base, tmp_path, case, dtype="float32"):
    """PEFT's adapter of `case` (every trainable tensor moved) and its merge_and_unload, saved by
    transformers' save_pretrained in `dtype`: (adapter folder, merged folder)."""
    import peft
    import torch
    import transformers
    cls, kw = PEFT_CASES[case]
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    pm = peft.get_peft_model(hf, getattr(peft, cls)(**kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(str(tmp_path / "adapter"))
    if dtype == "bfloat16":  # merged in bf16, as a bf16 model is: W0, dW and the sum rounded to bf16
        pm = pm.to(torch.bfloat16)
    pm.merge_and_unload().save_pretrained(str(tmp_path / "merged"))
    return str(tmp_path / "adapter"), str(tmp_path / "merged")


@pytest.mark.oracle
@pytest.mark.spec("AUDIT-2", "AUDIT-4", "AUDIT-6")
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_a_model_merged_by_peft_passes(case, hf_base, tmp_path):
    pytest.importorskip("peft")
    adapter, merged = peft_merged(hf_base, tmp_path, case)
    r = audit_merged(hf_base, adapter, merged)
    assert r.status == 0 and r.findings == [], [f.line() for f in r.findings]
    worst = max(t.max_rel for t in r.tensors if t.touched)
    print(f"\n  {case} merged by PEFT: max rel err {worst:.2e}")
    assert worst < 1e-6 and any(t.touched and t.changed > 1e-2 for t in r.tensors)


@pytest.mark.oracle
@pytest.mark.spec("AUDIT-3")
def test_a_bf16_merge_by_peft_passes_under_bf16_rounding_and_a_planted_error_is_found(hf_base, tmp_path):
    pytest.importorskip("peft")
    adapter, merged = peft_merged(hf_base, tmp_path, "lora", "bfloat16")
    r = audit_merged(hf_base, adapter, merged)
    assert r.status == 0 and "BF16" in r.rule, [f.line() for f in r.findings]
    key = "model.layers.0.self_attn.v_proj.weight"
    rewrite(merged, lambda t: t[key].__setitem__((1, 2), t[key][1, 2] + np.float32(0.05)), {k: "BF16" for k in
            read_safetensors(os.path.join(merged, "model.safetensors"))[0]})
    assert only(audit_merged(hf_base, adapter, merged), "wrong-merge").tensor == key


@pytest.mark.oracle
@pytest.mark.spec("AUDIT-3", "AUDIT-4", "AUDIT-5")
def test_a_float32_peft_merge_tampered_by_1e_3_is_caught(hf_base, tmp_path):
    pytest.importorskip("peft")
    adapter, merged = peft_merged(hf_base, tmp_path, "lora")
    key, other = "model.layers.1.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"
    rewrite(merged, lambda t: t[key].__setitem__((2, 7), t[key][2, 7] + np.float32(1e-3)))
    f = only(audit_merged(hf_base, adapter, merged), "wrong-merge")
    assert f.tensor == key and "(2, 7)" in f.message
    rewrite(merged, lambda t: (t[key].__setitem__((2, 7), t[key][2, 7] - np.float32(1e-3)),
                               t[other].__setitem__((0, 1), t[other][0, 1] + np.float32(1e-3))))
    assert only(audit_merged(hf_base, adapter, merged), "untouched-changed").tensor == other


@pytest.mark.spec("AUDIT-3", "AUDIT-7")
def test_tensors_compared_in_blocks_give_the_same_findings(base, tmp_path, monkeypatch):
    """compare() reads BLOCK values at a time: with blocks of 7 values, errors planted in two blocks of the
    untouched embedding and of an adapted layer are counted and located as with one block."""
    import minipeft.audit.merged as merged_module
    adapter, merged = written(base, tmp_path)
    emb = "model.embed_tokens.weight"

    def plant(t):
        for key in (emb, Q):
            t[key][0, 3] += np.float32(1e-3)
            t[key][2, 5] += np.float32(1e-3)
    rewrite(merged, plant)
    whole = audit_merged(base, adapter, merged)
    monkeypatch.setattr(merged_module, "BLOCK", 7)
    blocks = audit_merged(base, adapter, merged)
    assert [f.line() for f in blocks.findings] == [f.line() for f in whole.findings]
    assert sorted(f.kind for f in blocks.findings) == ["untouched-changed", "wrong-merge"]
    assert all("2 of" in f.message and "first at (0, 3)" in f.message for f in blocks.findings)
    assert [(t.max_abs, t.max_rel, t.changed) for t in blocks.tensors] == [(t.max_abs, t.max_rel, t.changed)
                                                                          for t in whole.tensors]
