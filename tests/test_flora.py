"""Flora (spec/flora.md FLORA-1..6): the seeded projections, the compressed momentum with its transfer at each
resample rebuilt in NumPy float64, AdamW unchanged for what is not compressed, an exact resume between
resamples, refusals before any step."""
import numpy as np
import pytest

import minipeft as mp
from minipeft import optimizers as O
from minipeft.autograd.tensor import Tensor
from minipeft.errors import ConfigError
from minipeft.nn.optim import AdamW
from minipeft.optimizers.flora import FloraAdamW
from minipeft.train import TrainingConfig
from tests.helpers import assert_close, tiny_llama
from tests.procedure_helpers import DATA, RUN
from tests.test_train import trainable

SHAPES = {"W": (6, 10), "b": (6,), "narrow": (5, 3)}  # compressed; 1-d; in <= r


def params(seed=0):
    r = np.random.default_rng(seed)
    return {n: Tensor(r.standard_normal(s).astype(np.float32), requires_grad=True) for n, s in SHAPES.items()}


def grads(steps, seed=1):
    r = np.random.default_rng(seed)
    return [{n: r.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()} for _ in range(steps)]


def run(opt, named, gs):
    for g in gs:
        for n, p in named.items():
            p.grad = mp.backend.asarray(g[n])
        opt.step()
    return {n: p.numpy() for n, p in named.items()}


