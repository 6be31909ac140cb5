"""The method registry (spec/methods.md METHOD-1..4): registration, minipeft.methods(), the apply_<name>
shorthands it derives, PEFT's field names as config aliases, and a method added from outside the package."""
import dataclasses
import importlib.util
import json
import os
import pydoc
import re
import sys

import numpy as np
import pytest

import minipeft as mp
from minipeft import backend
from minipeft.adapters import registry
from minipeft.adapters.base import AdapterConfig
from minipeft.errors import ConfigError
from tests.helpers import tiny_llama

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
BUILT_IN = {  # name: (config class name, peft_type, kind, mergeable, quantized_base)
    "lora": ("LoRAConfig", "LORA", "layer", True, False), "qlora": ("QLoRAConfig", "LORA", "layer", True, True),
    "dora": ("DoRAConfig", "LORA", "layer", True, False), "adalora": ("AdaLoRAConfig", "ADALORA", "layer", True, False),
    "vera": ("VeRAConfig", "VERA", "layer", True, False), "loha": ("LoHaConfig", "LOHA", "layer", True, False),
    "lokr": ("LoKrConfig", "LOKR", "layer", True, False), "ia3": ("IA3Config", "IA3", "layer", True, False),
    "prompt_tuning": ("PromptTuningConfig", "PROMPT_TUNING", "prompt", False, False),
    "prefix_tuning": ("PrefixTuningConfig", "PREFIX_TUNING", "prompt", False, False),
    "ptuning": ("PTuningConfig", "P_TUNING", "prompt", False, False),
    "ptuning_v2": ("PTuningV2Config", "PREFIX_TUNING", "prompt", False, False),
    "cpt": ("CPTConfig", "CPT", "prompt", False, False),
    "loraxs": ("LoRAXSConfig", None, "layer", True, False),  # PEFT has no LoRA-XS (in_peft=False)
    "orthogonal": ("OrthogonalConfig", "LORA", "initialiser", True, False),
    "mica": ("MiCAConfig", "LORA", "initialiser", True, False),
    "loftq": ("LoftQConfig", "LORA", "initialiser", True, False),
    "eva": ("EVAConfig", "LORA", "initialiser", True, False),
    "nola": ("NOLAConfig", None, "layer", True, False),  # PEFT has no NOLA
    "tiedlora": ("TiedLoRAConfig", None, "layer", True, False),  # PEFT has no Tied-LoRA
    "dvora": ("DVoRAConfig", None, "layer", True, False),  # PEFT's VeRA has no DoRA option
    "mora": ("MoRAConfig", None, "layer", True, False),  # PEFT has no MoRA
    "multilora": ("MultiLoRAConfig", None, "layer", True, False),  # PEFT has no MultiLoRA
    "qalora": ("QALoRAConfig", None, "layer", True, False),  # PEFT's use_qalora: GPTQ only, no merge
    "hira": ("HiRAConfig", "HIRA", "layer", True, False),
    "hra": ("HRAConfig", "HRA", "layer", True, False),
    "beft": ("BEFTConfig", "BEFT", "layer", True, False),  # merges where the base has biases
    "fourierft": ("FourierFTConfig", "FOURIERFT", "layer", True, False),
    "waveft": ("WaveFTConfig", "WAVEFT", "layer", True, False),
    "shira": ("SHiRAConfig", "SHIRA", "layer", True, False),
    "oft": ("OFTConfig", "OFT", "layer", True, False),
    "boft": ("BOFTConfig", "BOFT", "layer", True, False),
    "road": ("RoadConfig", "ROAD", "layer", True, False),
    "miss": ("MiSSConfig", "MISS", "layer", True, False),
    "c3a": ("C3AConfig", "C3A", "layer", True, False),
    "delora": ("DeLoRAConfig", "DELORA", "layer", True, False),
    "psoft": ("PSOFTConfig", "PSOFT", "layer", True, False),
    "gralora": ("GraLoRAConfig", "GRALORA", "layer", True, False),
    "vblora": ("VBLoRAConfig", "VBLORA", "layer", True, False),
    "randlora": ("RandLoRAConfig", "RANDLORA", "layer", True, False),
    "supertuning": ("SuperTuningConfig", "SUPERTUNING", "layer", True, False),
    "tinylora": ("TinyLoRAConfig", "TINYLORA", "layer", True, False),
    "glora": ("GLoRAConfig", "GLORA", "layer", True, False),
    "osf": ("OSFConfig", "OSF", "layer", True, False),
    "deft": ("DEFTConfig", "DEFT", "layer", True, False),
    "unilora": ("UniLoRAConfig", "UNILORA", "layer", True, False),
    "ln_tuning": ("LNTuningConfig", "LN_TUNING", "layer", True, False),  # targets norms (LN_TUNING-5)
    "trainable_tokens": ("TrainableTokensConfig", "TRAINABLE_TOKENS", "layer", True, False),  # embedding rows
    "lora_ga": ("LoRAGAConfig", "LORA", "initialiser", True, False),  # data-driven; saves PEFT's rank-2r conversion
    "peanut": ("PEANuTConfig", "PEANUT", "layer", True, False),
    "frod": ("FRoDConfig", "FROD", "layer", True, False),
    "pvera": ("PVeRAConfig", "PVERA", "layer", True, False),
    "alora": ("ALoRAConfig", "LORA", "layer", False, False),  # adapts only after its invocation: not mergeable
    "corda": ("CorDAConfig", "LORA", "initialiser", True, False),  # data-driven; saves PEFT's rank-2r conversion
    "lily": ("LilyConfig", "LILY", "layer", False, False),  # no fixed dW: merging is refused (LILY-6)
    "kasa": ("KaSAConfig", "LORA", "layer", True, False),  # LoRA + kasa_config; truncates W0
    "loretta": ("LoRETTAConfig", None, "layer", True, False),  # PEFT has no LoRETTA; variant "adp" refuses merges (LORETTA-8)
    "rosa": ("RoSAConfig", None, "layer", True, False),  # PEFT has no RoSA
    "adamss": ("AdaMSSConfig", "ADAMSS", "layer", True, False),
    "longlora": ("LongLoRAConfig", "LORA", "layer", True, False),  # a LoRA file; S2-Attn is training-only (LONGLORA-6)
    "bdlora": ("BDLoRAConfig", "LORA", "layer", True, False),  # LoRA + use_bdlora
    "velora": ("VeLoRAConfig", "LORA", "layer", True, False),  # LoRA + velora_config; only A's backward differs
    "monteclora": ("MonteCLoRAConfig", "LORA", "layer", True, False),  # LoRA + monteclora_config; samples A in training
}


