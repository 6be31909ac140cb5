"""spec/lokr.md (LOKR-n) on tiny random Llama models built in process; the NumPy references are in
lycoris_checks.py (ΔW = s np.kron(W1, W2), rebuilt from the leaves, never delta_weight())."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lycoris_checks as lc
from one_layer import probe_backward
from helpers import assert_close
from minipeft.adapters.lokr import LoKrConfig, LoKrLinear, factorization
from minipeft.autograd import Tensor
from minipeft.errors import ConfigError
from test_loha import FEW, SETTINGS, ranks, shape_of, targets
from test_lora import SHAPES, first_match

factors = st.sampled_from([-1, 1, 2, 3, 4, 5, 8, 16, 0, -3])


def ref_factorization(n, f):
    """LOKR-1's closed form: D = the smallest divisor with D² ≥ n; (n/D, D) uncapped, else the largest
    divisor ≤ f."""
    if f > 0 and n % f == 0:
        return f, n // f
    divisors = [k for k in range(1, n + 1) if n % k == 0]
    D = min(k for k in divisors if k * k >= n)
    if f == -1 or f >= D:
        return n // D, D
    g = max([k for k in divisors if k <= f] or [1])
    return g, n // g


def ref_leaves(out, n, r, f, both):
    """{leaf: shape} by LOKR-1 and LOKR-3."""
    (a, b), (c, d) = ref_factorization(out, f), ref_factorization(n, f)
    w1 = {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)} if both and r < max(a, c) / 2 else {"lokr_w1": (a, c)}
    w2 = {"lokr_w2_a": (b, r), "lokr_w2_b": (r, d)} if r < max(b, d) / 2 else {"lokr_w2": (b, d)}
    return {**w1, **w2}


@pytest.mark.spec("LOKR-1")
@SETTINGS
@given(n=st.integers(1, 600), f=st.integers(-3, 40))
def test_factorization(n, f):
    p, q = factorization(n, f)
    assert p * q == n and (p, q) == ref_factorization(n, f)


@pytest.mark.spec("LOKR-1")
def test_factorization_examples():
    """PEFT's docstring examples, and a non-dividing factor taking the nearest divisor below."""
    assert [factorization(256), factorization(128), factorization(127), factorization(128, 4)] == \
        [(16, 16), (8, 16), (1, 127), (4, 32)]
    assert factorization(32, 16) == (16, 2) and factorization(64, 5) == (4, 16) and factorization(64, 3) == (2, 32)


@pytest.mark.spec("LOKR-3", "LOKR-8", "LOKR-9")
@FEW
@given(r=ranks, f=factors, both=st.booleans(), tm=targets, init=st.sampled_from([True, "lycoris", False]))
def test_leaves_init_and_count(r, f, both, tm, init):
    cfg = LoKrConfig(rank=r, alpha=3, factor=f, decompose_both=both, target_modules=tuple(tm), init_weights=init)
    if init is False:
        model = lc.make_model()
        model.apply_adapter(cfg)
    else:
        model = lc.check_unchanged_at_init(cfg)
    count = 0
    for path, layer in lc.layers(model, "default"):
        d = layer.adapters["default"]
        want = ref_leaves(*shape_of(path), r, f, both)
        assert {k: v.shape for k, v in lc.leaves(d).items()} == want
        lc.check_kaiming(d, set(LoKrConfig.ZEROED[init]))
        count += sum(int(np.prod(s)) for s in want.values())
    lc.check_trainable(model, count)


@pytest.mark.spec("LOKR-2", "LOKR-4")
@SETTINGS
@given(r=st.integers(1, 20), alpha=st.floats(0.5, 32), f=factors, both=st.booleans(),
       rp=st.dictionaries(st.sampled_from(["v_proj", r"layers\.1\.mlp\.up_proj"]), st.integers(1, 20), max_size=2),
       ap=st.dictionaries(st.sampled_from(["q_proj", r"layers\.0\..*"]), st.floats(1, 64), max_size=2))
