"""What every registered method is tested for (spec/methods.md METHOD-5), one test parametrised over
minipeft.methods(): at default init the adapted model equals the base; after every trainable tensor is
perturbed, merged equals unmerged, save then load gives the same tensors and logits, the gradients equal
central finite differences in float64, and the trainable count equals the method's own formula; and
(oracle) its saved folder loads in PEFT with minipeft's logits, and PEFT's save of it loads back here.
A method registered without what one of these needs (trainable_count, a layer, a working save) fails."""
import contextlib

import numpy as np
import pytest

import minipeft as mp
from minipeft import backend
from minipeft.adapters.inject import adapted_layers
from minipeft.autograd import no_grad
from minipeft.quant.linear4bit import dequantize_model, quantize_model
from tests.helpers import TINY_LLAMA, assert_close, data_for, hf_llama_folder, max_rel_err, peft_loftq_on_cpu, peft_svd_signs_as_minipeft, tiny_llama
from tests.helpers import peft_frod_basis_as_minipeft
from tests.helpers import peft_kmeans_as_minipeft

IDS = np.random.default_rng(1).integers(0, 48, (2, 9))
METHODS = [m.name for m in mp.methods() if m.is_adapter and m.config.__module__.startswith("minipeft.")]
QUANT = mp.QuantizationConfig(compute_dtype="float32")
SMALL = {"fourierft": dict(n_frequency=256), "waveft": dict(n_frequency=256), "shira": dict(rank=2),  # PEFT's defaults (1000; 32 (in + out)) exceed
         "road": dict(group_size=8),  # the tiny llama's v_proj (32 x 16 = 512); RoAd's group_size 64 > its 16 outputs
         "miss": dict(rank=5), "c3a": dict(block_size=8),  # MiSS's r = 64 > the tiny llama's 32 inputs; 5 leaves a padded shard
         "vblora": dict(num_vectors=16, vector_length=16),  # VB-LoRA's L = 256 exceeds every tiny width
         "psoft": dict(rank=4),  # PSOFT's r = 32 > the tiny v_proj's 16 outputs
         "trainable_tokens": dict(token_indices=[1, 5, 7]),  # no default (PEFT's is an empty list)
         "alora": dict(alora_invocation_tokens=[int(IDS[0, 3])]),  # no default; row 0 is adapted from position 3 on
         "adamss": dict(rank=8),  # AdaMSS's r = 100 reaches the tiny q_proj's 32 outputs (ADAMSS-2)
         "bdlora": dict(use_bdlora={"target_modules_bd_a": ["o_proj", "down_proj"], "nblocks": 2,  # no default patterns
                                    "target_modules_bd_b": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]}),
         }


def fresh(method, seed=0):
    model = tiny_llama(seed)
    if method.quantized_base:
        quantize_model(model.net, QUANT)
    return model


def perturb(model, seed=0):
    rng = np.random.default_rng(seed)
    for _, p in model.net.named_parameters():
        if p.requires_grad:
            p.data = (p.data + rng.standard_normal(p.shape) * 0.1).astype(np.float32)


def targeted(model) -> dict:
    return {p: (m.base_layer.in_features, m.base_layer.out_features) for p, m in adapted_layers(model.net)}


def directional_gradients(model, seed=0, directions=3):
    """[(analytic, numeric)] of d/dt L(theta + t v) at t = 0 for random directions v over every trainable
    tensor, L = sum(logits * C), in float64 (every tensor of the model cast first)."""
    for _, p in model.net.named_parameters():
        p.data = p.data.astype(np.float64)
    for shared in model.shared_tensors.values():
        for t in shared.values():
            t.data = t.data.astype(np.float64)
    params = [p for _, p in model.net.named_parameters() if p.requires_grad]
    rng = np.random.default_rng(seed)
    C = rng.standard_normal(model(IDS).shape)

    def L():
        return float(np.sum(model(IDS).numpy() * C))

    (model(IDS) * mp.Tensor(C)).sum().backward()
    grads = [np.zeros(p.shape) if p.grad is None else backend.to_host(p.grad) for p in params]
    out, eps = [], 1e-6
    with contextlib.ExitStack() as held:  # DoRA's row norm is a constant to backward (DORA-3): hold it
        for _, layer in adapted_layers(model.net):
            for delta in vars(layer.adapters).values():
                held.enter_context(delta.gradient_reference(layer.base_layer))
        out = finite_differences(L, params, grads, rng, directions, eps)
    return out


