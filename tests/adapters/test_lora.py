"""spec/lora.md (LORA-n) and spec/peft-format.md (PEFT-n) on tiny random Llama models built in-process.

Each claim is rebuilt in NumPy from the spec's formula. For whole-model claims the reference is a
second, plain model (no adapter layers) whose weights are W0 + the NumPy delta: an adapter is right
when the adapted model computes what that effective-weight model computes."""
import copy
import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from helpers import assert_close
from minipeft.adapters import inject
from minipeft.adapters.base import AdaptedLayer
from minipeft.adapters.lora import LoRAConfig
from minipeft.autograd import Tensor
from minipeft.errors import CheckpointError, ConfigError
from minipeft.model import Model
from minipeft.models.config import config_from_dict
from minipeft.models.llama import LlamaForCausalLM
from minipeft.safetensors_io import read_safetensors, write_safetensors

SETTINGS = settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck),
                    phases=(Phase.explicit, Phase.reuse, Phase.generate))  # no shrinking: each example builds models
L, D, I = 2, 32, 64  # layers, hidden, intermediate; k/v_proj are (16, 32): 2 kv heads of 8
CFG = dict(model_type="llama", vocab_size=64, hidden_size=D, intermediate_size=I, num_hidden_layers=L,
           num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
SHAPES = {"self_attn.q_proj": (D, D), "self_attn.k_proj": (16, D), "self_attn.v_proj": (16, D),
          "self_attn.o_proj": (D, D), "mlp.gate_proj": (I, D), "mlp.up_proj": (I, D), "mlp.down_proj": (D, I)}
LINEAR = [f"model.layers.{i}.{n}" for i in range(L) for n in SHAPES] + ["lm_head"]
IDS = np.random.default_rng(7).integers(0, 64, (2, 6))
NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_model(seed=0) -> Model:
    net = LlamaForCausalLM(config_from_dict(dict(CFG)))
    rng = np.random.default_rng(seed)
    for _, p in net.named_parameters():
        p.data = (rng.standard_normal(p.shape) * 0.3).astype(np.float32)
    return Model(net)


def snapshot(model) -> dict:
    return {n: np.array(p.data, copy=True) for n, p in model.net.named_parameters()}


def plain_logits(weights: dict, updates: dict = None) -> np.ndarray:
    """Logits of a plain model (no adapters) with weights + updates ({param name: added array})."""
    net = LlamaForCausalLM(config_from_dict(dict(CFG)))
    for n, p in net.named_parameters():
        p.data = (weights[n] + (updates or {}).get(n, 0)).astype(np.float32)
    return Model(net)(IDS).data


def check_forward_merge_unmerge(model, W: dict, updates: dict, rtol=1e-5):
    """The adapted model, then merged, computes the plain model with W + updates; unmerge gives W0 back."""
    want = plain_logits(W, updates)
    assert_close(model(IDS), want, rtol, label="forward")
    model.merge_adapter()
    assert_close(model(IDS), want, rtol, label="merged")
    model.unmerge_adapter()
    for path, layer in layers(model, "default"):
        assert_close(layer.base_layer.weight.data, W[path + ".weight"], 1e-6, atol=1e-6, label="unmerged W0")


def randomize(model, name, seed=1, scale=0.2):
    """Random A, B (and b_B) for adapter `name`, so that B != 0."""
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, name):
        for _, p in layer.adapters[name].named_parameters():
            p.data = (rng.standard_normal(p.shape) * scale).astype(np.float32)


def layers(model, name):
    return [(p, m) for p, m in model.net.named_modules() if isinstance(m, AdaptedLayer) and name in m.adapters]


def factors(model, name, path):
    d = model.net.get_submodule(path).adapters[name]
    b = None if d.lora_B.bias is None else np.asarray(d.lora_B.bias.data, np.float64)
    return np.asarray(d.lora_A.weight.data, np.float64), np.asarray(d.lora_B.weight.data, np.float64), d.s, b


def scaling(r, alpha, rslora):
    return alpha / np.sqrt(r) if rslora else alpha / r


def first_match(pattern: dict, path, default):
    for k, v in pattern.items():
        if re.match(rf"(.*\.)?({k})$", path):
            return v
    return default


def effective_updates(model, names, weights=None) -> dict:
    """{param name: s B A (+ s b_B on the bias)} summed over adapters `names`, from the spec (LORA-3/4)."""
    up = {}
    for n in names:
        for path, _ in layers(model, n):
            A, B, s, b = factors(model, n, path)
            w = 1.0 if weights is None else weights[n]
            up[path + ".weight"] = up.get(path + ".weight", 0) + w * s * B @ A
            if b is not None:
                up[path + ".bias"] = up.get(path + ".bias", 0) + w * s * b
    return up


targets = st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True)


# ---- LORA-0..LORA-5 -------------------------------------------------------------------------------------------
@pytest.mark.spec("LORA-1")
@SETTINGS
@given(r=st.integers(1, 6), alpha=st.floats(0.5, 32), tm=targets, init=st.sampled_from(["default", "gaussian"]))
def test_init_leaves_output_unchanged(r, alpha, tm, init):
    model = make_model()
    before = model(IDS).data
    model.apply_adapter(LoRAConfig(rank=r, alpha=alpha, target_modules=tuple(tm), init=init))
    assert np.array_equal(model(IDS).data, before)  # B = 0: exactly the base output
    for path, _ in layers(model, "default"):
        A, B, _, _ = factors(model, "default", path)
        assert not B.any() and A.shape == (r, SHAPES[path.split(".", 3)[3]][1])
        if init == "default":
            assert np.abs(A).max() <= 1 / np.sqrt(A.shape[1]) and A.std() > 0


