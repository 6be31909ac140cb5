"""spec/longlora.md (LONGLORA-n): S²-Attn against a NumPy float64 port of the pseudocode (roll half the heads by
-G/2, causal attention in blocks of G, roll back by +G/2) and of the authors' flash-attention boundaries; full
attention at G >= T and outside training; groups independent without the shift; LoRA+'s trained embedding and
norms; gradients; model.train; the plain LoRA file."""
import json

import numpy as np
import pytest

import minipeft as mp
from helpers import TINY_LLAMA, assert_close, tiny_llama
from minipeft.adapters.longlora import LORA_PLUS, LongLoRAConfig, ShiftedSparseAttention
from minipeft.autograd import Tensor
from minipeft.errors import ConfigError
from minipeft.models.blocks import AttnContext, attention_mask_bias
from minipeft.models.config import config_from_dict
from minipeft.models.gpt2 import GPT2LMHeadModel
from one_layer import check_train_moves_every_leaf
from tests.test_every_method import directional_gradients

MODELS = {"llama": {}, "mistral": {"model_type": "mistral", "sliding_window": 5}, "qwen2": {"model_type": "qwen2"}}


def blocks_attention(q, k, v, bounds):
    """Causal softmax attention within each [bounds[i], bounds[i+1]) of the T axis, float64, (B, h, T, D)."""
    out = np.zeros_like(q)
    for a, b in zip(bounds[:-1], bounds[1:]):
        s = q[..., a:b, :] @ np.swapaxes(k[..., a:b, :], -1, -2) / np.sqrt(q.shape[-1])
        s = np.where(np.tril(np.ones((b - a, b - a), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[..., a:b, :] = (p / p.sum(-1, keepdims=True)) @ v[..., a:b, :]
    return out


def s2_reference(q, k, v, G, mode, shift=True):
    """LONGLORA-2 rebuilt: the pseudocode's roll (or the authors' offset boundaries) on heads H/2.., k and v
    already one per query head."""
    H, T, s = q.shape[1], q.shape[2], G // 2 if shift else 0
    plain = list(range(0, T, G)) + [T]
    first = blocks_attention(q[:, :H // 2], k[:, :H // 2], v[:, :H // 2], plain)
    q2, k2, v2 = q[:, H // 2:], k[:, H // 2:], v[:, H // 2:]
    if mode == "roll":
        rolled = blocks_attention(*(np.roll(x, -s, axis=2) for x in (q2, k2, v2)), plain)
        second = np.roll(rolled, s, axis=2)
    else:
        second = blocks_attention(q2, k2, v2, sorted({0, T, *range(G - s if s else G, T, G)}))
    return np.concatenate([first, second], axis=1)


@pytest.mark.spec("LONGLORA-1", "LONGLORA-2")
@pytest.mark.parametrize("mode", ["roll", "offset"])
@pytest.mark.parametrize("T,ratio,Hkv", [(16, 0.25, 2), (16, 0.5, 1), (14, 0.3, 2), (12, 0.25, 4)])
def test_s2_attn_equals_the_pseudocode_roll_and_the_offset_groups(mode, T, ratio, Hkv):
    rng = np.random.default_rng(T + Hkv)
    B, H, D = 2, 4, 3
    q = rng.standard_normal((B, H, T, D))
    k, v = rng.standard_normal((2, B, Hkv, T, D))
    ctx = AttnContext(H, Hkv, attention_mask_bias(None, T, 0, dtype="float64", xp=np), window=None)
    got = ShiftedSparseAttention(None, ratio, True, mode, "default")(Tensor(q), Tensor(k), Tensor(v), ctx, None)
    G = int(T * ratio)
    rep = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)  # query head h reads kv head h // (H / Hkv)
    assert_close(got, s2_reference(q, *rep, G, mode), 1e-10, label=f"S2 {mode} T={T} G={G} Hkv={Hkv}")
    assert_close(ShiftedSparseAttention(4, 1.0, True, mode, "x")(Tensor(q), Tensor(k), Tensor(v), ctx, None),
                 s2_reference(q, *rep, 4, mode), 1e-10, label="fixed group_size")
    unshifted = ShiftedSparseAttention(None, ratio, False, mode, "default")(Tensor(q), Tensor(k), Tensor(v), ctx, None)
    assert_close(unshifted, s2_reference(q, *rep, G, mode, shift=False), 1e-10, label="shift off")


def perturbed(model, seed=1):
    rng = np.random.default_rng(seed)
    for p in model.net.named_trainable_parameters().values():
        p.data = (p.data + rng.standard_normal(p.shape) * 0.2).astype(np.float32)
    return model


def logits(model, ids, training, **kw):
    """The logits with the network's training flag set (S2-Attn follows net.training; dropout is 0 here)."""
    model.net.training = training
    try:
        return model(ids, **kw).numpy()
    finally:
        model.net.training = False


@pytest.mark.spec("LONGLORA-3", "LONGLORA-5")
@pytest.mark.parametrize("family", sorted(MODELS))
def test_full_attention_at_G_ge_T_and_outside_training(family):
    ids = np.random.default_rng(0).integers(0, 48, (2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[1, :3] = 0  # a left-padded row
    base = tiny_llama(0, **MODELS[family])
    want = base(ids, attention_mask=mask).numpy()
    model = tiny_llama(0, **MODELS[family])
    model.apply_longlora(group_size=12)
    assert_close(logits(model, ids, True, attention_mask=mask), want, 1e-6, label="init, training, G = T")  # LONGLORA-5
    perturbed(model)
    full = model(ids, attention_mask=mask).numpy()
    assert_close(logits(model, ids, True, attention_mask=mask), full, 1e-6, label=f"{family} G >= T in training")
    small = tiny_llama(0, **MODELS[family])
    small.apply_longlora()  # G = 3
    perturbed(small)
    assert_close(logits(small, ids, False, attention_mask=mask), full, 1e-6, label="eval: full attention")
    assert np.abs(logits(small, ids, True, attention_mask=mask) - full).max() > 1e-3  # S2 in training


@pytest.mark.spec("LONGLORA-2")
def test_without_the_shift_every_group_is_causal_and_independent():
    ids = np.random.default_rng(3).integers(0, 48, (1, 12))
    other = ids.copy()
    other[0, :4] = (other[0, :4] + 7) % 48  # group 0 changed
    for shift, independent in ((False, True), (True, False)):
        model = perturbed(tiny_llama(0))
        model.apply_longlora(group_size=4, shift=shift)
        perturbed(model)
        a, b = logits(model, ids, True), logits(model, other, True)
        assert np.abs(a[0, :4] - b[0, :4]).max() > 1e-3
        assert (np.abs(a[0, 4:] - b[0, 4:]).max() == 0) == independent, shift
        later = ids.copy()
        later[0, 9] = (later[0, 9] + 5) % 48  # causal: token 8 never reads token 9
        assert np.array_equal(logits(model, later, True)[0, 8], a[0, 8])


@pytest.mark.spec("LONGLORA-2")
def test_the_roll_lets_the_first_tokens_read_the_last_group_and_the_offset_does_not():
    ids = np.random.default_rng(4).integers(0, 48, (1, 12))
    last = ids.copy()
    last[0, 11] = (last[0, 11] + 9) % 48
    for mode, leaks in (("roll", True), ("offset", False)):
        model = tiny_llama(0)
        model.apply_longlora(group_size=4, shift_mode=mode)
        perturbed(model)
        a, b = logits(model, ids, True), logits(model, last, True)
        assert (np.abs(a[0, :2] - b[0, :2]).max() > 1e-4) == leaks, mode  # tokens 0, 1 follow 10, 11 after the roll
        assert leaks or np.array_equal(a[0, :11], b[0, :11]), mode  # offset: causal


@pytest.mark.spec("LONGLORA-5")
@pytest.mark.parametrize("mode", ["roll", "offset"])
def test_gradients_through_s2_attn_equal_finite_differences(mode):
    model = tiny_llama(0, **MODELS["mistral"])
    model.apply_longlora(group_size=4, shift_mode=mode, target_modules=("q_proj", "v_proj"))
    perturbed(model)
    model.net.training = True  # S2-Attn on (the flag the forward reads; dropout is 0)
    for analytic, numeric in directional_gradients(model):
        assert abs(analytic - numeric) <= 1e-6 + 1e-5 * abs(numeric), (analytic, numeric)


@pytest.mark.spec("LONGLORA-4")
def test_lora_plus_trains_lora_the_embedding_and_every_norm_and_counts_them():
    model = tiny_llama(0)
    model.apply_longlora()
    names = model.net.named_trainable_parameters()
    for entry in LORA_PLUS:
        assert any(f"{entry}.modules_to_save.default.weight" in n for n in names), entry
    assert all("lora_" in n or "modules_to_save" in n for n in names)
    assert {n.split(".adapters.")[0].rsplit(".", 1)[-1] for n in names if "lora_A" in n} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    sizes = {p: (m.base_layer.in_features, m.base_layer.out_features)
             for p, m in mp.adapters.inject.adapted_layers(model.net)}
    assert model.parameter_counts()[0] == model.peft_configs["default"].trainable_count(sizes, model.config)
    llama7b = config_from_dict({**TINY_LLAMA, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32})
    layers = {f"l{i}.{n}": (4096, 4096) for i in range(32) for n in ("q", "k", "v", "o")}
    assert LongLoRAConfig().trainable_count(layers, llama7b) == 8_388_608 + 131_072_000 + 266_240


@pytest.mark.spec("LONGLORA-4")
@pytest.mark.parametrize("kw,match", [({"group_size_ratio": 0.0}, "group_size_ratio"),
                                      ({"group_size_ratio": 1.5}, "group_size_ratio"), ({"group_size": 0}, "group_size"),
                                      ({"shift_mode": "cyclic"}, "shift_mode"), ({"rank": 0}, "rank")])
def test_bad_configs_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        LongLoRAConfig(**kw)


@pytest.mark.spec("LONGLORA-4")
def test_other_models_and_odd_head_counts_are_refused():
    gpt2 = mp.Model(GPT2LMHeadModel(config_from_dict({"model_type": "gpt2", "vocab_size": 48, "n_embd": 32,
                                                      "n_layer": 2, "n_head": 4, "n_positions": 64})))
    with pytest.raises(ConfigError, match="model_type.*llama, mistral, qwen2"):
        gpt2.apply_longlora(target_modules=("c_attn",), modules_to_save=())
    odd = tiny_llama(0, num_attention_heads=1, num_key_value_heads=1)
    with pytest.raises(ConfigError, match="num_attention_heads.*even"):
        odd.apply_longlora()


@pytest.mark.spec("LONGLORA-2", "LONGLORA-4")
def test_model_train_runs_s2_attn_and_moves_every_trainable_tensor(monkeypatch):
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_longlora()
    calls = []
    real = ShiftedSparseAttention.__call__
    monkeypatch.setattr(ShiftedSparseAttention, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    check_train_moves_every_leaf(model, lr=1e-2)
    assert calls  # each training forward went through S2-Attn
    n = len(calls)
    model.generate("next abc =", max_new_tokens=3)
    model(np.array([[1, 2, 3]]))
    assert len(calls) == n  # eval and generate: full attention


@pytest.mark.spec("LONGLORA-6")
def test_the_file_is_a_plain_lora_with_modules_to_save(tmp_path):
    model = perturbed(tiny_llama(0))
    model.apply_longlora()
    perturbed(model)
    ids = np.random.default_rng(1).integers(0, 48, (2, 8))
    out = model(ids).numpy()
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and sorted(cfg["modules_to_save"]) == sorted(LORA_PLUS)
    assert not {"group_size_ratio", "group_size", "shift", "shift_mode"} & set(cfg)
    again = tiny_llama(0)
    again.load_adapters(str(tmp_path))
    assert type(again.peft_configs["default"]) is mp.LoRAConfig and again.net.attention_pattern is None
    assert_close(again(ids), out, 1e-6, label="reloaded as LoRA")
    model.delete_adapter("default")
    assert model.net.attention_pattern is None


@pytest.mark.oracle
@pytest.mark.spec("LONGLORA-6")
def test_a_tied_model_loads_in_peft_with_minipeft_s_logits(tmp_path):
    """The embedding's trained copy on a tied llama: lm_head keeps the original weight, as PEFT's
    modules_to_save does without ensure_weight_tying (it warns)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from helpers import hf_llama_folder, max_rel_err
    from tests.test_every_method import IDS, hf_model, perturb
    hf = {**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}, "hidden_size": 64, "intermediate_size": 128,
          "tie_word_embeddings": True}
    base = hf_llama_folder(str(tmp_path / "hf"), **hf)
    model = mp.load_model(base)
    model.apply_longlora()
    perturb(model)
    model.save_adapters(str(tmp_path / "ours"))
    with pytest.warns(UserWarning, match="ensure_weight_tying"):
        pm = peft.PeftModel.from_pretrained(hf_model(base, False), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        theirs = pm(torch.tensor(IDS)).logits.numpy()
    err = max_rel_err(model(IDS).numpy(), theirs)
    print(f"\n  longlora (tied) minipeft -> PEFT: max rel err {err:.2e}")
    assert err < 1e-5
