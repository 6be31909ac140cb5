"""The `minipeft` command line: every adapter method trains, saves in PEFT's layout, reloads and generates
through the CLI on the model the package carries; bad fields are clear errors that write nothing."""
import json

import pytest

import minipeft
from minipeft.adapters.registry import METHODS
from minipeft.cli import main

# fields a method needs beyond its defaults to run a 2-step job on the carried model
EXTRA = {"adalora": ["--set", "total_step=2"], "road": ["--set", "group_size=8"],
         "c3a": ["--set", "block_size=16"],  # C3A: 256 does not divide 96
         "vblora": ["--set", "vector_length=16", "--set", "num_vectors=32"],
         "trainable_tokens": ["--set", "token_indices=[3, 5, 7]"],
         "cpt": ["--set", "cpt_token_ids=[3, 4, 5, 6]", "--set", "cpt_tokens_type_mask=[1, 2, 3, 4]"],  # a context of one
         # example; PEFT's default types (all 1) leave the data's labels without loss (CPT-8)  # no default: which tokens is the user's choice
         "alora": ["--set", "alora_invocation_tokens=[30]"],  # no default: the tokenized invocation string ("=")
         "rosa": ["--set", "warmup=0"],  # the mask chosen after step 0, S trained in step 1
         "adamss": ["--rank", "8"],  # AdaMSS's r = 100 reaches q_proj's 96 outputs (ADAMSS-2)
         "bdlora": ["--set", 'use_bdlora={"target_modules_bd_b": ["q_proj", "v_proj"], "nblocks": 2}'],  # no default patterns
         }
PEFT_TYPE = {"lora": "LORA", "qlora": "LORA", "dora": "LORA", "adalora": "ADALORA", "vera": "VERA", "loha": "LOHA",
             "lokr": "LOKR", "ia3": "IA3", "prompt_tuning": "PROMPT_TUNING", "prefix_tuning": "PREFIX_TUNING",
             "ptuning": "P_TUNING", "ptuning_v2": "PREFIX_TUNING", "cpt": "CPT", "loraxs": "MINIPEFT_LORAXS", "orthogonal": "LORA", "mica": "LORA", "loftq": "LORA",
             "eva": "LORA", "nola": "MINIPEFT_NOLA", "tiedlora": "MINIPEFT_TIEDLORA",
             "dvora": "MINIPEFT_DVORA", "mora": "MINIPEFT_MORA",
             "multilora": "MINIPEFT_MULTILORA", "qalora": "MINIPEFT_QALORA", "hira": "HIRA", "hra": "HRA", "beft": "BEFT",
             "fourierft": "FOURIERFT", "waveft": "WAVEFT", "shira": "SHIRA", "oft": "OFT", "road": "ROAD", "miss": "MISS", "c3a": "C3A", "delora": "DELORA", "psoft": "PSOFT", "gralora": "GRALORA", "boft": "BOFT",
             "vblora": "VBLORA", "randlora": "RANDLORA",
             "supertuning": "SUPERTUNING",
             "tinylora": "TINYLORA",
             "glora": "GLORA",
             "osf": "OSF",
             "deft": "DEFT",
             "unilora": "UNILORA",
             "ln_tuning": "LN_TUNING",
             "trainable_tokens": "TRAINABLE_TOKENS",
             "lora_ga": "LORA",
             "peanut": "PEANUT",
             "frod": "FROD",
             "pvera": "PVERA",
             "alora": "LORA",
             "corda": "LORA",
             "lily": "LILY",
             "kasa": "LORA",
             "loretta": "MINIPEFT_LORETTA",
             "rosa": "MINIPEFT_ROSA",
             "adamss": "ADAMSS",
             "longlora": "LORA",
             "bdlora": "LORA",
             "velora": "LORA",
             "monteclora": "LORA",
             }