@pytest.mark.spec("LORA-2")
@SETTINGS
@given(r=st.integers(1, 6), alpha=st.floats(0.5, 32), rslora=st.booleans(),
       rp=st.dictionaries(st.sampled_from(["v_proj", r"layers\.1\.self_attn\.q_proj", "q_proj", "proj"]),
                          st.integers(1, 8), max_size=2),
       ap=st.dictionaries(st.sampled_from(["q_proj", r"layers\.0\..*", "k_proj"]), st.floats(1, 64), max_size=2))
def test_scaling_and_patterns(r, alpha, rslora, rp, ap):
    model = make_model()
    model.apply_adapter(LoRAConfig(rank=r, alpha=alpha, use_rslora=rslora, rank_pattern=rp, alpha_pattern=ap,
                                   target_modules=("q_proj", "k_proj", "v_proj")))
    for path, _ in layers(model, "default"):
        A, B, s, _ = factors(model, "default", path)
        r_, a_ = first_match(rp, path, r), first_match(ap, path, alpha)
        assert A.shape[0] == r_ and B.shape[1] == r_
        assert np.isclose(s, scaling(r_, a_, rslora), rtol=1e-12)


@pytest.mark.spec("LORA-0", "LORA-3")
@SETTINGS
@given(ra=st.integers(1, 6), rb=st.integers(1, 6), tma=targets, tmb=targets, active=st.sampled_from(["a", "b", "ab"]),
       lora_bias=st.booleans())
def test_forward_is_effective_weight_and_adapters_add(ra, rb, tma, tmb, active, lora_bias):
    """Active adapters add s B A x + s b_B; the reference is the plain model with W0 + Σ s B A."""
    model = make_model()
    weights = snapshot(model)
    model.apply_adapter(LoRAConfig(rank=ra, alpha=8, target_modules=tuple(tma), lora_bias=lora_bias), "a")
    model.apply_adapter(LoRAConfig(rank=rb, alpha=3, use_rslora=True, target_modules=tuple(tmb)), "b")
    randomize(model, "a", 1)
    randomize(model, "b", 2)
    names = list(active)
    model.set_active_adapter(names)
    assert_close(model(IDS), plain_logits(weights, effective_updates(model, names)), 1e-5, label="adapted logits")
    with model.disable_adapters():
        assert np.array_equal(model(IDS).data, plain_logits(weights))  # LORA-0: exactly the base model
    assert_close(model(IDS), plain_logits(weights, effective_updates(model, names)), 1e-5, label="re-enabled")


@pytest.mark.spec("LORA-3")
@SETTINGS
@given(p=st.floats(0.05, 0.9), r=st.integers(1, 6), lora_bias=st.booleans())
def test_dropout_forward_one_layer(p, r, lora_bias):
    """Train mode: h = W0 x + b + s (B A (x ⊙ m) + b_B), m the inverted-dropout mask (1/(1-p) or 0)."""
    model = make_model()
    model.apply_adapter(LoRAConfig(rank=r, alpha=4, dropout=p, lora_bias=lora_bias, target_modules=("up_proj",)))
    randomize(model, "default")
    path = "model.layers.0.mlp.up_proj"
    layer = model.net.get_submodule(path)
    layer.train()
    x = np.random.default_rng(3).standard_normal((5, D)).astype(np.float32)
    rng = copy.deepcopy(layer.adapters["default"].rng)
    y = layer(Tensor(x)).data
    mask = np.asarray(rng.keep_mask((5, D), p))
    assert set(np.unique(mask)) <= {0.0, np.float32(1 / (1 - p))}
    A, B, s, b = factors(model, "default", path)
    W0, b0 = (np.asarray(t.data, np.float64) for t in (layer.base_layer.weight, layer.base_layer.bias))
    ref = x @ W0.T + b0 + s * ((x * mask) @ A.T @ B.T + (0 if b is None else b))
    assert_close(y, ref, 1e-5, label="dropout forward")


@pytest.mark.spec("LORA-4")
@SETTINGS
@given(r=st.integers(1, 6), alpha=st.floats(1, 32), tm=targets, lora_bias=st.booleans(), rslora=st.booleans())
def test_merge_unmerge(r, alpha, tm, lora_bias, rslora):
    model = make_model()
    weights = snapshot(model)
    model.apply_adapter(LoRAConfig(rank=r, alpha=alpha, target_modules=tuple(tm), lora_bias=lora_bias,
                                   use_rslora=rslora))
    randomize(model, "default")
    unmerged = model(IDS).data
    up = effective_updates(model, ["default"])
    model.merge_adapter()
    params = dict(model.net.named_parameters())
    for path, _ in layers(model, "default"):
        assert_close(params[path + ".base_layer.weight"], weights[path + ".weight"] + up[path + ".weight"], 1e-6,
                     label="W0 + s B A")
        if lora_bias:
            assert_close(params[path + ".base_layer.bias"], weights[path + ".bias"] + up[path + ".bias"], 1e-6)
    assert_close(model(IDS), unmerged, 1e-5, label="merged forward")
    model.unmerge_adapter()
    for path, _ in layers(model, "default"):
        assert_close(params[path + ".base_layer.weight"], weights[path + ".weight"], 1e-6, label="unmerge")
        assert_close(params[path + ".base_layer.bias"], weights[path + ".bias"], 1e-6, label="unmerge bias")
    model.merge_and_unload()
    assert not any(isinstance(m, AdaptedLayer) for _, m in model.net.named_modules())
    assert_close(model(IDS), unmerged, 1e-5, label="merge_and_unload")


