"""spec/adamss.md (ADAMSS-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy float64
from the spec; and (oracle) against PEFT's ADAMSS on a random Llama, with scikit-learn's KMeans (absent here) stood
in by ADAMSS-2's (tests/helpers.py peft_kmeans_as_minipeft)."""
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import max_rel_err, peft_kmeans_as_minipeft
from minipeft import backend
from minipeft.adapters.adamss import AdaMSSConfig, AdaMSSLinear, kmeans_labels, svd_lowrank
from minipeft.autograd import Tensor
from minipeft.errors import ConfigError
from one_layer import check_refuses_a_4bit_base, check_train_moves_every_leaf, saved_and_reloaded
from test_dora import SETTINGS, targets
from test_hira import randomize  # every leaf ~ N(0, scale²)
from test_lora import IDS, layers, make_model
from test_peft_oracle import (base, check_init_is_base_and_count, check_peft_case, lib,  # noqa: F401
                              perturbed_peft_model, report_gradients_from_peft)


def f64(t):
    return np.asarray(backend.to_host(t.data), np.float64)


def update_np(d, m):
    """ADAMSS-5 in float64: [dW | db] with row block k = B_k A_k newB at the rows of subspace k."""
    full = np.zeros((m, d.newB.shape[1]))
    full[np.argsort(d.where)] = np.concatenate([f64(B) @ f64(A) for A, B in zip(d.adamss_A, d.adamss_B)]) @ f64(d.newB)
    return full


@pytest.mark.spec("ADAMSS-3", "ADAMSS-5")
@SETTINGS
@given(r=st.integers(2, 12), K=st.integers(1, 6), s=st.integers(1, 3), rows=st.integers(1, 3), tm=targets)
def test_forward_and_merge_add_the_scattered_subspace_updates(r, K, s, rows, tm):
    model = make_model()
    model.apply_adamss(rank=r, num_subspaces=K, subspace_rank=min(s, r), target_modules=tm)
    randomize(model)
    rng = np.random.default_rng(r + 10 * K)
    for _, layer in layers(model, "default"):
        d, bl = layer.adapters["default"], layer.base_layer
        up = update_np(d, bl.out_features)
        x = rng.standard_normal((rows, 3, bl.in_features))
        want = x @ (f64(bl.weight) + up[:, :bl.in_features]).T + f64(bl.bias) + up[:, bl.in_features]
        assert max_rel_err(layer(Tensor(x.astype(np.float32))).numpy(), want) < 1e-5
        W0, b0 = np.array(bl.weight.data), np.array(bl.bias.data)
        layer.merge("default")
        assert max_rel_err(layer(Tensor(x.astype(np.float32))).numpy(), want) < 1e-5  # ADAMSS-5: W and b both move
        layer.unmerge("default")
        assert max_rel_err(bl.weight.data, W0) < 1e-6 and max_rel_err(bl.bias.data, b0) < 1e-6


@pytest.mark.spec("ADAMSS-2", "ADAMSS-3")
def test_the_subspaces_partition_the_output_rows_by_the_clustering_of_U():
    model = make_model()
    model.apply_adamss(rank=8, num_subspaces=4, subspace_rank=2, target_modules=("q_proj", "up_proj"))
    for _, layer in layers(model, "default"):
        d, bl = layer.adapters["default"], layer.base_layer
        Wb = np.concatenate([f64(bl.weight), f64(bl.bias)[:, None]], axis=1)
        U, _ = svd_lowrank(Wb, 8, 0)
        labels = kmeans_labels(U.astype(np.float32), 4)
        order = np.concatenate([np.flatnonzero(labels == k) for k in range(4)])
        assert np.array_equal(np.argsort(d.where), order) and sorted(order) == list(range(bl.out_features))
        assert [B.shape[0] for B in d.adamss_B] == [int(np.sum(labels == k)) for k in range(4)]


@pytest.mark.spec("ADAMSS-2")
@SETTINGS
@given(seed=st.integers(0, 10_000), k=st.integers(1, 6), flip=st.integers(0, 2 ** 6 - 1))
def test_kmeans_is_a_lloyd_fixed_point_blind_to_column_signs(seed, k, flip):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((40, 6)).astype(np.float32) + rng.integers(0, 3, (40, 1)).astype(np.float32) * 3
    labels = kmeans_labels(X, k, max_iter=300)  # run to convergence: every row sits at its nearest centre
    assert labels.min() >= 0 and labels.max() < k
    centres = np.stack([X[labels == j].mean(0) for j in range(k)])
    assert np.array_equal(labels, np.argmin(((X[:, None] - centres[None]) ** 2).sum(-1), axis=1))
    signs = np.array([-1 if flip >> j & 1 else 1 for j in range(6)], np.float32)
    assert np.array_equal(kmeans_labels(X * signs, k), kmeans_labels(X, k))  # distances do not see the signs