@pytest.fixture(scope="module")
def rowscale():
    """examples/custom_method.py: a method written outside the package, registered on import."""
    spec = importlib.util.spec_from_file_location("custom_method", os.path.join(EXAMPLES, "custom_method.py"))
    module = sys.modules["custom_method"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    registry.unregister("rowscale")
    del sys.modules["custom_method"]
    assert "rowscale" not in registry.METHODS and not hasattr(mp.Model, "apply_rowscale")


@pytest.mark.spec("METHOD-2")
def test_methods_lists_the_built_in_ones_with_their_flags():
    got = {m.name: (m.config.__name__, m.peft_type, m.kind, m.mergeable, m.quantized_base) for m in mp.methods()
           if m.is_adapter and m.config.__module__.startswith("minipeft.")}  # optimisers: test_optimizers.py
    assert got == BUILT_IN
    for m in mp.methods():
        assert "arXiv" in m.paper or "openreview" in m.paper or m.config.__module__ == "custom_method" or \
            m.paper.startswith("no paper: PEFT's own method"), m.name  # a paper with no arXiv id: its OpenReview id
        assert m.summary and (not m.is_adapter or registry.METHODS[m.name] is m.config)
        assert os.path.isfile(os.path.join(os.path.dirname(EXAMPLES), "spec", f"{m.name}.md")) or \
            m.config.__module__ == "custom_method", m.name
    assert registry.method_of(mp.DoRAConfig()).name == "dora"
    assert registry.layer_class(mp.QLoRAConfig()) is registry.method("lora").layer  # QLoRA runs LoRA's layer


@pytest.mark.spec("METHOD-1")
def test_register_refuses_what_would_break_the_registry():
    lora = registry.method("lora")
    before = (list(registry.METHODS), dict(registry.REGISTRY))

    @dataclasses.dataclass
    class Orphan(AdapterConfig):  # derives from no registered config
        peft_type = "ORPHAN"

    cases = [(("LoRA2", mp.LoRAConfig, lora.layer), "lower-case"), (("lora", Orphan, lora.layer), "registered already"),
             (("again", mp.LoRAConfig, lora.layer), "registered already"), (("orphan", Orphan, None), "needs a layer"),
             (("adapter", Orphan, lora.layer), "would replace Model.apply_adapter"),
             (("odd", Orphan, lora.layer, "mixture"), "kind=")]
    for args, message in cases:
        kind = {"kind": args[3]} if len(args) > 3 else {}
        with pytest.raises(ConfigError, match=message):
            registry.register(*args[:3], **kind)
    assert (list(registry.METHODS), dict(registry.REGISTRY)) == before
    with pytest.raises(ConfigError, match="minipeft's own"):
        registry.unregister("lora")
    with pytest.raises(ConfigError, match="no method named 'nope'"):
        registry.method("nope")


@pytest.mark.spec("METHOD-3")
def test_every_method_has_a_shorthand_in_help():
    text = pydoc.render_doc(mp.Model, renderer=pydoc.plaintext)
    for m in (m for m in mp.methods() if m.is_adapter):
        fn = getattr(mp.Model, f"apply_{m.name}")
        assert fn.__doc__.startswith(m.summary) and m.config.__name__ in fn.__doc__
        assert f"apply_{m.name}(self, cfg=None" in text, m.name


@pytest.mark.spec("METHOD-3")
def test_shorthand_equals_apply_adapter_and_refuses_bad_calls():
    a, b = tiny_llama(), tiny_llama()
    a.apply_loha(rank=2, alpha=4, target_modules=("q_proj",), name="x")
    b.apply_adapter(mp.LoHaConfig(rank=2, alpha=4, target_modules=("q_proj",)), name="x")
    assert a.peft_configs == b.peft_configs
    ids = np.array([[1, 2, 3, 4]])
    assert np.array_equal(a(ids).numpy(), b(ids).numpy())
    m = tiny_llama()
    with pytest.raises(ConfigError, match="not both"):
        m.apply_lora(mp.LoRAConfig(), rank=2)
    with pytest.raises(ConfigError, match="quantization="):
        m.apply_qlora(rank=2)
    assert not m.peft_configs


@pytest.mark.spec("METHOD-4")
def test_peft_field_names_are_aliases():
    assert mp.LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=True) == \
        mp.LoRAConfig(rank=4, alpha=8, dropout=0.1, init="default")
    assert mp.LoRAConfig(init_lora_weights="pissa").init == "pissa"
    assert mp.AdaLoRAConfig(init_r=6, target_r=2, deltaT=3, beta1=0.8) == \
        mp.AdaLoRAConfig(initial_rank=6, target_rank=2, delta_t=3, beta_start=0.8)
    assert mp.LoKrConfig(r=2, decompose_factor=4).factor == 4
    # a PEFT user's adapter_config.json, as written by PEFT, builds the same config as from_peft reads it
    peft_dict = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj"], "use_rslora": True}
    assert mp.LoRAConfig(**peft_dict) == mp.LoRAConfig.from_peft({"peft_type": "LORA", **peft_dict})
    # a config built from PEFT names saves the same adapter_config.json as one built from minipeft's
    saved = []
    for cfg in (mp.LoRAConfig(r=2, lora_alpha=4), mp.LoRAConfig(rank=2, alpha=4)):
        m = tiny_llama()
        m.apply_lora(cfg)
        saved.append(json.dumps(mp.adapters.peft_io.config_dict(m, cfg), sort_keys=True))
    assert saved[0] == saved[1]