@pytest.mark.spec("LORA-4")
def test_lora_bias_needs_a_base_bias_to_merge():
    model = make_model()
    model.apply_adapter(LoRAConfig(rank=2, alpha=4, lora_bias=True, target_modules=("lm_head",)))  # no bias
    with pytest.raises(ConfigError, match="no bias"):
        model.merge_adapter()


@pytest.mark.spec("LORA-5")
@SETTINGS
@given(r=st.integers(1, 6), bias=st.sampled_from(["none", "all", "lora_only"]), lora_bias=st.booleans())
def test_gradients_reach_only_adapter(r, bias, lora_bias):
    model = make_model()
    model.apply_adapter(LoRAConfig(rank=r, alpha=8, bias=bias, lora_bias=lora_bias, target_modules=("q_proj", "v_proj")))
    model.apply_adapter(LoRAConfig(rank=2, alpha=8, target_modules=("k_proj",)), "other")  # inactive: frozen
    randomize(model, "default")
    adapted = [p for p, _ in layers(model, "default")]
    expect = {f"{p}.adapters.default.lora_{x}" for p in adapted for x in ("A.weight", "B.weight")}
    expect |= {f"{p}.adapters.default.lora_B.bias" for p in adapted} if lora_bias else set()
    all_biases = {n for n, _ in model.net.named_parameters() if n.endswith(".bias") and ".adapters." not in n}
    wrapped = {f"{p}.base_layer.bias" for p, m in model.net.named_modules() if isinstance(m, AdaptedLayer)}
    expect |= all_biases if bias == "all" else wrapped if bias == "lora_only" else set()
    assert {n for n, p in model.net.named_parameters() if p.requires_grad} == expect

    # one layer: L = Σ G ⊙ Y with Y = X W0ᵀ + b + s X Aᵀ Bᵀ gives dA = s Bᵀ Gᵀ X, dB = s Gᵀ X Aᵀ
    layer = model.net.get_submodule(adapted[0])
    rng = np.random.default_rng(5)
    X = rng.standard_normal((4, D)).astype(np.float32)
    G = rng.standard_normal((4, D)).astype(np.float32)
    (layer(Tensor(X)) * Tensor(G)).sum().backward()
    A, B, s, _ = factors(model, "default", adapted[0])
    delta = layer.adapters["default"]
    assert_close(delta.lora_A.weight.grad, s * B.T @ G.T @ X, 1e-5, label="dA")
    assert_close(delta.lora_B.weight.grad, s * G.T @ X @ A.T, 1e-5, label="dB")
    assert layer.base_layer.weight.grad is None
    if lora_bias:
        assert_close(delta.lora_B.bias.grad, s * G.sum(0), 1e-5, label="d b_B")


@pytest.mark.spec("LORA-6")
@SETTINGS
@given(r=st.integers(1, 6), alpha=st.floats(1, 16), init=st.sampled_from(["pissa", "olora"]), rslora=st.booleans())
def test_pissa_olora_unchanged_at_step0(tmp_path_factory, r, alpha, init, rslora):
    model = make_model()
    weights = snapshot(model)
    model.apply_adapter(LoRAConfig(rank=r, alpha=alpha, init=init, use_rslora=rslora, target_modules=("q_proj", "o_proj")))
    assert_close(model(IDS), plain_logits(weights), 1e-5, label=f"{init} step 0")
    for path, _ in layers(model, "default"):
        A, B, s, _ = factors(model, "default", path)
        W = weights[path + ".weight"].astype(np.float64)
        if init == "pissa":
            U, S, Vh = np.linalg.svd(W)
            principal = (U[:, :r] * S[:r]) @ Vh[:r]
        else:
            Q, R = np.linalg.qr(W)
            principal = Q[:, :r] @ R[:r]
        assert_close(s * B @ A, principal if init == "pissa" else s * principal, 1e-5, label=f"{init} s B A")
        W0 = model.net.get_submodule(path).base_layer.weight.data
        assert_close(W0, W - s * B @ A, 1e-5, label="residual W0")
    randomize(model, "default")  # "trained": reloading onto a fresh base recomputes the residual first
    trained = model(IDS).data
    folder = str(tmp_path_factory.mktemp("pissa"))
    model.save_adapters(folder)
    again = make_model()
    again.load_adapters(folder)
    assert_close(again(IDS), trained, 1e-5, label=f"{init} reloaded")


