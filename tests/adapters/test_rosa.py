"""spec/rosa.md (ROSA-n) on tiny random Llama models (test_lora.py's set-up), one random Linear or GPT-2 Conv1D,
and model.train runs. Each claim is rebuilt in NumPy float64 from the spec: dW = s B A + S with S[i_j, c_j] = v_j;
the mask as the k largest |F| of the base weights' own gradients, read from W0.grad in a run where W0 takes a
gradient but a learning rate of 0 (so the run is the plain RoSA run)."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_close, tiny_llama
from one_layer import check_on_the_backend, check_train_moves_every_leaf, random_base
from minipeft import backend
import minipeft as mp
from minipeft.adapters.base import AdaptedLayer
from minipeft.adapters.rosa import RoSAConfig, RoSALinear, spa_size, top_k_mask
from minipeft.autograd import Tensor
from minipeft.errors import CheckpointError, ConfigError
from minipeft.hooks import TrainingHook
from minipeft.safetensors_io import read_safetensors, write_safetensors
from minipeft.train import TrainingConfig
from test_dora import SETTINGS, targets
from test_lora import IDS, SHAPES, check_forward_merge_unmerge, layers, make_model, snapshot
from test_train import token_data

DATA = token_data(24, seed=5, vocab=64)
RUN = dict(learning_rate=1e-2, batch_size=2, progress=False)


def choose_random(model, name="default", seed=2):
    """A random mask of k distinct row-major positions and random A, B, v on every layer of adapter `name`."""
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, name):
        d = layer.adapters[name]
        m, n = d.shape
        k = d.rosa_spa_values.shape[0]
        p = np.sort(rng.choice(m * n, k, replace=False))
        d.choose(backend.asarray(np.stack([p // n, p % n]), "int32"))
        for t in (d.lora_A.weight, d.lora_B.weight, d.rosa_spa_values):
            t.data = (rng.standard_normal(t.shape) * 0.3).astype(np.float32)


def delta_np(d):
    """ROSA-1 in float64: s B A, plus v_j at (i_j, c_j) once the mask is chosen."""
    A, B, v = (backend.to_host(t.data).astype(np.float64)
               for t in (d.lora_A.weight, d.lora_B.weight, d.rosa_spa_values))
    dW = d.s * B @ A
    i = backend.to_host(d.indices[0].data).astype(np.int64)
    if i.min() >= 0:
        dW[i[0], i[1]] += v
    return dW


densities = st.sampled_from([0.003, 0.02, 0.1, 0.5])


@pytest.mark.spec("ROSA-3", "ROSA-6")
@SETTINGS
@given(r=st.integers(1, 6), d=densities, tm=targets, rslora=st.booleans())
def test_init_is_the_base_with_no_mask_and_the_count(r, d, tm, rslora):
    model = make_model()
    before = model(IDS).data
    cfg = RoSAConfig(rank=r, alpha=4, density=d, use_rslora=rslora, target_modules=tuple(tm))
    model.apply_adapter(cfg)
    assert np.array_equal(model(IDS).data, before)
    for path, layer in layers(model, "default"):
        delta = layer.adapters["default"]
        m, n = SHAPES[path.split(".", 3)[3]]
        A = np.asarray(delta.lora_A.weight.data)
        assert A.shape == (r, n) and np.abs(A).max() <= 1 / np.sqrt(n) and A.std() > 0
        assert not np.asarray(delta.lora_B.weight.data).any() and not np.asarray(delta.rosa_spa_values.data).any()
        assert delta.rosa_spa_values.shape == (int(d * m * n),)
        assert np.all(np.asarray(delta.indices[0].data) == -1) and not delta.chosen
        assert delta.s == pytest.approx(4 / np.sqrt(r) if rslora else 4 / r)
    want = sum(r * (m + n) + int(d * m * n) for p, _ in layers(model, "default")
               for m, n in [SHAPES[p.split(".", 3)[3]]])
    assert model.parameter_counts()[0] == want == cfg.trainable_count(
        {p: (lay.base_layer.in_features, lay.base_layer.out_features) for p, lay in layers(model, "default")}, None)


@pytest.mark.spec("ROSA-1", "ROSA-2", "ROSA-7")
@SETTINGS
@given(r=st.integers(1, 6), d=densities, alpha=st.sampled_from([1, 8, 16]), tm=targets, seed=st.integers(0, 99))
def test_forward_and_merge_are_W0_plus_s_B_A_plus_S(r, d, alpha, tm, seed):
    model = make_model()
    W = snapshot(model)
    model.apply_adapter(RoSAConfig(rank=r, alpha=alpha, density=d, target_modules=tuple(tm)))
    before_mask = {p + ".weight": delta_np(lay.adapters["default"]) for p, lay in layers(model, "default")}
    for _, lay in layers(model, "default"):  # no mask: v takes no part (ROSA-1)
        lay.adapters["default"].rosa_spa_values.data += 1.0
    check_forward_merge_unmerge(model, W, before_mask)
    choose_random(model, seed=seed)
    check_forward_merge_unmerge(model, W, {p + ".weight": delta_np(lay.adapters["default"])
                                           for p, lay in layers(model, "default")})


@pytest.mark.spec("ROSA-2")
@SETTINGS
@given(p=st.sampled_from([0.1, 0.5, 0.9]), r=st.integers(1, 4))
def test_dropout_acts_on_lora_s_input_only(p, r):
    model = make_model()
    model.apply_adapter(RoSAConfig(rank=r, dropout=p, density=0.1, target_modules=("up_proj",)))
    choose_random(model)
    layer = model.net.get_submodule("model.layers.0.mlp.up_proj")
    layer.train()
    d = layer.adapters["default"]
    x = np.random.default_rng(3).standard_normal((5, 32)).astype(np.float32)
    mask = np.asarray(backend.RNG(0).keep_mask((5, 32), p))
    d.rng = backend.RNG(0)
    W0, b = (np.asarray(t.data, np.float64) for t in (layer.base_layer.weight, layer.base_layer.bias))
    A, B = (np.asarray(t.data, np.float64) for t in (d.lora_A.weight, d.lora_B.weight))
    S = delta_np(d) - d.s * B @ A
    assert_close(layer(Tensor(x)), x @ W0.T + b + (x * mask) @ (d.s * B @ A).T + x @ S.T, 1e-5, label="dropout")


@pytest.mark.spec("ROSA-1", "ROSA-7")
@SETTINGS
@given(n_in=st.integers(2, 12), n_out=st.integers(2, 12), seed=st.integers(0, 99))
def test_gpt2_conv1d_keeps_S_out_in_and_merges_in_its_layout(n_in, n_out, seed):
    rng = np.random.default_rng(seed)
    base, W0 = random_base(True, rng, n_in, n_out)
    layer = AdaptedLayer(base)
    layer.adapters["default"] = d = RoSALinear.create(base, RoSAConfig(rank=1, density=0.3), "c", backend.RNG(0))
    layer.active = ["default"]
    k = d.rosa_spa_values.shape[0]
    p = np.sort(rng.choice(n_in * n_out, k, replace=False))
    d.choose(np.stack([p // n_in, p % n_in]).astype(np.int32))
    for t in (d.lora_B.weight, d.rosa_spa_values):
        t.data = rng.standard_normal(t.shape).astype(np.float32)
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    want = x @ (W0 + delta_np(d)).T + np.asarray(base.bias.data)
    assert_close(layer(Tensor(x)), want, 1e-5, label="Conv1D forward")
    layer.merge("default")
    assert_close(base.weight.data, (W0 + delta_np(d)).T, 1e-5, label="merged (in, out)")
    assert_close(layer(Tensor(x)), want, 1e-5, label="merged forward")
    layer.unmerge("default")
    assert_close(base.weight.data, W0.T, 1e-6, label="unmerged")


@pytest.mark.spec("ROSA-5")
def test_top_k_takes_the_largest_magnitudes_ties_to_the_smaller_index_row_major():
    F = np.array([[1.0, -3.0, 3.0], [0.0, 3.0, 2.0]], np.float32)  # |F|: 3 at flat 1, 2, 4; then 2 at 5
    assert np.array_equal(top_k_mask(F, 2), [[0, 0], [1, 2]])
    assert np.array_equal(top_k_mask(F, 3), [[0, 0, 1], [1, 2, 1]])
    assert np.array_equal(top_k_mask(F, 4), [[0, 0, 1, 1], [1, 2, 1, 2]])
    assert top_k_mask(F, 4).dtype == np.int32


class Watch(TrainingHook):
    """Runs after the RoSA hook: W0 of the targeted layers takes a gradient at learning rate 0 (so nothing else
    changes), the recorded steps' W0.grad are kept, and the state of S is checked around the selection."""
    key = "watch"

    def __init__(self, model, cfg):
        self.model, self.cfg, self.G, self.opt, self.checked = model, cfg, [], None, 0
        self.layers = layers(model, "default")
        self.W0 = {f"{p}.base_layer.weight": lay.base_layer.weight for p, lay in self.layers}
        for t in self.W0.values():
            t.requires_grad = True

    def param_groups(self, named):
        return {n: {"lr_scale": 0.0, "weight_decay": 0.0} for n in self.W0}

    def attach(self, opt):
        self.opt = opt

    def after_step(self, step):
        w, m = self.cfg.warmup, self.cfg.mask_batches
        deltas = [lay.adapters["default"] for _, lay in self.layers]
        if w <= step < w + m:
            self.G.append([np.asarray(self.W0[f"{p}.base_layer.weight"].grad, np.float64) for p, _ in self.layers])
        names = {id(t): n for n, t in self.model.net.named_parameters()}
        if step < w + m - 1:  # ROSA-4: no mask, v untouched and without moments
            assert not any(d.chosen or np.asarray(d.rosa_spa_values.data).any() for d in deltas)
            assert not any(names[id(d.rosa_spa_values)] in self.opt.m for d in deltas)
            self.checked += 1
        elif step == w + m - 1:  # ROSA-5: just chosen, v = 0: the output is what it was without S
            assert all(d.chosen and not np.asarray(d.rosa_spa_values.data).any() for d in deltas)
            with_S = self.model(IDS).numpy()
            for d in deltas:
                d.chosen = False
            assert np.array_equal(self.model(IDS).numpy(), with_S)
            for d in deltas:
                d.chosen = True
            self.checked += 1
        else:  # v trains
            assert all(d.chosen and np.asarray(d.rosa_spa_values.data).any() for d in deltas)
            self.checked += 1


