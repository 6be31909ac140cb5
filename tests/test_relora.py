"""ReLoRA (spec/relora.md RELORA-1..6): merge-and-restart every T steps, magnitude-pruned moments, the jagged
learning rate, W as the sum of the folded deltas, an exact resume mid-procedure, refusals before any step."""
import math

import numpy as np
import pytest

import minipeft as mp
from minipeft.errors import ConfigError
from minipeft.nn.optim import AdamW, lr_at
from minipeft.procedures import ReLoRAConfig, ReLoRAHook
from minipeft.train import TrainingConfig
from tests.helpers import assert_close, tiny_llama
from tests.procedure_helpers import DATA, RUN, base_W, resumed_equals_full, sBA
from tests.test_qlora import quantized_llama
from tests.test_train import lora_model


class Spy(ReLoRAHook):
    """Records s B A of every layer just before each restart folds it (rebuilt from the factors in NumPy)."""

    def __init__(self, model, opts):
        super().__init__(model, opts)
        self.folded = []

    def after_step(self, step):
        if (step + 1) % self.opts.reset_every == 0:
            self.folded.append(sBA(self.model))
        super().after_step(step)


@pytest.mark.spec("RELORA-1", "RELORA-4")
def test_a_restart_folds_sBA_into_W_restarts_the_factors_and_keeps_the_output():
    m = lora_model()
    m.train(DATA, TrainingConfig(**{**RUN, "max_steps": 2}))  # B != 0
    hook = ReLoRAHook(m, ReLoRAConfig(reset_every=3, restart_warmup=1))
    hook.attach(AdamW(m.net.named_trainable_parameters()))
    W0, dW = base_W(m), sBA(m)
    ids = mp.backend.asarray(np.array([[1, 5, 7, 2, 9]]))
    before = m.net(ids).numpy()
    A_before = {p: d.numpy().copy() for p, d in ((t.pair.path, t.pair.A) for t in hook.targets)}
    hook.after_step(1)  # (1 + 1) mod 3 != 0: nothing happens
    assert all(np.array_equal(w, W0[p]) for p, w in base_W(m).items())  # W unchanged before step T
    hook.after_step(2)
    for t in hook.targets:
        assert_close(base_W(m)[t.pair.path], W0[t.pair.path] + dW[t.pair.path], rtol=1e-6, label=t.pair.path)
        assert not t.pair.B.numpy().any()
        bound = 1 / math.sqrt(t.pair.A.shape[1])
        A = t.pair.A.numpy()
        assert np.abs(A).max() <= bound and not np.array_equal(A, A_before[t.pair.path])
    assert_close(m.net(ids).numpy(), before, rtol=1e-5, atol=1e-5, label="logits across a restart")


@pytest.mark.spec("RELORA-2")
def test_a_restart_magnitude_prunes_the_lora_moments_keeping_the_step_count():
    m = lora_model()
    named = m.net.named_trainable_parameters()
    opt = AdamW(named)
    r = np.random.default_rng(3)
    for n, p in named.items():
        opt.m[n] = mp.backend.asarray(r.standard_normal(p.shape).astype(np.float32))
        opt.v[n] = mp.backend.asarray(r.random(p.shape).astype(np.float32))
    opt.t = 7
    before = {k: {n: a.numpy() if hasattr(a, "numpy") else np.asarray(a) for n, a in d.items()}
              for k, d in (("m", opt.m), ("v", opt.v))}
    hook = ReLoRAHook(m, ReLoRAConfig(reset_every=1, restart_warmup=0, prune_ratio=0.9))
    hook.attach(opt)
    hook.after_step(0)
    for k, d in (("m", opt.m), ("v", opt.v)):
        for n, a in before[k].items():
            thr = np.quantile(np.abs(a).astype(np.float64), 0.9)  # numpy's linear rule = torch.quantile's
            ref = np.where(np.abs(a) > thr, a, 0)
            assert_close(np.asarray(d[n]), ref, rtol=0, label=f"{k}.{n}")
            assert 0.08 <= (ref != 0).mean() <= 0.12
    assert opt.t == 7