# ---- LORA-7..9, LORA-12: combining ----------------------------------------------------------------------------
def two_sources(ra, rb, alpha_a=8, alpha_b=3, rslora_b=True, tma=("q_proj", "v_proj"), tmb=("q_proj", "k_proj")):
    model = make_model()
    model.base_weights = snapshot(model)  # before any adapter: the plain model's parameter names
    model.apply_adapter(LoRAConfig(rank=ra, alpha=alpha_a, target_modules=tma), "a")
    model.apply_adapter(LoRAConfig(rank=rb, alpha=alpha_b, use_rslora=rslora_b, target_modules=tmb), "b")
    randomize(model, "a", 1)
    randomize(model, "b", 2)
    return model


weight = st.floats(-2, 2).filter(lambda w: abs(w) > 1e-3)


@pytest.mark.spec("LORA-7", "LORA-12")
@SETTINGS
@given(ra=st.integers(1, 6), rb=st.integers(1, 6), wa=weight, wb=weight)
def test_cat_is_exact(ra, rb, wa, wb):
    model = two_sources(ra, rb)
    weights = model.base_weights
    model.merge_adapters({"a": wa, "b": wb}, "m", "cat")
    ref = effective_updates(model, ["a", "b"], {"a": wa, "b": wb})
    for path, _ in layers(model, "m"):
        A, B, s, _ = factors(model, "m", path)
        assert s == 1.0
        assert_close(B @ A, ref[path + ".weight"], 1e-6, label="cat B'A'")
    assert {p for p, _ in layers(model, "m")} == {p for p, _ in layers(model, "a")} | {p for p, _ in layers(model, "b")}
    model.set_active_adapter("m")
    assert_close(model(IDS), plain_logits(weights, ref), 1e-5, label="cat logits")


def np_prune_mag(t, d):
    if d >= 1:
        return t
    keep = np.zeros(t.size, bool)
    keep[np.argsort(-np.abs(t).ravel(), kind="stable")[:int(d * t.size)]] = True
    return np.where(keep.reshape(t.shape), t, 0)


def np_disjoint(ts, ws, method):
    votes = sum(ts) if method == "total" else sum(np.sign(t) for t in ts)
    e = np.where(votes >= 0, 1, -1)
    agree = [np.sign(t) == e for t in ts]
    return sum(w * t * a for w, t, a in zip(ws, ts, agree)) / np.maximum(sum(agree), 1)


NP_MERGES = {
    "linear": lambda ts, ws, d, m: sum(w * t for w, t in zip(ws, ts)),
    "magnitude_prune": lambda ts, ws, d, m: sum(w * np_prune_mag(t, d) for w, t in zip(ws, ts)),
    "ties": lambda ts, ws, d, m: np_disjoint([np_prune_mag(t, d) for t in ts], ws, m),
    "dare_linear": lambda ts, ws, d, m: sum(w * t for w, t in zip(ws, ts)),  # d = 1 only
    "dare_ties": lambda ts, ws, d, m: np_disjoint(ts, ws, m),  # d = 1 only
}


@pytest.mark.spec("LORA-8")
@SETTINGS
@given(r=st.integers(1, 5), wa=weight, wb=weight, comb=st.sampled_from(list(NP_MERGES)),
       density=st.sampled_from([1.0, 0.3, 0.7]), method=st.sampled_from(["total", "frequency"]))
def test_factorwise_merges(r, wa, wb, comb, density, method):
    if comb.startswith("dare"):
        density = 1.0  # DARE's random drop is checked by structure below
    model = two_sources(r, r)
    w = {"a": wa, "b": wb}
    model.merge_adapters(w, "m", comb, density=density, majority_sign_method=method)
    for path, _ in layers(model, "m"):
        src = [(factors(model, n, path), w[n]) for n in w if n in model.net.get_submodule(path).adapters]
        a = [np.sign(wi * s or 1) * np.sqrt(abs(wi * s)) for (_, _, s, _), wi in src]
        b = [np.sqrt(abs(wi * s)) for (_, _, s, _), wi in src]
        A, B, s, _ = factors(model, "m", path)
        assert s == 1.0
        assert_close(A, NP_MERGES[comb]([f[0] for f, _ in src], a, density, method), 1e-5, label=f"{comb} A'")
        assert_close(B, NP_MERGES[comb]([f[1] for f, _ in src], b, density, method), 1e-5, label=f"{comb} B'")


@pytest.mark.spec("LORA-8")
@SETTINGS
@given(r=st.integers(2, 5), density=st.sampled_from([0.2, 0.5, 0.8]), seed=st.integers(0, 3))
def test_dare_structure_and_seed(r, density, seed):
    """dare_linear: each entry of A' is 0, a_i t_i / d or their sum (a keep/drop pattern); same seed, same result."""
    model = two_sources(r, r)
    w = {"a": 0.6, "b": 0.9}
    model.merge_adapters(w, "m", "dare_linear", density=density, seed=seed)
    model.merge_adapters(w, "m2", "dare_linear", density=density, seed=seed)
    kept = []
    for path, _ in layers(model, "m"):
        here = [n for n in w if n in model.net.get_submodule(path).adapters]
        A = factors(model, "m", path)[0]
        assert np.array_equal(A, factors(model, "m2", path)[0])
        terms = []  # a_i A_i / d: the value source i contributes where it is kept
        for n in here:
            A_i, _, s, _ = factors(model, n, path)
            terms.append(np.sign(w[n] * s) * np.sqrt(abs(w[n] * s)) * A_i / density)
        cands = np.stack([np.zeros_like(A), *terms] + ([sum(terms)] if len(terms) > 1 else []))
        assert (np.min(np.abs(cands - A), axis=0) <= 1e-5 * np.abs(cands).max()).all()
        for t in terms:  # source i is kept where A' equals its term or the sum
            kept.append(np.mean(np.isclose(A, t, rtol=1e-5) | np.isclose(A, sum(terms), rtol=1e-5)))
    assert abs(np.mean(kept) - density) < 0.25


