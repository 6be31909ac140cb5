"""spec/qlora.md (QLORA-n) on tiny random models built in process, without torch.

References are rebuilt in NumPy from the spec: rd() below rounds to bfloat16 by bit arithmetic and
to float16 through np.float16, independently of minipeft.backend; the dequantized weight comes from
nf4_dequantize, which spec/nf4.md and tests/test_nf4.py cover. Whole-model claims compare with a
plain float model whose weights are dequant(t) (+ s B A): QLoRA is right when the 4-bit model
computes what that float model computes."""
import json
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import minipeft as mp
from helpers import TINY_LLAMA, assert_close, tiny_llama
from minipeft.adapters.base import AdaptedLayer
from minipeft.autograd import Tensor
from minipeft.errors import CheckpointError, ConfigError, MiniPeftError
from minipeft.models.config import config_from_dict
from minipeft.models.gpt2 import GPT2LMHeadModel
from minipeft.nn.layers import Conv1D, Linear
from minipeft.nn.optim import AdamW
from minipeft.quant import NF4Tensor
from minipeft.quant.linear4bit import Linear4bit, quantize_model

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck),
                    phases=(Phase.explicit, Phase.reuse, Phase.generate))
IDS = np.random.default_rng(3).integers(0, TINY_LLAMA["vocab_size"], (2, 7))
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
F32 = mp.QuantizationConfig(compute_dtype="float32")


def rd(a, cd):
    """a rounded to the compute dtype cd (nearest-even), as float32."""
    a = np.asarray(a, dtype=np.float32)
    if cd == "float16":
        return a.astype(np.float16).astype(np.float32)
    if cd == "bfloat16":
        bits = a.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.astype(np.uint32).view(np.float32)
    return a


ULP = {"float32": 1e-6, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}  # one unit of cd, relative


def quantized_llama(qcfg=F32, seed=0, **overrides):
    m = tiny_llama(seed, **overrides)
    quantize_model(m.net, qcfg)
    return m


def linear4bit_paths(net):
    return [p for p, m in net.named_modules() if isinstance(m, Linear4bit)]


def float_twin(model4, deltas=None):
    """A plain float llama with model4's float weights and W = dequant(t) (+ deltas[path]) per 4-bit layer."""
    twin = tiny_llama()
    params = dict(twin.net.named_parameters())
    for name, p in model4.net.named_parameters():
        if ".adapters." not in name:
            params[name.replace(".base_layer", "")].data = np.array(p.data)
    for path in linear4bit_paths(model4.net):
        layer = model4.net.get_submodule(path)
        W = np.asarray(mp.nf4_dequantize(layer.weight), dtype=np.float32)
        target = path.replace(".base_layer", "")
        twin.net.get_submodule(target).weight.data = W + (deltas or {}).get(target, 0.0)
    return twin


def randomize_lora(model, seed=1, scale=0.2):
    """Random nonzero A and B; returns {layer path: s B A} rebuilt in NumPy."""
    rng, deltas = np.random.default_rng(seed), {}
    for path, m in model.net.named_modules():
        if isinstance(m, AdaptedLayer):
            d = m.adapters["default"]
            d.lora_A.weight.data = (rng.standard_normal(d.lora_A.weight.shape) * scale).astype(np.float32)
            d.lora_B.weight.data = (rng.standard_normal(d.lora_B.weight.shape) * scale).astype(np.float32)
            deltas[path] = d.s * (d.lora_B.weight.data @ d.lora_A.weight.data)
    return deltas


# ---- QLORA-1, QLORA-2: configs ----------------------------------------------------------------
@pytest.mark.spec("QLORA-1")
def test_quantization_config_defaults_and_fields():
    q = mp.QuantizationConfig()
    assert (q.quant_type, q.compute_dtype, q.double_quantization, q.block_size) == ("nf4", "bfloat16", True, 64)
    assert q.double_quant_block_size == 256
    for b in (32, 64, 128, 256):
        assert mp.QuantizationConfig(block_size=b, quant_type="fp4", compute_dtype="float16").block_size == b


