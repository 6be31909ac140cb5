"""spec/frod.md (FROD-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy float64 from
the spec's formula W' = U (S + diag lambda) V^T; and (oracle) against PEFT's FROD on Llama and GPT-2's Conv1D."""
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import max_rel_err
from minipeft.adapters.frod import FRoDConfig, basis, category, layer_index
from minipeft.errors import ConfigError
from one_layer import check_refuses_a_4bit_base, check_train_moves_every_leaf, saved_and_reloaded
from test_dora import SETTINGS, targets
from test_hira import check_unmerge_gives_W0_bit_for_bit, randomize  # randomize: every leaf ~ N(0, scale²)
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import (base, check_init_is_base_and_count, check_peft_case, lib,  # noqa: F401
                              perturbed_peft_model, report_gradients_from_peft)


def adapted_np(d):
    """FROD-5 in float64: U (S + diag lambda) V^T with S scattered from the values at P."""
    V, P, _ = (np.asarray(t.data) for t in d.shared)
    U = np.asarray(d.U[0].data, np.float64)
    M = np.diag(np.asarray(d.frod_lambda_l.data, np.float64))
    np.add.at(M, (P[0], P[1]), np.asarray(d.frod_lambda_s_values.data, np.float64))
    return U @ M @ V.astype(np.float64).T