# a QLoRA adapter is a LoRA file; P-tuning v2 is PEFT's PREFIX_TUNING with a projection (spec/ptuning_v2.md)
RELOADED = {"qlora": METHODS["lora"], "ptuning_v2": METHODS["prefix_tuning"]}
RELOADED["lora_ga"] = METHODS["lora"]  # LoRA-GA saves PEFT's conversion, a plain rank-2r LoRA (LORA_GA-6)
RELOADED["corda"] = METHODS["lora"]  # so does CorDA (CORDA-5)
RELOADED["longlora"] = METHODS["lora"]  # LongLoRA saves a plain LoRA with modules_to_save (LONGLORA-6)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "next.jsonl"
    rows = [{"prompt": f"next {w} =", "completion": " " + "".join(chr(ord(c) + 1) for c in w)}
            for w in ["abc", "hello", "cat", "dog", "pen", "map", "sky", "tree"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


INITIALISERS = ("orthogonal", "mica", "loftq", "eva")  # LoRA files whose init_lora_weights names the method (METHOD-10)


def test_every_registered_method_has_a_cli_case():
    assert sorted(PEFT_TYPE) == sorted(METHODS)


@pytest.mark.spec("PEFT-1", "PEFT-3", "METHOD-9")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_train_saves_an_adapter_that_loads_and_generates(method, data, tmp_path, capsys):
    out = tmp_path / method
    assert main(["train", "--model", minipeft.DEMO_MODEL, "--data", data, "--output", str(out), "--method", method,
                 "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", *EXTRA.get(method, [])]) == 0
    printed = capsys.readouterr().out
    assert "trainable parameters" in printed and f"adapter saved to {out}" in printed
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == PEFT_TYPE[method]
    assert saved.get("use_dora", False) == (method == "dora")
    model = minipeft.load_model(minipeft.DEMO_MODEL)
    model.load_adapters(str(out))
    assert type(model.peft_configs["default"]) is RELOADED.get(method, METHODS[method])
    assert main(["generate", "--model", minipeft.DEMO_MODEL, "--adapter", str(out), "--prompt", "next abc =",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == model.generate("next abc =", max_new_tokens=4) + "\n"
    assert main(["inspect", str(out), "--model", minipeft.DEMO_MODEL]) == 0
    shown = capsys.readouterr().out
    title = RELOADED.get(method, METHODS[method]).__name__.removesuffix("Config")  # DoRA, not PEFT's LORA
    flag = {"dora": ", use_dora", "alora": ", alora_invocation_tokens=[30]"}.get(method, f", init_lora_weights={method}" if method in INITIALISERS else "")
    flag = ", kasa_config" if method == "kasa" else flag  # KaSA: LoRA with a kasa_config dict
    flag = ", use_bdlora" if method == "bdlora" else flag  # BD-LoRA: LoRA with a use_bdlora dict
    flag = ", velora_config" if method == "velora" else flag  # VeLoRA: LoRA with a velora_config dict
    flag = ", monteclora_config" if method == "monteclora" else flag  # MonteCLoRA: LoRA with a monteclora_config dict
    assert f"method: {title} (PEFT: {PEFT_TYPE[method]}{flag})" in shown
    train_line = next(line for line in printed.splitlines() if line.startswith("trainable parameters: "))
    if method not in ("adalora", "lora_ga", "corda"):  # AdaLoRA saves the triplets its allocation kept, fewer than train counted
        # at step 0; LoRA-GA and CorDA save rank 2r (LORA_GA-6, CORDA-5)
        assert shown.rstrip().endswith(train_line)  # METHOD-9: train's count and share, not a share of the base
    assert "of the base's" not in shown
    assert main(["inspect", str(out)]) == 0  # the base from base_model_name_or_path: the same count
    assert capsys.readouterr().out == shown
    for cfg in out.rglob("adapter_config.json"):  # the adapter and its training checkpoints' copies
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "base_model_name_or_path": str(tmp_path / "gone")}))
    assert main(["inspect", str(out)]) == 0  # no base: the numbers saved, never a guess at the trained ones
    shown = capsys.readouterr().out
    assert "numbers saved: " in shown and "pass --model BASE" in shown and "trainable parameters" not in shown


def test_fields_flags_and_set_reach_the_config(data, tmp_path):
    out = tmp_path / "lokr"
    assert main(["train", "--model", minipeft.DEMO_MODEL, "--data", data, "--output", str(out), "--method", "lokr",
                 "--rank", "4", "--target-modules", "all-linear", "--set", "factor=4", "--set", "decompose_both=true",
                 "--max-steps", "1"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["r"], saved["target_modules"], saved["decompose_factor"], saved["decompose_both"]) == \
        (4, "all-linear", 4, True)


@pytest.mark.spec("LORAPLUS-4", "RIEM-2")
@pytest.mark.parametrize("optimizer", ["loraplus", "lorafa", "riemannian"])
def test_optimizer_flags_train_and_save_a_lora(data, tmp_path, optimizer):
    out = tmp_path / optimizer
    extra = ["--optimizer-arg", "loraplus_lr_ratio=4"] if optimizer == "loraplus" else []
    assert main(["train", "--model", minipeft.DEMO_MODEL, "--data", data, "--output", str(out), "--optimizer",
                 optimizer, *extra, "--max-steps", "2", "--lr", "1e-2"]) == 0
    model = minipeft.load_model(minipeft.DEMO_MODEL)
    model.load_adapters(str(out))
    B = [p.numpy() for n, p in model.net.named_parameters() if "lora_B" in n]
    assert B and all(abs(b).max() > 0 for b in B)  # trained from B = 0


@pytest.mark.parametrize("argv, message", [
    (["--method", "ia3", "--rank", "4"], "ia3 has no field rank"),
    (["--set", "rank"], "write FIELD=VALUE"),
    (["--set", "rank=-1"], "rank"),
    (["--method", "prompt_tuning", "--set", "num_virtual_tokens=0"], "num_virtual_tokens"),
    (["--optimizer", "loraplus", "--optimizer-arg", "loraplus_lr_ratio=0"], "loraplus_lr_ratio"),
    (["--optimizer", "loraplus", "--optimizer-arg", "ratio=4"], "loraplus has no option ratio"),
    (["--optimizer-arg", "reg=0.1"], "needs --optimizer"),
    (["--optimizer", "lorafa", "--method", "dora"], "LoRA-FA"),
])
def test_bad_fields_are_clear_errors_that_write_nothing(data, tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    assert main(["train", "--model", minipeft.DEMO_MODEL, "--data", data, "--output", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.spec("LORA-8", "LORA-12")
def test_merge_writes_the_model_the_api_merges(data, tmp_path):
    """`minipeft merge --combination cat` of two trained LoRA adapters gives the logits of the API's
    merge_adapters(..., "cat") followed by merge_and_unload."""
    import numpy as np
    folders = []
    for seed in (0, 1):
        folders.append(str(tmp_path / f"a{seed}"))
        assert main(["train", "--model", minipeft.DEMO_MODEL, "--data", data, "--output", folders[-1],
                     "--max-steps", "2", "--lr", "1e-2", "--seed", str(seed), "--dropout", "0.1"]) == 0
    out = tmp_path / "merged"
    assert main(["merge", "--model", minipeft.DEMO_MODEL, "--adapters", *folders, "--weights", "0.7", "0.3",
                 "--combination", "cat", "--output", str(out)]) == 0
    model = minipeft.load_model(minipeft.DEMO_MODEL)
    for i, folder in enumerate(folders):
        model.load_adapters(folder, name=f"s{i}")
    model.merge_adapters({"s0": 0.7, "s1": 0.3}, name="mix", combination="cat")
    model.set_active_adapter("mix")
    ids = np.array([[3, 4, 5, 6, 7, 8]])
    ours = model.merge_and_unload()(ids).data
    again = minipeft.load_model(str(out))
    assert np.abs(again(ids).data - ours).max() <= 1e-5 * np.abs(ours).max()
    assert np.abs(ours - minipeft.load_model(minipeft.DEMO_MODEL)(ids).data).max() > 1e-4  # the merge changed something


FAKE_SUITE = "import sys\nprint('suite argv', sys.argv[1:])\nsys.exit(3)\n"


def test_bench_runs_the_checkouts_suite_with_its_flags(tmp_path, monkeypatch, capfd):
    """minipeft bench is python -m benchmarks in the checkout (here a stand-in suite that exits 3)."""
    import minipeft.cli as cli
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__main__.py").write_text(FAKE_SUITE)
    monkeypatch.setattr(cli, "checkout_root", lambda: str(tmp_path))
    monkeypatch.setattr(cli, "REFERENCES", ("json",))  # present everywhere: the suite runs
    assert main(["bench", "--quick", "--threads", "1"]) == 3
    assert "suite argv ['--quick', '--threads', '1']" in capfd.readouterr().out


def test_bench_without_a_checkout_or_the_references_says_what_to_install(tmp_path, monkeypatch, capsys):
    import minipeft.cli as cli
    monkeypatch.setattr(cli, "checkout_root", lambda: str(tmp_path))
    assert main(["bench"]) == 2
    assert "has no benchmarks/" in capsys.readouterr().err
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__main__.py").write_text(FAKE_SUITE)
    monkeypatch.setattr(cli, "REFERENCES", ("torch", "no_such_reference_module"))
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert "no_such_reference_module, not installed" in err and "oracle,bench" in err


def test_the_checkout_root_holds_the_real_suite():
    import os
    import minipeft.cli as cli
    assert os.path.isfile(os.path.join(cli.checkout_root(), "benchmarks", "__main__.py"))


@pytest.mark.spec("PEFT-7")
def test_generate_takes_a_checkpoint_or_a_named_adapter_folder(tmp_path, capsys):
    """Before: `generate --adapter out/checkpoint-N` and `--adapter` on a folder of named adapters failed
    (no adapter_config.json there). Now both load, and the text is the Python API's."""
    from minipeft import TrainingConfig
    rows = [{"prompt": "next abc =", "completion": " bcd"}] * 4
    model = minipeft.load_model(minipeft.DEMO_MODEL).apply_lora(target_modules=["q_proj", "v_proj"], name="nxt")
    model.train(rows, TrainingConfig(max_steps=2, batch_size=2, learning_rate=5e-2, output_dir=str(tmp_path / "run"),
                                     progress=False))
    model.save_adapters(str(tmp_path / "named"))
    want = model.generate("next abc =", max_new_tokens=4)
    for folder in (tmp_path / "run" / "checkpoint-2", tmp_path / "named"):
        capsys.readouterr()
        assert main(["generate", "--model", minipeft.DEMO_MODEL, "--adapter", str(folder), "--prompt", "next abc =",
                     "--max-new-tokens", "4"]) == 0
        assert capsys.readouterr().out.strip() == want.strip()
