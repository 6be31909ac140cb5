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
