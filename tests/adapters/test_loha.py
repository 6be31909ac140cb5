"""spec/loha.md (LOHA-n) on tiny random Llama models built in process; the NumPy references are in
lycoris_checks.py (ΔW = s (W1a W1b) ⊙ (W2a W2b), rebuilt from the leaves, never delta_weight())."""
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import lycoris_checks as lc
from one_layer import probe_backward
from helpers import assert_close
from minipeft.adapters.loha import LoHaConfig, LoHaLinear
from minipeft.errors import ConfigError
from test_lora import NAMES, SHAPES, first_match

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck),
                    phases=(Phase.explicit, Phase.reuse, Phase.generate))
FEW = settings(SETTINGS, max_examples=6)  # whole-model cases build two or three models each
targets = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True)
ranks = st.integers(1, 6)


def shape_of(path):
    return SHAPES[path.split(".", 3)[3]]  # (out, in)


@pytest.mark.spec("LOHA-6", "LOHA-8")
@FEW
@given(r=ranks, alpha=st.floats(0.5, 32), tm=targets, init=st.booleans())
def test_init(r, alpha, tm, init):
    """init_weights=True: W2b = 0, so the output is the base model's; False: all four kaiming-uniform."""
    cfg = LoHaConfig(rank=r, alpha=alpha, target_modules=tuple(tm), init_weights=init)
    if init:
        model = lc.check_unchanged_at_init(cfg)
    else:
        model = lc.make_model()
        model.apply_adapter(cfg)
    count = 0
    for path, layer in lc.layers(model, "default"):
        out, n = shape_of(path)
        lc.check_kaiming(layer.adapters["default"], {"hada_w2_b"} if init else set())
        shapes = {k: v.shape for k, v in lc.leaves(layer.adapters["default"]).items()}
        assert shapes == {"hada_w1_a": (out, r), "hada_w1_b": (r, n), "hada_w2_a": (out, r), "hada_w2_b": (r, n)}
        count += 2 * r * (out + n)
    lc.check_trainable(model, count)


@pytest.mark.spec("LOHA-1", "LOHA-2")
@SETTINGS
@given(r=ranks, alpha=st.floats(0.5, 32),
       rp=st.dictionaries(st.sampled_from(["v_proj", r"layers\.1\.self_attn\.q_proj", "proj"]), ranks, max_size=2),
       ap=st.dictionaries(st.sampled_from(["q_proj", r"layers\.0\..*"]), st.floats(1, 64), max_size=2))
def test_delta_weight_and_scaling(r, alpha, rp, ap):
    model = lc.make_model()
    model.apply_adapter(LoHaConfig(rank=r, alpha=alpha, rank_pattern=rp, alpha_pattern=ap,
                                   target_modules=("q_proj", "v_proj")))
    lc.randomize(model, "default")
    for path, layer in lc.layers(model, "default"):
        d = layer.adapters["default"]
        r_, a_ = first_match(rp, path, r), first_match(ap, path, alpha)
        assert d.hada_w1_a.shape[1] == r_ and np.isclose(d.s, a_ / r_, rtol=1e-12)
        assert_close(d.delta_weight(), lc.ref_delta(d), 1e-6, label="ΔW")


@pytest.mark.spec("LOHA-3")
@FEW
@given(ra=ranks, rb=ranks, tma=targets, tmb=targets, active=st.sampled_from(["a", "b", "ab"]))
def test_forward_is_effective_weight(ra, rb, tma, tmb, active):
    lc.check_forward_and_disable(LoHaConfig(rank=ra, alpha=8, target_modules=tuple(tma)),
                                 LoHaConfig(rank=rb, alpha=3, target_modules=tuple(tmb)), active)


@pytest.mark.spec("LOHA-5")
@FEW
@given(r=ranks, alpha=st.floats(1, 32), tm=targets)
def test_merge_unmerge(r, alpha, tm):
    lc.check_merge_unmerge(LoHaConfig(rank=r, alpha=alpha, target_modules=tuple(tm)))


@pytest.mark.spec("LOHA-5")
@SETTINGS
@given(r=ranks, n_in=st.integers(1, 12), n_out=st.integers(1, 12))
def test_gpt2_conv1d_orientation(r, n_in, n_out):
    lc.check_conv1d(LoHaLinear, LoHaConfig(rank=r, alpha=2), n_in, n_out)