@pytest.mark.spec("LORA-9")
@SETTINGS
@given(ra=st.integers(1, 5), rb=st.integers(1, 5), wa=weight, wb=weight, k=st.one_of(st.none(), st.integers(1, 12)),
       comb=st.sampled_from(["svd", "ties_svd", "magnitude_prune_svd"]))
def test_svd_combinations(ra, rb, wa, wb, k, comb):
    """B'A' is the best rank-k approximation of D = M(dW_i; w_i) (unique for distinct singular values)."""
    model = two_sources(ra, rb)
    w = {"a": wa, "b": wb}
    model.merge_adapters(w, "m", comb, svd_rank=k, density=0.6)
    for path, _ in layers(model, "m"):
        here = [n for n in w if n in model.net.get_submodule(path).adapters]
        srcs = [factors(model, n, path) for n in here]
        dWs = [s * B @ A for A, B, s, _ in srcs]
        D = NP_MERGES[comb.removesuffix("_svd") if comb != "svd" else "linear"](dWs, [w[n] for n in here], 0.6, "total")
        kk = k or max(A.shape[0] for A, _, _, _ in srcs)
        U, S, Vh = np.linalg.svd(D)
        A, B, s, _ = factors(model, "m", path)
        assert s == 1.0 and A.shape[0] == kk
        assert_close(B @ A, (U[:, :kk] * S[:kk]) @ Vh[:kk], 1e-4, label=f"{comb} best rank-{kk}")
        assert_close(A @ A.T, np.eye(kk), 1e-4, label="A' = Vh: orthonormal rows")


@pytest.mark.spec("LORA-9")
def test_svd_clamp_level():
    """The clamp level h is the q-quantile of the unclamped B', A' entries; |entries| <= h after."""
    model = two_sources(3, 3)
    w = {"a": 1.0, "b": 0.5}
    model.merge_adapters(w, "full", "svd", svd_rank=3)
    model.merge_adapters(w, "clamped", "svd", svd_rank=3, svd_clamp=0.8)
    for path, _ in layers(model, "full"):
        A, B, _, _ = factors(model, "full", path)
        h = np.quantile(np.concatenate([B.ravel(), A.ravel()]), 0.8)
        Ac, Bc, _, _ = factors(model, "clamped", path)
        assert_close(Ac, np.clip(A, -h, h), 1e-6, label="clamped A'")
        assert_close(Bc, np.clip(B, -h, h), 1e-6, label="clamped B'")


@pytest.mark.spec("LORA-7", "LORA-8", "LORA-9")
def test_combinations_use_only_the_array_api(any_backend):
    """Every combination runs on the array_api_strict guard too (no NumPy-only call) and gives NumPy's result."""
    from minipeft import backend
    from minipeft.adapters.combine import COMBINATIONS
    model = two_sources(3, 3)
    for _, p in model.net.named_parameters():
        p.data = backend.asarray(np.asarray(p.data))
    results = {}
    for comb in COMBINATIONS:
        model.merge_adapters({"a": 0.7, "b": -0.4}, comb, comb, density=0.5, svd_clamp=0.9 if comb == "svd" else None)
        results[comb] = {p: factors(model, comb, p)[:2] for p, _ in layers(model, comb)}
    if any_backend == "numpy":
        RESULTS.update(results)
    else:
        for comb, per_layer in results.items():
            for path, (A, B) in per_layer.items():
                assert_close(B @ A, RESULTS[comb][path][1] @ RESULTS[comb][path][0], 1e-5, label=f"{comb} strict")


RESULTS = {}  # the NumPy run's results, which the array_api_strict run is compared with


@pytest.mark.spec("LORA-12", "PEFT-6")
def test_combined_rslora_and_rank_pattern_reload(tmp_path):
    """One rsLoRA source with weight 1 gives back its own delta (PEFT's result is sqrt(r) too large), and a
    cat of unequal ranks records per-layer ranks, so save -> load reproduces the logits."""
    model = two_sources(4, 2, rslora_b=True)
    model.merge_adapters({"b": 1.0}, "only_b", "svd")
    for path, _ in layers(model, "b"):
        A, B, s, _ = factors(model, "b", path)
        A1, B1, s1, _ = factors(model, "only_b", path)
        assert s1 == 1.0 and not model.peft_configs["only_b"].use_rslora
        assert_close(B1 @ A1, s * B @ A, 1e-6, label="single rsLoRA source")
    model.merge_adapters({"a": 0.5, "b": 2.0}, "m", "cat")
    cfg = model.peft_configs["m"]
    ranks = {p: factors(model, "m", p)[0].shape[0] for p, _ in layers(model, "m")}
    assert cfg.rank == cfg.alpha and set(ranks.values()) == {4, 2, 6}
    for path, r in ranks.items():
        assert first_match(cfg.rank_pattern, path, cfg.rank) == r == first_match(cfg.alpha_pattern, path, cfg.alpha)
    model.set_active_adapter("m")
    out = model(IDS).data
    model.save_adapters(str(tmp_path), "m")
    again = make_model()
    again.load_adapters(str(tmp_path / "m"), "m")
    assert np.array_equal(again(IDS).data, out)


