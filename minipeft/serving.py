"""Serving many LoRA adapters at once, S-LoRA style (Sheng et al. 2023, "S-LoRA: Serving Thousands of Concurrent
LoRA Adapters", arXiv:2311.03285; spec/serving.md SERVING-1..9).

Unified pool (SERVING-1): for each row width w among the served layers' in/out sizes one preallocated array
    pages_w (P_w + 1, w); a page holds one rank row: row i of A (width in) or column i of B (width out) of any
    adapter at any layer. Page P_w stays zero (the padding page). An adapter of rank r at a layer takes r pages of
    width in and r of width out; the base model is wrapped once (PooledLinear), never copied per adapter.
Load / evict (SERVING-2, SERVING-3): PEFT LoRA folders, known by name, loaded into free pages on demand; a full pool
    evicts the least recently used adapter that the running batch does not need.
Forward (SERVING-4): row b of a batch with adapter n_b: y_b = W0 x_b + b + s_b B_b (A_b x_b), where A_b, B_b are
    gathered from n_b's pages, padded to the batch's largest rank R with the zero page (a base row, or a layer n_b
    does not target, gathers only zero pages and s_b = 0: y_b = base(x_b) exactly, SERVING-5).
Generation (SERVING-6): prompts left-padded into one batch with a KV cache row per request; each request stops at
    its own max_new_tokens (or end of sequence) and leaves the batch, its cache rows dropped; with max_batch,
    waiting requests join as rows leave, their caches left-padded beside the running ones (SERVING-9).
Deviations from the paper: one process, requests given up front, adapters' pages and the KV cache in separate
    arrays, and ranks padded to the batch's largest instead of S-LoRA's custom kernels.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os

import numpy as np

from . import backend
from .adapters import inject
from .adapters.lora import LoRAConfig, LoRALinear, lora_scaling
from .adapters.peft_io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, check_sizes, fill, read_adapter_config
from .adapters.registry import layer_class, method_of
from .autograd import Tensor, no_grad
from .errors import CheckpointError, ConfigError
from .models import generate as gen
from .models.blocks import KVCache
from .models.llama import DecoderLM
from .nn.module import Module
from .safetensors_io import read_safetensors


class PagePool:
    """Preallocated pages (P + 1, width): page P is the zero padding page; `free` are the unused ones (SERVING-1)."""

    def __init__(self, width: int, pages: int, xp):
        self.width, self.zero = width, pages
        self.data = xp.zeros((pages + 1, width), dtype=backend.dtype("float32", xp))
        self.free = list(range(pages - 1, -1, -1))  # a stack: the lowest page number is handed out first

    def take(self, rows) -> list:
        """Pages holding the given rows (n, width), written in place."""
        pages = [self.free.pop() for _ in range(rows.shape[0])]
        for i, p in enumerate(pages):
            self.data[p, :] = rows[i, :]
        return pages

    def give_back(self, pages) -> None:
        self.free.extend(reversed(pages))


class PooledLinear(Module):
    """A served layer: base(x) plus, per row of the batch, s_b B_b A_b x_b from the pool's pages (SERVING-4).
    `rows` is set by AdapterPool for one batch: (A's page numbers (B*R,), B's (B*R,), R, s (B, 1, 1)), or None."""

    def __init__(self, base_layer, pool_a: PagePool, pool_b: PagePool):
        self.base_layer, self.pool_a, self.pool_b = base_layer, pool_a, pool_b
        self.rows = None

    def forward(self, x):
        y = self.base_layer(x)  # (B, ..., out)
        if self.rows is None:
            return y
        a_pages, b_pages, R, s = self.rows
        xp = backend.xp_of(x.data)
        B, n, m = x.shape[0], self.pool_a.width, self.pool_b.width
        A = xp.reshape(xp.take(self.pool_a.data, a_pages, axis=0), (B, R, n))  # (B, R, in)
        Bt = xp.reshape(xp.take(self.pool_b.data, b_pages, axis=0), (B, R, m))  # (B, R, out): B_b transposed
        h = xp.matmul(xp.reshape(x.data, (B, -1, n)), xp.matrix_transpose(A))  # (B, T, R) = A_b x_b
        delta = xp.matmul(h, Bt) * s  # (B, T, out) = s_b B_b A_b x_b
        return Tensor(y.data + xp.astype(xp.reshape(delta, tuple(y.shape)), y.data.dtype))


@dataclasses.dataclass
class Request:
    """One generation request: prompt token ids, its adapter's name (None: the base model), its own length."""
    prompt: list
    adapter: str | None = None
    max_new_tokens: int = 16


