"""The main job: teach the base model minipeft carries a task it cannot do, with LoRA, on a CPU.

The base (minipeft/data/tiny-llama-chars, made by examples/make_base_model.py) knows `copy` and
`sort`. We teach it `next` (every letter one step on: "next abc =" -> " bcd"), measure held-out
exact match before and after, save the adapter in PEFT's format, reload it into a fresh model
and check the answers are the same.

    python examples/finetune_lora.py                 # seconds on 2 CPU cores (up to 2 minutes on a busy host)
    python examples/finetune_lora.py --model HuggingFaceTB/SmolLM2-135M   # a Hub model, if cached
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import minipeft as mp  # noqa: E402
from tasks import examples  # noqa: E402


def exact_match(model, held, show=0):
    answers = [model.generate(e["prompt"], max_new_tokens=8).strip() for e in held]
    for e, a in list(zip(held, answers))[:show]:
        print(f"    {e['prompt']}{e['completion']:<8}  model: {a}")
    return sum(a == e["completion"].strip() for e, a in zip(held, answers)) / len(held), answers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=mp.DEMO_MODEL)
    ap.add_argument("--out", default="runs/next-lora")
    ap.add_argument("--steps", type=int, default=120)
    args = ap.parse_args(argv)

    if args.model == mp.DEMO_MODEL and not os.path.isdir(mp.DEMO_MODEL):
        print("the base model is not built yet: running examples/make_base_model.py first")
        import make_base_model
        make_base_model.main([])
    held = examples("next", 100, seed=123)
    train = examples("next", 3000, seed=7, exclude={e["prompt"] for e in held})
    model = mp.load_model(args.model)
    before, _ = exact_match(model, held, show=3)
    print(f"held-out exact match before LoRA: {before:.0%}")

    cfg = mp.LoRAConfig(rank=8, alpha=16, target_modules="all-linear", dropout=0.0)
    model.apply_lora(cfg)
    trainable, total = model.parameter_counts()
    print(f"LoRA r={cfg.rank} on all linear layers: {trainable:,} trainable of {total:,} "
          f"({100 * trainable / total:.1f}%)")
    t0 = time.time()
    hist = model.train(train, mp.TrainingConfig(learning_rate=5e-3, batch_size=32, max_steps=args.steps,
                                                warmup_steps=20, schedule="cosine", seed=0))
    print(f"trained {args.steps} steps in {time.time() - t0:.0f} s, final loss {hist['loss'][-1]:.4f}")
    after, answers = exact_match(model, held, show=3)
    print(f"held-out exact match after LoRA: {after:.0%}")

    same = save_and_reload(model, lambda: mp.load_model(args.model), held, answers, args.out, "a fresh model")
    return 0 if same and after > before else 1


def save_and_reload(model, load_fresh, held, answers, out, where):
    """Save the adapters, load them into load_fresh(), and say whether the answers are the same."""
    model.save_adapters(out)
    fresh = load_fresh()
    fresh.load_adapters(out)
    again, answers2 = exact_match(fresh, held)
    same = answers == answers2
    print(f"adapter saved to {out}; reloaded into {where}: exact match {again:.0%}, same answers: {same}")
    return same


if __name__ == "__main__":
    sys.exit(main())
