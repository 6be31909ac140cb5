"""Training hooks (spec/training.md TRAIN-10..13): parameter groups, a regulariser, a step callback, the end
of training, a replaced optimizer, refusals before any work, and hook state in checkpoints for an exact resume."""
import numpy as np
import pytest

import minipeft as mp
from minipeft.errors import ConfigError, TrainingError
from minipeft.nn.optim import AdamW, lr_at
from minipeft.train import TrainingConfig
from tests.helpers import assert_close
from tests.test_train import QUIET, lora_model, token_data, trainable


class Recorder(mp.TrainingHook):
    """Records what the loop hands it; regularization adds c * step count * sum(lora_B^2) (stateful)."""

    def __init__(self, model=None, c=0.0, key="recorder"):
        self.key, self.c, self.calls, self.count, self.ended = key, c, [], 0, 0
        self.B = [p for n, p in model.net.named_parameters() if "lora_B" in n] if model else []

    def regularization(self):
        if not self.c:
            return None
        total = None
        for p in self.B:
            t = (p * p).sum()
            total = t if total is None else total + t
        return total * (self.c * self.count)

    def after_step(self, step):
        self.calls.append((step, all(p.grad is not None for p in self.B)))
        self.count += 1

    def end(self):
        self.ended += 1

    def state(self):
        return {"count": np.array([self.count])}, {"calls": len(self.calls)}

    def load_state(self, arrays, info):
        self.count = int(arrays["count"][0])
        self.loaded = info


class Groups(mp.TrainingHook):
    key = "groups"

    def __init__(self, groups):
        self.groups = groups

    def param_groups(self, named):
        return self.groups


@pytest.mark.spec("TRAIN-10")
def test_param_groups_scale_the_learning_rate_and_set_weight_decay():
    r = np.random.default_rng(3)
    W, b = (mp.Tensor(r.standard_normal(s), requires_grad=True) for s in ((3, 4), (4,)))
    opt = AdamW({"W": W, "b": b}, lr=0.01, weight_decay=0.1, groups={"W": {"lr_scale": 4.0}, "b": {"weight_decay": 0.5}})
    ref, m, v = {"W": W.numpy().copy(), "b": b.numpy().copy()}, {"W": 0.0, "b": 0.0}, {"W": 0.0, "b": 0.0}
    lr, wd = {"W": 0.04, "b": 0.01}, {"W": 0.1, "b": 0.5}  # b is 1-d, decayed because its group says so
    for t in range(1, 4):
        grads = {"W": r.standard_normal((3, 4)), "b": r.standard_normal(4)}
        W.grad, b.grad = grads["W"], grads["b"]
        opt.step()
        for k in ref:
            ref[k] = ref[k] * (1 - lr[k] * wd[k])
            m[k] = 0.9 * m[k] + 0.1 * grads[k]
            v[k] = 0.999 * v[k] + 0.001 * grads[k] ** 2
            ref[k] = ref[k] - lr[k] * (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v[k] / (1 - 0.999 ** t)) + 1e-8)
    assert_close(W, ref["W"], rtol=1e-12, label="W")
    assert_close(b, ref["b"], rtol=1e-12, label="b")


@pytest.mark.oracle
@pytest.mark.spec("TRAIN-10")
def test_param_groups_equal_torch_groups_under_a_schedule():
    torch = pytest.importorskip("torch")
    r = np.random.default_rng(4)
    w0, b0 = r.standard_normal((5, 3)), r.standard_normal(3)
    W, b = mp.Tensor(w0.copy(), requires_grad=True), mp.Tensor(b0.copy(), requires_grad=True)
    tw, tb = torch.nn.Parameter(torch.tensor(w0)), torch.nn.Parameter(torch.tensor(b0))
    opt = AdamW({"W": W, "b": b}, lr=0.003, weight_decay=0.05, groups={"W": {"lr_scale": 16.0}})
    topt = torch.optim.AdamW([{"params": [tw], "lr": 0.003 * 16.0, "weight_decay": 0.05},
                              {"params": [tb], "lr": 0.003, "weight_decay": 0.0}])
    sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda s: lr_at(s, 1.0, 2, 6, "linear"))
    for s in range(6):
        opt.lr = lr_at(s, 0.003, 2, 6, "linear")
        g, gb = r.standard_normal((5, 3)), r.standard_normal(3)
        W.grad, b.grad, tw.grad, tb.grad = g, gb, torch.tensor(g), torch.tensor(gb)
        opt.step()
        topt.step()
        sched.step()
    assert_close(W, tw.detach().numpy(), rtol=1e-12, label="W vs torch group")
    assert_close(b, tb.detach().numpy(), rtol=1e-12, label="b vs torch group")


