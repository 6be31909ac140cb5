"""The `minipeft` command: train, merge, generate, inspect, memory, bench (each with --help)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import ConfigError, MiniPeftError


def _model(args):
    from .model import load_model
    return load_model(args.model)


def field_values(items, flag: str) -> dict:
    """{FIELD: VALUE} from repeated FIELD=VALUE flags, VALUE read as JSON where it parses, else as a string."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"{flag} {item!r}: write FIELD=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def optimizer_options(args):
    """--optimizer and --optimizer-arg: None (AdamW) or the optimiser's options (minipeft/optimizers)."""
    import dataclasses
    from .adapters.registry import method
    from .optimizers import optimisers
    values = field_values(args.optimizer_arg, "--optimizer-arg")
    if args.optimizer == "adamw":
        if values:
            raise ConfigError(f"--optimizer-arg needs --optimizer ({', '.join(m.name for m in optimisers())}); "
                              f"AdamW takes --lr")
        return None
    cls = method(args.optimizer).config
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"--optimizer {args.optimizer} has no option {', '.join(unknown)}; its options: "
                          f"{', '.join(sorted(fields))}")
    return cls(**values)


def method_config(args):
    """The --method's config from the flags that name its fields (--rank, --alpha, ...) and --set FIELD=VALUE
    (VALUE read as JSON where it parses, else as a string); unset flags leave the config's defaults."""
    import dataclasses
    from .adapters.registry import METHODS
    cls = METHODS[args.method]
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {"rank": args.rank, "alpha": args.alpha, "dropout": args.dropout, "init": args.init,
             "use_rslora": args.rslora or None,
             "target_modules": None if args.target_modules is None else
             ("all-linear" if args.target_modules == ["all-linear"] else tuple(args.target_modules))}
    kwargs = {k: v for k, v in given.items() if v is not None}
    kwargs.update(field_values(args.set, "--set"))
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ConfigError(f"--method {args.method} has no field {', '.join(unknown)}; its fields: "
                          f"{', '.join(sorted(fields))}")
    return cls(**kwargs)


def cmd_train(args):
    from .model import load_model
    from .quant import QuantizationConfig
    from .train import TrainingConfig
    cfg = method_config(args)
    optimizer = optimizer_options(args)  # checked before the model is loaded
    from .adapters.registry import method
    model = load_model(args.model, quantization=QuantizationConfig(compute_dtype="float32")
                       if method(args.method).quantized_base else None)
    model.apply_adapter(cfg)
    trainable, total = model.parameter_counts()
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    hist = model.train(args.data, TrainingConfig(
        learning_rate=args.lr, batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        epochs=args.epochs, max_steps=args.max_steps, warmup_steps=args.warmup, seed=args.seed,
        output_dir=args.output, save_steps=args.save_steps, resume_from=args.resume_from,
        plot_path=args.plot, optimizer=optimizer))
    model.save_adapters(args.output)
    print(f"final loss {hist['loss'][-1]:.4f}; adapter saved to {args.output}")


def cmd_merge(args):
    model = _model(args)
    weights = args.weights or [1.0] * len(args.adapters)
    if len(weights) != len(args.adapters):
        raise MiniPeftError(f"--weights has {len(weights)} values for {len(args.adapters)} adapters")
    for i, path in enumerate(args.adapters):
        model.load_adapters(path, name=f"a{i}")
    if len(args.adapters) == 1 and weights[0] == 1.0:
        model.set_active_adapter("a0")
    else:
        model.merge_adapters({f"a{i}": w for i, w in enumerate(weights)}, name="merged",
                             combination=args.combination, density=args.density)
        model.set_active_adapter("merged")
    model.merge_and_unload().save(args.output)
    print(f"merged model saved to {args.output}")


def cmd_generate(args):
    model = _model(args)
    if args.adapter:
        model.load_adapters(args.adapter)
    print(model.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed))