def finite_differences(L, params, grads, rng, directions, eps):
    out = []
    for _ in range(directions):
        vs = [rng.standard_normal(p.shape) for p in params]
        with no_grad():
            for p, v in zip(params, vs):
                p.data = p.data + eps * v
            up = L()
            for p, v in zip(params, vs):
                p.data = p.data - 2 * eps * v
            down = L()
            for p, v in zip(params, vs):
                p.data = p.data + eps * v
        out.append((sum(float(np.sum(g * v)) for g, v in zip(grads, vs)), (up - down) / (2 * eps)))
    return out


@pytest.mark.spec("METHOD-5")
@pytest.mark.parametrize("name", METHODS)
def test_every_method_keeps_the_contract(name, tmp_path):
    method = mp.adapters.registry.method(name)
    model = fresh(method)
    base = model(IDS).numpy()
    getattr(model, f"apply_{name}")(**data_for(method.config), **SMALL.get(name, {}))  # the config's defaults
    cfg = model.peft_configs["default"]
    if getattr(cfg, "INIT_MOVES_OUTPUT", None):  # PEFT's own default init moves the output: the config says why
        assert max_rel_err(model(IDS), base) > 1e-4, cfg.INIT_MOVES_OUTPUT
    elif method.kind != "prompt":  # a prompt method adds virtual tokens: the real tokens' logits move at init
        rtol = getattr(cfg, "STEP0_RTOL", 1e-6)  # an initialiser that rewrites W0 states its error (METHOD-10)
        assert_close(model(IDS), base, rtol=rtol, label=f"{name} at init vs base")
    trainable, _ = model.parameter_counts()
    assert trainable == cfg.trainable_count(targeted(model), model.config) > 0

    at_init = model(IDS).numpy()
    perturb(model)
    out = model(IDS).numpy()
    assert max_rel_err(out, at_init) > 1e-4  # the perturbed tensors reach the logits
    if method.mergeable and all(d.mergeable_into(m.base_layer) for _, m in adapted_layers(model.net)
                                for d in vars(m.adapters).values()):
        if method.quantized_base:  # a 4-bit weight cannot hold W0 + dW: merge_and_unload dequantizes (QLORA-8)
            twin = fresh(method)
            model.save_adapters(str(tmp_path / "twin"))
            twin.load_adapters(str(tmp_path / "twin"))
            assert_close(twin.merge_and_unload()(IDS), out, rtol=1e-5, label=f"{name} merge_and_unload")
        else:
            model.merge_adapter()
            assert_close(model(IDS), out, rtol=1e-5, label=f"{name} merged vs unmerged")
            model.unmerge_adapter()
            assert_close(model(IDS), out, rtol=1e-5, label=f"{name} after unmerge")

    model.save_adapters(str(tmp_path / "saved"))
    again = fresh(method)
    again.load_adapters(str(tmp_path / "saved"))
    mine = dict(model.net.named_parameters())
    mine.update({f"{p}.adapters.default.{k}": t for p, m in adapted_layers(model.net)  # a delta that saves its own layout
                 for k, t in getattr(m.adapters.default, "saved_parameters", dict)()})  # (LoRA-GA's rank 2r) is read back as that
    for n, p in again.net.named_parameters():
        if p.requires_grad:
            assert np.array_equal(p.numpy(), mine[n].numpy()), n
    assert_close(again(IDS), out, rtol=getattr(cfg, "RELOAD_RTOL", 1e-6), label=f"{name} save -> load")

    if method.quantized_base:  # the 4-bit forward rounds to its compute dtype: check the adapter on the float base
        dequantize_model(model.net)
    for analytic, numeric in directional_gradients(model):
        assert abs(analytic - numeric) <= 1e-6 + 1e-5 * abs(numeric), (name, analytic, numeric)


