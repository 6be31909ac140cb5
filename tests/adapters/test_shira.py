"""spec/shira.md (SHIRA-n) on tiny random Llama models built in-process (test_lora.py's set-up) and on
one random Linear. Each claim is rebuilt in NumPy from the spec: the mask from the forward Fisher-Yates
shuffle of NumPy's legacy MT19937 (test_backend.py's fisher_yates_prefix), sorted; dW[i_j, k_j] += w_j."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lycoris_checks as lc
from helpers import assert_close
from one_layer import check_on_the_backend, probe_backward, random_base
from minipeft import backend
from minipeft.adapters.base import AdaptedLayer
from minipeft.adapters.shira import TORCH_DEFAULT_SEED, SHiRAConfig, SHiRALinear
from minipeft.errors import CheckpointError, ConfigError
from minipeft.safetensors_io import read_safetensors, write_safetensors
from test_backend import fisher_yates_prefix
from test_dora import SETTINGS, targets
from test_lora import IDS, SHAPES, layers, make_model


def delta_np(d):
    """SHIRA-2 in float64: zeros with w_j added at (i_j, k_j)."""
    dW = np.zeros(d.shape)
    i = np.asarray(d.indices[0].data)
    np.add.at(dW, (i[0], i[1]), d.s * np.asarray(d.shira_weight.data, np.float64))
    return dW


def perturb(model, name="default", seed=1):
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, name):
        t = layer.adapters[name].shira_weight
        t.data = rng.standard_normal(t.shape).astype(np.float32)


@pytest.mark.spec("SHIRA-1", "SHIRA-4")
@SETTINGS
@given(r=st.integers(1, 5), tm=targets, seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)), init=st.booleans())
def test_mask_is_the_sorted_seeded_shuffle_and_init(r, tm, seed, init):
    model = make_model()
    before = model(IDS).data
    model.apply_shira(SHiRAConfig(rank=r, target_modules=tm, random_seed=seed, init_weights=init))
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        out, n_in = SHAPES[path.split(".", 3)[3]]
        N = r * (n_in + out)
        p = np.sort(fisher_yates_prefix(out * n_in, N, TORCH_DEFAULT_SEED if seed is None else seed))
        i = np.asarray(d.indices[0].data)
        assert i.dtype == np.int32 and np.array_equal(i, np.stack([p // n_in, p % n_in]))
        w = np.asarray(d.shira_weight.data)
        assert w.shape == (N,) and (not w.any() if init else w.std() > 0.5)
    assert np.array_equal(model(IDS).data, before) == init


@pytest.mark.spec("SHIRA-2", "SHIRA-3")
@SETTINGS
@given(r=st.integers(1, 5), tm=targets, two=st.booleans())
def test_forward_is_effective_weight_and_adapters_add(r, tm, two):
    lc.check_forward_adds(SHiRAConfig(rank=r, target_modules=tm),
                          SHiRAConfig(rank=1, target_modules=("q_proj", "down_proj"), random_seed=5),
                          two, perturb, delta_np, "SHiRA logits")


@pytest.mark.spec("SHIRA-5")
@SETTINGS
@given(r=st.integers(1, 5), tm=targets)
def test_merge_unmerge(r, tm):
    lc.check_merge_unmerge(SHiRAConfig(rank=r, target_modules=tm), perturb, delta_np)


@pytest.mark.spec("SHIRA-2", "SHIRA-6")
@SETTINGS
@given(r=st.integers(1, 7), seed=st.integers(0, 9))
def test_one_layer_gradients_rank_and_count(r, seed):
    rng = np.random.default_rng(seed)
    base, W0 = random_base(False, rng, 12, 20)
    base.requires_grad_(False)
    layer = AdaptedLayer(base)
    layer.adapters["default"] = d = SHiRALinear.create(base, SHiRAConfig(rank=r, random_seed=seed), "q", backend.RNG(0))
    layer.active = ["default"]
    d.shira_weight.data = rng.standard_normal(d.shira_weight.shape).astype(np.float32)
    assert d.shira_weight.shape == (r * 32,)
    X, G = probe_backward(layer, 12, 20)
    i = np.asarray(d.indices[0].data)
    assert_close(d.shira_weight.grad, (G.T.astype(np.float64) @ X)[i[0], i[1]], 1e-5, label="dw = G[i, k]")
    assert base.weight.grad is None
    if r >= 4:  # 128 of 240 entries: full rank, where LoRA's rank-r update has rank r
        assert np.linalg.matrix_rank(delta_np(d)) > r


@pytest.mark.spec("SHIRA-6")
@SETTINGS
@given(r=st.integers(1, 5), tm=targets)
def test_trainable_count(r, tm):
    model = make_model()
    model.apply_shira(rank=r, target_modules=tm)
    want = sum(r * sum(SHAPES[p.split(".", 3)[3]]) for p, _ in layers(model, "default"))
    lc.check_trainable(model, want)


@pytest.mark.spec("SHIRA-2", "SHIRA-3", "SHIRA-6")
def test_array_api_only(any_backend):
    check_on_the_backend(lambda base: SHiRALinear.create(base, SHiRAConfig(rank=2, init_weights=False), "q", backend.RNG(0)), delta_np,
                         "shira_weight")


@pytest.mark.spec("SHIRA-7", "SHIRA-8")
def test_save_load_keys_dtypes_and_the_file_s_mask(tmp_path):
    model = make_model()
    model.apply_shira(rank=2, target_modules=("q_proj",), random_seed=4)
    perturb(model)
    model.save_adapters(str(tmp_path))
    file = tmp_path / "adapter_model.safetensors"
    saved, meta = read_safetensors(str(file))
    keys = {f"base_model.model.model.layers.{i}.self_attn.q_proj.{leaf}": (shape, dtype) for i in range(2)
            for leaf, shape, dtype in (("shira_weight", (128,), np.float32), ("shira_indices", (2, 128), np.int32))}
    assert {k: (tuple(v.shape), v.dtype) for k, v in saved.items()} == keys
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["peft_type"] == "SHIRA" and conf["r"] == 2 and conf["random_seed"] == 4 and conf["mask_type"] == "random"
    again = make_model()
    again.load_adapters(str(tmp_path))
    assert np.array_equal(again(IDS).data, model(IDS).data)
    key = "base_model.model.model.layers.0.self_attn.q_proj.shira_indices"
    other = dict(saved)
    other[key] = np.stack([saved[key][0], (saved[key][1] + 1) % 32]).astype(np.int32)  # the file's mask wins
    write_safetensors(str(file), other, meta)
    again = make_model()
    again.load_adapters(str(tmp_path))
    assert np.array_equal(np.asarray(again.net.get_submodule("model.layers.0.self_attn.q_proj").adapters["default"]
                                     .indices[0].data), other[key])
    for bad, match in ((saved[key] + np.int32(32), "outside"), (saved[key].astype(np.float32), "integer type")):
        write_safetensors(str(file), {**saved, key: bad}, meta)
        with pytest.raises(CheckpointError, match=match):
            make_model().load_adapters(str(tmp_path))


@pytest.mark.spec("SHIRA-8")
@pytest.mark.parametrize("kw, field", [
    (dict(rank=0), "rank"), (dict(rank=1.5), "rank"), (dict(mask_type="magnitude"), "mask_type"),
    (dict(random_seed=-1), "random_seed"), (dict(random_seed=2**64), "random_seed")])
def test_config_errors(kw, field):
    with pytest.raises(ConfigError, match=field):
        SHiRAConfig(**kw)


@pytest.mark.spec("SHIRA-8")
def test_rank_too_large_names_the_layer():
    with pytest.raises(ConfigError, match=r"rank=11.*528 entries.*512 of model\.layers\.0\.self_attn\.v_proj"):
        make_model().apply_shira(rank=11, target_modules=("v_proj",))
    make_model().apply_shira(rank=10, target_modules=("v_proj",))  # 480 <= 512
