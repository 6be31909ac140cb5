"""spec/waveft.md (WAVEFT-n) on tiny random Llama models built in-process (test_lora.py's set-up)
and on one random Linear / GPT-2 Conv1D layer (one_layer.py).

Each claim is rebuilt in NumPy (float64) from the spec's words, not from the code under test: the
grid padded as PEFT's WAVELET_REDUCTIONS, its 4 quadrants upsampled by 2 and filtered with
lo(x)lo, hi(x)lo, lo(x)hi, hi(x)hi (waverec2d's transposed convolution, written as strided adds),
L - 2 dropped each end, centre crop; the positions from test_backend.py's fisher_yates_prefix."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lycoris_checks as lc
from helpers import assert_close
from one_layer import check_on_the_backend, probe_backward, random_base, train_next
from minipeft import backend
from minipeft.adapters.base import AdaptedLayer
from minipeft.adapters.waveft import REC_LO, REFUSED, WaveFTConfig, WaveFTLinear
from minipeft.autograd import Tensor
from minipeft.errors import ConfigError
from minipeft.safetensors_io import read_safetensors
from test_backend import fisher_yates_prefix
from test_fourierft import check_trainable_count_with_pattern
from test_dora import SETTINGS, targets  # 12 examples, no shrinking; 1-3 target names
from test_lora import IDS, SHAPES, layers, make_model
from test_peft_oracle import (base, check_both_ways_and_merged, check_step_gradients, hf_model, lib,  # noqa: F401
                              perturbed_peft_model, report, report_init_is_base)
import minipeft as mp

FAMILIES = st.sampled_from(sorted(REC_LO))


def idwt_np(S, lo):
    """WAVEFT-3: one level of the 2-D inverse DWT of the (P, Q) grid S, before the centre crop."""
    lo = np.asarray(lo, np.float64)
    L = len(lo)
    hi = np.array([(-1) ** i * lo[L - 1 - i] for i in range(L)])
    P, Q = S.shape
    h, w = P // 2, Q // 2
    full = np.zeros((P + L - 2, Q + L - 2))
    bands = ((S[:h, :w], lo, lo), (S[:h, w:], hi, lo), (S[h:, :w], lo, hi), (S[h:, w:], hi, hi))  # cA cH cV cD
    for X, fr, fc in bands:
        for k in range(L):
            for j in range(L):
                full[k:k + 2 * h:2, j:j + 2 * w:2] += X * fr[k] * fc[j]
    return full[L - 2:full.shape[0] - (L - 2), L - 2:full.shape[1] - (L - 2)]


def delta_np(d, u=None, v=None, family=None, use_idwt=None):
    """WAVEFT-2, WAVEFT-3 in float64 from the layer's coefficients and the seeded positions, (out, in)."""
    out, n_in = d.shape
    c = np.asarray(d.waveft_spectrum.data, np.float64)
    if u is None:
        u, v, family, use_idwt = d.ref
    if not use_idwt:
        S = np.zeros((out, n_in))
        S[u, v] = c
        return d.s * S
    L = len(REC_LO[family])
    P, Q = out + L - 2, n_in + L - 2
    P, Q = P + P % 2, Q + Q % 2
    S = np.zeros((P, Q))
    S[u + (P - out) // 2, v + (Q - n_in) // 2] = c
    full = idwt_np(S, REC_LO[family])
    a, b = (full.shape[0] - out) // 2, (full.shape[1] - n_in) // 2
    return d.s * full[a:a + out, b:b + n_in]


def positions(out, n_in, n_f, seed):
    """WAVEFT-1 rebuilt: (u, v) of the first n_f entries of the seeded shuffle of range(out * in)."""
    p = fisher_yates_prefix(out * n_in, n_f, seed)
    return p // n_in, p % n_in


def tag(model, cfg):
    """Remember each layer's rebuilt positions and wavelet on its delta for delta_np."""
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        out, n_in = d.shape
        d.ref = (*positions(out, n_in, len(d.waveft_spectrum.data), cfg.random_loc_seed), cfg.wavelet_family, cfg.use_idwt)


def perturb(model, name="default", seed=1):
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, name):
        d = layer.adapters[name]
        d.waveft_spectrum.data = rng.standard_normal(d.waveft_spectrum.shape).astype(np.float32)
        if not hasattr(d, "ref"):
            out, n_in = d.shape
            cfg = model.peft_configs[name]
            d.ref = (*positions(out, n_in, len(d.waveft_spectrum.data), cfg.random_loc_seed), cfg.wavelet_family,
                     cfg.use_idwt)


