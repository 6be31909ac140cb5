"""spec/adalora.md (ADALORA-n) on tiny random Llama models built in-process (test_lora.py's set-up) and on
one random Linear / GPT-2 Conv1D layer (one_layer.py).

Each claim is rebuilt in NumPy (float64 unless the claim is about float32 ties) from the spec's formula:
dW = s B (A ⊙ E) with s = alpha / (initial_rank + 1e-5); R = w / 2n Σ (‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F);
the cubic budget; the EMA sensitivity and the masking by the (b0 − b)-th smallest triplet score, run by
a NumPy allocator written here (RefAllocator), never by calling the code under test."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_close
from lycoris_checks import check_merge_unmerge, updates
from one_layer import check_dropout_forward, probe_backward, random_base
from minipeft import backend
from minipeft.adapters.adalora import AdaLoRAConfig, AdaLoRALinear
from minipeft.adapters.base import AdaptedLayer
from minipeft.autograd import Tensor
from minipeft.errors import CheckpointError, ConfigError
from minipeft.safetensors_io import read_safetensors
from test_dora import targets  # 1-3 target names
from test_lora import D, IDS, SETTINGS, SHAPES, layers, make_model, plain_logits, randomize, snapshot

CHEAP = settings(max_examples=15, deadline=None)


def leaves(d) -> dict:
    return {n: np.asarray(getattr(d, n).data, np.float64) for n in ("lora_A", "lora_B", "lora_E")}


def delta_np(d, r0=None):
    """s B (A ⊙ E), s = alpha / (initial_rank + 1e-5), (out, in)."""
    t = leaves(d)
    s = d.cfg.alpha / ((r0 or d.cfg.initial_rank) + 1e-5)
    return s * t["lora_B"] @ (t["lora_A"] * t["lora_E"])


def penalty_np(deltas, w):
    """ADALORA-6: w / 2n Σ ‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F, and its gradients {id(delta): (dA, dB)}."""
    total, grads = 0.0, {}
    for d in deltas:
        t = leaves(d)
        A, B = t["lora_A"], t["lora_B"]
        MA, MB = A @ A.T - np.eye(A.shape[0]), B.T @ B - np.eye(B.shape[1])
        nA, nB = np.linalg.norm(MA), np.linalg.norm(MB)
        total += nA + nB
        c = w / (2 * len(deltas))  # d‖M‖/dM = M / ‖M‖, M symmetric: dA = 2 (M/‖M‖) A, dB = 2 B (M/‖M‖)
        grads[id(d)] = (c * 2 * (MA / nA) @ A if nA else 0 * A, c * 2 * B @ (MB / nB) if nB else 0 * B)
    return w * total / (2 * len(deltas)), grads


def budget_np(t, b0, bT, tinit, tfinal, T):
    """ADALORA-7 rebuilt: piecewise, with the cubic written as a product."""
    if t <= tinit:
        return b0
    if t > T - tfinal:
        return bT
    f = 1.0 - (t - tinit) / float(T - tfinal - tinit)
    return int(np.floor((b0 - bT) * f * f * f + bT))


class RefAllocator:
    """ADALORA-8/9 in NumPy float32: EMAs per leaf, triplet scores, the k-th smallest threshold."""

    def __init__(self, cfg, keys):
        self.cfg, self.keys, self.avg, self.unc, self.pattern = cfg, keys, {}, {}, None

    def step(self, t, W, G):
        """W, G: {key: {leaf: float32 array}}; zeroes pruned E entries in W in place."""
        c, end = self.cfg, self.cfg.total_step - self.cfg.tfinal
        if t > end:
            for k in self.keys:
                W[k]["lora_E"][~np.array(self.pattern[k])] = 0
            return
        if t < end:
            for k in self.keys:
                for leaf in W[k]:
                    ipt = np.abs(W[k][leaf] * G[k][leaf])
                    a = self.avg.get((k, leaf), np.zeros_like(ipt))
                    u = self.unc.get((k, leaf), np.zeros_like(ipt))
                    a = np.float32(c.beta_start) * a + np.float32(1 - c.beta_start) * ipt
                    self.avg[(k, leaf)] = a
                    self.unc[(k, leaf)] = np.float32(c.beta_end) * u + np.float32(1 - c.beta_end) * np.abs(ipt - a)
        b0 = sum(W[k]["lora_E"].shape[0] for k in self.keys)
        b = budget_np(t, b0, c.target_rank * len(self.keys), c.tinit, c.tfinal, c.total_step)
        if t == end or (t > c.tinit and t % c.delta_t == 0):
            sc = {}
            for k in self.keys:
                s = {leaf: self.avg[(k, leaf)] * self.unc[(k, leaf)] for leaf in W[k]}
                sc[k] = s["lora_E"][:, 0] + (s["lora_A"].mean(1) + s["lora_B"].mean(0))
            theta = np.sort(np.concatenate([sc[k] for k in self.keys]))[b0 - b - 1] if b < b0 else -np.inf
            self.pattern = {k: [bool(v) for v in sc[k] > theta] for k in self.keys}
            for k in self.keys:
                W[k]["lora_E"][sc[k] <= theta] = 0
        if t == end:
            self.avg, self.unc = {}, {}


def adalora_model(r=4, target=1, tm=("q_proj", "v_proj"), seed=1, **kw):
    model = make_model()
    model.apply_adalora(initial_rank=r, target_rank=target, target_modules=tm, **kw)
    randomize(model, "default", seed)
    return model


def deltas_of(model, name="default"):
    return {p: m.adapters[name] for p, m in layers(model, name)}


# ---- ADALORA-1 -------------------------------------------------------------------------------------------------
@pytest.mark.spec("ADALORA-1")
@SETTINGS
@given(r=st.integers(1, 16), tm=targets)
def test_init_draws_and_output_unchanged(r, tm):
    model = make_model()
    before = model(IDS).data
    model.apply_adalora(initial_rank=r, target_rank=1, target_modules=tm)
    assert np.array_equal(model(IDS).data, before)  # E = 0
    g = np.random.default_rng(0)  # Model's seed: each layer in model order draws A (r, in), then B (out, r)
    for path, layer in layers(model, "default"):
        out, n = SHAPES[path.split(".", 3)[3]]
        d = layer.adapters["default"]
        assert np.array_equal(d.lora_A.data, (g.standard_normal((r, n)) * 0.02).astype(np.float32))
        assert np.array_equal(d.lora_B.data, (g.standard_normal((out, r)) * 0.02).astype(np.float32))
        assert np.array_equal(d.lora_E.data, np.zeros((r, 1), np.float32))


# ---- ADALORA-2..4 ----------------------------------------------------------------------------------------------
@pytest.mark.spec("ADALORA-2", "ADALORA-3", "ADALORA-4")
@SETTINGS
@given(r=st.integers(1, 12), alpha=st.floats(0.5, 32), tm=targets, two=st.booleans())
def test_forward_is_effective_weight(r, alpha, tm, two):
    model = make_model()
    weights = snapshot(model)
    model.apply_adalora(initial_rank=r, target_rank=1, alpha=alpha, target_modules=tm)
    randomize(model, "default", 1)
    if two:
        model.apply_adalora(initial_rank=3, target_rank=2, target_modules=("k_proj",), name="b")
        randomize(model, "b", 2)
        model.set_active_adapter(["default", "b"])
    for _, layer in layers(model, "default"):
        assert layer.adapters["default"].s == alpha / (r + 1e-5)
    assert_close(model(IDS), plain_logits(weights, updates(model, model.active_adapters, delta_np)), 1e-5,
                 label="AdaLoRA logits")
    with model.disable_adapters():
        assert np.array_equal(model(IDS).data, plain_logits(weights))


@pytest.mark.spec("ADALORA-3")
@SETTINGS
@given(p=st.floats(0.05, 0.9), r=st.integers(1, 8))
def test_dropout_forward_one_layer(p, r):
    check_dropout_forward(adalora_model(r=r, dropout=p, tm=("k_proj",)), p, delta_np, "AdaLoRA dropout forward")


@pytest.mark.spec("ADALORA-4")
@SETTINGS
@given(r=st.integers(1, 12), tm=targets)
def test_merge_unmerge(r, tm):
    check_merge_unmerge(AdaLoRAConfig(initial_rank=r, target_rank=1, target_modules=tm), randomize, delta_np)


# ---- ADALORA-5 -------------------------------------------------------------------------------------------------
@pytest.mark.spec("ADALORA-2", "ADALORA-3", "ADALORA-4", "ADALORA-5")
@SETTINGS
@given(r=st.integers(1, 10), fan_in_fan_out=st.booleans(), seed=st.integers(0, 9))
def test_one_layer_forward_merge_and_gradients(r, fan_in_fan_out, seed):
    n_in, n_out = 12, 20
    rng = np.random.default_rng(seed)
    base, W0 = random_base(fan_in_fan_out, rng, n_in, n_out)
    base.requires_grad_(False)
    layer = AdaptedLayer(base)
    cfg = AdaLoRAConfig(initial_rank=r, target_rank=1, alpha=7.0)
    layer.adapters["default"] = d = AdaLoRALinear.create(base, cfg, "c_attn", backend.RNG(0))
    layer.active = ["default"]
    for t in d.parameters():
        t.data = (rng.standard_normal(t.shape) * 0.4).astype(np.float32)
    t = leaves(d)
    A, B, E, s = t["lora_A"], t["lora_B"], t["lora_E"], 7.0 / (r + 1e-5)
    X, G = probe_backward(layer, n_in, n_out)
    U = X @ (A * E).T  # (N, r)
    assert_close(d.lora_B.grad, s * G.T @ U, 1e-5, label="dB")
    M = s * B.T @ G.T @ X  # (r, in)
    assert_close(d.lora_A.grad, M * E, 1e-5, label="dA")
    assert_close(d.lora_E.grad, (M * A).sum(1, keepdims=True), 1e-5, label="dE")
    assert base.weight.grad is None
    dW = s * B @ (A * E)
    x = X[:2]
    ref = x @ (W0 + dW).T + base.bias.data
    assert_close(layer(Tensor(x)), ref, 1e-5, label="forward")
    layer.merge("default")
    assert_close(base.weight.data, (W0 + dW).T if fan_in_fan_out else W0 + dW, 1e-6, label="merged weight")
    assert_close(layer(Tensor(x)), ref, 1e-5, label="merged forward")
    layer.unmerge("default")
    assert_close(base.weight.data, W0.T if fan_in_fan_out else W0, 1e-6, label="unmerged")


@pytest.mark.spec("ADALORA-5")
def test_only_active_leaves_train():
    model = adalora_model(r=3, tm=("q_proj", "down_proj"))
    model.apply_adalora(initial_rank=2, target_rank=1, target_modules=("k_proj",), name="other")
    trainable = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert all(".adapters.default.lora_" in n for n in trainable), sorted(trainable)
    expect = sum(3 * (SHAPES[p.split(".", 3)[3]][0] + SHAPES[p.split(".", 3)[3]][1] + 1)
                 for p, _ in layers(model, "default"))
    assert sum(p.data.size for p in trainable.values()) == expect


# ---- ADALORA-6 -------------------------------------------------------------------------------------------------
@pytest.mark.spec("ADALORA-6")
@SETTINGS
@given(r=st.integers(1, 8), w=st.floats(0.01, 2.0), tm=targets)
def test_penalty_value_and_gradient(r, w, tm):
    model = adalora_model(r=r, tm=tm, orth_reg_weight=w)
    ds = list(deltas_of(model).values())
    ref, grads = penalty_np(ds, w)
    R = model.regularization()
    assert_close(R, ref, 1e-5, label="R")
    R.backward()
    for d in ds:
        assert_close(d.lora_A.grad, grads[id(d)][0], 1e-4, label="dR/dA")
        assert_close(d.lora_B.grad, grads[id(d)][1], 1e-4, label="dR/dB")
        assert d.lora_E.grad is None or not np.any(d.lora_E.grad)


@pytest.mark.spec("ADALORA-6")
@CHEAP
@given(r=st.integers(1, 8), seed=st.integers(0, 99))
def test_penalty_zero_for_orthonormal_factors(r, seed):
    model = adalora_model(r=r, tm=("q_proj", "up_proj"))
    rng = np.random.default_rng(seed)
    for d in deltas_of(model).values():
        n, out = d.lora_A.shape[1], d.lora_B.shape[0]
        d.lora_A.data = np.linalg.qr(rng.standard_normal((n, r)))[0].T.astype(np.float32)  # orthonormal rows
        d.lora_B.data = np.linalg.qr(rng.standard_normal((out, r)))[0].astype(np.float32)  # orthonormal columns
    R = model.regularization()
    assert abs(R.item()) < 1e-5  # float32 rounding of Q's orthonormality
    R.backward()
    assert all(np.all(np.isfinite(p.grad)) for d in deltas_of(model).values() for p in (d.lora_A, d.lora_B))
    for d in deltas_of(model).values():  # exactly orthonormal: unit vectors; R = 0 and its gradient 0
        d.lora_A.grad = d.lora_B.grad = None
        d.lora_A.data = np.eye(r, d.lora_A.shape[1], dtype=np.float32)
        d.lora_B.data = np.eye(d.lora_B.shape[0], r, dtype=np.float32)
    R = model.regularization()
    R.backward()
    assert R.item() == 0 and all(not np.any(p.grad) for d in deltas_of(model).values() for p in (d.lora_A, d.lora_B))
    assert make_model().regularization() is None  # no AdaLoRA adapter, no term


# ---- ADALORA-7 -------------------------------------------------------------------------------------------------
@pytest.mark.spec("ADALORA-7")
@CHEAP
@given(tinit=st.integers(0, 20), tfinal=st.integers(0, 20), span=st.integers(1, 60), b0=st.integers(2, 200),
       frac=st.floats(0.05, 1.0), dt=st.integers(1, 5))
def test_budget_schedule(tinit, tfinal, span, b0, frac, dt):
    from minipeft.adapters.adalora import budget_at
    T = tinit + tfinal + span
    bT = max(1, int(b0 * frac))
    cfg = AdaLoRAConfig(initial_rank=12, target_rank=1, tinit=tinit, tfinal=tfinal, total_step=T, delta_t=dt)
    seen = []
    for t in range(T + 5):
        b, now = budget_at(t, cfg, b0, bT)
        assert b == budget_np(t, b0, bT, tinit, tfinal, T), t
        assert now == (t > T - tfinal or (tinit < t <= T - tfinal and t % dt == 0))
        seen.append(b)
    assert seen[:tinit + 1] == [b0] * (tinit + 1) and seen[T - tfinal:] == [bT] * (len(seen) - T + tfinal)
    assert all(x >= y for x, y in zip(seen, seen[1:])) and all(bT <= x <= b0 for x in seen)


# ---- ADALORA-8, ADALORA-9 ----------------------------------------------------------------------------------------
@pytest.mark.spec("ADALORA-8")
def test_sensitivity_hand_example():
    """One 1x1 layer: w = 2, grads -1 then 3 (β1 = .5, β2 = .25): I = 2, 6; Ī = 1, 3.5;
    U = .75, .25·.75 + .75·2.5."""
    cfg = AdaLoRAConfig(initial_rank=1, target_rank=1, beta_start=0.5, beta_end=0.25, total_step=10)
    base, _ = random_base(False, np.random.default_rng(0), 1, 1)
    d = AdaLoRALinear.create(base, cfg, "x", backend.RNG(0))
    for leaf in d.LEAVES:
        getattr(d, leaf).data = np.full(getattr(d, leaf).shape, 2.0, np.float32)
    for g, avg, unc in ((-1.0, 1.0, 0.75), (3.0, 3.5, 0.25 * 0.75 + 0.75 * 2.5)):
        for leaf in d.LEAVES:
            getattr(d, leaf).grad = np.full(getattr(d, leaf).shape, g, np.float32)
        d.update_sensitivity(cfg)
        for leaf in d.LEAVES:
            assert np.allclose(d.ema[leaf][0], avg) and np.allclose(d.ema[leaf][1], unc), leaf
    assert np.allclose(d.triplet_scores(), 3 * 3.5 * (0.25 * 0.75 + 0.75 * 2.5))  # s(E) + mean s(A) + mean s(B)


def random_grads(model, rng):
    G = {}
    for p, d in deltas_of(model).items():
        G[p + ".lora_E"] = {}
        for leaf in d.LEAVES:
            t = getattr(d, leaf)
            t.grad = rng.standard_normal(t.shape).astype(np.float32)
            G[p + ".lora_E"][leaf] = t.grad
    return G


@pytest.mark.spec("ADALORA-7", "ADALORA-8", "ADALORA-9")
@SETTINGS
@given(r=st.integers(2, 6), tinit=st.integers(0, 3), tfinal=st.integers(0, 3), span=st.integers(1, 6),
       dt=st.integers(1, 3), seed=st.integers(0, 99))
def test_allocation_matches_numpy_allocator(r, tinit, tfinal, span, dt, seed):
    """Identical gradients each step: E, rank_pattern and the kept count equal RefAllocator's at every step."""
    T = tinit + tfinal + span
    target = max(1, r // 2)
    model = adalora_model(r=r, target=target, tm=("q_proj", "v_proj", "down_proj"), seed=seed, tinit=tinit,
                          tfinal=tfinal, total_step=T, delta_t=dt)
    cfg, ds = model.peft_configs["default"], deltas_of(model)
    ref = RefAllocator(cfg, [p + ".lora_E" for p in ds])
    W = {p + ".lora_E": {leaf: np.array(getattr(d, leaf).data) for leaf in d.LEAVES} for p, d in ds.items()}
    rng = np.random.default_rng(seed)
    for t in range(T + 3):
        G = random_grads(model, rng)
        for p, d in ds.items():  # an "optimizer step" that also revives pruned E entries
            d.lora_E.data = d.lora_E.data + np.float32(0.01)
            W[p + ".lora_E"]["lora_E"] = W[p + ".lora_E"]["lora_E"] + np.float32(0.01)
        model.update_and_allocate(t)
        ref.step(t, W, G)
        for p, d in ds.items():
            assert np.array_equal(d.lora_E.data, W[p + ".lora_E"]["lora_E"]), (t, p)
        assert cfg.rank_pattern == ref.pattern, t
        if ref.pattern is not None and (t >= T - tfinal or (t > tinit and t % dt == 0)):
            b = budget_np(t, len(ds) * r, len(ds) * target, tinit, tfinal, T)
            assert sum(int(np.count_nonzero(d.lora_E.data)) for d in ds.values()) == b, t  # exactly b kept
    kept = {k: sum(v) for k, v in cfg.rank_pattern.items()}
    assert sum(kept.values()) == target * len(ds)


@pytest.mark.spec("ADALORA-9")
@CHEAP
@given(seed=st.integers(0, 999), k=st.integers(0, 11))
def test_mask_is_lowest_scores_and_idempotent(seed, k):
    from minipeft.adapters.adalora import mask_to_budget
    rng = np.random.default_rng(seed)
    cfg = AdaLoRAConfig(initial_rank=4, target_rank=1, total_step=10)
    ds = {}
    for p in ("a", "b", "c"):
        base, _ = random_base(False, rng, 6, 5)
        ds[p] = d = AdaLoRALinear.create(base, cfg, p, backend.RNG(0))
        d.lora_E.data = rng.standard_normal((4, 1)).astype(np.float32) + 5
        d.ema = {leaf: (rng.random(getattr(d, leaf).shape).astype(np.float32),
                        rng.random(getattr(d, leaf).shape).astype(np.float32)) for leaf in d.LEAVES}
    S = np.concatenate([(lambda s: s["lora_E"][:, 0] + (s["lora_A"].mean(1) + s["lora_B"].mean(0)))(
        {leaf: a * u for leaf, (a, u) in d.ema.items()}) for d in ds.values()])
    lowest = set(np.argsort(S)[:k].tolist())
    pattern = mask_to_budget(ds, k)
    E = np.concatenate([d.lora_E.data[:, 0] for d in ds.values()])
    assert {i for i in range(12) if E[i] == 0} == lowest and np.count_nonzero(E) == 12 - k
    assert sum(pattern.values(), []) == [i not in lowest for i in range(12)]
    assert list(pattern) == ["a.lora_E", "b.lora_E", "c.lora_E"]
    assert mask_to_budget(ds, k) == pattern and np.array_equal(
        np.concatenate([d.lora_E.data[:, 0] for d in ds.values()]), E)  # masking again: no change


# ---- ADALORA-10 ------------------------------------------------------------------------------------------------
def allocated_model(tmp=None):
    """Trained-like state: random leaves and gradients, allocation run to the final phase."""
    model = adalora_model(r=4, target=2, tm=("q_proj", "v_proj", "up_proj"), total_step=4, tfinal=1)
    rng = np.random.default_rng(0)
    for t in range(4):
        random_grads(model, rng)
        model.update_and_allocate(t)
    return model


@pytest.mark.spec("ADALORA-10")
def test_save_prunes_by_rank_pattern_and_reloads(tmp_path):
    model = allocated_model()
    pattern = model.peft_configs["default"].rank_pattern
    model.save_adapters(str(tmp_path / "a"))
    saved, meta = read_safetensors(str(tmp_path / "a" / "adapter_model.safetensors"))
    conf = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "ADALORA" and conf["rank_pattern"] == pattern and meta == {"format": "pt"}
    assert {k: conf[k] for k in ("init_r", "target_r", "lora_alpha", "beta1", "beta2", "deltaT", "total_step",
                                 "tfinal", "tinit", "orth_reg_weight", "lora_dropout")} == \
        dict(init_r=4, target_r=2, lora_alpha=16, beta1=0.85, beta2=0.95, deltaT=1, total_step=4, tfinal=1, tinit=0,
             orth_reg_weight=0.5, lora_dropout=0.0)
    for path, layer in layers(model, "default"):
        keep = np.array(pattern[path + ".lora_E"])
        t = leaves(layer.adapters["default"])
        key = "base_model.model." + path
        assert np.array_equal(saved[key + ".lora_A"], t["lora_A"][keep].astype(np.float32))
        assert np.array_equal(saved[key + ".lora_B"], t["lora_B"][:, keep].astype(np.float32))
        assert np.array_equal(saved[key + ".lora_E"], t["lora_E"][keep].astype(np.float32))
    assert len(saved) == 3 * len(layers(model, "default"))
    again = make_model()
    again.load_adapters(str(tmp_path / "a"))
    for path, layer in layers(again, "default"):
        d = layer.adapters["default"]
        assert d.lora_E.shape == (sum(pattern[path + ".lora_E"]), 1) and d.s == 16 / (4 + 1e-5)  # ranknum = 4
    assert_close(again(IDS), model(IDS), 1e-6, label="reloaded logits")
    again.save_adapters(str(tmp_path / "b"))  # a pruned layer saves as it is
    resaved, _ = read_safetensors(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert all(np.array_equal(resaved[k], v) for k, v in saved.items()) and set(resaved) == set(saved)


@pytest.mark.spec("ADALORA-10")
def test_save_without_pattern_is_full(tmp_path):
    model = adalora_model(r=3, tm=("k_proj",))
    model.save_adapters(str(tmp_path))
    saved, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {
        f"base_model.model.model.layers.{i}.self_attn.k_proj.{leaf}": shape for i in range(2)
        for leaf, shape in (("lora_A", (3, D)), ("lora_B", (16, 3)), ("lora_E", (3, 1)))}
    again = make_model()
    again.load_adapters(str(tmp_path))
    assert np.array_equal(again(IDS).data, model(IDS).data)


# ---- ADALORA-11 ------------------------------------------------------------------------------------------------
BAD = [dict(initial_rank=0), dict(initial_rank=-2), dict(initial_rank=2.0), dict(target_rank=13),
       dict(target_rank=0), dict(alpha=0), dict(beta_start=0.0), dict(beta_start=1.0), dict(beta_end=1.5),
       dict(beta_end=-0.1), dict(tinit=-1), dict(tfinal=1.5), dict(delta_t=0), dict(total_step=0),
       dict(total_step=5, tinit=2, tfinal=3), dict(orth_reg_weight=-0.1), dict(dropout=1.0),
       dict(rank_pattern={"x.lora_E": [True] * 3}), dict(layers_pattern="layers")]


@pytest.mark.spec("ADALORA-11")
@pytest.mark.parametrize("fields", BAD, ids=[str(f) for f in BAD])
def test_bad_config_values(fields):
    with pytest.raises(ConfigError, match=list(fields)[0]):
        AdaLoRAConfig(**{"target_modules": ("q_proj",), **fields})


@pytest.mark.spec("ADALORA-11")
def test_rank_above_layer_and_missing_total_step():
    with pytest.raises(ConfigError, match="initial_rank"):
        make_model().apply_adalora(initial_rank=17, target_rank=1, target_modules=("k_proj",))  # k_proj is 16 x 32
    model = adalora_model(r=2, target=1)
    random_grads(model, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="total_step"):
        model.update_and_allocate(0)


@pytest.mark.spec("ADALORA-10", "ADALORA-11")
def test_bad_rank_pattern_in_file(tmp_path):
    model = allocated_model()
    model.save_adapters(str(tmp_path))
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    conf["rank_pattern"]["model.layers.0.self_attn.q_proj.lora_E"] = [True, False]
    (tmp_path / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="rank_pattern"):
        make_model().load_adapters(str(tmp_path))


# ---- ADALORA-12 ------------------------------------------------------------------------------------------------
@pytest.mark.spec("ADALORA-12", "ADALORA-6")
def test_train_adds_penalty_and_allocates_each_step(monkeypatch):
    from minipeft.models.blocks import causal_lm_loss
    model = adalora_model(r=4, target=2, tm=("q_proj", "v_proj"), total_step=5, tinit=1, tfinal=1,
                          orth_reg_weight=0.3)
    data = [{"input_ids": np.random.default_rng(i).integers(0, 64, 7).tolist()} for i in range(4)]
    ids = np.array([d["input_ids"] for d in data])
    model.net.train()
    lm = causal_lm_loss(model.net(ids), ids).item()  # the first step's batch: all 4 records (batch_size=4)
    R0, _ = penalty_np(list(deltas_of(model).values()), 0.3)
    calls = []
    after = AdaLoRALinear.after_step
    monkeypatch.setattr(AdaLoRALinear, "after_step", staticmethod(
        lambda deltas, cfg, step: (calls.append((step, all(d.lora_A.grad is not None for d in deltas.values()))),
                                   after(deltas, cfg, step))[1]))
    hist = model.train(data, batch_size=4, max_steps=6, learning_rate=1e-3, shuffle=False, progress=False)
    assert abs(hist["loss"][0] - (lm + R0)) < 1e-5 * (lm + R0)
    assert calls == [(t, True) for t in range(6)]  # once per optimizer step, gradients present
    E = [d.lora_E.data for d in deltas_of(model).values()]
    assert sum(int(np.count_nonzero(e)) for e in E) == 2 * 4  # target budget after total_step - tfinal


@pytest.mark.spec("ADALORA-3", "ADALORA-6", "ADALORA-8", "ADALORA-9", "ADALORA-10")
def test_array_api_only(any_backend):
    """Forward (dropout live), backward, penalty, sensitivity, masking and the pruned save layout run on the
    current backend with array-API calls only (the array_api_strict guard) and give NumPy's values."""
    from minipeft.adapters.adalora import mask_to_budget
    rng = np.random.default_rng(0)
    cfg = AdaLoRAConfig(initial_rank=3, target_rank=1, total_step=4, dropout=0.3)
    deltas, layers_ = {}, []
    for p in ("a", "b"):
        base, _ = random_base(False, rng, 12, 20)
        for t in base.parameters():
            t.data = backend.asarray(np.asarray(t.data))
        base.requires_grad_(False)
        layer = AdaptedLayer(base)
        layer.adapters["default"] = deltas[p] = d = AdaLoRALinear.create(base, cfg, p, backend.RNG(1))
        layer.active = ["default"]
        for t in d.parameters():
            t.data = backend.asarray(rng.standard_normal(t.shape).astype(np.float32) * 0.3)
        layers_.append(layer)
    x = rng.standard_normal((2, 3, 12)).astype(np.float32)
    R = AdaLoRALinear.regularization(deltas, cfg)
    assert_close(backend.to_host(R.data), penalty_np(list(deltas.values()), cfg.orth_reg_weight)[0], 1e-5, label="R")
    for layer in layers_:
        layer.train()
        R = R + layer(Tensor(backend.asarray(x))).sum()
        layer.eval()
        ref = x @ (np.asarray(backend.to_host(layer.base_layer.weight.data), np.float64)
                   + delta_np(layer.adapters["default"])).T + backend.to_host(layer.base_layer.bias.data)
        assert_close(backend.to_host(layer(Tensor(backend.asarray(x))).data), ref, 1e-5, label="eval forward")
    R.backward()
    for d in deltas.values():
        d.update_sensitivity(cfg)
    pattern = mask_to_budget(deltas, 2)
    assert sum(sum(v) for v in pattern.values()) == 4
    cfg.rank_pattern = pattern
    for p, d in deltas.items():
        keep = np.array(pattern[p + ".lora_E"])
        saved = dict(d.saved_parameters())
        assert np.array_equal(backend.to_host(saved["lora_A"].data), backend.to_host(d.lora_A.data)[keep])
        assert np.array_equal(backend.to_host(saved["lora_B"].data), backend.to_host(d.lora_B.data)[:, keep])


@pytest.mark.spec("ADALORA-12")
def test_two_active_adalora_adapters_are_refused_before_any_update():
    import minipeft as mp
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_adalora(total_step=4, name="a")
    model.apply_adalora(total_step=4, name="b")
    model.set_active_adapter(["a", "b"])
    before = {n: p.numpy().copy() for n, p in model.net.named_parameters() if p.requires_grad}
    rows = [{"input_ids": [3, 4, 5, 6]}] * 4
    with pytest.raises(ConfigError, match=r"\['a', 'b'\] are active together"):
        model.train(rows, mp.TrainingConfig(batch_size=2, max_steps=2, progress=False))
    assert all(np.array_equal(p.numpy(), before[n]) for n, p in model.net.named_parameters() if p.requires_grad)
    model.set_active_adapter("a")
    assert len(model.train(rows, mp.TrainingConfig(batch_size=2, max_steps=2, progress=False))["loss"]) == 2