# ---- LORA-10: targeting ---------------------------------------------------------------------------------------
def np_targets(tm, exclude=(), layers_to=None, pattern=None):
    def match(path, entries):
        if isinstance(entries, str):
            return re.fullmatch(entries, path) is not None
        return any(path == e or path.endswith("." + e) for e in entries)
    found = [p for p in LINEAR if (p != "lm_head" if tm == "all-linear" else match(p, tm))]
    found = [p for p in found if not (exclude and match(p, exclude))]
    if layers_to is not None:
        keep = {layers_to} if isinstance(layers_to, int) else set(layers_to)
        rx = rf"(?:^|.*?\.){pattern}\.(\d+)\." if pattern else r".*?\.[^.]*\.(\d+)\."
        found = [p for p in found if (m := re.match(rx, p + ".")) and int(m.group(1)) in keep]
    return set(found)


@pytest.mark.spec("LORA-10")
@SETTINGS
@given(tm=st.one_of(targets.map(tuple), st.sampled_from([r".*\.(q|v)_proj", r"model\.layers\.1\..*proj", "all-linear",
                                                         r".*mlp.*", "lm_head"]),
                    st.just(("self_attn.q_proj", "lm_head"))),
       exclude=st.lists(st.sampled_from(NAMES + ["layers.0.mlp.up_proj"]), max_size=2).map(tuple),
       layers_to=st.one_of(st.none(), st.integers(0, 1), st.lists(st.integers(0, 2), min_size=1, max_size=2)),
       pattern=st.sampled_from([None, "layers"]))
def test_target_modules_rules(tm, exclude, layers_to, pattern):
    expect = np_targets(tm, exclude, layers_to, pattern)
    model = make_model()
    cfg = LoRAConfig(rank=1, alpha=1, target_modules=tm, exclude_modules=exclude,
                     layers_to_transform=layers_to, layers_pattern=pattern)
    if not expect:
        with pytest.raises(ConfigError, match="its linear or embedding layers are named: .*down_proj.*q_proj"):
            model.apply_adapter(cfg)
        return
    model.apply_adapter(cfg)
    assert {p for p, _ in layers(model, "default")} == expect


@pytest.mark.spec("LORA-13")
def test_a_string_that_matches_nothing_says_it_is_a_regex_and_names_the_layers():
    """Before: "q_proj" (a string) gave 'matches no linear layer' and nothing on why. Now the message says
    it is a whole-path regex, shows a path, lists the leaf names and suggests ["q_proj"], which works."""
    model = make_model()
    with pytest.raises(ConfigError) as e:
        model.apply_lora(target_modules="q_proj")
    msg = str(e.value)
    assert "regular expression that must match the whole module path" in msg
    assert "'model.layers.0.self_attn.q_proj'" in msg and "target_modules=['q_proj']" in msg
    assert "named: " + ", ".join(sorted(NAMES + ["embed_tokens", "lm_head"])) in msg
    model.apply_lora(target_modules=["q_proj"])
    assert {p for p, _ in layers(model, "default")} == {f"model.layers.{i}.self_attn.q_proj" for i in range(L)}


@pytest.mark.spec("LORA-13")
def test_list_entries_that_match_nothing_are_named():
    """Before: ("q_proj", "v_prj") silently adapted q_proj alone. Now a UserWarning names 'v_prj' and the leaf
    names (PEFT 0.21.2 accepts such a list, so it is not an error); a list matching nothing is a ConfigError."""
    model = make_model()
    with pytest.warns(UserWarning, match=r"\['v_prj'\] match no linear or embedding layer.*named: down_proj, embed_tokens, gate_proj"):
        model.apply_lora(target_modules=("q_proj", "v_prj"))
    assert {p for p, _ in layers(model, "default")} == {f"model.layers.{i}.self_attn.q_proj" for i in range(L)}
    with pytest.raises(ConfigError, match=r"\('v_prj', 'qq'\) matches no linear or embedding layer.*named: down_proj"):
        make_model().apply_lora(target_modules=("v_prj", "qq"))


# ---- LORA-11: errors leave the model unchanged -------------------------------------------------------------------
BAD = [
    dict(rank=0), dict(rank=-2), dict(rank=2.5), dict(alpha=0), dict(alpha=-1), dict(dropout=1.0), dict(dropout=-0.1),
    dict(bias="some"), dict(init="magic"), dict(rank_pattern={"q_proj": 0}),
]


@pytest.mark.spec("LORA-11")
@pytest.mark.parametrize("fields", BAD, ids=[str(f) for f in BAD])
def test_bad_config_values(fields):
    with pytest.raises(ConfigError, match=list(fields)[0].split("_")[0]):
        LoRAConfig(**{"target_modules": ("q_proj",), **fields})


