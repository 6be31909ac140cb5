"""What the prompt-learning methods share: prompt tuning (prompt_tuning.py), P-tuning (ptuning.py),
prefix tuning (prefix_tuning.py), P-tuning v2 (ptuning_v2.py) and CPT (cpt.py). Specs: spec/prompt_tuning.md
(PROMPT-n), spec/prefix_tuning.md (PREFIX-n), spec/ptuning.md (PTUNING-n), spec/ptuning_v2.md (PTV2-n),
spec/cpt.md (CPT-n).

These adapters wrap no layer. Each is a `VirtualTokens` module kept in `net.prompt_encoder[name]`
(PEFT's in-memory path `prompt_encoder.<name>.embedding.weight`). Before the layers run,
DecoderLM.forward hands its inputs to `net.prompt_encoder.prepare`, which lets the active adapter
either prepend T virtual token embeddings (an `InputPrompt`: prompt tuning, P-tuning) or give every
layer's attention T prefix keys and values through `prefix_kv` (prefix tuning, P-tuning v2).

Symbols: T = num_virtual_tokens, d = hidden size, L layers, Hkv key/value heads of size D,
    d_kv = Hkv D; B batch, n real tokens.
Table: embedding.weight (T, width), trainable; an encoder (MLP, LSTM) may map it to the prompt
    P = encode(embedding.weight) (T, out); without one P = embedding.weight.
Serialization: `prompt_embeddings` = P (PEFT's bare key). With an encoder minipeft also writes the
    encoder's own tensors as `prompt_encoder.<path>` (PEFT ignores these keys); a file without them
    (PEFT's) loads as P trained directly, with no encoder.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import backend
from ..autograd import concat
from ..autograd.tensor import Tensor
from ..errors import CheckpointError, ConfigError
from ..nn.layers import Embedding, Linear
from ..nn.module import Module
from .base import AdapterConfig, ModuleDict, check, fan_in_uniform

ENCODER_KEY = "prompt_encoder."


@dataclasses.dataclass
class PromptLearningConfig(AdapterConfig):
    """PEFT's PromptLearningConfig fields; None ones are read off the model when applied."""

    num_virtual_tokens: int = 10
    token_dim: int | None = None  # width of one virtual token (d; d_kv for prefixes)
    num_layers: int | None = None
    num_attention_heads: int | None = None  # Hkv for prefixes (PEFT's GQA rule)
    num_transformer_submodules: int = 1  # 2 only for encoder-decoder models, which minipeft lacks

    is_prompt_learning = True
    PROMPT_FIELDS = ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
                     "num_transformer_submodules")

    def validate(self):
        v = self.num_virtual_tokens
        check(isinstance(v, int) and not isinstance(v, bool) and v > 0, "num_virtual_tokens", v,
              "must be an int > 0")
        for f in ("token_dim", "num_layers", "num_attention_heads"):
            v = getattr(self, f)
            check(v is None or (isinstance(v, int) and v > 0), f, v, "must be None (from the model) or an int > 0")
        check(self.num_transformer_submodules == 1, "num_transformer_submodules", self.num_transformer_submodules,
              "must be 1: minipeft's models are decoder-only or encoders (2 is for encoder-decoder models)")

    def to_peft(self) -> dict:
        return {**{f: getattr(self, f) for f in self.PROMPT_FIELDS}, **super().to_peft()}

    @classmethod
    def from_peft(cls, d: dict):
        cfg = super().from_peft(d)
        kept = {f: d[f] for f in cls.PROMPT_FIELDS if d.get(f) is not None}
        return dataclasses.replace(cfg, **kept)

    def model_dims(self, mc) -> dict:
        """PEFT's _prepare_prompt_learning_config: (token_dim, num_attention_heads) of this method."""
        return {"token_dim": mc.hidden_size, "num_attention_heads": mc.num_attention_heads}

    def filled(self, mc):
        """This config with the model's sizes in the None fields; a given field must agree."""
        want = {"num_layers": mc.num_hidden_layers, **self.model_dims(mc)}
        for f, v in want.items():
            got = getattr(self, f)
            check(got is None or got == v, f, got, f"this {mc.model_type} model needs {v}")
        limit = mc.max_position_embeddings  # PROMPT-10: the virtual tokens take positions 0 .. T-1 of the context
        check(self.num_virtual_tokens < limit, "num_virtual_tokens", self.num_virtual_tokens,
              f"this {mc.model_type} model has max_position_embeddings={limit} positions (its context) and the "
              f"virtual tokens take the first num_virtual_tokens of them, leaving none for the input; use "
              f"num_virtual_tokens < {limit}, with room for the prompt and the generated tokens")
        return dataclasses.replace(self, **want)


