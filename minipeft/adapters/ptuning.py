"""P-tuning: soft tokens produced by a prompt encoder (Liu et al. 2021, "GPT Understands, Too",
arXiv:2103.10385); PEFT's P_TUNING (PromptEncoderConfig).

Symbols: T = num_virtual_tokens, d hidden size, h = encoder_hidden_size (default d), E (T, d) the
    trainable table; ids (B, n).
Encoder (PTUNING-1): "mlp": P = W3 relu(W2 relu(W1 E + b1) + b2) + b3 with W1 (h, d), W2 (h, h),
    W3 (d, h) (PEFT's mlp_head.0/2/4, always two hidden layers); "lstm": a bidirectional LSTM of
    encoder_num_layers layers over the T rows of E (hidden h per direction, dropout encoder_dropout
    between layers in training), then P = W5 relu(W4 [fwd; bwd] + b4) + b5, W4 (2h, 2h), W5 (d, 2h).
    Init: E ~ N(0, 1); every Linear and LSTM weight ~ U(±1/sqrt(fan_in)) (LSTM: U(±1/sqrt(h))), torch's.
LSTM cell (PTUNING-2): gates [i; f; g; o] = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh (torch's order),
    c_t = sig(f) c_{t-1} + sig(i) tanh(g), h_t = sig(o) tanh(c_t); the reverse direction reads t = T-1 .. 0.
Forward (PTUNING-3): as prompt tuning (PROMPT-2) with P = encoder(E): x = [P; E_word[ids]].
Trainable (PTUNING-4): E and the encoder; every base weight is frozen.
Serialization (PTUNING-5): peft_type "P_TUNING", prompt_embeddings = P (T, d), what PEFT saves; minipeft
    adds prompt_encoder.embedding.weight and prompt_encoder.<mlp_head|lstm_head>.* so that training
    can resume. A file without them (PEFT's) loads as P trained directly (no encoder).
PEFT parity: peft/tuners/p_tuning/model.py PromptEncoder; PeftModel.get_prompt_embedding_to_save.
Deviations: none in the forward. sigmoid and tanh are compositions of exp (PTUNING-2 in float32 agrees
    with torch to ~1e-7 for |x| < 40).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import backend
from ..autograd import concat
from ..autograd import functional as F
from ..nn.module import Module
from .base import check, fan_in_uniform, trainable
from .prompt_learning import InputPrompt, PromptLearningConfig, Seq, relu, sigmoid, tanh, torch_linear
from .registry import register

ENCODERS = ("mlp", "lstm")


@dataclasses.dataclass
class PTuningConfig(PromptLearningConfig):
    num_virtual_tokens: int = 20
    encoder_type: str = "mlp"  # "mlp" | "lstm" (PEFT's encoder_reparameterization_type MLP | LSTM)
    encoder_hidden_size: int | None = None  # h; None: the model's hidden size (PEFT's default)
    encoder_num_layers: int = 2  # LSTM layers; the MLP always has two hidden layers (as PEFT's)
    encoder_dropout: float = 0.0  # between LSTM layers, in training

    peft_type = "P_TUNING"
    PEFT_FIELDS = {"encoder_type": "encoder_reparameterization_type", "encoder_hidden_size": "encoder_hidden_size",
                   "encoder_num_layers": "encoder_num_layers", "encoder_dropout": "encoder_dropout"}
    PEFT_VALUES = {"encoder_type": {"mlp": "MLP", "lstm": "LSTM"}}

    def validate(self):
        super().validate()
        check(self.encoder_type in ENCODERS, "encoder_type", self.encoder_type, f"must be one of {', '.join(ENCODERS)}")
        h, k, p = self.encoder_hidden_size, self.encoder_num_layers, self.encoder_dropout
        check(h is None or (isinstance(h, int) and not isinstance(h, bool) and h > 0), "encoder_hidden_size", h,
              "must be None (the model's hidden size) or an int > 0")
        check(isinstance(k, int) and not isinstance(k, bool) and k > 0, "encoder_num_layers", k, "must be an int > 0")
        check(isinstance(p, (int, float)) and 0.0 <= p < 1.0, "encoder_dropout", p, "must lie in [0, 1)")

    def filled(self, mc):
        cfg = super().filled(mc)
        return dataclasses.replace(cfg, encoder_hidden_size=cfg.encoder_hidden_size or cfg.token_dim)

    def trainable_count(self, layers: dict, mc) -> int:
        """PTUNING-4: E (T, d) and the encoder's weights and biases (PTUNING-1)."""
        T, d, h = self.num_virtual_tokens, self.token_dim, self.encoder_hidden_size
        if self.encoder_type == "mlp":  # W1 (h, d), W2 (h, h), W3 (d, h) and their biases
            return T * d + (h * d + h) + (h * h + h) + (d * h + d)
        lstm = sum(2 * (4 * h * (d if k == 0 else 2 * h) + 4 * h * h + 8 * h) for k in range(self.encoder_num_layers))
        return T * d + lstm + (2 * h * 2 * h + 2 * h) + (d * 2 * h + d)  # + W4 (2h, 2h), W5 (d, 2h)


