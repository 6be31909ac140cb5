"""spec/transformer.md without torch: tiny random checkpoints of every family written by minipeft
(config.json in transformers' layout + safetensors), the claims rebuilt in numpy, and every bad
input refused with a CheckpointError that names the file and the key (MODEL-1, MODEL-7, MODEL-9).
The comparison with transformers itself is tests/test_models_oracle.py."""
import json
import os
import shutil
import time

import numpy as np
import pytest

import minipeft
from helpers import assert_close
from minipeft import backend
from minipeft.autograd import Tensor, no_grad
from minipeft.autograd import functional as F
from minipeft.errors import CheckpointError, ConfigError
from minipeft.models import io
from minipeft.models.blocks import KVCache, attention_mask_bias, causal_lm_loss, rope_tables
from minipeft.models.config import config_from_dict, read_config
from minipeft.models.generate import position_ids_from_mask
from minipeft.safetensors_io import read_safetensors, write_safetensors

V, D_MODEL = 48, 32
COMMON = dict(vocab_size=V, hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64)
CONFIGS = {  # config.json as transformers 5 writes it (the fields minipeft reads, and a few it ignores)
    "llama": dict(COMMON, model_type="llama", num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}),
    "mistral": dict(COMMON, model_type="mistral", num_key_value_heads=2, sliding_window=4,
                    rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}),
    "qwen2": dict(COMMON, model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=False,
                  rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}),
    "phi": dict(COMMON, model_type="phi", num_key_value_heads=4, qk_layernorm=True, hidden_act="gelu_new",
                layer_norm_eps=1e-5, rope_parameters={"partial_rotary_factor": 0.5, "rope_theta": 10000.0,
                                                      "rope_type": "default"}),
    "gpt2": dict(model_type="gpt2", vocab_size=V, n_embd=D_MODEL, n_layer=2, n_head=4, n_inner=None, n_positions=64,
                 activation_function="gelu_new", layer_norm_epsilon=1e-5, scale_attn_weights=True,
                 tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256),
    "bert": dict(COMMON, model_type="bert", hidden_act="gelu", layer_norm_eps=1e-12, type_vocab_size=2, pad_token_id=0,
                 tie_word_embeddings=True),
}
FAMILIES = tuple(CONFIGS)
CAUSAL = FAMILIES[:-1]


def random_weights(raw, seed=0):
    """{key: float32 array} for every parameter of the family's model, std 0.3 (norm weights 1 + 0.3 N)."""
    net = io.build(config_from_dict(raw))
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in net.named_parameters():
        w = rng.standard_normal(p.shape).astype(np.float32) * np.float32(0.3)
        out[name] = w + np.float32(1.0) if "norm" in name.lower() and name.endswith("weight") else w
    return out