@pytest.mark.spec("LORA-11")
@pytest.mark.parametrize("case", ["rank_too_big", "pattern_too_big", "no_match", "bad_save", "dup_name", "bad_name",
                                  "linear_unequal", "svd_rank_big", "unknown_comb", "density", "missing_source"])
def test_errors_leave_model_unchanged(case):
    model = make_model()
    model.apply_adapter(LoRAConfig(rank=2, alpha=4, target_modules=("q_proj", "k_proj")), "a")
    model.apply_adapter(LoRAConfig(rank=3, alpha=4, target_modules=("q_proj",)), "b")
    before = (sorted(n for n, _ in model.net.named_parameters()), dict(model.peft_configs))
    act = {
        "rank_too_big": lambda: model.apply_lora(rank=17, target_modules=("q_proj", "k_proj"), name="c"),  # k: 16 out
        "pattern_too_big": lambda: model.apply_lora(rank=2, rank_pattern={r"layers\.1\.self_attn\.v_proj": 20},
                                                    target_modules=("q_proj", "v_proj"), name="c"),
        "no_match": lambda: model.apply_lora(target_modules=("qkv",), name="c"),
        "bad_save": lambda: model.apply_lora(target_modules=("q_proj",), modules_to_save=("score",), name="c"),
        "dup_name": lambda: model.apply_lora(target_modules=("v_proj",), name="a"),
        "bad_name": lambda: model.apply_lora(target_modules=("v_proj",), name="a.b"),
        "linear_unequal": lambda: model.merge_adapters({"a": 1.0, "b": 1.0}, "c", "linear"),
        "svd_rank_big": lambda: model.merge_adapters({"a": 1.0, "b": 1.0}, "c", "svd", svd_rank=17),
        "unknown_comb": lambda: model.merge_adapters({"a": 1.0, "b": 1.0}, "c", "average"),
        "density": lambda: model.merge_adapters({"a": 1.0, "b": 1.0}, "c", "cat", density=0.0),
        "missing_source": lambda: model.merge_adapters({"a": 1.0, "zz": 1.0}, "c", "cat"),
    }[case]
    message = {"rank_too_big": r"rank.*min\(in=32, out=16\)", "pattern_too_big": "rank", "no_match": "linear or embedding layers",
               "bad_save": "score", "dup_name": "exists already", "bad_name": "letters", "linear_unequal": "equal ranks",
               "svd_rank_big": "svd_rank", "unknown_comb": "combination", "density": "density",
               "missing_source": "zz"}[case]
    with pytest.raises(ConfigError, match=message):
        act()
    assert (sorted(n for n, _ in model.net.named_parameters()), dict(model.peft_configs)) == before


# ---- PEFT-1..PEFT-6: the file format ----------------------------------------------------------------------------
@pytest.mark.spec("PEFT-1", "PEFT-2", "PEFT-3", "PEFT-6")
@SETTINGS
@given(r=st.integers(1, 6), tm=targets, lora_bias=st.booleans(), mts=st.booleans())
def test_save_load_round_trip_bit_exact(tmp_path_factory, r, tm, lora_bias, mts):
    model = make_model()
    model.apply_adapter(LoRAConfig(rank=r, alpha=2 * r, target_modules=tuple(tm), lora_bias=lora_bias,
                                   modules_to_save=("lm_head",) if mts else ()))
    model.apply_adapter(LoRAConfig(rank=2, alpha=4, target_modules=("o_proj",)), "second")
    for n, p in model.net.named_parameters():
        if ".adapters." in n or ".modules_to_save." in n:
            p.data = (p.data + np.random.default_rng(1).standard_normal(p.shape)).astype(np.float32)
    folder = tmp_path_factory.mktemp("rt")
    model.save_adapters(str(folder))
    tensors, meta = read_safetensors(str(folder / "adapter_model.safetensors"))
    assert meta == {"format": "pt"} and all(t.dtype == np.float32 for t in tensors.values())
    keys = {f"base_model.model.{p}.lora_{x}.weight" for p, _ in layers(model, "default") for x in "AB"}
    keys |= {f"base_model.model.{p}.lora_B.bias" for p, _ in layers(model, "default")} if lora_bias else set()
    keys |= {"base_model.model.lm_head.weight"} if mts else set()
    assert set(tensors) == keys
    for p, _ in layers(model, "default"):
        A, B, _, _ = factors(model, "default", p)
        assert np.array_equal(tensors[f"base_model.model.{p}.lora_A.weight"], A)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == r and cfg["lora_alpha"] == 2 * r and cfg["inference_mode"]
    assert sorted(cfg["target_modules"]) == sorted(tm) and cfg["task_type"] == "CAUSAL_LM"
    assert (folder / "second" / "adapter_model.safetensors").is_file()  # PEFT-1: non-default in a subfolder

    again = make_model()
    again.load_adapters(str(folder))  # PEFT-7: the top as "default", the sub-folder as "second"
    assert sorted(again.peft_configs) == ["default", "second"] and again.active_adapters == ["default"]
    ours, theirs = dict(model.net.named_parameters()), dict(again.net.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k].data, theirs[k].data) for k in ours)
    for names in (["default"], ["default", "second"]):
        model.set_active_adapter(names)
        again.set_active_adapter(names)
        assert np.array_equal(model(IDS).data, again(IDS).data)


