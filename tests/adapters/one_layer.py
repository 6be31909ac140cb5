"""One adapted layer outside a model, for the DoRA and IA3 tests: a random Linear or GPT-2 Conv1D
base, and a backward probe L = Σ G ⊙ layer(X) whose gradients the tests rebuild in NumPy."""
import numpy as np

from minipeft.autograd import Tensor
from minipeft.nn.layers import Conv1D, Linear


def random_base(fan_in_fan_out: bool, rng, n_in: int = 12, n_out: int = 20):
    """(base, W0 as (out, in) float64): a Linear, or a Conv1D whose weight is stored (in, out)."""
    base = (Conv1D if fan_in_fan_out else Linear)(n_in, n_out)
    base.weight.data = (rng.standard_normal(base.weight.shape) * 0.3).astype(np.float32)
    base.bias.data = (rng.standard_normal((n_out,)) * 0.3).astype(np.float32)
    W0 = base.weight.data.T if fan_in_fan_out else base.weight.data
    return base, W0.astype(np.float64)


def check_dropout_forward(model, p: float, delta_of, label: str, path="model.layers.0.self_attn.k_proj"):
    """Train mode, one adapted layer of a model: h = W0 x + b + (x ⊙ mask) ΔWᵀ, with the mask that
    backend.RNG(0) draws first and ΔW = delta_of(the layer's default delta)."""
    from minipeft import backend
    from helpers import assert_close
    layer = model.net.get_submodule(path)
    layer.train()
    d = layer.adapters["default"]
    n = layer.base_layer.in_features
    x = np.random.default_rng(3).standard_normal((5, n)).astype(np.float32)
    mask = np.asarray(backend.RNG(0).keep_mask((5, n), p))
    d.rng = backend.RNG(0)
    W0, b = (np.asarray(t.data, np.float64) for t in (layer.base_layer.weight, layer.base_layer.bias))
    assert_close(layer(Tensor(x)), x @ W0.T + b + (x * mask) @ delta_of(d).T, 1e-5, label=label)


def probe_backward(layer, n_in: int, n_out: int, seed: int = 5):
    """Backward of L = Σ G ⊙ layer(X) for seeded X (4, n_in), G (4, n_out); returns X, G."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((4, n_in)).astype(np.float32)
    G = rng.standard_normal((4, n_out)).astype(np.float32)
    (layer(Tensor(X)) * Tensor(G)).sum().backward()
    return X, G


def train_next(model, lr=1e-2):
    """model.train on eight words of the demo's `next` task (8 epochs of batch 4); its history."""
    import minipeft as mp
    data = [{"prompt": f"next {w} =", "completion": " " + "".join(chr(ord(c) + 1) for c in w)}
            for w in ["abc", "hello", "cat", "dog", "pen", "map", "sky", "tree"]]
    return model.train(data, mp.TrainingConfig(learning_rate=lr, batch_size=4, epochs=8, progress=False))


def check_train_moves_every_leaf(model, lr=1e-2):
    """train_next (at lr) lowers the loss by a fifth and moves every trainable tensor of the model."""
    import numpy as np
    before = {n: np.array(p.data) for n, p in model.net.named_trainable_parameters().items()}
    h = train_next(model, lr)
    assert h["loss"][-1] < 0.8 * h["loss"][0]
    assert all(not np.array_equal(p.data, before[n]) for n, p in model.net.named_trainable_parameters().items())


def saved_and_reloaded(model, tmp_path, make_model, ids):
    """Save model's default adapter to tmp_path, load it onto make_model(), check the logits on ids agree
    (1e-6); (the saved adapter_config.json as a dict, {saved key: shape})."""
    import json
    from helpers import assert_close
    from minipeft.safetensors_io import read_safetensors
    out = model(ids).numpy()
    model.save_adapters(str(tmp_path))
    tensors, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    again = make_model()
    again.load_adapters(str(tmp_path))
    assert_close(again(ids), out, 1e-6, label="reloaded")
    return json.loads((tmp_path / "adapter_config.json").read_text()), {k: v.shape for k, v in tensors.items()}


def check_mixed_batch(model, names, ids):
    """METHOD-6: row b of model(ids, adapter_names=names) is the model with adapter names[b] alone active
    ("__base__": none), to 1e-6 of the row's scale."""
    import numpy as np
    from helpers import assert_close
    mixed = model(ids, adapter_names=names).numpy()
    for b, n in enumerate(names):
        if n == "__base__":
            with model.disable_adapters():
                want = model(ids).numpy()
        else:
            model.set_active_adapter(n)
            want = model(ids).numpy()
        assert_close(mixed[b], want[b], 1e-6, label=f"row {b} ({n})")
    assert np.isfinite(mixed).all()


def check_on_the_backend(create, delta_np, trained: str, seed: int = 0):
    """On the backend in use: a random Linear (12 -> 20) adapted by create(base) (a delta) takes a batch, its
    `trained` tensor gets a gradient, and the forward, then the merged forward, equal x (W0 + delta_np(d))^T + b."""
    from minipeft import backend
    from minipeft.adapters.base import AdaptedLayer
    from helpers import assert_close
    rng = np.random.default_rng(seed)
    base, W0 = random_base(False, rng, 12, 20)
    layer = AdaptedLayer(base)
    layer.adapters["default"] = d = create(base)
    layer.active = ["default"]
    for t in layer.parameters():
        t.data = backend.asarray(np.asarray(t.data))
    x = rng.standard_normal((2, 3, 12)).astype(np.float32)
    y = layer(Tensor(backend.asarray(x)))
    y.sum().backward()
    assert getattr(d, trained).grad is not None
    ref = x @ (W0 + delta_np(d)).T + np.asarray(base.bias.data)
    assert_close(backend.to_host(y.data), ref, 1e-5, label="forward")
    layer.merge("default")
    assert_close(backend.to_host(layer(Tensor(backend.asarray(x))).data), ref, 1e-5, label="merged forward")


def check_refuses_a_4bit_base(method: str):
    """apply_<method> on q_proj of the carried model loaded in 4 bits is a ConfigError naming the layer and saying a
    float Linear is needed (a method that reads or projects W0 itself)."""
    import pytest
    import minipeft as mp
    from minipeft.errors import ConfigError
    model = mp.load_model(mp.DEMO_MODEL, quantization=mp.QuantizationConfig(compute_dtype="float32"))
    with pytest.raises(ConfigError, match=r"target_modules \(for .*q_proj\).*float Linear"):
        getattr(model, f"apply_{method}")(target_modules=("q_proj",))
