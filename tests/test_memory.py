"""spec/memory.md (MEM-n): the estimate's arithmetic against built models, and against the traced
peak of a real training step in a fresh process (tracemalloc sees NumPy's buffers)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import minipeft as mp
from minipeft.cli import main
from minipeft.errors import ConfigError
from minipeft.memory import estimate
from minipeft.models.config import config_from_dict
from minipeft.models.llama import LlamaForCausalLM
from minipeft.model import Model
from minipeft.quant.linear4bit import Linear4bit, quantize_model
from minipeft.quant.nf4 import storage_bits

CONFIGS = os.path.join(os.path.dirname(mp.__file__), "data", "configs")
LLAMA2 = {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}  # published parameter counts
SMALL = {"model_type": "llama", "vocab_size": 96, "hidden_size": 128, "intermediate_size": 192,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 256, "rms_norm_eps": 1e-5}


def built(method, rank=8, targets=("q_proj", "v_proj"), raw=SMALL):
    m = Model(LlamaForCausalLM(config_from_dict(raw)))
    targets = targets if targets == "all-linear" else list(targets)
    if method == "qlora":
        quantize_model(m.net, mp.QuantizationConfig(compute_dtype="float32"))
        m.apply_qlora(rank=rank, target_modules=targets)
    elif method == "lora":
        m.apply_lora(rank=rank, target_modules=targets)
    else:
        m.net.requires_grad_(True)
    return m


@pytest.mark.spec("MEM-1", "MEM-2", "MEM-10")
@pytest.mark.parametrize("size", sorted(LLAMA2))
def test_llama2_configs_give_the_published_parameter_counts(size, tmp_path):
    path = os.path.join(CONFIGS, f"llama-2-{size}.json")
    est = estimate(path, "full")
    assert est.base_params == est.trainable == LLAMA2[size]
    assert est.weights == 4 * LLAMA2[size] and est.gradients == 4 * LLAMA2[size]
    shutil.copy(path, tmp_path / "config.json")  # a folder and a ModelConfig read the same
    with open(path) as f:
        cfg = config_from_dict(json.load(f))
    assert estimate(str(tmp_path), "qlora") == estimate(cfg, "qlora") == estimate(path, "qlora")


@pytest.mark.spec("MEM-1")
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_weights_are_the_bytes_of_the_built_model(method):
    m = built(method)
    floats = sum(p.data.nbytes for p in m.net.parameters())
    quant = [mod.weight for _, mod in m.net.named_modules() if isinstance(mod, Linear4bit)]
    stored = sum(a.nbytes for t in quant for a in (t.packed, t.absmax_codes, t.absmax_scales)) + 4 * len(quant)
    assert stored == sum(storage_bits(t) * t.numel / 8 for t in quant)  # NF4-10, offset a float32
    assert len(quant) == (7 * SMALL["num_hidden_layers"] if method == "qlora" else 0)
    assert estimate(config_from_dict(SMALL), method, compute_dtype="float32").weights == floats + stored


@pytest.mark.spec("MEM-2")
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("gate_proj", "down_proj", "k_proj"), "all-linear"])
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_gradients_and_optimizer_scale_with_the_trainable_count(method, targets):
    cfg = config_from_dict(SMALL)
    for rank in (4, 8, 16):
        est = estimate(cfg, method, rank=rank, target_modules=targets)
        trainable = built(method, rank, targets).parameter_counts()[0]
        assert est.trainable == trainable
        assert (est.gradients, est.optimizer) == (4 * trainable, 8 * trainable)
    assert estimate(cfg, method, rank=16, target_modules=targets).trainable == \
        4 * estimate(cfg, method, rank=4, target_modules=targets).trainable


@pytest.mark.spec("MEM-4")
def test_qlora_keeps_the_dequantized_weights_of_recorded_layers():
    """float32 compute, adapters on q and v: QLoRA's graph is LoRA's plus every dequantized weight,
    except layer 0's q, k, v, whose input needs no gradient (their Linear is not recorded)."""
    raw = dict(SMALL, num_key_value_heads=4)
    cfg = config_from_dict(raw)
    d, i, L = raw["hidden_size"], raw["intermediate_size"], raw["num_hidden_layers"]
    per_layer = 4 * d * d + 3 * d * i
    lora, qlora = (estimate(cfg, m, compute_dtype="float32", seq=64, batch=2) for m in ("lora", "qlora"))
    assert qlora.after_forward - lora.after_forward == 4 * (L * per_layer - 3 * d * d)


@pytest.mark.spec("MEM-5")
@pytest.mark.parametrize("size", sorted(LLAMA2))
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_checkpointing_lowers_activations_and_the_peak(size, method):
    path = os.path.join(CONFIGS, f"llama-2-{size}.json")
    off, on = (estimate(path, method, gradient_checkpointing=c) for c in (False, True))
    assert on.after_forward < off.after_forward / 10
    assert on.activations < off.activations and on.total < off.total
    assert (on.weights, on.gradients, on.optimizer) == (off.weights, off.gradients, off.optimizer)


@pytest.mark.spec("MEM-10")
def test_bad_input_raises_config_error(tmp_path):
    gpt2 = {"model_type": "gpt2", "vocab_size": 50, "n_embd": 32, "n_layer": 2, "n_head": 4}
    with pytest.raises(ConfigError, match="llama family"):
        estimate(config_from_dict(gpt2))
    for kw in ({"method": "dora"}, {"optimizer": "sgd"}, {"dtype": "int8"}, {"method": "lora", "target_modules": ["lm_head"]}):
        with pytest.raises(ConfigError):
            estimate(config_from_dict(SMALL), **kw)
    with pytest.raises(ConfigError):
        estimate(str(tmp_path / "missing.json"))


