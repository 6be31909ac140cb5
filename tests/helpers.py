"""assert_close in the spirit of llm.c's check_tensor: prints the max difference and the first
elements when it fails, so a parity failure says where and by how much."""
import numpy as np

from minipeft.backend import to_host


def as_np(x):
    if hasattr(x, "data") and hasattr(x, "requires_grad"):  # a minipeft Tensor
        x = x.data
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().float().numpy()
    return np.asarray(to_host(x), dtype=np.float64)


def max_rel_err(actual, ref) -> float:
    a, r = as_np(actual), as_np(ref)
    return float(np.max(np.abs(a - r)) / max(np.max(np.abs(r)), 1e-30))


def assert_close(actual, ref, rtol=1e-5, atol=0.0, label="tensor"):
    """max|a - r| <= atol + rtol * max|r| (a relative error on the tensor's scale)."""
    a, r = as_np(actual), as_np(ref)
    assert a.shape == r.shape, f"{label}: shape {a.shape} != {r.shape}"
    diff = float(np.max(np.abs(a - r))) if a.size else 0.0
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    ok = diff <= atol + rtol * scale
    assert ok, (f"{label}: NOT OK max|diff|={diff:.3e} (scale {scale:.3e}, rel {diff / max(scale, 1e-30):.3e}); "
                f"first actual {a.reshape(-1)[:5]}, ref {r.reshape(-1)[:5]}")


