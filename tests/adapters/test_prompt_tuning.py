"""spec/prompt_tuning.md (PROMPT-n) on tiny random Llama / GPT-2 models built in process. Each claim is
rebuilt independently: the prompt-tuned logits against the *base* model run on inputs_embeds =
[P; E[ids]] (a code path without the adapter), the loss against a NumPy cross-entropy, generate
against greedy full forwards. Helpers here are shared by the other prompt-learning test files."""
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minipeft
from helpers import assert_close, tiny_llama
from minipeft import LoRAConfig, PromptTuningConfig
from minipeft.autograd import Tensor
from minipeft.errors import ConfigError
from minipeft.models.blocks import causal_lm_loss

SETTINGS = settings(max_examples=10, deadline=None)
V = 48


def ids_of(B, n, seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, n))


def prompt_module(model, name="default"):
    return model.net.prompt_encoder[name]


def base_on_embeds(x):
    """The plain base model (same seed, no adapter) on inputs_embeds x (B, S, d)."""
    return tiny_llama().net(inputs_embeds=Tensor(np.asarray(x, np.float32))).data


def greedy_full(model, ids, n):
    seq = ids
    for _ in range(n):
        seq = np.concatenate([seq, model(seq).data[:, -1].argmax(-1)[:, None]], axis=1)
    return seq


def trainable_names(model):
    return sorted(n for n, p in model.net.named_parameters() if p.requires_grad)


class FakeTokenizer:
    def encode(self, text):
        return [ord(c) % V for c in text]


@pytest.mark.spec("PROMPT-1")
@SETTINGS
@given(T=st.integers(1, 9), text=st.text("abcdefgh", min_size=1, max_size=12))
def test_init_text_and_sample_vocab(T, text):
    E = tiny_llama().net.model.embed_tokens.weight.data
    m = tiny_llama()
    m.tokenizer = FakeTokenizer()
    m.apply_prompt_tuning(num_virtual_tokens=T, init_text=text)
    t = [ord(c) % V for c in text]
    want = [t[i % len(t)] for i in range(T)]  # cut, or repeated and cut
    assert np.array_equal(prompt_module(m).embedding.weight.data, E[want])
    s = tiny_llama().apply_prompt_tuning(num_virtual_tokens=T, init="sample_vocab")
    rows = prompt_module(s).embedding.weight.data
    assert all(any(np.array_equal(r, e) for e in E) for r in rows)


@pytest.mark.spec("PROMPT-1")
def test_init_random_std():
    P = prompt_module(tiny_llama(max_position_embeddings=512).apply_prompt_tuning(num_virtual_tokens=400,
                                                                          initializer_range=0.5)).embedding.weight
    assert abs(float(np.std(P.data)) - 0.5) < 0.02 and abs(float(np.mean(P.data))) < 0.02


@pytest.mark.spec("PROMPT-2")
@SETTINGS
@given(T=st.integers(1, 6), B=st.integers(1, 3), n=st.integers(1, 8), seed=st.integers(0, 99))
def test_forward_is_base_on_prompt_then_embeddings(T, B, n, seed):
    m = tiny_llama().apply_prompt_tuning(num_virtual_tokens=T)
    ids = ids_of(B, n, seed)
    out = m(ids).data
    P = prompt_module(m).embedding.weight.data
    E = m.net.model.embed_tokens.weight.data
    x = np.concatenate([np.broadcast_to(P, (B, T, P.shape[1])), E[ids]], axis=1)
    assert out.shape == (B, T + n, V)
    assert_close(out, base_on_embeds(x), rtol=1e-6, label="prompt-tuned logits")
    mask = np.ones((B, n), dtype=np.int64)
    assert_close(m(ids, attention_mask=mask).data, out, rtol=1e-6, label="all-ones mask")


