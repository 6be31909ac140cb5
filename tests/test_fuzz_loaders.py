"""Fuzzed loaders of strangers' files (spec/io.md IO-6..IO-8): config.json, adapter_config.json and
adapter weights. Each case starts from a valid file, breaks it one way, and must end in a correct
load or in a MiniPeftError whose message names the file and the field or key; never another
exception type and never a partial model. Outcomes are counted per test and printed by
test_fuzz_loaders_summary (pytest -s, or the line it writes past capture). Hypothesis runs
derandomized, so CI sees the same cases every time."""
import collections
import json
import math
import os
import re
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from minipeft import backend
from minipeft.adapters import peft_io
from minipeft.adapters.registry import REGISTRY
from minipeft.errors import CheckpointError, MiniPeftError
from minipeft.model import Model
from minipeft.models import model_class
from minipeft.models.config import FIELD_NAMES, LIMITS, read_config
from minipeft.safetensors_io import write_safetensors
from tests.helpers import TINY_LLAMA, data_for, max_rel_err, tiny_llama

OUTCOMES = collections.Counter()  # (test, outcome) -> cases
def fuzz(n):
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def outcome(test, name):
    OUTCOMES[test, name] += 1


# ---- strategies -------------------------------------------------------------------------------
def containers(c):
    return st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3)


SIZES = st.sampled_from([0, -1, 1, 2, 3, 7, 10**9, 10**12, 2**63, 10**30])
JUNK = st.recursive(st.none() | st.booleans() | SIZES | st.integers(-2**70, 2**70) | st.floats()
                    | st.text(max_size=5) | st.sampled_from(["q_proj", "all-linear", "LORA", "gelu", "silu"]),
                    containers, max_leaves=5)