@pytest.mark.spec("METHOD-4")
def test_misspelt_or_doubled_fields_are_named():
    with pytest.raises(ConfigError, match="no field 'rnak'; did you mean rank"):
        mp.LoRAConfig(rnak=4)
    with pytest.raises(ConfigError, match=r"no field 'lora_alpah'; did you mean lora_alpha \(PEFT's name of alpha\)"):
        mp.LoRAConfig(lora_alpah=4)
    with pytest.raises(ConfigError, match="'r' and 'rank' name the same field"):
        mp.LoRAConfig(r=4, rank=4)
    with pytest.raises(ConfigError, match="VeRAConfig has no field 'zzz'. Its fields: .*projection_prng_key"):
        mp.VeRAConfig(zzz=1)


@pytest.mark.spec("METHOD-1", "METHOD-3")
def test_a_method_from_outside_the_package_works_end_to_end(rowscale, tmp_path):
    """examples/custom_method.py: registered, applied through its shorthand, trained, saved in PEFT's layout,
    loaded, merged; the CLI lists it as a --method."""
    assert registry.method("rowscale").peft_type is None and registry.METHODS["rowscale"] is rowscale.RowScaleConfig
    model = mp.load_model(mp.DEMO_MODEL)
    ids = backend.asarray([[5, 6, 7, 8]])
    base = model(ids).numpy()
    model.apply_rowscale()
    assert np.array_equal(model(ids).numpy(), base)  # d = 0 at init
    hist = model.train([{"input_ids": [5, 6, 7, 8, 9, 10]}] * 8, mp.TrainingConfig(
        learning_rate=1e-2, batch_size=4, max_steps=3, progress=False))
    assert len(hist["loss"]) == 3
    trained = model(ids).numpy()
    assert not np.allclose(trained, base)
    n_trainable = model.parameter_counts()[0]
    layers = {p: (m.base_layer.in_features, m.base_layer.out_features)
              for p, m in mp.adapters.inject.adapted_layers(model.net)}
    assert n_trainable == model.peft_configs["default"].trainable_count(layers, model.config)
    model.save_adapters(str(tmp_path / "rs"))
    saved = json.loads((tmp_path / "rs" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MINIPEFT_ROWSCALE" and saved["init_scale"] == 0.0
    again = mp.load_model(mp.DEMO_MODEL)
    again.load_adapters(str(tmp_path / "rs"))
    assert np.array_equal(again(ids).numpy(), trained)
    merged = again.merge_and_unload()(ids).numpy()
    assert float(np.max(np.abs(merged - trained))) <= 1e-5 * float(np.max(np.abs(trained)))
    from minipeft.cli import build_parser
    assert build_parser().parse_args(["train", "--model", "m", "--data", "d", "--output", "o",
                                      "--method", "rowscale"]).method == "rowscale"


@pytest.mark.spec("METHOD-2", "METHOD-9")
def test_inspect_names_the_method_and_counts_what_train_counts(tmp_path, capsys):
    """minipeft inspect reads the registry: DoRA shows as DoRA (before: PEFT's LORA, with "(dora)"), and the
    count equals the model's own (VeRA's file also holds the frozen shared A and B, which are not counted), read on
    the base its base_model_name_or_path names;
    with --model it is print_trainable_parameters' count and share (before: a share of the base alone)."""
    from minipeft.cli import main
    for name, title, peft in (("dora", "DoRA", "LORA, use_dora"), ("vera", "VeRA", "VERA"),
                              ("adalora", "AdaLoRA", "ADALORA")):
        model = mp.load_model(mp.DEMO_MODEL)
        getattr(model, f"apply_{name}")()
        model.save_adapters(str(tmp_path / name))
        assert main(["inspect", str(tmp_path / name)]) == 0
        shown = capsys.readouterr().out
        assert f"method: {title} (PEFT: {peft})" in shown
        assert f"trainable parameters: {model.parameter_counts()[0]:,} of" in shown  # on its base, found by its config
        model.print_trainable_parameters()
        peft_line = capsys.readouterr().out  # trainable params: T || all params: N || trainable%: P
        t, n, share = re.match(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)",
                               peft_line).groups()
        assert main(["inspect", str(tmp_path / name), "--model", mp.DEMO_MODEL]) == 0
        assert f"trainable parameters: {t} of {n} ({float(share):.3f}%)" in capsys.readouterr().out


def test_the_custom_method_example_runs(rowscale, capsys):
    """python examples/custom_method.py: trains, reloads with equal logits, merges (README, Adding a method)."""
    hist = rowscale.main()
    shown = capsys.readouterr().out
    assert hist["loss"][-1] < 0.8 * hist["loss"][0]
    assert "saved and reloaded: max logit difference 0.0e+00" in shown and "at init the logits move by 0.0e+00" in shown


@pytest.mark.spec("METHOD-10")
def test_initialisers_load_as_their_own_config():
    """An initialiser's init_lora_weights picks its config; use_dora with it fits two configs and is refused."""
    assert registry.initialiser_names()["orthogonal"] == "OrthogonalConfig"
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    for init, cls in (("orthogonal", mp.OrthogonalConfig), ("mica", mp.MiCAConfig), ("loftq", mp.LoftQConfig)):
        assert registry.config_class("LORA", fields={**lora, "init_lora_weights": init}) is cls
    for init in (True, "pissa", "gaussian"):
        assert registry.config_class("LORA", fields={**lora, "init_lora_weights": init}) is mp.LoRAConfig
    assert registry.config_class("LORA", fields={**lora, "use_dora": True}) is mp.DoRAConfig
    with pytest.raises(mp.CheckpointError, match="DoRAConfig and OrthogonalConfig"):
        registry.config_class("LORA", fields={**lora, "use_dora": True, "init_lora_weights": "orthogonal"})
    with pytest.raises(ConfigError, match="use its own config, OrthogonalConfig, or apply_orthogonal"):
        mp.LoRAConfig(init_lora_weights="orthogonal")
    assert mp.OrthogonalConfig(r=4).to_peft()["init_lora_weights"] == "orthogonal"
    assert registry.method("orthogonal").layer is None and registry.layer_class(mp.OrthogonalConfig()) is \
        registry.method("lora").layer