@pytest.mark.spec("RELORA-3", "TRAIN-16")
def test_the_learning_rate_is_the_schedule_times_the_restart_warmup():
    m = lora_model()
    cfg = TrainingConfig(**{**RUN, "max_steps": 12}, warmup_steps=2, schedule="cosine",
                         hooks=[ReLoRAHook(m, ReLoRAConfig(reset_every=5, restart_warmup=2))])
    hist = m.train(DATA, cfg)
    ref = [lr_at(k, 5e-3, 2, 12, "cosine") * ((k % 5) / 2 if k >= 5 and k % 5 < 2 else 1.0) for k in range(12)]
    assert hist["lr"] == ref
    assert [k for k in range(12) if hist["lr"][k] == 0] == [0, 5, 10]  # the jags: warmup start and restarts


@pytest.mark.spec("RELORA-4")
def test_W_is_W0_plus_the_folded_deltas_and_merge_and_unload_adds_the_last():
    m = lora_model()
    W0 = base_W(m)
    spy = Spy(m, ReLoRAConfig(reset_every=3, restart_warmup=1))
    m.train(DATA, TrainingConfig(**RUN, hooks=[spy]))  # 10 steps: restarts after steps 3, 6, 9
    assert len(spy.folded) == 3
    last = sBA(m)
    W = base_W(m)
    for p in W0:
        assert_close(W[p], W0[p] + sum(f[p] for f in spy.folded), rtol=1e-5, atol=1e-6, label=p)
    p = next(iter(W0))  # three rank-4 pieces: W - W0 has rank 12 where min(out, in) allows (the paper's point)
    assert np.linalg.matrix_rank(W[p] - W0[p], tol=1e-6) == min(12, *W[p].shape)
    m.merge_and_unload()
    for p, w in base_W_plain(m, W0).items():
        assert_close(w, W[p] + last[p], rtol=1e-5, atol=1e-6, label=p)


def base_W_plain(m, paths):
    return {p: np.asarray(m.net.get_submodule(p).weight.numpy(), np.float64) for p in paths}


@pytest.mark.spec("RELORA-5", "TRAIN-13", "TRAIN-16")
def test_a_run_resumed_between_restarts_gives_the_same_losses_and_W(tmp_path):
    make = lambda m: ReLoRAHook(m, ReLoRAConfig(reset_every=3, restart_warmup=1))  # noqa: E731
    resumed_equals_full(make, tmp_path, "ReLoRA")  # checkpoint after step 4: one restart behind


@pytest.mark.spec("RELORA-5")
def test_save_adapters_after_relora_warns_that_W_changed(tmp_path):
    m = lora_model()
    m.train(DATA, TrainingConfig(**{**RUN, "max_steps": 4},
                                 hooks=[ReLoRAHook(m, ReLoRAConfig(reset_every=2, restart_warmup=0))]))
    with pytest.warns(UserWarning, match=r"merge_and_unload\(\)\.save"):
        m.save_adapters(str(tmp_path / "ad"))
    m.merge_and_unload().save(str(tmp_path / "full"))
    assert (tmp_path / "full" / "config.json").exists()


@pytest.mark.spec("RELORA-6")
@pytest.mark.parametrize("kw, field", [
    (dict(reset_every=0), "reset_every"), (dict(reset_every=2.5), "reset_every"), (dict(reset_every=True), "reset_every"),
    (dict(reset_every=10, prune_ratio=1.5), "prune_ratio"), (dict(reset_every=10, prune_ratio=-0.1), "prune_ratio"),
    (dict(reset_every=10, restart_warmup=-1), "restart_warmup"), (dict(reset_every=10, restart_warmup=10), "restart_warmup"),
    (dict(reset_every=100, seed=-1), "seed")])
def test_bad_options_are_config_errors(kw, field):
    with pytest.raises(ConfigError, match=f"ReLoRAConfig.{field}"):
        ReLoRAConfig(**kw)


@pytest.mark.spec("RELORA-6")
def test_models_relora_cannot_fold_into_are_refused_before_any_step():
    ok = ReLoRAConfig(reset_every=2, restart_warmup=1)
    q = quantized_llama()
    q.apply_lora(mp.LoRAConfig(rank=4, target_modules="all-linear"))  # LoRA over a 4-bit base: QLoRA
    with pytest.raises(ConfigError, match="4-bit"):
        ReLoRAHook(q, ok)
    d = tiny_llama()
    d.apply_dora(mp.DoRAConfig(rank=4, target_modules="all-linear"))
    with pytest.raises(ConfigError, match="DoRALinear"):
        ReLoRAHook(d, ok)
    with pytest.raises(ConfigError, match="apply_lora first"):
        ReLoRAHook(tiny_llama(), ok)
    assert "relora" in [m.name for m in mp.procedures.procedures()]