# ---- WAVEFT-1, WAVEFT-5 ---------------------------------------------------------------------------------------
@pytest.mark.spec("WAVEFT-1", "WAVEFT-5")
@SETTINGS
@given(n_f=st.integers(1, 512), tm=targets, seed=st.integers(0, 2**64 - 1), init=st.booleans(), family=FAMILIES)
def test_init_and_positions(n_f, tm, seed, init, family):
    model = make_model()
    before = model(IDS).data
    cfg = WaveFTConfig(n_frequency=n_f, target_modules=tm, random_loc_seed=seed, init_weights=init, wavelet_family=family,
                       use_idwt=False)
    model.apply_waveft(cfg)
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        out, n_in = SHAPES[path.split(".", 3)[3]]
        c = np.asarray(d.waveft_spectrum.data)
        assert c.dtype == np.float32 and c.shape == (n_f,)
        # use_idwt=False: the grid is the weight, so dW's nonzeros sit exactly at the seeded positions
        d.waveft_spectrum.data = np.arange(1, n_f + 1, dtype=np.float32)
        u, v = positions(out, n_in, n_f, seed)
        want = np.zeros((out, n_in))
        want[u, v] = np.arange(1, n_f + 1) * d.s
        assert_close(d.delta_weight(), want, 1e-6, label="sparse dW")
        d.waveft_spectrum.data = c
        if init:
            assert not c.any()
        elif n_f >= 64:  # N(0, 0.01^2): mean and spread within 5 standard errors
            assert abs(c.mean()) < 5 * 0.01 / np.sqrt(n_f) and abs(c.std() / 0.01 - 1) < 5 / np.sqrt(2 * n_f)
    if init:
        assert np.array_equal(model(IDS).data, before)
    else:
        assert not np.array_equal(model(IDS).data, before)


# ---- WAVEFT-2, WAVEFT-3, WAVEFT-4, WAVEFT-6 ----------------------------------------------------------------------
@pytest.mark.spec("WAVEFT-2", "WAVEFT-3", "WAVEFT-4")
@SETTINGS
@given(n_f=st.integers(1, 512), tm=targets, s=st.floats(0.1, 300), bias=st.booleans(), two=st.booleans(),
       family=FAMILIES, use_idwt=st.booleans())
def test_forward_is_effective_weight_and_adapters_add(n_f, tm, s, bias, two, family, use_idwt):
    lc.check_forward_adds(WaveFTConfig(n_frequency=n_f, scaling=s, target_modules=tm, bias="all" if bias else "none",
                                       wavelet_family=family, use_idwt=use_idwt),
                          WaveFTConfig(n_frequency=7, target_modules=("q_proj", "down_proj"), random_loc_seed=5,
                                       wavelet_family="db2"),
                          two, perturb, delta_np, "WaveFT logits")


@pytest.mark.spec("WAVEFT-6")
@SETTINGS
@given(n_f=st.integers(1, 512), tm=targets, family=FAMILIES)
def test_merge_unmerge(n_f, tm, family):
    lc.check_merge_unmerge(WaveFTConfig(n_frequency=n_f, scaling=3.0, target_modules=tm, wavelet_family=family),
                           perturb, delta_np)