def write_folder(path, raw, weights, dtypes=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    write_safetensors(os.path.join(path, "model.safetensors"), weights, {"format": "pt"}, dtypes)
    return str(path)


@pytest.fixture
def folder(tmp_path):
    def make(family):
        path = tmp_path / family
        return str(path) if path.exists() else write_folder(path, CONFIGS[family], random_weights(CONFIGS[family]))
    return make


def ids_and_mask(B=2, T=9, pads=3, seed=1):
    ids = np.random.default_rng(seed).integers(1, V, (B, T))
    mask = np.ones((B, T), dtype=np.int64)
    mask[0, :pads] = 0
    return ids, mask


# ---- MODEL-1: config.json ---------------------------------------------------------------------
@pytest.mark.spec("MODEL-1")
def test_transformers_4_and_5_layouts_read_the_same():
    v5 = config_from_dict(CONFIGS["phi"])
    v4 = dict(CONFIGS["phi"], rope_theta=10000.0, partial_rotary_factor=0.5, rope_scaling=None)
    del v4["rope_parameters"]
    v4 = config_from_dict(v4)
    for f in ("rope_theta", "partial_rotary_factor", "rotary_dim", "head_dim", "norm_eps", "hidden_act"):
        assert getattr(v4, f) == getattr(v5, f), f
    assert (v5.rotary_dim, v5.head_dim, v5.qk_layernorm) == (4, 8, True)
    llama5 = config_from_dict(dict(CONFIGS["llama"], rope_parameters={"rope_theta": 5e5, "rope_type": "linear",
                                                                       "factor": 2.0}))
    llama4 = config_from_dict(dict(CONFIGS["llama"], rope_parameters=None, rope_theta=5e5,
                                   rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert llama5.rope_theta == llama4.rope_theta == 5e5
    assert llama5.rope_scaling["factor"] == llama4.rope_scaling["factor"] == 2.0
    gpt2 = config_from_dict(CONFIGS["gpt2"])  # GPT-2 names, n_inner = null means 4 d
    assert (gpt2.hidden_size, gpt2.num_hidden_layers, gpt2.intermediate_size) == (32, 2, 128)
    assert (gpt2.hidden_act, gpt2.tie_word_embeddings, gpt2.max_position_embeddings) == ("gelu_new", True, 64)
    assert config_from_dict({k: v for k, v in CONFIGS["phi"].items() if k != "rope_parameters"}).rotary_dim == 4


BAD_CONFIGS = [  # (change to the llama config, the field the message must name)
    ({"model_type": "t5"}, "model_type"),
    ({"model_type": None}, "model_type"),
    ({"vocab_size": None}, "vocab_size"),
    ({"hidden_size": "32"}, "hidden_size"),
    ({"num_attention_heads": 4.0}, "num_attention_heads"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"rms_norm_eps": "small"}, "norm_eps"),
    ({"num_hidden_layers": 10**12}, "num_hidden_layers"),
    ({"vocab_size": 10**9}, "vocab_size"),
    ({"intermediate_size": -1}, "intermediate_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_attention_heads": 5}, "num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn"}}, "yarn"),
    ({"rope_parameters": [1, 2]}, "rope_parameters"),
    ({"rope_scaling": "linear"}, "rope_scaling"),
]