@pytest.mark.spec("QLORA-1")
@pytest.mark.parametrize("field,value", [("block_size", 48), ("block_size", 512), ("block_size", 64.0),
                                         ("quant_type", "int4"), ("compute_dtype", "float64"),
                                         ("compute_dtype", "bf16"), ("double_quantization", "yes")])
def test_quantization_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        mp.QuantizationConfig(**{field: value})


@pytest.mark.spec("QLORA-2")
def test_qlora_config_is_lora_and_saves_as_lora(tmp_path):
    assert issubclass(mp.QLoRAConfig, mp.LoRAConfig) and mp.QLoRAConfig.peft_type == "LORA"
    with pytest.raises(ConfigError, match="rank"):
        mp.QLoRAConfig(rank=0)
    for init in ("pissa", "olora"):
        with pytest.raises(ConfigError, match="init"):
            mp.QLoRAConfig(init=init)
    m = quantized_llama()
    with pytest.raises(ConfigError, match="init"):  # a plain LoRAConfig asking for PiSSA on a 4-bit layer
        m.apply_lora(mp.LoRAConfig(init="pissa", target_modules=ATTN))
    assert not m.peft_configs
    m.apply_qlora(mp.QLoRAConfig(rank=4, alpha=8, target_modules=ATTN))
    randomize_lora(m)
    m.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    m2 = quantized_llama()
    m2.load_adapters(str(tmp_path))
    assert isinstance(m2.peft_configs["default"], mp.LoRAConfig)
    assert_close(m2(IDS), m(IDS), rtol=0.0, label="reloaded QLoRA adapter")


# ---- QLORA-3: quantize ----------------------------------------------------------------------------
@pytest.mark.spec("QLORA-3")
@pytest.mark.parametrize("qcfg", [F32, mp.QuantizationConfig(quant_type="fp4", double_quantization=False,
                                                              block_size=32)])
def test_quantize_model_replaces_every_linear_but_lm_head(qcfg):
    float_model = tiny_llama(0, attention_bias=True)
    weights = {p: np.array(m.weight.data) for p, m in float_model.net.named_modules() if isinstance(m, Linear)}
    biases = {p: m.bias for p, m in float_model.net.named_modules() if isinstance(m, Linear)}
    counts = float_model.parameter_counts()
    quantize_model(float_model.net, qcfg)
    net = float_model.net
    assert isinstance(net.lm_head, Linear) and set(linear4bit_paths(net)) == set(weights) - {"lm_head"}
    assert not any(isinstance(m, Linear) for p, m in net.named_modules() if p != "lm_head")
    for path in linear4bit_paths(net):
        layer = net.get_submodule(path)
        ref = mp.nf4_quantize(weights[path], qcfg.block_size, qcfg.double_quantization, qcfg.quant_type)
        assert np.asarray(layer.weight.packed).tobytes() == np.asarray(ref.packed).tobytes(), path
        assert layer.weight.double_quantization == qcfg.double_quantization
        assert (layer.weight.block_size, layer.weight.quant_type) == (qcfg.block_size, qcfg.quant_type)
        assert layer.bias is biases[path] and layer.compute_dtype == qcfg.compute_dtype
    assert not any(n.endswith("proj.weight") for n, _ in net.named_parameters())
    assert float_model.parameter_counts() == counts


# ---- QLORA-4: forward -----------------------------------------------------------------------------
@pytest.mark.spec("QLORA-4")
@SETTINGS
@given(out=st.integers(1, 24), inn=st.integers(1, 40), batch=st.integers(1, 3), block=st.sampled_from([32, 64]),
       qt=st.sampled_from(["nf4", "fp4"]), dq=st.booleans(), bias=st.booleans(),
       cd=st.sampled_from(["float32", "float16", "bfloat16"]), xdt=st.sampled_from(["float32", "float16"]),
       seed=st.integers(0, 2 ** 16))