@pytest.mark.spec("LOHA-4")
@SETTINGS
@given(p=st.sampled_from([0.0, 0.3, 0.7, 0.99]), q=st.sampled_from([0.0, 0.4, 1.0]), r=ranks)
def test_dropouts(p, q, r):
    lc.check_dropouts(LoHaLinear, LoHaConfig(rank=r, alpha=4, rank_dropout=p, module_dropout=q), n_out=3 + r)



@pytest.mark.spec("LOHA-3", "LOHA-4", "LOHA-5")
def test_array_api_only(any_backend):
    cfg = LoHaConfig(rank=3, alpha=4, rank_dropout=0.5, module_dropout=1e-9)  # the module draw happens, no skip
    lc.check_array_api(LoHaLinear, cfg)


@pytest.mark.spec("LOHA-7", "LOHA-8")
@SETTINGS
@given(r=ranks, alpha=st.floats(1, 16), seed=st.integers(0, 100))
def test_gradients(r, alpha, seed):
    """L = Σ G ⊙ Y for one layer: the four leaf gradients are LOHA-7's lines with G_W = Gᵀ X; W0 gets none."""
    model = lc.make_model()
    model.apply_adapter(LoHaConfig(rank=r, alpha=alpha, target_modules=("up_proj",)))
    model.apply_adapter(LoHaConfig(rank=2, target_modules=("up_proj",)), "other")  # inactive: frozen
    lc.randomize(model, "default", seed)
    lc.randomize(model, "other", seed + 1)
    layer = model.net.get_submodule("model.layers.0.mlp.up_proj")
    for p in layer.parameters():  # float64: the formula itself, free of float32 sums with cancellation
        p.data = np.asarray(p.data, np.float64)
    X, G = probe_backward(layer, lc.D, 64, seed)
    d = layer.adapters["default"]
    t, s, GW = lc.leaves(d), d.s, G.T.astype(np.float64) @ X
    P1, P2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
    ref = {"hada_w1_a": s * (GW * P2) @ t["hada_w1_b"].T, "hada_w1_b": s * t["hada_w1_a"].T @ (GW * P2),
           "hada_w2_a": s * (GW * P1) @ t["hada_w2_b"].T, "hada_w2_b": s * t["hada_w2_a"].T @ (GW * P1)}
    for name, g in ref.items():
        assert_close(getattr(d, name).grad, g, 1e-10, label=f"d {name}")
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert all(p.grad is None for p in layer.adapters["other"].parameters())


@pytest.mark.spec("LOHA-9")
def test_save_load_keys(tmp_path):
    cfg = LoHaConfig(rank=3, alpha=5, target_modules=("q_proj", "k_proj"), rank_dropout=0.1, module_dropout=0.2,
                     rank_pattern={"k_proj": 2}, init_weights=False)
    want = {}
    for i in range(2):
        for name, r in (("q_proj", 3), ("k_proj", 2)):
            out, n = SHAPES[f"self_attn.{name}"]
            key = f"base_model.model.model.layers.{i}.self_attn.{name}."
            want.update({key + "hada_w1_a": (out, r), key + "hada_w1_b": (r, n),
                         key + "hada_w2_a": (out, r), key + "hada_w2_b": (r, n)})
    conf = lc.check_save_load(cfg, tmp_path, "LOHA", want)
    assert {k: conf[k] for k in ("rank_dropout", "module_dropout", "rank_pattern", "init_weights")} == \
        {"rank_dropout": 0.1, "module_dropout": 0.2, "rank_pattern": {"k_proj": 2}, "init_weights": False}


BAD = [("rank", 0), ("rank", 2.5), ("alpha", 0), ("alpha", -1), ("rank_dropout", 1.0), ("rank_dropout", -0.1),
       ("module_dropout", 1.5), ("init_weights", "lycoris"), ("init_weights", 1), ("rank_pattern", {"q_proj": 0}),
       ("alpha_pattern", {"q_proj": -2})]


@pytest.mark.spec("LOHA-10")
@pytest.mark.parametrize("field,value", BAD)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        LoHaConfig(**{field: value})


@pytest.mark.spec("LOHA-10")
def test_no_target_leaves_model_unchanged():
    model = lc.make_model()
    before = lc.snapshot(model)
    with pytest.raises(ConfigError, match="target_modules"):
        model.apply_loha(rank=2, target_modules=("nope",))
    assert not model.peft_configs and lc.snapshot(model).keys() == before.keys()