# ---- the modules -----------------------------------------------------------------------------------
def table(rows: int, width: int, values) -> Embedding:
    e = Embedding(rows, width)
    e.weight = Tensor(backend.asarray(values, "float32"), requires_grad=True)
    return e


def torch_linear(n_in: int, n_out: int, rng) -> Linear:
    """torch.nn.Linear's default init: weight and bias ~ U(±1/sqrt(n_in))."""
    lin = Linear(n_in, n_out)
    lin.weight.data = fan_in_uniform(rng, (n_out, n_in), n_in)
    lin.bias.data = fan_in_uniform(rng, (n_out,), n_in)
    return lin


class Seq(ModuleDict):
    """torch.nn.Sequential's naming: children "0", "1", ... (PEFT's mlp_head.0.weight); `acts` holds
    the activation applied after each child but the last."""

    def __init__(self, layers, act):
        for i, layer in enumerate(layers):
            self[str(i * 2)] = layer  # torch counts the activations too: Linear at 0, 2, 4
        self.act = act

    def forward(self, x):
        keys = self.keys()
        for i, k in enumerate(keys):
            x = self[k](x)
            x = self.act(x) if i < len(keys) - 1 else x
        return x


def relu(x: Tensor) -> Tensor:
    xp = backend.xp_of(x.data)
    return x * Tensor(xp.astype(x.data > 0, x.data.dtype))  # dx = 1 where x > 0 (torch: 0 at 0)


def sigmoid(x: Tensor) -> Tensor:
    return 1.0 / ((-x).exp() + 1.0)


def tanh(x: Tensor) -> Tensor:
    return sigmoid(x * 2.0) * 2.0 - 1.0


class VirtualTokens(Module):
    """One prompt-learning adapter: embedding (T, width) and an optional encoder (`ENCODER` names
    its children). Subclasses give encode() and prepare()."""

    ENCODER: tuple = ()

    def __init__(self, cfg, values):
        self.cfg = cfg
        self.embedding = table(*values.shape, values)

    @property
    def has_encoder(self) -> bool:
        return any(isinstance(getattr(self, n, None), Module) for n in self.ENCODER)

    def encode(self, e: Tensor) -> Tensor:
        raise NotImplementedError

    def output(self) -> Tensor:
        """The prompt P (T, out): encode(embedding.weight), or the table itself without an encoder."""
        return self.encode(self.embedding.weight) if self.has_encoder else self.embedding.weight

    def drop_encoder(self, width: int) -> None:
        """What a file without encoder tensors gives: P as the trainable table, no encoder."""
        for n in self.ENCODER:
            if hasattr(self, n):
                delattr(self, n)
        self.embedding = table(self.cfg.num_virtual_tokens, width, np.zeros((self.cfg.num_virtual_tokens, width)))

    def bare_file(self, loaded: dict) -> None:
        """A file with only prompt_embeddings (PEFT's): the adapter drops its encoder (CPT keeps its own: cpt.py)."""
        self.drop_encoder(loaded["prompt_embeddings"].shape[1])

    def saved_tensors(self) -> dict:
        """{key: Tensor}: prompt_embeddings = P, plus the encoder's tensors under prompt_encoder.<path>."""
        if not self.has_encoder:
            return {"prompt_embeddings": self.embedding.weight}
        out = {ENCODER_KEY + k: p for k, p in self.named_parameters()}
        out["prompt_embeddings"] = self.output().detach()
        return out


def batch_of(t: Tensor, B: int) -> Tensor:
    """(B, *t.shape): t repeated along a new leading axis (PEFT's prompts.repeat(B, 1, 1))."""
    return concat([t.reshape((1,) + tuple(t.shape))] * B, axis=0)


def word_embeddings(net) -> Embedding:
    base = getattr(net, net.base_name)
    return base.embed_tokens if hasattr(base, "embed_tokens") else base.wte


class InputPrompt(VirtualTokens):
    """Virtual tokens before the input embeddings (prompt tuning, P-tuning)."""

    def prepare(self, net, input_ids, attention_mask, position_ids, cache, inputs_embeds, prefix_kv):
        """[P; embed(ids)] on the first call (a cache already holds P afterwards); the mask gets T
        leading ones; given position_ids are ignored, as PEFT does: positions run 0 .. T + n - 1."""
        if inputs_embeds is None:
            inputs_embeds = word_embeddings(net)(input_ids)  # (B, n, d)
        B, T = inputs_embeds.shape[0], self.cfg.num_virtual_tokens
        if cache is None or cache.length == 0:
            inputs_embeds = concat([batch_of(self.output(), B), inputs_embeds], axis=1)  # (B, T + n, d)
        if attention_mask is not None:
            xp = backend.xp_of(attention_mask)
            attention_mask = xp.concat((xp.ones((B, T), dtype=attention_mask.dtype), attention_mask), axis=1)
        check_positions(net, (cache.length if cache is not None else 0) + inputs_embeds.shape[1])
        return None, attention_mask, None, inputs_embeds, prefix_kv