@pytest.mark.spec("PROMPT-3")
def test_loss_ignores_virtual_positions():
    T, ids = 3, ids_of(2, 6)
    m = tiny_llama().apply_prompt_tuning(num_virtual_tokens=T)
    logits = m(ids)
    labels = ids.copy()
    labels[1, :2] = -100
    loss = causal_lm_loss(logits, labels).item()
    z = logits.data.astype(np.float64)[:, T - 1:-1]  # position T-1+j predicts labels[:, j]
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    keep = labels != -100
    nll = lse - np.take_along_axis(z, np.where(keep, labels, 0)[..., None], -1)[..., 0]
    assert abs(loss - nll[keep].mean()) < 1e-5


@pytest.mark.spec("PROMPT-4")
def test_only_the_prompt_gets_gradients():
    m = tiny_llama().apply_prompt_tuning(num_virtual_tokens=4)
    assert trainable_names(m) == ["prompt_encoder.default.embedding.weight"]
    ids = ids_of(2, 5)
    causal_lm_loss(m(ids), ids).backward()
    P = prompt_module(m).embedding.weight
    assert P.grad is not None and np.abs(P.grad).max() > 0
    assert all(p.grad is None for n, p in m.net.named_parameters() if not n.startswith("prompt_encoder"))


@pytest.mark.spec("PROMPT-5")
def test_save_load_round_trip(tmp_path):
    m = tiny_llama().apply_prompt_tuning(num_virtual_tokens=5)
    ids = ids_of(2, 4)
    m.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["token_dim"] == 32 and cfg["num_layers"] == 2
    assert cfg["prompt_tuning_init"] == "RANDOM" and "target_modules" not in cfg
    from minipeft.safetensors_io import read_safetensors
    tensors, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].shape == (5, 32)
    m2 = tiny_llama(seed=0)
    m2.load_adapters(str(tmp_path))
    assert np.array_equal(m2(ids).data, m(ids).data)


@pytest.mark.spec("PROMPT-6")
@pytest.mark.parametrize("T", [1, 4])
def test_generate_equals_greedy_full_forward(T):
    m = tiny_llama().apply_prompt_tuning(num_virtual_tokens=T)
    ids = ids_of(2, 5, seed=3)
    assert np.array_equal(m.generate(ids, max_new_tokens=4, eos_token_id=[]), greedy_full(m, ids, 4))


@pytest.mark.spec("PROMPT-7")
def test_one_active_switch_disable_delete_merge():
    ids = ids_of(1, 5)
    base = tiny_llama()(ids).data
    m = tiny_llama().apply_prompt_tuning(num_virtual_tokens=3)
    m.apply_prompt_tuning(num_virtual_tokens=2, name="other")
    m.apply_lora(LoRAConfig(rank=2), name="lora")
    a = m(ids).data
    m.set_active_adapter("other")
    assert m(ids).shape == (1, 7, V) and trainable_names(m) == ["prompt_encoder.other.embedding.weight"]
    with pytest.raises(ConfigError, match="prompt-learning adapter"):
        m.set_active_adapter(["other", "lora"])
    with pytest.raises(ConfigError, match="cannot be merged"):
        m.merge_and_unload()
    with m.disable_adapters():
        assert np.array_equal(m(ids).data, base)
    m.delete_adapter("other")
    m.set_active_adapter("default")
    assert np.array_equal(m(ids).data, a)
    with pytest.raises(Exception, match="adapter"):
        m.save("/tmp/never")
    m.unload()
    assert np.array_equal(m(ids).data, base) and getattr(m.net, "prompt_encoder", None) is None


@pytest.mark.spec("PROMPT-8")
@pytest.mark.parametrize("kw, field", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens"), (dict(num_virtual_tokens=2.5), "num_virtual_tokens"),
    (dict(init="zeros"), "init"), (dict(init="text"), "init_text"), (dict(initializer_range=0), "initializer_range"),
    (dict(num_transformer_submodules=2), "num_transformer_submodules"), (dict(token_dim=0), "token_dim")])
def test_config_errors(kw, field):
    with pytest.raises(ConfigError, match=field):
        PromptTuningConfig(**kw)