# ---- IO-6: config.json ------------------------------------------------------------------------
BASES = {
    "llama": TINY_LLAMA, "mistral": {**TINY_LLAMA, "model_type": "mistral"},
    "qwen2": {**TINY_LLAMA, "model_type": "qwen2"},
    "phi": {"model_type": "phi", "vocab_size": 48, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 64, "partial_rotary_factor": 0.5},
    "gpt2": {"model_type": "gpt2", "vocab_size": 48, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
    "bert": {"model_type": "bert", "vocab_size": 48, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2},
}
CONFIG_KEYS = sorted({k for keys in FIELD_NAMES.values() for k in keys} | {
    "model_type", "rope_theta", "rope_parameters", "rope_scaling", "position_embedding_type", "is_decoder",
    "add_cross_attention"})
FIELD_OF = {k: f for f, keys in FIELD_NAMES.items() for k in keys}
CONFIG_MUTATIONS = ["drop", "junk", "size", "top_level", "rope"]


def mutate_config(draw, raw: dict, kind: str):
    """(the config.json text, the key it broke or None)."""
    raw = dict(raw)
    if kind == "top_level":
        return json.dumps(draw(JUNK)), None
    if kind == "drop":
        key = draw(st.sampled_from(sorted(raw)))
        raw.pop(key)
    elif kind == "rope":
        key = draw(st.sampled_from(["rope_parameters", "rope_scaling"]))
        raw[key] = draw(st.fixed_dictionaries({}, optional={
            "rope_type": st.sampled_from(["default", "linear", "llama3", "yarn"]) | JUNK,
            "factor": st.floats(-2, 64) | JUNK, "rope_theta": st.floats(-10, 1e6) | JUNK,
            "low_freq_factor": st.floats(0, 8) | JUNK, "high_freq_factor": st.floats(0, 8) | JUNK,
            "original_max_position_embeddings": SIZES | JUNK, "partial_rotary_factor": st.floats(-1, 2)}) | JUNK)
    else:
        key = draw(st.sampled_from(CONFIG_KEYS))
        raw[key] = draw(SIZES if kind == "size" else JUNK)
    return json.dumps(raw), key


def parameters_bound(cfg) -> int:
    """An upper bound on the parameters the config makes (here, before building it)."""
    d, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    dq = cfg.num_attention_heads * cfg.head_dim
    return 2 * V * d + cfg.max_position_embeddings * d + L * (4 * dq * max(d, dq) + 3 * d * I + 8 * max(d, I, dq))


def check_config_error(e, path, raw_text, key):
    msg = str(e)
    assert str(path) in msg, msg
    if key is not None:  # names a field: the broken one, or the one the broken value made wrong
        assert any(re.search(rf"\b{k}\b", msg) for k in CONFIG_KEYS + list(FIELD_NAMES)), msg


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_loaders")


@pytest.mark.spec("IO-6")
@pytest.mark.parametrize("kind", CONFIG_MUTATIONS)
@fuzz(150)
@given(arch=st.sampled_from(sorted(BASES)), data=st.data())
def test_fuzz_config_json_loads_or_names_the_field(work, kind, arch, data):
    text, key = mutate_config(data.draw, BASES[arch], kind)
    folder = work / "config"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(text)
    try:
        cfg = read_config(str(folder))
    except CheckpointError as e:
        check_config_error(e, folder / "config.json", text, key)
        return outcome("config.json", "CheckpointError")
    raw = json.loads(text)
    field = FIELD_OF.get(key)
    first = next((k for k in FIELD_NAMES.get(field, ()) if raw.get(k) is not None), None)
    if first == key and raw[key] != 0:  # the value read is the value written (0 means "derive it")
        assert getattr(cfg, field) == raw[key]
    if parameters_bound(cfg) > 2_000_000:
        return outcome("config.json", "parsed (too large to build here)")
    net = model_class(cfg.model_type)(cfg)  # a config that parses builds a model that runs
    T = min(3, cfg.max_position_embeddings)
    ids = np.arange(T)[None, :] % cfg.vocab_size
    try:
        out = Model(net)(ids).numpy()
    except MiniPeftError as e:
        assert "config" in str(e).lower() or "max_position_embeddings" in str(e), str(e)
        return outcome("config.json", f"built, forward refused ({type(e).__name__})")
    assert out.shape[:2] == (1, T) and np.isfinite(out).all(), (text, out)
    outcome("config.json", "loaded and ran")


@pytest.mark.spec("IO-6")
@fuzz(40)
@given(sizes=st.fixed_dictionaries({f: st.integers(2, LIMITS[f]) for f in
                                    ("vocab_size", "hidden_size", "num_hidden_layers")}))
def test_absurd_sizes_are_refused_before_allocating(work, sizes):
    """Sizes each within LIMITS, together beyond the checkpoint's values, are refused from the
    safetensors header before the model is built: tracemalloc's peak stays under 4 MiB."""
    folder = work / "absurd"
    folder.mkdir(exist_ok=True)
    sizes["hidden_size"] -= sizes["hidden_size"] % 2  # an even head size: the only thing wrong is the size
    need = sizes["vocab_size"] * sizes["hidden_size"] + sizes["num_hidden_layers"] * sizes["hidden_size"]
    assume(need > 48 * 32)  # more than the file holds
    sizes["num_attention_heads"] = 1
    (folder / "config.json").write_text(json.dumps({**TINY_LLAMA, **sizes, "num_key_value_heads": 1,
                                                    "intermediate_size": 4}))
    if not (folder / "model.safetensors").exists():
        write_safetensors(folder / "model.safetensors", {"model.embed_tokens.weight": np.zeros((48, 32), np.float32)})
    from minipeft.model import load_model
    tracemalloc.start()
    try:
        load_model(str(folder))
        raise AssertionError("loaded a model its checkpoint cannot hold")
    except CheckpointError as e:
        peak = tracemalloc.get_traced_memory()[1]
        msg = str(e)
        assert str(folder) in msg
        assert "config.json" in msg and "hidden_size" in msg and "refused before allocating" in msg, msg
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, peak
    outcome("config.json sizes", "refused before allocating")


@pytest.mark.spec("IO-6")
@pytest.mark.parametrize("field,value", [("num_hidden_layers", 10**12), ("hidden_size", 10**9),
                                         ("vocab_size", 10**12), ("intermediate_size", 10**15)])
def test_sizes_out_of_range_are_named(work, field, value):
    folder = work / f"range_{field}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY_LLAMA, field: value}))
    with pytest.raises(CheckpointError, match=f"{field}'={value} is out of range"):
        read_config(str(folder))


# ---- IO-7 / IO-8: adapter folders -------------------------------------------------------------
def valid_configs():
    """One small config of every registered method that fits the tiny llama."""
    import minipeft as mp
    from minipeft.adapters.ptuning_v2 import PTuningV2Config
    made = [mp.LoRAConfig(rank=4, alpha=8, bias="lora_only"), mp.LoHaConfig(rank=2), mp.LoKrConfig(rank=2),
            mp.DoRAConfig(rank=4), mp.IA3Config(), mp.VeRAConfig(rank=8), mp.PromptTuningConfig(num_virtual_tokens=3),
            mp.PrefixTuningConfig(num_virtual_tokens=3), PTuningV2Config(num_virtual_tokens=3),
            mp.PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8),
            mp.CPTConfig(cpt_token_ids=[3, 4, 5], cpt_tokens_type_mask=[1, 2, 4]),
            mp.AdaLoRAConfig(initial_rank=4, target_rank=2, total_step=10), mp.LoRAXSConfig(rank=2),
            mp.OrthogonalConfig(rank=4), mp.MiCAConfig(rank=4), mp.LoftQConfig(rank=4),
            mp.EVAConfig(rank=4, eva_config={"rho": 1.5}),
            mp.NOLAConfig(rank=2, num_basis_a=4, num_basis_b=3),
            mp.TiedLoRAConfig(rank=2, configuration="TL2"),
            mp.DVoRAConfig(rank=8), mp.MoRAConfig(rank=2, mora_type="sharing"), mp.HiRAConfig(rank=2), mp.HRAConfig(rank=2), mp.BEFTConfig(),
            mp.FourierFTConfig(n_frequency=16), mp.WaveFTConfig(n_frequency=16, wavelet_family="db2"), mp.SHiRAConfig(rank=1), mp.OFTConfig(oft_block_size=4), mp.RoadConfig(variant="road_4", group_size=8), mp.MiSSConfig(rank=3), mp.C3AConfig(block_size=8), mp.DeLoRAConfig(rank=2), mp.PSOFTConfig(rank=2), mp.GraLoRAConfig(rank=4, hybrid_r=2), mp.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2),
            mp.MultiLoRAConfig(rank=2, num_loras=2), mp.QALoRAConfig(rank=2, bits=2, group_size=16),
            mp.VBLoRAConfig(num_vectors=8, vector_length=8),
            mp.RandLoRAConfig(rank=4),
            mp.SuperTuningConfig(sparsity=0.9, rank=2),
            mp.TinyLoRAConfig(u=4, weight_tying=0.5),
            mp.GLoRAConfig(rank=2),
            mp.OSFConfig(effective_rank=4),
            mp.DEFTConfig(rank=3, decomposition_method="qr"),
            mp.UniLoRAConfig(rank=2, theta_d_length=64, save_indices=True),
            mp.LNTuningConfig(),
            mp.TrainableTokensConfig(token_indices=[3, 5]),
            mp.LoRAGAConfig(rank=2, lora_ga_config={"direction": "ArBr"}),
            mp.PEANuTConfig(rank=3, depth=1),
            mp.FRoDConfig(sparse_rate=0.05),
            mp.PVeRAConfig(rank=4, generator_seed=1),
            mp.ALoRAConfig(rank=2, alora_invocation_tokens=[5, 7]),
            mp.CorDAConfig(rank=2, corda_config={"corda_method": "kpm"}),
            mp.LilyConfig(rank=3, stride_A=2, num_B=3),
            mp.KaSAConfig(rank=2, kasa_config={"gamma": 0.01}),
            mp.LoRETTAConfig(variant="adp", bottleneck_size=4, tensor_rank=2, input_modules=["v_proj"]),
            mp.RoSAConfig(rank=2, density=0.05),
            mp.AdaMSSConfig(rank=4, num_subspaces=2),
            mp.LongLoRAConfig(rank=2),
            mp.BDLoRAConfig(rank=2, use_bdlora={"target_modules_bd_a": ["v_proj"], "target_modules_bd_b": ["q_proj"],
                                                "nblocks": 2}),
            mp.VeLoRAConfig(rank=2, velora_config={"num_groups": 5, "init_type": "random"}),
            mp.MonteCLoRAConfig(rank=2, monteclora_config={"num_samples": 3}),
            ]
    assert {type(c) for c in made} >= set(REGISTRY)  # every registered method is fuzzed
    return made