def test_linear4bit_forward_matches_spec(out, inn, batch, block, qt, dq, bias, cd, xdt, seed):
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((out, inn)).astype(np.float32)
    b = rng.standard_normal(out).astype(np.float32) if bias else None
    x = rng.standard_normal((batch, 3, inn)).astype(xdt)
    t = mp.nf4_quantize(W0, block, dq, qt)
    y = Linear4bit(t, None if b is None else Tensor(b), cd)(Tensor(x))
    W = rd(mp.nf4_dequantize(t), cd)  # rd(fl(c[q] a)) = dequant(t, cd), NF4-7
    ref = rd(x, cd).reshape(-1, inn) @ W.T + (0.0 if b is None else rd(b, cd))  # float32 sums
    ref = rd(ref, cd).reshape(batch, 3, out).astype(xdt)  # back to x's dtype
    assert y.dtype == x.dtype
    yv = np.asarray(y.data, dtype=np.float32)
    np.testing.assert_array_equal(rd(yv, cd), yv)  # every value is a value of cd
    rtol = max(ULP[cd], ULP[xdt])  # summation order may flip one rounding to cd, or to x's dtype
    assert_close(yv, ref, rtol=rtol, label=f"Linear4bit {cd} x {xdt}")


@pytest.mark.spec("QLORA-4")
def test_linear4bit_float32_is_the_float_linear_on_dequant():
    rng = np.random.default_rng(0)
    t = mp.nf4_quantize(rng.standard_normal((16, 64)).astype(np.float32), 64, True, "nf4")
    b = Tensor(rng.standard_normal(16).astype(np.float32))
    x = Tensor(rng.standard_normal((2, 5, 64)).astype(np.float32))
    lin = Linear(64, 16)
    lin.weight.data, lin.bias = np.asarray(mp.nf4_dequantize(t)), b
    np.testing.assert_array_equal(Linear4bit(t, b, "float32")(x).data, lin(x).data)


# ---- QLORA-5: LoRA over Linear4bit ---------------------------------------------------------------
@pytest.mark.spec("QLORA-5", "LORA-3", "LORA-10")
@pytest.mark.parametrize("targets", [ATTN, "all-linear", r".*\.(q|v|down)_proj"])
def test_qlora_model_equals_float_model_with_dequant_plus_delta(targets):
    m = quantized_llama()
    m.apply_qlora(target_modules=targets, rank=4, alpha=8)
    adapted = [p for p, layer in m.net.named_modules() if isinstance(layer, AdaptedLayer)]
    assert adapted and all(isinstance(m.net.get_submodule(p).base_layer, Linear4bit) for p in adapted)
    assert "lm_head" not in adapted
    np.testing.assert_array_equal(m(IDS).data, float_twin(m)(IDS).data)  # B = 0: the base model
    deltas = randomize_lora(m)
    assert_close(m(IDS), float_twin(m, deltas)(IDS), rtol=1e-5, label=f"QLoRA {targets}")


# ---- QLORA-6, QLORA-7: gradients and memory --------------------------------------------------------
@pytest.mark.spec("QLORA-6")
def test_gradients_reach_only_the_adapter_and_match_the_float_model():
    m = quantized_llama()
    m.apply_qlora(target_modules=ATTN, rank=4, alpha=8)
    deltas = randomize_lora(m)
    twin = float_twin(m)
    twin.apply_lora(target_modules=ATTN, rank=4, alpha=8)
    twin_params = dict(twin.net.named_parameters())
    for n, p in m.net.named_parameters():
        if ".adapters." in n:
            twin_params[n].data = np.array(p.data)
    assert deltas
    for model in (m, twin):
        model.net.train()
        (model(IDS) * model(IDS)).sum().backward()
    grads = {n: p.grad for n, p in m.net.named_parameters() if p.grad is not None}
    assert grads and all(".lora_A." in n or ".lora_B." in n for n in grads)
    assert {n for n, p in m.net.named_parameters() if p.requires_grad} == set(grads)
    for n, p in twin.net.named_parameters():
        if n in grads:
            assert_close(grads[n], p.grad, rtol=1e-5, label=f"grad {n}")