@pytest.mark.spec("PEFT-4")
@pytest.mark.parametrize("damage", ["shape", "missing", "unexpected", "nan", "no_prefix"])
def test_strict_load_fails_and_leaves_no_adapter(tmp_path, damage):
    model = make_model()
    model.apply_adapter(LoRAConfig(rank=2, alpha=4, target_modules=("q_proj", "v_proj")))
    model.save_adapters(str(tmp_path))
    path = str(tmp_path / "adapter_model.safetensors")
    tensors, _ = read_safetensors(path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    if damage == "shape":
        tensors[key] = np.zeros((16, 3), np.float32)
    elif damage == "missing":
        del tensors[key]
    elif damage == "unexpected":
        tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = np.zeros((2, D), np.float32)
    elif damage == "nan":
        tensors[key] = np.full((16, 2), np.nan, np.float32)
    else:
        tensors = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    write_safetensors(path, tensors, {"format": "pt"})
    fresh = make_model()
    base = fresh(IDS).data
    names = sorted(n for n, _ in fresh.net.named_parameters())
    with pytest.raises(CheckpointError, match="v_proj|base_model"):
        fresh.load_adapters(str(tmp_path))
    assert fresh.peft_configs == {}
    assert not any(isinstance(m, AdaptedLayer) and m.adapters.keys() for _, m in fresh.net.named_modules())
    assert sorted(n for n, _ in fresh.net.named_parameters()) == names
    assert np.array_equal(fresh(IDS).data, base)
    if damage in ("missing", "unexpected"):
        report = fresh.load_adapters(str(tmp_path), strict=False)
        assert (report["missing"] if damage == "missing" else report["unexpected"])


# ---- PEFT-7: loading from the folder a user points at -----------------------------------------------------------
def same_tensors(a, b, names):
    for n in names:
        a.set_active_adapter(n)
        b.set_active_adapter(n)
        assert np.array_equal(a(IDS).data, b(IDS).data), n


@pytest.mark.spec("PEFT-7")
def test_named_adapters_load_from_the_folder_they_were_saved_in(tmp_path):
    """Before: save_adapters put adapters not named "default" in sub-folders and load_adapters(folder) said the
    folder had no adapter_config.json. Now it loads every sub-folder's under its name (PEFT's layout), all or
    none; subfolder= picks one, as PEFT's from_pretrained(subfolder=)."""
    model = make_model()
    model.apply_lora(target_modules=["q_proj"], name="translation")
    model.apply_lora(target_modules=["v_proj"], rank=2, name="grammar")
    for n, p in model.net.named_parameters():
        if ".adapters." in n:
            p.data = (p.data + np.random.default_rng(3).standard_normal(p.shape)).astype(np.float32)
    model.save_adapters(str(tmp_path / "out"))
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    again = make_model()
    assert again.load_adapters(str(tmp_path / "out")) == {n: {"missing": [], "unexpected": []}
                                                          for n in ("grammar", "translation")}
    assert sorted(again.peft_configs) == ["grammar", "translation"]
    same_tensors(model, again, ["translation", "grammar"])
    one = make_model()
    one.load_adapters(str(tmp_path / "out"), name="g", subfolder="grammar")
    assert list(one.peft_configs) == ["g"] and one.peft_configs["g"].rank == 2
    clash = make_model().apply_lora(target_modules=["q_proj"], name="grammar")
    with pytest.raises(ConfigError, match=r"adapters named \['grammar'\] already"):
        clash.load_adapters(str(tmp_path / "out"))
    assert list(clash.peft_configs) == ["grammar"]  # and "translation" was not loaded either
    (tmp_path / "out" / "grammar" / "adapter_model.safetensors").write_bytes(b"broken")
    half = make_model()
    with pytest.raises(CheckpointError, match="grammar"):
        half.load_adapters(str(tmp_path / "out"))
    assert half.peft_configs == {} and not inject.adapted_layers(half.net)


@pytest.mark.spec("PEFT-7")
def test_a_training_checkpoint_loads_through_its_adapter_folder(tmp_path):
    """Before: load_adapters("out/checkpoint-2") failed (the adapter is in checkpoint-2/adapter). Now it loads
    that adapter; the output_dir itself is an error that lists what is there and names a checkpoint to pass."""
    from minipeft import TrainingConfig
    model = make_model().apply_lora(target_modules=["q_proj", "v_proj"])
    model.train([{"input_ids": list(range(1, 9))}] * 4, TrainingConfig(max_steps=2, batch_size=2, learning_rate=1e-2,
                                                                       output_dir=str(tmp_path / "run"), progress=False))
    again = make_model()
    again.load_adapters(str(tmp_path / "run" / "checkpoint-2"))
    same_tensors(model, again, ["default"])
    with pytest.raises(CheckpointError) as e:
        make_model().load_adapters(str(tmp_path / "run"))
    msg = str(e.value)
    assert "no adapter found" in msg and "checkpoint-2/" in msg and "a folder whose sub-folders hold one" in msg
    assert f"pass one, e.g. {tmp_path / 'run' / 'checkpoint-2'}" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"Found: an empty folder"):
        make_model().load_adapters(str(tmp_path), subfolder="empty")
    with pytest.raises(CheckpointError, match="no such adapter folder"):
        make_model().load_adapters(str(tmp_path / "nowhere"))
