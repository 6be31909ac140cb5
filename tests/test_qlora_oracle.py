"""QLoRA against transformers + bitsandbytes + PEFT on the CPU (spec/qlora.md QLORA-11, QLORA-12).

A tiny random Llama is saved with safetensors; transformers loads it with BitsAndBytesConfig(
load_in_4bit=True, nf4, double quantization, compute dtype float32 or bfloat16), and minipeft loads
it with the same QuantizationConfig. Its `in` sizes (64, 128) are multiples of the block size, so
bitsandbytes' AVX-512 dequantize reads the absmax correctly (spec/nf4.md, Deviations), and its
eval-mode AVX512-BF16 fast path, which computes in bfloat16 whatever the compute dtype, is turned
off (spec/qlora.md, Deviations). Run with `pytest -s` to see the measured errors."""
import numpy as np
import pytest

import minipeft as mp
from helpers import max_rel_err

pytestmark = pytest.mark.oracle

V = 64
IDS = np.random.default_rng(1).integers(0, V, (2, 9))
LLAMA = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
TOL = {"float32": 1e-5, "bfloat16": 2.0 ** -7}  # QLORA-11
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def lib():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes")
    return torch, transformers, peft, bnb


@pytest.fixture(scope="module")
def base(lib, tmp_path_factory):
    torch, transformers, _, _ = lib
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**LLAMA)
    cfg._attn_implementation = "eager"
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    folder = str(tmp_path_factory.mktemp("llama"))
    m.save_pretrained(folder)  # safetensors
    return folder


def bnb_model(lib, folder, cd):
    torch, transformers, _, bnb = lib
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=getattr(torch, cd))
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, dtype=torch.float32,
                                                          attn_implementation="eager", device_map="cpu").eval()
    for layer in m.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False  # the documented path, not the bfloat16 fast path
    assert isinstance(m.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert not isinstance(m.lm_head, bnb.nn.Linear4bit)
    return m


def logits(lib, m):
    torch = lib[0]
    with torch.no_grad():
        return m(torch.tensor(IDS)).logits.float().numpy()


def report(label, err, tol):
    print(f"\n  {label}: max rel err {err:.2e} (tolerance {tol:.1e})")
    assert err <= tol, f"{label}: {err:.3e} > {tol}"


@pytest.mark.spec("QLORA-11", "QLORA-3", "QLORA-5", "NF4-19")
@pytest.mark.parametrize("cd", ["float32", "bfloat16"])
def test_qlora_adapter_from_minipeft_runs_in_peft_over_bitsandbytes(lib, base, tmp_path, cd):
    _, _, peft, _ = lib
    hf = bnb_model(lib, base, cd)
    model = mp.load_model(base, quantization=mp.QuantizationConfig(compute_dtype=cd))
    for path, ours in model.net.named_modules():
        if type(ours).__name__ != "Linear4bit":
            continue
        w = hf.get_submodule(path).weight
        t, qs = ours.weight, w.quant_state
        assert np.asarray(t.packed).tobytes() == w.data.numpy().reshape(-1).tobytes(), f"{path}: packed bytes"
        assert np.asarray(t.absmax_codes).tobytes() == qs.absmax.numpy().tobytes(), f"{path}: absmax codes"
        assert np.asarray(t.absmax_scales).tobytes() == qs.state2.absmax.numpy().tobytes(), f"{path}: scales"
        assert np.float32(t.offset).tobytes() == qs.offset.numpy().tobytes(), f"{path}: offset"
        assert tuple(qs.shape) == t.shape and qs.blocksize == t.block_size
    report(f"4-bit base {cd}", max_rel_err(model(IDS), logits(lib, hf)), TOL[cd])
    if cd == "bfloat16":  # the compute dtype shows: float32 compute is far from bitsandbytes' bfloat16 logits
        f32 = mp.load_model(base, quantization=mp.QuantizationConfig(compute_dtype="float32"))
        gap = max_rel_err(f32(IDS), logits(lib, hf))
        print(f"  minipeft float32 compute vs bitsandbytes bfloat16 compute: {gap:.2e}")
        assert gap > 100 * max_rel_err(model(IDS), logits(lib, hf))

    model.apply_qlora(mp.QLoRAConfig(rank=4, alpha=8, target_modules=ATTN + ("down_proj",)))
    rng = np.random.default_rng(0)
    for _, p in model.net.named_parameters():
        if p.requires_grad:  # lora_A, lora_B: B != 0
            p.data = (p.data + rng.standard_normal(p.shape) * 0.2).astype(np.float32)
    model.save_adapters(str(tmp_path))
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    report(f"QLoRA minipeft->PEFT {cd}", max_rel_err(model(IDS), logits(lib, pm)), TOL[cd])


@pytest.mark.spec("QLORA-12", "QLORA-8")
def test_merged_qlora_is_dequant_plus_delta_and_loads_in_transformers(lib, base, tmp_path):
    torch, transformers, peft, bnb = lib
    model = mp.load_model(base, quantization=mp.QuantizationConfig(compute_dtype="float32"))
    model.apply_qlora(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))
    rng = np.random.default_rng(1)
    for _, p in model.net.named_parameters():
        if p.requires_grad:
            p.data = (p.data + rng.standard_normal(p.shape) * 0.2).astype(np.float32)
    model.save_adapters(str(tmp_path / "adapter"))
    pm = peft.PeftModel.from_pretrained(bnb_model(lib, base, "float32"), str(tmp_path / "adapter"))
    model.merge_and_unload()
    worst = 0.0
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.up_proj"):
        layer = pm.base_model.model.get_submodule(path)
        base_layer = getattr(layer, "base_layer", layer)
        ref = bnb.functional.dequantize_4bit(base_layer.weight.data, base_layer.weight.quant_state)
        if hasattr(layer, "get_delta_weight"):
            ref = ref + layer.get_delta_weight("default")
        err = max_rel_err(model.net.get_submodule(path).weight, ref.detach())
        assert err <= 1e-6, f"{path}: merged weight, rel err {err:.2e}"
        worst = max(worst, err)
    print(f"\n  merged weight vs bitsandbytes dequantize + PEFT delta: max rel err {worst:.2e}")
    model.save(str(tmp_path / "merged"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), attn_implementation="eager").eval()
    report("merged float checkpoint in transformers", max_rel_err(model(IDS), logits(lib, hf)), 1e-5)
