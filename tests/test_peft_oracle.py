"""LoRA against HF PEFT (spec/lora.md, spec/peft-format.md): adapters saved by PEFT load in minipeft
and vice versa with equal logits, merged models load in transformers, and merge_adapters agrees
with PEFT's add_weighted_adapter. The base is a tiny random Llama with q/k/v/o biases (so that
bias="all", "lora_only" and lora_bias have something to act on), weights drawn with std 0.3.
Every LoRA tensor is perturbed with seeded noise, so B != 0 and a wrong key, orientation or
scaling shows in the logits. Run with `pytest -s` to see each case's max relative error."""
import json
import os

import numpy as np
import pytest

import minipeft
from helpers import data_for, max_rel_err
from test_every_method import SMALL
from minipeft.adapters.lora import LoRAConfig

pytestmark = pytest.mark.oracle

V, TOL = 64, 1e-5
IDS = np.random.default_rng(1).integers(0, V, (2, 9))
LLAMA = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, attention_bias=True, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def lib():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    return torch, transformers, peft


@pytest.fixture(scope="module")
def base(lib, tmp_path_factory):
    """kind -> folder of a tiny random HF model saved with save_pretrained ("llama64": hidden 64, intermediate 128)."""
    torch, transformers, _ = lib
    folders = {}

    def get(kind="llama"):
        if kind not in folders:
            torch.manual_seed(0)
            if kind.startswith("llama"):
                wide = dict(hidden_size=64, intermediate_size=128) if kind == "llama64" else {}
                cfg, cls = transformers.LlamaConfig(**{**LLAMA, **wide}), transformers.LlamaForCausalLM
            else:
                cfg, cls = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128), \
                    transformers.GPT2LMHeadModel
            cfg._attn_implementation = "eager"
            m = cls(cfg).eval()
            with torch.no_grad():
                for p in m.parameters():
                    p.normal_(0.0, 0.3)
            folders[kind] = str(tmp_path_factory.mktemp(kind))
            m.save_pretrained(folders[kind])
        return folders[kind]
    return get


def hf_model(lib, folder):
    torch, transformers, _ = lib
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def hf_logits(lib, m):
    torch = lib[0]
    with torch.no_grad():
        return m(torch.tensor(IDS)).logits.numpy()


def perturb_peft(lib, pm, seed=0):
    """Seeded noise on every trainable tensor (LoRA A/B, trained biases, modules_to_save copies)."""
    torch = lib[0]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def perturb_minipeft(model, seed=0):
    rng = np.random.default_rng(seed)
    for _, p in model.net.named_parameters():
        if p.requires_grad:
            p.data = (p.data + rng.standard_normal(p.shape) * 0.2).astype(np.float32)


def minipeft_saved_in_peft(lib, folder, config, out_dir):
    """The minipeft model on `folder` with `config` applied and perturbed, saved to `out_dir`, and the
    PeftModel that loads that folder: (ours, theirs)."""
    model = minipeft.load_model(folder)
    model.apply_adapter(config)
    perturb_minipeft(model)
    model.save_adapters(str(out_dir))
    return model, lib[2].PeftModel.from_pretrained(hf_model(lib, folder), str(out_dir)).eval()


def perturbed_peft_model(lib, base, case, config_class: str):
    """PEFT's model of case = (base kind, config kwargs) with config_class (a name in peft), perturbed."""
    peft = lib[2]
    kind, kw = case
    pm = peft.get_peft_model(hf_model(lib, base(kind)), getattr(peft, config_class)(task_type="CAUSAL_LM", **kw))
    perturb_peft(lib, pm)
    return pm