@pytest.mark.spec("MODEL-1")
@pytest.mark.parametrize("change,field", BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_bad_config_is_refused_before_allocating(tmp_path, monkeypatch, change, field):
    raw = dict(CONFIGS["llama"])
    for k, v in change.items():
        if v is None:
            raw.pop(k)
        else:
            raw[k] = v
    path = write_folder(tmp_path / "m", raw, {})
    monkeypatch.setattr(io, "build", lambda cfg: pytest.fail("a model was built from a bad config"))
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        minipeft.load_model(path)
    assert time.perf_counter() - start < 5.0  # from config.json alone (generous: CI machines are shared)
    msg = str(e.value)
    assert os.path.join(path, "config.json") in msg and field in msg, msg


@pytest.mark.spec("MODEL-1")
@pytest.mark.parametrize("family,change,field", [
    ("bert", {"is_decoder": True}, "is_decoder"),
    ("bert", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ("gpt2", {"activation_function": "swish"}, "hidden_act"),
    ("phi", {"rope_parameters": {"partial_rotary_factor": 1.5}}, "partial_rotary_factor"),
    ("phi", {"rope_parameters": {"partial_rotary_factor": 0.125}}, "partial_rotary_factor"),
])
def test_options_minipeft_does_not_compute_are_refused(family, change, field):
    with pytest.raises(CheckpointError) as e:
        config_from_dict(dict(CONFIGS[family], **change), "some/config.json")
    assert "some/config.json" in str(e.value) and field in str(e.value), str(e.value)


# ---- MODEL-2 / MODEL-5: forward shapes and structure --------------------------------------------
@pytest.mark.spec("MODEL-2", "MODEL-5")
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_shapes_and_keys(folder, family):
    m = minipeft.load_model(folder(family))
    ids, mask = ids_and_mask()
    out = m(ids, attention_mask=mask)
    assert out.shape == ((2, 9, D_MODEL) if family == "bert" else (2, 9, V))
    assert np.isfinite(out.numpy()).all()
    saved, _ = read_safetensors(os.path.join(folder(family), "model.safetensors"))
    assert set(saved) == {n for n, _ in m.net.named_parameters()}
    tied = {"qwen2": ("model.embed_tokens", "lm_head"), "gpt2": ("transformer.wte", "lm_head")}.get(family)
    if tied:  # one Tensor, saved once under the embedding's key
        assert m.net.get_submodule(tied[0]).weight is m.net.get_submodule(tied[1]).weight


def numpy_gpt2_block(x, W, i, H):
    """One GPT-2 block from the MODEL-5 formula in numpy (float64), Conv1D weights (in, out)."""
    def ln(z, w, b):
        mu = z.mean(-1, keepdims=True)
        return (z - mu) / np.sqrt(((z - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b
    p = f"transformer.h.{i}."
    T, d = x.shape
    qkv = ln(x, W[p + "ln_1.weight"], W[p + "ln_1.bias"]) @ W[p + "attn.c_attn.weight"] + W[p + "attn.c_attn.bias"]
    q, k, v = (qkv[:, j * d:(j + 1) * d].reshape(T, H, d // H).transpose(1, 0, 2) for j in range(3))
    s = q @ k.transpose(0, 2, 1) / np.sqrt(d // H) + np.triu(np.full((T, T), -np.inf), 1)
    a = np.exp(s - s.max(-1, keepdims=True))
    a = (a / a.sum(-1, keepdims=True) @ v).transpose(1, 0, 2).reshape(T, d)
    h = x + a @ W[p + "attn.c_proj.weight"] + W[p + "attn.c_proj.bias"]
    u = ln(h, W[p + "ln_2.weight"], W[p + "ln_2.bias"]) @ W[p + "mlp.c_fc.weight"] + W[p + "mlp.c_fc.bias"]
    g = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
    return h + g @ W[p + "mlp.c_proj.weight"] + W[p + "mlp.c_proj.bias"]


@pytest.mark.spec("MODEL-5")
def test_gpt2_equals_the_formula_with_conv1d_weights(folder):
    m = minipeft.load_model(folder("gpt2"))
    stored, _ = read_safetensors(os.path.join(folder("gpt2"), "model.safetensors"))
    W = {k: v.astype(np.float64) for k, v in stored.items()}
    ids = np.random.default_rng(3).integers(0, V, (1, 7))
    x = W["transformer.wte.weight"][ids[0]] + W["transformer.wpe.weight"][:7]
    for i in range(2):
        x = numpy_gpt2_block(x, W, i, 4)
    mu = x.mean(-1, keepdims=True)
    x = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * W["transformer.ln_f.weight"] \
        + W["transformer.ln_f.bias"]
    assert_close(m(ids)[0], x @ W["transformer.wte.weight"].T, rtol=1e-5, label="gpt2 logits")


@pytest.mark.spec("MODEL-5")
def test_partial_rotary_leaves_the_tail_features():
    cfg = config_from_dict(CONFIGS["phi"])
    pos = np.arange(5)[None, :]
    cos, sin = rope_tables(cfg, pos)
    assert cos.shape == (1, 1, 5, cfg.rotary_dim) == (1, 1, 5, 4)
    x = np.random.default_rng(0).standard_normal((1, 4, 5, 8)).astype(np.float32)
    y = F.rope(Tensor(x), cos, sin).numpy()
    r = cfg.rotary_dim
    assert (y[..., r:] == x[..., r:]).all()
    half = np.concatenate([-x[..., r // 2:r], x[..., :r // 2]], axis=-1)
    assert_close(y[..., :r], x[..., :r] * cos + half * sin, rtol=1e-6, label="rotated part")


@pytest.mark.spec("MODEL-5")
def test_bert_token_types_and_post_norm(folder):
    m = minipeft.load_model(folder("bert"))
    ids, _ = ids_and_mask()
    h0, h1 = m(ids).numpy(), m(ids, token_type_ids=np.ones_like(ids)).numpy()
    assert not np.allclose(h0, h1)  # token types reach the output
    ln = m.net.encoder.layer[1].output.LayerNorm  # post-norm: the output is a LayerNorm's
    z = (h0 - ln.bias.numpy()) / ln.weight.numpy()
    assert_close(z.mean(-1), np.zeros(z.shape[:-1]), atol=1e-4, label="mean")
    assert_close(z.var(-1), np.ones(z.shape[:-1]), rtol=1e-3, label="variance")


# ---- MODEL-3: rotary tables -------------------------------------------------------------------
@pytest.mark.spec("MODEL-3")
@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}])
def test_rope_tables_are_transformers_float32_formula(scaling):
    cfg = config_from_dict(dict(CONFIGS["llama"], rope_parameters=None, rope_theta=500000.0, rope_scaling=scaling))
    pos = np.array([[0, 1, 2, 1000], [5, 6, 7, 8]])
    cos, sin = rope_tables(cfg, pos)
    rot = cfg.rotary_dim
    inv = np.float32(1.0) / (np.float32(500000.0) ** (np.arange(0, rot, 2, dtype=np.float32) / np.float32(rot)))
    if scaling:
        inv = inv / np.float32(4.0)
    f = pos.astype(np.float32)[:, :, None] * inv[None, None, :]
    emb = np.concatenate([f, f], axis=-1)[:, None]
    assert cos.dtype == np.float32 and cos.shape == (2, 1, 4, rot)
    np.testing.assert_array_equal(cos, np.cos(emb))
    np.testing.assert_array_equal(sin, np.sin(emb))


# ---- MODEL-4: the mask --------------------------------------------------------------------------
def mask_by_definition(attn, T, P, causal, window, n_prefix):
    B = attn.shape[0]
    out = np.full((B, 1, T, n_prefix + P + T), np.finfo(np.float32).min, dtype=np.float32)
    for b in range(B):
        for i in range(T):
            for jp in range(n_prefix):  # prefix key jp is position jp, query i is position n_prefix + P + i
                if window is None or n_prefix + P + i - jp < window:
                    out[b, 0, i, jp] = 0.0
            for j in range(P + T):
                ok = (j <= P + i or not causal) and (window is None or P + i - j < window) and attn[b, j] == 1
                if ok:
                    out[b, 0, i, n_prefix + j] = 0.0
    return out


@pytest.mark.spec("MODEL-4")
@pytest.mark.parametrize("causal,window,P,n_prefix", [(True, None, 0, 0), (True, 3, 0, 0), (True, 3, 4, 2),
                                                      (False, None, 0, 0), (True, None, 5, 3), (True, 5, 0, 3)])
def test_mask_equals_its_definition(causal, window, P, n_prefix):
    T = 4
    attn = np.ones((2, P + T), dtype=np.int64)
    attn[0, :2] = 0
    got = attention_mask_bias(attn, T, P, causal=causal, window=window, n_prefix=n_prefix)
    np.testing.assert_array_equal(got, mask_by_definition(attn, T, P, causal, window, n_prefix))


@pytest.mark.spec("MODEL-4")
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_leaves_real_positions_unchanged(folder, family):
    m = minipeft.load_model(folder(family))
    ids, mask = ids_and_mask(pads=3)
    padded = np.where(mask == 1, ids, 0)
    out = m(padded, attention_mask=mask, position_ids=position_ids_from_mask(mask)).numpy()
    alone = m(ids[:1, 3:]).numpy()  # row 0 without its pads
    assert_close(out[0, 3:], alone[0], rtol=2e-6, label=f"{family} left padded")


# ---- MODEL-6: the loss --------------------------------------------------------------------------
@pytest.mark.spec("MODEL-6")
def test_causal_lm_loss_shifts_and_ignores():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7))
    labels = rng.integers(0, 7, (2, 5))
    labels[0, 2] = labels[1, 4] = labels[1, 1] = -100
    ref, n = 0.0, 0
    for b in range(2):
        for t in range(4):
            y = labels[b, t + 1]
            if y != -100:
                z = logits[b, t]
                ref += np.log(np.exp(z - z.max()).sum()) + z.max() - z[y]
                n += 1
    x = Tensor(logits, requires_grad=True)
    loss = causal_lm_loss(x, labels)
    assert abs(loss.item() - ref / n) < 1e-12
    loss.backward()
    assert (x.grad[:, -1] == 0).all() and (x.grad[0, 1] == 0).all()  # predicts nothing / an ignored label


# ---- MODEL-10: KV cache -------------------------------------------------------------------------
@pytest.mark.spec("MODEL-10")
@pytest.mark.parametrize("family", CAUSAL)
def test_kv_cache_logits_equal_full_forward_and_greedy_equals_recompute(folder, family):
    m = minipeft.load_model(folder(family))
    net, cfg = m.net, m.config
    ids, mask = ids_and_mask(T=9, pads=2)
    ids = np.where(mask == 1, ids, 0)
    pos = position_ids_from_mask(mask)
    with no_grad():
        full = net(ids, attention_mask=mask, position_ids=pos).numpy()
        cache = KVCache(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 9, cfg.head_dim, np.float32, np)
        steps = [net(ids[:, :6], attention_mask=mask[:, :6], position_ids=pos[:, :6], cache=cache).numpy()]
        for t in range(6, 9):
            steps.append(net(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                             cache=cache).numpy())
    real = mask == 1  # a pad query reads no key: its (meaningless) output depends on how many keys exist
    assert_close(np.concatenate(steps, axis=1)[real], full[real], rtol=2e-6, label=f"{family} cached")
    out = m.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[])
    seq, msk = ids, mask
    for _ in range(5):  # greedy by recomputing the whole sequence at every step
        logits = net(seq, attention_mask=msk, position_ids=position_ids_from_mask(msk)).numpy()
        seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None]], axis=1)
        msk = np.concatenate([msk, np.ones((2, 1), dtype=msk.dtype)], axis=1)
    np.testing.assert_array_equal(out, seq)


@pytest.mark.spec("MODEL-10")
def test_generate_refuses_an_encoder_and_running_out_of_positions(folder):
    ids, _ = ids_and_mask()
    with pytest.raises(ConfigError, match="encoder"):
        minipeft.load_model(folder("bert")).generate(ids, max_new_tokens=2)
    with pytest.raises(ConfigError, match="64 positions"):
        minipeft.load_model(folder("gpt2")).generate(ids, max_new_tokens=56)


# ---- MODEL-7 / MODEL-8 / MODEL-9: checkpoints ------------------------------------------------------
@pytest.mark.spec("MODEL-8")
@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_load_is_exact(folder, family, tmp_path):
    m = minipeft.load_model(folder(family))
    m.save(str(tmp_path / "saved"))
    cfg = json.load(open(tmp_path / "saved" / "config.json"))
    assert cfg["architectures"] and cfg["dtype"] == "float32" and cfg["model_type"] == family
    back = minipeft.load_model(str(tmp_path / "saved"))
    before, after = dict(m.net.named_parameters()), dict(back.net.named_parameters())
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k].numpy(), after[k].numpy(), err_msg=k)
    ids, _ = ids_and_mask()
    np.testing.assert_array_equal(m(ids).numpy(), back(ids).numpy())