@pytest.mark.spec("FROD-3", "FROD-5", "FROD-6", "FROD-8")
@SETTINGS
@given(rate=st.sampled_from([0.0, 0.01, 0.1, 0.5]), tm=targets)
def test_forward_and_merge_are_U_S_plus_diag_lambda_V(rate, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_frod(sparse_rate=rate, target_modules=tm)
    randomize(model, scale=0.1)
    updates = {}
    for p, layer in layers(model, "default"):
        d = layer.adapters["default"]
        updates[p + ".weight"] = adapted_np(d) - W[p + ".weight"].astype(np.float64)
    check_forward_merge_unmerge(model, W, updates)
    check_unmerge_gives_W0_bit_for_bit(model, W)


@pytest.mark.spec("FROD-1")
def test_categories_and_layer_order_follow_the_path():
    assert category("model.layers.3.self_attn.q_proj") == "self_attn_q_proj"
    assert category("h.0.attn.c_attn") == "attn_c_attn" and category("layers.0.fc") == "fc" and category("lm") == "lm"
    assert category("encoder.layer.0.attention.output.dense") == "attention_output"
    assert category("encoder.layer.0.output.dense") == "output_dense"
    assert layer_index("model.layers.11.mlp.up_proj", 0) == 11 and layer_index("encoder.layer.4.x", 0) == 4
    assert layer_index("classifier.dense", 7) == 7
    model = make_model()
    model.apply_frod(target_modules=("q_proj", "v_proj"))
    assert sorted(model.shared_tensors["default"]) == sorted(
        f"frod_{k}.self_attn_{c}_proj" for k in ("V", "s_indices", "s_size") for c in "qv")


@pytest.mark.spec("FROD-2", "FROD-3")
@SETTINGS
@given(k=st.integers(1, 3), m=st.integers(2, 12), n=st.integers(2, 10), seed=st.integers(0, 2**16))
def test_basis_and_factors_rebuild_W0(k, m, n, seed):
    rng = np.random.default_rng(seed)
    Ws = [rng.standard_normal((m, n)).astype(np.float32) for _ in range(k)]
    V = basis(Ws, 1e-3).astype(np.float64)
    assert np.linalg.cond(V) < 1e6
    top = np.abs(V).argmax(axis=0)
    assert np.all(V[top, np.arange(n)] > 0)  # columns signed: largest-|.| entry positive
    X = np.concatenate(Ws).astype(np.float64)
    if k * m < n:  # the SVD case: V orthogonal, its columns X's right singular vectors up to sign
        assert np.allclose(V.T @ V, np.eye(n), atol=1e-5)
        assert np.allclose(np.abs(V.T @ np.linalg.svd(X)[2].T), np.eye(n), atol=1e-4)
    else:  # the QR case: V = R^T E, E orthonormal eigenvectors of T
        R = np.linalg.qr(X)[1]
        E = np.linalg.solve(R.T, V)
        assert np.allclose(E.T @ E, np.eye(n), atol=1e-4)
    from minipeft.adapters.frod import factors
    for W in Ws:
        U, lam = factors(W, V.astype(np.float32))
        assert np.allclose(U.astype(np.float64) * lam @ V.T, W, atol=1e-4)
        norms = np.linalg.norm(U, axis=0)
        assert np.allclose(norms[lam > 1e-12], 1, atol=1e-5)


@pytest.mark.spec("FROD-4")
def test_positions_are_off_diagonal_distinct_and_sized():
    model = make_model()
    model.apply_frod(sparse_rate=0.1, target_modules=("q_proj", "down_proj"))
    for c, n in (("self_attn_q_proj", 32), ("mlp_down_proj", 64)):
        P = np.asarray(model.shared_tensors["default"][f"frod_s_indices.{c}"].data)
        assert P.dtype == np.int64 and P.shape == (2, int(n * n * 0.1)) and np.all(P[0] != P[1])
        assert len({(i, j) for i, j in P.T}) == P.shape[1] and P.min() >= 0 and P.max() < n
    assert FRoDConfig(sparse_rate=1e-9).entries(8) == 1 and FRoDConfig(sparse_rate=0.0).entries(8) == 0
    assert FRoDConfig(sparse_rate=1.0).entries(8) == 56  # n^2 - n at most


@pytest.mark.spec("FROD-7")
def test_inits_draw_from_the_stated_distributions():
    model = make_model()
    base_logits = model(IDS).numpy()
    model.apply_frod(target_modules=("q_proj", "up_proj"))
    assert max_rel_err(model(IDS), base_logits) < 1e-5  # W' = W0 to rounding
    for _, layer in layers(model, "default"):
        d = layer.adapters["default"]
        assert np.all(d.frod_lambda_s_values.data == 0)
        assert np.allclose(adapted_np(d), layer.base_layer.weight.data, atol=1e-5)
    rnd = make_model()
    rnd.apply_frod(sparse_rate=0.5, init_weights=False, target_modules=("up_proj",))
    ref = make_model()
    ref.apply_frod(sparse_rate=0.5, target_modules=("up_proj",))
    for (_, a), (_, b) in zip(layers(rnd, "default"), layers(ref, "default")):
        v = np.asarray(a.adapters["default"].frod_lambda_s_values.data)
        dl = np.asarray(a.adapters["default"].frod_lambda_l.data - b.adapters["default"].frod_lambda_l.data)
        assert abs(v.std() - 0.1) < 0.01 and abs(dl.std() - 0.1) < 0.03
    assert max_rel_err(rnd(IDS), base_logits) > 1e-4


@pytest.mark.spec("FROD-9")
def test_only_lambda_and_the_sparse_values_train_and_the_count_is_n_plus_N():
    model = make_model()
    model.apply_frod(sparse_rate=0.05, target_modules=("q_proj", "v_proj", "down_proj"))
    randomize(model, scale=0.1)
    model(IDS).sum().backward()
    trained = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith((".frod_lambda_l", ".frod_lambda_s_values")) for n in trained)
    assert all(p.grad is not None and np.abs(p.grad).max() > 0 for p in trained.values())
    # q_proj, v_proj: n = 32, N = int(1024 * 0.05) = 51; down_proj: n = 64, N = 204; two layers
    assert model.parameter_counts()[0] == 2 * (2 * (32 + 51) + (64 + 204))