@pytest.mark.spec("TRAIN-10")
def test_a_group_hook_in_train_moves_only_its_parameters_faster():
    data = token_data(8, seed=1)
    run = dict(learning_rate=1e-3, batch_size=4, max_steps=1, **QUIET)
    plain, scaled = lora_model(), lora_model()
    start = trainable(plain)
    plain.train(data, TrainingConfig(**run))
    names = [n for n in start if "lora_A" in n]
    scaled.train(data, TrainingConfig(hooks=(Groups({n: {"lr_scale": 3.0} for n in names}),), **run))
    a, b = trainable(plain), trainable(scaled)
    for n in start:  # one AdamW step moves each entry by lr * m/(sqrt v + eps): 3x for the scaled group
        assert_close(b[n] - start[n], (3.0 if n in names else 1.0) * (a[n] - start[n]), rtol=1e-5, label=n)
    with pytest.raises(ConfigError, match="not a trainable parameter"):
        lora_model().train(data, TrainingConfig(hooks=(Groups({"model.embed_tokens.weight": {"lr_scale": 2}}),), **run))


@pytest.mark.spec("TRAIN-11")
def test_regularization_step_callback_and_end():
    data = token_data(8, seed=2)
    run = dict(learning_rate=1e-3, batch_size=8, max_steps=3, shuffle=False, **QUIET)
    base = lora_model().train(data, TrainingConfig(**run))
    model = lora_model()
    rec = Recorder(model, c=0.5)
    rec.count = 1  # so the first step's loss already carries the term
    B = [p.numpy().copy() for p in rec.B]
    hist = model.train(data, TrainingConfig(hooks=(rec,), **run))
    term = 0.5 * sum(float((b.astype(np.float64) ** 2).sum()) for b in B)
    assert abs(hist["loss"][0] - (base["loss"][0] + term)) < 1e-5 * hist["loss"][0]
    assert rec.calls == [(0, True), (1, True), (2, True)] and rec.ended == 1
    bad = lora_model()
    rec = Recorder(bad)
    bad.net.get_submodule("model.layers.0.self_attn.q_proj").adapters["default"].lora_A.weight.data[0, 0] = np.nan
    bad.net.get_submodule("model.layers.0.self_attn.q_proj").adapters["default"].lora_B.weight.data[0, 0] = 1.0
    with pytest.raises(TrainingError):
        bad.train(data, TrainingConfig(hooks=(rec,), **run))
    assert rec.ended == 1 and rec.calls == []


class HalfLoss(mp.TrainingHook):
    """lm_loss: half the plain LM loss (a method's own loss, as CPT gives one)."""

    def __init__(self, key="half"):
        self.key = key

    def lm_loss(self, logits, labels):
        from minipeft.models.blocks import causal_lm_loss
        return causal_lm_loss(logits, labels) * 0.5


@pytest.mark.spec("TRAIN-11")
def test_a_hook_gives_the_lm_loss_and_two_are_refused():
    data = token_data(8, seed=2)
    run = dict(learning_rate=1e-3, batch_size=8, max_steps=2, shuffle=False, eval_data=data[:4], **QUIET)
    base = lora_model().train(data, TrainingConfig(**run))
    half = lora_model().train(data, TrainingConfig(hooks=(HalfLoss(),), **run))
    assert abs(half["loss"][0] - 0.5 * base["loss"][0]) < 1e-6 * base["loss"][0]
    assert half["eval_loss"][-1][1] < 0.6 * base["eval_loss"][-1][1]  # evaluation uses it too
    model = lora_model()
    before = trainable(model)
    with pytest.raises(ConfigError, match=r"\['a', 'b'\] each give the LM loss"):
        model.train(data, TrainingConfig(hooks=(HalfLoss("a"), HalfLoss("b")), **run))
    assert all(np.array_equal(v, before[k]) for k, v in trainable(model).items())


class SGD:
    """A replacement optimizer with AdamW's interface: p <- p - lr g."""

    def __init__(self, named):
        self.named, self.lr, self.t = named, 0.0, 0

    def step(self):
        self.t += 1
        for p in self.named.values():
            p.data = p.data - self.lr * p.grad

    def zero_grad(self):
        for p in self.named.values():
            p.grad = None

    def state_dict(self):
        return {}

    def load_state_dict(self, arrays, t):
        self.t = t


