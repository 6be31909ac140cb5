"""spec/prefix_tuning.md (PREFIX-n) and spec/ptuning_v2.md (PTV2-n) on tiny random Llama (GQA) and
GPT-2 models. The strong independent check (PREFIX-3): a prefix equal to the keys and values the
base model itself caches for T tokens u reproduces the base model's logits on [u; ids]."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_close, tiny_llama
from minipeft import PrefixTuningConfig, PTuningV2Config
from minipeft.autograd import no_grad
from minipeft.errors import CheckpointError, ConfigError
from minipeft.model import Model
from minipeft.models.blocks import KVCache, causal_lm_loss
from minipeft.models.config import config_from_dict
from minipeft.models.gpt2 import GPT2LMHeadModel
from minipeft.safetensors_io import read_safetensors, write_safetensors
from minipeft import backend
from test_prompt_tuning import SETTINGS, greedy_full, ids_of, prompt_module, trainable_names

V = 48


def tiny_gpt2(seed=0):
    net = GPT2LMHeadModel(config_from_dict({"model_type": "gpt2", "vocab_size": V, "n_embd": 32, "n_layer": 2,
                                            "n_head": 4, "n_positions": 64}))
    r = backend.RNG(seed)
    for _, p in net.named_parameters():
        p.data = r.normal(p.shape, std=0.3)
    return Model(net, seed=seed)


MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def cached_kv_as_prefix(make, u):
    """Z (T, 2L d_kv) from the base model's own KV cache after reading tokens u (T,) (PREFIX-2 layout)."""
    net = make().net
    c = net.config
    cache = KVCache(c.num_hidden_layers, 1, c.num_key_value_heads, len(u), c.head_dim, np.float32, np)
    with no_grad():
        net(u[None, :], cache=cache)
    slots = []
    for i in range(c.num_hidden_layers):
        slots += [cache.k[i][0].transpose(1, 0, 2), cache.v[i][0].transpose(1, 0, 2)]  # (T, Hkv, D) each
    return np.stack(slots, axis=1).reshape(len(u), -1)  # (T, 2L, Hkv, D) -> (T, 2L d_kv)


@pytest.mark.spec("PREFIX-1")
@SETTINGS
@given(T=st.integers(1, 5), h=st.integers(1, 12))
def test_tables_and_projection(T, h):
    m = tiny_llama().apply_prefix_tuning(num_virtual_tokens=T)
    assert prompt_module(m).output().shape == (T, 2 * 2 * 16)  # d_kv = 2 KV heads x 8
    p = prompt_module(tiny_llama().apply_prefix_tuning(num_virtual_tokens=T, prefix_projection=True, projection_dim=h))
    E, t = p.embedding.weight.data.astype(np.float64), p.transform
    W1, b1, W2, b2 = (x.data.astype(np.float64) for x in (t["0"].weight, t["0"].bias, t["2"].weight, t["2"].bias))
    assert E.shape == (T, 16) and W1.shape == (h, 16) and W2.shape == (64, h)
    assert_close(p.output().data, np.tanh(E @ W1.T + b1) @ W2.T + b2, rtol=1e-5, label="Z")


@pytest.mark.spec("PREFIX-2", "PREFIX-3")
@SETTINGS
@given(kind=st.sampled_from(["llama", "gpt2"]), T=st.integers(1, 5), n=st.integers(1, 6), seed=st.integers(0, 99))
def test_prefix_of_cached_kv_reproduces_base(kind, T, n, seed):
    make = MAKERS[kind]
    u, ids = ids_of(1, T, seed)[0], ids_of(2, n, seed + 1)
    m = make().apply_prefix_tuning(num_virtual_tokens=T)
    prompt_module(m).embedding.weight.data = cached_kv_as_prefix(make, u)
    full = make()(np.concatenate([np.broadcast_to(u, (2, T)), ids], axis=1)).data  # (2, T + n, V)
    out = m(ids).data
    assert out.shape == (2, n, V)
    assert_close(out, full[:, T:], rtol=2e-5, label=f"{kind} prefix == cached keys/values")