TINY_LLAMA = {"model_type": "llama", "vocab_size": 48, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


# the batches a data-driven initialiser reads (METHOD-11): random tokens, the first example shorter
INIT_DATA = [{"input_ids": ids, "attention_mask": (np.arange(12) < [[9], [12], [12], [12]]).astype(np.int64)}
             for ids in np.random.default_rng(2).integers(0, 48, (6, 4, 12))]


def data_for(config_class) -> dict:
    """apply_adapter's data= for a data-driven initialiser's config class (METHOD-11), else nothing."""
    return {"data": INIT_DATA} if getattr(config_class, "NEEDS_DATA", False) else {}


def tiny_llama(seed: int = 0, std: float = 0.3, **overrides):
    """A minipeft Model around a random tiny llama built in process (no files, no torch)."""
    from minipeft import backend
    from minipeft.model import Model
    from minipeft.models.config import config_from_dict
    from minipeft.models.llama import LlamaForCausalLM

    net = LlamaForCausalLM(config_from_dict({**TINY_LLAMA, **overrides}))
    r = backend.RNG(seed)
    for name, p in net.named_parameters():
        if not name.endswith("norm.weight"):
            p.data = r.normal(p.shape, std=std)
    return Model(net, seed=seed)


def hf_llama_folder(folder: str, **config) -> str:
    """A transformers LlamaForCausalLM of `config` (std 0.3 normal weights, torch seed 0) saved to folder."""
    import torch
    import transformers

    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    m.save_pretrained(folder)
    return folder


def peft_loftq_on_cpu():
    """A context in which PEFT 0.21's loftq_init runs on the CPU: it sends its tensors to "cuda" (or to
    "xpu" where is_xpu_available()), which a CPU-only torch lacks. Inside, it is told XPU is there, and
    every .to("xpu") of a tensor or a bitsandbytes Params4bit goes to the CPU, where bitsandbytes quantizes
    NF4 byte-equal to its CUDA kernel. Its CPU dequantize reads the absmax per row when a row's length is a
    multiple of 16 but not of 64 (spec/nf4.md, Deviations): use layers whose in_features avoid that."""
    import contextlib

    import bitsandbytes as bnb
    import torch
    from peft.utils import loftq_utils

    def redirected(to):
        def to_cpu(self, *args, **kwargs):
            args = tuple("cpu" if isinstance(a, str) and a == "xpu" else a for a in args)
            if kwargs.get("device") == "xpu":
                kwargs["device"] = "cpu"
            return to(self, *args, **kwargs)
        return to_cpu

    stack = contextlib.ExitStack()
    for owner, name, value in ((loftq_utils, "is_xpu_available", lambda: True),
                               (torch.Tensor, "to", redirected(torch.Tensor.to)),
                               (bnb.nn.Params4bit, "to", redirected(bnb.nn.Params4bit.to))):
        if name in vars(owner):
            stack.callback(setattr, owner, name, getattr(owner, name))
        else:  # inherited (torch.Tensor.to is the C base's): take ours away again
            stack.callback(delattr, owner, name)
        setattr(owner, name, value)
    return stack


def reloaded(model, folder, ids):
    """Move every trainable tensor of a tiny_llama() model by 0.05 ("trained"), save its adapter to folder and
    load that onto a fresh tiny_llama(): the fresh model, checked to have the same config and the same logits."""
    import numpy as np
    for _, p in model.net.named_parameters():
        if p.requires_grad:
            p.data = p.data + np.float32(0.05)
    model.save_adapters(str(folder))
    again = tiny_llama()
    again.load_adapters(str(folder))
    assert again.peft_configs["default"] == model.peft_configs["default"]
    assert np.array_equal(again(ids).numpy(), model(ids).numpy())
    return again


def corda_layers(model, batches, **fields) -> dict:
    """model.apply_corda(data=batches, **fields) (spec/corda.md), layer by layer: {path: (delta, base layer, the
    covariance C it was built from, CORDA-1)}, the base layers' W0 rewritten."""
    from minipeft.adapters.corda import CorDAConfig
    cfg = CorDAConfig(**fields)
    bases = {p: m for p, m in model.net.named_modules() if p.rsplit(".", 1)[-1] in cfg.target_modules}
    model.net.eval()
    _, C = cfg.from_data(model, bases, batches)  # (no change to the model)
    model.apply_corda(data=batches, **fields)
    return {p: (model.net.get_submodule(p).adapters["default"], b, C[p]) for p, b in bases.items()}


def corda_reference(W0, C, r, mode):
    """CORDA-2/3 in float64 NumPy: (the residual W0 - s B A, s B A) for rank r, mode "ipm" or "kpm"."""
    Cd = C + np.eye(len(C)) * np.mean(np.diag(C)) * 0.01
    assert np.linalg.norm(Cd @ np.linalg.inv(Cd) - np.eye(len(C))) < 0.05  # the first damping suffices here
    U, S, Vh = np.linalg.svd(W0 @ Cd, full_matrices=False)
    Vt = Vh @ np.linalg.inv(Cd)
    take = slice(0, r) if mode == "ipm" else slice(len(S) - r, len(S))
    sBA = (U[:, take] * S[take]) @ Vt[take]
    return W0 - sBA, sBA


def check_saved_as_conversion(method: str, fields: dict, folder) -> None:
    """A ConvertedInitConfig method (LoRA-GA, CorDA: LORA_GA-6, CORDA-5) on tiny_llama(0) with INIT_DATA: the model
    is the base at step 0; after every trained tensor moves, the saved folder is PEFT's conversion (a LoRAConfig of
    rank 2r, [A; A0], [B, -B0], alpha and the patterns doubled) and reloads on the unmodified base with its logits."""
    import json
    import minipeft as mp
    ids = np.random.default_rng(1).integers(0, 48, (2, 7))
    model = tiny_llama(0)
    base_out = model(ids).numpy()
    getattr(model, f"apply_{method}")(data=INIT_DATA, **fields)
    cfg = model.peft_configs["default"]
    assert max_rel_err(model(ids), base_out) < cfg.STEP0_RTOL
    rng = np.random.default_rng(0)
    for p in model.net.named_trainable_parameters().values():
        p.data = (p.data + rng.standard_normal(p.shape) * 0.1).astype(np.float32)
    model.save_adapters(str(folder))
    saved = json.loads((folder / "adapter_config.json").read_text())
    r, alpha = fields["rank"], fields.get("alpha", 16)
    assert saved["init_lora_weights"] is True and saved["r"] == 2 * r
    assert abs(saved["lora_alpha"] - alpha * (np.sqrt(2) if fields.get("use_rslora") else 2)) < 1e-12
    assert saved["rank_pattern"] == {k: 2 * v for k, v in fields.get("rank_pattern", {}).items()}
    assert saved["alpha_pattern"] == {k: 2 * v for k, v in fields.get("alpha_pattern", {}).items()}
    again = tiny_llama(0)
    again.load_adapters(str(folder))
    assert type(again.peft_configs["default"]) is mp.LoRAConfig
    for path, m in again.net.named_modules():
        if hasattr(m, "adapters"):
            mine = model.net.get_submodule(path).adapters["default"]
            A2, B2 = m.adapters["default"].lora_A.weight.data, m.adapters["default"].lora_B.weight.data
            assert np.array_equal(A2, np.concatenate([mine.lora_A.weight.data, mine.A0]))
            assert np.array_equal(B2, np.concatenate([mine.lora_B.weight.data, -mine.B0], axis=1))
    assert_close(again(ids), model(ids), rtol=cfg.RELOAD_RTOL, label=f"{method}: converted file on the base")


def check_bad_input_changes_nothing(method: str, rank_too_big: int, rank_rule: str, bad_sub_configs: list) -> None:
    """A ConvertedInitConfig method on tiny_llama(0) (v_proj: 16 outputs): no data, empty data, rank_too_big
    (the error naming rank_rule, a regex) and each (fields, match) of bad_sub_configs are ConfigErrors that leave
    every parameter as it was; on a 4-bit base the targeted layers are refused."""
    import pytest
    import minipeft as mp
    from minipeft.errors import ConfigError
    from minipeft.quant.linear4bit import quantize_model
    model = tiny_llama(0)
    before = {n: np.array(p.data) for n, p in model.net.named_parameters()}
    apply = getattr(model, f"apply_{method}")
    with pytest.raises(ConfigError, match="initialises from data"):
        apply()
    with pytest.raises(ConfigError, match=rf"rank \(for .*v_proj\).*{rank_rule}"):
        apply(data=INIT_DATA, rank=rank_too_big)
    with pytest.raises(ConfigError, match="data is empty"):
        apply(data=[], rank=2)
    for fields, match in bad_sub_configs:
        with pytest.raises(ConfigError, match=match):
            apply(data=INIT_DATA, **fields)
    assert not model.peft_configs
    assert all(np.array_equal(p.data, before[n]) for n, p in model.net.named_parameters())
    quantize_model(model.net, mp.QuantizationConfig(compute_dtype="float32"))
    with pytest.raises(ConfigError, match=r"target_modules \(for .*q_proj\).*quantized"):
        apply(data=INIT_DATA, rank=2)


def check_unconverted_folder_refused(method: str, folder) -> None:
    """A folder as PEFT saves a ConvertedInitConfig method without the conversion (init_lora_weights = its name,
    rank r), meant for PEFT's saved residual base: loading it is a CheckpointError that names that base."""
    import json
    import pytest
    import minipeft as mp
    model = tiny_llama(0)
    getattr(model, f"apply_{method}")(data=INIT_DATA, rank=2)
    model.save_adapters(str(folder))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": method, "r": 2}))
    with pytest.raises(mp.CheckpointError, match="residual base"):
        tiny_llama(0).load_adapters(str(folder))


def assert_training_lowers_the_loss(model):
    """model.train on eight shift-by-one words (8 epochs, lr 1e-2): the last loss is < 0.8 x the first."""
    import minipeft as mp
    data = [{"prompt": f"next {w} =", "completion": " " + "".join(chr(ord(c) + 1) for c in w)}
            for w in ["abc", "hello", "cat", "dog", "pen", "map", "sky", "tree"]]
    h = model.train(data, mp.TrainingConfig(learning_rate=1e-2, batch_size=4, epochs=8, progress=False))
    assert h["loss"][-1] < 0.8 * h["loss"][0]


def peft_svd_signs_as_minipeft():
    """A context in which torch.linalg.svd (PEFT's PSOFT takes W0's SVD with it, and saves no factor) returns each
    singular pair with the sign minipeft fixes (PSOFT-1: the largest-|.| entry of U's column positive) instead of
    its LAPACK's (MKL's here, OpenBLAS's in NumPy: they differ on about half the pairs, and the file cannot say which
    PEFT had). The factors are otherwise torch's own."""
    import contextlib

    import torch

    plain = torch.linalg.svd

    def signed(A, *args, **kwargs):
        U, S, Vh = plain(A, *args, **kwargs)
        top = U.abs().argmax(dim=-2, keepdim=True)  # (..., 1, k)
        sign = torch.where(U.gather(-2, top) < 0, -1.0, 1.0).to(U.dtype)
        return torch.return_types.linalg_svd((U * sign, S, Vh * sign.transpose(-1, -2)))

    @contextlib.contextmanager
    def patched():
        torch.linalg.svd = signed
        try:
            yield
        finally:
            torch.linalg.svd = plain
    return patched()


def peft_frod_basis_as_minipeft():
    """A context in which PEFT's FRoD builds each category's basis V as minipeft does (FROD-2: float64, each column's
    largest-|.| entry positive) instead of from its float32 LAPACK QR / eigh. PEFT 0.21.2 computes U from the V it
    builds as it loads and keeps that U when the file's V replaces V (U is not saved), so a file whose V is not the one
    PEFT rebuilds on that machine loads with a U that does not belong to it (FROD-10); with the same V both agree."""
    import contextlib

    import numpy as np
    import torch
    from peft.tuners.frod import model as frod_model

    from minipeft.adapters.frod import basis

    plain = frod_model._projection_from_weights

    def ours(matrices, regularization_alpha):
        return torch.from_numpy(np.asarray(basis([m.numpy() for m in matrices], regularization_alpha)))

    @contextlib.contextmanager
    def patched():
        frod_model._projection_from_weights = ours
        try:
            yield
        finally:
            frod_model._projection_from_weights = plain
    return patched()


def peft_kmeans_as_minipeft():
    """A context in which PEFT's AdaMSS imports scikit-learn's KMeans (absent here, and no dependency of minipeft) as
    minipeft's kmeans_labels, the rebuild of sklearn's KMeans(init="random", n_init=1) that ADAMSS-2 states: PEFT's
    SVD, seg_locations, forward, merge and file are then PEFT's own, its clustering minipeft's rebuild of sklearn's."""
    import contextlib
    import sys
    import types

    import numpy as np

    from minipeft.adapters.adamss import kmeans_labels

    class KMeans:
        def __init__(self, n_clusters, init, n_init, max_iter, random_state):
            assert (init, n_init) == ("random", 1), (init, n_init)
            self.k, self.max_iter, self.seed = n_clusters, max_iter, random_state

        def fit_predict(self, X):
            return kmeans_labels(np.asarray(X), self.k, self.seed, self.max_iter).astype(np.int32)

    @contextlib.contextmanager
    def patched():
        saved = {k: sys.modules.get(k) for k in ("sklearn", "sklearn.cluster")}
        sys.modules["sklearn"] = types.ModuleType("sklearn")
        sys.modules["sklearn.cluster"] = types.ModuleType("sklearn.cluster")
        sys.modules["sklearn.cluster"].KMeans = KMeans
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
    return patched()