@pytest.mark.spec("ROSA-4", "ROSA-5")
@SETTINGS
@given(w=st.integers(0, 2), m=st.integers(1, 3), mode=st.sampled_from(["mean_squared", "mean"]),
       d=st.sampled_from([0.01, 0.05, 0.3]), accum=st.sampled_from([1, 2]))
def test_the_mask_is_the_top_k_of_the_recorded_base_gradients(w, m, mode, d, accum):
    """G_t is the step's gradient: with gradient accumulation, the sum over its micro-batches, weighted as the loss."""
    model = make_model()
    cfg = RoSAConfig(rank=2, density=d, warmup=w, mask_batches=m, grad_acc_mode=mode,
                     target_modules=("q_proj", "v_proj", "down_proj"))
    model.apply_adapter(cfg)
    A0 = {p: np.array(lay.adapters["default"].lora_A.weight.data) for p, lay in layers(model, "default")}
    watch = Watch(model, cfg)
    run = {**RUN, "batch_size": 2 // accum, "gradient_accumulation_steps": accum}
    model.train(DATA, TrainingConfig(hooks=[watch], max_steps=w + m + 1, max_grad_norm=None, **run))
    assert watch.checked == w + m + 1 and len(watch.G) == m
    for j, (p, lay) in enumerate(layers(model, "default")):
        delta = lay.adapters["default"]
        assert not np.array_equal(delta.lora_A.weight.data, A0[p])  # LoRA trained all along
        G = np.stack([g[j] for g in watch.G])
        F = np.abs(np.mean(G * G if mode == "mean_squared" else G, axis=0)).ravel()  # (out * in,)
        idx = np.asarray(delta.indices[0].data)
        flat = idx[0].astype(np.int64) * delta.shape[1] + idx[1]
        k = spa_size(d, delta.shape[1], delta.shape[0])
        assert idx.dtype == np.int32 and flat.shape == (k,) and np.all(np.diff(flat) > 0)  # k distinct, row-major
        thr = np.sort(F)[::-1][k - 1]  # the k-th largest |F|
        rest = np.setdiff1d(np.arange(F.size), flat)
        assert F[flat].min() >= thr * (1 - 1e-5) and (rest.size == 0 or F[rest].max() <= thr * (1 + 1e-5)), p


@pytest.mark.spec("ROSA-6")
def test_the_gradient_of_v_is_the_base_gradient_at_the_mask_and_finite_differences_agree():
    from test_every_method import IDS as IDS48, directional_gradients
    model = tiny_llama(0)
    model.apply_rosa(rank=2, density=0.05, target_modules=("q_proj", "v_proj", "up_proj"))
    choose_random(model)
    for _, lay in layers(model, "default"):
        lay.base_layer.weight.requires_grad = True
    C = np.random.default_rng(4).standard_normal(model(IDS48).shape).astype(np.float32)
    (model(IDS48) * Tensor(C)).sum().backward()
    for _, lay in layers(model, "default"):
        d = lay.adapters["default"]
        i = np.asarray(d.indices[0].data)
        assert_close(d.rosa_spa_values.grad, np.asarray(lay.base_layer.weight.grad)[i[0], i[1]], 1e-5, label="dL/dv")
        lay.base_layer.weight.requires_grad, lay.base_layer.weight.grad = False, None
    for _, t in model.net.named_parameters():
        t.grad = None
    for analytic, numeric in directional_gradients(model):
        assert abs(analytic - numeric) <= 1e-6 + 1e-5 * abs(numeric), (analytic, numeric)


@pytest.mark.spec("ROSA-8", "ROSA-4")
def test_save_load_keys_dtypes_and_a_loaded_mask_is_kept(tmp_path):
    model = make_model()
    model.apply_rosa(rank=2, density=0.05, target_modules=("q_proj",), warmup=3)
    model.save_adapters(str(tmp_path / "before"))
    again = make_model()
    again.load_adapters(str(tmp_path / "before"))
    assert not any(lay.adapters["default"].chosen for _, lay in layers(again, "default"))
    choose_random(model)
    model.save_adapters(str(tmp_path / "after"))
    saved, _ = read_safetensors(str(tmp_path / "after" / "adapter_model.safetensors"))
    k = int(0.05 * 32 * 32)
    want = {f"base_model.model.model.layers.{i}.self_attn.q_proj.{leaf}": (shape, dtype) for i in range(2)
            for leaf, shape, dtype in (("lora_A.weight", (2, 32), np.float32), ("lora_B.weight", (32, 2), np.float32),
                                       ("rosa_spa_values", (k,), np.float32), ("rosa_spa_indices", (2, k), np.int32))}
    assert {key: (a.shape, a.dtype) for key, a in saved.items()} == want
    config = json.loads((tmp_path / "after" / "adapter_config.json").read_text())
    assert config["peft_type"] == "MINIPEFT_ROSA"
    assert {key: config[key] for key in ("r", "lora_alpha", "d", "lora_warmup", "spa_num_grads", "grad_acc_mode")} == \
        {"r": 2, "lora_alpha": 8, "d": 0.05, "lora_warmup": 3, "spa_num_grads": 1, "grad_acc_mode": "mean_squared"}
    again = make_model()
    again.load_adapters(str(tmp_path / "after"))
    assert np.array_equal(again(IDS).numpy(), model(IDS).numpy())
    masks = [np.array(lay.adapters["default"].indices[0].data) for _, lay in layers(again, "default")]
    v0 = [np.array(lay.adapters["default"].rosa_spa_values.data) for _, lay in layers(again, "default")]
    again.train(DATA, TrainingConfig(max_steps=2, **RUN))  # warmup=3, but the file's mask stays and v trains at once
    for (_, lay), mask, v in zip(layers(again, "default"), masks, v0):
        assert np.array_equal(lay.adapters["default"].indices[0].data, mask)
        assert not np.array_equal(lay.adapters["default"].rosa_spa_values.data, v)


@pytest.mark.oracle
@pytest.mark.spec("ROSA-8")
def test_peft_refuses_the_folder_naming_its_type(tmp_path):
    peft = pytest.importorskip("peft")
    model = make_model()
    model.apply_rosa(density=0.05)
    model.save_adapters(str(tmp_path))
    with pytest.raises(KeyError, match="MINIPEFT_ROSA"):
        peft.PeftConfig.from_pretrained(str(tmp_path))
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                                num_hidden_layers=2, num_attention_heads=4,
                                                                num_key_value_heads=2))
    with pytest.raises(KeyError, match="MINIPEFT_ROSA"):
        peft.PeftModel.from_pretrained(hf, str(tmp_path))