class Rows:
    """Requests being generated: their numbers `live`, KV cache rows left-padded to one length, the mask (B, L) and
    last positions (B, 1) on the host, and `nxt` (B,), each row's newest token, not yet in the cache (SERVING-6)."""

    def __init__(self, live, cache, mask, pos):
        self.live, self.cache, self.mask, self.pos = live, cache, mask, pos
        self.nxt = np.zeros((len(live),), dtype=np.int64)

    def keep(self, rows) -> None:
        """Only rows `rows` (positions in the batch) stay: the others' cache rows go (KVCache.keep_rows)."""
        self.live = [self.live[j] for j in rows]
        if rows:
            self.cache.keep_rows(backend.asarray(np.array(rows, dtype=np.int64)))
        self.mask, self.pos, self.nxt = self.mask[rows], self.pos[rows], self.nxt[rows]

    def joined(self, other: "Rows", room: int) -> "Rows":
        """These rows and other's in one batch: each cache left-padded (mask 0) to the longer, with `room` free
        positions after it (SERVING-9)."""
        parts = [r for r in (self, other) if r.live]
        if not parts:
            return other
        if len(parts) == 1 and parts[0].cache.max_len - parts[0].cache.length >= room:
            return parts[0]
        L = max(r.cache.length for r in parts)
        first = parts[0].cache
        xp = backend.xp_of(first.k[0])
        n_layers, (_, H, _, D) = len(first.k), first.k[0].shape
        cache = KVCache(n_layers, sum(len(r.live) for r in parts), H, L + room, D, first.k[0].dtype, xp)
        b = 0
        for r in parts:
            n, P = len(r.live), r.cache.length
            for layer in range(n_layers):
                cache.k[layer][b:b + n, :, L - P:L, :] = r.cache.k[layer][:, :, :P, :]
                cache.v[layer][b:b + n, :, L - P:L, :] = r.cache.v[layer][:, :, :P, :]
            b += n
        cache.length = L
        rows = Rows([i for r in parts for i in r.live], cache,
                    np.concatenate([np.pad(r.mask, ((0, 0), (L - r.mask.shape[1], 0))) for r in parts]),
                    np.concatenate([r.pos for r in parts]))
        rows.nxt = np.concatenate([r.nxt for r in parts])
        return rows


@dataclasses.dataclass
class Resident:
    """Where a loaded adapter lives: {layer path: (A's pages, B's pages, s)}."""
    layers: dict