CARRIED = os.path.join(os.path.dirname(minipeft.__file__), "data", "tiny-llama-chars")
TOKENIZER_EXTRAS = {"special_tokens_map.json": '{"bos_token": "<s>", "eos_token": "</s>"}', "vocab.json": '{"a": 0}',
                    "merges.txt": "#version: 0.2\na b\n", "added_tokens.json": "{}", "tokenizer.model": "sp",
                    "generation_config.json": '{"bos_token_id": 1, "eos_token_id": 2}', "chat_template.jinja": "{{ x }}"}


@pytest.mark.spec("MODEL-11")
def test_save_keeps_every_tokenizer_file(tmp_path):
    """Before: save() wrote tokenizer.json alone, so tokenizer_config.json, special_tokens_map.json, the
    generation config and a slow tokenizer's vocab/merges were lost. Now each is copied byte for byte,
    after a merge too; the weights, config.json and a README are not copied from the base."""
    base = tmp_path / "base"
    shutil.copytree(CARRIED, base)
    for name, text in {**TOKENIZER_EXTRAS, "README.md": "card"}.items():
        (base / name).write_text(text)
    m = minipeft.load_model(str(base)).apply_lora(target_modules=["q_proj"])
    m.merge_and_unload().save(str(tmp_path / "out"))
    kept = ["tokenizer.json", "tokenizer_config.json", *TOKENIZER_EXTRAS]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(kept + ["config.json", "model.safetensors"])
    for name in kept:
        assert (tmp_path / "out" / name).read_bytes() == (base / name).read_bytes(), name
    assert minipeft.load_model(str(tmp_path / "out")).tokenizer.encode("abc") == m.tokenizer.encode("abc")