def report_gradients_from_peft(lib, pm, folder, tmp_path, case, our_name, tol):
    """Mean next-token cross-entropy on IDS from pm's state in both libraries: every trainable gradient,
    PEFT's parameter name n compared under our_name(n)."""
    import minipeft
    from minipeft.autograd import Tensor
    from minipeft.autograd import functional as F
    torch = lib[0]
    pm.save_pretrained(tmp_path)
    logits = pm(torch.tensor(IDS)).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), torch.tensor(IDS[:, 1:]).reshape(-1)).backward()
    theirs = {our_name(n): p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
    model = minipeft.load_model(folder)
    model.load_adapters(str(tmp_path))
    out = model(IDS)
    F.cross_entropy(out[:, :-1].reshape(-1, V), Tensor(IDS[:, 1:].reshape(-1))).backward()
    report_gradients(case, model, theirs, tol)


def report_init_is_base(lib, folder, config_class: str, kw: dict, our_config, label):
    """PEFT's model of config_class(**kw) at its own init, and minipeft's of our_config (the same config read
    through from_peft), each against the base at folder (< TOL). Returns (PEFT's model, minipeft's, the base logits)."""
    import minipeft
    peft = lib[2]
    hf = peft.get_peft_model(hf_model(lib, folder), getattr(peft, config_class)(task_type="CAUSAL_LM", **kw)).eval()
    with hf.disable_adapter():
        want = hf_logits(lib, hf)
    report(f"{label} PEFT default init vs base", max_rel_err(hf_logits(lib, hf), want))
    model = minipeft.load_model(folder)
    model.apply_adapter(our_config)
    report(f"{label} minipeft default init vs base", max_rel_err(model(IDS), want))
    return hf, model, want


def check_init_is_base_and_count(lib, base, case, config_class: str, ours: type, label):
    """report_init_is_base for case = (base kind, PEFT kwargs), read here through ours.from_peft; then minipeft's
    trainable count equals PEFT's."""
    kind, kw = case
    hf, model, _ = report_init_is_base(lib, base(kind), config_class, kw,
                                       ours.from_peft(dict(peft_type=ours.peft_type, **kw)), label)
    assert model.parameter_counts()[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)


def report_merge_and_unload(lib, pm, folder, tmp_path, case):
    """PEFT's merge_and_unload of pm against minipeft's of pm's saved adapter on the base at folder:
    logits, and every weight both state dicts hold."""
    import minipeft
    pm.save_pretrained(tmp_path)
    merged = pm.merge_and_unload()
    theirs = hf_logits(lib, merged)
    model = minipeft.load_model(folder)
    model.load_adapters(str(tmp_path))
    report(f"merge_and_unload vs PEFT {case}", max_rel_err(model.merge_and_unload()(IDS).data, theirs))
    sd = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    mine = {k: np.asarray(v) for k, v in model.net.state_dict().items()}
    report(f"merged weights vs PEFT {case}", max(max_rel_err(mine[k], sd[k]) for k in mine if k in sd))


def check_both_ways_and_merged(lib, pm, folder, tmp_path, label, ids=IDS, loading=None):
    """A perturbed PeftModel pm on the HF base saved at folder: its save loads here with its logits, minipeft's save
    of that loads in PEFT with minipeft's, and minipeft's merge_and_unload().save(), read by transformers, equals
    PEFT's merge_and_unload (each < TOL on ids). loading: a context the minipeft load runs in (a pytest.warns).
    Returns the minipeft model that read pm's folder."""
    import contextlib
    torch, transformers, peft = lib

    def logits(m):
        with torch.no_grad():
            return m(torch.tensor(ids)).logits.numpy()

    theirs = logits(pm)
    pm.save_pretrained(tmp_path / "peft")
    model = minipeft.load_model(folder)
    with loading or contextlib.nullcontext():
        model.load_adapters(str(tmp_path / "peft"))
    report(f"{label} PEFT->minipeft", max_rel_err(model(ids), theirs))
    model.save_adapters(str(tmp_path / "ours"))
    report(f"{label} minipeft->PEFT", max_rel_err(model(ids), logits(peft.PeftModel.from_pretrained(
        hf_model(lib, folder), str(tmp_path / "ours")).eval())))
    merged_theirs = logits(pm.merge_and_unload())
    model.merge_and_unload().save(str(tmp_path / "merged"))
    report(f"{label} merged (transformers) vs PEFT merge_and_unload",
           max_rel_err(logits(hf_model(lib, str(tmp_path / "merged"))), merged_theirs))
    return model


def check_peft_case(lib, base, case, config_class: str, ours: type, tmp_path, label):
    """check_both_ways_and_merged on perturbed_peft_model(case); PEFT's folder then loads here as config type `ours`
    with PEFT's trainable parameter count."""
    pm = perturbed_peft_model(lib, base, case, config_class).eval()
    trained = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    check_both_ways_and_merged(lib, pm, base(case[0]), tmp_path, label)
    model = minipeft.load_model(base(case[0]))
    model.load_adapters(str(tmp_path / "peft"))
    assert type(model.peft_configs["default"]) is ours and model.parameter_counts()[0] == trained


def peft_train_losses(lib, pm, opt, steps: int, labels=IDS) -> list:
    """`steps` optimizer steps of PEFT's model pm on IDS with `labels` (its own loss): the loss of each."""
    torch = lib[0]
    losses = []
    for _ in range(steps):
        loss = pm(input_ids=torch.tensor(IDS), labels=torch.tensor(labels)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def report(label, err):
    print(f"\n  {label}: max rel err {err:.2e}")
    assert err < TOL, f"{label}: {err:.3e} >= {TOL}"


def report_gradients(label, model, theirs: dict, tol=1e-4):
    """Every trainable gradient of a minipeft model against {our name: PEFT's gradient}: same names and
    max rel err < tol."""
    ours = {n: p.grad for n, p in model.net.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(theirs)
    worst = max(max_rel_err(ours[n], theirs[n]) for n in ours)
    print(f"\n  gradients {label} ({len(ours)} tensors): max rel err {worst:.2e}")
    assert worst < tol


def check_step_gradients(lib, pm, folder, tmp_path, leaf: str, label, tol=1e-4):
    """report_gradients_from_peft for a PeftModel whose parameters are base_model.model.<path>.<leaf>.default
    (leaf a regex), compared under minipeft's <path>.adapters.default.<leaf> (eval mode: GPT-2's own dropout
    draws from different generators in train mode)."""
    import re
    pattern = re.compile(rf"base_model\.model\.(.+)\.({leaf})\.default$")
    report_gradients_from_peft(lib, pm, folder, tmp_path, label,
                               lambda n: "{}.adapters.default.{}".format(*pattern.match(n).groups()), tol)


# PEFT LoraConfig kwargs for each case; minipeft reads the same dict through LoRAConfig.from_peft
CASES = {
    "basic": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"q_proj": 32}),
    "bias_all": dict(r=4, lora_alpha=8, bias="all", target_modules=["q_proj", "v_proj"]),
    "bias_lora_only": dict(r=4, lora_alpha=8, bias="lora_only", target_modules=["q_proj", "v_proj"]),
    "lora_bias": dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "k_proj"]),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "regex": dict(r=4, lora_alpha=8, target_modules=r".*\.(q|v|up)_proj"),
    "all_linear": dict(r=2, lora_alpha=4, target_modules="all-linear"),
    "layers_to_transform": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    "layers_pattern": dict(r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=0,
                           layers_pattern="layers"),
    "pissa": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights="pissa"),
    "olora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights="olora"),
}


