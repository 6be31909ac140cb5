"""The seed's method comparison table, measured: every adapter on the model minipeft carries, one task,
one training budget, each method at its config's defaults (the seed's: LoRA r=8, alpha 16 on q_proj and v_proj, ...).

The model is minipeft/data/tiny-llama-chars (llama, hidden 96, 2 layers, 32-character vocabulary);
the task is the demo's `next` (examples/tasks.py: "next abc =" -> " bcd"), which the base model
cannot do. Every method trains the same number of optimizer steps on the same batches (AdamW, cosine
schedule, 10% warm-up) at each learning rate of --lrs, and the table keeps the one with the lowest
held-out loss (the LR column: adapters with few parameters need a larger one, as their papers say).
Each run is a fresh process; each method reports:

  params    trainable share of all parameters
  memory    traced peak of the training run (weights + adapter + gradients + AdamW + activations,
            tracemalloc, in a separate run of 2 steps), and as a share of full fine-tuning
  step      median seconds per optimizer step, and relative to LoRA (> 1 is slower)
  eval      held-out loss on the completions after training, and greedy exact match on 50 held-out words

    python benchmarks/bench_methods.py                    # every method, 150 steps (about 15 min on 2 cores)
    python benchmarks/bench_methods.py --methods lora ia3 --steps 40
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

# the seed's table (../shared/seed/lora-adapters-reference.md): Params, Memory, Quality, Speed
SEED = {
    "lora": ("0.1%", "Low", "High", "Fast"), "qlora": ("0.1%", "Very Low", "High", "Medium"),
    "dora": ("0.1%", "Low", "Higher", "Fast"), "adalora": ("0.1%", "Low", "High", "Medium"),
    "vera": ("0.01%", "Very Low", "Good", "Fast"), "lokr": ("0.05%", "Low", "Good", "Fast"),
    "loha": ("0.1%", "Low", "Good", "Fast"), "ia3": ("0.01%", "Very Low", "Good", "Very Fast"),
    "prefix_tuning": ("0.1%", "Low", "Good", "Medium"), "prompt_tuning": ("0.01%", "Very Low", "Moderate", "Fast"),
    "ptuning": ("-", "-", "-", "-"), "ptuning_v2": ("-", "-", "-", "-"), "loraxs": ("-", "-", "-", "-"),
    "nola": ("-", "-", "-", "-"), "tiedlora": ("-", "-", "-", "-"), "dvora": ("-", "-", "-", "-"),
    "mora": ("-", "-", "-", "-"), "multilora": ("-", "-", "-", "-"), "qalora": ("-", "-", "-", "-"),
    "eva": ("-", "-", "-", "-"), "hira": ("-", "-", "-", "-"), "hra": ("-", "-", "-", "-"), "miss": ("-", "-", "-", "-"), "c3a": ("-", "-", "-", "-"), "beft": ("-", "-", "-", "-"),
    "fourierft": ("-", "-", "-", "-"), "waveft": ("-", "-", "-", "-"), "shira": ("-", "-", "-", "-"),
    "oft": ("-", "-", "-", "-"), "delora": ("-", "-", "-", "-"), "psoft": ("-", "-", "-", "-"), "gralora": ("-", "-", "-", "-"), "boft": ("-", "-", "-", "-"), "vblora": ("-", "-", "-", "-"), "randlora": ("-", "-", "-", "-"),
    "supertuning": ("-", "-", "-", "-"),
    "tinylora": ("-", "-", "-", "-"),
    "glora": ("-", "-", "-", "-"),
    "osf": ("-", "-", "-", "-"),
    "ln_tuning": ("-", "-", "-", "-"),
    "trainable_tokens": ("-", "-", "-", "-"),
    "full": ("100%", "-", "-", "-"),
    "deft": ("-", "-", "-", "-"),
    "unilora": ("-", "-", "-", "-"),
    "lora_ga": ("-", "-", "-", "-"),
    "peanut": ("-", "-", "-", "-"),
    "frod": ("-", "-", "-", "-"),
    "pvera": ("-", "-", "-", "-"),
    "loraplus": ("-", "-", "-", "-"),
    "lorafa": ("-", "-", "-", "-"),
    "riemannian": ("-", "-", "-", "-"),
    "flora": ("-", "-", "-", "-"),
    "relora": ("-", "-", "-", "-"),
    "chainlora": ("-", "-", "-", "-"),
    "deltalora": ("-", "-", "-", "-"),
    "dylora": ("-", "-", "-", "-"),
    "loftq": ("-", "-", "-", "-"),
    "orthogonal": ("-", "-", "-", "-"),
    "mica": ("-", "-", "-", "-"),
    "road": ("-", "-", "-", "-"),
    "alora": ("-", "-", "-", "-"),
    "corda": ("-", "-", "-", "-"),
    "lily": ("-", "-", "-", "-"),
    "kasa": ("-", "-", "-", "-"),
    "loretta": ("-", "-", "-", "-"),
    "loretta_adp": ("-", "-", "-", "-"),
    "rosa": ("-", "-", "-", "-"),
    "adamss": ("-", "-", "-", "-"),
    "longlora": ("-", "-", "-", "-"),
    "bdlora": ("-", "-", "-", "-"),
    "velora": ("-", "-", "-", "-"),
    "monteclora": ("-", "-", "-", "-"),
    "lora_drop": ("-", "-", "-", "-"),
    "cpt": ("-", "-", "-", "-"),
}


def configs(mp, steps: int):
    """method -> (a function of (model, training records) that applies the method, load_model kwargs[, a
    function of (model, steps, training records) giving TrainingConfig fields: an optimiser, a procedure's hooks]);
    steps is the run's length (AdaLoRA's rank budget schedule and the procedures' cycles end there). A data-driven
    initialiser (EVA) reads the first 256 training records."""
    from minipeft import optimizers as O, procedures as P
    def adapter(cfg):
        return lambda model, data: model.apply_adapter(cfg, data=data[:256] if getattr(cfg, "NEEDS_DATA", False) else None)

    def full(model, data):
        model.net.requires_grad_(True)

    def cpt(model, data):  # CPT (spec/cpt.md): two training records as the context, each typed input template
        ids, types = [], []  # "next ", input word, output template " =", label (the completion): 4j-3 .. 4j
        for j, e in enumerate(data[:2]):
            for kind, piece in enumerate(("next ", e["prompt"].split()[1], " =", e["completion"]), 1):
                t = model.tokenizer.encode(piece, add_special_tokens=False)
                ids, types = ids + t, types + [4 * j + kind] * len(t)
        return model.apply_cpt(cpt_token_ids=ids, cpt_tokens_type_mask=types)

    def lora_drop(model, n, data):  # LoRA-drop (spec/lora_drop.md), its importance read on the training records
        return {"hooks": [P.LoRADropHook(model, P.LoRADropConfig(warmup_steps=max(n // 10, 1)), data)]}
    return {
        "full": (full, {}),
        "lora": (adapter(mp.LoRAConfig()), {}),
        "qlora": (adapter(mp.QLoRAConfig()), {"quantization": mp.QuantizationConfig(compute_dtype="float32")}),
        "dora": (adapter(mp.DoRAConfig()), {}),
        "adalora": (adapter(mp.AdaLoRAConfig(tinit=steps // 10, tfinal=steps // 5, total_step=steps)), {}),
        "vera": (adapter(mp.VeRAConfig()), {}),
        "lokr": (adapter(mp.LoKrConfig()), {}),
        "loha": (adapter(mp.LoHaConfig()), {}),
        "ia3": (adapter(mp.IA3Config()), {}),
        "prefix_tuning": (adapter(mp.PrefixTuningConfig()), {}),
        "prompt_tuning": (adapter(mp.PromptTuningConfig()), {}),
        "ptuning": (adapter(mp.PTuningConfig()), {}),
        "ptuning_v2": (adapter(mp.PTuningV2Config()), {}),
        "loraxs": (adapter(mp.LoRAXSConfig()), {}),
        "nola": (adapter(mp.NOLAConfig()), {}),
        "tiedlora": (adapter(mp.TiedLoRAConfig()), {}),
        "dvora": (adapter(mp.DVoRAConfig()), {}),
        "mora": (adapter(mp.MoRAConfig()), {}),
        "multilora": (adapter(mp.MultiLoRAConfig()), {}),
        "qalora": (adapter(mp.QALoRAConfig()), {}),
        "eva": (adapter(mp.EVAConfig()), {}),
        "hira": (adapter(mp.HiRAConfig(rank=8)), {}),
        "hra": (adapter(mp.HRAConfig(rank=8)), {}),
        "miss": (adapter(mp.MiSSConfig(rank=8)), {}),
        "c3a": (adapter(mp.C3AConfig(block_size=16)), {}),
        "beft": (adapter(mp.BEFTConfig()), {}),
        "fourierft": (adapter(mp.FourierFTConfig()), {}),
        "waveft": (adapter(mp.WaveFTConfig()), {}),
        "shira": (adapter(mp.SHiRAConfig()), {}),
        "oft": (adapter(mp.OFTConfig(oft_block_size=8)), {}),
        "delora": (adapter(mp.DeLoRAConfig(rank=8)), {}),
        "psoft": (adapter(mp.PSOFTConfig(rank=32, psoft_alpha=32)), {}),
        "gralora": (adapter(mp.GraLoRAConfig(rank=8, alpha=16)), {}),
        "boft": (adapter(mp.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2)), {}),
        "vblora": (adapter(mp.VBLoRAConfig(num_vectors=64, vector_length=16)), {}),
        "randlora": (adapter(mp.RandLoRAConfig(rank=8)), {}),
        "supertuning": (adapter(mp.SuperTuningConfig()), {}),
        "tinylora": (adapter(mp.TinyLoRAConfig()), {}),
        "glora": (adapter(mp.GLoRAConfig()), {}),
        "osf": (adapter(mp.OSFConfig()), {}),
        "deft": (adapter(mp.DEFTConfig(rank=8, alpha=16)), {}),
        "unilora": (adapter(mp.UniLoRAConfig()), {}),
        "ln_tuning": (adapter(mp.LNTuningConfig()), {}),
        "trainable_tokens": (adapter(mp.TrainableTokensConfig(token_indices=list(range(16)))), {}),
        "lora_ga": (adapter(mp.LoRAGAConfig()), {}),
        "peanut": (adapter(mp.PEANuTConfig(rank=8)), {}),
        "frod": (adapter(mp.FRoDConfig()), {}),
        "pvera": (adapter(mp.PVeRAConfig()), {}),
        "loraplus": (adapter(mp.LoRAConfig()), {}, lambda model, n, data: {"optimizer": O.LoraPlusConfig()}),
        "lorafa": (adapter(mp.LoRAConfig()), {}, lambda model, n, data: {"optimizer": O.LoraFAConfig()}),
        "riemannian": (adapter(mp.LoRAConfig()), {}, lambda model, n, data: {"optimizer": O.RiemannianConfig()}),
        "flora": (full, {}, lambda model, n, data: {"optimizer": O.FloraConfig(rank=8, kappa=max(n // 3, 1))}),
        "relora": (adapter(mp.LoRAConfig()), {}, lambda model, n, data: {"hooks": [P.ReLoRAHook(model, P.ReLoRAConfig(
            reset_every=max(n // 3, 2), restart_warmup=max(n // 30, 1)))]}),
        "chainlora": (adapter(mp.LoRAConfig()), {}, lambda model, n, data: {"hooks": [P.ChainLoRAHook(
            model, P.ChainLoRAConfig(links=(n // 3, n // 3, n - 2 * (n // 3))))]} if n >= 3 else {}),
        "deltalora": (adapter(mp.LoRAConfig()), {}, lambda model, n, data: {"hooks": [P.DeltaLoRAHook(
            model, P.DeltaLoRAConfig(update_delta_start=n // 10))]}),
        "dylora": (adapter(mp.LoRAConfig()), {}, lambda model, n, data: {"hooks": [P.DyLoRAHook(model, P.DyLoRAConfig())]}),
        "loftq": (adapter(mp.LoftQConfig()), {}),
        "orthogonal": (adapter(mp.OrthogonalConfig()), {}),
        "mica": (adapter(mp.MiCAConfig()), {}),
        "road": (adapter(mp.RoadConfig(group_size=8)), {}),  # 64 does not divide the carried v_proj's 32 outputs
        "alora": (adapter(mp.ALoRAConfig(alora_invocation_tokens=[30])), {}),  # "=": adapts the completion only
        "corda": (adapter(mp.CorDAConfig()), {}),
        "lily": (adapter(mp.LilyConfig(rank=8, stride_A=2, num_B=2)), {}),
        "kasa": (adapter(mp.KaSAConfig(rank=8, alpha=16)), {}),
        "loretta": (adapter(mp.LoRETTAConfig()), {}),
        "loretta_adp": (adapter(mp.LoRETTAConfig(variant="adp", bottleneck_size=16, zero_init=True, target_modules=(
            "gate_proj", "up_proj", "down_proj"), input_modules=("gate_proj", "up_proj"))), {}),  # their llama placement
        "rosa": (adapter(mp.RoSAConfig()), {}),  # the mask chosen after step 64 (warmup=64, m=1)
        "adamss": (adapter(mp.AdaMSSConfig(rank=32, num_subspaces=5, subspace_rank=2)), {}),
        "longlora": (adapter(mp.LongLoRAConfig()), {}),
        "bdlora": (adapter(mp.BDLoRAConfig(rank=8, alpha=16, use_bdlora={"target_modules_bd_b": ["q_proj", "v_proj"],
                                                                         "nblocks": 2})), {}),
        "velora": (adapter(mp.VeLoRAConfig(rank=8, alpha=16)), {}),  # PEFT's defaults: 64 groups, batch_average
        "monteclora": (adapter(mp.MonteCLoRAConfig(rank=8, alpha=16)), {}),  # PEFT's defaults: 8 samples, 1e-4
        "lora_drop": (adapter(mp.LoRAConfig(target_modules="all-linear")), {}, lora_drop),  # over LoRA on every linear
        # layer, the paper's setting
        "cpt": (cpt, {}),
    }


def child(method: str, steps: int, batch: int, lr: float, memory_only: bool) -> dict:
    import tracemalloc
    import minipeft as mp
    from tasks import examples
    apply, load_kw, *fields = configs(mp, steps)[method]
    held = examples("next", 200, seed=123)
    train = examples("next", steps * batch, seed=7, exclude={e["prompt"] for e in held})
    if memory_only:  # from here: the weights, the adapter, gradients, optimizer state and activations
        tracemalloc.start()
    model = mp.load_model(mp.DEMO_MODEL, **load_kw)
    apply(model, train)
    trainable, total = model.parameter_counts()
    cfg = dict(learning_rate=lr, batch_size=batch, max_steps=2 if memory_only else steps,
               warmup_steps=max(steps // 10, 1), schedule="cosine", seed=0, progress=False)
    cfg.update(fields[0](model, cfg["max_steps"], train) if fields else {})  # a fresh hook for each run
    if memory_only:
        model.train(train[:2 * batch], mp.TrainingConfig(**cfg))
        return {"peak_mb": tracemalloc.get_traced_memory()[1] / 1e6}
    hist = model.train(train, mp.TrainingConfig(**cfg, eval_data=held))
    trainable, total = model.parameter_counts()  # after a procedure that drops parameters (LoRA-drop)
    step_s = statistics.median(
        sum(len(e["prompt"]) + len(e["completion"]) for e in train[:batch]) / r for r in hist["tokens_per_s"][1:])
    eval_loss = hist["eval_loss"][-1][1]
    answers = [model.generate(e["prompt"], max_new_tokens=8).strip() for e in held[:50]]
    match = sum(a == e["completion"].strip() for a, e in zip(answers, held)) / 50
    return {"trainable": trainable, "total": total, "lr": lr, "step_s": step_s, "eval_loss": eval_loss,
            "exact_match": match, "final_train_loss": hist["loss"][-1]}


def run(method, steps, batch, lr, memory_only=False):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--steps", str(steps), "--batch", str(batch),
           "--lr", str(lr)]
    out = subprocess.run(cmd + (["--memory-only"] if memory_only else []), capture_output=True, text=True, env=env)
    if out.returncode and "TrainingError" in out.stderr:  # the loss diverged at this learning rate
        return {"lr": lr, "eval_loss": float("inf")}
    if out.returncode:
        raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: dict) -> str:
    full_mb = rows.get("full", {}).get("peak_mb")
    lora_s = rows.get("lora", {}).get("step_s")
    lines = ["| Method | LR | Params (measured / seed) | Peak memory MB (share of full / seed) | Step s (vs LoRA / seed) "
             "| Eval loss | Exact match (seed quality) |", "|:--|--:|:--|:--|:--|--:|:--|"]
    for m, r in rows.items():
        p, mem, q, sp = SEED[m]
        share = f"{100 * r['trainable'] / r['total']:.2f}%"
        memshare = f"{100 * r['peak_mb'] / full_mb:.0f}%" if full_mb else "-"
        speed = f"{r['step_s'] / lora_s:.2f}x" if lora_s else "-"
        lines.append(f"| {m} | {r['lr']:g} | {share} / {p} | {r['peak_mb']:.2f} ({memshare} / {mem}) | "
                     f"{r['step_s']:.3f} ({speed} / {sp}) | {r['eval_loss']:.4f} | {100 * r['exact_match']:.0f}% ({q}) |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=None, help="default: every method this version has")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
                    help="each method trains at each; the table keeps the lowest eval loss")
    ap.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.lr, args.memory_only)))
        return 0
    import minipeft as mp
    have = configs(mp, args.steps)
    methods = args.methods or list(have)
    unknown = [m for m in methods if m not in have]
    if unknown:
        raise SystemExit(f"unknown or unavailable methods {unknown}; this version has {sorted(have)}")
    rows = {}
    for m in methods:
        t0 = time.time()
        runs = [run(m, args.steps, args.batch, lr) for lr in args.lrs]
        best = min(runs, key=lambda r: r["eval_loss"])
        rows[m] = dict(best, **run(m, args.steps, args.batch, best["lr"], memory_only=True),
                       sweep={r["lr"]: round(r["eval_loss"], 4) for r in runs})
        print(f"{m}: {rows[m]} ({time.time() - t0:.0f} s)", file=sys.stderr)
    print(f"{args.steps} steps of batch {args.batch} on {os.path.basename(mp.DEMO_MODEL)}, task `next`, "
          f"best eval loss over learning rates {args.lrs}\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