class AdapterPool:
    """Many PEFT LoRA adapters served from one base model (SERVING-1..9). pages: the pages of each row width
    (an int for all, or {width: pages}); target_modules: the layers that can be served (PEFT's matching rules)."""

    def __init__(self, model, pages=1024, target_modules="all-linear"):
        if model.peft_configs or getattr(model.net, "prompt_encoder", None) is not None:
            raise ConfigError(f"AdapterPool serves adapters from its own pages; the model already has adapters "
                              f"{sorted(model.peft_configs)}: load the base model afresh (load_model) for the pool")
        self.model, self.net = model, model.net
        self.paths = inject.find_targets(self.net, LoRAConfig(target_modules=target_modules))
        bases = {p: self.net.get_submodule(p) for p in self.paths}
        widths = sorted({w for b in bases.values() for w in (b.in_features, b.out_features)})
        counts = pages if isinstance(pages, dict) else {w: pages for w in widths}
        for w in widths:
            if not isinstance(counts.get(w), int) or counts[w] < 1:
                raise ConfigError(f"pages={pages!r}: width {w} (a served layer's in or out size) needs a positive "
                                  f"number of pages; the served layers' widths are {widths}")
        self.pools = {w: PagePool(w, counts[w], backend.xp()) for w in widths}
        self._wrap()  # SERVING-1: the one model, each served layer wrapped once
        self.folders: dict = {}  # name -> folder, every adapter the pool knows
        self.resident: collections.OrderedDict = collections.OrderedDict()  # name -> Resident, least recent first
        self.pinned: set = set()  # the running batch's adapters: never evicted while it runs

    # ---- adapters: add, load, evict (SERVING-2, SERVING-3) --------------------------------------
    def add(self, folder: str, name: str | None = None) -> str:
        """Know the PEFT LoRA folder as `name` (default: the folder's name) and load it; returns the name."""
        name = name or os.path.basename(os.path.normpath(folder))
        if name in self.folders and os.path.abspath(self.folders[name]) != os.path.abspath(folder):
            raise ConfigError(f"the pool has an adapter named {name!r} already (from {self.folders[name]}); "
                              f"pass another name=")
        self.folders[name] = folder
        try:
            self.load(name)
        except Exception:
            del self.folders[name]
            raise
        return name

    def load(self, name: str) -> None:
        """Make `name` resident (reading its folder if it is not), the most recently used."""
        if name in self.resident:
            self.resident.move_to_end(name)
            return
        if name not in self.folders:
            raise ConfigError(f"no adapter named {name!r} in the pool; add(folder, name) it first "
                              f"(known: {sorted(self.folders)[:8]}{' ...' if len(self.folders) > 8 else ''})")
        tensors, scales = self._read(self.folders[name])
        need = collections.Counter()
        for A, B in tensors.values():
            need[A.shape[1]] += A.shape[0]
            need[B.shape[0]] += B.shape[1]
        for w, n in need.items():
            if n > self.pools[w].zero:
                raise ConfigError(f"adapter {name!r} needs {n} pages of width {w}, and the pool has "
                                  f"{self.pools[w].zero} in all: make the pool bigger (AdapterPool(pages=...))")
        while any(len(self.pools[w].free) < n for w, n in need.items()):
            victims = [v for v in self.resident if v not in self.pinned]
            if not victims:
                raise ConfigError(f"the pool cannot hold adapter {name!r} beside {sorted(self.pinned)}, which the "
                                  f"batch needs at once: make the pool bigger or split the batch")
            self.evict(victims[0])
        self.resident[name] = Resident({p: (self.pools[A.shape[1]].take(A), self.pools[B.shape[0]].take(
            backend.xp_of(B).matrix_transpose(B)), scales[p]) for p, (A, B) in tensors.items()})

    def evict(self, name: str) -> None:
        """Free `name`'s pages; the pool still knows its folder and reloads it when a batch names it."""
        if name in self.pinned:
            raise ConfigError(f"adapter {name!r} serves the running batch and cannot be evicted now")
        for p, (a_pages, b_pages, _) in self.resident.pop(name).layers.items():
            layer = self.net.get_submodule(p)
            layer.pool_a.give_back(a_pages)
            layer.pool_b.give_back(b_pages)

    def _read(self, folder: str):
        """({layer path: (A (r, in), B (out, r))}, {layer path: s}) of a PEFT LoRA folder, checked as
        load_adapters checks a file (IO-8), before any page is taken (SERVING-2)."""
        cfg = read_adapter_config(folder)
        where = os.path.join(folder, CONFIG_NAME)
        if layer_class(cfg) is not LoRALinear or cfg.initialiser()[1]:
            raise ConfigError(f"{where}: the pool serves plain LoRA adapters (y = W0 x + s B A x); this one is "
                              f"{method_of(cfg).title} (init {cfg.init!r}): load it with Model.load_adapters")
        for field, v, plain in (("bias", cfg.bias, "none"), ("lora_bias", cfg.lora_bias, False),
                                ("modules_to_save", tuple(cfg.modules_to_save), ()),
                                ("trainable_token_indices", cfg.trainable_token_indices, None)):
            if v != plain:
                raise ConfigError(f"{where}: {field}={v!r} changes more than the LoRA layers, which the pool does "
                                  f"not serve; load it with Model.load_adapters")
        with self._plain():
            targets = inject.find_targets(self.net, inject.default_targets(cfg, self.model.config.model_type))
        outside = [p for p in targets if p not in self.paths]
        if outside:
            raise ConfigError(f"{where}: the adapter targets {outside[:4]}, which this pool does not serve; "
                              f"make the pool with target_modules that cover them")
        loaded, _ = read_safetensors(os.path.join(folder, WEIGHTS_NAME))
        check_sizes(cfg, loaded, where)
        keys = {f"{PREFIX}{p}.lora_{ab}.weight" for p in targets for ab in "AB"}
        if set(loaded) != keys:
            raise CheckpointError(f"{folder}: keys do not match the adapter's targets: missing "
                                  f"{sorted(keys - set(loaded))[:4]}, unexpected {sorted(set(loaded) - keys)[:4]}")
        tensors, scales = {}, {}
        for p in targets:
            base = self.net.get_submodule(p).base_layer
            r, alpha = cfg.rank_alpha_for(p)
            A, B = Tensor(np.empty((r, base.in_features))), Tensor(np.empty((base.out_features, r)))
            fill(A, loaded[f"{PREFIX}{p}.lora_A.weight"], f"{PREFIX}{p}.lora_A.weight", folder)
            fill(B, loaded[f"{PREFIX}{p}.lora_B.weight"], f"{PREFIX}{p}.lora_B.weight", folder)
            tensors[p], scales[p] = (A.data, B.data), lora_scaling(alpha, r, cfg.use_rslora)
        return tensors, scales

    @contextlib.contextmanager
    def _plain(self):
        """The served layers as plain layers within the block (to match an adapter's targets by PEFT's rules)."""
        self._unwrap()
        try:
            yield
        finally:
            self._wrap()

    def _wrap(self) -> None:
        for p in self.paths:
            b = self.net.get_submodule(p)
            self.net.set_submodule(p, PooledLinear(b, self.pools[b.in_features], self.pools[b.out_features]))

    def _unwrap(self) -> None:
        for p in self.paths:
            self.net.set_submodule(p, self.net.get_submodule(p).base_layer)

    def close(self) -> None:
        """Give the model its plain layers back (the pool's pages are dropped)."""
        self._unwrap()
        self.resident.clear()

    # ---- batches (SERVING-4..6) ----------------------------------------------------------------
    def bind(self, names) -> None:
        """Load the batch's adapters (pinned while it runs) and point each served layer at row b's pages."""
        self.pinned = set()
        for n in dict.fromkeys(n for n in names if n is not None):
            self.load(n)
            self.pinned.add(n)
        self._point(names)

    def _point(self, names) -> None:
        for p in self.paths:
            layer = self.net.get_submodule(p)
            held = [self.resident[n].layers.get(p) if n is not None else None for n in names]
            R = max((len(h[0]) for h in held if h is not None), default=0)
            if R == 0:
                layer.rows = None
                continue
            pad = lambda pages, zero: list(pages) + [zero] * (R - len(pages))  # noqa: E731
            a = [i for h in held for i in pad(h[0] if h else [], layer.pool_a.zero)]
            b = [i for h in held for i in pad(h[1] if h else [], layer.pool_b.zero)]
            s = np.array([h[2] if h else 0.0 for h in held], dtype=np.float32)[:, None, None]  # (B, 1, 1)
            layer.rows = (backend.asarray(np.array(a, dtype=np.int64)), backend.asarray(np.array(b, dtype=np.int64)),
                          R, backend.asarray(s))

    def release(self) -> None:
        self.pinned = set()
        for p in self.paths:
            self.net.get_submodule(p).rows = None

    def __call__(self, input_ids, adapters, attention_mask=None) -> Tensor:
        """Logits (B, T, V) with row b through adapter adapters[b] (None: the base model), SERVING-4."""
        ids = np.asarray(input_ids)
        if len(adapters) != ids.shape[0]:
            raise ConfigError(f"{len(adapters)} adapter names for a batch of {ids.shape[0]}; give one per row")
        try:
            self.bind(adapters)
            with no_grad():
                return self.model(ids, attention_mask=attention_mask)
        finally:
            self.release()

    def generate(self, requests, eos_token_id=None, max_batch=None) -> list:
        """Greedy tokens of each Request, prompt included (np arrays), in one batch (SERVING-6); with max_batch, at
        most that many run at once and a waiting request joins as soon as one leaves (SERVING-9)."""
        cfg = self.model.config
        if not isinstance(self.net, DecoderLM):
            raise ConfigError(f"generate needs a causal LM; {cfg.model_type} is an encoder")
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise ConfigError(f"max_batch={max_batch!r} must be a positive integer (or None: every request at once)")
        eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
        eos = set([eos] if isinstance(eos, int) else (eos or []))
        prompts = [np.asarray(r.prompt, dtype=np.int64).reshape(-1) for r in requests]
        for i, (q, r) in enumerate(zip(prompts, requests)):
            if q.size == 0 or q.min() < 0 or q.max() >= cfg.vocab_size or r.max_new_tokens < 0:
                raise ConfigError(f"request {i}: the prompt must be 1 or more ids in [0, {cfg.vocab_size}) and "
                                  f"max_new_tokens >= 0; got {q.size} ids, max_new_tokens={r.max_new_tokens}")
            if q.size + r.max_new_tokens > cfg.max_position_embeddings:  # TRAIN-9, as Model.generate
                raise ConfigError(f"request {i}: {q.size} prompt tokens + {r.max_new_tokens} new tokens exceed the "
                                  f"{cfg.max_position_embeddings} positions of this {cfg.model_type} model")
        out = [list(q) for q in prompts]
        left = lambda i: requests[i].max_new_tokens - (len(out[i]) - prompts[i].size)  # noqa: E731  tokens to go
        names = lambda rows: [requests[i].adapter for i in rows]  # noqa: E731
        waiting = [i for i, r in enumerate(requests) if r.max_new_tokens > 0]
        run = Rows([], None, np.zeros((0, 0), dtype=np.int64), np.zeros((0, 1), dtype=np.int64))
        try:
            with no_grad():
                while run.live or waiting:
                    free = (max_batch or len(waiting)) - len(run.live)
                    if waiting and free > 0:  # requests join the running batch (S-LoRA's iteration-level batching)
                        admit, waiting = waiting[:free], waiting[free:]
                        self.bind(names(run.live + admit))
                        self._point(names(admit))
                        new, logits = self._prefill(admit, prompts)
                        self._take(new, logits, out, left, eos)
                        run = run.joined(new, max(map(left, run.live + new.live), default=0))
                        self._point(names(run.live))
                        continue
                    run.mask = np.concatenate([run.mask, np.ones((len(run.live), 1), dtype=run.mask.dtype)], axis=1)
                    run.pos = run.pos + 1
                    logits = self.net(backend.asarray(run.nxt[:, None]), attention_mask=backend.asarray(run.mask),
                                      position_ids=backend.asarray(run.pos), cache=run.cache)
                    if self._take(run, logits, out, left, eos):
                        self._point(names(run.live))
        finally:
            self.release()
        return [np.array(o) for o in out]

    def _prefill(self, admit, prompts):
        """(Rows, logits): the prompts of requests `admit` through the model, left-padded into a cache of their own."""
        cfg = self.model.config
        T = max(prompts[i].size for i in admit)
        ids = np.stack([np.pad(prompts[i], (T - prompts[i].size, 0)) for i in admit])  # (n, T) left-padded
        mask = np.stack([np.pad(np.ones_like(prompts[i]), (T - prompts[i].size, 0)) for i in admit])
        cache = KVCache(cfg.num_hidden_layers, len(admit), cfg.num_key_value_heads, T, cfg.head_dim,
                        backend.dtype("float32"), backend.xp())
        pos = gen.position_ids_from_mask(mask)
        logits = self.net(backend.asarray(ids), attention_mask=backend.asarray(mask),
                          position_ids=backend.asarray(pos), cache=cache)
        return Rows(list(admit), cache, mask, pos[:, -1:]), logits

    @staticmethod
    def _take(rows, logits, out, left, eos) -> bool:
        """Each row's greedy next token into `out`; finished requests leave with their cache rows (True if any did)."""
        rows.nxt = np.argmax(backend.to_host(logits.data[:, -1, :]), axis=-1)  # (B,) greedy
        keep = []
        for j, i in enumerate(rows.live):
            out[i].append(int(rows.nxt[j]))
            if left(i) > 0 and int(rows.nxt[j]) not in eos:
                keep.append(j)
        if len(keep) == len(rows.live):
            return False
        rows.keep(keep)
        return True

    def nbytes(self) -> int:
        """Bytes of the preallocated pages (every width's array)."""
        return sum(int(np.prod(p.data.shape)) * 4 for p in self.pools.values())
