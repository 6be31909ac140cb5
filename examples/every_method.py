"""Every adapter method on the main job: teach the carried model `next` with each one, in a few seconds.

Each method runs at its config's defaults (the seed's: LoRA r=8 on q_proj and v_proj, ...) with the
learning rate that did best for it in benchmarks/bench_methods.py, on the same batches. For each the
script prints the trainable share, held-out exact match, and whether the adapter saved in PEFT's
format reloads into a fresh model with the same answers.

    python examples/every_method.py                  # about half a minute on 2 CPU cores
    python examples/every_method.py --steps 300      # the budget of the README's comparison table
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import minipeft as mp  # noqa: E402
from finetune_lora import exact_match  # noqa: E402
from minipeft.adapters import registry  # noqa: E402
from minipeft.adapters.registry import METHODS  # noqa: E402
from tasks import examples  # noqa: E402

# the best of six learning rates for each method in the README's comparison table (300 steps)
LR = {"lora": 1e-2, "qlora": 1e-2, "dora": 3e-2, "adalora": 3e-2, "vera": 0.3, "loha": 3e-2, "lokr": 0.1, "ia3": 0.3,
      "prompt_tuning": 0.3, "prefix_tuning": 0.3, "ptuning": 3e-2, "ptuning_v2": 1e-2}


def run(method: str, steps: int, train, held) -> tuple:
    quant = mp.QuantizationConfig(compute_dtype="float32") if registry.method(method).quantized_base else None
    extra = {"total_step": steps, "tinit": steps // 10, "tfinal": steps // 5} if method == "adalora" else {}
    model = mp.load_model(mp.DEMO_MODEL, quantization=quant)
    model.apply_adapter(METHODS[method](**extra))
    trainable, total = model.parameter_counts()
    model.train(train, mp.TrainingConfig(learning_rate=LR[method], batch_size=32, max_steps=steps,
                                         warmup_steps=max(steps // 10, 1), schedule="cosine", progress=False))
    score, answers = exact_match(model, held)
    with tempfile.TemporaryDirectory() as folder:
        model.save_adapters(folder)
        fresh = mp.load_model(mp.DEMO_MODEL, quantization=quant)
        fresh.load_adapters(folder)
        same = exact_match(fresh, held)[1] == answers
    return trainable / total, score, same


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS))
    args = ap.parse_args(argv)
    held = examples("next", 50, seed=123)
    train = examples("next", args.steps * 32, seed=7, exclude={e["prompt"] for e in held})
    print(f"{'method':14} {'trainable':>9} {'exact match':>11}  reloaded the same")
    results = {}
    for method in args.methods:
        share, score, same = results[method] = run(method, args.steps, train, held)
        print(f"{method:14} {100 * share:8.2f}% {100 * score:10.0f}%  {same}")
    return 0 if all(same for _, _, same in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