class UseSGD(mp.TrainingHook):
    def __init__(self, key="sgd"):
        self.key, self.made = key, None

    def optimizer(self, named, groups, cfg):
        self.made = SGD(named)
        return self.made


@pytest.mark.spec("TRAIN-12")
def test_a_hook_replaces_the_optimizer_and_bad_hook_sets_are_refused():
    data = token_data(8, seed=3)
    run = dict(learning_rate=0.05, batch_size=8, max_steps=1, max_grad_norm=None, shuffle=False, **QUIET)
    model, probe = lora_model(), lora_model()
    start = trainable(model)
    hook = UseSGD()
    model.train(data, TrainingConfig(hooks=(hook,), **run))
    assert hook.made.t == 1
    # the same step by hand: the gradient of the first batch, then p - lr g (lr_at(0) of the linear schedule)
    from minipeft.data import collate, prepare
    from minipeft.train import _loss
    ex = prepare(data, None, probe.config.eos_token_id, probe.config.vocab_size, 64)
    ids, mask, labels = collate(ex, 0)
    probe.net.train()
    _loss(probe, ids, mask, labels).backward()
    lr = lr_at(0, 0.05, 0, 1)
    for n, p in probe.net.named_parameters():
        if p.requires_grad:
            assert_close(trainable(model)[n], start[n] - lr * p.grad, rtol=1e-6, label=n)
    for hooks, message in [((UseSGD("a"), UseSGD("b")), "each replace the optimizer"),
                           ((Recorder(key="x"), Recorder(key="x")), "share the key"),
                           ((object(),), "is not a minipeft.hooks.TrainingHook")]:
        fresh = lora_model()
        before = trainable(fresh)
        with pytest.raises(ConfigError, match=message):
            fresh.train(data, TrainingConfig(hooks=hooks, **run))
        assert all(np.array_equal(v, before[n]) for n, v in trainable(fresh).items())


@pytest.mark.spec("TRAIN-13")
def test_hook_state_is_checkpointed_and_resume_is_exact(tmp_path):
    data = token_data(24, seed=5)
    run = dict(learning_rate=5e-3, batch_size=4, epochs=2, **QUIET)
    model = lora_model()
    full = model.train(data, TrainingConfig(output_dir=str(tmp_path), save_steps=4,
                                            hooks=(Recorder(model, c=1e-2),), **run))
    again = lora_model()
    rec = Recorder(again, c=1e-2)
    resumed = again.train(data, TrainingConfig(resume_from=str(tmp_path / "checkpoint-8"), hooks=(rec,), **run))
    assert rec.loaded == {"calls": 8} and rec.count == 12
    assert resumed["loss"] == full["loss"]  # bit for bit: the hook's count came back with the checkpoint
    lost = lora_model()
    forgetful = Recorder(lost, c=1e-2)
    forgetful.load_state = lambda arrays, info: None
    other = lost.train(data, TrainingConfig(resume_from=str(tmp_path / "checkpoint-8"), hooks=(forgetful,), **run))
    assert other["loss"][:8] == full["loss"][:8] and other["loss"][8:] != full["loss"][8:]


class Halver(mp.TrainingHook):
    """lr_scale 0.5 on odd steps; records the optimizer attach gives it and when (its moments then)."""
    key = "halver"

    def __init__(self):
        self.attached = []

    def attach(self, opt):
        self.attached.append((opt, opt.t, dict(opt.m)))

    def lr_scale(self, step):
        return 0.5 if step % 2 else 1.0


@pytest.mark.spec("TRAIN-16")
def test_attach_gets_the_optimizer_once_before_the_resume_and_lr_scale_multiplies_the_schedule(tmp_path):
    data = token_data(8, seed=2)
    cfg = dict(learning_rate=1e-2, batch_size=2, max_steps=4, warmup_steps=1, schedule="cosine", **QUIET)
    h = Halver()
    hist = lora_model().train(data, TrainingConfig(hooks=[h], output_dir=str(tmp_path), save_steps=2, **cfg))
    assert hist["lr"] == [lr_at(k, 1e-2, 1, 4, "cosine") * (0.5 if k % 2 else 1.0) for k in range(4)]
    assert len(h.attached) == 1 and isinstance(h.attached[0][0], AdamW)
    again = Halver()
    lora_model().train(data, TrainingConfig(hooks=[again], resume_from=str(tmp_path), **cfg))
    assert len(again.attached) == 1 and again.attached[0][1:] == (0, {})  # before load_state_dict
