"""The main job with QLoRA: the same `next` task as finetune_lora.py, over a 4-bit NF4 base.

Every linear layer of the carried base model (the LM head excepted, as with bitsandbytes) is
stored in NF4 with double quantization and dequantized per call in the compute dtype; LoRA
adapters train on top. Held-out exact match before and after, then the adapter is saved in PEFT's
format (PEFT loads it over a bitsandbytes 4-bit base) and reloaded into a fresh quantized model.

    python examples/finetune_qlora.py                    # about 3 minutes on 2 CPU cores
    python examples/finetune_qlora.py --compute-dtype bfloat16
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import minipeft as mp  # noqa: E402
from finetune_lora import exact_match, save_and_reload  # noqa: E402
from tasks import examples  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=mp.DEMO_MODEL)
    ap.add_argument("--out", default="runs/next-qlora")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)

    q = mp.QuantizationConfig(quant_type="nf4", compute_dtype=args.compute_dtype, double_quantization=True,
                              block_size=64)
    held = examples("next", 100, seed=123)
    train = examples("next", 3000, seed=7, exclude={e["prompt"] for e in held})
    model = mp.load_model(args.model, quantization=q)
    before, _ = exact_match(model, held, show=3)
    print(f"held-out exact match before QLoRA (4-bit base): {before:.0%}")

    cfg = mp.QLoRAConfig(rank=8, alpha=16, target_modules="all-linear")
    model.apply_qlora(cfg)
    trainable, total = model.parameter_counts()
    print(f"QLoRA r={cfg.rank} on all linear layers: {trainable:,} trainable of {total:,}")
    hist = model.train(train, mp.TrainingConfig(learning_rate=5e-3, batch_size=32, max_steps=args.steps,
                                                warmup_steps=20, schedule="cosine", seed=0))
    print(f"final loss {hist['loss'][-1]:.4f}")
    after, answers = exact_match(model, held, show=3)
    print(f"held-out exact match after QLoRA: {after:.0%}")

    same = save_and_reload(model, lambda: mp.load_model(args.model, quantization=q), held, answers, args.out,
                           "a fresh 4-bit base")
    return 0 if same and after > before else 1


if __name__ == "__main__":
    sys.exit(main())