def cmd_inspect(args):
    """Each adapter folder under args.folder: its method by its own name (METHOD-9: DoRA, not PEFT's LORA), rank,
    targets, and the numbers it trains: with --model, loaded on that base and counted by parameter_counts, the
    line `train` prints."""
    from .adapters.peft_io import CONFIG_NAME, WEIGHTS_NAME, load_adapter_folder, read_adapter_config
    from .adapters.registry import method_of
    from .fileio import read_json
    from .safetensors_io import read_header
    folders = [root for root, _, files in os.walk(args.folder) if CONFIG_NAME in files]
    if not folders:
        raise MiniPeftError(f"{args.folder}: no {CONFIG_NAME} in it or below it")
    for folder in sorted(folders):
        cfg = read_json(os.path.join(folder, CONFIG_NAME), f"{folder}: no {CONFIG_NAME}")
        adapter = read_adapter_config(folder)
        flags = "".join(f", {k}" for k, v in adapter.PEFT_FLAGS.items() if v)
        header, _ = read_header(os.path.join(folder, WEIGHTS_NAME))
        counted = f"trained parameters: {sum(_numel(i.shape) for k, i in header.items() if not _shared_key(k)):,}"
        if args.model:
            model = _model(args)
            load_adapter_folder(model, folder, "default", strict=True)  # this folder's alone, not its sub-folders'
            n, total = model.parameter_counts()
            counted = f"trainable parameters: {n:,} of {total:,} ({100 * n / total:.3f}%)"
        print(f"{folder}\n  method: {method_of(adapter).title} (PEFT: {cfg.get('peft_type')}{flags})  rank: "
              f"{cfg.get('r', '-')}  alpha: {cfg.get('lora_alpha', '-')}\n  targets: {cfg.get('target_modules')}\n"
              f"  tensors: {len(header)}  {counted}")


def _shared_key(key: str) -> bool:
    """A frozen tensor the layers share (VeRA's base_model.vera_A), not a trained one."""
    return key.startswith("base_model.") and not key.startswith("base_model.model.")


def cmd_memory(args):
    from .memory import estimate
    targets = args.target_modules if args.target_modules != ["all-linear"] else "all-linear"
    est = estimate(args.model, args.method, rank=args.rank, target_modules=targets, seq=args.seq,
                   batch=args.batch, gradient_checkpointing=args.checkpointing, dtype=args.dtype,
                   compute_dtype=args.compute_dtype)
    print(f"{args.model}: {args.method}, rank {args.rank}, seq {args.seq}, batch {args.batch}, "
          f"checkpointing {'on' if args.checkpointing else 'off'}, {args.dtype}"
          f"{', compute ' + args.compute_dtype if args.method == 'qlora' else ''}")
    print(f"parameters: {est.base_params:,}  trainable: {est.trainable:,}")
    for name, n in est.rows():
        print(f"  {name:<20}{n / 1e9:10.2f} GB")


REFERENCES = ("torch", "transformers", "peft", "bitsandbytes")  # what the speed suite times minipeft against


def checkout_root() -> str:
    """The folder above the minipeft package: a source checkout's root, holding benchmarks/."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cmd_bench(args):
    """`python -m benchmarks` of the source checkout (benchmarks/ is not part of the installed package);
    the suite's exit status."""
    import importlib.util
    import subprocess
    root = checkout_root()
    if not os.path.isfile(os.path.join(root, "benchmarks", "__main__.py")):
        raise ConfigError(f"minipeft bench runs the speed suite of a source checkout, and {root} has no "
                          "benchmarks/: clone the repository and pip install -e '.[oracle,bench]' there")
    missing = [m for m in REFERENCES if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"minipeft bench times minipeft against {', '.join(missing)}, not installed: "
                          "pip install torch==2.13.0 && pip install -e '.[oracle,bench]'")
    cmd = [sys.executable, "-m", "benchmarks", *(["--quick"] if args.quick else []),
           *([] if args.threads is None else ["--threads", str(args.threads)])]
    return subprocess.run(cmd, cwd=root).returncode


def _numel(shape):
    out = 1
    for s in shape:
        out *= s
    return out


