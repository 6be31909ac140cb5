"""LoRA-drop (spec/lora_drop.md LORA_DROP-1..7): the sample, the importance rebuilt in NumPy from the layers' own
inputs, the selection as a property, the shared LoRA (one tensor, a new start, the summed gradient), an exact
resume before and after the selection, the saved folder in PEFT, the CLI, refusals before any step."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minipeft as mp
from minipeft.adapters.inject import adapted_layers
from minipeft.cli import main
from minipeft.errors import ConfigError
from minipeft.nn.module import Module
from minipeft.procedures import LoRADropConfig, LoRADropHook
from minipeft.procedures.lora_drop import select
from minipeft.train import TrainingConfig
from tests.helpers import assert_close, hf_llama_folder, max_rel_err, tiny_llama
from tests.procedure_helpers import DATA, RUN, resumed_equals_full
from tests.test_peft_oracle import LLAMA, IDS, hf_logits, hf_model, lib  # noqa: F401
from tests.test_train import lora_model, trainable

TARGETS = ("q_proj", "v_proj", "down_proj")
OPTS = dict(warmup_steps=3, threshold=0.5, sample_ratio=0.5, seed=1)


def deep_model(layers=4, **kw):
    """tiny_llama with 4 layers, LoRA rank 4 on q, v and down_proj: three or more layers of a type can share."""
    m = tiny_llama(0, num_hidden_layers=layers)
    m.apply_lora(mp.LoRAConfig(rank=4, alpha=8, target_modules=TARGETS, **kw))
    return m


def run(model, steps=8, data=DATA, **opts):
    hook = LoRADropHook(model, LoRADropConfig(**{**OPTS, **opts}), data)
    model.train(data, TrainingConfig(hooks=[hook], **{**RUN, "max_steps": steps}))
    return hook


class Spy(Module):
    """Records the base layer's input (its own recorder, not data_init's)."""

    def __init__(self, inner, seen):
        self.inner, self.seen = inner, seen

    def forward(self, x):
        self.seen.append(np.asarray(x.data, np.float64))
        return self.inner(x)


class Probe(LoRADropHook):
    """Before the hook measures: g of every layer rebuilt in NumPy from each sampled record run alone, the inputs
    caught by Spy wrappers around the base layers, at the factors the measurement sees."""

    def measure(self, batches):
        n = len(DATA)
        rows = sorted(np.random.default_rng(1).permutation(n)[:math.ceil(0.5 * n)])  # LORA_DROP-1
        layers = dict(adapted_layers(self.model.net))
        seen = {p: [] for p in layers}
        for p, layer in layers.items():
            layer.base_layer = Spy(layer.base_layer, seen[p])
        was = self.model.net.training
        self.model.net.eval()
        for i in rows:
            self.model(np.asarray([DATA[i]["input_ids"]]))
        self.model.net.train(was)
        self.g = {}
        for p, layer in layers.items():
            layer.base_layer = layer.base_layer.inner
            d = layer.adapters["default"]
            A, B = (np.asarray(w.weight.data, np.float64) for w in (d.lora_A, d.lora_B))
            x = np.concatenate([s.reshape(-1, s.shape[-1]) for s in seen[p]])  # every token of each record counts
            self.g[p] = np.mean(np.sum((x @ A.T @ B.T * d.s) ** 2, axis=1))
        assert sum(b["attention_mask"].sum() for b in batches) == sum(len(DATA[i]["input_ids"]) for i in rows)
        return super().measure(batches)


@pytest.mark.spec("LORA_DROP-1", "LORA_DROP-2")
def test_importance_is_the_mean_squared_lora_output_on_the_sample_normalised_per_type():
    m = deep_model()
    hook = Probe(m, LoRADropConfig(**OPTS), DATA)
    m.train(DATA, TrainingConfig(hooks=[hook], **{**RUN, "max_steps": 3}))
    for t in TARGETS:
        paths = [p for p in hook.g if p.endswith(t)]
        total = sum(hook.g[p] for p in paths)
        for p in paths:
            assert hook.importance[p] == pytest.approx(hook.g[p] / total, rel=1e-6), p
        assert sum(hook.importance[p] for p in paths) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.spec("LORA_DROP-3")
@settings(max_examples=60, deadline=None)
@given(g=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=9), T=st.floats(0.01, 1.0))
def test_selection_keeps_the_shortest_most_important_prefix_reaching_the_threshold(g, T):
    total = sum(g)
    imp = {f"l{i}": (v / total if total else 0.0) for i, v in enumerate(g)}
    kept, dropped = select(imp, T)
    assert sorted(kept + dropped) == sorted(imp) and not set(kept) & set(dropped)
    if not total:
        assert not dropped
        return
    assert kept and (not dropped or min(imp[p] for p in kept) >= max(imp[p] for p in dropped))
    assert sum(imp[p] for p in kept) >= T or not dropped
    least = min(kept, key=lambda p: (imp[p], -list(imp).index(p)))
    assert sum(imp[p] for p in kept if p != least) < T
    assert kept == [p for p in imp if p in kept]  # model order


@pytest.mark.spec("LORA_DROP-4")
def test_the_dropped_layers_of_a_type_share_one_new_lora_and_the_output_drops_their_part():
    m = deep_model()
    ids = np.asarray([[1, 5, 7, 2, 9, 3]])
    hook = LoRADropHook(m, LoRADropConfig(**OPTS), DATA)
    m.train(DATA, TrainingConfig(hooks=[hook], **{**RUN, "max_steps": 2}))
    layers = dict(adapted_layers(m.net))
    opt = mp.nn.optim.AdamW(m.net.named_trainable_parameters())
    opt.m = {n: np.ones_like(p.data) for n, p in opt.params.items()}
    opt.v = dict(opt.m)
    hook.attach(opt)
    hook.after_step(2)  # the selection
    assert hook.shared and all(len(v) >= 2 for v in hook.shared.values())  # at least 2 of 4 layers share
    for t, (owner, *others) in hook.shared.items():
        o = layers[owner].adapters["default"]
        assert not o.lora_B.weight.numpy().any()
        assert np.abs(o.lora_A.weight.numpy()).max() <= 1 / math.sqrt(o.lora_A.weight.shape[1])
        for p in others:
            assert layers[p].adapters["default"].lora_A is o.lora_A and layers[p].adapters["default"].lora_B is o.lora_B
        for w in (o.lora_A.weight, o.lora_B.weight):
            assert hook.names[id(w)] not in opt.m  # its moments start at zero
    for p in hook.kept:
        assert np.all(opt.m[hook.names[id(layers[p].adapters["default"].lora_A.weight)]] == 1)  # kept: untouched
    # the output: the base plus the kept layers' LoRA
    ref = tiny_llama(0, num_hidden_layers=4)
    ref.apply_lora(mp.LoRAConfig(rank=4, alpha=8, target_modules=TARGETS))
    for p, layer in adapted_layers(ref.net):
        d, mine = layer.adapters["default"], layers[p].adapters["default"]
        d.lora_A.weight.data = mine.lora_A.weight.data
        d.lora_B.weight.data = mine.lora_B.weight.data if p in hook.kept else np.zeros_like(d.lora_B.weight.data)
    assert np.array_equal(m(ids).numpy(), ref(ids).numpy())
    counted = hook.kept + [group[0] for group in hook.shared.values()]  # each kept layer, one LoRA per sharing type
    want = sum(layers[p].adapters["default"].lora_A.weight.numpy().size
               + layers[p].adapters["default"].lora_B.weight.numpy().size
               for p in counted)
    assert m.parameter_counts()[0] == want


@pytest.mark.spec("LORA_DROP-4")
def test_the_shared_lora_trains_with_the_sum_of_its_layers_gradients():
    m = deep_model()
    hook = run(m, steps=5)
    layers = dict(adapted_layers(m.net))
    ids = np.asarray([[1, 5, 7, 2, 9, 3], [4, 4, 8, 1, 0, 2]])
    for t, group in hook.shared.items():
        A = layers[group[0]].adapters["default"].lora_A
        assert not np.all(layers[group[0]].adapters["default"].lora_B.weight.numpy() == 0)  # it trained
        A.weight.grad = None
        m(ids).sum().backward()
        tied = A.weight.grad.copy()
        parts = 0
        for p in group:  # untie one layer at a time: its own copy of A takes its part of the gradient
            d = layers[p].adapters["default"]
            own = mp.nn.layers.Linear(A.weight.shape[1], A.weight.shape[0], bias=False)
            own.weight.data, own.weight.requires_grad = A.weight.data.copy(), True
            d.lora_A = own
            m(ids).sum().backward()
            parts = parts + own.weight.grad
            d.lora_A = A
        assert_close(parts, tied, rtol=1e-5, label=f"{t}: sum of the sharing layers' gradients")


@pytest.mark.spec("LORA_DROP-5", "TRAIN-13")
@pytest.mark.parametrize("ckpt_step", [2, 5])
def test_a_run_resumed_before_or_after_the_selection_gives_the_same_losses_and_factors(tmp_path, ckpt_step):
    make = lambda m: LoRADropHook(m, LoRADropConfig(**OPTS), DATA)  # noqa: E731
    full, again = resumed_equals_full(make, tmp_path, None, ckpt_step=ckpt_step, make_model=deep_model)
    a, b = trainable(full), trainable(again)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[n], b[n]) for n in a)
    la, lb = dict(adapted_layers(full.net)), dict(adapted_layers(again.net))
    for p in la:  # the same factors after the same selection
        a_B, b_B = (layers[p].adapters["default"].lora_B.weight.numpy() for layers in (la, lb))
        assert np.array_equal(a_B, b_B)


@pytest.mark.spec("LORA_DROP-6")
def test_saves_a_plain_lora_folder_that_reloads_with_the_same_logits(tmp_path):
    m = deep_model()
    hook = run(m)
    m.save_adapters(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4
    from safetensors.numpy import load_file
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    for owner, *others in hook.shared.values():
        for p in others:
            for leaf in ("lora_A", "lora_B"):
                key = lambda q: f"base_model.model.{q}.{leaf}.weight"  # noqa: E731
                assert np.array_equal(tensors[key(p)], tensors[key(owner)])
    again = tiny_llama(0, num_hidden_layers=4)
    again.load_adapters(str(tmp_path))
    assert type(again.peft_configs["default"]) is mp.LoRAConfig
    ids = np.asarray([[1, 5, 7, 2, 9, 3]])
    assert np.array_equal(again(ids).numpy(), m(ids).numpy())


@pytest.mark.oracle
@pytest.mark.spec("LORA_DROP-6")
def test_the_saved_folder_loads_in_peft_with_the_same_logits(lib, tmp_path):  # noqa: F811
    peft = lib[2]
    folder = hf_llama_folder(str(tmp_path / "base"), **{**LLAMA, "num_hidden_layers": 4})
    m = mp.load_model(folder)
    m.apply_lora(mp.LoRAConfig(rank=4, alpha=8, target_modules=TARGETS))
    data = [{"input_ids": [int(t) for t in r]} for r in np.random.default_rng(3).integers(0, 64, (16, 9))]
    hook = run(m, data=data)
    assert hook.shared
    m.save_adapters(str(tmp_path / "ours"))
    theirs = peft.PeftModel.from_pretrained(hf_model(lib, folder), str(tmp_path / "ours")).eval()
    err = max_rel_err(m(np.asarray(IDS)), hf_logits(lib, theirs))
    print(f"\n  LoRA-drop folder -> PEFT: max rel err {err:.2e}")
    assert err < 1e-5


@pytest.mark.spec("LORA_DROP-7")
@pytest.mark.parametrize("kw, match", [(dict(warmup_steps=0), "warmup_steps"), (dict(warmup_steps=-2), "warmup_steps"),
                                       (dict(warmup_steps=1.5), "warmup_steps"), (dict(threshold=0), "threshold"),
                                       (dict(threshold=1.2), "threshold"), (dict(threshold=-0.1), "threshold"),
                                       (dict(sample_ratio=0), "sample_ratio"), (dict(sample_ratio=2), "sample_ratio"),
                                       (dict(batch_size=0), "batch_size"), (dict(seed=-1), "seed"),
                                       (dict(threshold=True), "threshold")])
def test_bad_options_are_config_errors(kw, match):
    with pytest.raises(ConfigError, match=f"LoRADropConfig.{match}"):
        LoRADropConfig(**{"warmup_steps": 2, **kw})


@pytest.mark.spec("LORA_DROP-7")
def test_models_lora_drop_cannot_share_are_refused_before_any_step():
    opts = LoRADropConfig(warmup_steps=2)
    with pytest.raises(ConfigError, match="apply_lora first"):
        LoRADropHook(tiny_llama(), opts, DATA)
    d = tiny_llama()
    d.apply_dora(mp.DoRAConfig(rank=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="DoRALinear"):
        LoRADropHook(d, opts, DATA)
    with pytest.raises(ConfigError, match="lora_bias"):
        LoRADropHook(lora_model(lora_bias=True), opts, DATA)
    with pytest.raises(ConfigError, match="one rank"):
        LoRADropHook(deep_model(rank_pattern={"layers.1.self_attn.q_proj": 2}), opts, DATA)
    with pytest.raises(ConfigError, match="moment"):
        LoRADropHook(lora_model(), opts, DATA).attach(object())
    with pytest.raises(ConfigError):
        LoRADropHook(lora_model(), opts, [{"input_ids": [999]}])  # a token outside the vocabulary
    assert "lora_drop" in [p.name for p in mp.procedures.procedures()]


@pytest.mark.spec("LORA_DROP-7")
def test_trains_through_the_cli_and_bad_procedure_args_write_nothing(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"next {w} =", "completion": " " + "".join(chr(ord(c) + 1) for c in w)}
            for w in ["abc", "cat", "dog", "pen", "map", "sky"]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["train", "--model", mp.DEMO_MODEL, "--data", str(data), "--target-modules", "all-linear",
              "--max-steps", "4", "--batch-size", "2", "--procedure", "lora_drop"]
    assert main(common + ["--output", str(tmp_path / "out"), "--procedure-arg", "warmup_steps=2",
                          "--procedure-arg", "threshold=0.5", "--procedure-arg", "sample_ratio=1.0"]) == 0
    model = mp.load_model(mp.DEMO_MODEL)
    model.load_adapters(str(tmp_path / "out"))
    assert type(model.peft_configs["default"]) is mp.LoRAConfig
    for bad, match in ((["--procedure-arg", "warmup_steps=0"], "warmup_steps"),
                       (["--procedure-arg", "warmup_steps=2", "--procedure-arg", "threshold=1.5"], "threshold"),
                       (["--procedure-arg", "warmup=2"], "no option warmup")):
        assert main(common + ["--output", str(tmp_path / "bad")] + bad) != 0
        assert match in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_lora_drop_runs_on_every_backend(any_backend):
    ids = np.asarray([[1, 2, 3]])
    first = run(deep_model(), steps=4).model(ids).numpy()
    mp.backend.set_backend("numpy")
    assert_close(first, run(deep_model(), steps=4).model(ids).numpy(), rtol=1e-5, label="backends")