@pytest.mark.spec("MEM-10")
def test_cli_prints_the_table_in_gb(capsys):
    path = os.path.join(CONFIGS, "llama-2-7b.json")
    assert main(["memory", "--model", path, "--method", "qlora", "--rank", "8", "--seq", "512", "--batch", "4",
                 "--checkpointing"]) == 0
    out = capsys.readouterr().out
    total = estimate(path, "qlora", gradient_checkpointing=True).total
    assert f"peak (total){total / 1e9:18.2f} GB" in out and "trainable: 4,194,304" in out
    with pytest.raises(SystemExit) as e:
        main(["memory", "--help"])
    assert e.value.code == 0 and "--checkpointing" in capsys.readouterr().out


# ---- measured (MEM-9) ------------------------------------------------------------------------
STEP = r"""
import json, sys, tracemalloc
tracemalloc.start()
import numpy as np
import minipeft as mp
from minipeft import backend
from minipeft.model import Model
from minipeft.models.blocks import causal_lm_loss
from minipeft.models.config import config_from_dict
from minipeft.models.llama import LlamaForCausalLM
from minipeft.nn.optim import AdamW
from minipeft.quant.linear4bit import quantize_model

raw, method, B, T, ckpt, cd = json.loads(sys.argv[1])
start = tracemalloc.get_traced_memory()[0]
net = LlamaForCausalLM(config_from_dict(raw))
rng = backend.RNG(0)
for name, p in net.named_parameters():
    if not name.endswith("norm.weight"):
        p.data = rng.normal(p.shape, std=0.02)
m = Model(net)
if method == "qlora":
    quantize_model(net, mp.QuantizationConfig(compute_dtype=cd))
    m.apply_qlora(rank=8, target_modules=["q_proj", "v_proj"])
elif method == "lora":
    m.apply_lora(rank=8, target_modules=["q_proj", "v_proj"])
else:
    net.requires_grad_(True)
opt = AdamW({n: p for n, p in net.named_parameters() if p.requires_grad})
ids = np.random.default_rng(0).integers(0, raw["vocab_size"], (B, T))
net.gradient_checkpointing = ckpt
net.train()
for step in range(2):  # the first step makes the AdamW moments; the second is measured
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    loss = causal_lm_loss(net(ids, attention_mask=np.ones((B, T), dtype=np.int64)), ids)
    after_forward = tracemalloc.get_traced_memory()[0] - before
    loss.backward()
    del loss
    opt.step()
    opt.zero_grad()
print(json.dumps({"peak": tracemalloc.get_traced_memory()[1] - start, "after_forward": after_forward}))
"""
C1 = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
      "num_attention_heads": 4, "max_position_embeddings": 512, "rms_norm_eps": 1e-5}
C2 = dict(C1, vocab_size=2000, hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=2)
C3 = dict(C1, vocab_size=8000, hidden_size=384, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=6)
CASES = [(C1, "full", 128, False, "float32"), (C1, "lora", 128, True, "float32"), (C1, "qlora", 128, False, "bfloat16"),
         (C2, "lora", 128, False, "float32"), (C2, "qlora", 128, True, "float32"), (C3, "full", 128, True, "float32"),
         (C1, "lora", 384, False, "float32")]  # 384 tokens: attention in two blocks of query rows (MEM-4)


@pytest.mark.slow
@pytest.mark.spec("MEM-3", "MEM-4", "MEM-5", "MEM-6", "MEM-7", "MEM-8", "MEM-9")
@pytest.mark.parametrize("raw, method, seq, ckpt, cd", CASES)
def test_estimate_matches_the_traced_peak_of_a_step(raw, method, seq, ckpt, cd):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", MINIPEFT_BACKEND="numpy")
    out = subprocess.run([sys.executable, "-c", STEP, json.dumps([raw, method, 4, seq, ckpt, cd])],
                         capture_output=True, text=True, env=env, check=True)
    measured = json.loads(out.stdout)
    est = estimate(config_from_dict(raw), method, seq=seq, batch=4, gradient_checkpointing=ckpt, compute_dtype=cd)
    err, err_fwd = est.total / measured["peak"] - 1, est.after_forward / measured["after_forward"] - 1
    print(f"{method} ckpt={ckpt} d={raw['hidden_size']}: total {est.total / 1e6:.2f} MB vs peak "
          f"{measured['peak'] / 1e6:.2f} MB ({100 * err:+.2f}%); after forward {est.after_forward / 1e6:.2f} vs "
          f"{measured['after_forward'] / 1e6:.2f} MB ({100 * err_fwd:+.2f}%)")
    assert abs(err) < 0.15
    assert abs(err_fwd) < 0.03


@pytest.mark.spec("MEM-8", "MEM-10")
def test_readme_memory_table_is_what_estimate_gives():
    readme = open(os.path.join(os.path.dirname(CONFIGS), "..", "..", "README.md"), encoding="utf-8").read()
    rows = {line.split("|")[1].strip(): line.split("|")[2:8] for line in readme.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in ("7B", "13B", "70B")}
    assert sorted(rows) == ["13B", "70B", "7B"]
    for size, cells in rows.items():
        path = os.path.join(CONFIGS, f"llama-2-{size.lower()}.json")
        for cell, (method, ckpt) in zip(cells, [(m, c) for m in ("full", "lora", "qlora") for c in (False, True)]):
            gb = estimate(path, method, gradient_checkpointing=ckpt).total / 1e9
            assert cell.strip() == (f"{gb:.0f}" if gb >= 10 else f"{gb:.1f}"), (size, method, ckpt)