def rosa_model(**fields):
    model = make_model()
    model.apply_rosa(rank=2, density=0.05, target_modules=("q_proj", "v_proj"), **fields)
    return model


@pytest.mark.spec("ROSA-9")
@pytest.mark.parametrize("ckpt", [1, 3, 5])  # before the recording steps 2, 3; between them; after the selection
def test_resume_before_during_and_after_the_selection_is_exact(ckpt, tmp_path):
    cfg = dict(warmup=2, mask_batches=2, dropout=0.1)
    full_model = rosa_model(**cfg)
    full = full_model.train(DATA, TrainingConfig(max_steps=7, output_dir=str(tmp_path / "a"), save_steps=ckpt, **RUN))
    again = rosa_model(**cfg)
    resumed = again.train(DATA, TrainingConfig(max_steps=7, resume_from=str(tmp_path / "a" / f"checkpoint-{ckpt}"),
                                               **RUN))
    assert len(full["loss"]) == 7 and resumed["loss"] == full["loss"]  # bit for bit
    ours, theirs = dict(full_model.net.named_parameters()), dict(again.net.named_parameters())
    assert all(np.array_equal(ours[n].data, theirs[n].data) for n in ours)
    for (_, a), (_, b) in zip(layers(full_model, "default"), layers(again, "default")):
        assert a.adapters["default"].chosen and np.array_equal(a.adapters["default"].indices[0].data,
                                                               b.adapters["default"].indices[0].data)
        assert not b.adapters["default"].probe