@pytest.mark.spec("WAVEFT-3")
@pytest.mark.parametrize("family", sorted(REC_LO))
def test_one_coefficient_is_an_outer_product_of_filters(family):
    """A lone cA coefficient at grid (i, j) gives s lo(x)lo placed at (2i, 2j) - (L - 2) - crop: the filter
    taps themselves; and the filters are orthonormal under even shifts with sum lo = sqrt(2) (all but PEFT's
    coif4 table, which is neither: test_coif1_to_coif3_are_the_coiflets_from_their_definition)."""
    lo = np.asarray(REC_LO[family])
    for j in range(len(lo) // 2 if family != "coif4" else 0):  # sum_k lo_k lo_{k+2j} = [j = 0]
        assert abs(np.dot(lo[:len(lo) - 2 * j], lo[2 * j:]) - (j == 0)) < 1e-10
    assert abs(np.sum(lo) - np.sqrt(2)) < 1e-12 or family == "coif4"
    out, n_in, L = 12, 9, len(lo)
    P, Q = out + L - 2, n_in + L - 2 + 1  # 9 + L - 2 is odd: PEFT pads one more
    u, v = 1, 1  # weight position (1, 1): grid (i, j) below, in cA for every family here
    i, j = u + (P - out) // 2, v + (Q - n_in) // 2
    assert i < P // 2 and j < Q // 2
    d = WaveFTLinear(n_in, out, [u * n_in + v], 2.0, family)
    d.waveft_spectrum.data = np.ones(1, np.float32)
    want = np.zeros((out, n_in))
    a0, b0 = 2 * i - (L - 2) - (P - L + 2 - out) // 2, 2 * j - (L - 2) - (Q - L + 2 - n_in) // 2
    for k in range(L):
        for j in range(L):
            if 0 <= a0 + k < out and 0 <= b0 + j < n_in:
                want[a0 + k, b0 + j] = 2.0 * lo[k] * lo[j]
    assert_close(d.delta_weight(), want, 1e-6, label=f"{family} lone coefficient")


# ---- WAVEFT-7 ---------------------------------------------------------------------------------------------------
@pytest.mark.spec("WAVEFT-3", "WAVEFT-4", "WAVEFT-6", "WAVEFT-7")
@SETTINGS
@given(n_f=st.integers(1, 240), fan_in_fan_out=st.booleans(), seed=st.integers(0, 9), family=FAMILIES,
       use_idwt=st.booleans())
def test_one_layer_conv1d_forward_merge_and_gradients(n_f, fan_in_fan_out, seed, family, use_idwt):
    n_in, n_out = 12, 20
    rng = np.random.default_rng(seed)
    base, W0 = random_base(fan_in_fan_out, rng, n_in, n_out)
    base.requires_grad_(False)
    layer = AdaptedLayer(base)
    cfg = WaveFTConfig(n_frequency=n_f, scaling=7.0, init_weights=False, wavelet_family=family, use_idwt=use_idwt)
    layer.adapters["default"] = d = WaveFTLinear.create(base, cfg, "c_attn", backend.RNG(0))
    layer.active = ["default"]
    u, v = positions(n_out, n_in, n_f, cfg.random_loc_seed)
    dW = delta_np(d, u, v, family, use_idwt)
    X, G = probe_backward(layer, n_in, n_out)
    # dW is linear in c: dL/dc_k = <G^T X, dW(e_k)>, each unit coefficient's weight from the reference
    Gw = G.T.astype(np.float64) @ X  # (out, in): dL/d(dW)
    c = np.asarray(d.waveft_spectrum.data).copy()
    ref = []
    for k in range(n_f):
        d.waveft_spectrum.data = np.eye(n_f, dtype=np.float32)[k]
        ref.append(np.sum(Gw * delta_np(d, u, v, family, use_idwt)))
    d.waveft_spectrum.data = c
    assert_close(d.waveft_spectrum.grad, np.array(ref), 1e-5, label="dc")
    assert base.weight.grad is None
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    assert_close(layer(Tensor(x)), x @ (W0 + dW).T + base.bias.data, 1e-5, label="WaveFT forward")
    layer.merge("default")
    assert_close(base.weight.data, (W0 + dW).T if fan_in_fan_out else W0 + dW, 1e-6, label="merged stored weight")
    layer.unmerge("default")
    assert_close(base.weight.data, W0.T if fan_in_fan_out else W0, 1e-6, label="unmerged")


@pytest.mark.spec("WAVEFT-7")
@SETTINGS
@given(n_f=st.integers(1, 512), tm=targets, pattern=st.integers(1, 300))
def test_trainable_count_with_pattern(n_f, tm, pattern):
    check_trainable_count_with_pattern(WaveFTConfig, n_f, tm, pattern)


@pytest.mark.spec("WAVEFT-3", "WAVEFT-4", "WAVEFT-7")
@pytest.mark.parametrize("family", ["db1", "db2"])
def test_array_api_only(any_backend, family):
    def make(base):
        d = WaveFTLinear.create(base, WaveFTConfig(n_frequency=50, wavelet_family=family), "q", backend.RNG(0))
        d.ref = (*positions(base.out_features, base.in_features, 50, 777), family, True)
        return d
    check_on_the_backend(make, delta_np, "waveft_spectrum")


# ---- WAVEFT-8 ---------------------------------------------------------------------------------------------------
@pytest.mark.spec("WAVEFT-8")
def test_save_load_keys_and_config(tmp_path):
    model = make_model()
    cfg = WaveFTConfig(n_frequency=40, scaling=12.5, random_loc_seed=9, target_modules=("q_proj", "up_proj"),
                       n_frequency_pattern={"up_proj": 80}, wavelet_family="db2")
    model.apply_waveft(cfg)
    perturb(model)
    model.save_adapters(str(tmp_path))
    saved, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    want = {f"base_model.model.model.layers.{i}.{m}.waveft_spectrum": (n,)
            for i in range(2) for m, n in (("self_attn.q_proj", 40), ("mlp.up_proj", 80))}
    assert {k: tuple(v.shape) for k, v in saved.items()} == want
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["peft_type"] == "WAVEFT" and conf["n_frequency"] == 40 and conf["scaling"] == 12.5
    assert conf["random_loc_seed"] == 9 and conf["n_frequency_pattern"] == {"up_proj": 80}
    assert conf["wavelet_family"] == "db2" and conf["use_idwt"] is True and conf["init_weights"] is True
    again = make_model(seed=0)
    again.load_adapters(str(tmp_path))
    assert again.peft_configs["default"] == cfg
    assert np.array_equal(again(IDS).data, model(IDS).data)


# ---- WAVEFT-9 ---------------------------------------------------------------------------------------------------
@pytest.mark.spec("WAVEFT-9")
@pytest.mark.parametrize("kw, match", [
    (dict(wavelet_family="db11"), "wavelet_family='db11'.*db1, db2, db3.*db10, sym2, .*sym10, coif1, .*coif4"),
    (dict(wavelet_family="haar"), "wavelet_family='haar'.*db1, db2"),
    (dict(wavelet_family="coif5"), "wavelet_family='coif5'.*48 taps.*use coif4"),
    (dict(proportional_parameters="yes"), "proportional_parameters"),
    (dict(n_frequency=0), "n_frequency"), (dict(n_frequency=2.5), "n_frequency"),
    (dict(n_frequency_pattern={"q_proj": 0}), "n_frequency_pattern"), (dict(random_loc_seed=-1), "random_loc_seed"),
    (dict(bias="fourier_only"), "bias.*waveft_only")])
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        WaveFTConfig(**kw)


@pytest.mark.spec("WAVEFT-9")
def test_n_frequency_above_in_times_out_names_the_layer():
    model = make_model()
    with pytest.raises(ConfigError, match=r"n_frequency=513.*in \* out = 512 of model\.layers\.0\.self_attn\.v_proj"):
        model.apply_waveft(n_frequency=513, target_modules=("v_proj",))
    model.apply_waveft(n_frequency=512, target_modules=("v_proj",), wavelet_family="db2")  # every entry: allowed


# ---- against PEFT (test_peft_oracle.py's tiny random Llama and GPT-2, every waveft_spectrum entry moved) ----------
ORACLE = {"db2_pattern": ("llama", dict(n_frequency=64, scaling=5.0, wavelet_family="db2", random_loc_seed=3,
                                        target_modules=["q_proj", "v_proj", "up_proj"],
                                        n_frequency_pattern={"v_proj": 32, r"layers\.1\.mlp\.up_proj": 2048})),
          "sym2_random": ("llama", dict(n_frequency=100, scaling=3.0, wavelet_family="sym2", init_weights=False,
                                        bias="waveft_only", target_modules=["q_proj", "k_proj"])),
          "sparse": ("llama", dict(n_frequency=150, scaling=2.0, use_idwt=False, target_modules=["q_proj", "o_proj"])),
          "proportional": ("llama", dict(n_frequency=90, scaling=2.0, wavelet_family="sym5",
                                         proportional_parameters=True,
                                         target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
                                         n_frequency_pattern={"k_proj": 7})),  # the pattern: unused, as in PEFT
          "gpt2_db1": ("gpt2", dict(n_frequency=80, scaling=4.0, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
          "gpt2_db2": ("gpt2", dict(n_frequency=50, scaling=4.0, wavelet_family="db2", target_modules=["c_attn", "c_proj"],
                                    fan_in_fan_out=True)),
          "gpt2_coif3_proportional": ("gpt2", dict(n_frequency=40, scaling=4.0, wavelet_family="coif3",
                                                   proportional_parameters=True, fan_in_fan_out=True,
                                                   target_modules=["c_attn", "c_proj", "c_fc"]))}
# PEFT's own gpt2 default (mlp.c_proj), fan_in_fan_out left False: PEFT warns and forces it True on Conv1D
ORACLE["gpt2_default_targets"] = ("gpt2", dict(n_frequency=60, scaling=4.0, wavelet_family="sym3"))
# every family PEFT runs, on the same layers (three shapes: q 32 x 32, v 16 x 32, down 32 x 64)
ORACLE.update({family: ("llama", dict(n_frequency=120, scaling=2.0, wavelet_family=family,
                                      target_modules=["q_proj", "v_proj", "down_proj"])) for family in REC_LO})


@pytest.mark.oracle
@pytest.mark.spec("WAVEFT-1", "WAVEFT-2", "WAVEFT-3", "WAVEFT-4", "WAVEFT-6", "WAVEFT-7", "WAVEFT-8", "WAVEFT-10")
@pytest.mark.parametrize("case", list(ORACLE))  # each family of REC_LO is a case
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, case, tmp_path):
    pm = perturbed_peft_model(lib, base, ORACLE[case], "WaveFTConfig").eval()
    count = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert all(p.abs().min() > 0 for n, p in pm.named_parameters() if "waveft_spectrum" in n)  # every entry moved
    indices = {name.removeprefix("base_model.model."): m.waveft_indices["default"].numpy()
               for name, m in pm.named_modules() if "default" in getattr(m, "waveft_indices", {})}
    check_both_ways_and_merged(lib, pm, base(ORACLE[case][0]), tmp_path, f"WaveFT {case}")  # pm is unloaded after
    model = mp.load_model(base(ORACLE[case][0]))
    model.load_adapters(str(tmp_path / "peft"))
    assert type(model.peft_configs["default"]) is WaveFTConfig
    assert model.parameter_counts()[0] == count
    assert indices and len(indices) == len(layers(model, "default"))
    for name, theirs in indices.items():  # PEFT's (2, n_f) indices = the seeded positions here
        d = model.net.get_submodule(name).adapters["default"]
        out, n_in = d.shape
        assert np.array_equal(theirs, np.stack(positions(out, n_in, len(d.waveft_spectrum.data),
                                                         model.peft_configs["default"].random_loc_seed)))
    if ORACLE[case][1].get("proportional_parameters"):  # WAVEFT-10: shares of several sizes, not n_frequency each
        assert len({len(t[0]) for t in indices.values()}) > 1


@pytest.mark.oracle
@pytest.mark.spec("WAVEFT-3")
def test_filters_are_peft_s(lib):
    """Daubechies' construction gives PEFT's (PyWavelets') reconstruction filters db1..db10, with the recorded root
    choices its sym2..sym10; the coiflet table is PEFT's; coif5 (broken in PEFT) is the one family refused."""
    from peft.tuners.waveft.constants import WAVELET_REDUCTIONS
    from peft.tuners.waveft.wavelet import wavelist, Wavelet
    runs = [f for f in wavelist() if f in WAVELET_REDUCTIONS]  # PEFT's config and its Wavelet both accept these
    assert sorted(runs) == sorted([*REC_LO, *REFUSED])
    for family, lo in REC_LO.items():
        assert np.abs(np.asarray(lo) - np.asarray(Wavelet(family).rec_lo)).max() < 1e-10, family
        assert WAVELET_REDUCTIONS[family] == (len(lo) - 2,) * 2, family  # WAVEFT-2's padding
    assert len(Wavelet("coif5").rec_lo) == 48 and WAVELET_REDUCTIONS["coif5"] == (28, 28)


def coiflet_conditions(h):
    """The residuals of the coiflet equations (COIFLETS' comment in waveft.py) for h of length 6K."""
    L, K = len(h), len(h) // 6
    k, sign = np.arange(L) - 2 * K, (-1.0) ** np.arange(L)
    return np.array([h.sum() - np.sqrt(2)] + [h[:L - 2 * m] @ h[2 * m:] - (m == 0) for m in range(3 * K)]
                    + [(k ** j * h).sum() for j in range(1, 2 * K)] + [(sign * k ** j * h).sum() for j in range(2 * K)])


@pytest.mark.spec("WAVEFT-3")
@pytest.mark.parametrize("K", [1, 2, 3])
def test_coif1_to_coif3_are_the_coiflets_from_their_definition(K):
    """The table's coif<K> solves the coiflet equations, and is the solution Levenberg-Marquardt reaches from
    sqrt(2) delta_(2K) (re-solved here); PEFT's coif4 is not a coiflet (and not orthonormal)."""
    scipy_optimize = pytest.importorskip("scipy.optimize")
    lo = np.asarray(REC_LO[f"coif{K}"])
    assert np.abs(coiflet_conditions(lo)).max() < 1e-13
    h0 = np.zeros(6 * K)
    h0[2 * K] = np.sqrt(2)
    solved = scipy_optimize.least_squares(coiflet_conditions, h0, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15).x
    assert np.abs(solved - lo).max() < 1e-10  # the solver stops within ~3e-12 of the table
    coif4 = np.asarray(REC_LO["coif4"])
    assert abs(coif4.sum() - 1.4485) < 1e-4 and abs(coif4 @ coif4 - 1) > 1e-3


@pytest.mark.spec("WAVEFT-10")
@SETTINGS
@given(st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64)), min_size=1, max_size=6), st.integers(1, 300))
def test_proportional_parameters_shares(shapes, n_f):
    """n_f proportional to in * out, at least 1, n_frequency per layer on average up to rounding; off: n_f each."""
    paths = {f"layers.{i}.proj": s for i, s in enumerate(shapes)}
    cfg = WaveFTConfig(n_frequency=n_f, proportional_parameters=True, n_frequency_pattern={"proj": 3})
    got = cfg.n_frequency_all(paths)
    total = sum(n * m for n, m in shapes)
    for p, (n, m) in paths.items():
        share = n * m / total * n_f * len(shapes)
        assert got[p] >= 1 and (got[p] == 1 or abs(got[p] - share) <= 0.5)
    assert WaveFTConfig(n_frequency=n_f).n_frequency_all(paths) == dict.fromkeys(paths, n_f)


