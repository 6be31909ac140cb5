"""spec/eva.md (EVA-n) and spec/methods.md METHOD-11: EVA's incremental PCA, convergence, rank budget, init,
scaling and errors, each rebuilt in NumPy from the spec (exact PCA by np.linalg.svd of the centred rows)."""
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close, tiny_llama
from minipeft import backend
from minipeft.adapters import eva
from minipeft.adapters.data_init import init_batches, recording
from minipeft.errors import ConfigError

SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
IDS = np.random.default_rng(1).integers(0, 48, (2, 7))


def batch(seed, b=8, t=12, short=True, labels=False):
    """One (b, t) batch of random tokens; with `short` its first example is right-padded to 7 tokens; with
    `labels` the first two positions of every example are masked (-100)."""
    ids = np.random.default_rng(seed).integers(0, 48, (b, t))
    mask = np.ones((b, t), np.int64)
    if short:
        mask[0, 7:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if labels:
        out["labels"] = np.where(np.arange(t) < 2, -100, ids)
    return out


def adapted(model) -> dict:
    """{path: (A, B)} of the default adapter, float64."""
    return {p: tuple(np.asarray(backend.to_host(w.weight.data), np.float64) for w in (m.adapters["default"].lora_A,
                                                                                      m.adapters["default"].lora_B))
            for p, m in model.net.named_modules() if "default" in getattr(m, "adapters", {})}


def exact_pca(X):
    """EVA-1's reference: (V, S, ratio) of the centred rows, each row of V signed by its largest |entry|."""
    Xc = X - X.mean(axis=0)
    _, S, Vh = np.linalg.svd(Xc, full_matrices=False)
    Vh = Vh * np.sign(Vh[np.arange(len(Vh)), np.argmax(np.abs(Vh), axis=1)])[:, None]
    return Vh, S, S ** 2 / np.sum(Xc ** 2)


def inputs(model, paths, b):
    """{path: (N, in)} the layers' inputs at b's counted tokens (attention mask and labels != -100)."""
    with recording(model.net, paths) as seen:
        model(b["input_ids"], attention_mask=b["attention_mask"])
    keep = b["attention_mask"].astype(bool) & (b.get("labels", b["input_ids"]) != -100)
    return {p: np.asarray(backend.to_host(seen[p][0]), np.float64)[keep] for p in paths}


@pytest.mark.spec("EVA-1")
@SETTINGS
@given(n=st.integers(2, 8), sizes=st.lists(st.integers(8, 20), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_incremental_pca_with_every_component_is_the_exact_pca(n, sizes, seed):
    rng = np.random.default_rng(seed)
    parts = [rng.standard_normal((N, n)) * rng.uniform(0.5, 3, n) + rng.standard_normal(n) for N in sizes]
    pca = eva.IncrementalPCA(n)
    for X in parts:
        pca.step(backend.asarray(X), 0.99)
    pca.step(backend.asarray(parts[0][:n - 1]), 0.99)  # fewer rows than components: skipped
    V, S, ratio = exact_pca(np.concatenate(parts))
    assert pca.n == sum(sizes)
    assert_close(backend.to_host(pca.S), S, 1e-8, atol=1e-10, label="S")
    assert_close(backend.to_host(pca.V), V, 1e-6, atol=1e-8, label="V")
    assert_close(backend.to_host(pca.ratio), ratio, 1e-8, atol=1e-12, label="xi")


@pytest.mark.spec("EVA-1", "EVA-3", "EVA-4")
def test_a_is_the_top_right_singular_vectors_of_the_counted_inputs():
    """One batch (every pass sees it again, so the PCA is that batch's), q/k/v sharing one PCA with
    k = round(16 * 2) = 32 = in: A of each is the exact PCA's first 16 rows; padding and -100 labels excluded."""
    model = tiny_llama()
    b = batch(5, labels=True)
    X = inputs(model, ["model.layers.0.self_attn.q_proj"], b)["model.layers.0.self_attn.q_proj"]
    assert X.shape == (8 * 10 - 5, 32)  # 96 positions, 2 labels and 5 padding of the first, 2 labels of the others
    model.apply_eva(data=[b], rank=16, alpha=32,
                    target_modules=tuple(f"model.layers.0.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")))
    V, _, _ = exact_pca(X)
    got = adapted(model)
    for name in ("q_proj", "k_proj", "v_proj"):
        A, B = got[f"model.layers.0.self_attn.{name}"]
        assert_close(A, V[:16], 1e-4, atol=1e-5, label=name)
        assert not B.any()
    assert model.peft_configs["default"].rank_pattern == {}  # each distinct xi listed 3 times: 16 each


@pytest.mark.spec("EVA-2")
def test_convergence_schedule_and_its_limit(monkeypatch):
    calls = []
    real = eva.forward
    monkeypatch.setattr(eva, "forward", lambda model, b: calls.append(1) or real(model, b))
    model = tiny_llama()
    model.apply_eva(data=[batch(1)], rank=4, target_modules=("o_proj",), eva_config={"tau": 0.99})
    assert len(calls) == 3  # the first batch for the input groups, then two fits of the one batch: cos = 1
    pca = eva.IncrementalPCA(3)
    X = np.random.default_rng(0).standard_normal((10, 5))
    pca.step(backend.asarray(X), 0.99)
    assert pca.done == [False] * 3  # nothing to compare with on the first fit
    pca.step(backend.asarray(X), 0.99)
    assert pca.done == [True] * 3
    monkeypatch.setattr(eva, "MAX_BATCHES", 4)
    fresh = tiny_llama()
    with pytest.raises(ConfigError, match=r"did not converge in 4 batches \(tau=1.0\)"):
        fresh.apply_eva(data=[batch(s) for s in range(3)], rank=4, eva_config={"tau": 1.0})
    assert fresh.peft_configs == {} and not adapted(fresh)


@pytest.mark.spec("EVA-3")
def test_the_budget_goes_to_the_largest_explained_variance_ratios():
    """o_proj (in 32) and down_proj (in 64) of both layers with k_l = in: their exact PCAs' ratios, ranked
    together, give each layer its count of the top sum(r_l) = 48."""
    model = tiny_llama(seed=3)
    b = batch(7, short=False)
    paths = [f"model.layers.{i}.{n}" for i in (0, 1) for n in ("self_attn.o_proj", "mlp.down_proj")]
    ratios = {p: exact_pca(X)[2] for p, X in inputs(model, paths, b).items()}
    values = sorted(((v, p) for p in paths for v in ratios[p]), reverse=True)[:48]
    want = {p: sum(q == p for _, q in values) for p in paths}
    model.apply_eva(data=[b], rank=8, target_modules=("o_proj", "down_proj"), rank_pattern={"down_proj": 16},
                    eva_config={"rho": 4.0})
    got = {p: A.shape[0] for p, (A, _) in adapted(model).items()}
    assert got == {p: r for p, r in want.items() if r > 0} and sum(want.values()) == 48


@pytest.mark.spec("EVA-3", "EVA-5")
@SETTINGS
@given(rank=st.integers(1, 4), rho=st.sampled_from([1.0, 1.5, 2.0, 3.0]), seed=st.integers(0, 50),
       adjust=st.booleans())
def test_ranks_keep_the_budget_and_alphas_keep_the_scale(rank, rho, seed, adjust):
    model = tiny_llama(seed=seed)
    model.apply_eva(data=[batch(seed + s) for s in range(3)], rank=rank, alpha=3 * rank, target_modules="all-linear",
                    eva_config={"rho": rho, "adjust_scaling_factors": adjust})
    cfg = model.peft_configs["default"]
    got = {p: A.shape[0] for p, (A, _) in adapted(model).items()}
    assert sum(got.values()) == rank * 14 and all(0 < r <= round(rank * rho) for r in got.values())
    assert sorted(cfg.target_modules) == sorted(got)
    assert cfg.rank_pattern == {p: r for p, r in got.items() if r != rank}
    for p, r in got.items():
        r_saved, alpha = cfg.rank_alpha_for(p)
        assert r_saved == r
        assert alpha == (3 * rank * r / rank if adjust else 3 * rank)
        scale = model.net.get_submodule(p).adapters["default"].s
        assert scale == pytest.approx(3.0 if adjust else 3 * rank / r)


@pytest.mark.spec("EVA-3")
def test_rho_one_keeps_every_rank_without_shared_inputs():
    model = tiny_llama()
    model.apply_eva(data=[batch(s) for s in range(3)], rank=4, target_modules=("o_proj", "down_proj"),
                    eva_config={"rho": 1.0})
    assert {A.shape[0] for A, _ in adapted(model).values()} == {4} and model.peft_configs["default"].rank_pattern == {}


@pytest.mark.spec("EVA-4")
@pytest.mark.parametrize("whiten", [False, True])
def test_init_is_the_base_with_orthonormal_or_whitened_rows(whiten):
    data = [batch(s) for s in range(4)]
    model = tiny_llama()
    W0 = {n: p.numpy().copy() for n, p in model.net.named_parameters()}
    before = model(IDS).numpy()
    model.apply_eva(data=data, rank=4, target_modules=("q_proj", "o_proj", "down_proj"),
                    eva_config={"whiten": whiten})
    assert_close(model(IDS), before, 1e-6, label="step 0")
    assert all(np.array_equal(p.numpy(), W0[n.replace(".base_layer", "")]) for n, p in model.net.named_parameters()
               if not p.requires_grad)
    plain = tiny_llama()
    plain.apply_eva(data=data, rank=4, target_modules=("q_proj", "o_proj", "down_proj"))
    for p, (A, B) in adapted(model).items():
        V = adapted(plain)[p][0]
        assert not B.any()
        assert_close(V @ V.T, np.eye(len(V)), 1e-5, atol=1e-6, label=f"{p} A A^T")
        if whiten:  # A = diag(S)^(-1/2) V: rows along V's, A A^T = diag(S)^-1
            norms = np.linalg.norm(A, axis=1)
            assert_close(A, norms[:, None] * V, 1e-5, atol=1e-7, label=p)
            assert_close(A @ A.T, np.diag(norms ** 2), 1e-5, atol=1e-7, label=f"{p} whitened A A^T")
            assert np.all(np.diff(norms) >= -1e-6)  # S descending


@pytest.mark.spec("EVA-5", "EVA-6", "METHOD-11")
def test_saved_folder_holds_the_choice_and_loads_without_data(tmp_path):
    model = tiny_llama()
    model.apply_eva(data=[batch(s) for s in range(4)], rank=4, target_modules="all-linear")
    for _, p in model.net.named_parameters():
        if p.requires_grad:
            p.data = p.data + np.float32(0.05)
    out = model(IDS).numpy()
    model.save_adapters(str(tmp_path / "a"))
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["init_lora_weights"] == "eva"
    assert saved["eva_config"] == eva.EVA_DEFAULTS
    assert saved["rank_pattern"] == model.peft_configs["default"].rank_pattern != {}
    assert all(k.startswith("model.layers.") for k in (*saved["rank_pattern"], *saved["alpha_pattern"]))
    back = tiny_llama()
    back.load_adapters(str(tmp_path / "a"))
    assert type(back.peft_configs["default"]) is mp.EVAConfig
    assert back.peft_configs["default"].rank_pattern == saved["rank_pattern"]
    assert np.array_equal(back(IDS).numpy(), out)


@pytest.mark.spec("METHOD-11")
def test_training_records_are_batched_in_order():
    rows = [{"input_ids": list(range(1 + i, 9 + i + i % 3))} for i in range(10)]
    model = tiny_llama()
    got = init_batches(model, rows, batch_size=4)
    assert [len(b["input_ids"]) for b in got] == [4, 4, 2]
    assert got[0]["input_ids"][1, :9].tolist() == list(range(2, 11)) and got[0]["attention_mask"][0].sum() == 8
    a, b = tiny_llama(), tiny_llama()
    a.apply_eva(data=rows, rank=2, target_modules=("o_proj",))
    b.apply_eva(data=got, rank=2, target_modules=("o_proj",))
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(adapted(a).values(), adapted(b).values()))


BAD = [({}, {}, "pass data="),
       ({"eva_config": {"rh": 2}}, {}, "eva_config"),
       ({"eva_config": [1]}, {}, "eva_config"),
       ({"eva_config": {"rho": 0.5}}, {}, r"rho.*must be >= 1"),
       ({"eva_config": {"tau": 1.5}}, {}, r"tau.*\[0, 1\]"),
       ({"eva_config": {"whiten": 1}}, {}, "whiten"),
       ({"eva_config": {"use_label_mask": "yes"}}, {}, "use_label_mask"),
       ({"eva_config": {"adjust_scaling_factors": None}}, {}, "adjust_scaling_factors"),
       ({"rank": 16, "eva_config": {"rho": 3.0}}, {}, r"48 components, more than its 32 inputs"),
       ({}, {"extra": True}, r"data\[0\] has keys \['token_type_ids'\]"),
       ({}, {"shape": True}, r"data\[0\]\['attention_mask'\] has shape")]


@pytest.mark.spec("EVA-7", "METHOD-11")
@pytest.mark.parametrize("fields,how,match", BAD)
def test_bad_settings_are_errors_before_anything_changes(fields, how, match):
    model = tiny_llama()
    before = [(n, p.shape) for n, p in model.net.named_parameters()]
    b = batch(0)
    if how.get("extra"):
        b["token_type_ids"] = b["input_ids"] * 0
    if how.get("shape"):
        b["attention_mask"] = b["attention_mask"][:, :5]
    data = None if match == "pass data=" else [b]
    with pytest.raises(ConfigError, match=match):
        model.apply_eva(data=data, **{"rank": 4, **fields})
    assert model.peft_configs == {} and [(n, p.shape) for n, p in model.net.named_parameters()] == before


@pytest.mark.spec("EVA-7", "METHOD-11")
def test_data_only_for_data_driven_configs():
    model = tiny_llama()
    with pytest.raises(ConfigError, match="data= is for the data-driven initialisers"):
        model.apply_lora(data=[batch(0)])
    with pytest.raises(ConfigError, match="EVAConfig"):
        mp.LoRAConfig(init="eva")
    assert model.peft_configs == {}
