"""Model: what `minipeft.load_model` returns. It holds the network (`net`, HF attribute paths), its
tokenizer, and the adapters put on it, and offers the PEFT workflow: apply, train, save, load,
switch, merge, merge-and-unload, generate."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings

import numpy as np

from . import backend, hooks, shorthands
from .adapters import alora, data_init, inject, layer_replication, peft_io, prompt_learning, registry
from .adapters.base import NAME_RE, no_field
from .adapters.modules_to_save import add_trained_copy, trained_copy_paths
from .adapters.registry import layer_class
from .adapters.trainable_tokens import token_adapters
from .autograd import Tensor, no_grad
from .errors import ConfigError, MiniPeftError
from .models import generate as gen
from .models.io import load_net, save_net
from .models.tokenizer import Tokenizer
from .quant.linear4bit import Linear4bit, dequantize_model, is_quantized, quantize_model


class Model:
    def __init__(self, net, tokenizer=None, name_or_path: str = "", seed: int = 0, folder: str | None = None):
        self.net, self.tokenizer, self.name_or_path = net, tokenizer, name_or_path
        self.folder = folder  # the model folder it was read from; save() copies its tokenizer files
        self.config = net.config
        self.peft_configs: dict = {}  # adapter name -> config
        self.active_adapters: list[str] = []
        self.shared_tensors: dict = {}  # adapter name -> {name: frozen Tensor its layers share} (VeRA's A, B)
        self.rng = backend.RNG(seed)  # adapter init and dropout draw from here, explicitly
        net.dropout_rng = self.rng
        net.requires_grad_(False)  # frozen until an adapter (or the user, for full fine-tuning) says otherwise
        net.eval()

    # ---- inference -----------------------------------------------------------------------
    def __call__(self, input_ids, attention_mask=None, adapter_names=None, **kwargs) -> Tensor:
        """Logits (B, T, V) for causal LMs, the last hidden state (B, T, d) for BERT. adapter_names: one adapter
        name per example ("__base__": none), PEFT's mixed-adapter batch (spec/methods.md METHOD-6)."""
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        if not np.issubdtype(ids.dtype, np.integer):
            raise ConfigError(f"input_ids must be integers, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ConfigError(f"input_ids must lie in [0, {self.config.vocab_size}); got {ids.min()}..{ids.max()}")
        if ids.shape[1] > self.config.max_position_embeddings:  # as train and generate refuse it (TRAIN-9)
            raise ConfigError(f"input_ids has {ids.shape[1]} tokens, more than the {self.config.max_position_embeddings}"
                              f" positions (max_position_embeddings) of this {self.config.model_type} model")
        mask = None if attention_mask is None else backend.asarray(np.asarray(attention_mask))
        with inject.mixed_batch(self, adapter_names, ids.shape[0]), alora.activated(self, ids, adapter_names):
            return self.net(backend.asarray(ids), attention_mask=mask, **kwargs)

    def generate(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k=None, top_p=None,
                 eos_token_id=None, attention_mask=None, seed: int = 0, adapter_names=None):
        """Text in, text out (with a tokenizer), or ids (B, T) in, ids (B, T + n) out; adapter_names as in __call__."""
        as_text = isinstance(prompt, str)
        if as_text:
            if self.tokenizer is None:
                raise ConfigError("text was given but the model folder has no tokenizer.json; pass token ids")
            prompt = [self.tokenizer.encode(prompt)]
        if eos_token_id is None:
            eos_token_id = self.config.eos_token_id
        was_training = self.net.training
        self.net.eval()
        try:
            with inject.mixed_batch(self, adapter_names, len(prompt)), alora.activated(self, prompt, adapter_names):
                out = gen.generate(self.net, prompt, attention_mask, max_new_tokens, temperature, top_k, top_p,
                                   eos_token_id, self.config.pad_token_id, backend.RNG(seed))
        finally:
            self.net.train(was_training)
        if as_text:
            return self.tokenizer.decode(out[0, len(prompt[0]):])
        return out

    def save(self, path: str) -> None:
        """An HF folder that transformers loads (adapters must be merged or unloaded first)."""
        if inject.adapted_layers(self.net) or getattr(self.net, "prompt_encoder", None) is not None:
            raise MiniPeftError("the model still has adapter layers; call merge_and_unload() (or unload()) "
                                "first, or save_adapters() to save the adapters alone")
        if is_quantized(self.net):
            raise MiniPeftError("the model is 4-bit quantized and save() writes float checkpoints: call "
                                "merge_and_unload() first (it dequantizes), or save_adapters() for the adapters alone")
        save_net(self.net, path, self.folder or (os.path.dirname(self.tokenizer.path) if self.tokenizer else None))

    # ---- adapters --------------------------------------------------------------------------
    def apply_adapter(self, cfg, name: str = "default", init_weights: bool = True, data=None):
        """Put adapter `name` of cfg's method on the targeted layers. The first adapter becomes
        active (and trainable); later ones stay inactive until set_active_adapter (as in PEFT).
        data: the batches or training records a data-driven initialiser (EVA, CorDA, LoRA-GA) reads
        (adapters/data_init.py, METHOD-11); the config saved is the one it returns."""
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ConfigError(f"adapter name {name!r} must be letters, digits, '_' or '-'")
        if name in self.peft_configs:
            raise ConfigError(f"an adapter named {name!r} exists already; pick another name or delete_adapter() it")
        if getattr(cfg, "is_prompt_learning", False):  # virtual tokens or prefixes: no layer to wrap
            return prompt_learning.attach(self, cfg, name, init_weights, layer_class(cfg))
        cfg = inject.default_targets(cfg, self.config.model_type)  # PEFT's per-model default where it has one
        undo = layer_replication.prepare(self.net, cfg, f"adapter {name!r}")  # LORA-14: more layers first
        try:
            cfg = cfg.resolve_targets(self.net)
            bases = {}
            for path in inject.find_targets(self.net, cfg):
                m = self.net.get_submodule(path)
                bases[path] = getattr(m, "base_layer", m)
            # every delta and modules_to_save match first: a bad rank or entry leaves the model as it was
            with data_init.prepared(self, cfg, bases, data, init_weights) as (cfg, bases):
                deltas, shared = layer_class(cfg).create_all(bases, cfg, self.rng, init_weights)
            copies = {entry: trained_copy_paths(self.net, entry) for entry in cfg.modules_to_save}
            rows = token_adapters(self.net, cfg, self.config.model_type, self.rng, init_weights)  # LoRA's rows
            both = sorted(set(rows) & set(deltas))
            if both:  # LORA-18: the embedding's LoRA and its trainable rows cannot share one layer
                raise ConfigError(f"trainable_token_indices names {both[0]!r}, which target_modules also gives a "
                                  "LoRA; drop it from one of the two")
            deltas.update(rows)
        except BaseException:
            undo()
            raise
        self.net.requires_grad_(False)
        for path, delta in deltas.items():  # a new delta takes the model's mode (eval: no dropout)
            inject.wrap(self.net, path).adapters[name] = delta.train(self.net.training)
        for paths in copies.values():
            add_trained_copy(self.net, paths, name)
        cfg.attach(self.net, name)
        self.peft_configs[name], self.shared_tensors[name] = cfg, shared
        self.set_active_adapter(self.active_adapters or [name])
        return self

    def set_active_adapter(self, names) -> None:
        """Activate one adapter (or several, whose deltas add up); only active ones train."""
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            if n not in self.peft_configs:
                raise ConfigError(f"no adapter named {n!r}; the model has {sorted(self.peft_configs) or 'none'}")
        prompt_learning.check_active(self.peft_configs, names)
        self.active_adapters = names
        inject.activate(self.net, names, trainable=True)
        for n in names:
            inject.set_bias_trainable(self.net, self.peft_configs[n])
        prompt_learning.activate(self.net, names)

    @contextlib.contextmanager
    def disable_adapters(self):
        """Within this block the model computes as its base (merged adapters are unmerged first)."""
        saved = list(self.active_adapters)
        for _, layer in inject.adapted_layers(self.net):
            for n in list(layer.merged):
                layer.unmerge(n)
        self._set_active_quiet([])
        try:
            yield self
        finally:
            self._set_active_quiet(saved)

    def _set_active_quiet(self, names):
        inject.activate(self.net, names, trainable=False)
        prompt_learning.activate(self.net, names, trainable=False)

    def delete_adapter(self, name: str) -> None:
        if name not in self.peft_configs:
            raise ConfigError(f"no adapter named {name!r}")
        if any(name in layer.merged for _, layer in inject.adapted_layers(self.net)):
            raise MiniPeftError(f"adapter {name!r} is merged into the weights; unmerge_adapter() it first")
        inject.remove_adapter(self.net, name)
        prompt_learning.delete(self.net, name)
        self.peft_configs[name].detach(self.net, name)
        del self.peft_configs[name]
        self.shared_tensors.pop(name, None)
        rest = [n for n in self.active_adapters if n != name] or list(self.peft_configs)[:1]
        self.active_adapters = []
        if rest:
            self.set_active_adapter(rest)
        else:
            self._set_active_quiet([])

    def merge_adapter(self) -> None:
        """Fold the active adapters into the base weights (undo with unmerge_adapter)."""
        prompt_learning.check_mergeable(self)
        layer_replication.check_mergeable(self)
        for m in (registry.method_of(self.peft_configs[n]) for n in self.active_adapters):
            if m.kind == "layer" and not m.mergeable:  # no fixed dW (Lily): refused before any layer changes
                raise ConfigError(f"{m.title} cannot be merged: its update is no fixed dW (spec/{m.name}.md); run the "
                                  f"adapter unmerged, or unload() it")
        if any(isinstance(layer.base_layer, Linear4bit) for _, layer in inject.adapted_layers(self.net)):
            raise ConfigError("a 4-bit weight cannot hold W0 + s B A without requantizing it; "
                              "merge_and_unload() dequantizes the model and merges in float (QLORA-8)")
        with no_grad():
            for _, layer in inject.adapted_layers(self.net):
                for n in self.active_adapters:
                    if n in layer.adapters:
                        layer.merge(n)

    def unmerge_adapter(self) -> None:
        with no_grad():
            for _, layer in inject.adapted_layers(self.net):
                for n in list(layer.merged):
                    layer.unmerge(n)

    def merge_and_unload(self) -> "Model":
        """Merge the active adapters into the weights and return the plain model (this object),
        with trained copies of modules_to_save in place of the originals. A 4-bit model is
        dequantized first, so every layer comes back as a float Linear (QLORA-8)."""
        dequantize_model(self.net)
        self.merge_adapter()
        return self._unload()

    def unload(self) -> "Model":
        """Remove adapter layers without merging (the output returns to the base model's)."""
        self.unmerge_adapter()
        return self._unload()

    def _unload(self) -> "Model":
        inject.unwrap_all(self.net)
        prompt_learning.delete_all(self.net)
        for name, cfg in self.peft_configs.items():
            cfg.detach(self.net, name)
        self.peft_configs, self.active_adapters, self.shared_tensors = {}, [], {}
        self.net.requires_grad_(False)
        return self

    def merge_adapters(self, weights: dict, name: str, combination: str = "linear", **kwargs):
        """A new adapter `name` from a weighted combination of LoRA adapters (see adapters/combine.py)."""
        from .adapters.combine import add_weighted_adapter
        add_weighted_adapter(self, weights, name, combination, **kwargs)
        return self

    def save_as_lora(self, path: str, rank, name: str = "default", show_progress: bool = True) -> list:
        """Adapter `name` (any mergeable method) written to `path` as a plain PEFT LoRA of `rank` (an integer, or a
        share of ||dW||_F^2 in (0, 1]) by truncated SVD of each layer's dW, PEFT's save_as_lora; returns each layer's
        rank and relative error (AUDIT-22..24)."""
        from .adapters.to_lora import save_as_lora
        return save_as_lora(self, path, rank, name, show_progress)

    def save_adapters(self, path: str, names=None) -> None:
        if getattr(self, "base_changed_by", None):  # RELORA-5, DELTALORA-4, CHAINLORA-4
            warnings.warn(f"{self.base_changed_by} changed the base weights W while training: the adapter saved "
                          f"at {path} lacks what W took in. Save the trained model with "
                          f"model.merge_and_unload().save(path)", UserWarning, stacklevel=2)
        peft_io.save_adapters(self, path, names)

    def load_adapters(self, path: str, name: str = "default", strict: bool = True, subfolder: str | None = None):
        """The adapters at path (or path/subfolder), as PEFT-7 finds them: a folder with adapter_config.json
        (as `name`), its sub-folders with one each (under their names), a checkpoint-N folder's adapter/."""
        return peft_io.load_adapters(self, path, name, strict, subfolder)

    # ---- training ----------------------------------------------------------------------------
    def train(self, train_data, config=None, **kwargs):
        """Fine-tune the trainable parameters (see minipeft/train.py); returns the loss history."""
        from .train import TrainingConfig, train
        fields = {f.name for f in dataclasses.fields(TrainingConfig)}
        for key in kwargs:
            if key not in fields:
                raise no_field("TrainingConfig (model.train's keywords)", key, fields)
        # keywords given next to a config override its fields rather than being dropped
        return train(self, train_data, dataclasses.replace(config, **kwargs) if config else TrainingConfig(**kwargs))

    def trainable_parameters(self):
        return self.net.trainable_parameters()

    def training_hooks(self) -> list:
        """The active adapters' hooks into model.train (minipeft/hooks.py: AdaLoRA's penalty and allocation)."""
        return hooks.adapter_hooks(self)

    def regularization(self):
        """The term the active adapters add to the training loss (AdaLoRA's orthogonality penalty), or None;
        two active adapters that both allocate ranks are refused (ADALORA-12)."""
        found = self.training_hooks()
        hooks.check_hooks(found)
        return hooks.regularization(found)

    def update_and_allocate(self, step: int) -> None:
        """Call after optimizer step `step` (0-based), before the gradients are cleared: each active adapter's
        per-step update (AdaLoRA's rank allocation, PEFT's update_and_allocate). model.train calls it."""
        for h in self.training_hooks():
            h.after_step(step)

    def print_trainable_parameters(self) -> None:
        """PEFT's line: trainable params: T || all params: N || trainable%: P (the counts of parameter_counts)."""
        trainable, total = self.parameter_counts()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; a 4-bit weight counts its elements, as a float one."""
        params = self.net.parameters()
        total = sum(int(np.prod(p.shape)) for p in params)
        total += sum(m.weight.numel for _, m in self.net.named_modules() if isinstance(m, Linear4bit))
        return sum(int(np.prod(p.shape)) for p in params if p.requires_grad), total


registry.on_register(shorthands.installer(Model))  # Model.apply_<name> for every method (METHOD-3)


def load_model(path_or_id: str, dtype: str = "float32", quantization=None, seed: int = 0) -> Model:
    """Load an HF folder or cached Hub repo id (config.json + safetensors [+ tokenizer.json])."""
    net, folder = load_net(path_or_id, dtype)
    if quantization is not None:
        quantize_model(net, quantization)
    return Model(net, Tokenizer.from_folder(folder), path_or_id, seed, folder)