@pytest.mark.spec("IO-11")
def test_a_relative_path_is_taken_from_the_current_folder(tmp_path, monkeypatch):
    """Before: a relative path that was not there from the current folder went to the Hub client and came back
    as a truncated HFValidationError. Now an existing relative path loads from any folder, and a missing one
    is a CheckpointError showing the absolute path tried, that it is no Hub id, and what to do."""
    shutil.copytree(CARRIED, tmp_path / "models" / "base")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    m = minipeft.load_model("../models/base")
    assert m.name_or_path == "../models/base" and m.folder == str(tmp_path / "models" / "base")
    assert m.tokenizer.encode("abc") == minipeft.load_model(minipeft.DEMO_MODEL).tokenizer.encode("abc")
    with pytest.raises(CheckpointError) as e:
        minipeft.load_model("minipeft/data/tiny-llama-chars")
    msg = str(e.value)
    assert f"as a folder: {tmp_path / 'work' / 'minipeft/data/tiny-llama-chars'} does not exist" in msg
    assert f"taken from the current folder, {tmp_path / 'work'}" in msg
    assert "as a Hub repo id: it is not one (HFValidationError: Repo id must be in the form" in msg
    assert "minipeft.DEMO_MODEL" in msg and "HF_HUB_OFFLINE=1" in msg


