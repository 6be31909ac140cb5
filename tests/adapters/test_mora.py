"""spec/mora.md (MORA-n) on tiny random Llama models (test_lora.py's set-up) and single layers, each claim
rebuilt in NumPy float64 from the spec: the compress and decompress maps written out entry by entry, and
dW read off as the chain's image of the unit vectors."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close, assert_training_lowers_the_loss
from minipeft import backend
from minipeft.adapters.mora import MORA_TYPES, MoRAConfig, MoRALinear
from minipeft.autograd import Tensor
from minipeft.errors import ConfigError
from minipeft.nn.layers import Linear
from one_layer import check_dropout_forward, saved_and_reloaded, train_next
from test_dora import SETTINGS, targets
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot

types = st.sampled_from(MORA_TYPES)


def r_hat_np(n, m, r, kind):
    k = int(math.floor(math.sqrt((n + m) * r) + 1e-9))
    return k - k % 2 if kind == "rope" else k


def chain_np(M, n, m, kind, x):
    """f_decomp(M f_comp(x)) for one input x (in,), MORA-2 and MORA-3 written out."""
    k = M.shape[0]
    if kind == "truncation":
        return np.concatenate([M @ x[:k], np.zeros(m - k)])
    g = -(-n // k)
    chunks = np.array([x[p % n] for p in range(g * k)]).reshape(g, k)  # x̃_t
    if kind == "sharing":
        z = M @ chunks.sum(axis=0)
        return np.array([z[o % k] for o in range(m)])
    if kind == "rope":
        h = k // 2
        theta = np.array([[t * 10000.0 ** (-2 * (j % h) / k) for j in range(k)] for t in range(g)])
        turned = np.concatenate([-chunks[:, h:], chunks[:, :h]], axis=1)  # rotate_half of each chunk
        chunks = chunks * np.cos(theta) + turned * np.sin(theta)
    z = np.concatenate([M @ c for c in chunks])  # (g r̂,)
    return np.array([z[o % (g * k)] for o in range(m)])


def delta_np(M, n, m, kind):
    """dW (out, in): column i is the chain's output for the unit vector e_i (the chain is linear)."""
    return np.stack([chain_np(M, n, m, kind, e) for e in np.eye(n)], axis=1)


def randomize_M(model, seed=1, scale=0.3):
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, "default"):
        M = layer.adapters["default"].mora_M
        M.data = (rng.standard_normal(M.shape) * scale).astype(np.float32)


def one_layer(n, m, r, kind, seed=0):
    base = Linear(n, m)
    d = MoRALinear.create(base, MoRAConfig(rank=r, mora_type=kind), "layer", backend.RNG(0))
    d.mora_M.data = np.random.default_rng(seed).standard_normal(d.mora_M.shape)  # float64
    return d


@pytest.mark.spec("MORA-1", "MORA-8")
@SETTINGS
@given(n=st.integers(1, 5000), m=st.integers(1, 5000), r=st.integers(1, 64), kind=types)
def test_r_hat_is_the_floor_of_the_square_root_and_M_stays_within_loras_budget(n, m, r, kind):
    from minipeft.adapters.mora import mora_rank
    k = mora_rank(n, m, r, kind)
    assert k == r_hat_np(n, m, r, kind) and k * k <= (n + m) * r < (k + 1 + (kind == "rope")) ** 2
    assert MoRAConfig(rank=r, mora_type=kind).trainable_count({"a": (n, m), "b": (m, n)}, None) == 2 * k * k


@pytest.mark.spec("MORA-1", "MORA-8")
def test_the_7b_projection_gets_r_hat_256_and_loras_count():
    assert MoRAConfig(rank=8).trainable_count({"q": (4096, 4096)}, None) == 256 ** 2 == (4096 + 4096) * 8
    assert MoRAConfig(rank=8, mora_type="sharing").trainable_count({"down": (11008, 4096)}, None) == 347 ** 2  # sqrt(15104 * 8) = 347.6


@pytest.mark.spec("MORA-2", "MORA-3", "MORA-4", "MORA-6")
@SETTINGS
@given(n=st.integers(2, 40), m=st.integers(2, 40), r=st.integers(1, 6), kind=types, seed=st.integers(0, 99))
def test_one_layer_forward_and_delta_weight_are_the_spec_chain(n, m, r, kind, seed):
    k = r_hat_np(n, m, r, kind)
    if (kind == "truncation" and k > min(n, m)) or (kind == "rope" and k < 2):
        with pytest.raises(ConfigError, match="r̂"):
            one_layer(n, m, r, kind)
        return
    d = one_layer(n, m, r, kind, seed)
    assert d.mora_M.shape == (k, k)
    M = np.asarray(d.mora_M.data)
    want = delta_np(M, n, m, kind)
    x = np.random.default_rng(seed + 1).standard_normal((2, 3, n))
    y = np.random.default_rng(seed + 2).standard_normal((2, 3, m))
    assert_close(d.adapt(Tensor(x), Tensor(y), None), y + x @ want.T, 1e-10, atol=1e-10, label="forward")
    assert_close(d.delta_weight(), want, 1e-10, atol=1e-12, label="dW = D K P")


