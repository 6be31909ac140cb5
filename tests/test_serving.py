"""Multi-adapter serving, S-LoRA style (spec/serving.md SERVING-1..9): one paged pool of many PEFT LoRA adapters,
a batch whose rows name different adapters (each row equal to its adapter alone, and to PEFT's adapter_names),
load / LRU evict, and generation with a KV cache row per request (equal to generating each request alone)."""
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import require_backend
from minipeft import backend
from minipeft.cli import main
from minipeft.errors import CheckpointError, ConfigError
from minipeft.safetensors_io import read_safetensors, write_safetensors
from minipeft.serving import AdapterPool, PooledLinear, Request
from tests.helpers import assert_close, max_rel_err, tiny_llama
from tests.test_mixed_batch import alone, three_adapters

IDS = np.random.default_rng(2).integers(0, 48, (5, 7))
NAMES = ["a", None, "b", "c", "a"]  # a: rank 4 all-linear; b: rank 3 q/v rsLoRA; c: rank 2 k/o/down


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The three adapters of test_mixed_batch (perturbed, no modules_to_save) saved as PEFT folders, and the
    model holding them all (the reference: each adapter loaded normally)."""
    root = tmp_path_factory.mktemp("serving")
    ref = three_adapters(tiny_llama(seed=3), copies=())
    ref.net.eval()
    ref.save_adapters(str(root))
    return {n: str(root / n) for n in "abc"}, ref


def make_pool(folders, pages=256, **kw):
    pool = AdapterPool(tiny_llama(seed=3), pages=pages, **kw)
    for n in sorted(folders):
        pool.add(folders[n])
    return pool


def ref_of(name):
    return "__base__" if name is None else name


@pytest.mark.spec("SERVING-1")
def test_pool_pages_hold_rank_rows_and_add_nothing_to_the_model(folders):
    paths, ref = folders
    model = tiny_llama(seed=3)
    params = {n: id(p) for n, p in model.net.named_parameters()}
    pool = AdapterPool(model, pages=256)
    assert sorted(pool.pools) == [16, 32, 64]  # k/v out (2 heads x 8), hidden, intermediate
    assert all(p.data.shape == (257, w) for w, p in pool.pools.items())
    pool.add(paths["a"])
    # a: rank 4 on q,k,v,o,gate,up,down of 2 layers; width 32 holds A of q,k,v,o,gate,up and B of q,o,down
    used = {w: 256 - len(p.free) for w, p in pool.pools.items()}
    assert used == {32: 2 * 4 * 9, 16: 2 * 4 * 2, 64: 2 * 4 * 3}
    a_pages, b_pages, s = pool.resident["a"].layers["model.layers.1.mlp.down_proj"]
    delta = ref.net.get_submodule("model.layers.1.mlp.down_proj").adapters["a"]
    assert np.array_equal(backend.to_host(pool.pools[64].data[a_pages]), delta.lora_A.weight.numpy())
    assert np.array_equal(backend.to_host(pool.pools[32].data[b_pages]).T, delta.lora_B.weight.numpy())
    assert s == delta.s == 2.0
    assert all(not np.any(backend.to_host(p.data[p.zero])) for p in pool.pools.values())
    assert sorted(id(p) for _, p in model.net.named_parameters()) == sorted(params.values())  # no copies
    pool.close()
    assert {n: id(p) for n, p in model.net.named_parameters()} == params
    with pytest.raises(ConfigError, match="already has adapters"):
        AdapterPool(ref)


@pytest.mark.spec("SERVING-1", "SERVING-4")
def test_a_hundred_and_twenty_adapters_resident_at_once(tmp_path):
    """120 rank-1..3 adapters on q_proj/v_proj, all resident in one pool; a batch of 8 of them equals each alone."""
    model = tiny_llama(seed=3)
    n_params = len(model.net.parameters())
    rng = np.random.default_rng(7)
    make = tiny_llama(seed=3)
    for i in range(120):
        make.apply_lora(rank=1 + i % 3, alpha=2, target_modules=("q_proj", "v_proj"), name="default")
        for p in make.trainable_parameters():
            p.data = (p.data + rng.standard_normal(p.shape) * 0.2).astype(np.float32)
        make.save_adapters(str(tmp_path / f"n{i}"))
        make.delete_adapter("default")
    pool = AdapterPool(model, pages=1440, target_modules=("q_proj", "v_proj"))  # 6 r of width 32 each
    for i in range(120):
        pool.add(str(tmp_path / f"n{i}"))
    assert len(pool.resident) == 120 and len(model.net.parameters()) == n_params
    names = [f"n{i}" for i in (0, 119, 5, 64, 64, 31, 2, 100)]
    got = pool(IDS[:4].repeat(2, axis=0), names).numpy()
    for b, n in enumerate(names):
        one = tiny_llama(seed=3)
        one.load_adapters(str(tmp_path / n))
        assert_close(got[b], one(IDS[:4].repeat(2, axis=0)[b:b + 1]).numpy()[0], rtol=1e-5, label=f"row {b} ({n})")


@pytest.mark.spec("SERVING-4")
@pytest.mark.parametrize("names", [NAMES, ["c", "c", "b", None, "a"], ["b"] * 5])
def test_each_row_equals_its_adapter_alone(folders, names):
    paths, ref = folders
    got = make_pool(paths)(IDS, names).numpy()
    for b, n in enumerate(names):
        assert_close(got[b], alone(ref, ref_of(n), IDS)[b], rtol=1e-5, label=f"row {b} ({n})")


@pytest.mark.spec("SERVING-4")
@settings(max_examples=8, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=5))
def test_any_assignment_of_adapters_to_rows(folders, names):
    paths, ref = folders
    ids = IDS[:len(names)]
    got = make_pool(paths)(ids, names).numpy()
    for b, n in enumerate(names):
        assert max_rel_err(got[b], alone(ref, ref_of(n), ids)[b]) < 1e-5, (b, n)


@pytest.mark.spec("SERVING-5")
def test_base_rows_are_the_base_model_bit_for_bit(folders):
    paths, _ = folders
    pool = make_pool(paths)
    base = tiny_llama(seed=3)(IDS).numpy()
    mixed = pool(IDS, NAMES).numpy()
    assert np.array_equal(mixed[1], base[1])
    assert np.array_equal(pool(IDS, [None] * 5).numpy(), base)
    assert all(m.rows is None for _, m in pool.net.named_modules() if isinstance(m, PooledLinear))
    assert np.array_equal(pool.model(IDS).numpy(), base)  # outside a batch the model is its base


@pytest.mark.spec("SERVING-2")
def test_loads_only_plain_lora_folders_and_checks_them(folders, tmp_path):
    paths, _ = folders
    pool = make_pool({"a": paths["a"]}, pages=128)
    free = {w: list(p.free) for w, p in pool.pools.items()}
    for kw in (dict(method="dora"), dict(lora_bias=True), dict(bias="all"), dict(modules_to_save=("lm_head",)),
               dict(init="pissa"), dict(trainable_token_indices=[3, 4])):
        m = tiny_llama(seed=3)
        method = kw.pop("method", "lora")
        getattr(m, f"apply_{method}")(rank=2, target_modules=("q_proj",), **kw)
        m.save_adapters(str(tmp_path / method / str(kw)))
        with pytest.raises(ConfigError, match="load it with Model.load_adapters"):
            pool.add(str(tmp_path / method / str(kw)), name="x")
    narrow = AdapterPool(tiny_llama(seed=3), pages=64, target_modules=("q_proj", "v_proj"))
    with pytest.raises(ConfigError, match="does not serve"):
        narrow.add(paths["c"])
    bad = tmp_path / "bad"
    tiny = tiny_llama(seed=3)
    tiny.apply_lora(rank=2, target_modules=("q_proj",))
    tiny.save_adapters(str(bad))
    weights, meta = read_safetensors(str(bad / "adapter_model.safetensors"))
    weights.pop(next(k for k in weights if k.endswith("layers.0.self_attn.q_proj.lora_B.weight")))
    write_safetensors(str(bad / "adapter_model.safetensors"), weights, meta)
    with pytest.raises(CheckpointError, match="missing"):
        pool.add(str(bad))
    weights[next(k for k in weights if k.endswith("lora_A.weight"))][0, 0] = np.nan
    weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = np.zeros((32, 2), np.float32)
    write_safetensors(str(bad / "adapter_model.safetensors"), weights, meta)
    with pytest.raises(CheckpointError, match="NaN"):
        pool.add(str(bad))
    assert {w: list(p.free) for w, p in pool.pools.items()} == free and list(pool.resident) == ["a"]
    assert sorted(pool.folders) == ["a"]


@pytest.mark.spec("SERVING-3")
def test_lru_eviction_and_reload_from_the_folder(folders):
    paths, ref = folders
    # pages of width 32: a takes 72, b 18 (rank 3 on q, v), c 16 (rank 2 on k, o, down): 90 hold a and c, not all
    pool = make_pool({"a": paths["a"]}, pages=90)
    before = pool(IDS, NAMES[:1] * 5).numpy()
    pool.add(paths["c"])
    pool.add(paths["b"])  # needs 18 pages of width 32, 2 are free: a is the least recently used
    assert list(pool.resident) == ["c", "b"] and "a" in pool.folders
    pool.load("c")  # c is used: now b is the least recent
    again = pool(IDS, NAMES[:1] * 5).numpy()  # a reloaded from its folder, b evicted
    assert list(pool.resident) == ["c", "a"]
    assert np.array_equal(again, before)
    with pytest.raises(ConfigError, match="which the batch needs at once"):
        pool(IDS, ["a", "b", "c", None, None])
    assert all(m.rows is None for _, m in pool.net.named_modules() if isinstance(m, PooledLinear))
    assert pool.pinned == set()
    with pytest.raises(ConfigError, match="needs 72 pages of width 32, and the pool has 40"):
        make_pool({"a": paths["a"]}, pages=40)
    assert list(pool.resident) == ["a", "b"]  # b took c's pages, then c found none that a or b did not need
    pool.evict("a")
    assert list(pool.resident) == ["b"]
    with pytest.raises(ConfigError, match="no adapter named 'zz'"):
        pool(IDS[:1], ["zz"])


@pytest.mark.spec("SERVING-6")
def test_generation_per_request_equals_each_alone(folders):
    paths, ref = folders
    pool = make_pool(paths)
    reqs = [Request(IDS[0, :3], "a", 5), Request(IDS[1], None, 9), Request(IDS[2, :5], "b", 2),
            Request(IDS[3, :1], "c", 7), Request(IDS[4, :4], "a", 0), Request(IDS[0, :6], "c", 4)]
    for eos in (-1, None):  # no stop, or the model's end-of-sequence token (2)
        got = pool.generate(reqs, eos_token_id=eos)
        for i, r in enumerate(reqs):
            want = alone_tokens(ref, r, eos)
            assert np.array_equal(got[i], want), (eos, i, got[i], want)
    with pytest.raises(ConfigError, match="exceed the 64 positions"):
        pool.generate([Request(IDS[0], "a", 60)])
    with pytest.raises(ConfigError, match="request 1"):
        pool.generate([Request(IDS[0], "a", 2), Request([], "a", 2)])


def alone_tokens(ref, r, eos):
    """Request r generated alone by the model holding every adapter, its adapter active (or disabled: the base)."""
    kw = {} if eos is None else {"eos_token_id": eos}
    if r.adapter is None:
        with ref.disable_adapters():
            return ref.generate(np.asarray(r.prompt)[None], max_new_tokens=r.max_new_tokens, **kw)[0]
    ref.set_active_adapter(r.adapter)
    return ref.generate(np.asarray(r.prompt)[None], max_new_tokens=r.max_new_tokens, **kw)[0]


@pytest.mark.spec("SERVING-9", "SERVING-3")
@pytest.mark.parametrize("max_batch", [1, 2, 3])
def test_waiting_requests_join_as_rows_leave(folders, max_batch):
    """Seven requests of different lengths through a pool of 90 pages, which holds a and b, or b and c, but not a, b
    and c: with at most two rows at once it evicts and reloads adapters between joins."""
    paths, ref = folders
    pool = make_pool({"a": paths["a"]}, pages=90)
    for n in "bc":
        pool.folders[n] = paths[n]  # known, loaded when a request needs it
    reqs = [Request(IDS[0, :3], "a", 5), Request(IDS[1], None, 2), Request(IDS[2, :5], "b", 8),
            Request(IDS[3, :1], "a", 3), Request(IDS[4, :4], "b", 1), Request(IDS[0, :6], "c", 6),
            Request(IDS[1, :2], "b", 4)]
    if max_batch == 3:  # a, b and c run at once: more pages than the pool has
        with pytest.raises(ConfigError, match="batch needs at once"):
            pool.generate(reqs, eos_token_id=-1, max_batch=max_batch)
        return
    got = pool.generate(reqs, eos_token_id=-1, max_batch=max_batch)
    for i, r in enumerate(reqs):
        assert np.array_equal(got[i], alone_tokens(ref, r, -1)), (max_batch, i)
    assert "c" in pool.resident and pool.pinned == set()
    with pytest.raises(ConfigError, match="max_batch=0"):
        pool.generate(reqs, max_batch=0)


@pytest.mark.oracle
@pytest.mark.spec("SERVING-4", "SERVING-6")
def test_pool_equals_peft_adapter_names(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import minipeft as mp
    from tests.helpers import TINY_LLAMA
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{k: v for k, v in TINY_LLAMA.items() if k != "model_type"})).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path / "base")
    three_adapters(mp.load_model(str(tmp_path / "base")), copies=()).save_adapters(str(tmp_path / "ad"))
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ad" / "a"), adapter_name="a")
    for n in ("b", "c"):
        pm.load_adapter(str(tmp_path / "ad" / n), adapter_name=n)
    pm.eval()
    pool = AdapterPool(mp.load_model(str(tmp_path / "base")), pages=256)
    for n in "abc":
        pool.add(str(tmp_path / "ad" / n))
    peft_names = [n or "__base__" for n in NAMES]
    with torch.no_grad():
        theirs = pm(torch.tensor(IDS), adapter_names=peft_names).logits.numpy()
        tokens = pm.generate(input_ids=torch.tensor(IDS[:, :4]), attention_mask=torch.ones(5, 4, dtype=torch.long),
                             max_new_tokens=6, do_sample=False, adapter_names=peft_names, pad_token_id=0).numpy()
    err = max_rel_err(pool(IDS, NAMES), theirs)
    print(f"\n  pool a/base/b/c/a vs PEFT adapter_names: max rel err {err:.2e}")
    assert err < 1e-5
    got = pool.generate([Request(IDS[b, :4], n, 6) for b, n in enumerate(NAMES)], eos_token_id=-1)
    assert np.array_equal(np.stack(got), tokens)


@pytest.mark.spec("SERVING-7")
def test_cli_serve(folders, tmp_path, capsys):
    import minipeft as mp
    m = mp.load_model(mp.DEMO_MODEL)
    for name, targets in (("up", ("q_proj", "v_proj")), ("down", ("o_proj",))):
        m.apply_lora(rank=2, target_modules=targets, name="default")
        for p in m.trainable_parameters():
            p.data = (p.data + np.random.default_rng(1).standard_normal(p.shape) * 0.3).astype(np.float32)
        m.save_adapters(str(tmp_path / name))
        m.delete_adapter("default")
    reqs = tmp_path / "requests.jsonl"
    reqs.write_text("\n".join(json.dumps(r) for r in (
        {"prompt": "next abc =", "adapter": "up", "max_new_tokens": 4}, {"prompt": [3, 4, 5], "adapter": None},
        {"prompt": "next x =", "adapter": "down", "max_new_tokens": 2})) + "\n")
    assert main(["serve", "--model", mp.DEMO_MODEL, "--adapters", str(tmp_path / "up"), str(tmp_path / "down"),
                 "--requests", str(reqs), "--max-new-tokens", "3", "--max-batch", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["adapter"], len(r["tokens"])) for r in lines] == [("up", 4), (None, 3), ("down", 2)]
    one = mp.load_model(mp.DEMO_MODEL)
    one.load_adapters(str(tmp_path / "up"))
    assert lines[0]["completion"] == one.generate("next abc =", max_new_tokens=4)
    reqs.write_text(json.dumps({"prompt": [3], "adapter": "nope"}) + "\n")
    assert main(["serve", "--model", mp.DEMO_MODEL, "--adapters", str(tmp_path / "up"), "--requests", str(reqs)]) == 2
    assert "adapter one of ['up']" in capsys.readouterr().err


@pytest.mark.spec("SERVING-8", "SERVING-9")
@pytest.mark.parametrize("other", ["array_api_strict", "cupy"])
def test_pool_on_the_guard_equals_numpy(folders, other):
    require_backend(other)
    paths, _ = folders
    reqs = [Request(IDS[0, :3], "a", 4), Request(IDS[1], None, 3), Request(IDS[2, :5], "c", 5)]

    def run():
        pool = make_pool(paths)
        return backend.to_host(pool(IDS, NAMES).data), pool.generate(reqs, eos_token_id=-1, max_batch=2)
    out = {}
    try:
        for name in ("numpy", other):
            backend.set_backend(name)
            out[name] = run()
    finally:
        backend.set_backend("numpy")
    ref, ours = out["numpy"], out[other]
    if other == "array_api_strict":
        assert np.array_equal(ours[0], ref[0])
    else:
        assert max_rel_err(ours[0], ref[0]) < 1e-5
    assert all(np.array_equal(a, b) for a, b in zip(ours[1], ref[1]))
