"""spec/ptuning.md (PTUNING-n): the MLP and the bidirectional LSTM encoder against NumPy float64
references written from the spec's formulas, the forward against the base model on [P; E[ids]],
gradients, and a save/load that keeps the encoder (and a PEFT-layout file that has none)."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_close, tiny_llama
from minipeft import PTuningConfig
from minipeft.errors import ConfigError
from minipeft.models.blocks import causal_lm_loss
from minipeft.safetensors_io import read_safetensors, write_safetensors
from test_prompt_tuning import SETTINGS, base_on_embeds, ids_of, prompt_module, trainable_names


def f64(t):
    return np.asarray(t.data, np.float64)


def mlp_ref(E, head):
    h = E
    keys = head.keys()
    for i, k in enumerate(keys):
        h = h @ f64(head[k].weight).T + f64(head[k].bias)
        h = np.maximum(h, 0) if i < len(keys) - 1 else h
    return h


def lstm_ref(x, lstm, layers):
    """PTUNING-2 in float64: torch's gate order i, f, g, o; reverse direction reads t = T-1 .. 0."""
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    for k in range(layers):
        outs = []
        for sfx in ("", "_reverse"):
            Wi, Wh = f64(getattr(lstm, f"weight_ih_l{k}{sfx}")), f64(getattr(lstm, f"weight_hh_l{k}{sfx}"))
            b = f64(getattr(lstm, f"bias_ih_l{k}{sfx}")) + f64(getattr(lstm, f"bias_hh_l{k}{sfx}"))
            H = Wh.shape[1]
            h, c, out = np.zeros(H), np.zeros(H), np.zeros((x.shape[0], H))
            for t in (range(x.shape[0] - 1, -1, -1) if sfx else range(x.shape[0])):
                z = Wi @ x[t] + Wh @ h + b
                i, f, g, o = sig(z[:H]), sig(z[H:2 * H]), np.tanh(z[2 * H:3 * H]), sig(z[3 * H:])
                c = f * c + i * g
                h = o * np.tanh(c)
                out[t] = h
            outs.append(out)
        x = np.concatenate(outs, axis=1)
    return x


@pytest.mark.spec("PTUNING-1", "PTUNING-2")
@SETTINGS
@given(kind=st.sampled_from(["mlp", "lstm"]), T=st.integers(1, 5), h=st.integers(1, 9), layers=st.integers(1, 2))
def test_encoder_matches_formula(kind, T, h, layers):
    m = tiny_llama().apply_ptuning(num_virtual_tokens=T, encoder_type=kind, encoder_hidden_size=h,
                                   encoder_num_layers=layers)
    p = prompt_module(m)
    E = f64(p.embedding.weight)
    x = lstm_ref(E, p.lstm_head, layers) if kind == "lstm" else E
    assert p.output().shape == (T, 32)
    assert_close(p.output().data, mlp_ref(x, p.mlp_head), rtol=2e-6, label=f"{kind} encoder output")


@pytest.mark.spec("PTUNING-3")
@SETTINGS
@given(kind=st.sampled_from(["mlp", "lstm"]), T=st.integers(1, 4), n=st.integers(1, 6), seed=st.integers(0, 99))
def test_forward_is_base_on_encoder_output(kind, T, n, seed):
    m = tiny_llama().apply_ptuning(num_virtual_tokens=T, encoder_type=kind, encoder_hidden_size=8)
    ids = ids_of(2, n, seed)
    P = prompt_module(m).output().data
    x = np.concatenate([np.broadcast_to(P, (2,) + P.shape), m.net.model.embed_tokens.weight.data[ids]], axis=1)
    assert_close(m(ids).data, base_on_embeds(x), rtol=1e-6, label="p-tuned logits")


@pytest.mark.spec("PTUNING-4")
def test_only_table_and_encoder_get_gradients():
    m = tiny_llama().apply_ptuning(num_virtual_tokens=3, encoder_type="lstm", encoder_hidden_size=4)
    names = trainable_names(m)
    assert len(names) == 1 + 16 + 4 and all(n.startswith("prompt_encoder.default.") for n in names)
    ids = ids_of(2, 4)
    causal_lm_loss(m(ids), ids).backward()
    assert all((p.grad is not None) == p.requires_grad for _, p in m.net.named_parameters())


@pytest.mark.spec("PTUNING-5")
def test_save_load_keeps_encoder(tmp_path):
    m = tiny_llama().apply_ptuning(num_virtual_tokens=3, encoder_hidden_size=8)
    ids = ids_of(2, 4)
    m.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["encoder_reparameterization_type"], cfg["encoder_hidden_size"]) == ("P_TUNING", "MLP", 8)
    tensors, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(tensors) == ["prompt_embeddings", "prompt_encoder.embedding.weight"] + sorted(
        f"prompt_encoder.mlp_head.{i}.{w}" for i in (0, 2, 4) for w in ("bias", "weight"))
    m2 = tiny_llama()
    m2.load_adapters(str(tmp_path))
    same = dict(m.net.named_parameters())
    assert all(np.array_equal(p.data, same[n].data) for n, p in m2.net.named_parameters())
    assert trainable_names(m2) == trainable_names(m) and np.array_equal(m2(ids).data, m(ids).data)
    write_safetensors(str(tmp_path / "adapter_model.safetensors"),
                      {"prompt_embeddings": tensors["prompt_embeddings"]}, {"format": "pt"})  # PEFT's file
    m3 = tiny_llama()
    m3.load_adapters(str(tmp_path))
    assert trainable_names(m3) == ["prompt_encoder.default.embedding.weight"]
    assert_close(m3(ids).data, m(ids).data, rtol=1e-6, label="PEFT-layout reload")


@pytest.mark.spec("PTUNING-6")
@pytest.mark.parametrize("kw, field", [
    (dict(encoder_type="gru"), "encoder_type"), (dict(encoder_hidden_size=0), "encoder_hidden_size"),
    (dict(encoder_num_layers=0), "encoder_num_layers"), (dict(encoder_dropout=1.0), "encoder_dropout"),
    (dict(num_virtual_tokens=0), "num_virtual_tokens")])
def test_config_errors(kw, field):
    with pytest.raises(ConfigError, match=field):
        PTuningConfig(**kw)