@pytest.mark.spec("ROSA-10")
@pytest.mark.parametrize("field,value", [("density", 0.0), ("density", 1.0), ("density", -0.1), ("density", 1.5),
                                         ("warmup", -1), ("warmup", 1.5), ("mask_batches", 0), ("rank", 0),
                                         ("alpha", 0), ("dropout", 1.0), ("grad_acc_mode", "sum")])
def test_bad_fields_are_config_errors_before_training(field, value):
    with pytest.raises(ConfigError, match=field):
        RoSAConfig(**{field: value})
    with pytest.raises(ConfigError, match=field):  # the CLI's and TrainingConfig's way in: apply_rosa(**fields)
        make_model().apply_rosa(**{field: value})


@pytest.mark.spec("ROSA-10")
def test_a_density_giving_no_entry_and_a_rank_too_large_are_named_at_apply():
    with pytest.raises(ConfigError, match=r"density \(for model.layers.0.self_attn.v_proj\)"):
        make_model().apply_rosa(density=0.001, target_modules=("v_proj",))  # 0.001 * 16 * 32 < 1
    with pytest.raises(ConfigError, match=r"rank \(for .*v_proj\)"):
        make_model().apply_rosa(rank=17, target_modules=("v_proj",))


@pytest.mark.spec("ROSA-10")
@pytest.mark.parametrize("edit,match", [(lambda i: i + 40, "fall outside"),
                                        (lambda i: np.where(np.arange(i.shape[1]) == 0, -1, i), "fall outside"),
                                        (lambda i: np.concatenate([i[:, :1], i[:, :-1]], axis=1), "twice"),
                                        (lambda i: i.astype(np.float32), "integer")])
