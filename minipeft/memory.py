"""Memory of one training step, counted from the ops minipeft runs (spec/memory.md).

Symbols: B batch, T tokens (= S keys), N = B T, d hidden, I intermediate, H / Hkv heads, D head
size, dq = H D, dkv = Hkv D, V vocabulary, L layers, r rank, e bytes per float.
Weights (MEM-1): float parameters e each; 4-bit linears at NF4's stored bytes (NF4-10).
Gradients, optimizer (MEM-2): e per trainable parameter, and 2 e more for AdamW's m and v.
Activations (MEM-3..MEM-5): a recorded op keeps its inputs (Function.parents) and what it saves;
    an op is recorded when an input needs a gradient or it owns a trainable parameter (AG-2).
    The forward below replays llama's ops on sizes and sums what the recorded ones keep.
Backward buffers (MEM-6): (N V + 3 min(CE_CHUNK, N V)) e for the loss, max(4 N I, B H min(T, 256) S) e for a layer.
Backward peak (MEM-7): the worst stage of live activations + gradients made + buffers.
Total (MEM-8): weights + optimizer + max(backward peak, gradients + AdamW's temporaries).
"""
from __future__ import annotations

import dataclasses
import json
import os

from .autograd.functional import ATTN_BLOCK, CE_CHUNK
from .errors import ConfigError
from .models.config import ModelConfig, config_from_dict, read_config

METHODS = ("full", "lora", "qlora")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ITEMSIZE = {"float32": 4, "float16": 2, "float64": 8}
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step (forward, backward, AdamW); `total` is its peak (MEM-8)."""
    weights: int
    gradients: int  # all of them, as the optimizer step holds them
    optimizer: int
    activations: int  # kept after forward, plus one layer's rebuilt graph under checkpointing
    after_forward: int  # activations kept when forward returns (MEM-3..MEM-5)
    workspace: int  # the largest buffers one backward op makes at once
    backward_peak: int  # activations, gradients and buffers live at backward's worst stage (MEM-7)
    optimizer_workspace: int  # AdamW's temporaries on the largest trainable tensor
    trainable: int  # parameters trained
    base_params: int  # parameters of the model, adapters not counted

    @property
    def total(self) -> int:
        """MEM-8: the step's peak, at the worst backward stage or in the optimizer step."""
        return self.weights + self.optimizer + max(self.backward_peak, self.gradients + self.optimizer_workspace)

    def rows(self):
        return [("weights", self.weights), ("gradients", self.gradients), ("optimizer states", self.optimizer),
                ("activations", self.activations), ("backward workspace", self.workspace),
                ("peak (total)", self.total)]