@pytest.mark.spec("IO-11")
def test_a_missing_hub_id_reports_both_tries_whole(tmp_path, monkeypatch):
    """Before: the Hub error was cut at 200 characters. Now both tries (cache, Hub) are reported whole, with
    the offline advice, and the fact that HF_HUB_OFFLINE kept the Hub from being asked."""
    import huggingface_hub
    from huggingface_hub import constants
    calls = []

    def fake(repo_id, allow_patterns, local_files_only):
        calls.append(local_files_only)
        raise OSError(f"try {len(calls)}: " + "long explanation " * 30 + "END")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as e:
        minipeft.load_model("someorg/some-model")
    msg = str(e.value)
    assert calls == [True, False] and msg.count("END") == 2
    assert "as a Hub repo id in the local Hugging Face cache: OSError: try 1: long" in msg
    assert "as a Hub repo id on the Hub: OSError: try 2: long" in msg
    assert f"as a folder: {tmp_path / 'someorg' / 'some-model'} does not exist" in msg
    assert "download the model first while online" in msg and "HF_HUB_OFFLINE is set, so the Hub was not asked" in msg


@pytest.mark.spec("MODEL-7")
@pytest.mark.parametrize("code", ["F16", "BF16"])
def test_half_precision_checkpoints_load_their_exact_values(tmp_path, code):
    raw = CONFIGS["llama"]
    w = random_weights(raw)
    path = write_folder(tmp_path / code, raw, w, {k: code for k in w})
    m = minipeft.load_model(path)
    for name, p in m.net.named_parameters():
        exact = w[name].astype(np.float16).astype(np.float32) if code == "F16" else \
            backend.round_to_bf16(w[name])
        np.testing.assert_array_equal(p.numpy(), exact, err_msg=name)
        assert p.numpy().dtype == np.float32


