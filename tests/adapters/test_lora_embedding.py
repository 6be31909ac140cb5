"""LoRA on embeddings (spec/lora.md LORA-15..LORA-18; minipeft/adapters/lora_embedding.py)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close, hf_llama_folder, max_rel_err, tiny_llama
from minipeft.adapters.lora_embedding import LoRAEmbedding
from minipeft.errors import ConfigError

IDS = np.array([[1, 5, 9, 3, 7, 2], [4, 4, 8, 0, 6, 1]])


def embedding_delta(model, name="default", path="model.embed_tokens"):
    return model.net.get_submodule(path).adapters[name]


def moved(model, seed=0, scale=0.1):
    """Every trainable tensor moved by seeded noise ("trained")."""
    g = np.random.default_rng(seed)
    for _, p in model.net.named_parameters():
        if p.requires_grad:
            p.data = p.data + (g.standard_normal(p.data.shape) * scale).astype(np.float32)
    return model


@pytest.mark.spec("LORA-15", "LORA-17")
@settings(max_examples=8, deadline=None)
@given(r=st.integers(1, 6), alpha=st.sampled_from([1, 8, 16]), rslora=st.booleans(),
       init=st.sampled_from(["default", "gaussian"]), dropout=st.sampled_from([0.0, 0.5]))
def test_forward_is_the_table_plus_the_scaled_rows_and_init_is_the_base(r, alpha, rslora, init, dropout):
    base = tiny_llama()
    ref = base(IDS).numpy()
    model = tiny_llama()
    model.apply_adapter(mp.LoRAConfig(rank=r, alpha=alpha, use_rslora=rslora, init=init, dropout=dropout,
                                      target_modules=("embed_tokens",)))
    d = embedding_delta(model)
    assert isinstance(d, LoRAEmbedding)
    assert np.array_equal(d.lora_embedding_A.data, np.zeros((r, model.config.vocab_size)))  # LORA-17: A = 0
    B = d.lora_embedding_B.data
    assert B.shape == (model.config.hidden_size, r) and 0.6 < B.std() < 1.4  # B ~ N(0, 1)
    assert np.array_equal(model(IDS).numpy(), ref)  # step 0: the base's output
    moved(model)
    s = alpha / np.sqrt(r) if rslora else alpha / r
    E = model.net.get_submodule("model.embed_tokens").base_layer.weight.data
    A, B = d.lora_embedding_A.data, d.lora_embedding_B.data
    want = E[IDS] + s * (A.T[IDS] @ B.T)  # LORA-15
    model.net.train()  # no dropout on embeddings: train mode gives the same rows
    got = model.net.get_submodule("model.embed_tokens")(IDS).data
    assert_close(got, want, rtol=1e-6, label="embedding rows")
    model.net.eval()
    assert np.array_equal(model.net.get_submodule("model.embed_tokens")(IDS).data, got)


@pytest.mark.spec("LORA-17")
def test_the_first_gradient_reaches_A_and_not_B():
    model = tiny_llama()
    model.apply_adapter(mp.LoRAConfig(rank=3, target_modules=("embed_tokens",)))
    d = embedding_delta(model)
    loss = model.net(IDS).sum()
    loss.backward()
    assert np.abs(d.lora_embedding_A.grad).max() > 0
    assert np.abs(d.lora_embedding_B.grad).max() == 0  # A = 0 at init
    counts = model.parameter_counts()
    assert counts[0] == 3 * (model.config.vocab_size + model.config.hidden_size)


@pytest.mark.spec("LORA-16")
@settings(max_examples=6, deadline=None)
@given(r=st.integers(1, 5), seed=st.integers(0, 100))
def test_merge_equals_unmerged_and_unmerge_restores(r, seed):
    model = moved(tiny_llama(), 0)  # a base that is not the default init
    E0 = model.net.get_submodule("model.embed_tokens").weight.data.copy()
    model.apply_adapter(mp.LoRAConfig(rank=r, target_modules=("embed_tokens", "v_proj")))
    moved(model, seed)
    d = embedding_delta(model)
    dE = d.delta_weight()
    assert dE.shape == E0.shape
    assert_close(dE, d.s * d.lora_embedding_A.data.T @ d.lora_embedding_B.data.T, rtol=1e-6, label="dE")
    out = model(IDS).numpy()
    model.merge_adapter()
    assert_close(model(IDS).numpy(), out, rtol=1e-5, label="merged")
    model.unmerge_adapter()
    assert_close(model.net.get_submodule("model.embed_tokens").base_layer.weight.data, E0, rtol=0, atol=1e-6,
                 label="unmerged table")


@pytest.mark.spec("LORA-18")
def test_save_load_round_trip_and_keys(tmp_path):
    model = moved(tiny_llama().apply_adapter(mp.LoRAConfig(rank=4, target_modules=("embed_tokens", "q_proj"))))
    model.save_adapters(str(tmp_path))
    keys = set(mp.safetensors_io.read_safetensors(str(tmp_path / "adapter_model.safetensors"))[0])
    assert {"base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.model.embed_tokens.lora_embedding_B"} <= keys
    assert not any("embed_tokens.lora_A" in k or "embed_tokens" in k and k.endswith(".weight") for k in keys)
    again = tiny_llama()
    again.load_adapters(str(tmp_path))
    assert np.array_equal(again(IDS).numpy(), model(IDS).numpy())


@pytest.mark.spec("LORA-18")
@pytest.mark.parametrize("fields, field", [
    ({"lora_bias": True}, "lora_bias"),
    ({"init": "pissa"}, "init"),
    ({"init": "olora"}, "init"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
])
def test_refusals_name_the_field_and_change_nothing(fields, field):
    model = tiny_llama()
    before = model(IDS).numpy()
    with pytest.raises(ConfigError, match=field):
        model.apply_adapter(mp.LoRAConfig(rank=2, target_modules=("embed_tokens", "q_proj"), **fields))
    assert model.peft_configs == {} and not mp.adapters.inject.adapted_layers(model.net)
    assert np.array_equal(model(IDS).numpy(), before)


@pytest.mark.spec("LORA-15")
def test_only_plain_lora_matches_embeddings_and_all_linear_never_does():
    model = tiny_llama()
    model.apply_adapter(mp.LoRAConfig(rank=2, target_modules="all-linear"))
    assert "model.embed_tokens" not in dict(mp.adapters.inject.adapted_layers(model.net))
    dora = tiny_llama()
    with pytest.warns(UserWarning, match="embed_tokens"):
        dora.apply_adapter(mp.DoRAConfig(rank=2, target_modules=("embed_tokens", "q_proj")))
    assert "model.embed_tokens" not in dict(mp.adapters.inject.adapted_layers(dora.net))


@pytest.mark.spec("LORA-15")
def test_mixed_batch_rows_get_their_own_adapter():
    model = tiny_llama()
    model.apply_adapter(mp.LoRAConfig(rank=2, target_modules=("embed_tokens",)), "a")
    model.apply_adapter(mp.LoRAConfig(rank=3, target_modules=("embed_tokens",)), "b")
    model.set_active_adapter(["a", "b"])
    moved(model)
    outs = {}
    for n in ("a", "b"):
        model.set_active_adapter(n)
        outs[n] = model(IDS).numpy()
    with mp.adapters.inject.mixed_batch(model, ["b", "a"], 2):
        mixed = model(IDS).numpy()
    assert_close(mixed[0], outs["b"][0], rtol=1e-5, label="row 0 = b")
    assert_close(mixed[1], outs["a"][1], rtol=1e-5, label="row 1 = a")


# ---- against PEFT, both ways ---------------------------------------------------------------------------------
HF = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64)


@pytest.mark.oracle
@pytest.mark.spec("LORA-15", "LORA-16", "LORA-18")
@pytest.mark.parametrize("fields", [{"rank": 4}, {"rank": 3, "alpha": 5, "use_rslora": True},
                                    {"rank": 2, "rank_pattern": {"embed_tokens": 5}, "alpha_pattern": {"q_proj": 3}}])
def test_peft_loads_ours_and_we_load_peft_s(fields, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers
    folder = hf_llama_folder(str(tmp_path / "base"), **HF)
    model = mp.load_model(folder)
    model.apply_adapter(mp.LoRAConfig(target_modules=("embed_tokens", "q_proj", "v_proj"), **fields))
    moved(model)
    model.save_adapters(str(tmp_path / "ours"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()
    emb = pm.base_model.model.model.embed_tokens
    assert type(emb).__name__ == "Embedding" and hasattr(emb, "lora_embedding_A")  # PEFT's lora.Embedding
    with torch.no_grad():
        theirs = pm(torch.tensor(IDS)).logits.numpy()
    err = max_rel_err(model(IDS).numpy(), theirs)
    print(f"\n  minipeft -> PEFT: max rel err {err:.2e}")
    assert err < 1e-5
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        table = pm.base_model.model.model.embed_tokens.base_layer.weight  # PEFT saves the targeted table (LORA-18)
        table.add_(torch.randn(table.shape, generator=g) * 0.1)  # so a load that skipped it would differ
        theirs = pm(torch.tensor(IDS)).logits.numpy()
    pm.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        merged = pm.merge_and_unload()(torch.tensor(IDS)).logits.numpy()
    back = mp.load_model(folder)
    back.load_adapters(str(tmp_path / "peft"))
    err = max_rel_err(back(IDS).numpy(), theirs)
    print(f"  PEFT -> minipeft: max rel err {err:.2e}")
    assert err < 1e-5
    ours_merged = back.merge_and_unload()(IDS).numpy()
    err = max_rel_err(ours_merged, merged)
    print(f"  merge_and_unload: max rel err {err:.2e}")
    assert err < 1e-5


@pytest.mark.oracle
@pytest.mark.spec("LORA-16")
def test_gpt2_tied_wte_matches_peft_unmerged_and_merged(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                              n_positions=32)).eval()
    hf.save_pretrained(str(tmp_path / "base"))
    model = mp.load_model(str(tmp_path / "base"))
    model.apply_adapter(mp.LoRAConfig(rank=4, target_modules=("wte", "c_attn")))
    moved(model)
    model.save_adapters(str(tmp_path / "ours"))
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        theirs = pm(torch.tensor(IDS)).logits.numpy()
        err = max_rel_err(model(IDS).numpy(), theirs)
        print(f"\n  gpt2 unmerged: max rel err {err:.2e}")
        assert err < 1e-5
        pm.merge_adapter()  # the tied lm_head reads the merged table too
        theirs_merged = pm(torch.tensor(IDS)).logits.numpy()
    model.merge_adapter()
    err = max_rel_err(model(IDS).numpy(), theirs_merged)
    print(f"  gpt2 merged (tied head): max rel err {err:.2e}")
    assert err < 1e-5
    assert max_rel_err(theirs_merged, theirs) > 1e-3  # the tied head did change: the test can tell


@pytest.mark.spec("LORA-16")
def test_audit_reads_the_embedding_delta_and_convert_refuses_it(tmp_path):
    from minipeft.audit.adapter import audit_adapter
    from minipeft.audit.convert import audit_convert
    base = tiny_llama()
    base.save(str(tmp_path / "base"))
    model = moved(tiny_llama().apply_adapter(mp.LoRAConfig(rank=3, target_modules=("embed_tokens", "q_proj"))))
    model.save_adapters(str(tmp_path / "ad"))
    r = audit_adapter(str(tmp_path / "ad"), str(tmp_path / "base"), show_progress=False)
    assert r.status == 0, [f.message for f in r.findings]
    row = {row.path: row for row in r.layers}["model.embed_tokens"]
    dE = embedding_delta(model).delta_weight()
    assert row.shape == dE.shape  # (V, d): the table's own layout
    assert abs(row.spectrum.fro - np.linalg.norm(dE)) <= 1e-5 * np.linalg.norm(dE)
    with pytest.raises(ConfigError, match="embedding model.embed_tokens"):
        audit_convert(str(tmp_path / "ad"), 2, str(tmp_path / "out"), str(tmp_path / "base"), show_progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="embedding model.embed_tokens"):
        model.save_as_lora(str(tmp_path / "out2"), 2, show_progress=False)
    assert not (tmp_path / "out2").exists()


# ---- target_parameters (LORA-19) ---------------------------------------------------------------------------
@pytest.mark.spec("LORA-19")
@settings(max_examples=5, deadline=None)
@given(r=st.integers(1, 4), seed=st.integers(0, 50))
def test_target_parameters_is_lora_on_those_linears_without_dropout(r, seed):
    by_param = tiny_llama().apply_adapter(mp.LoRAConfig(rank=r, target_modules=(),
                                                        target_parameters=["q_proj.weight", "mlp.down_proj.weight"]))
    by_module = tiny_llama().apply_adapter(mp.LoRAConfig(rank=r, target_modules=("q_proj", "down_proj")))
    paths = [p for p, _ in mp.adapters.inject.adapted_layers(by_param.net)]
    assert paths == [p for p, _ in mp.adapters.inject.adapted_layers(by_module.net)] and len(paths) == 4
    moved(by_module, seed)
    trained = dict(by_module.net.named_parameters())
    for n, p in by_param.net.named_parameters():  # the same factors (the init draws come in another order)
        p.data = trained[n].data.copy()
    assert np.array_equal(by_param(IDS).numpy(), by_module(IDS).numpy())
    assert by_param.parameter_counts() == by_module.parameter_counts()


@pytest.mark.spec("LORA-19")
@pytest.mark.parametrize("fields, match", [
    ({"target_parameters": ["embed_tokens.weight"]}, "weight of a float Linear"),
    ({"target_parameters": ["input_layernorm.weight"]}, "weight of a float Linear"),
    ({"target_parameters": ["nope.weight"]}, "matches no parameter"),
    ({"target_parameters": ["q_proj.weight"], "dropout": 0.1}, "dropout"),
    ({"target_parameters": ["q_proj.weight"], "lora_bias": True}, "lora_bias"),
    ({"target_parameters": ["q_proj.weight"], "init": "pissa"}, "init"),
    ({"target_parameters": ["q_proj.weight"], "target_modules": ("q_proj",)}, "by target_modules and by target_parameters"),
])
def test_target_parameters_refusals(fields, match):
    model = tiny_llama()
    with pytest.raises(ConfigError, match=match):
        model.apply_adapter(mp.LoRAConfig(**{"target_modules": (), **fields}))
    assert model.peft_configs == {} and not mp.adapters.inject.adapted_layers(model.net)
    with pytest.raises(ConfigError, match="target_parameters"):
        mp.DoRAConfig(target_modules=(), target_parameters=["q_proj.weight"])


@pytest.mark.oracle
@pytest.mark.spec("LORA-19")
def test_target_parameters_against_peft_both_ways(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers
    folder = hf_llama_folder(str(tmp_path / "base"), **HF)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=3, lora_alpha=7, target_modules=[],
                                                 target_parameters=["q_proj.weight", "mlp.down_proj.weight"])).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        theirs = pm(torch.tensor(IDS)).logits.numpy()
    pm.save_pretrained(str(tmp_path / "peft"))
    back = mp.load_model(folder)
    back.load_adapters(str(tmp_path / "peft"))
    assert back.peft_configs["default"].target_parameters == ("q_proj.weight", "mlp.down_proj.weight")
    err = max_rel_err(back(IDS).numpy(), theirs)
    print(f"\n  target_parameters PEFT -> minipeft: max rel err {err:.2e}")
    assert err < 1e-5
    moved(back, 5)
    back.save_adapters(str(tmp_path / "ours"))
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    pm2 = peft.PeftModel.from_pretrained(hf2, str(tmp_path / "ours")).eval()
    assert type(pm2.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "ParamWrapper"
    with torch.no_grad():
        theirs = pm2(torch.tensor(IDS)).logits.numpy()
    err = max_rel_err(back(IDS).numpy(), theirs)
    print(f"  target_parameters minipeft -> PEFT: max rel err {err:.2e}")
    assert err < 1e-5