def nf4_bytes(n: int, block_size: int = 64, double_quantization: bool = True) -> int:
    """NF4-10's stored bytes for n weights: the codes, and the absmax (8-bit + scales + offset)."""
    nb = -(-n // block_size)
    bits = 8 * ((n + 1) // 2) + (8 * nb + 32 * -(-nb // 256) + 32 if double_quantization else 32 * nb)
    return bits // 8


def _shapes(c: ModelConfig):
    """(in, out) of each linear of one layer, in LINEARS order."""
    d, I, dq, dkv = c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim, \
        c.num_key_value_heads * c.head_dim
    return dict(zip(LINEARS, ((d, dq), (d, dkv), (d, dkv), (dq, d), (d, I), (d, I), (I, d))))


def _biases(c: ModelConfig):
    qkv = c.attention_bias or c.model_type == "qwen2"
    return {"q_proj": qkv, "k_proj": qkv, "v_proj": qkv, "o_proj": c.attention_bias,
            "gate_proj": c.mlp_bias, "up_proj": c.mlp_bias, "down_proj": c.mlp_bias}


class _Graph:
    """Sizes only: each tensor's bytes and whether it needs a gradient. A recorded op keeps its
    inputs and its saved arrays until backward (MEM-3); an unrecorded op keeps nothing."""

    def __init__(self):
        self.size, self.grad, self.kept, self.saved = {}, {}, set(), 0

    def op(self, out, size, inputs=(), trainable=False, saved=0):
        recorded = trainable or any(self.grad[i] for i in inputs)
        if recorded:
            self.kept.update(inputs)
            self.saved += saved
        self.size[out], self.grad[out] = size, recorded
        return out

    def leaf(self, name, size, grad=False):
        self.size[name], self.grad[name] = size, grad
        return name

    def bytes(self):
        return sum(self.size[t] for t in self.kept) + self.saved


@dataclasses.dataclass
class _Plan:
    c: ModelConfig
    method: str
    targets: tuple
    r: int
    N: int
    e: int
    cd: str


def _linear(g, p: _Plan, name, x, fin, fout):
    """One projection: base (Linear, or Linear4bit: dequant W, rd(x), rd(y)) then the LoRA path."""
    N, e = p.N, p.e
    if p.method == "qlora":  # QLORA-4: W = dequant(t) float32, a graph input; rd() copies unless cd = float32
        W = g.leaf(f"{name}.W", fin * fout * 4)
        xr = x if p.cd == "float32" else g.op(f"{name}.rx", N * fin * 4, (x,))
        y = g.op(f"{name}.y0", N * fout * 4, (xr, W))
        y = y if p.cd == "float32" else g.op(f"{name}.ry", N * fout * 4, (y,))
    else:
        y = g.op(f"{name}.y0", N * fout * e, (x,), trainable=p.method == "full")
    if p.method != "full" and name.split(".")[-1] in p.targets:  # LORA-3: y + (x A^T B^T) s
        a = g.op(f"{name}.A", N * p.r * 4, (x,), trainable=True)
        b = g.op(f"{name}.B", N * fout * 4, (a,), trainable=True)
        s = g.op(f"{name}.s", N * fout * 4, (b,))
        y = g.op(f"{name}.y", N * fout * 4, (y, s))
    return y


def _rms_norm(g, p, name, x, full):
    N, d, e = p.N, p.c.hidden_size, p.e
    return g.op(name, N * d * e, (x,), trainable=full, saved=(N * d + N) * e)  # saves xh (N, d), r (N, 1)


def causal_probs(T: int) -> int:
    """Entries of P one attention head keeps for T tokens under the causal mask (MEM-4): SDPA's blocks
    of ATTN_BLOCK query rows (AG-20) each keep the keys up to their last row, all T of them in one block."""
    rows = ATTN_BLOCK
    return T * T if T <= rows else sum((min(i + rows, T) - i) * min(i + rows, T) for i in range(0, T, rows))


def _layer(g, p: _Plan, i, x, B, T):
    """LlamaDecoderLayer.forward on sizes (MEM-4)."""
    c, N, e, full = p.c, p.N, p.e, p.method == "full"
    sh, L = _shapes(c), f"l{i}."
    n1 = _rms_norm(g, p, L + "n1", x, full)
    q, k, v = (_linear(g, p, L + n, n1, *sh[n]) for n in ("q_proj", "k_proj", "v_proj"))
    q = g.op(L + "rope_q", N * sh["q_proj"][1] * e, (q,))  # split_heads and merge_heads' permute are views
    k = g.op(L + "rope_k", N * sh["k_proj"][1] * e, (k,))
    o = g.op(L + "sdpa", N * sh["q_proj"][1] * e, (q, k, v),
             saved=B * c.num_attention_heads * causal_probs(T) * e)  # saves P; q (B, Hkv, G, T, D) and O are views
    o = g.op(L + "merge", N * sh["q_proj"][1] * e, (o,))  # reshape of a transposed view: a copy
    h = g.op(L + "h", N * c.hidden_size * e, (x, _linear(g, p, L + "o_proj", o, *sh["o_proj"])))
    n2 = _rms_norm(g, p, L + "n2", h, full)
    gate, up = (_linear(g, p, L + n, n2, *sh[n]) for n in ("gate_proj", "up_proj"))
    m = g.op(L + "silu_mul", N * c.intermediate_size * e, (gate, up),
             saved=N * c.intermediate_size * e)  # saves sigmoid(gate)
    return g.op(L + "out", N * c.hidden_size * e, (h, _linear(g, p, L + "down_proj", m, *sh["down_proj"])))


def _activations(p: _Plan, B, T, checkpointing):
    """(bytes kept after forward; per layer, L-1 .. 0, the bytes its rebuilt graph keeps under
    checkpointing; the saved bytes backward frees at each stage: head, layers L-1 .. 0)."""
    c, N, e, full = p.c, p.N, p.e, p.method == "full"
    tables = 2 * B * T * c.rotary_dim * 4  # rope cos, sin (B, 1, T, rot) float32, saved by every RoPE
    g = _Graph()
    x = g.op("embed", N * c.hidden_size * e, trainable=full)
    rebuilt, freed = [], []
    for i in range(c.num_hidden_layers):
        before = g.saved
        if checkpointing:  # MEM-5: keeps the layer's input; backward rebuilds one layer's graph at a time
            sub = _Graph()
            _layer(sub, p, i, sub.leaf("x", 0, g.grad[x]), B, T)
            rebuilt.insert(0, sub.bytes())
            x = g.op(f"l{i}.out", N * c.hidden_size * e, (x,), trainable=full or bool(p.targets))
        else:
            x = _layer(g, p, i, x, B, T)
            rebuilt.insert(0, 0)
        freed.insert(0, g.saved - before)
    before = g.saved
    nf = _rms_norm(g, p, "norm", x, full)
    logits = g.op("logits", N * c.vocab_size * e, (nf,), trainable=full)
    g.op("loss", e, (logits,), saved=N * 16)  # saves lse, validf (N,) floats and flat_idx (N,) int64
    mask = B * T * T * 4 if checkpointing else 0  # the layers' closures hold the (B, 1, T, S) mask
    kept = g.bytes() + (tables + mask if any(g.grad.values()) else 0)
    return kept, rebuilt, [g.saved - before] + freed


def _backward_peak(kept, stages):
    """MEM-7: backward runs stage by stage (head, layers L-1 .. 0, embeddings); a stage holds what is
    live, the gradients it makes and its own buffers, then frees its ops' saved arrays. (Tensor.backward
    drops each ctx.saved when done, but its topological order keeps every op's output until it returns.)"""
    live = peak = kept
    for made, freed, buffers in stages:
        peak = max(peak, live + made + buffers)
        live += made - freed
    return peak


def _param_counts(c: ModelConfig, p: _Plan):
    """Parameters: (embeddings, lm_head and final norm; one layer's float; one layer's linear weights;
    one layer's 4-bit bytes; one layer's adapter) (MEM-1, MEM-2)."""
    d, V = c.hidden_size, c.vocab_size
    sh, bias = _shapes(c), _biases(c)
    head = (0 if c.tie_word_embeddings else V * d) + d
    other = 2 * d + sum(sh[n][1] for n in LINEARS if bias[n])  # two norms, the biases
    linear = sum(fin * fout for fin, fout in sh.values())
    quant = sum(nf4_bytes(fin * fout) for fin, fout in sh.values()) if p.method == "qlora" else 0
    lora = sum(p.r * (fin + fout) for n, (fin, fout) in sh.items() if n in p.targets)
    return V * d, head, other, linear, quant, lora


def load_config(config) -> ModelConfig:
    """A ModelConfig, a config.json path, or a folder holding one."""
    if isinstance(config, ModelConfig):
        return config
    path = os.fspath(config)
    if os.path.isdir(path):
        return read_config(path)
    try:
        with open(path, encoding="utf-8") as f:
            return config_from_dict(json.load(f), path)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot read a model config ({err})") from err


def estimate(config, method="full", rank=8, target_modules=("q_proj", "v_proj"), seq=512, batch=4,
             gradient_checkpointing=False, dtype="float32", compute_dtype="bfloat16",
             optimizer="adamw") -> MemoryEstimate:
    """Peak bytes of one training step of a llama-family model (spec/memory.md MEM-1..MEM-8)."""
    c = load_config(config)
    if c.model_type not in ("llama", "mistral", "qwen2"):
        raise ConfigError(f"memory.estimate covers the llama family (llama, mistral, qwen2), not {c.model_type}")
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: use one of {', '.join(METHODS)}")
    if dtype not in ITEMSIZE or compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"dtype={dtype!r} / compute_dtype={compute_dtype!r}: use {', '.join(ITEMSIZE)} "
                          f"/ {', '.join(COMPUTE_DTYPES)}")
    if optimizer != "adamw":
        raise ConfigError(f"optimizer={optimizer!r}: minipeft trains with adamw")
    targets = LINEARS if target_modules == "all-linear" else tuple(target_modules)
    if method != "full" and not set(targets) <= set(LINEARS):
        raise ConfigError(f"target_modules={target_modules!r}: use names among {', '.join(LINEARS)}, or all-linear")
    e, N = ITEMSIZE[dtype], batch * seq
    p = _Plan(c, method, targets if method != "full" else (), rank, N, e, compute_dtype)
    emb, head, other, linear, quant, lora = _param_counts(c, p)
    L, H, I, V = c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.vocab_size
    full = method == "full"
    per_layer = other + linear if full else lora  # trainable parameters of one layer
    trainable = emb + head + L * per_layer if full else L * lora
    te = e if full else 4  # adapters are float32
    kept, rebuilt, freed = _activations(p, batch, seq, gradient_checkpointing)
    ce = (N * V + 3 * min(CE_CHUNK, N * V)) * e  # MEM-6: the gradient, and one block's exp temporaries
    layer_ws = max(4 * N * I, batch * H * min(seq, ATTN_BLOCK) * seq) * e  # dS of one block of query rows
    stages = [(head * te if full else 0, freed[0], ce)] + \
        [(per_layer * te, f, r + layer_ws) for f, r in zip(freed[1:], rebuilt)] + [(emb * te if full else 0, 0, 0)]
    sizes = [emb, *(i * o for i, o in _shapes(c).values())] if full else \
        [p.r * max(io) for n, io in _shapes(c).items() if n in p.targets] or [0]
    return MemoryEstimate(
        weights=(emb + head + L * other) * e + L * (quant or linear * e) + (0 if full else trainable * 4),
        gradients=trainable * te, optimizer=2 * trainable * te, activations=kept + max(rebuilt), after_forward=kept,
        workspace=max(ce, layer_ws), backward_peak=_backward_peak(kept, stages),
        optimizer_workspace=3 * max(sizes) * te, trainable=trainable, base_params=emb + head + L * (other + linear))


def check_budget(model, seq: int, batch: int, gradient_checkpointing: bool, budget_gb: float) -> None:
    """TRAIN-9: refuse, before any work, a training run whose estimated peak (MEM-8) exceeds the budget.
    The estimate counts full fine-tuning (no adapter), LoRA and QLoRA on the llama family."""
    from .adapters.inject import adapted_layers
    from .adapters.lora import LoRAConfig
    from .quant.linear4bit import Linear4bit, is_quantized
    cfgs = [model.peft_configs[n] for n in model.active_adapters]
    if any(not isinstance(c, LoRAConfig) for c in cfgs) or len(cfgs) > 1:
        raise ConfigError(f"TrainingConfig.memory_budget_gb={budget_gb!r}: memory.estimate counts full "
                          f"fine-tuning, LoRA and QLoRA with one adapter, not {[c.peft_type for c in cfgs]}")
    method = "full" if not cfgs else ("qlora" if is_quantized(model.net) else "lora")
    quant = [m for _, m in model.net.named_modules() if isinstance(m, Linear4bit)]
    targets = sorted({p.rsplit(".", 1)[-1] for p, _ in adapted_layers(model.net)})
    dtype = str(model.net.parameters()[0].data.dtype)
    est = estimate(model.config, method, cfgs[0].rank if cfgs else 8, targets, seq, batch, gradient_checkpointing,
                   dtype if dtype in ITEMSIZE else "float32", quant[0].compute_dtype if quant else "bfloat16")
    if est.total > budget_gb * 2**30:
        raise ConfigError(f"TrainingConfig.memory_budget_gb={budget_gb}: memory.estimate puts this run "
                          f"(batch {batch} x {seq} tokens, {method}) at {est.total / 2**30:.3f} GiB, over the "
                          f"budget; lower batch_size or max_length, or set gradient_checkpointing=True")
