"""spec/trainable_tokens.md (TRAINABLE_TOKENS-n) on tiny random Llama models, untied and tied, and GPT-2 (tied), each
claim rebuilt in NumPy from E'[t_j] = D[j]; and (oracle) against PEFT's TRAINABLE_TOKENS."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import hf_llama_folder, max_rel_err, tiny_llama
from minipeft.adapters.trainable_tokens import TrainableTokensConfig
from minipeft.errors import ConfigError
from minipeft.safetensors_io import read_safetensors
from test_dora import SETTINGS
from test_ln_tuning import make_gpt2
from test_peft_oracle import (LLAMA, base, check_both_ways_and_merged, lib, perturbed_peft_model,  # noqa: F401
                              report_gradients_from_peft, report_init_is_base)

IDS = np.random.default_rng(7).integers(0, 48, (2, 6))


def rows_of(model):
    return model.net.get_submodule(embedding_path(model)).adapters["default"].trainable_tokens_delta


def embedding_path(model):
    return "transformer.wte" if model.config.model_type == "gpt2" else "model.embed_tokens"


@pytest.mark.spec("TRAINABLE_TOKENS-1", "TRAINABLE_TOKENS-3")
@SETTINGS
@given(tokens=st.lists(st.integers(0, 47), min_size=1, max_size=6, unique=True), tied=st.booleans(),
       seed=st.integers(0, 2**16))
def test_forward_is_the_model_on_E_with_rows_replaced_and_merge_writes_them(tokens, tied, seed):
    model = tiny_llama(0, tie_word_embeddings=tied)
    E = model.net.model.embed_tokens.weight.numpy().copy()
    model.apply_trainable_tokens(token_indices=tokens)
    D = np.random.default_rng(seed).standard_normal((len(tokens), E.shape[1])).astype(np.float32)
    rows_of(model).data = D.copy()
    out = model(IDS).numpy()
    ref = tiny_llama(0, tie_word_embeddings=tied)  # the spec's E': E with row t_j = D[j], in a plain model
    E2 = E.copy()
    E2[tokens] = D
    ref.net.model.embed_tokens.weight.data = E2  # a tied head reads the same Tensor
    np.testing.assert_allclose(out, ref(IDS).numpy(), rtol=1e-6, atol=1e-6)
    model.merge_adapter()
    assert np.array_equal(model.net.model.embed_tokens.base_layer.weight.numpy(), E2)
    np.testing.assert_allclose(model(IDS).numpy(), out, rtol=1e-6, atol=1e-6)
    model.unmerge_adapter()
    assert np.array_equal(model.net.model.embed_tokens.base_layer.weight.numpy(), E)  # bit for bit
    np.testing.assert_allclose(model(IDS).numpy(), out, rtol=1e-6, atol=1e-6)


@pytest.mark.spec("TRAINABLE_TOKENS-2", "TRAINABLE_TOKENS-4")
@pytest.mark.parametrize("tied", [False, True])
def test_init_copies_the_rows_and_only_they_train(tied):
    model = tiny_llama(0, tie_word_embeddings=tied)
    base = model(IDS).numpy()
    E = model.net.model.embed_tokens.weight.numpy().copy()
    model.apply_trainable_tokens(token_indices=[2, 9, 30])
    assert np.array_equal(model(IDS).numpy(), base) and np.array_equal(rows_of(model).numpy(), E[[2, 9, 30]])
    ids = np.array([[2, 9, 4, 30, 30, 1]])
    model(ids).sum().backward()
    trained = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert list(trained) == ["model.embed_tokens.adapters.default.trainable_tokens_delta"]
    assert np.all(np.abs(rows_of(model).grad).max(axis=1) > 0)
    assert model.parameter_counts()[0] == 3 * 32  # k d, once even when lm_head shares it
    # D's gradient is what E's rows t would get with E trained in full
    full = tiny_llama(0, tie_word_embeddings=tied)
    full.net.model.embed_tokens.weight.requires_grad = True
    full(ids).sum().backward()
    np.testing.assert_allclose(rows_of(model).grad, np.asarray(full.net.model.embed_tokens.weight.grad)[[2, 9, 30]],
                               rtol=1e-5, atol=1e-6)
    rnd = tiny_llama(0)
    rnd.apply_trainable_tokens(token_indices=list(range(40)), init_weights=False)
    assert abs(rows_of(rnd).numpy().std() - 1) < 0.1 and max_rel_err(rnd(IDS), base) > 1e-3


@pytest.mark.spec("TRAINABLE_TOKENS-5")
def test_default_target_is_the_input_embedding_with_a_tied_head():
    untied = tiny_llama(0)
    untied.apply_trainable_tokens(token_indices=[1])
    assert untied.peft_configs["default"].target_modules == "model.embed_tokens"
    assert [p for p, m in untied.net.named_modules() if hasattr(m, "adapters")] == ["model.embed_tokens"]
    tied = tiny_llama(0, tie_word_embeddings=True)
    tied.apply_trainable_tokens(token_indices=[1])
    assert [p for p, m in tied.net.named_modules() if hasattr(m, "adapters")] == ["model.embed_tokens", "lm_head"]
    gpt2 = make_gpt2()
    gpt2.apply_trainable_tokens(token_indices=[1, 2])
    assert [p for p, m in gpt2.net.named_modules() if hasattr(m, "adapters")] == ["transformer.wte", "lm_head"]


@pytest.mark.spec("TRAINABLE_TOKENS-5")
@pytest.mark.parametrize("kwargs, match", [(dict(token_indices=[]), "token_indices"),
                                           (dict(token_indices=[3, 3]), "repeat"),
                                           (dict(token_indices=[1.5]), "integers"),
                                           (dict(token_indices=5), "list of ints"),
                                           (dict(token_indices=[48]), "below the layer's 48 embeddings"),
                                           (dict(token_indices=[1], target_modules=["q_proj"]), "matches no Embedding")])
def test_bad_configs_are_clear_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tiny_llama(0).apply_trainable_tokens(**kwargs)


@pytest.mark.spec("TRAINABLE_TOKENS-6")
def test_saved_keys_and_fields_are_peft_names(tmp_path):
    model = tiny_llama(0, tie_word_embeddings=True)
    model.apply_trainable_tokens(token_indices=[4, 8])
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "TRAINABLE_TOKENS" and cfg["token_indices"] == [4, 8] and cfg["init_weights"] is True
    assert cfg["target_modules"] == "model.embed_tokens" and "exclude_modules" not in cfg
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in keys.items()} == {f"base_model.model.{p}.trainable_tokens_delta": (2, 32)
                                                     for p in ("model.embed_tokens", "lm_head")}


@pytest.mark.spec("TRAINABLE_TOKENS-4")
def test_model_train_moves_only_the_rows():
    model = mp.load_model(mp.DEMO_MODEL)  # tied
    ids = [3, 5, 7, 9]
    model.apply_trainable_tokens(token_indices=ids)
    E = model.net.model.embed_tokens.base_layer.weight.numpy().copy()
    data = [{"input_ids": [3, 5, 7, 9, 3, 5, 7, 9]}] * 8
    h = model.train(data, mp.TrainingConfig(learning_rate=5e-2, batch_size=4, epochs=8, progress=False))
    assert h["loss"][-1] < 0.9 * h["loss"][0]
    assert np.array_equal(model.net.model.embed_tokens.base_layer.weight.numpy(), E)
    assert not np.array_equal(rows_of(model).numpy(), E[ids])


# ---- against PEFT ---------------------------------------------------------------------------------------
CASES = {"llama": ("llama", dict(token_indices=[1, 5, 9, 33])),  # untied, PEFT's default target
         "gpt2": ("gpt2", dict(token_indices=[0, 7, 63])),  # lm_head tied to wte
         "llama-target": ("llama", dict(token_indices=[2, 3], target_modules=["embed_tokens"]))}


@pytest.mark.oracle
@pytest.mark.spec("TRAINABLE_TOKENS-1", "TRAINABLE_TOKENS-3", "TRAINABLE_TOKENS-4", "TRAINABLE_TOKENS-6")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_on_merge_and_in_count(lib, base, case, tmp_path):
    check_case(lib, base(CASES[case][0]), CASES[case], f"TrainableTokens {case}", tmp_path, base)


def check_case(lib, folder, case, label, tmp_path, base=None, config_class="TrainableTokensConfig"):
    import peft
    torch = lib[0]
    pm = peft.get_peft_model(lib[1].AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval(),
                             getattr(peft, config_class)(**case[1]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)  # every trained row moved
    pm.eval()
    ids = torch.tensor(np.random.default_rng(1).integers(0, 64, (2, 9)))
    with pm.disable_adapter():
        plain = pm(ids).logits.detach().numpy()
    assert max_rel_err(pm(ids).logits.detach().numpy(), plain) > 1e-3
    trained = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    total = sum(p.numel() for p in pm.parameters())
    check_both_ways_and_merged(lib, pm, folder, tmp_path, label, ids.numpy())
    again = mp.load_model(folder)
    again.load_adapters(str(tmp_path / "peft"))
    assert type(again.peft_configs["default"]) is getattr(mp, config_class.replace("Lora", "LoRA"))
    assert again.parameter_counts() == (trained, total)


@pytest.mark.oracle
def test_a_tied_llama_agrees_both_ways(lib, tmp_path):
    folder = hf_llama_folder(str(tmp_path / "tied"), **{**LLAMA, "tie_word_embeddings": True})
    check_case(lib, folder, ("llama", dict(token_indices=[4, 6, 60])), "TrainableTokens tied llama", tmp_path)


@pytest.mark.oracle
@pytest.mark.spec("TRAINABLE_TOKENS-2", "TRAINABLE_TOKENS-4")
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_init_is_the_base_and_one_step_s_gradients_agree(lib, base, kind, tmp_path):
    kw = dict(token_indices=[1, 5, 9])
    report_init_is_base(lib, base(kind), "TrainableTokensConfig", kw, TrainableTokensConfig(**kw), f"TT {kind}")
    pm = perturbed_peft_model(lib, base, (kind, kw), "TrainableTokensConfig").eval()
    path = {"llama": "model.embed_tokens", "gpt2": "transformer.wte"}[kind]
    report_gradients_from_peft(lib, pm, base(kind), tmp_path, f"TT {kind}",
                               lambda n: f"{path}.adapters.default.trainable_tokens_delta", 1e-4)


# ---- LoRA's trainable_token_indices (TRAINABLE_TOKENS-7) ----------------------------------------------------------
LORA_CASES = {"llama": ("llama", dict(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5, 40])),
              "llama-dict": ("llama", dict(r=2, target_modules=["v_proj"],
                                           trainable_token_indices={"embed_tokens": [1, 2]})),
              "gpt2": ("gpt2", dict(r=2, target_modules=["c_attn"], trainable_token_indices=[0, 7]))}  # tied head


@pytest.mark.oracle
@pytest.mark.spec("TRAINABLE_TOKENS-7")
@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_with_trainable_tokens_agrees_with_peft(lib, base, case, tmp_path):
    check_case(lib, base(LORA_CASES[case][0]), LORA_CASES[case], f"LoRA + trainable tokens {case}", tmp_path, base,
               "LoraConfig")


@pytest.mark.oracle
@pytest.mark.spec("TRAINABLE_TOKENS-7")
def test_lora_with_trainable_tokens_on_a_tied_llama(lib, tmp_path):
    folder = hf_llama_folder(str(tmp_path / "tied"), **{**LLAMA, "tie_word_embeddings": True})
    check_case(lib, folder, ("llama", dict(r=2, target_modules=["q_proj"], trainable_token_indices=[4, 6])),
               "LoRA + trainable tokens, tied llama", tmp_path, config_class="LoraConfig")


@pytest.mark.spec("TRAINABLE_TOKENS-7")
@pytest.mark.parametrize("tied", [False, True])
def test_lora_s_token_rows_train_save_and_merge(tied, tmp_path):
    model = tiny_llama(0, tie_word_embeddings=tied)
    E = model.net.model.embed_tokens.weight.numpy().copy()
    model.apply_lora(rank=2, target_modules=["q_proj"], trainable_token_indices=[3, 5])
    saved = [k for k in mp.adapters.peft_io.adapter_tensors(model, "default") if "token" in k]
    assert saved == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]  # a tied head: none
    n = model.parameter_counts()[0]
    assert n == 2 * E.shape[1] + sum(2 * (a + b) for a, b in [(E.shape[1], E.shape[1])] * 2)  # D, and r (in + out)
    data = [{"input_ids": [3, 5, 7, 9, 3, 5, 7, 9]}] * 8
    model.train(data, mp.TrainingConfig(learning_rate=5e-2, batch_size=4, epochs=2, progress=False))
    rows = model.net.model.embed_tokens.adapters["default"].trainable_tokens_delta.numpy()
    assert not np.array_equal(rows, E[[3, 5]])
    model.net.eval()
    before = np.asarray(model(IDS).data)
    model.save_adapters(str(tmp_path / "a"))
    again = tiny_llama(0, tie_word_embeddings=tied)
    again.load_adapters(str(tmp_path / "a"))
    assert max_rel_err(np.asarray(again(IDS).data), before) < 1e-6
    assert json.load(open(tmp_path / "a" / "adapter_config.json"))["trainable_token_indices"] == [3, 5]
    merged = again.merge_and_unload()
    assert max_rel_err(np.asarray(merged(IDS).data), before) < 1e-5
    W = merged.net.model.embed_tokens.weight.numpy()
    assert np.allclose(W[[3, 5]], rows) and np.array_equal(np.delete(W, [3, 5], 0), np.delete(E, [3, 5], 0))


@pytest.mark.spec("TRAINABLE_TOKENS-7")
@pytest.mark.parametrize("indices, match", [([], "distinct token ids"), ([1, 1], "distinct token ids"),
                                            ({"nothing": [1]}, "names no embedding"), ([10 ** 6], "below")])
def test_lora_s_bad_token_indices_are_clear_errors(indices, match):
    model = tiny_llama(0)
    with pytest.raises(ConfigError, match=match):
        model.apply_lora(rank=2, trainable_token_indices=indices)
    assert not model.peft_configs