def snapshot(model):
    """What a failed load must leave as it was: adapters, active ones, every module and parameter."""
    return (dict(model.peft_configs), list(model.active_adapters),
            [(p, type(m).__name__) for p, m in model.net.named_modules()],
            [(n, p.shape, p.requires_grad) for n, p in model.net.named_parameters()])


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """{method: (folder, adapter_config dict, {key: array} as saved)}, each saved from a perturbed adapter."""
    out, root = {}, tmp_path_factory.mktemp("fuzz_adapters")
    for i, cfg in enumerate(valid_configs()):
        model = tiny_llama()
        model.apply_adapter(cfg, **data_for(type(cfg)))
        r = np.random.default_rng(i)
        for t in peft_io.adapter_tensors(model, "default").values():
            t.data = backend.asarray(r.standard_normal(t.shape).astype(np.float32))
        folder = root / type(cfg).__name__
        model.save_adapters(str(folder))
        from minipeft.safetensors_io import read_safetensors
        weights, _ = read_safetensors(folder / peft_io.WEIGHTS_NAME)
        out[type(cfg).__name__] = (folder, json.loads((folder / peft_io.CONFIG_NAME).read_text()), weights)
    return out


@pytest.fixture(scope="module")
def target():
    model = tiny_llama()
    return model, snapshot(model)