@pytest.mark.spec("PEFT-1", "PEFT-2", "PEFT-3", "PEFT-5", "PEFT-6", "LORA-2", "LORA-3", "LORA-6", "LORA-10")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_saved_loads_in_minipeft(lib, base, tmp_path, case):
    """(a), (e): get_peft_model + perturbation + save_pretrained -> minipeft.load_adapters: equal logits."""
    torch, _, peft = lib
    pm = peft.get_peft_model(hf_model(lib, base()), peft.LoraConfig(task_type="CAUSAL_LM", **CASES[case]))
    perturb_peft(lib, pm)
    pm.eval()
    pm.save_pretrained(tmp_path)
    model = minipeft.load_model(base())
    model.load_adapters(str(tmp_path))
    report(f"PEFT->minipeft {case}", max_rel_err(model(IDS), hf_logits(lib, pm)))


@pytest.mark.spec("PEFT-1", "PEFT-2", "PEFT-3", "PEFT-5", "PEFT-6", "LORA-2", "LORA-3", "LORA-6", "LORA-10")
@pytest.mark.parametrize("case", list(CASES))
def test_minipeft_saved_loads_in_peft(lib, base, tmp_path, case):
    """(b), (e): minipeft apply_adapter + perturbation + save_adapters -> PeftModel.from_pretrained."""
    model, pm = minipeft_saved_in_peft(lib, base(), LoRAConfig.from_peft(dict(peft_type="LORA", **CASES[case])),
                                       tmp_path)
    report(f"minipeft->PEFT {case}", max_rel_err(model(IDS), hf_logits(lib, pm)))


