"""spec/tinylora.md (TINYLORA-n) on tiny random Llama models (test_lora.py's set-up) and one random Linear, each
claim rebuilt in NumPy float64 from the spec: A = sqrt(S) V^T, B = U sqrt(S) from W0's SVD, R = sum_i v_i P_i,
dW = B R A, the tie groups' formula, torch's normal stream; and (oracle) against PEFT's TINYLORA on Llama and
GPT-2's Conv1D, with torch itself for P."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import max_rel_err, peft_svd_signs_as_minipeft
from minipeft import backend
from minipeft.adapters.tinylora import TinyLoRAConfig, TinyLoRALinear
from minipeft.errors import ConfigError
from one_layer import check_on_the_backend, check_train_moves_every_leaf, saved_and_reloaded
from test_dora import SETTINGS, targets
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import (base, check_init_is_base_and_count, check_peft_case, lib,  # noqa: F401
                              perturbed_peft_model, report, report_gradients_from_peft)


def update_np(d):
    """TINYLORA-5 in float64: B (sum_i v_i P_i) A."""
    A, B, P = (np.asarray(t.data, np.float64) for t in d.frozen)
    R = np.einsum("i,ijk->jk", np.asarray(d.tinylora_v.data, np.float64), P)
    return B @ R @ A


def perturb_v(model, seed=1):
    rng = np.random.default_rng(seed)
    for v in model.shared_tensors["default"].values():
        v.data = rng.standard_normal(v.shape).astype(np.float32)


def groups_np(T, wt):
    """TINYLORA-2 written out: G groups of T // G consecutive layers, the rest in the last."""
    G = max(1, round(T * (1 - wt)))
    size = max(1, T // G)
    return [min(j // size, G - 1) for j in range(T)]


@pytest.mark.spec("TINYLORA-1", "TINYLORA-4", "TINYLORA-5")
@SETTINGS
@given(r=st.integers(1, 40), u=st.integers(1, 20), wt=st.floats(0, 1), tm=targets)
def test_forward_and_merge_are_W0_plus_B_R_A(r, u, wt, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_tinylora(rank=r, u=u, weight_tying=wt, target_modules=tm)
    perturb_v(model)
    updates = {}
    for path, layer in layers(model, "default"):
        d, W0 = layer.adapters["default"], W[path + ".weight"].astype(np.float64)
        A, B, P = (np.asarray(t.data, np.float64) for t in d.frozen)
        k = min(r, *W0.shape)
        U, S, Vh = np.linalg.svd(W0, full_matrices=False)
        assert A.shape == (k, W0.shape[1]) and B.shape == (W0.shape[0], k) and P.shape == (u, k, k)
        assert np.allclose(B @ A, (U[:, :k] * S[:k]) @ Vh[:k], atol=1e-4)  # the rank-r' truncation of W0
        assert np.allclose(A @ A.T, np.diag(S[:k]), atol=1e-4) and np.allclose(B.T @ B, np.diag(S[:k]), atol=1e-4)
        col = np.argmax(np.abs(B), axis=0)  # PSOFT-1's sign: U's largest-|.| entry positive
        assert np.all(B[col, np.arange(k)] > 0)
        updates[path + ".weight"] = update_np(d)
        assert np.allclose(d.delta_weight(), updates[path + ".weight"], rtol=1e-4, atol=1e-5)
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("TINYLORA-2", "TINYLORA-7")
@SETTINGS
@given(wt=st.floats(0, 1), u=st.integers(1, 9), tm=targets)
def test_tie_groups_share_v_and_the_count_is_G_u(wt, u, tm):
    model = make_model()
    model.apply_tinylora(u=u, weight_tying=wt, target_modules=tm)
    held = [layer.adapters["default"].tinylora_v for _, layer in layers(model, "default")]
    want = groups_np(len(held), wt)
    for i in range(len(held)):
        for j in range(len(held)):
            assert (held[i] is held[j]) == (want[i] == want[j])
    assert sorted(model.shared_tensors["default"]) == [f"tinylora_v.{g}" for g in sorted(set(want))]
    assert model.parameter_counts()[0] == u * len(set(want))


@pytest.mark.spec("TINYLORA-2")
def test_group_examples():
    assert groups_np(6, 0.5) == [0, 0, 1, 1, 2, 2]
    assert groups_np(7, 0.5) == [0, 1, 2, 3, 3, 3, 3]  # G = round(3.5) = 4 (half to even), groups of 7 // 4 = 1
    assert groups_np(5, 0.5) == [0, 0, 1, 1, 1] and groups_np(4, 1.0) == [0] * 4 and groups_np(3, 0.0) == [0, 1, 2]
    for T, wt in ((6, 0.5), (7, 0.5), (5, 0.5), (4, 1.0), (3, 0.0), (14, 0.3)):
        assert TinyLoRAConfig(weight_tying=wt).groups(T) == groups_np(T, wt)


@pytest.mark.spec("TINYLORA-3")
@pytest.mark.parametrize("shape", [(64, 2, 2), (3, 2, 2), (1, 1, 1), (7, 3, 3), (16, 1, 1), (17, 1, 1), (5, 4, 4)])
def test_projections_follow_torch_s_seeded_normal(shape):
    """The stream of TINYLORA-3 rebuilt from NumPy's legacy MT19937 (RandomState's 32-bit outputs), entry by entry."""
    seed, std = 42 + shape[0], 1 / np.sqrt(shape[1])
    rs = np.random.RandomState(seed)
    n = int(np.prod(shape))
    if n >= 16:
        draws = n + (16 if n % 16 else 0)
        f = [(int(rs.randint(0, 2**32, dtype=np.uint64)) & (2**24 - 1)) / 2**24 for _ in range(draws)]
        z = list(f[:n])
        blocks = [(i, f[i:i + 16]) for i in range(0, n - 15, 16)] + ([(n - 16, f[n:])] if n % 16 else [])
        for at, b in blocks:
            for j in range(8):
                rad, th = np.sqrt(-2 * np.log(1 - b[j])), 2 * np.pi * b[j + 8]
                z[at + j], z[at + j + 8] = rad * np.cos(th), rad * np.sin(th)
    else:
        z = []
        while len(z) < n:
            hi_lo = [int(rs.randint(0, 2**32, dtype=np.uint64)) for _ in range(4)]
            u1, u2 = (((hi_lo[i] << 32 | hi_lo[i + 1]) & (2**53 - 1)) / 2**53 for i in (0, 2))
            rad, th = np.sqrt(-2 * np.log1p(-u2)), 2 * np.pi * u1
            z += [rad * np.cos(th), rad * np.sin(th)]
    want = (np.array(z[:n]) * std).reshape(shape)
    got = backend.torch_normal(shape, std, seed)
    assert got.dtype == np.float32 and np.allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.spec("TINYLORA-3")
def test_layer_j_takes_seed_plus_j():
    model = make_model()
    model.apply_tinylora(rank=3, u=5, projection_seed=7, weight_tying=1.0, target_modules=("k_proj", "up_proj"))
    for j, (_, layer) in enumerate(layers(model, "default")):
        P = np.asarray(layer.adapters["default"].frozen[2].data)
        assert np.array_equal(P, backend.torch_normal((5, 3, 3), 1 / np.sqrt(3), 7 + j))


@pytest.mark.spec("TINYLORA-6")
def test_inits():
    model = make_model()
    base_logits = model(IDS).numpy()
    model.apply_tinylora(u=8, target_modules=("q_proj", "up_proj"))
    assert np.array_equal(model(IDS).numpy(), base_logits)
    empty = make_model()
    empty.apply_tinylora(init="empty")
    assert all(np.all(v.data == 0) for v in empty.shared_tensors["default"].values())
    rnd = make_model()
    rnd.apply_tinylora(u=500, init="uniform", init_v_bound=0.05, weight_tying=1.0)
    (v,) = rnd.shared_tensors["default"].values()
    assert 0.045 < np.abs(v.data).max() <= 0.05 and abs(float(np.mean(v.data))) < 0.01
    assert max_rel_err(rnd(IDS), base_logits) > 1e-5


@pytest.mark.spec("TINYLORA-4", "TINYLORA-5", "TINYLORA-7")
def test_one_layer_gradients_on_the_backend(any_backend):
    cfg = TinyLoRAConfig(rank=3, u=4, init="uniform", init_v_bound=0.5)

    def create(base):  # A, B come from W0: take it on the backend first (check_on_the_backend moves it after)
        base.weight.data = backend.asarray(np.asarray(base.weight.data))
        return TinyLoRALinear.create_all({"layer": base}, cfg, backend.RNG(0))[0]["layer"]
    check_on_the_backend(create, update_np, "tinylora_v")


@pytest.mark.spec("TINYLORA-9")
@pytest.mark.parametrize("kwargs, field", [
    (dict(rank=0), "rank"), (dict(u=0), "u"), (dict(weight_tying=1.5), "weight_tying"),
    (dict(projection_seed=-1), "projection_seed"), (dict(dropout=1.0), "dropout"), (dict(init="gaussian"), "init"),
    (dict(bias="lora_only"), "bias"), (dict(exclude_modules=("q_proj",)), "exclude_modules")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        TinyLoRAConfig(**kwargs)


@pytest.mark.spec("TINYLORA-8")
def test_saved_keys_fields_and_a_file_without_P(tmp_path):
    model = make_model()
    model.apply_tinylora(u=3, weight_tying=0.5, dropout=0.1, target_modules=("v_proj", "down_proj"))
    perturb_v(model)
    cfg, keys = saved_and_reloaded(model, tmp_path / "a", make_model, IDS)
    assert cfg["peft_type"] == "TINYLORA" and (cfg["r"], cfg["u"], cfg["weight_tying"]) == (2, 3, 0.5)
    assert cfg["init_weights"] is True and cfg["tinylora_dropout"] == 0.1 and cfg["projection_seed"] == 42
    assert "exclude_modules" not in cfg and cfg["save_projection"] is True
    want = {"base_model.tinylora_v.0": (3,), "base_model.tinylora_v.1": (3,)}
    for i in (0, 1):
        for name, n, m in (("self_attn.v_proj", 32, 16), ("mlp.down_proj", 64, 32)):
            want.update({f"base_model.model.model.layers.{i}.{name}.tinylora_A": (2, n),
                         f"base_model.model.model.layers.{i}.{name}.tinylora_B": (m, 2),
                         f"base_model.model.model.layers.{i}.{name}.tinylora_P": (3, 2, 2)})
    assert keys == want
    assert TinyLoRAConfig.from_peft(dict(cfg, init_weights="uniform")).init == "uniform"
    assert TinyLoRAConfig.from_peft(dict(cfg, init_weights=False)).init == "empty"
    no_p = make_model()
    no_p.apply_tinylora(u=3, save_projection=False, target_modules=("q_proj",))
    perturb_v(no_p)
    _, keys = saved_and_reloaded(no_p, tmp_path / "b", make_model, IDS)
    assert not any(k.endswith("tinylora_P") for k in keys)


@pytest.mark.spec("TINYLORA-4", "TINYLORA-7")
def test_model_train_moves_every_leaf_and_lowers_the_loss():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_tinylora(rank=4, u=16, target_modules=("q_proj", "v_proj"))
    check_train_moves_every_leaf(model, lr=0.03)


# ---- against PEFT (test_peft_oracle.py's tiny random Llama / GPT-2, every trainable tensor moved) ----------------
CASES = {"plain": ("llama", dict(u=5, target_modules=["q_proj", "v_proj", "down_proj"])),
         "tied": ("llama", dict(r=3, u=7, weight_tying=0.5, projection_seed=3, bias="tinylora_only",
                                target_modules=["q_proj", "k_proj", "up_proj", "o_proj"])),
         "no_projection": ("llama", dict(r=4, u=1, weight_tying=1.0, save_projection=False, init_weights="uniform",
                                         target_modules=["q_proj", "gate_proj", "down_proj"])),
         "gpt2": ("gpt2", dict(u=20, weight_tying=0.3, save_projection=False, target_modules=["c_attn", "c_fc"]))}


@pytest.mark.oracle
@pytest.mark.spec("TINYLORA-1", "TINYLORA-2", "TINYLORA-3", "TINYLORA-4", "TINYLORA-5", "TINYLORA-7",
                  "TINYLORA-8")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, case, tmp_path):
    check_peft_case(lib, base, CASES[case], "TinyLoraConfig", TinyLoRAConfig, tmp_path, f"TinyLoRA {case}")


@pytest.mark.oracle
@pytest.mark.spec("TINYLORA-1", "TINYLORA-2", "TINYLORA-3")
@pytest.mark.parametrize("case", ["tied", "gpt2"])
def test_fresh_adapters_agree_with_peft_s(lib, base, case):
    """minipeft's own A, B (torch's SVD given PSOFT-1's signs), P (torch's normal) and groups are PEFT's. A and B
    are float32 SVDs by two LAPACKs: minipeft's (NumPy's OpenBLAS) within 1e-6 of float64's SVD of the same W0, torch's
    (MKL's) and the two to each other within 1e-4 (measured 1.1e-5: MKL's float32 SVD is the coarser); P to 1e-5."""
    kind, kw = CASES[case]
    with peft_svd_signs_as_minipeft():
        pm = perturbed_peft_model(lib, base, CASES[case], "TinyLoraConfig")
    model = mp.load_model(base(kind))
    model.apply_adapter(TinyLoRAConfig.from_peft(dict(peft_type="TINYLORA", **kw)))
    worst = {"P": 0.0, "A, B vs PEFT's": 0.0, "A, B vs float64": 0.0, "PEFT's A, B vs float64": 0.0}
    for path, layer in layers(model, "default"):
        theirs = pm.base_model.model.get_submodule(path)
        d = layer.adapters["default"]
        W0 = np.asarray(layer.base_layer.weight.data, np.float64)
        W0 = W0.T if layer.base_layer.fan_in_fan_out else W0
        U, S, Vh = np.linalg.svd(W0, full_matrices=False)
        k = d.frozen[0].shape[0]
        U, Vh = U[:, :k], Vh[:k]
        sign = np.where(U[np.argmax(np.abs(U), axis=0), np.arange(k)] < 0, -1.0, 1.0)  # PSOFT-1
        truth = {"tinylora_A": np.sqrt(S[:k])[:, None] * Vh * sign[:, None], "tinylora_B": U * sign * np.sqrt(S[:k])}
        for leaf, t in zip(("tinylora_A", "tinylora_B", "tinylora_P"), d.frozen):
            peft_t = getattr(theirs, leaf)["default"].numpy()
            if leaf == "tinylora_P":
                worst["P"] = max(worst["P"], max_rel_err(t.data, peft_t))
                continue
            worst["A, B vs PEFT's"] = max(worst["A, B vs PEFT's"], max_rel_err(t.data, peft_t))
            worst["A, B vs float64"] = max(worst["A, B vs float64"], max_rel_err(t.data, truth[leaf]))
            worst["PEFT's A, B vs float64"] = max(worst["PEFT's A, B vs float64"], max_rel_err(peft_t, truth[leaf]))
        v_key = theirs._tinylora_v_key["default"]  # its tie group (TINYLORA-2)
        assert [k for k, t in model.shared_tensors["default"].items() if t is d.tinylora_v] == [f"tinylora_v.{v_key}"]
    report(f"TinyLoRA {case} fresh P vs PEFT's", worst.pop("P"))
    for what, err in worst.items():
        print(f"\n  TinyLoRA {case} fresh {what}: max rel err {err:.2e}")
        assert err < (1e-6 if what == "A, B vs float64" else 1e-4)


@pytest.mark.oracle
@pytest.mark.spec("TINYLORA-4", "TINYLORA-7")
def test_training_step_gradients_agree(lib, base, tmp_path):
    kind, kw = CASES["tied"]
    pm = perturbed_peft_model(lib, base, CASES["tied"], "TinyLoraConfig").eval()
    named = mp.load_model(base(kind))
    named.apply_adapter(TinyLoRAConfig.from_peft(dict(peft_type="TINYLORA", **kw)))
    first = {k.removeprefix("tinylora_v."): n for n, p in named.net.named_parameters()  # group -> our name of its v
             for k, t in named.shared_tensors["default"].items() if t is p}
    # PEFT names every v under its first layer: base_model.model.<path>.tinylora_v.default.<g>; biases by path
    report_gradients_from_peft(lib, pm, base(kind), tmp_path, "TinyLoRA tied",
                               lambda n: first[n.rsplit(".", 1)[1]] if ".tinylora_v." in n
                               else n.removeprefix("base_model.model."), 1e-4)


@pytest.mark.oracle
@pytest.mark.spec("TINYLORA-6", "TINYLORA-7")
@pytest.mark.parametrize("case", ["plain", "tied"])
def test_peft_default_init_is_the_base_and_counts_agree(lib, base, case):
    check_init_is_base_and_count(lib, base, CASES[case], "TinyLoraConfig", TinyLoRAConfig, f"TinyLoRA {case}")