def model_for(method, target):
    """The shared target model, or a fresh one for a method that rewrites the base layers it adapts
    (QA-LoRA quantizes W0 in place: a later QA-LoRA file with other bits or groups is refused on that model)."""
    cls = {type(c).__name__: type(c) for c in valid_configs()}[method]
    if getattr(cls, "REWRITES_BASE", False):
        model = tiny_llama()
        return model, snapshot(model)
    return target


def load_and_judge(test, model, before, folder, strict):
    """Load; on success the model holds the file's tensors (as float32) and the report lists the key
    differences; on failure the model is as before. Returns (outcome, error message or None)."""
    weights_path = folder / peft_io.WEIGHTS_NAME
    try:
        report = model.load_adapters(str(folder), strict=strict)
    except MiniPeftError as e:
        assert snapshot(model) == before, f"a failed load changed the model: {e}"
        assert str(folder) in str(e), str(e)
        outcome(test, type(e).__name__)
        return type(e).__name__, str(e)
    from minipeft.safetensors_io import read_safetensors
    loaded, _ = read_safetensors(weights_path)
    mine = peft_io.adapter_tensors(model, "default")
    derived = any(k.startswith("prompt_encoder.") for k in loaded)  # P-tuning's prompt_embeddings is the encoder's
    for key in set(mine) & set(loaded):  # output, held to the file's within check_loaded's 1e-5 (PTUNING-5)
        if derived and key == "prompt_embeddings":
            ref = loaded[key].astype(np.float32)
            assert np.max(np.abs(mine[key].numpy() - ref)) <= 1e-5 * max(np.max(np.abs(ref)), 1e-30), key
            continue
    for key in set(mine) & set(loaded) - {"prompt_embeddings"}:
        assert np.array_equal(mine[key].numpy(), loaded[key].astype(np.float32)), key
    if "prompt_embeddings" in set(mine) & set(loaded):  # the encoder's output, recomputed: within check_loaded's 1e-5
        assert max_rel_err(mine["prompt_embeddings"], loaded["prompt_embeddings"]) <= 1e-5
    assert sorted(report["missing"]) == sorted(set(mine) - set(loaded))
    assert sorted(report["unexpected"]) == sorted(set(loaded) - set(mine))
    assert strict is False or not (report["missing"] or report["unexpected"])
    model.delete_adapter("default")
    assert snapshot(model) == before, "delete_adapter after a load left something behind"
    outcome(test, "loaded" if not (report["missing"] or report["unexpected"]) else "loaded, report lists keys")
    return "loaded", None