@pytest.mark.spec("QLORA-6", "QLORA-7")
def test_training_leaves_the_4bit_weight_alone_and_keeps_no_float_copy():
    m = quantized_llama(mp.QuantizationConfig())  # bfloat16 compute
    m.apply_qlora(target_modules="all-linear", rank=2, alpha=4)
    randomize_lora(m)
    m.net.train()
    layers = {p: m.net.get_submodule(p) for p in linear4bit_paths(m.net)}
    before = {p: np.asarray(layer.weight.packed).tobytes() for p, layer in layers.items()}
    state = {p: dict(vars(layer)) for p, layer in layers.items()}
    opt = AdamW({n: p for n, p in m.net.named_parameters() if p.requires_grad}, lr=1e-2)
    for _ in range(2):
        m.net.zero_grad()
        loss = (m(IDS) ** 2).mean()
        loss.backward()
        opt.step()
    for p, layer in layers.items():
        assert np.asarray(layer.weight.packed).tobytes() == before[p], p
        assert vars(layer).keys() == state[p].keys() and all(vars(layer)[k] is v for k, v in state[p].items())
        assert isinstance(layer.weight, NF4Tensor) and layer.bias is None
        arrays = [k for k, v in vars(layer).items() if not isinstance(v, NF4Tensor) and hasattr(v, "shape")]
        assert arrays == [], f"{p} holds arrays {arrays}"
        assert not hasattr(layer.weight, "grad")


# ---- QLORA-8: merge ---------------------------------------------------------------------------
@pytest.mark.spec("QLORA-8")
@SETTINGS
@given(cd=st.sampled_from(["float32", "float16", "bfloat16"]), qt=st.sampled_from(["nf4", "fp4"]), dq=st.booleans(),
       block=st.sampled_from([32, 64, 128, 256]), rank=st.integers(1, 8), seed=st.integers(0, 2 ** 16))
def test_merge_and_unload_dequantizes_and_merges(cd, qt, dq, block, rank, seed):
    m = quantized_llama(mp.QuantizationConfig(qt, cd, dq, block), seed=seed % 7)
    m.apply_qlora(target_modules=("q_proj", "v_proj", "down_proj"), rank=rank, alpha=2 * rank)
    deltas = randomize_lora(m, seed=seed)
    twin = float_twin(m, deltas)
    dequant = {p.replace(".base_layer", ""): np.asarray(mp.nf4_dequantize(m.net.get_submodule(p).weight))
               for p in linear4bit_paths(m.net)}
    with pytest.raises(ConfigError, match="merge_and_unload"):
        m.merge_adapter()
    with pytest.raises(MiniPeftError, match="merge_and_unload"):
        m.save("never-written")
    m.merge_and_unload()
    assert not linear4bit_paths(m.net) and not m.peft_configs
    for path, W in dequant.items():
        np.testing.assert_allclose(m.net.get_submodule(path).weight.data, W + deltas.get(path, 0.0), rtol=0,
                                   atol=1e-6 * max(1.0, np.abs(W).max()))
    assert_close(m(IDS), twin(IDS), rtol=1e-6, label="merged")
    with tempfile.TemporaryDirectory() as folder:
        m.save(folder + "/merged")
        assert_close(mp.load_model(folder + "/merged")(IDS), m(IDS), rtol=0.0, label="saved merged")