def test_delta_weight_and_scaling(r, alpha, f, both, rp, ap):
    """ΔW = s kron(W1, W2) with s = α / r, also when no leaf has rank r (large r: both factors full)."""
    model = lc.make_model()
    model.apply_adapter(LoKrConfig(rank=r, alpha=alpha, factor=f, decompose_both=both, rank_pattern=rp,
                                   alpha_pattern=ap, target_modules=("q_proj", "v_proj", "up_proj")))
    lc.randomize(model, "default")
    for path, layer in lc.layers(model, "default"):
        d = layer.adapters["default"]
        assert np.isclose(d.s, first_match(ap, path, alpha) / first_match(rp, path, r), rtol=1e-12)
        assert_close(d.delta_weight(), lc.ref_delta(d), 1e-6, label="ΔW")


@pytest.mark.spec("LOKR-7")
@SETTINGS
@given(a=st.integers(1, 5), b=st.integers(1, 5), c=st.integers(1, 5), d=st.integers(1, 5), seed=st.integers(0, 99))
def test_kronecker_identity(a, b, c, d, seed):
    """kron(A, B) vec(Y) = vec(B Y Aᵀ) for Y (d, c) and kron(A, B) vec_r(X) = vec_r(A X Bᵀ) for X (c, d),
    and the layer's term, which never forms the kron, equals x kron(W1, W2)ᵀ s."""
    rng = np.random.default_rng(seed)
    A, B, X = rng.standard_normal((a, c)), rng.standard_normal((b, d)), rng.standard_normal((c, d))
    Y = X.T  # (d, c)
    assert_close(np.kron(A, B) @ Y.reshape(-1, order="F"), (B @ Y @ A.T).reshape(-1, order="F"), 1e-12)
    assert_close(np.kron(A, B) @ X.reshape(-1), (A @ X @ B.T).reshape(-1), 1e-12)
    _, delta = lc.one_layer(False, c * d, a * b, LoKrLinear, LoKrConfig(rank=1, alpha=2, factor=min(c, a)), rng)
    x = rng.standard_normal((2, 3, c * d)).astype(np.float32)
    assert_close(delta.term(Tensor(x)), x @ lc.ref_delta(delta).T, 1e-5, label="term = x ΔWᵀ")


@pytest.mark.spec("LOKR-7")
@FEW
@given(ra=ranks, rb=ranks, fa=factors, tma=targets, tmb=targets, active=st.sampled_from(["a", "b", "ab"]))
def test_forward_is_effective_weight(ra, rb, fa, tma, tmb, active):
    lc.check_forward_and_disable(LoKrConfig(rank=ra, alpha=8, factor=fa, target_modules=tuple(tma)),
                                 LoKrConfig(rank=rb, alpha=3, decompose_both=True, target_modules=tuple(tmb)), active)


@pytest.mark.spec("LOKR-6")
@FEW
@given(r=ranks, f=factors, both=st.booleans(), tm=targets)
def test_merge_unmerge(r, f, both, tm):
    lc.check_merge_unmerge(LoKrConfig(rank=r, alpha=5, factor=f, decompose_both=both, target_modules=tuple(tm)))


@pytest.mark.spec("LOKR-6")
@SETTINGS
@given(r=ranks, n_in=st.integers(1, 16), n_out=st.integers(1, 16), f=factors, both=st.booleans())
def test_gpt2_conv1d_orientation(r, n_in, n_out, f, both):
    lc.check_conv1d(LoKrLinear, LoKrConfig(rank=r, alpha=2, factor=f, decompose_both=both), n_in, n_out)


@pytest.mark.spec("LOKR-5")
@SETTINGS
@given(p=st.sampled_from([0.0, 0.3, 0.7, 0.99]), q=st.sampled_from([0.0, 0.4, 1.0]), scale=st.booleans())
def test_dropouts(p, q, scale):
    cfg = LoKrConfig(rank=2, alpha=4, rank_dropout=p, module_dropout=q, rank_dropout_scale=scale)
    lc.check_dropouts(LoKrLinear, cfg, n_out=12, rescale=scale)



@pytest.mark.spec("LOKR-5", "LOKR-6", "LOKR-7")
def test_array_api_only(any_backend):
    cfg = LoKrConfig(rank=1, alpha=4, decompose_both=True, rank_dropout=0.5, module_dropout=1e-9)  # the draw, no skip
    lc.check_array_api(LoKrLinear, cfg)