@pytest.mark.spec("PREFIX-4", "PTV2-2")
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_equals_greedy_full_forward(kind):
    m = MAKERS[kind]().apply_ptuning_v2(num_virtual_tokens=3, encoder_hidden_size=8)
    ids = ids_of(2, 5, seed=4)
    assert np.array_equal(m.generate(ids, max_new_tokens=4, eos_token_id=[]), greedy_full(m, ids, 4))


@pytest.mark.spec("PREFIX-5")
def test_only_prefix_parameters_get_gradients():
    m = tiny_llama().apply_prefix_tuning(num_virtual_tokens=3, prefix_projection=True, projection_dim=8)
    assert trainable_names(m) == sorted(f"prompt_encoder.default.{k}" for k in (
        "embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias"))
    ids = ids_of(2, 5)
    causal_lm_loss(m(ids), ids).backward()
    assert all((p.grad is not None) == n.startswith("prompt_encoder") for n, p in m.net.named_parameters())


@pytest.mark.spec("PREFIX-6", "PTV2-3")
def test_save_load_keeps_encoder_and_reads_peft_layout(tmp_path):
    m = tiny_llama().apply_ptuning_v2(num_virtual_tokens=3, encoder_hidden_size=8)
    ids = ids_of(2, 4)
    m.save_adapters(str(tmp_path / "a"))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["prefix_projection"], cfg["encoder_hidden_size"], cfg["token_dim"],
            cfg["num_attention_heads"]) == ("PREFIX_TUNING", True, 8, 16, 2)
    m2 = tiny_llama()
    m2.load_adapters(str(tmp_path / "a"))
    assert type(m2.peft_configs["default"]) is PrefixTuningConfig and prompt_module(m2).has_encoder
    assert np.array_equal(m2(ids).data, m(ids).data)
    tensors, _ = read_safetensors(str(tmp_path / "a" / "adapter_model.safetensors"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(cfg))
    write_safetensors(str(tmp_path / "b" / "adapter_model.safetensors"),
                      {"prompt_embeddings": tensors["prompt_embeddings"]}, {"format": "pt"})  # PEFT's file
    m3 = tiny_llama()
    m3.load_adapters(str(tmp_path / "b"))
    assert not prompt_module(m3).has_encoder
    assert trainable_names(m3) == ["prompt_encoder.default.embedding.weight"]
    assert_close(m3(ids).data, m(ids).data, rtol=1e-6, label="PEFT-layout reload")
    tensors["prompt_embeddings"] = tensors["prompt_embeddings"] + 1.0
    write_safetensors(str(tmp_path / "a" / "adapter_model.safetensors"), tensors, {"format": "pt"})
    with pytest.raises(CheckpointError, match="prompt_embeddings"):
        tiny_llama().load_adapters(str(tmp_path / "a"))


@pytest.mark.spec("PTV2-1")
def test_ptuning_v2_is_prefix_tuning_with_projection():
    ids = ids_of(2, 5)
    a = tiny_llama().apply_ptuning_v2(num_virtual_tokens=4, encoder_hidden_size=8)(ids).data
    b = tiny_llama().apply_prefix_tuning(num_virtual_tokens=4, prefix_projection=True, projection_dim=8)(ids).data
    assert np.array_equal(a, b)
    for kw, field in [(dict(encoder_num_layers=3), "encoder_num_layers"), (dict(encoder_hidden_size=0),
                      "encoder_hidden_size"), (dict(prefix_projection=False), "prefix_projection")]:
        with pytest.raises(ConfigError, match=field):
            PTuningV2Config(**kw)


@pytest.mark.spec("PREFIX-7")
def test_errors():
    for kw, field in [(dict(projection_dim=0), "projection_dim"), (dict(prefix_projection=1), "prefix_projection"),
                      (dict(num_virtual_tokens=-1), "num_virtual_tokens")]:
        with pytest.raises(ConfigError, match=field):
            PrefixTuningConfig(**kw)
    with pytest.raises(ConfigError, match="token_dim"):
        tiny_llama().apply_prefix_tuning(num_virtual_tokens=2, token_dim=32)  # d_kv is 16 (GQA)
    with pytest.raises(ConfigError, match="positions"):
        tiny_gpt2().apply_prefix_tuning(num_virtual_tokens=60)(ids_of(1, 8))
