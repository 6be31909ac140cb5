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
    """CorDA (spec/corda.md, not yet registered) on a minipeft model, layer by layer as apply_adapter will do:
    {path: (LoRALinear delta, base layer, the covariance C it was built from)}, the base layers' W0 rewritten;
    fields go to CorDAConfig."""
    from minipeft import backend
    from minipeft.adapters.corda import CorDAConfig
    from minipeft.adapters.lora import LoRALinear
    cfg = CorDAConfig(**fields)
    bases = {p: m for p, m in model.net.named_modules() if p.rsplit(".", 1)[-1] in cfg.target_modules}
    model.net.eval()
    _, cfg._stats = cfg.from_data(model, bases, batches)
    return {p: (LoRALinear.create(b, cfg, p, backend.RNG(0)), b, cfg._stats[p]) for p, b in bases.items()}


def corda_reference(W0, C, r, mode):
    """CORDA-2/3 in float64 NumPy: (the residual W0 - s B A, s B A) for rank r, mode "ipm" or "kpm"."""
    Cd = C + np.eye(len(C)) * np.mean(np.diag(C)) * 0.01
    assert np.linalg.norm(Cd @ np.linalg.inv(Cd) - np.eye(len(C))) < 0.05  # the first damping suffices here
    U, S, Vh = np.linalg.svd(W0 @ Cd, full_matrices=False)
    Vt = Vh @ np.linalg.inv(Cd)
    take = slice(0, r) if mode == "ipm" else slice(len(S) - r, len(S))
    sBA = (U[:, take] * S[take]) @ Vt[take]
    return W0 - sBA, sBA
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