def build_parser():
    from .adapters.lora import INITS
    from .adapters.registry import METHODS
    from .optimizers import optimisers
    optimiser_names = [m.name for m in optimisers()]
    ap = argparse.ArgumentParser(prog="minipeft", description="Parameter-efficient fine-tuning you can read.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="fine-tune a model with an adapter (LoRA by default) and save it (PEFT format)")
    t.add_argument("--model", required=True, help="model folder or cached Hub repo id")
    t.add_argument("--data", required=True, help=".jsonl file of {text} or {prompt, completion} records")
    t.add_argument("--output", required=True, help="adapter folder to write")
    t.add_argument("--method", default="lora", choices=sorted(METHODS),
                   help="the adapter method (qlora loads the model in NF4 first)")
    t.add_argument("--rank", type=int, default=None, help="the method's rank (LoRA default 8)")
    t.add_argument("--alpha", type=float, default=None, help="(LoRA default 16)")
    t.add_argument("--dropout", type=float, default=None)
    t.add_argument("--target-modules", nargs="+", default=None, help="names, or all-linear (LoRA default q_proj v_proj)")
    t.add_argument("--rslora", action="store_true")
    t.add_argument("--init", default=None, choices=list(INITS), help="LoRA's initialisation (spec/lora.md LORA-1)")
    t.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="any other config field, VALUE as JSON (e.g. --set initial_rank=12 --set total_step=300)")
    t.add_argument("--optimizer", default="adamw", choices=["adamw"] + optimiser_names,
                   help="AdamW, or an adapter optimiser: LoRA+, LoRA-FA, Riemannian (spec/<name>.md)")
    t.add_argument("--optimizer-arg", action="append", metavar="OPTION=VALUE",
                   help="an option of --optimizer, VALUE as JSON (e.g. --optimizer-arg loraplus_lr_ratio=16)")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--warmup", type=int, default=0)
    t.add_argument("--save-steps", type=int, default=None)
    t.add_argument("--resume-from", default=None)
    t.add_argument("--plot", default=None, help="write the loss curve to this PNG")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=cmd_train)
    m = sub.add_parser("merge", help="merge one or more adapters into the base and save a plain HF model")
    m.add_argument("--model", required=True)
    m.add_argument("--adapters", nargs="+", required=True, help="adapter folders")
    m.add_argument("--weights", nargs="+", type=float, default=None)
    m.add_argument("--combination", default="linear",
                   choices=["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
    m.add_argument("--density", type=float, default=0.5)
    m.add_argument("--output", required=True)
    m.set_defaults(fn=cmd_merge)
    g = sub.add_parser("generate", help="generate text (greedy by default), optionally with an adapter")
    g.add_argument("--model", required=True)
    g.add_argument("--adapter", default=None)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=cmd_generate)
    i = sub.add_parser("inspect", help="list the adapters in a folder: method, rank, targets, parameters")
    i.add_argument("folder")
    i.add_argument("--model", default=None, help="base model, to print the adapters' share of its parameters")
    i.set_defaults(fn=cmd_inspect)
    me = sub.add_parser("memory", help="estimate the memory of one training step (spec/memory.md), in GB")
    me.add_argument("--model", required=True, help="config.json, or a folder holding one")
    me.add_argument("--method", default="lora", choices=["full", "lora", "qlora"])
    me.add_argument("--rank", type=int, default=8)
    me.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"], help="names, or all-linear")
    me.add_argument("--seq", type=int, default=512, help="tokens per example")
    me.add_argument("--batch", type=int, default=4)
    me.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    me.add_argument("--dtype", default="float32", choices=["float32", "float16", "float64"])
    me.add_argument("--compute-dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"],
                    help="qlora's compute dtype")
    me.set_defaults(fn=cmd_memory)
    b = sub.add_parser("bench", help="the speed suite against torch/PEFT/bitsandbytes (python -m benchmarks; "
                                     "a source checkout with the oracle and bench extras)")
    b.add_argument("--quick", action="store_true", help="tiny and small only, no long sequences")
    b.add_argument("--threads", type=int, default=None, help="threads for both sides (default: every core)")
    b.set_defaults(fn=cmd_bench)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        status = args.fn(args)
    except MiniPeftError as e:
        print(f"minipeft: error: {e}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