def test_a_file_s_bad_positions_are_checkpoint_errors(edit, match, tmp_path):
    model = rosa_model()
    choose_random(model)
    model.save_adapters(str(tmp_path))
    file = str(tmp_path / "adapter_model.safetensors")
    tensors, _ = read_safetensors(file)
    key = "base_model.model.model.layers.0.self_attn.q_proj.rosa_spa_indices"
    tensors[key] = edit(tensors[key])
    write_safetensors(file, tensors)
    with pytest.raises(CheckpointError, match=match):
        make_model().load_adapters(str(tmp_path))


@pytest.mark.spec("ROSA-4")
def test_training_moves_every_leaf():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_rosa(warmup=0, density=0.01)
    check_train_moves_every_leaf(model)


@pytest.mark.spec("ROSA-1", "ROSA-2", "ROSA-6")
def test_array_api_only(any_backend):
    def create(base):
        d = RoSALinear.create(base, RoSAConfig(rank=2, density=0.2), "q", backend.RNG(0))
        d.choose(backend.asarray(np.stack([np.arange(48) // 12, np.arange(48) % 12]), "int32"))
        d.rosa_spa_values.data = backend.asarray(np.linspace(-1, 1, 48), "float32")
        d.lora_B.weight.data = backend.asarray(np.ones((20, 2)) * 0.1, "float32")
        return d
    check_on_the_backend(create, delta_np, "rosa_spa_values")


@pytest.mark.spec("ROSA-7", "ROSA-4")
def test_qrosa_trains_over_a_4bit_base_and_merge_and_unload_dequantizes(tmp_path):
    quant = mp.QuantizationConfig(compute_dtype="float32")
    model = mp.load_model(mp.DEMO_MODEL, quantization=quant)
    model.apply_rosa(warmup=1, density=0.05)
    model.train([{"input_ids": [3, 4, 5, 6, 7, 8, 9]}, {"input_ids": [10, 11, 12, 13, 14]}] * 2,
                TrainingConfig(max_steps=3, **RUN))
    deltas = [lay.adapters["default"] for _, lay in layers(model, "default")]
    assert all(d.chosen and np.asarray(d.rosa_spa_values.data).any() for d in deltas)
    ids = np.array([[3, 4, 5, 6, 7, 8]])
    out = model(ids).numpy()
    with pytest.raises(ConfigError, match="4-bit"):
        model.merge_adapter()
    assert_close(model.merge_and_unload()(ids), out, 1e-5, label="merge_and_unload over 4 bits")


@pytest.mark.spec("ROSA-7", "ROSA-8")
def test_the_audits_read_a_chosen_mask_from_the_file(tmp_path):
    from minipeft.audit import audit_adapter, audit_merged
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_rosa(density=0.05)
    choose_random(model)
    dW = {p: delta_np(lay.adapters["default"]) for p, lay in layers(model, "default")}
    model.save_adapters(str(tmp_path / "adapter"))
    model.merge_and_unload().save(str(tmp_path / "merged"))
    report = audit_adapter(str(tmp_path / "adapter"), mp.DEMO_MODEL, show_progress=False)
    assert report.status == 0 and report.findings == [], [f.line() for f in report.findings]
    assert {row.path: row.spectrum.fro for row in report.layers} == pytest.approx(
        {p: np.linalg.norm(d) for p, d in dW.items()}, rel=1e-5)
    merged = audit_merged(mp.DEMO_MODEL, str(tmp_path / "adapter"), str(tmp_path / "merged"), show_progress=False)
    assert merged.status == 0 and merged.findings == [], [f.line() for f in merged.findings]


@pytest.mark.spec("ROSA-4")
def test_a_run_ending_in_the_warmup_leaves_no_mask_and_the_next_run_warms_up_again():
    model = rosa_model(warmup=2)
    model.train(DATA, TrainingConfig(max_steps=2, **RUN))  # steps 0, 1: the warmup only
    deltas = [lay.adapters["default"] for _, lay in layers(model, "default")]
    assert not any(d.chosen or d.probe for d in deltas)
    model.train(DATA, TrainingConfig(max_steps=2, **RUN))  # again steps 0, 1 of a new run
    assert not any(d.chosen for d in deltas)
    model.train(DATA, TrainingConfig(max_steps=3, **RUN))  # step 2 records, then the mask
    assert all(d.chosen and not d.probe and not np.asarray(d.rosa_spa_values.data).any() for d in deltas)
    first = [np.array(d.indices[0].data) for d in deltas]
    model.train(DATA, TrainingConfig(max_steps=3, **RUN))  # a chosen mask stays
    assert all(np.array_equal(d.indices[0].data, i) for d, i in zip(deltas, first))


@pytest.mark.spec("ROSA-11")
def test_restart_gives_a_fresh_lora_and_zero_S_on_the_kept_mask_then_trains_all_from_step_0():
    from minipeft.adapters.rosa import restart
    model = rosa_model(warmup=2, mask_batches=1)
    with pytest.raises(ConfigError, match="no mask yet"):
        restart(model)
    base = make_model()(IDS).numpy()
    model.train(DATA, TrainingConfig(max_steps=3, **RUN))  # run 1: the warmup, then the mask after step 2
    deltas = [lay.adapters["default"] for _, lay in layers(model, "default")]
    masks = [np.array(d.indices[0].data) for d in deltas]
    trained_A = [np.array(d.lora_A.weight.data) for d in deltas]
    restart(model, seed=3)
    assert np.array_equal(model(IDS).numpy(), base)  # B = 0, v = 0: the base model
    rng = backend.RNG(3)
    for d, A, mask in zip(deltas, trained_A, masks):
        r, n = d.lora_A.weight.shape
        assert np.array_equal(d.lora_A.weight.data, rng.uniform((r, n), -1 / np.sqrt(n), 1 / np.sqrt(n)))
        assert not np.array_equal(d.lora_A.weight.data, A) and np.array_equal(d.indices[0].data, mask)
    model.train(DATA, TrainingConfig(max_steps=1, **RUN))  # run 2: S trains from its step 0
    assert all(np.asarray(d.rosa_spa_values.data).any() and np.asarray(d.lora_B.weight.data).any() for d in deltas)
    assert all(np.array_equal(d.indices[0].data, mask) for d, mask in zip(deltas, masks))
    with pytest.raises(ConfigError, match="not a RoSA adapter"):
        restart(model, name="other")