def lloyd_np(X, k, steps):
    """ADAMSS-2's first steps in float64, written from the spec (no cluster empties for these X): (labels, centres)."""
    tol = np.mean(np.var(X.astype(np.float64), axis=0)) * 1e-4
    X = X - X.mean(0)
    C = X[np.random.RandomState(123456789).choice(len(X), size=k, replace=False, p=np.full(len(X), 1 / len(X), np.float32))]
    old = None
    for _ in range(steps):
        labels = np.argmin((C ** 2).sum(1)[None] - 2 * X @ C.T, axis=1)
        new = np.stack([X[labels == j].mean(0) for j in range(k)])
        shift, C = ((new - C) ** 2).sum(), new
        if old is not None and np.array_equal(labels, old):
            return labels
        if shift <= tol:
            break
        old = labels
    return np.argmin((C ** 2).sum(1)[None] - 2 * X @ C.T, axis=1)


@pytest.mark.spec("ADAMSS-2")
@pytest.mark.parametrize("seed", range(6))
def test_kmeans_is_lloyd_from_sklearn_s_seeds(seed):
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((30, 4)) + rng.integers(0, 4, (30, 1)) * 2.5).astype(np.float32)
    for steps in (1, 2, 10):
        assert np.array_equal(kmeans_labels(X, 3, max_iter=steps), lloyd_np(X.astype(np.float64), 3, steps))


@pytest.mark.spec("ADAMSS-2")
def test_an_empty_cluster_takes_the_farthest_row_or_is_refused():
    X = np.array([[0.0], [0.0], [0.0], [5.0]], np.float32)  # every seed ties: cluster 1 stays empty (sklearn's too)
    assert np.bincount(kmeans_labels(X, 3), minlength=3).tolist().count(0) == 1
    far = np.array([[0.0], [0.2], [0.1], [9.0], [30.0]], np.float32)
    labels = kmeans_labels(far, 3)
    assert sorted(np.bincount(labels, minlength=3).tolist()) == [1, 1, 3] and labels[3] != labels[4]
    from minipeft.nn.layers import Linear
    lin = Linear(4, 6)
    lin.weight.data = np.array([[1, 0, 0, 0]] * 5 + [[0, 1, 0, 0]], np.float32)  # five equal rows
    with pytest.raises(ConfigError, match="empty cluster"):
        AdaMSSLinear.create(lin, AdaMSSConfig(rank=2, num_subspaces=4), "x", None)


@pytest.mark.spec("ADAMSS-1")
@pytest.mark.parametrize("shape, q", [((32, 33), 8), ((40, 17), 5), ((12, 30), 12)])
def test_svd_lowrank_spans_the_top_singular_vectors(shape, q):
    W = np.random.default_rng(1).standard_normal(shape)
    U, V = svd_lowrank(W, q, 0)
    assert np.allclose(U.T @ U, np.eye(q), atol=1e-10) and np.allclose(V.T @ V, np.eye(q), atol=1e-10)
    if q == min(shape):  # a full q is the exact SVD, up to each column's sign
        u, _, vh = np.linalg.svd(W, full_matrices=False)
        assert np.allclose(np.abs(U.T @ u), np.eye(q), atol=1e-8) and np.allclose(np.abs(V.T @ vh.T), np.eye(q), atol=1e-8)


@pytest.mark.spec("ADAMSS-4")
def test_init_is_the_base_and_A_the_top_right_singular_vectors():
    model = make_model()
    base_logits = model(IDS).numpy()
    model.apply_adamss(rank=8, num_subspaces=3, subspace_rank=2, target_modules=("q_proj", "down_proj"))
    assert np.array_equal(model(IDS).numpy(), base_logits)  # B = 0
    for _, layer in layers(model, "default"):
        d, bl = layer.adapters["default"], layer.base_layer
        U, _ = svd_lowrank(np.concatenate([f64(bl.weight), f64(bl.bias)[:, None]], axis=1), 8, 0)
        rows = np.split(np.argsort(d.where), np.cumsum([B.shape[0] for B in d.adamss_B])[:-1])
        for A, B, S in zip(d.adamss_A, d.adamss_B, rows):
            assert np.all(f64(B) == 0)
            _, _, vh = np.linalg.svd(U[S], full_matrices=False)
            assert np.allclose(np.abs(f64(A) @ vh[:A.shape[0]].T), np.eye(A.shape[0]), atol=1e-5)
    rnd = make_model()
    rnd.apply_adamss(rank=8, init_weights=None, target_modules=("up_proj",))
    B = np.concatenate([f64(b).ravel() for _, lay in layers(rnd, "default") for b in lay.adapters["default"].adamss_B])
    assert 0.007 < B.std() < 0.013 and max_rel_err(rnd(IDS), base_logits) > 1e-7