@pytest.mark.spec("QLORA-8", "QLORA-3")
def test_gpt2_conv1d_quantizes_out_in_and_comes_back_as_conv1d():
    net = GPT2LMHeadModel(config_from_dict(dict(model_type="gpt2", vocab_size=48, n_embd=32, n_layer=1, n_head=4,
                                                n_positions=32)))
    rng = np.random.default_rng(0)
    for _, p in net.named_parameters():
        p.data = (rng.standard_normal(p.shape) * 0.3).astype(np.float32)
    m = mp.Model(net)
    c_attn = np.array(net.transformer.h[0].attn.c_attn.weight.data)  # (in, out)
    ref = m(IDS).data
    quantize_model(net, F32)
    t = net.transformer.h[0].attn.c_attn.weight
    assert t.shape == c_attn.T.shape
    assert np.asarray(t.packed).tobytes() == np.asarray(mp.nf4_quantize(c_attn.T, 64).packed).tobytes()
    assert_close(m(IDS), ref, rtol=0.2, label="4-bit gpt2 near the float one")
    m.apply_qlora(target_modules=("c_attn",), rank=2, alpha=4)
    m.merge_and_unload()
    layer = net.transformer.h[0].attn.c_attn
    assert isinstance(layer, Conv1D)
    np.testing.assert_array_equal(layer.weight.data, np.asarray(mp.nf4_dequantize(t)).T)


@pytest.mark.spec("QLORA-8")
def test_unload_keeps_the_4bit_layers():
    m = quantized_llama()
    layers = {p: m.net.get_submodule(p) for p in linear4bit_paths(m.net)}
    ref = m(IDS).data
    m.apply_qlora(target_modules="all-linear", rank=2, alpha=4)
    randomize_lora(m)
    m.unload()
    assert {p: m.net.get_submodule(p) for p in linear4bit_paths(m.net)} == layers and not m.peft_configs
    np.testing.assert_array_equal(m(IDS).data, ref)


# ---- QLORA-9, QLORA-10: errors ----------------------------------------------------------------------
@pytest.mark.spec("QLORA-9")
def test_apply_qlora_on_a_float_model_says_to_quantize():
    m = tiny_llama()
    with pytest.raises(ConfigError, match="quantization="):
        m.apply_qlora(target_modules=ATTN)
    assert not m.peft_configs and not linear4bit_paths(m.net)


@pytest.mark.spec("QLORA-10")
def test_bad_inputs_raise_minipeft_errors():
    rng = np.random.default_rng(0)
    t = mp.nf4_quantize(rng.standard_normal((8, 64)).astype(np.float32), 64)
    with pytest.raises(CheckpointError, match="packed"):
        NF4Tensor(t.packed[:-1], t.absmax, t.absmax_codes, t.absmax_scales, t.offset, t.shape, t.dtype)
    with pytest.raises(ConfigError, match="float32 or float16"):
        mp.nf4_quantize(np.arange(64, dtype=np.int32).reshape(8, 8))
    with pytest.raises(ConfigError, match="compute dtype"):
        Linear4bit(t, None, "float64")
    with pytest.raises(ConfigError, match="compute dtype"):
        mp.nf4_dequantize(t, "int8")
    with pytest.raises(ConfigError, match="2-D NF4Tensor"):
        Linear4bit(np.zeros((8, 64), np.float32))
    with pytest.raises(ConfigError, match="QuantizationConfig"):
        quantize_model(tiny_llama().net, {"quant_type": "nf4"})
    m = tiny_llama()
    m.apply_lora(target_modules=ATTN)
    with pytest.raises(ConfigError, match="before applying adapters"):
        quantize_model(m.net, F32)


@pytest.mark.spec("QLORA-4")
@pytest.mark.parametrize("cd", ["float32", "bfloat16"])
def test_linear4bit_is_backend_neutral(any_backend, cd):
    """The same bytes and outputs on NumPy and on the array_api_strict guard (which has no float16)."""
    from minipeft import backend
    rng = np.random.default_rng(0)
    W0, x, b = (rng.standard_normal(s).astype(np.float32) for s in ((12, 40), (2, 3, 40), (12,)))
    t = mp.nf4_quantize(backend.asarray(W0, "float32"), 32)
    y = Linear4bit(t, Tensor(backend.asarray(b, "float32")), cd)(Tensor(backend.asarray(x, "float32")))
    ref = rd(rd(x, cd).reshape(-1, 40) @ rd(mp.nf4_dequantize(mp.nf4_quantize(W0, 32)), cd).T + rd(b, cd), cd)
    assert_close(backend.to_host(y.data), ref.reshape(2, 3, 12), rtol=ULP[cd], label=f"{any_backend} {cd}")