# ---- against PEFT, both ways ---------------------------------------------------------------------------------
HF = {**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}, "hidden_size": 64, "intermediate_size": 128}


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return hf_llama_folder(str(tmp_path_factory.mktemp("hf-llama")), **HF)


def hf_model(folder, quantized: bool):
    import torch
    import transformers
    kw = {}
    if quantized:
        kw = dict(quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32), device_map="cpu")
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                          **kw).eval()
    if quantized:
        import bitsandbytes as bnb
        for layer in m.modules():
            if isinstance(layer, bnb.nn.Linear4bit):
                layer.support_avx512bf16_for_cpu = False  # as tests/test_qlora_oracle.py: the float32 path
    return m


@pytest.mark.oracle
@pytest.mark.spec("METHOD-5")
@pytest.mark.parametrize("name", [n for n in METHODS if mp.adapters.registry.method(n).peft_type])
def test_every_peft_method_loads_in_peft_and_back(name, hf_base, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    method = mp.adapters.registry.method(name)
    if method.quantized_base or name == "loftq":
        pytest.importorskip("bitsandbytes")
    with (peft_loftq_on_cpu() if name == "loftq"  # PEFT reruns LoftQ as it loads
          else peft_svd_signs_as_minipeft() if name == "psoft"  # PEFT retakes W0's SVD as it loads (PSOFT-1)
          else peft_frod_basis_as_minipeft() if name == "frod"  # PEFT builds U from its own V as it loads (FROD-10)
          else peft_kmeans_as_minipeft() if name == "adamss"  # PEFT's KMeans is scikit-learn's, absent here (ADAMSS-2)
          else contextlib.nullcontext()):
        loads_both_ways(name, method, hf_base, tmp_path)


def loads_both_ways(name, method, hf_base, tmp_path):
    import torch
    import peft
    model = mp.load_model(hf_base, quantization=QUANT if method.quantized_base else None)
    getattr(model, f"apply_{name}")(**({"total_step": 10} if name == "adalora" else SMALL.get(name, {})), **data_for(method.config))
    perturb(model)
    model.save_adapters(str(tmp_path / "ours"))
    pm = peft.PeftModel.from_pretrained(hf_model(hf_base, method.quantized_base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        theirs = pm(torch.tensor(IDS)).logits.numpy()
    ours = model(IDS).numpy()
    assert ours.shape == theirs.shape
    err = max_rel_err(ours, theirs)
    print(f"\n  {name} minipeft -> PEFT: max rel err {err:.2e}")
    assert err < 1e-5
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PEFT moves every saved tensor, saves, and minipeft reads its folder
        for n, p in pm.named_parameters():
            if p.requires_grad or any(k in n for k in ("lora_", "hada_", "lokr_", "vera_lambda", "ia3_", "prompt", "hira_", "hra_u", "beft_", "road_", "miss_block", "c3a_kernel", "delora_", "psoft_R")):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        theirs = pm(torch.tensor(IDS)).logits.numpy()
    pm.save_pretrained(str(tmp_path / "peft"))
    back = mp.load_model(hf_base, quantization=QUANT if method.quantized_base else None)
    back.load_adapters(str(tmp_path / "peft"))
    err = max_rel_err(back(IDS), theirs)
    print(f"  {name} PEFT -> minipeft: max rel err {err:.2e}")
    assert err < 1e-5


@pytest.mark.oracle
@pytest.mark.spec("LORAXS-6", "NOLA-7", "TIEDLORA-8", "DVORA-8", "MORA-9", "MULTILORA-6", "QALORA-7")  # each method PEFT lacks: its spec's Files claim
@pytest.mark.parametrize("name", [n for n in METHODS if not mp.adapters.registry.method(n).in_peft])
def test_peft_refuses_each_method_it_lacks_naming_the_type(name, tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama(0)
    getattr(model, f"apply_{name}")()
    model.save_adapters(str(tmp_path))
    with pytest.raises(KeyError, match=f"MINIPEFT_{name.upper()}"):
        peft.PeftConfig.from_pretrained(str(tmp_path))