@pytest.mark.spec("FROD-9")
@pytest.mark.parametrize("kwargs, field", [
    (dict(sparse_rate=1.5), "sparse_rate"), (dict(sparse_rate=-0.1), "sparse_rate"),
    (dict(regularization_alpha=0), "regularization_alpha"), (dict(projection_prng_key=-1), "projection_prng_key"),
    (dict(save_projection=False), "save_projection"), (dict(dropout=1.0), "dropout"), (dict(bias="lora_only"), "bias"),
    (dict(init_weights="x"), "init_weights"), (dict(exclude_modules=("q_proj",)), "exclude_modules")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        FRoDConfig(**kwargs)


@pytest.mark.spec("FROD-9")
def test_a_4bit_base_is_refused_naming_the_layer():
    check_refuses_a_4bit_base("frod")


@pytest.mark.spec("FROD-10")
def test_saved_keys_and_fields_are_peft_names(tmp_path):
    model = make_model()
    model.apply_frod(sparse_rate=0.05, dropout=0.1, target_modules=("v_proj",))
    randomize(model, scale=0.1)
    cfg, keys = saved_and_reloaded(model, tmp_path, make_model, IDS)
    assert cfg["peft_type"] == "FROD" and cfg["sparse_rate"] == 0.05 and cfg["frod_dropout"] == 0.1
    assert cfg["save_projection"] is True and cfg["regularization_alpha"] == 1e-3 and "exclude_modules" not in cfg
    want = {f"base_model.model.model.layers.{i}.self_attn.v_proj.{k}": s for i in (0, 1)
            for k, s in (("frod_lambda_l", (32,)), ("frod_lambda_s_values", (51,)))}
    want.update({"base_model.frod_V.self_attn_v_proj": (32, 32), "base_model.frod_s_indices.self_attn_v_proj": (2, 51),
                 "base_model.frod_s_size.self_attn_v_proj": (2,)})
    assert keys == want


@pytest.mark.spec("FROD-10")
def test_a_file_with_diagonal_positions_is_refused(tmp_path):
    from minipeft.errors import CheckpointError
    from minipeft.safetensors_io import read_safetensors, write_safetensors
    model = make_model()
    model.apply_frod(sparse_rate=0.05, target_modules=("v_proj",))
    model.save_adapters(str(tmp_path))
    f = str(tmp_path / "adapter_model.safetensors")
    tensors, meta = read_safetensors(f)
    bad = np.array(tensors["base_model.frod_s_indices.self_attn_v_proj"])
    bad[1, 0] = bad[0, 0]
    tensors["base_model.frod_s_indices.self_attn_v_proj"] = bad
    write_safetensors(f, tensors, meta)
    with pytest.raises(CheckpointError, match="off-diagonal"):
        make_model().load_adapters(str(tmp_path))


@pytest.mark.spec("FROD-6", "FROD-7")
def test_model_train_moves_every_leaf_and_lowers_the_loss():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_frod(sparse_rate=0.05, target_modules=("q_proj", "v_proj"))
    check_train_moves_every_leaf(model)


# ---- against PEFT (test_peft_oracle.py's tiny random Llama / GPT-2, every trainable tensor moved) ----------------
CASES = {"default": ("llama", dict(target_modules=["q_proj", "v_proj"], progressbar=False)),
         "dense": ("llama", dict(sparse_rate=0.2, bias="frod_only", target_modules=["q_proj", "k_proj", "down_proj"],
                                 progressbar=False)),
         "svd": ("llama", dict(sparse_rate=0.05, target_modules=["v_proj", "o_proj"], layers_to_transform=[1],
                               layers_pattern="layers", progressbar=False)),  # one v_proj: 16 rows < 32, the SVD case
         "random": ("llama", dict(sparse_rate=0.1, init_weights=False, projection_prng_key=7, frod_dropout=0.1,
                                  modules_to_save=["lm_head"], target_modules="all-linear", progressbar=False)),
         "gpt2": ("gpt2", dict(sparse_rate=0.05, target_modules=["c_attn", "c_fc"], progressbar=False))}


def ours(name):  # PEFT's base_model.model.<path>.frod_X.default -> <path>.adapters.default.frod_X
    name = name.removeprefix("base_model.model.")
    name = re.sub(r"^(.+)\.modules_to_save\.default\.", r"\1.", name)
    return re.sub(r"^(.+)\.(frod_\w+)\.default$", r"\1.adapters.default.\2", name)


@pytest.mark.oracle
@pytest.mark.spec("FROD-1", "FROD-2", "FROD-3", "FROD-5", "FROD-6", "FROD-8", "FROD-9", "FROD-10")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, case, tmp_path):
    check_peft_case(lib, base, CASES[case], "FrodConfig", FRoDConfig, tmp_path, f"FRoD {case}")


@pytest.mark.oracle
@pytest.mark.spec("FROD-4")
@pytest.mark.parametrize("case", ["dense", "random", "gpt2"])
def test_positions_equal_peft_s_seeded_draws(lib, base, case):
    pm = perturbed_peft_model(lib, base, CASES[case], "FrodConfig")
    kind, kw = CASES[case]
    model = mp.load_model(base(kind))
    model.apply_adapter(FRoDConfig.from_peft(dict(peft_type="FROD", **kw)))
    theirs = pm.base_model.frod_s_indices
    assert sorted(theirs) == sorted(k.split(".", 1)[1] for k in model.shared_tensors["default"] if "s_indices" in k)
    for c in theirs:
        assert np.array_equal(model.shared_tensors["default"][f"frod_s_indices.{c}"].data, theirs[c]["default"].numpy())


@pytest.mark.oracle
@pytest.mark.spec("FROD-5", "FROD-6")
@pytest.mark.parametrize("case", ["default", "dense", "gpt2"])
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    pm = perturbed_peft_model(lib, base, CASES[case], "FrodConfig").eval()
    report_gradients_from_peft(lib, pm, base(CASES[case][0]), tmp_path, f"FRoD {case}", ours, 1e-4)


@pytest.mark.oracle
@pytest.mark.spec("FROD-7", "FROD-9")
@pytest.mark.parametrize("case", ["default", "svd"])
def test_peft_default_init_is_the_base_and_counts_agree(lib, base, case):
    check_init_is_base_and_count(lib, base, CASES[case], "FrodConfig", FRoDConfig, f"FRoD {case}")


@pytest.mark.oracle
@pytest.mark.spec("FROD-2", "FROD-10")
@pytest.mark.parametrize("case", ["dense", "svd", "gpt2"])
def test_minipeft_s_own_basis_loads_in_peft_building_the_same_basis(lib, base, case, tmp_path):
    """minipeft's V (its own QR / eigh / SVD, signed) in the file; PEFT, building that V as it loads, gives minipeft's
    logits. With PEFT's own float32 LAPACK V it keeps a U that belongs to its V, not the file's (FROD-10)."""
    from helpers import peft_frod_basis_as_minipeft
    from test_peft_oracle import IDS as HF_IDS
    from test_peft_oracle import hf_logits, minipeft_saved_in_peft
    kind, kw = CASES[case]
    cfg = FRoDConfig.from_peft(dict(peft_type="FROD", **kw))
    with peft_frod_basis_as_minipeft():
        model, pm = minipeft_saved_in_peft(lib, base(kind), cfg, tmp_path / "ours")
    err = max_rel_err(model(HF_IDS), hf_logits(lib, pm))
    print(f"\n  FRoD {case} minipeft's V -> PEFT: max rel err {err:.2e}")
    assert err < 1e-5
    raw = lib[2].PeftModel.from_pretrained(pm.base_model.model.__class__.from_pretrained(base(kind)),
                                           str(tmp_path / "ours")).eval()
    stale = max_rel_err(model(HF_IDS), hf_logits(lib, raw))
    print(f"  FRoD {case} minipeft's V -> PEFT building its own V: max rel err {stale:.2e}")
    assert stale > 1e-3  # PEFT's U from its own V beside the file's V: not the adapter that was saved