@pytest.mark.spec("PEFT-5")
def test_bias_keys_match_peft(lib, base, tmp_path):
    """bias="all"/"lora_only": the saved key names are PEFT's (an adapted layer's bias is base_layer.bias)."""
    _, _, peft = lib
    from minipeft.safetensors_io import read_safetensors
    for case in ("bias_all", "bias_lora_only", "lora_bias", "modules_to_save"):
        pm = peft.get_peft_model(hf_model(lib, base()), peft.LoraConfig(task_type="CAUSAL_LM", **CASES[case]))
        pm.save_pretrained(tmp_path / "peft" / case)
        model = minipeft.load_model(base())
        model.apply_adapter(LoRAConfig.from_peft(dict(peft_type="LORA", **CASES[case])))
        model.save_adapters(str(tmp_path / "ours" / case))
        theirs, _ = read_safetensors(str(tmp_path / "peft" / case / "adapter_model.safetensors"))
        ours, _ = read_safetensors(str(tmp_path / "ours" / case / "adapter_model.safetensors"))
        assert sorted(ours) == sorted(theirs), case
        assert all(ours[k].shape == theirs[k].shape for k in ours), case


@pytest.mark.spec("LORA-4", "PEFT-6")
@pytest.mark.parametrize("case", ["basic", "lora_bias", "modules_to_save", "rslora"])
def test_merge_and_unload_loads_in_transformers(lib, base, tmp_path, case):
    """(c): minipeft merge_and_unload().save() -> transformers: equal logits to the unmerged adapter."""
    model = minipeft.load_model(base())
    model.apply_adapter(LoRAConfig.from_peft(dict(peft_type="LORA", **CASES[case])))
    perturb_minipeft(model)
    before = model(IDS).data
    model.merge_and_unload().save(str(tmp_path))
    report(f"merged->transformers {case}", max_rel_err(hf_logits(lib, hf_model(lib, str(tmp_path))), before))