@pytest.mark.oracle
@pytest.mark.spec("WAVEFT-7")
@pytest.mark.parametrize("case", ["db1", "db2_pattern", "db10", "sym7", "coif2", "proportional", "gpt2_db2"])
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    check_step_gradients(lib, perturbed_peft_model(lib, base, ORACLE[case], "WaveFTConfig").eval(),
                         base(ORACLE[case][0]), tmp_path, "waveft_spectrum", f"WaveFT {case}")


@pytest.mark.oracle
@pytest.mark.spec("WAVEFT-5")
@pytest.mark.parametrize("case", ["db1", "gpt2_db2"])
def test_peft_default_init_is_the_base_and_counts_agree(lib, base, case):
    kind, kw = ORACLE[case]
    hf, model, _ = report_init_is_base(lib, base(kind), "WaveFTConfig", kw,
                                       WaveFTConfig.from_peft(dict(peft_type="WAVEFT", **kw)), f"WaveFT {case}")
    assert model.parameter_counts()[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)


@pytest.mark.oracle
@pytest.mark.spec("WAVEFT-9")
def test_n_frequency_above_in_times_out_and_unknown_wavelet_are_refused_like_peft(lib, base):
    peft = lib[2]
    kw = dict(n_frequency=32 * 32 + 1, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="n_frequency"):
        peft.get_peft_model(hf_model(lib, base()), peft.WaveFTConfig(task_type="CAUSAL_LM", **kw))
    with pytest.raises(ConfigError, match="n_frequency.*1024"):
        mp.load_model(base()).apply_adapter(WaveFTConfig(**kw))
    with pytest.raises(ValueError, match="not supported"):
        peft.WaveFTConfig(wavelet_family="db99")
    with pytest.raises(ConfigError, match="db1, db2, db3.*sym2.*coif4"):
        WaveFTConfig.from_peft(dict(peft_type="WAVEFT", wavelet_family="db99"))


@pytest.mark.spec("WAVEFT-4", "WAVEFT-7")
def test_training_moves_the_coefficients_and_lowers_the_loss():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_waveft(n_frequency=256, scaling=5.0, wavelet_family="db2", target_modules="all-linear")
    h = train_next(model)
    assert h["loss"][-1] < 0.8 * h["loss"][0]
    for _, layer in layers(model, "default"):  # from c = 0, every layer's coefficients moved
        assert np.abs(np.asarray(layer.adapters["default"].waveft_spectrum.data)).max() > 0
