"""spec/c3a.md (C3A-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy float64 from
the spec's formula (the block-circulant C entry by entry, not by FFT); and (oracle) against PEFT's C3A on Llama."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import max_rel_err
from minipeft.adapters.c3a import BlockCircularConv, C3AConfig, C3ALinear
from minipeft.autograd.tensor import Tensor
from minipeft.errors import ConfigError
from minipeft.safetensors_io import read_safetensors
from test_dora import SETTINGS, targets
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import IDS as IDS_P
from test_peft_oracle import (base, check_peft_case, check_step_gradients, hf_logits, hf_model,  # noqa: F401
                              lib, perturbed_peft_model, report)

BLOCKS = st.sampled_from([1, 2, 4, 8, 16])  # divide every width of the tiny llama (16, 32, 64)


def circulant_np(K):
    """C (out, in) with block (i, j) C_ij[p, q] = K_ij[(q - p) mod b] (C3A-1), entry by entry in float64."""
    K = np.asarray(K, np.float64)
    m, n, b = K.shape
    C = np.zeros((m * b, n * b))
    for i in range(m):
        for j in range(n):
            for p in range(b):
                C[i * b + p, j * b:(j + 1) * b] = np.roll(K[i, j], p)
    return C


def randomize(model, seed=1, scale=0.5):
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, "default"):
        d = layer.adapters["default"]
        d.c3a_kernel.data = (rng.standard_normal(d.c3a_kernel.shape) * scale).astype(np.float32)


@pytest.mark.spec("C3A-1", "C3A-2", "C3A-5")
@SETTINGS
@given(b=BLOCKS, tm=targets)
def test_forward_and_merge_are_the_block_circulant_update_over_in(b, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_c3a(block_size=b, init="gaussian", target_modules=tm)
    randomize(model)
    updates = {p + ".weight": circulant_np(layer.adapters["default"].c3a_kernel.data) / layer.base_layer.in_features
               for p, layer in layers(model, "default")}
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("C3A-2", "C3A-3")
@SETTINGS
@given(b=st.integers(1, 7), m=st.integers(1, 3), n=st.integers(1, 3), batch=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_the_fft_op_is_C_x_and_its_gradients_are_finite_differences(b, m, n, batch, seed):
    rng = np.random.default_rng(seed)
    x, K, g = rng.standard_normal((batch, n * b)), rng.standard_normal((m, n, b)), rng.standard_normal((batch, m * b))
    C = circulant_np(K)
    X, KK = Tensor(x, requires_grad=True), Tensor(K, requires_grad=True)
    y = BlockCircularConv.apply(X, KK)
    assert np.allclose(y.data, x @ C.T, atol=1e-10)
    (y * Tensor(g)).sum().backward()
    assert np.allclose(X.grad, g @ C, atol=1e-10)  # C^T g
    eps, dK = 1e-6, np.zeros_like(K)
    for idx in np.ndindex(K.shape):
        e = np.zeros_like(K)
        e[idx] = eps
        dK[idx] = (np.sum(x @ circulant_np(K + e).T * g) - np.sum(x @ circulant_np(K - e).T * g)) / (2 * eps)
    assert np.allclose(KK.grad, dK, atol=1e-6)


@pytest.mark.spec("C3A-4")
def test_inits_draw_from_the_stated_distributions():
    model = make_model()
    before = model(IDS).numpy()
    model.apply_c3a(block_size=8, init="zeros", target_modules=("q_proj", "up_proj"))
    assert np.array_equal(model(IDS).numpy(), before)
    for init, bound in [("xavier_uniform", lambda n, m: np.sqrt(6 / (n + m))), ("kaiming_uniform", lambda n, m: 1 / np.sqrt(n))]:
        model = make_model()
        model.apply_c3a(block_size=2, init=init, target_modules=("up_proj",))  # in 32, out 64
        K = np.concatenate([np.asarray(d.adapters["default"].c3a_kernel.data).ravel() for _, d in layers(model, "default")])
        assert np.abs(K).max() <= bound(32, 64) and np.abs(K).max() > 0.95 * bound(32, 64)
        assert max_rel_err(model(IDS), before) > 1e-4
    model = make_model()
    model.apply_c3a(block_size=1, init="gaussian", target_modules=("up_proj",))
    K = np.concatenate([np.asarray(d.adapters["default"].c3a_kernel.data).ravel() for _, d in layers(model, "default")])
    assert abs(K.std() - 1) < 0.05 and abs(K.mean()) < 0.05  # 2 x 2048 draws


@pytest.mark.spec("C3A-6")
def test_only_the_kernels_train_and_the_count_is_out_in_over_b():
    model = make_model()
    model.apply_c3a(block_size=8, block_size_pattern={"v_proj": 16}, target_modules=("q_proj", "v_proj"))
    model(IDS).sum().backward()
    trained = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(".c3a_kernel") for n in trained)
    assert all(p.grad is not None and np.abs(p.grad).max() > 0 for p in trained.values())
    shapes = {p.split(".")[-1]: layer.adapters["default"].c3a_kernel.shape for p, layer in layers(model, "default")}
    assert shapes == {"q_proj": (4, 4, 8), "v_proj": (1, 2, 16)}
    assert model.parameter_counts()[0] == 2 * (32 * 32 // 8 + 16 * 32 // 16)


@pytest.mark.spec("C3A-6")
@pytest.mark.parametrize("kwargs, field", [(dict(block_size=0), "block_size"), (dict(block_size_pattern={"q": 0}), "block_size_pattern"),
                                           (dict(init=True), "init"), (dict(init="pissa"), "init"), (dict(bias="lora_only"), "bias")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        C3AConfig(**kwargs)


@pytest.mark.spec("C3A-6")
def test_a_block_size_that_does_not_divide_and_conv1d_and_4bit_are_refused():
    model = make_model()
    with pytest.raises(ConfigError, match=r"block_size \(for model.layers.0.self_attn.v_proj\)=32.*out_features 16.*16"):
        model.apply_c3a(block_size=32, target_modules=("v_proj",))

    class Conv1DLike:
        fan_in_fan_out, in_features, out_features = True, 8, 8
    with pytest.raises(ConfigError, match="Conv1D"):
        C3ALinear.create(Conv1DLike(), C3AConfig(block_size=2), "h.0.attn.c_attn", None)
    q = mp.load_model(mp.DEMO_MODEL, quantization=mp.QuantizationConfig(compute_dtype="float32"))
    with pytest.raises(ConfigError, match="float Linear"):
        q.apply_c3a(block_size=16)


@pytest.mark.spec("C3A-2", "C3A-3")
def test_model_train_lowers_the_loss():
    """assert_training_lowers_the_loss's eight words at lr 0.3 (dW = C / in: the kernels act on W through a
    factor 1 / in) for 16 epochs: the last four losses average < 0.6 x the first."""
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_c3a(block_size=16)
    data = [{"prompt": f"next {w} =", "completion": " " + "".join(chr(ord(c) + 1) for c in w)}
            for w in ["abc", "hello", "cat", "dog", "pen", "map", "sky", "tree"]]
    h = model.train(data, mp.TrainingConfig(learning_rate=0.3, batch_size=4, epochs=16, progress=False))
    assert np.mean(h["loss"][-4:]) < 0.6 * h["loss"][0]


@pytest.mark.spec("C3A-7")
def test_saved_keys_and_fields_are_peft_names(tmp_path):
    model = make_model()
    model.apply_c3a(block_size=8, init="kaiming_uniform", bias="c3a_only", target_modules=("q_proj",))
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "C3A" and cfg["block_size"] == 8 and cfg["init_weights"] == "kaiming_uniform"
    assert cfg["block_size_pattern"] == {} and "exclude_modules" not in cfg
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in keys.items()} == {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.{k}": s for i in (0, 1)
        for k, s in (("c3a_kernel", (4, 4, 8)), ("base_layer.bias", (32,)))}
    assert C3AConfig.from_peft(dict(cfg, init_weights=True)).init == "zeros"
    assert C3AConfig.from_peft(dict(cfg, init_weights=False)).init == "xavier_uniform"


# ---- against PEFT (test_peft_oracle.py's tiny random Llama, every trainable tensor perturbed) ------------------
TM = ["q_proj", "v_proj", "down_proj"]
CASES = {"default": ("llama", dict(block_size=8, target_modules=TM)),
         "gaussian": ("llama", dict(block_size=4, init_weights="gaussian", block_size_pattern={"down_proj": 16},
                                    target_modules=TM)),
         "bias": ("llama", dict(block_size=16, init_weights="kaiming_uniform", bias="c3a_only",
                                target_modules=["q_proj", "k_proj"]))}


def plain_fft_conv(torch):
    """PEFT's BlockCircularConvolution forward with torch's own autograd (no custom backward)."""
    from torch.fft import fft, ifft

    class Plain:
        @staticmethod
        def apply(x, w):
            _, n, b = w.shape
            y = fft(torch.einsum("...nb,mnb->...mb", ifft(x.reshape(*x.shape[:-1], n, b)), fft(w))).real
            return y.reshape(*y.shape[:-2], -1)
    return Plain


@pytest.mark.oracle
@pytest.mark.spec("C3A-1", "C3A-2", "C3A-5", "C3A-6", "C3A-7")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, tmp_path, case):
    check_peft_case(lib, base, CASES[case], "C3AConfig", C3AConfig, tmp_path, f"C3A {case}")  # every tensor moved


@pytest.mark.oracle
@pytest.mark.spec("C3A-1")
def test_peft_s_circulant_is_the_formula(lib):
    torch = lib[0]
    from peft.tuners.c3a.utils import get_circulant_fast
    K = np.random.default_rng(0).standard_normal((2, 3, 5))
    assert np.allclose(get_circulant_fast(torch.tensor(K)).numpy(), circulant_np(K), atol=1e-12)


@pytest.mark.oracle
@pytest.mark.spec("C3A-3")
def test_peft_s_custom_input_gradient_is_not_C_transpose_g_and_ours_is(lib):
    torch = lib[0]
    from peft.tuners.c3a.utils import BlockCircularConvolution
    rng = np.random.default_rng(0)
    x, K = torch.tensor(rng.standard_normal((3, 12)), requires_grad=True), torch.tensor(rng.standard_normal((2, 3, 4)))
    assert not torch.autograd.gradcheck(lambda a: BlockCircularConvolution.apply(a, K), (x,), raise_exception=False)
    assert torch.autograd.gradcheck(lambda a: plain_fft_conv(torch).apply(a, K), (x,))
    g = rng.standard_normal((3, 8))
    X = Tensor(x.detach().numpy(), requires_grad=True)
    (BlockCircularConv.apply(X, Tensor(K.numpy())) * Tensor(g)).sum().backward()
    want, = torch.autograd.grad((plain_fft_conv(torch).apply(x, K) * torch.tensor(g)).sum(), (x,))
    assert np.allclose(X.grad, want.numpy(), atol=1e-10)


@pytest.mark.oracle
@pytest.mark.spec("C3A-3")
@pytest.mark.parametrize("case", ["default", "gaussian"])
def test_training_step_gradients_equal_torch_autograd_through_peft_s_forward(lib, base, tmp_path, case, monkeypatch):
    import peft.tuners.c3a.layer as c3a_layer
    monkeypatch.setattr(c3a_layer, "BlockCircularConvolution", plain_fft_conv(lib[0]))
    pm = perturbed_peft_model(lib, base, CASES[case], "C3AConfig").eval()
    check_step_gradients(lib, pm, base(CASES[case][0]), tmp_path, "c3a_kernel", f"C3A {case}")


@pytest.mark.oracle
@pytest.mark.spec("C3A-4")
def test_zeros_init_is_the_base_in_both_and_the_default_is_not(lib, base):
    peft, (kind, kw) = lib[2], CASES["default"]
    hf = peft.get_peft_model(hf_model(lib, base(kind)), peft.C3AConfig(task_type="CAUSAL_LM", **dict(kw, init_weights=True))).eval()
    with hf.disable_adapter():
        want = hf_logits(lib, hf)
    report("C3A PEFT zeros init vs base", max_rel_err(hf_logits(lib, hf), want))
    model = mp.load_model(base(kind))
    model.apply_adapter(C3AConfig.from_peft(dict(peft_type="C3A", **kw, init_weights=True)))
    report("C3A minipeft zeros init vs base", max_rel_err(model(IDS_P), want))
    default = peft.get_peft_model(hf_model(lib, base(kind)), peft.C3AConfig(task_type="CAUSAL_LM", **kw)).eval()
    assert max_rel_err(hf_logits(lib, default), want) > 1e-4


@pytest.mark.oracle
@pytest.mark.spec("C3A-6")
@pytest.mark.parametrize("kind, kw", [("llama", dict(block_size=32, target_modules=["v_proj"])),
                                      ("gpt2", dict(block_size=4, target_modules=["c_attn"]))])
def test_what_peft_refuses_minipeft_refuses(lib, base, kind, kw):
    peft = lib[2]
    with pytest.raises((ValueError, TypeError)):
        peft.get_peft_model(hf_model(lib, base(kind)), peft.C3AConfig(task_type="CAUSAL_LM", **kw))
    with pytest.raises(ConfigError):
        mp.load_model(base(kind)).apply_adapter(C3AConfig.from_peft(dict(peft_type="C3A", **kw)))