@pytest.mark.spec("LORA-4", "PEFT-2", "PEFT-6")
def test_gpt2_conv1d_fan_in_fan_out(lib, base, tmp_path):
    """(d): GPT-2 Conv1D (fan_in_fan_out): both directions, and the merged model in transformers."""
    pytest.importorskip("minipeft.models.gpt2", reason="minipeft.models.gpt2 is not written yet")
    _, _, peft = lib
    folder = base("gpt2")
    kw = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    pm = peft.get_peft_model(hf_model(lib, folder), peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    perturb_peft(lib, pm)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    model = minipeft.load_model(folder)
    model.load_adapters(str(tmp_path / "peft"))
    report("gpt2 PEFT->minipeft", max_rel_err(model(IDS), hf_logits(lib, pm)))

    ours = minipeft.load_model(folder)
    ours.apply_adapter(LoRAConfig.from_peft(dict(peft_type="LORA", **kw)))
    perturb_minipeft(ours, seed=3)
    ours.save_adapters(str(tmp_path / "ours"))
    pm2 = peft.PeftModel.from_pretrained(hf_model(lib, folder), str(tmp_path / "ours")).eval()
    before = ours(IDS).data
    report("gpt2 minipeft->PEFT", max_rel_err(before, hf_logits(lib, pm2)))
    ours.merge_and_unload().save(str(tmp_path / "merged"))
    report("gpt2 merged->transformers", max_rel_err(hf_logits(lib, hf_model(lib, str(tmp_path / "merged"))), before))


@pytest.mark.spec("PEFT-1")
def test_named_adapters_in_subfolders(lib, base, tmp_path):
    """(g): a non-default adapter saved into <dir>/<name>/ loads in PEFT; PEFT's own layout loads here."""
    _, _, peft = lib
    model = minipeft.load_model(base())
    model.apply_adapter(LoRAConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj")))
    model.apply_adapter(LoRAConfig(rank=2, alpha=8, target_modules=("k_proj", "o_proj")), "other")
    perturb_minipeft(model)
    model.set_active_adapter("other")
    perturb_minipeft(model, seed=1)
    model.save_adapters(str(tmp_path / "ours"))
    assert os.path.isfile(tmp_path / "ours" / "other" / "adapter_model.safetensors")
    pm = peft.PeftModel.from_pretrained(hf_model(lib, base()), str(tmp_path / "ours"))
    pm.load_adapter(str(tmp_path / "ours" / "other"), adapter_name="other")
    pm.set_adapter("other")
    pm.eval()
    report("subfolder 'other' minipeft->PEFT", max_rel_err(model(IDS), hf_logits(lib, pm)))
    pm.save_pretrained(tmp_path / "peft")  # PEFT writes default at the top, other in other/
    back = minipeft.load_model(base())
    back.load_adapters(str(tmp_path / "peft"))  # PEFT-7: "default" from the top, "other" from other/
    assert sorted(back.peft_configs) == ["default", "other"]
    back.set_active_adapter("other")
    report("subfolder 'other' PEFT->minipeft", max_rel_err(back(IDS), hf_logits(lib, pm)))


# ---- (f) add_weighted_adapter ---------------------------------------------------------------------------
TYPES = ["linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd",
         "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"]


@pytest.fixture(scope="module")
def two_adapters(lib, base, tmp_path_factory):
    """A PEFT model with adapters a (q, v; r=4, alpha=8) and b (q, k; r=4, alpha=16), perturbed, and
    the same two adapters loaded into minipeft from PEFT's files."""
    _, _, peft = lib
    pm = peft.get_peft_model(hf_model(lib, base()), peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules=["q_proj", "k_proj"]))
    perturb_peft(lib, pm)
    folder = tmp_path_factory.mktemp("two")
    pm.save_pretrained(folder)
    model = minipeft.load_model(base())
    for n in ("a", "b"):
        model.load_adapters(str(folder / n), n)
    return pm, model


def factors(lib, pm, model, name):
    """{layer path: (A', B') of PEFT, (A', B') of minipeft} for the combined adapter."""
    out = {}
    for path, m in model.net.named_modules():
        if hasattr(m, "adapters") and name in m.adapters:
            t = pm.base_model.model.get_submodule(path)
            theirs = (t.lora_A[name].weight.detach().numpy(), t.lora_B[name].weight.detach().numpy())
            d = m.adapters[name]
            out[path] = theirs, (np.asarray(d.lora_A.weight.data), np.asarray(d.lora_B.weight.data))
    return out


@pytest.mark.spec("LORA-7", "LORA-8", "LORA-9", "LORA-12")
@pytest.mark.parametrize("combination", TYPES)
@pytest.mark.parametrize("density", [1.0, 0.5])
def test_add_weighted_adapter_agrees(lib, two_adapters, combination, density):
    """(f): deterministic types compare A' and B' (SVD types: B'A', free of the SVD's sign choice)
    within 1e-5; dare_* with density 1 are deterministic and compared the same way; dare_* with
    density 0.5 draw different masks (torch vs PCG64) and are compared by structure: every entry
    is one of the values a keep/drop pattern can give, and the kept fraction is close."""
    if density < 1 and combination in ("linear", "cat", "svd"):
        pytest.skip("density does not apply")
    pm, model = two_adapters
    name = f"{combination}_{density}".replace(".", "")
    w = {"a": 0.7, "b": -0.4}
    pm.add_weighted_adapter(list(w), list(w.values()), name, combination_type=combination, density=density)
    model.merge_adapters(w, name, combination, density=density)
    pairs = factors(lib, pm, model, name)
    assert set(pairs) == {p for p, m in model.net.named_modules() if hasattr(m, "adapters") and
                          ("a" in m.adapters or "b" in m.adapters)}
    worst = 0.0
    for path, ((At, Bt), (A, B)) in pairs.items():
        if "dare" in combination and density < 1:
            check_dare_structure(model, path, combination, w, density, (At, Bt), (A, B))
            continue
        if combination.endswith("svd") or A.shape != At.shape:
            # SVD: B'A' is free of the sign choice. cat: PEFT gives every layer rank sum_i r_i (config
            # ranks), zero-padded where a source is absent; minipeft sums the ranks present (LORA-12)
            assert combination.endswith("svd") or not np.any(At[A.shape[0]:]), "PEFT's padding is not zero"
            worst = max(worst, max_rel_err(B @ A, Bt @ At))
        else:
            worst = max(worst, max_rel_err(A, At), max_rel_err(B, Bt))
    if "dare" not in combination or density == 1:
        report(f"add_weighted_adapter {combination} density={density}", worst)


def check_dare_structure(model, path, combination, w, density, theirs, ours):
    layer = model.net.get_submodule(path)
    srcs = [(layer.adapters[n], w[n]) for n in w if n in layer.adapters]
    if combination.endswith("svd"):
        kept = [np.mean(np.abs(B @ A) > 0) for A, B in (theirs, ours)]
        assert abs(kept[0] - kept[1]) < 0.1, kept
        return
    for i, (mine, peft_t) in enumerate(zip(ours, theirs)):
        ts = [np.asarray((d.lora_A if i == 0 else d.lora_B).weight.data) for d, _ in srcs]
        root = [np.sqrt(abs(wi * d.s)) * (np.sign(wi * d.s) if i == 0 else 1) for d, wi in srcs]
        for got in (mine, peft_t):
            if len(ts) == 1 or combination == "dare_linear":
                terms = [r * t / density for r, t in zip(root, ts)]
                candidates = [np.zeros_like(ts[0]), *terms, sum(terms)] if len(ts) > 1 else [np.zeros_like(ts[0]), *terms]
                ok = np.min([np.abs(got - c) for c in candidates], axis=0) <= 1e-5 * np.abs(np.stack(candidates)).max()
                assert ok.all(), f"{path} {combination}: entries outside the keep/drop values"
        z = [np.mean(m == 0) for m in (mine, peft_t)]
        assert abs(z[0] - z[1]) < 0.2, f"{path} {combination}: zero fraction {z[0]:.2f} vs PEFT {z[1]:.2f}"


@pytest.mark.spec("LORA-9")
def test_svd_clamp_agrees(lib, two_adapters):
    """svd with svd_clamp=0.9: where the SVDs pick the same signs (compared first) A', B' agree."""
    pm, model = two_adapters
    w = {"a": 0.7, "b": -0.4}
    pm.add_weighted_adapter(list(w), list(w.values()), "clamped", combination_type="svd", svd_clamp=0.9, svd_rank=3)
    model.merge_adapters(w, "clamped", "svd", svd_clamp=0.9, svd_rank=3)
    worst, compared, pairs = 0.0, 0, factors(lib, pm, model, "clamped")
    for path, ((At, Bt), (A, B)) in pairs.items():
        if np.all(np.sum(At * A, axis=1) > 0):  # torch and NumPy chose the same singular-vector signs
            worst, compared = max(worst, max_rel_err(A, At), max_rel_err(B, Bt)), compared + 1
    if not compared:
        pytest.skip("torch and NumPy chose different singular-vector signs at every layer; clamp quantiles differ")
    report(f"add_weighted_adapter svd clamp=0.9 rank=3 ({compared}/{len(pairs)} layers with equal signs)", worst)


@pytest.mark.spec("LORA-12")
def test_combined_adapter_reloads_in_peft(lib, base, two_adapters, tmp_path):
    """The combined adapter (cat: ranks 4+4 at q_proj, 4 elsewhere -> rank_pattern) saves and loads in PEFT."""
    _, _, peft = lib
    _, model = two_adapters
    if "cat_10" not in model.peft_configs:
        model.merge_adapters({"a": 0.7, "b": -0.4}, "cat_10", "cat")
    model.set_active_adapter("cat_10")
    ours = model(IDS).data
    model.save_adapters(str(tmp_path), "cat_10")
    cfg = json.loads((tmp_path / "cat_10" / "adapter_config.json").read_text())
    pm = peft.PeftModel.from_pretrained(hf_model(lib, base()), str(tmp_path / "cat_10")).eval()
    model.set_active_adapter("a")
    report(f"combined cat (rank_pattern {cfg['rank_pattern']}) minipeft->PEFT", max_rel_err(ours, hf_logits(lib, pm)))


LINEAR_ONLY = {"beft", "hra", "road", "oft", "boft", "shira", "miss", "c3a", "delora", "psoft"}  # the PEFT tuners that refuse GPT-2's Conv1D, as minipeft does
LINEAR_ONLY |= {"supertuning"}
LINEAR_ONLY |= {"glora"}
LINEAR_ONLY |= {"osf"}
LINEAR_ONLY |= {"peanut"}
LINEAR_ONLY |= {"lily"}
LINEAR_ONLY |= {"kasa"}
LINEAR_ONLY |= {"adamss"}
LINEAR_ONLY |= {"bdlora"}  # its block factors (Conv1D: a plain layer only)
OWN_TARGETS = {"ln_tuning": {"llama": ("input_layernorm", "norm"), "gpt2": ("ln_1", "ln_f")},  # methods that target no linear layer
               "trainable_tokens": {"llama": ("embed_tokens",), "gpt2": ("wte",)},
               }


@pytest.mark.spec("PEFT-3")
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_every_saved_config_key_is_a_field_of_peft_s_config_class(lib, base, tmp_path, kind):
    """PEFT warns on and ignores keys its config class lacks: each method writes only keys PEFT reads."""
    import contextlib
    import dataclasses
    import warnings
    from helpers import peft_kmeans_as_minipeft
    from minipeft.adapters.registry import REGISTRY, method_of_class
    _, _, peft = lib
    targets = {"llama": ("q_proj", "v_proj", "down_proj"), "gpt2": ("c_attn", "c_fc")}[kind]
    for cfg_cls in (c for c in REGISTRY if method_of_class(c).in_peft):  # PEFT has no LoRA-XS (LORAXS-6)
        name = method_of_class(cfg_cls).name
        if kind == "gpt2" and name in LINEAR_ONLY:
            continue  # torch.nn.Linear only (PEFT's rule, BEFT-5, SHIRA-8, OFT-10, BOFT-10), and GPT-2 has Conv1D
        model = minipeft.load_model(base(kind))
        extra = {"feedforward_modules": targets[-1:]} if "feedforward_modules" in cfg_cls.__dataclass_fields__ else {}
        extra.update({"total_step": 10} if "total_step" in cfg_cls.__dataclass_fields__ else {})  # PEFT's AdaLoRA needs it
        extra.update(SMALL.get(name, {}))  # sizes that fit the tiny models (FourierFT, SHiRA, RoAd)
        model.apply_adapter(cfg_cls(target_modules=OWN_TARGETS.get(name, {}).get(kind, targets), **extra), **data_for(cfg_cls))
        folder = tmp_path / cfg_cls.__name__
        model.save_adapters(str(folder))
        saved = json.loads((folder / "adapter_config.json").read_text())
        theirs = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[saved["peft_type"]]
        unknown = set(saved) - {f.name for f in dataclasses.fields(theirs)}
        assert not unknown, (cfg_cls.__name__, sorted(unknown))
        sklearn = peft_kmeans_as_minipeft() if name == "adamss" else contextlib.nullcontext()  # ADAMSS-2
        with warnings.catch_warnings(), sklearn:  # PEFT's AdamssConfig imports scikit-learn, absent here
            warnings.simplefilter("error")
            assert theirs.from_pretrained(str(folder)).peft_type.value == saved["peft_type"]


@pytest.mark.spec("PEFT-6")
def test_training_continues_in_peft_and_comes_back(lib, base, tmp_path):
    """The path beyond one machine (README): an adapter trained in minipeft loads in PEFT, trains one more
    AdamW step there (as PEFT + accelerate would, on many GPUs), and loads back here with PEFT's logits."""
    torch, _, peft = lib
    model = minipeft.load_model(base())
    model.apply_lora(minipeft.LoRAConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj")))
    rows = [{"input_ids": [int(t) for t in r]} for r in IDS]
    model.train(rows, minipeft.TrainingConfig(learning_rate=1e-2, batch_size=2, max_steps=3, progress=False))
    model.save_adapters(str(tmp_path / "ours"))
    pm = peft.PeftModel.from_pretrained(hf_model(lib, base()), str(tmp_path / "ours"), is_trainable=True)
    report("minipeft-trained adapter in PEFT", max_rel_err(model(IDS), hf_logits(lib, pm.eval())))
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm(input_ids=torch.tensor(IDS), labels=torch.tensor(IDS)).loss.backward()
    opt.step()
    assert before and all(not torch.equal(before[n], p) for n, p in pm.named_parameters() if p.requires_grad)
    pm.eval().save_pretrained(str(tmp_path / "theirs"))
    back = minipeft.load_model(base())
    back.load_adapters(str(tmp_path / "theirs"))
    report("PEFT-continued adapter back in minipeft", max_rel_err(back(IDS), hf_logits(lib, pm)))


@pytest.mark.parametrize("case", ["basic", "bias_all", "modules_to_save"])
def test_print_trainable_parameters_prints_peft_s_line(lib, base, case, capsys):
    """Issue 21 item 13: model.print_trainable_parameters() prints what PeftModel's prints, same numbers."""
    _, _, peft = lib
    peft.get_peft_model(hf_model(lib, base()), peft.LoraConfig(task_type="CAUSAL_LM", **CASES[case])) \
        .print_trainable_parameters()
    theirs = capsys.readouterr().out
    model = minipeft.load_model(base())
    model.apply_adapter(LoRAConfig.from_peft(dict(peft_type="LORA", **CASES[case])))
    model.print_trainable_parameters()
    ours = capsys.readouterr().out
    assert ours == theirs and ours.startswith("trainable params: ")


@pytest.mark.spec("LORA-13")
def test_unmatched_targets_as_peft_treats_them(lib, base, tmp_path):
    """PEFT 0.21.2 refuses the string "q_proj" (a whole-path regex) and a list matching nothing, and accepts
    ["q_proj", "nope_proj"] silently; minipeft refuses the same two and warns on the third, whose adapter
    then loads in PEFT with equal logits."""
    _, _, peft = lib
    for tm in ("q_proj", ["nope_proj"]):
        with pytest.raises(ValueError, match="not found in the base model"):
            peft.get_peft_model(hf_model(lib, base()), peft.LoraConfig(target_modules=tm))
        with pytest.raises(minipeft.errors.ConfigError, match="matches no linear or embedding layer"):
            minipeft.load_model(base()).apply_lora(target_modules=tm)
    peft.get_peft_model(hf_model(lib, base()), peft.LoraConfig(target_modules=["q_proj", "nope_proj"]))
    with pytest.warns(UserWarning, match=r"\['nope_proj'\] match no linear or embedding layer"):
        model, pm = minipeft_saved_in_peft(lib, base(), LoRAConfig(target_modules=["q_proj", "nope_proj"]), tmp_path)
    report("partly matching list minipeft->PEFT", max_rel_err(model(IDS), hf_logits(lib, pm)))


@pytest.mark.spec("PEFT-7")
def test_peft_s_named_adapters_load_under_their_names(lib, base, tmp_path):
    """PEFT's save_pretrained of adapters named "translation" and "grammar" (no "default") writes one
    sub-folder each; load_adapters(folder) loads both under those names, each with PEFT's logits."""
    torch, _, peft = lib
    pm = peft.get_peft_model(hf_model(lib, base()), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
                             adapter_name="translation")
    pm.add_adapter("grammar", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"]))
    perturb_peft(lib, pm)
    pm.save_pretrained(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["grammar", "translation"]
    model = minipeft.load_model(base())
    model.load_adapters(str(tmp_path))
    assert sorted(model.peft_configs) == ["grammar", "translation"]
    for name in ("translation", "grammar"):
        pm.set_adapter(name)
        model.set_active_adapter(name)
        report(f"PEFT's sub-folder {name!r} -> minipeft", max_rel_err(model(IDS), hf_logits(lib, pm.eval())))