ADAPTER_CONFIG_MUTATIONS = ["field", "drop", "peft_type", "rank", "targets", "top_level"]
RANKS = SIZES | st.integers(-5, 70) | JUNK
TARGETS = JUNK | st.lists(JUNK, max_size=3) | st.sampled_from([[], [""], ["nothing"], ".*", "all-linear", [1, 2]])


def each_kind(kinds, n):
    """Run the test n derandomized examples for each mutation kind."""
    def wrap(test):
        return pytest.mark.parametrize("kind", kinds)(fuzz(n)(given(data=st.data())(test)))
    return wrap


@pytest.mark.spec("IO-7")
@each_kind(ADAPTER_CONFIG_MUTATIONS, 100)
def test_fuzz_adapter_config_loads_or_names_the_field(adapters, target, work, kind, data):
    method = data.draw(st.sampled_from(sorted(adapters)))
    _, d, weights = adapters[method]
    cfg_class = {type(c).__name__: type(c) for c in valid_configs()}[method]
    d, key = dict(d), None
    fields = sorted(set(d) | set(cfg_class.PEFT_FIELDS.values()))
    if kind == "field":
        key = data.draw(st.sampled_from(fields))
        d[key] = data.draw(JUNK)
    elif kind == "drop":
        key = data.draw(st.sampled_from(sorted(d)))
        d.pop(key)
    elif kind == "peft_type":
        key, d["peft_type"] = "peft_type", data.draw(JUNK | st.sampled_from(["LORA", "OFT", "BOFT", "lora", ""]))
    elif kind == "rank":
        key = data.draw(st.sampled_from([k for k in ("r", "init_r", "target_r", "num_virtual_tokens",
                                                      "encoder_hidden_size") if k in d] or ["r"]))
        d[key] = data.draw(RANKS)
    elif kind == "targets":
        key = data.draw(st.sampled_from(["target_modules", "modules_to_save", "feedforward_modules",
                                         "layers_to_transform", "exclude_modules"]))
        d[key] = data.draw(TARGETS)
    folder = work / "adapter_config"
    folder.mkdir(exist_ok=True)
    (folder / peft_io.CONFIG_NAME).write_text(json.dumps(data.draw(JUNK) if kind == "top_level" else d))
    write_safetensors(folder / peft_io.WEIGHTS_NAME, weights, {"format": "pt"})
    result, msg = load_and_judge("adapter_config.json", *model_for(method, target), folder, True)
    if result != "loaded" and key is not None:  # names the broken field (PEFT's or minipeft's name for it)
        ours = {v: k for k, v in cfg_class.PEFT_FIELDS.items()}.get(key, key)
        words = {key, ours, "peft_type"}
        names_field = any(re.search(rf"(\b|_){re.escape(w)}\b", msg) for w in words)
        assert names_field or (peft_io.WEIGHTS_NAME in msg and re.search(r"'[\w.]+'", msg)), (key, msg)  # or the weights