@pytest.mark.spec("MODEL-12")
@pytest.mark.parametrize("code", ["F32", "BF16"])
def test_loading_holds_the_parameters_and_one_tensor_at_most(tmp_path, code):
    """tracemalloc (NumPy's buffers) over load_model: the peak is the parameters' bytes plus the largest
    tensor's copy, not a second (or third) copy of the model; the values are the file's."""
    import tracemalloc
    raw = dict(CONFIGS["llama"], vocab_size=4096, hidden_size=128, intermediate_size=256)
    w = random_weights(raw)
    path = write_folder(tmp_path / code, raw, w, {k: code for k in w})
    total = sum(a.nbytes for a in w.values())
    largest = max(a.nbytes for a in w.values())
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        m = minipeft.load_model(path)
        now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert now - before >= total  # the parameters themselves
    assert peak - before <= total + 2 * largest + (1 << 20), (peak - before, total, largest)
    for name, p in m.net.named_parameters():
        exact = w[name] if code == "F32" else backend.round_to_bf16(w[name])
        np.testing.assert_array_equal(p.numpy(), exact, err_msg=name)
        assert p.data.flags.writeable  # a copy, not the file's read-only mapping


@pytest.mark.spec("MODEL-7")
def test_sharded_checkpoint_and_prefixes(tmp_path):
    raw = CONFIGS["gpt2"]
    w = random_weights(raw)
    ref = minipeft.load_model(write_folder(tmp_path / "one", raw, w))
    ids, _ = ids_and_mask()
    names = sorted(w)
    shard = {n: f"model-{i % 3:05d}-of-00003.safetensors" for i, n in enumerate(names)}
    os.makedirs(tmp_path / "sharded")
    for s in set(shard.values()):
        write_safetensors(str(tmp_path / "sharded" / s), {n: w[n] for n in names if shard[n] == s})
    json.dump({"metadata": {}, "weight_map": shard}, open(tmp_path / "sharded" / "model.safetensors.index.json", "w"))
    json.dump(raw, open(tmp_path / "sharded" / "config.json", "w"))
    np.testing.assert_array_equal(minipeft.load_model(str(tmp_path / "sharded"))(ids).numpy(), ref(ids).numpy())
    # a bare GPT2Model checkpoint (no "transformer." prefix), with the attn.bias buffers old files carry
    bare = {n.removeprefix("transformer."): a for n, a in w.items()}
    bare.update({f"h.{i}.attn.bias": np.ones((1, 1, 4, 4), np.float32) for i in range(2)})
    np.testing.assert_array_equal(minipeft.load_model(write_folder(tmp_path / "bare", raw, bare))(ids).numpy(),
                                  ref(ids).numpy())


@pytest.mark.spec("MODEL-7")
def test_masked_lm_checkpoint_loads_into_bert(tmp_path):
    raw = dict(CONFIGS["bert"], architectures=["BertForMaskedLM"])
    w = random_weights(raw)
    ref = minipeft.load_model(write_folder(tmp_path / "base", raw, w))
    mlm = {"bert." + k: a for k, a in w.items() if not k.startswith("pooler.")}
    mlm.update({"cls.predictions.bias": np.zeros(V, np.float32),
                "cls.predictions.transform.dense.weight": np.zeros((D_MODEL, D_MODEL), np.float32)})
    m = minipeft.load_model(write_folder(tmp_path / "mlm", raw, mlm))
    assert m.net.pooler is None and not any(n.startswith("pooler") for n, _ in m.net.named_parameters())
    ids, _ = ids_and_mask()
    np.testing.assert_array_equal(m(ids).numpy(), ref(ids).numpy())