@pytest.mark.spec("MORA-4", "MORA-6")
@SETTINGS
@given(r=st.integers(1, 4), kind=st.sampled_from(["sharing", "reshape", "rope"]), tm=targets)
def test_model_forward_and_merge_are_W0_plus_the_chains_matrix(r, kind, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_mora(rank=r, mora_type=kind, target_modules=tm)
    randomize_M(model)
    updates = {}
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        updates[path + ".weight"] = delta_np(np.asarray(d.mora_M.data, np.float64), d.n, d.m, kind)
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("MORA-2", "MORA-6")
def test_truncation_on_a_model_is_the_top_left_block():
    model = make_model()
    W = snapshot(model)
    model.apply_mora(rank=1, mora_type="truncation", target_modules=("q_proj", "k_proj"))  # r̂ 6 and 6
    randomize_M(model)
    updates = {}
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        M = np.asarray(d.mora_M.data, np.float64)
        dW = np.zeros((d.m, d.n))
        dW[:M.shape[0], :M.shape[0]] = M
        updates[path + ".weight"] = dW
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("MORA-4")
def test_dropout_acts_on_the_input_before_compress():
    model = make_model()
    model.apply_mora(rank=4, dropout=0.3, target_modules=("k_proj",))
    randomize_M(model)
    check_dropout_forward(model, 0.3, lambda d: np.asarray(d.delta_weight(), np.float64), "mora dropout")


@pytest.mark.spec("MORA-5", "MORA-8")
@pytest.mark.parametrize("kind", MORA_TYPES)
def test_M_starts_at_zero_with_a_gradient_and_only_M_trains(kind):
    model = make_model()
    base = model(IDS).numpy()
    model.apply_mora(rank=1 if kind == "truncation" else 4, mora_type=kind,
                     target_modules=("q_proj", "v_proj", "down_proj"))
    assert np.array_equal(model(IDS).numpy(), base)  # M = 0: exactly the base
    model(IDS).sum().backward()
    trained = dict((n, p) for n, p in model.net.named_parameters() if p.requires_grad)
    assert trained and all(n.endswith("mora_M") for n in trained)
    assert all(p.grad is not None and np.abs(p.grad).max() > 0 for p in trained.values())
    assert model.parameter_counts()[0] == sum(p.data.size for p in trained.values())


@pytest.mark.spec("MORA-7")
@pytest.mark.parametrize("kind", MORA_TYPES)
def test_the_update_has_a_higher_rank_than_lora_at_the_same_parameter_count(kind):
    d = one_layer(64, 64, 8, kind)
    assert d.mora_M.shape == (32, 32) and 32 * 32 == (64 + 64) * 8  # LoRA's count at r = 8
    want = 32 if kind in ("truncation", "sharing") else 64
    assert np.linalg.matrix_rank(d.delta_weight()) == want > 8
    for n, m in [(32, 16), (16, 32), (64, 32), (32, 64), (40, 24)]:  # the tiny Llama's shapes and one more
        r = 2 if kind == "truncation" else 8
        d = one_layer(n, m, r, kind, seed=n + m)
        k = d.mora_M.shape[0]
        want = min(k, n, m) if kind in ("truncation", "sharing") else min(n, m)
        assert np.linalg.matrix_rank(d.delta_weight()) == want > r, (n, m, kind)


@pytest.mark.spec("MORA-8")
@pytest.mark.parametrize("kw,match", [({"rank": 0}, "rank"), ({"mora_type": "rotate"}, "mora_type"),
                                      ({"mora_type": 6}, "mora_type"), ({"dropout": 1.0}, "dropout"),
                                      ({"lora_alpha": 16}, "lora_alpha")])
def test_bad_configs_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        MoRAConfig(**kw)


@pytest.mark.spec("MORA-8")
def test_truncation_wider_than_a_layer_is_refused_naming_it():
    model = make_model()
    with pytest.raises(ConfigError, match=r"rank \(for model\.layers\.0\.self_attn\.k_proj\).*r̂ = 19 > min\(in=32, out=16\)"):
        model.apply_mora(rank=8, mora_type="truncation", target_modules=("k_proj",))
    assert not layers(model, "default")


@pytest.mark.spec("MORA-9")
def test_files_hold_M_and_load_with_the_same_r_hat(tmp_path):
    model = make_model()
    model.apply_mora(rank=3, mora_type="sharing", target_modules=("q_proj", "k_proj", "down_proj"))
    randomize_M(model)
    cfg, shapes = saved_and_reloaded(model, tmp_path, make_model, IDS)
    assert cfg["peft_type"] == "MINIPEFT_MORA" and (cfg["r"], cfg["mora_type"]) == (3, "sharing")
    want = {f"base_model.model.{p}.mora_M": (r_hat_np(l.base_layer.in_features, l.base_layer.out_features, 3,
                                                      "sharing"),) * 2 for p, l in layers(model, "default")}
    assert shapes == want


@pytest.mark.spec("MORA-4")
def test_training_moves_M_and_lowers_the_loss():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_mora(rank=4, target_modules="all-linear")
    h = train_next(model)
    assert h["loss"][-1] < 0.8 * h["loss"][0]