def check_positions(net, last: int) -> None:
    limit = net.config.max_position_embeddings
    if net.learned_positions and last > limit:
        raise ConfigError(f"num_virtual_tokens and the {last} positions they lead to exceed the {limit} "
                          f"positions of this {net.config.model_type} model")


class PromptEncoders(ModuleDict):
    """net.prompt_encoder: the prompt-learning adapters by name; `active` names the one in use."""

    active = None

    def prepare(self, net, *args):
        """(input_ids, attention_mask, position_ids, inputs_embeds, prefix_kv) for DecoderLM.forward."""
        if self.active is None:
            return (args[0], args[1], args[2], args[4], args[5])
        return self[self.active].prepare(net, *args)

    def lead_tokens(self) -> int:
        """Positions the active prompt takes before the tokens (cache room in generate)."""
        return self[self.active].cfg.num_virtual_tokens if self.active is not None else 0


# ---- what model.py and peft_io.py call --------------------------------------------------------------
def prompt_of(net, name: str):
    """The prompt-learning adapter `name`, or None (a layer adapter, or none)."""
    pe = getattr(net, "prompt_encoder", None)  # BERT has no prompt path
    return pe[name] if pe is not None and name in pe else None


def attach(model, cfg, name: str, init_weights: bool, adapter_class):
    """apply_adapter for a prompt-learning config: fill its sizes from the model, build the adapter."""
    from ..models.llama import DecoderLM
    mc = model.config
    if not isinstance(model.net, DecoderLM):
        raise ConfigError(f"model_type={mc.model_type!r}: {type(cfg).__name__} needs a causal LM "
                          "(llama, mistral, qwen2, phi, gpt2); BERT has no prompt-learning path in minipeft")
    cfg = cfg.filled(mc)
    adapter = adapter_class.create(model, cfg, model.rng, init_weights)
    if model.net.prompt_encoder is None:
        model.net.prompt_encoder = PromptEncoders()
    model.net.prompt_encoder[name] = adapter.train(model.net.training)
    model.peft_configs[name], model.shared_tensors[name] = cfg, {}
    model.set_active_adapter(model.active_adapters or [name])
    return model


def check_active(configs: dict, names) -> None:
    """One prompt-learning adapter at a time, and not together with layer adapters (PEFT's rule)."""
    prompts = [n for n in names if getattr(configs[n], "is_prompt_learning", False)]
    if prompts and len(names) > 1:
        raise ConfigError(f"set_active_adapter({list(names)}): a prompt-learning adapter ({prompts[0]!r}) "
                          "is active alone; PEFT cannot combine it with other adapters either")


def activate(net, names, trainable: bool = True) -> None:
    pe = getattr(net, "prompt_encoder", None)
    if pe is None:
        return
    pe.active = next((n for n in names if n in pe), None)
    if pe.active is not None and trainable:
        pe[pe.active].requires_grad_(True)


def delete(net, name: str) -> None:
    if prompt_of(net, name) is not None:
        del net.prompt_encoder[name]
        if not net.prompt_encoder.keys():
            delete_all(net)


def delete_all(net) -> None:
    vars(net).pop("prompt_encoder", None)


def check_mergeable(model) -> None:
    pe = getattr(model.net, "prompt_encoder", None)
    if pe is not None and pe.active is not None:
        raise ConfigError(f"adapter {pe.active!r} is {type(model.peft_configs[pe.active]).__name__}: prompt "
                          "learning adds virtual tokens or prefixes, not weights, so it cannot be merged")


def fit_to_file(model, name: str, loaded: dict) -> None:
    """A file with only prompt_embeddings (PEFT's) leaves the adapter without its encoder."""
    pe, a = model.net.prompt_encoder, prompt_of(model.net, name)
    if a is None or not a.has_encoder:
        return
    if not any(k.startswith(ENCODER_KEY) for k in loaded) and "prompt_embeddings" in loaded:
        a.bare_file(loaded)
        a.requires_grad_(name == pe.active)


def check_loaded(model, name: str, loaded: dict, where: str) -> None:
    """With an encoder loaded, the file's prompt_embeddings must be that encoder's output."""
    a = prompt_of(model.net, name)
    if a is None or not a.has_encoder or "prompt_embeddings" not in loaded:
        return
    ours, theirs = backend.to_host(a.output().data), loaded["prompt_embeddings"]
    err = float(np.max(np.abs(ours - theirs)) / max(float(np.max(np.abs(theirs))), 1e-30))
    if ours.shape != theirs.shape or err > 1e-5:
        raise CheckpointError(f"{where}: prompt_embeddings is not the output of the saved prompt_encoder "
                              f"tensors (max relative difference {err:.2e}); was one of them edited?")
