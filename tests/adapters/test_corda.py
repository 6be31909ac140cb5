"""spec/corda.md (CORDA-n): the covariance, the damped decomposition and the init, rebuilt in NumPy from the spec
on the tiny llama; PEFT's conversion on save; the errors raised before anything changes."""
import numpy as np
import pytest

import minipeft as mp
from adapters.one_layer import check_train_moves_every_leaf
from helpers import (INIT_DATA, check_bad_input_changes_nothing, check_saved_as_conversion,
                     check_unconverted_folder_refused, corda_layers, corda_reference, tiny_llama)
from minipeft import backend
from minipeft.errors import ConfigError


def batches():
    rng = np.random.default_rng(6)
    out = []
    for _ in range(2):
        mask = (np.arange(12)[None] < rng.integers(5, 13, 4)[:, None]).astype(np.int64)
        out.append({"input_ids": rng.integers(0, 48, (4, 12)), "attention_mask": mask})
    return out


def host(a):
    return np.asarray(backend.to_host(a), np.float64)


@pytest.mark.spec("CORDA-1")
def test_covariance_is_the_mean_of_each_example_s_normalised_gram():
    """q_proj of layer 0 reads RMSNorm(embedding): C rebuilt from the embedding table and the norm weight."""
    model = tiny_llama()
    E = host(model.net.get_submodule("model.embed_tokens").weight.data)
    g = host(model.net.get_submodule("model.layers.0.input_layernorm").weight.data)
    want, J = 0.0, 0
    for b in batches():
        for ids, mask in zip(b["input_ids"], b["attention_mask"]):
            h = E[ids[mask == 1]]
            x = h / np.sqrt(np.mean(h * h, axis=1, keepdims=True) + 1e-6) * g  # (T_j, in)
            x = x / abs(x.max())
            want, J = want + x.T @ x, J + 1
    C = corda_layers(model, batches(), rank=4, target_modules=("q_proj",))["model.layers.0.self_attn.q_proj"][2]
    assert np.abs(host(C) - want / J).max() <= 1e-6 * np.abs(want / J).max()


@pytest.mark.spec("CORDA-2", "CORDA-3")
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_init_is_the_formula_and_keeps_the_base(mode):
    model = tiny_llama()
    W0 = {p: host(m.weight.data) for p, m in model.net.named_modules() if p.endswith(("o_proj", "down_proj"))}
    layers = corda_layers(model, batches(), rank=4, alpha=8, target_modules=("o_proj", "down_proj"),
                          corda_config={"corda_method": mode})
    for p, (delta, layer, C) in layers.items():
        A, B = host(delta.lora_A.weight.data), host(delta.lora_B.weight.data)
        W_res, sBA = corda_reference(W0[p], host(C), 4, mode)
        assert np.abs(delta.s * B @ A - sBA).max() <= 1e-5 * np.abs(sBA).max(), p
        assert np.abs(host(layer.weight.data) - W_res).max() <= 1e-5 * np.abs(W_res).max(), p
        assert np.abs(host(layer.weight.data) + delta.s * B @ A - W0[p]).max() <= 1e-5 * np.abs(W0[p]).max(), p
        BtB = B.T @ B  # diag(S_r / s): B's columns are U_r's, scaled
        assert np.abs(BtB - np.diag(np.diag(BtB))).max() <= 1e-5 * np.abs(BtB).max(), p


BAD = [({"corda_method": "xpm"}, "ipm"), ({"cache": 1}, "CordaConfig"), ({"cache_file": "/tmp/c"}, "cache_file")]


@pytest.mark.spec("CORDA-6")
@pytest.mark.parametrize("corda_config,match", BAD)
def test_bad_corda_config_is_a_config_error(corda_config, match):
    from minipeft.adapters.corda import CorDAConfig
    with pytest.raises(ConfigError, match=match):
        CorDAConfig(corda_config=corda_config)


@pytest.mark.spec("CORDA-5")
@pytest.mark.parametrize("fields", [dict(rank=4, alpha=8), dict(rank=2, alpha=3, use_rslora=True),
                                    dict(rank=4, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 5},
                                         corda_config={"corda_method": "kpm"})])
def test_saves_peft_conversion_a_rank_2r_lora_of_the_unmodified_base(fields, tmp_path):
    check_saved_as_conversion("corda", fields, tmp_path)


@pytest.mark.spec("CORDA-5")
def test_a_peft_corda_folder_without_conversion_is_refused(tmp_path):
    check_unconverted_folder_refused("corda", tmp_path)


@pytest.mark.spec("CORDA-6")
def test_bad_input_is_an_error_before_anything_changes():
    check_bad_input_changes_nothing("corda", 17, r"min\(in, out\) = 16",
                                    [({"corda_config": bad}, match) for bad, match in BAD])


def test_trains_through_model_train():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_corda(data=["next abc = bcd", "next cat = dbu", "next dog = eph", "next pen = qfo"], rank=2)
    check_train_moves_every_leaf(model)