@pytest.mark.spec("ADAMSS-6")
def test_only_A_and_B_train_and_the_count_is_the_sum_over_subspaces():
    model = make_model()
    model.apply_adamss(rank=8, num_subspaces=3, subspace_rank=2, target_modules=("q_proj", "v_proj"))
    randomize(model)
    model(IDS).sum().backward()
    trained = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert trained and all(re.search(r"\.adamss_[AB]\.\d+$", n) for n in trained)
    assert all(p.grad is not None for p in trained.values())
    want = sum(A.shape[0] * (8 + B.shape[0]) for _, lay in layers(model, "default")
               for A, B in zip(lay.adapters["default"].adamss_A, lay.adapters["default"].adamss_B))
    assert model.parameter_counts()[0] == want
    one = make_model()
    one.apply_adamss(rank=8, num_subspaces=3, target_modules=("q_proj", "v_proj"))  # s = 1: K' R + m per layer
    assert one.parameter_counts()[0] == 2 * ((3 * 8 + 32) + (3 * 8 + 16)) == one.peft_configs["default"].trainable_count(
        {p: (m.base_layer.in_features, m.base_layer.out_features) for p, m in layers(one, "default")}, None)


@pytest.mark.spec("ADAMSS-6")
@pytest.mark.parametrize("kwargs, field", [(dict(rank=0), "rank"), (dict(num_subspaces=0), "num_subspaces"),
                                           (dict(subspace_rank=0), "subspace_rank"), (dict(init_weights="kaiming"), "init_weights"),
                                           (dict(use_asa=True), "use_asa"), (dict(svd_threshold=0.0), "svd_threshold")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        AdaMSSConfig(**kwargs)


@pytest.mark.spec("ADAMSS-1", "ADAMSS-3", "ADAMSS-6")
def test_a_rank_reaching_the_outputs_or_a_subspace_rank_above_R_is_refused():
    with pytest.raises(ConfigError, match=r"rank \(for model.layers.0.self_attn.q_proj\).*orthonormal"):
        make_model().apply_adamss(rank=100, target_modules=("q_proj",))  # R = 32 = m
    with pytest.raises(ConfigError, match=r"subspace_rank .*exceeds R = 4"):
        make_model().apply_adamss(rank=4, subspace_rank=5, target_modules=("q_proj",))


@pytest.mark.spec("ADAMSS-6")
def test_a_4bit_base_and_gpt2_conv1d_are_refused():
    check_refuses_a_4bit_base("adamss")
    from minipeft.nn.layers import Conv1D
    with pytest.raises(ConfigError, match=r"c_attn.*torch.nn.Linear only"):
        AdaMSSLinear.create(Conv1D(8, 24), AdaMSSConfig(rank=4), "h.0.attn.c_attn", None)


@pytest.mark.spec("ADAMSS-7")
def test_saved_keys_and_fields_are_peft_names(tmp_path):
    model = make_model()
    model.apply_adamss(rank=6, num_subspaces=2, subspace_rank=2, random_seed=3, target_modules=("v_proj",))
    randomize(model)
    cfg, keys = saved_and_reloaded(model, tmp_path, make_model, IDS)
    assert cfg["peft_type"] == "ADAMSS" and (cfg["r"], cfg["num_subspaces"], cfg["subspace_rank"]) == (6, 2, 2)
    assert cfg["init_weights"] == "orthogonal" and cfg["random_seed"] == 3 and cfg["use_asa"] is False
    assert "exclude_modules" not in cfg and "fan_in_fan_out" not in cfg
    for i, (_, lay) in enumerate(layers(model, "default")):
        d, p = lay.adapters["default"], f"base_model.model.model.layers.{i}.self_attn.v_proj."
        assert keys[p + "adamss_newB"] == (6, 33)  # (R, in + 1): v_proj has a bias
        for k, (A, B) in enumerate(zip(d.adamss_A, d.adamss_B)):
            assert keys[p + f"adamss_A.{k}"] == A.shape and keys[p + f"adamss_B.{k}"] == B.shape
    assert len(keys) == 2 * (1 + 2 * 2)


@pytest.mark.spec("ADAMSS-3", "ADAMSS-4")
def test_model_train_moves_every_leaf_and_lowers_the_loss():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_adamss(rank=16, num_subspaces=4, subspace_rank=2, target_modules=("q_proj", "v_proj"))
    check_train_moves_every_leaf(model, lr=3e-2)


# ---- against PEFT (test_peft_oracle.py's tiny random Llama with biases, every trainable tensor moved) -------------
CASES = {"qv": ("llama", dict(r=8, num_subspaces=3, subspace_rank=2, target_modules=["q_proj", "v_proj"])),
         "mlp": ("llama", dict(r=16, num_subspaces=5, target_modules=["up_proj", "down_proj"], random_seed=7)),
         "random": ("llama", dict(r=6, num_subspaces=4, subspace_rank=3, init_weights=None, modules_to_save=["lm_head"],
                                  target_modules=["k_proj", "o_proj"])),
         "dynamic": ("llama", dict(r=12, num_subspaces=3, subspace_rank=4, use_dynamic_rank=True, svd_threshold=0.3,
                                   target_modules=["q_proj", "gate_proj"], layers_to_transform=[1], layers_pattern="layers"))}


def ours(name):  # PEFT's base_model.model.<path>.adamss_X.default.<k> -> <path>.adapters.default.adamss_X.<k>
    return re.sub(r"^base_model\.model\.(.+)\.(adamss_[AB])\.default\.(\d+)$", r"\1.adapters.default.\2.\3", name)


@pytest.mark.oracle
@pytest.mark.spec("ADAMSS-1", "ADAMSS-2", "ADAMSS-3", "ADAMSS-5", "ADAMSS-6", "ADAMSS-7")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, case, tmp_path):
    with peft_kmeans_as_minipeft():
        check_peft_case(lib, base, CASES[case], "AdamssConfig", AdaMSSConfig, tmp_path, f"AdaMSS {case}")


@pytest.mark.oracle
@pytest.mark.spec("ADAMSS-1", "ADAMSS-2")
@pytest.mark.parametrize("case", list(CASES))
def test_every_layer_s_clustering_is_peft_s(lib, base, case, tmp_path):
    with peft_kmeans_as_minipeft():
        pm = perturbed_peft_model(lib, base, CASES[case], "AdamssConfig")
    model = mp.load_model(base(CASES[case][0]))
    model.apply_adapter(AdaMSSConfig.from_peft(dict(peft_type="ADAMSS", **CASES[case][1])))
    for path, layer in layers(model, "default"):
        theirs = pm.base_model.model.get_submodule(path)
        assert np.array_equal(np.argsort(layer.adapters["default"].where), theirs.scatter_index["default"].numpy()), path
        assert [tuple(A.shape) for A in layer.adapters["default"].adamss_A] == \
            [tuple(A.shape) for A in theirs.adamss_A["default"]]


@pytest.mark.oracle
@pytest.mark.spec("ADAMSS-3")
@pytest.mark.parametrize("case", ["qv", "dynamic"])
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    with peft_kmeans_as_minipeft():
        pm = perturbed_peft_model(lib, base, CASES[case], "AdamssConfig").eval()
        report_gradients_from_peft(lib, pm, base(CASES[case][0]), tmp_path, f"AdaMSS {case}", ours, 1e-4)


@pytest.mark.oracle
@pytest.mark.spec("ADAMSS-4", "ADAMSS-6")
@pytest.mark.parametrize("case", ["qv", "mlp"])
def test_peft_default_init_is_the_base_and_counts_agree(lib, base, case):
    with peft_kmeans_as_minipeft():
        check_init_is_base_and_count(lib, base, CASES[case], "AdamssConfig", AdaMSSConfig, f"AdaMSS {case}")


@pytest.mark.oracle
@pytest.mark.spec("ADAMSS-1")
@pytest.mark.parametrize("shape, q, seed", [((32, 33), 8, 0), ((64, 33), 16, 7), ((16, 33), 6, 3)])
def test_svd_lowrank_is_torch_s_up_to_column_signs(lib, shape, q, seed):
    torch = lib[0]
    W = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        U_t, _, V_t = torch.svd_lowrank(torch.tensor(W), q=q, niter=2)
    U, V = svd_lowrank(W, q, seed)
    signs = np.sign(np.sum(U * U_t.numpy(), axis=0))
    assert max_rel_err(U * signs, U_t.numpy()) < 1e-4 and max_rel_err(V * signs, V_t.numpy()) < 1e-4


@pytest.mark.oracle
@pytest.mark.spec("ADAMSS-6")
def test_peft_refuses_gpt2_conv1d_too(lib, base):
    with peft_kmeans_as_minipeft(), pytest.raises(TypeError, match="only `torch.nn.Linear` is supported"):
        perturbed_peft_model(lib, base, ("gpt2", dict(r=4, target_modules=["c_attn"])), "AdamssConfig")