def reference(W, gs, r, kappa, seed, i, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """FLORA-1..3 in float64 for one compressed weight W (out, in), from the spec's formulas."""
    proj = lambda j: (np.random.default_rng([seed, i, j]).standard_normal((r, W.shape[1])) / np.sqrt(r)  # noqa: E731
                      ).astype(np.float32).astype(np.float64)
    W, M, v = W.astype(np.float64), np.zeros((W.shape[0], r)), np.zeros(W.shape)
    for t, G in enumerate(gs, 1):
        j = t // kappa
        v = b2 * v + (1 - b2) * G * G
        u = G / (np.sqrt(v / (1 - b2 ** t)) + eps)
        if t % kappa == 0:
            M = M @ proj(j - 1) @ proj(j).T
        M = b1 * M + (1 - b1) * u @ proj(j).T
        W = W * (1 - lr * wd) - lr * (M @ proj(j)) / (1 - b1 ** t)
    return W


@pytest.mark.spec("FLORA-1")
def test_projections_are_seeded_gaussians_resampled_every_kappa_steps():
    opt = FloraAdamW(params(), O.FloraConfig(rank=3, kappa=4, seed=9))
    A = opt.projection("W", 2)
    ref = (np.random.default_rng([9, 0, 2]).standard_normal((3, 10)) * (1 / np.sqrt(3))).astype(np.float32)
    assert np.array_equal(mp.backend.to_host(A), ref)
    assert not np.array_equal(mp.backend.to_host(opt.projection("W", 3)), ref)
    big = FloraAdamW({"W": Tensor(np.zeros((4, 4000), np.float32))}, O.FloraConfig(rank=50)).projection("W", 0)
    assert abs(float(np.var(mp.backend.to_host(big))) * 50 - 1) < 0.02  # N(0, 1/r)


@pytest.mark.spec("FLORA-2", "FLORA-3")
@pytest.mark.parametrize("kappa, wd", [(2, 0.0), (3, 0.1), (1, 0.0), (100, 0.1)])
def test_compressed_momentum_and_its_transfer_equal_the_spec(kappa, wd):
    named, gs = params(), grads(7)
    W0 = named["W"].numpy().copy()
    got = run(FloraAdamW(named, O.FloraConfig(rank=3, kappa=kappa, seed=4), lr=1e-2, weight_decay=wd), named, gs)
    ref = reference(W0, [g["W"].astype(np.float64) for g in gs], 3, kappa, 4, 0, 1e-2, wd)
    assert_close(got["W"], ref, rtol=1e-6, label=f"W after 7 steps, kappa={kappa}")


@pytest.mark.spec("FLORA-4")
def test_what_is_not_compressed_steps_as_adamw_bit_for_bit():
    named, gs = params(), grads(5)
    opt = FloraAdamW(named, O.FloraConfig(rank=3, kappa=2), lr=1e-2, weight_decay=0.1)
    got = run(opt, named, gs)
    plain = params()
    ref = run(AdamW(plain, lr=1e-2, weight_decay=0.1), plain, gs)
    assert opt.compressed == {"W"}
    assert np.array_equal(got["b"], ref["b"]) and np.array_equal(got["narrow"], ref["narrow"])
    assert opt.m["W"].shape == (6, 3) and opt.m["narrow"].shape == (5, 3)  # M is out x r


@pytest.mark.spec("FLORA-4", "TRAIN-1")
def test_full_fine_tuning_with_flora_learns_a_sequence_task():
    r = np.random.default_rng(0)
    data = [{"input_ids": [int((a + k * i) % 48) for i in range(10)]} for a, k in zip(r.integers(0, 48, 48),
                                                                                      r.integers(1, 4, 48))]
    m = full_ft()
    hist = m.train(data, TrainingConfig(learning_rate=1e-3, batch_size=4, max_steps=30, progress=False,
                                        optimizer=O.FloraConfig(rank=8, kappa=10)))
    assert np.mean(hist["loss"][-5:]) < hist["loss"][0] - 1.0


def full_ft():
    m = tiny_llama()
    m.net.requires_grad_(True)
    return m


@pytest.mark.spec("FLORA-5", "TRAIN-13")
@pytest.mark.parametrize("ckpt", [3, 4])  # kappa = 2: after step 4 a resample is one step behind, after 3 ahead
def test_a_run_resumed_between_resamples_gives_the_same_losses_and_weights(tmp_path, ckpt):
    cfg = dict(**{**RUN, "max_steps": 7, "learning_rate": 1e-3}, optimizer=O.FloraConfig(rank=4, kappa=2, seed=1))
    full = full_ft()
    whole = full.train(DATA, TrainingConfig(**cfg, output_dir=str(tmp_path), save_steps=ckpt))
    again = full_ft()
    resumed = again.train(DATA, TrainingConfig(**cfg, resume_from=str(tmp_path / f"checkpoint-{ckpt}")))
    assert resumed["loss"] == whole["loss"]  # bit for bit
    assert all(np.array_equal(a, b) for a, b in zip(trainable(full).values(), trainable(again).values()))
    other = full_ft()
    with pytest.raises(ConfigError, match="kappa=2"):
        other.train(DATA, TrainingConfig(**{**cfg, "optimizer": O.FloraConfig(rank=4, kappa=3, seed=1)},
                                         resume_from=str(tmp_path / f"checkpoint-{ckpt}")))


@pytest.mark.spec("FLORA-5")
def test_flora_runs_on_every_backend(any_backend):
    def losses():
        m = tiny_llama()
        m.apply_lora(rank=2, target_modules=["q_proj", "v_proj"])
        cfg = TrainingConfig(**{**RUN, "max_steps": 3}, optimizer=O.FloraConfig(rank=4, kappa=1))
        return m.train(DATA, cfg)["loss"]
    got = losses()
    mp.backend.set_backend("numpy")
    assert got == pytest.approx(losses(), rel=1e-5)


@pytest.mark.spec("FLORA-6")
@pytest.mark.parametrize("kw, field", [(dict(rank=0), "rank"), (dict(kappa=0), "kappa"), (dict(kappa=1.5), "kappa"),
                                       (dict(rank=True), "rank"), (dict(seed=-1), "seed")])
def test_bad_options_are_config_errors(kw, field):
    with pytest.raises(ConfigError, match=f"FloraConfig.{field}"):
        O.FloraConfig(**kw)


@pytest.mark.spec("FLORA-6")
def test_a_model_with_nothing_to_compress_is_refused_before_any_step():
    m = tiny_llama()
    m.apply_lora(rank=2, target_modules=["q_proj"])  # lora_A (2, 32), lora_B (32, 2): in <= 32
    before = trainable(m)
    with pytest.raises(ConfigError, match="none"):
        m.train(DATA, TrainingConfig(**RUN, optimizer=O.FloraConfig(rank=32)))
    assert all(np.array_equal(before[n], a) for n, a in trainable(m).items())
    with pytest.raises(ConfigError, match="none"):
        O.create_flora_optimizer(m, lr=1e-3, rank=32)