class LSTM(Module):
    """torch.nn.LSTM(bidirectional=True, batch_first) over one sequence (T, n_in) -> (T, 2h);
    parameters weight_ih_l{k}[_reverse] (4h, n_in), weight_hh_l{k} (4h, h), bias_ih_l{k}, bias_hh_l{k}."""

    def __init__(self, n_in, h, layers, dropout, rng):
        self.h, self.layers, self.dropout, self.rng = h, layers, dropout, rng
        for k in range(layers):
            for sfx in ("", "_reverse"):
                for name, shape in (("weight_ih", (4 * h, n_in if k == 0 else 2 * h)), ("weight_hh", (4 * h, h)),
                                    ("bias_ih", (4 * h,)), ("bias_hh", (4 * h,))):
                    t = fan_in_uniform(rng, shape, h)  # torch's LSTM: U(+-1/sqrt(hidden)) for every tensor
                    setattr(self, f"{name}_l{k}{sfx}", trainable(t))

    def direction(self, x, k, sfx):
        """One direction of layer k over x (T, n_in) -> (T, h) (PTUNING-2)."""
        W_ih, W_hh = getattr(self, f"weight_ih_l{k}{sfx}"), getattr(self, f"weight_hh_l{k}{sfx}")
        b = getattr(self, f"bias_ih_l{k}{sfx}") + getattr(self, f"bias_hh_l{k}{sfx}")  # (4h,)
        xw = F.linear(x, W_ih, b)  # (T, 4h)
        T, h = x.shape[0], self.h
        steps = range(T - 1, -1, -1) if sfx else range(T)
        h_t = c_t = None
        out = [None] * T
        for t in steps:
            z = xw[t:t + 1] if h_t is None else xw[t:t + 1] + F.linear(h_t, W_hh)  # (1, 4h)
            i, f, g, o = sigmoid(z[:, :h]), sigmoid(z[:, h:2 * h]), tanh(z[:, 2 * h:3 * h]), sigmoid(z[:, 3 * h:])
            c_t = i * g if c_t is None else f * c_t + i * g  # (1, h)
            h_t = o * tanh(c_t)
            out[t] = h_t
        return concat(out, axis=0)  # (T, h)

    def forward(self, x):
        for k in range(self.layers):
            if k:
                x = F.dropout(x, self.dropout, self.rng, self.training)
            x = concat([self.direction(x, k, ""), self.direction(x, k, "_reverse")], axis=1)  # (T, 2h)
        return x


class PromptEncoder(InputPrompt):
    ENCODER = ("mlp_head", "lstm_head")

    @classmethod
    def create(cls, model, cfg, rng, init_weights=True):
        T, d, h = cfg.num_virtual_tokens, cfg.token_dim, cfg.encoder_hidden_size
        a = cls(cfg, backend.to_host(rng.normal((T, d))) if init_weights else np.zeros((T, d)))
        if cfg.encoder_type == "lstm":
            a.lstm_head = LSTM(d, h, cfg.encoder_num_layers, cfg.encoder_dropout, rng)
            a.mlp_head = Seq([torch_linear(2 * h, 2 * h, rng), torch_linear(2 * h, d, rng)], relu)
        else:
            a.mlp_head = Seq([torch_linear(d, h, rng), torch_linear(h, h, rng), torch_linear(h, d, rng)], relu)
        return a

    def encode(self, e):
        return self.mlp_head(self.lstm_head(e) if hasattr(self, "lstm_head") else e)  # (T, d)


register("ptuning", PTuningConfig, PromptEncoder, kind="prompt", mergeable=False,
         paper="GPT Understands, Too (P-tuning), Liu et al. 2021, arXiv:2103.10385",
         summary="P-tuning: soft tokens produced by an MLP or LSTM prompt encoder (spec/ptuning.md).")
