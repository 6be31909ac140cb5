"""spec/lora.md LORA-14: LoRA's layer_replication on the tiny llama (copies share the original weights, each gets its
own LoRA, no merge), and (oracle) against PEFT 0.21.2's replicate_layers both ways."""
import json

import numpy as np
import pytest

import minipeft as mp
from helpers import TINY_LLAMA, assert_close, max_rel_err, tiny_llama
from minipeft.errors import ConfigError
from one_layer import check_train_moves_every_leaf
from test_peft_oracle import lib  # noqa: F401 (fixture)

IDS = np.random.default_rng(2).integers(0, 48, (2, 7))
MAP = [[0, 2], [1, 2], [0, 1]]  # layers 0, 1, 1, 0


def perturb(model, seed=0):
    rng = np.random.default_rng(seed)
    for _, p in model.net.named_parameters():
        if p.requires_grad:
            p.data = (p.data + rng.standard_normal(p.shape) * 0.3).astype(np.float32)


def stacked_base(order):
    """A plain model whose layer k holds the weights of tiny_llama(0)'s layer order[k] (the spec's reference)."""
    src = tiny_llama(0)
    ref = tiny_llama(0, num_hidden_layers=len(order))
    mine = dict(src.net.named_parameters())
    for name, p in ref.net.named_parameters():
        parts = name.split(".")
        if parts[1] == "layers":
            parts[2] = str(order[int(parts[2])])
        p.data = mine[".".join(parts)].data
    return ref


@pytest.mark.spec("LORA-14")
def test_replicated_layers_share_weights_and_run_in_the_map_s_order():
    model = tiny_llama(0)
    model.apply_lora(layer_replication=MAP, target_modules="all-linear")
    layers = model.net.model.layers
    assert len(layers) == 4 and model.config.num_hidden_layers == 4
    q = [layers[k].self_attn.q_proj for k in range(4)]
    assert q[1].base_layer.weight is q[2].base_layer.weight and q[0].base_layer.weight is q[3].base_layer.weight
    assert q[1] is not q[2] and q[1].adapters["default"] is not q[2].adapters["default"]
    assert_close(model(IDS), stacked_base([0, 1, 1, 0])(IDS).numpy(), 1e-6, label="init = the stacked base")
    trainable, total = model.parameter_counts()
    assert trainable == 4 * sum(8 * (n + m) for n, m in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64),
                                                        (64, 32)])
    assert total == trainable + sum(p.data.size for _, p in tiny_llama(0).net.named_parameters())  # shared once
    out = model.generate(IDS, max_new_tokens=3)
    assert out.shape == (2, 10)


@pytest.mark.spec("LORA-14")
def test_saved_and_loaded_with_the_map(tmp_path):
    model = tiny_llama(0)
    model.apply_lora(layer_replication=MAP)
    perturb(model)
    model.save_adapters(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["layer_replication"] == MAP
    again = tiny_llama(0)
    again.load_adapters(str(tmp_path))
    assert len(again.net.model.layers) == 4
    assert np.array_equal(again(IDS).numpy(), model(IDS).numpy())


@pytest.mark.spec("LORA-14", "LORA-11")
def test_bad_maps_and_merges_are_refused_and_leave_the_model_as_it_was():
    for bad in ([], [[1, 1]], [[2, 0]], [[0, 1, 2]], [["0", 1]], 3):
        with pytest.raises(ConfigError, match="layer_replication"):
            mp.LoRAConfig(layer_replication=bad)
    model = tiny_llama(0)
    before = model(IDS).numpy()
    with pytest.raises(ConfigError, match="reaches past the model's 2 layers"):
        model.apply_lora(layer_replication=[[0, 3]])
    with pytest.raises(ConfigError, match="rank"):
        model.apply_lora(layer_replication=MAP, rank=100)  # fails after the replication: undone
    assert len(model.net.model.layers) == 2 and model.config.num_hidden_layers == 2 and not model.peft_configs
    with pytest.raises(ConfigError, match="rewrites W0"):
        model.apply_lora(layer_replication=MAP, init="pissa")
    assert np.array_equal(model(IDS).numpy(), before)
    model.apply_lora(layer_replication=MAP)
    with pytest.raises(ConfigError, match="replicated already"):
        model.apply_lora(layer_replication=MAP, name="second")
    with pytest.raises(ConfigError, match="share one weight"):
        model.merge_adapter()
    gpt2 = mp.load_model(mp.DEMO_MODEL)  # llama: fine; GPT-2's layers are transformer.h (PEFT has no rule for them)
    gpt2.net.base_name = "transformer"
    with pytest.raises(ConfigError, match="model.layers"):
        gpt2.apply_lora(layer_replication=[[0, 1]])


def test_each_copy_trains_its_own_lora():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_lora(layer_replication=[[0, 2], [1, 2]])
    check_train_moves_every_leaf(model, lr=3e-2)
    a = [model.net.model.layers[k].self_attn.q_proj.adapters["default"].lora_B.weight.data for k in (1, 2)]
    assert max_rel_err(a[0], a[1]) > 1e-3


# ---- oracle: PEFT 0.21.2 ------------------------------------------------------------------------
@pytest.mark.oracle
@pytest.mark.spec("LORA-14")
def test_peft_both_ways(lib, tmp_path):
    torch, transformers, peft = lib
    from helpers import hf_llama_folder
    folder = hf_llama_folder(str(tmp_path / "base"), **{k: v for k, v in TINY_LLAMA.items() if k != "model_type"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear",
                                                 layer_replication=MAP))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    pm.eval()
    with torch.no_grad():
        theirs = pm(torch.tensor(IDS)).logits.numpy()
    trained, total = pm.get_nb_trainable_parameters()
    pm.save_pretrained(str(tmp_path / "peft"))
    model = mp.load_model(folder)
    model.load_adapters(str(tmp_path / "peft"))
    assert model.parameter_counts() == (trained, total)
    err = max_rel_err(model(IDS), theirs)
    print(f"\n  layer_replication PEFT->minipeft: max rel err {err:.2e}")
    assert err < 1e-5
    perturb(model, seed=4)
    model.save_adapters(str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager"), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        err = max_rel_err(model(IDS), back(torch.tensor(IDS)).logits.numpy())
    print(f"  layer_replication minipeft->PEFT: max rel err {err:.2e}")
    assert err < 1e-5
    # PEFT 0.21.2 means to refuse this merge (LoraModel._check_merge_allowed), but it looks the field up in the dict
    # of adapter configs, finds nothing and merges every copy's B A into the one shared weight: each copy then
    # carries the sum of all of them, and the logits move (minipeft refuses the merge, LORA-14)
    with torch.no_grad():
        unmerged = back(torch.tensor(IDS)).logits.numpy()
        merged = back.merge_and_unload()(torch.tensor(IDS)).logits.numpy()
    err = max_rel_err(merged, unmerged)
    print(f"  PEFT's merge_and_unload of replicated layers vs its unmerged model: max rel err {err:.2e}")
    assert err > 1e-2