@pytest.mark.spec("LOKR-8")
@SETTINGS
@given(r=ranks, f=factors, both=st.booleans(), seed=st.integers(0, 100))
def test_gradients(r, f, both, seed):
    """L = Σ G ⊙ Y for one layer (up_proj, 64 x 32): LOKR-8's sums over G_W = Gᵀ X viewed as (a, b, c, d),
    then dWa = dW Wbᵀ, dWb = Waᵀ dW for a decomposed factor; W0 and the inactive adapter get none."""
    model = lc.make_model()
    model.apply_adapter(LoKrConfig(rank=r, alpha=3, factor=f, decompose_both=both, target_modules=("up_proj",)))
    model.apply_adapter(LoKrConfig(rank=2, target_modules=("up_proj",)), "other")
    lc.randomize(model, "default", seed)
    layer = model.net.get_submodule("model.layers.1.mlp.up_proj")
    for p in layer.parameters():  # float64: the formula itself, free of float32 sums with cancellation
        p.data = np.asarray(p.data, np.float64)
    X, G = probe_backward(layer, lc.D, 64, seed)
    d = layer.adapters["default"]
    t, s = lc.leaves(d), d.s
    (a, b), (c, e) = ref_factorization(64, f), ref_factorization(lc.D, f)
    GW = (G.T.astype(np.float64) @ X).reshape(a, b, c, e)
    W = {i: t[f"lokr_w{i}"] if f"lokr_w{i}" in t else t[f"lokr_w{i}_a"] @ t[f"lokr_w{i}_b"] for i in (1, 2)}
    dW = {1: s * np.einsum("ikjl,kl->ij", GW, W[2]), 2: s * np.einsum("ikjl,ij->kl", GW, W[1])}
    for i in (1, 2):
        ref = {f"lokr_w{i}": dW[i]} if f"lokr_w{i}" in t else \
            {f"lokr_w{i}_a": dW[i] @ t[f"lokr_w{i}_b"].T, f"lokr_w{i}_b": t[f"lokr_w{i}_a"].T @ dW[i]}
        for name, g in ref.items():
            assert_close(getattr(d, name).grad, g, 1e-10, label=f"d {name}")
    assert layer.base_layer.weight.grad is None
    assert all(p.grad is None for p in layer.adapters["other"].parameters())


@pytest.mark.spec("LOKR-10")
def test_save_load_keys(tmp_path):
    cfg = LoKrConfig(rank=1, alpha=5, factor=4, decompose_both=True, target_modules=("q_proj", "down_proj"),
                     rank_dropout_scale=True, init_weights="lycoris")
    want = {}
    for i in range(2):
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            want.update({f"base_model.model.model.layers.{i}.{name}.{k}": v
                         for k, v in ref_leaves(*SHAPES[name], 1, 4, True).items()})
    conf = lc.check_save_load(cfg, tmp_path, "LOKR", want)
    assert {k: conf[k] for k in ("decompose_factor", "decompose_both", "rank_dropout_scale", "init_weights")} == \
        {"decompose_factor": 4, "decompose_both": True, "rank_dropout_scale": True, "init_weights": "lycoris"}


BAD = [("rank", 0), ("rank", -2), ("alpha", 0), ("rank_dropout", 1.0), ("module_dropout", -0.5),
       ("factor", 2.5), ("factor", True), ("decompose_both", 1), ("rank_dropout_scale", "yes"),
       ("init_weights", "gaussian"), ("init_weights", 0), ("rank_pattern", {"v_proj": -1})]


@pytest.mark.spec("LOKR-11")
@pytest.mark.parametrize("field,value", BAD)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        LoKrConfig(**{field: value})


@pytest.mark.spec("LOKR-11")
def test_no_target_leaves_model_unchanged():
    model = lc.make_model()
    with pytest.raises(ConfigError, match="target_modules"):
        model.apply_lokr(rank=2, target_modules=r"nothing\..*")
    assert not model.peft_configs and not lc.layers(model, "default")