@pytest.mark.spec("PROMPT-8")
def test_model_errors():
    with pytest.raises(ConfigError, match="num_layers"):
        tiny_llama().apply_prompt_tuning(num_virtual_tokens=2, num_layers=5)
    with pytest.raises(ConfigError, match="init_text"):
        tiny_llama().apply_prompt_tuning(init_text="abc")  # no tokenizer
    from minipeft.model import Model
    from minipeft.models.bert import BertModel
    from minipeft.models.config import config_from_dict
    bert = Model(BertModel(config_from_dict({"model_type": "bert", "vocab_size": 30, "hidden_size": 16,
                                             "num_hidden_layers": 1, "num_attention_heads": 2,
                                             "intermediate_size": 32, "max_position_embeddings": 16})))
    with pytest.raises(ConfigError, match="model_type"):
        bert.apply_prompt_tuning(num_virtual_tokens=2)


CARRIED = os.path.join(os.path.dirname(minipeft.__file__), "data", "tiny-llama-chars")


@pytest.mark.spec("PROMPT-9")
def test_init_text_saves_the_tokenizer_peft_needs(tmp_path):
    """Before: an init_text adapter's adapter_config.json had no tokenizer_name_or_path, which PEFT's
    PromptTuningConfig requires for prompt_tuning_init TEXT. Now it holds the base model's path or id,
    reloads with it, and a path the user gave is kept."""
    m = minipeft.load_model(CARRIED).apply_prompt_tuning(num_virtual_tokens=6, init_text="next")
    m.save_adapters(str(tmp_path / "a"))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["prompt_tuning_init"] == "TEXT" and cfg["tokenizer_name_or_path"] == CARRIED
    again = minipeft.load_model(CARRIED)
    again.load_adapters(str(tmp_path / "a"))
    assert again.peft_configs["default"].tokenizer_name_or_path == CARRIED
    mine = minipeft.load_model(CARRIED).apply_prompt_tuning(init_text="ab", tokenizer_name_or_path="my/tok")
    mine.save_adapters(str(tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["tokenizer_name_or_path"] == "my/tok"
    random = tiny_llama().apply_prompt_tuning(num_virtual_tokens=2)
    random.save_adapters(str(tmp_path / "c"))  # no text, no tokenizer: PEFT's RANDOM needs none
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["tokenizer_name_or_path"] is None


@pytest.mark.spec("PROMPT-10")
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "ptuning", "ptuning_v2"])
def test_virtual_tokens_beyond_the_context_are_refused_when_applied(method, tmp_path):
    """Before: num_virtual_tokens=64 on a 64-position llama was accepted, trained, and generate then said
    '1 + 1 tokens exceed the 64 positions', naming neither the virtual tokens nor the field. Now applying
    it is a ConfigError naming the field, the value and the limit; loading such a file a CheckpointError
    saying the same; and generate's error counts the virtual tokens."""
    apply = lambda m, T: getattr(m, f"apply_{method}")(num_virtual_tokens=T)  # noqa: E731
    m = tiny_llama()
    with pytest.raises(ConfigError, match=r"num_virtual_tokens=64 is invalid: this llama model has "
                                          r"max_position_embeddings=64 positions.*use num_virtual_tokens < 64"):
        apply(m, 64)
    assert m.peft_configs == {} and getattr(m.net, "prompt_encoder", None) is None
    apply(m, 63)
    with pytest.raises(ConfigError, match=r"63 virtual tokens \(num_virtual_tokens of the active prompt adapter\) "
                                          r"\+ 1 prompt tokens \+ 1 new tokens exceed the 64 positions.*num_virtual_t"):
        m.generate(np.ones((1, 1), np.int64), max_new_tokens=1)
    m.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "num_virtual_tokens": 100}))
    from minipeft.errors import CheckpointError
    with pytest.raises(CheckpointError, match=r"does not fit the model: num_virtual_tokens=100 is invalid.*< 64"):
        tiny_llama().load_adapters(str(tmp_path))