@pytest.mark.spec("MODEL-7")
def test_tied_checkpoint_with_or_without_lm_head(tmp_path):
    raw = CONFIGS["qwen2"]
    w = random_weights(raw)
    assert "lm_head.weight" not in w
    a = minipeft.load_model(write_folder(tmp_path / "a", raw, w))
    with_head = dict(w, **{"lm_head.weight": w["model.embed_tokens.weight"]})
    b = minipeft.load_model(write_folder(tmp_path / "b", raw, with_head))
    assert a.net.lm_head.weight is a.net.model.embed_tokens.weight
    ids, _ = ids_and_mask()
    np.testing.assert_array_equal(a(ids).numpy(), b(ids).numpy())


def bad_folder(tmp_path, case):
    """A llama folder damaged in one way; returns (folder, file the message must name, key it must name)."""
    raw = CONFIGS["llama"]
    w = random_weights(raw)
    path = write_folder(tmp_path / case, raw, w)
    st = os.path.join(path, "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    if case == "truncated":
        infos = read_safetensors(st)[0]
        size = os.path.getsize(st)
        with open(st, "r+b") as f:
            f.truncate(size - 16)
        with open(st, "rb") as f:  # the key whose bytes ran past the new end
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        key = max((k for k in infos), key=lambda k: header[k]["data_offsets"][1])
    elif case == "wrong shape":
        write_safetensors(st, dict(w, **{key: w[key][:, :-1]}))
    elif case == "integer tensor":
        write_safetensors(st, dict(w, **{key: w[key].astype(np.int32)}))
    elif case == "unexpected key":
        key = "model.layers.0.self_attn.rotary_gate.weight"
        write_safetensors(st, dict(w, **{key: np.zeros(3, np.float32)}))
    elif case == "missing key":
        write_safetensors(st, {k: a for k, a in w.items() if k != key})
        st = path
    elif case == "missing shard":
        os.remove(st)
        shard = {k: ("model-00001-of-00002.safetensors" if k < key else "model-00002-of-00002.safetensors")
                 for k in w}
        write_safetensors(os.path.join(path, "model-00001-of-00002.safetensors"),
                          {k: a for k, a in w.items() if shard[k].startswith("model-00001")})
        st = os.path.join(path, "model.safetensors.index.json")
        json.dump({"weight_map": shard}, open(st, "w"))
        key = next(k for k in w if shard[k].startswith("model-00002"))
    elif case == ".bin only":
        os.remove(st)
        st = key = "pytorch_model.bin"
        open(os.path.join(path, key), "wb").write(b"\x80\x02 not unpickled")
    return path, st, key


@pytest.mark.spec("MODEL-7", "MODEL-9")
@pytest.mark.parametrize("case", ["truncated", "wrong shape", "integer tensor", "unexpected key", "missing key",
                                  "missing shard", ".bin only"])
def test_bad_checkpoint_names_file_and_key(tmp_path, case):
    path, file, key = bad_folder(tmp_path, case)
    with pytest.raises(CheckpointError) as e:
        minipeft.load_model(path)
    msg = str(e.value)
    assert file in msg and key in msg, msg
    if case == ".bin only":
        assert "never unpickles" in msg and "safe_serialization" in msg


# ---- MODEL-2: every backend ---------------------------------------------------------------------
def forward_backward(path, name):
    backend.set_backend(name)
    m = minipeft.load_model(path)
    m.net.requires_grad_(True)
    ids, mask = ids_and_mask()
    logits = m(ids, attention_mask=mask)
    causal_lm_loss(logits, backend.asarray(np.where(mask == 1, ids, -100))).backward()
    return logits.numpy(), {n: backend.to_host(p.grad) for n, p in m.net.named_parameters()}


@pytest.mark.spec("MODEL-2")
def test_llama_forward_backward_equal_on_every_backend(folder, any_backend):
    path = folder("llama")
    ref_logits, ref_grads = forward_backward(path, "numpy")
    logits, grads = forward_backward(path, any_backend)
    assert_close(logits, ref_logits, rtol=1e-6, label="logits")
    for n, g in ref_grads.items():
        assert_close(grads[n], g, rtol=1e-5, label=n)
    assert read_config(path).model_type == "llama"