WEIGHT_MUTATIONS = ["drop", "extra", "shape", "nonfinite", "dtype", "rename"]


@pytest.mark.spec("IO-8")
@each_kind(WEIGHT_MUTATIONS, 80)
def test_fuzz_adapter_weights_load_or_name_the_key(adapters, target, work, kind, data):
    method = data.draw(st.sampled_from(sorted(adapters)))
    _, d, weights = adapters[method]
    weights, dtypes = dict(weights), {}
    key = data.draw(st.sampled_from(sorted(weights)))
    a = weights[key]
    if kind == "drop":
        weights.pop(key)
    elif kind == "extra":
        key = data.draw(st.sampled_from(["base_model.model.", "", "base_model.", "model."])) + \
            data.draw(st.sampled_from([key.split(".", 2)[-1], "model.layers.9.mlp.up_proj.lora_A.weight", "x"]))
        weights[key] = np.ones((2, 3), np.float32)
    elif kind == "shape":
        shapes = [a.T.shape, (a.shape[0] + 1,) + a.shape[1:], (a.size,), (), a.shape + (1,)]
        weights[key] = np.resize(a, data.draw(st.sampled_from(shapes)))
    elif kind == "nonfinite":
        b = a.copy().reshape(-1)
        b[data.draw(st.integers(0, b.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        weights[key] = b.reshape(a.shape)
    elif kind == "dtype":
        code = data.draw(st.sampled_from(["float16", "float64", "BF16", "int32", "int64", "uint8", "bool"]))
        if code == "BF16":
            dtypes[key] = "BF16"
        else:
            weights[key] = a.astype(code)
    elif kind == "rename":
        new = key.replace("base_model.model.", data.draw(st.sampled_from(["", "base_model.", "model."])), 1)
        weights[new] = weights.pop(key)
    folder = work / "adapter_weights"
    folder.mkdir(exist_ok=True)
    (folder / peft_io.CONFIG_NAME).write_text(json.dumps(d))
    write_safetensors(folder / peft_io.WEIGHTS_NAME, weights, {"format": "pt"}, dtypes=dtypes)
    result, msg = load_and_judge("adapter weights", *model_for(method, target), folder, data.draw(st.booleans()))
    if kind == "dtype" and code in ("int32", "int64", "uint8", "bool"):
        assert result != "loaded", f"{code} tensor {key!r} was loaded as float"
    if kind == "nonfinite":
        assert result != "loaded" or key not in peft_io.adapter_tensors(tiny_llama(), "default"), "NaN loaded"
    if result != "loaded":  # names the weights file and a key (the broken one, or the keys that differ)
        if peft_io.CONFIG_NAME in msg:  # the file cannot hold what the config sizes (an emptied file)
            assert re.search(r"field \w+=", msg), msg
        else:
            named = [k for k in set(adapters[method][2]) | {key} if k in msg or k.split(".")[-1] in msg]
            assert peft_io.WEIGHTS_NAME in msg and (named or "keys" in msg), msg


@pytest.mark.spec("IO-6", "IO-7", "IO-8")
def test_fuzz_loaders_summary():
    if not OUTCOMES:
        pytest.skip("the fuzz tests did not run in this session")
    per_test = collections.Counter()
    for (test, _), n in OUTCOMES.items():
        per_test[test] += n
    lines = [f"  {test:22s} {name:40s} {n}" for (test, name), n in sorted(OUTCOMES.items())]
    with __import__("contextlib").suppress(Exception):
        import sys
        sys.__stdout__.write(f"\nIO-6..8 loader fuzz: {sum(per_test.values())} cases "
                             f"({', '.join(f'{t} {n}' for t, n in sorted(per_test.items()))})\n" + "\n".join(lines) + "\n")
    assert sum(per_test.values()) >= 1000
