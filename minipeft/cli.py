"""The `minipeft` command: train, eval, merge, generate, serve, inspect, audit, memory, bench (each with --help)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .audit.cli import add_audit_parser
from .cli_train import add_train_parser
from .errors import ConfigError, MiniPeftError


def _model(args):
    from .model import load_model
    return load_model(args.model)


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


def cmd_serve(args):
    """SERVING-7: the requests of a .jsonl file served in one batch from one AdapterPool; one JSON line each."""
    from .data import read_records
    from .serving import AdapterPool, Request
    model = _model(args)
    pool = AdapterPool(model, pages=args.pages)
    names = [pool.add(folder) for folder in args.adapters]
    requests = []
    for i, r in enumerate(read_records(args.requests)):
        if not isinstance(r, dict) or "prompt" not in r or r.get("adapter") not in names + [None]:
            raise ConfigError(f"{args.requests}: request {i} must be {{\"prompt\", \"adapter\", \"max_new_tokens\"}} "
                              f"with adapter one of {names} or null; got {str(r)[:80]}")
        prompt = r["prompt"]
        if isinstance(prompt, str):
            if model.tokenizer is None:
                raise ConfigError(f"{args.requests}: request {i} is text, and the model has no tokenizer.json: "
                                  "give token ids")
            prompt = model.tokenizer.encode(prompt)
        requests.append(Request(prompt, r.get("adapter"), int(r.get("max_new_tokens", args.max_new_tokens))))
    for req, out in zip(requests, pool.generate(requests, max_batch=args.max_batch)):
        new = [int(t) for t in out[len(req.prompt):]]
        line = {"adapter": req.adapter, "tokens": new}
        if model.tokenizer is not None:
            line["completion"] = model.tokenizer.decode(new)
        print(json.dumps(line))


def cmd_eval(args):
    """The held-out loss (and perplexity) of a model, with an adapter or not, over a .jsonl file; with
    --exact-match also the share of {prompt, completion} records whose greedy completion is exact."""
    import math
    from .data import read_records
    from .train import evaluate_data
    model = _model(args)
    if args.adapter:
        model.load_adapters(args.adapter)
    loss, n = evaluate_data(model, args.data, args.batch_size, args.max_length)
    print(f"eval loss {loss:.4f} (perplexity {math.exp(min(loss, 700)):.3f}) over {n:,} target tokens")
    if args.exact_match:
        records = list(read_records(args.data))
        if not all(isinstance(r, dict) and {"prompt", "completion"} <= set(r) for r in records):
            raise ConfigError(f"--exact-match needs {{prompt, completion}} records in {args.data}")
        right = sum(model.generate(r["prompt"], max_new_tokens=args.max_new_tokens).strip() == r["completion"].strip()
                    for r in records)
        print(f"exact match {right / len(records):.1%} ({right} of {len(records)})")


def cmd_inspect(args):
    """Each adapter folder under args.folder: its method by its own name (METHOD-9: DoRA, not PEFT's LORA), rank,
    targets, and the numbers it trains: loaded on its base (--model, else the config's base_model_name_or_path when
    that is a folder here) and counted by parameter_counts, the line `train` prints. Without a base the file alone
    cannot tell trained tensors from saved frozen ones (VeRA's projections, RandLoRA's bases, SuperTuning's
    positions), so only the numbers saved are printed."""
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
        flags = "".join(f", {k}" if cfg.get(k) is True or isinstance(cfg.get(k), dict)  # the file's value (aLoRA's
                        else f", {k}={cfg.get(k)}" for k, v in adapter.PEFT_FLAGS.items() if v)  # tokens), not a dict's

        header, _ = read_header(os.path.join(folder, WEIGHTS_NAME))
        counted = (f"numbers saved: {sum(_numel(i.shape) for i in header.values()):,} (which of them train needs the "
                   "base: pass --model BASE)")
        base = args.model or (cfg.get("base_model_name_or_path") if os.path.isdir(
            str(cfg.get("base_model_name_or_path") or "")) else None)
        if base:
            from .model import load_model
            model = load_model(base)
            load_adapter_folder(model, folder, "default", strict=True)  # this folder's alone, not its sub-folders'
            n, total = model.parameter_counts()
            counted = f"trainable parameters: {n:,} of {total:,} ({100 * n / total:.3f}%)"
        print(f"{folder}\n  method: {method_of(adapter).title} (PEFT: {cfg.get('peft_type')}{flags})  rank: "
              f"{cfg.get('r', '-')}  alpha: {cfg.get('lora_alpha', '-')}\n  targets: {cfg.get('target_modules')}\n"
              f"  tensors: {len(header)}  {counted}")


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
    ap = argparse.ArgumentParser(prog="minipeft", description="Parameter-efficient fine-tuning you can read.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_train_parser(sub, parents=[common])

    def command(name, help):  # every subcommand: --debug, and its defaults shown in --help (CLI-1)
        return sub.add_parser(name, help=help, parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = command("merge", "merge one or more adapters into the base and save a plain HF model")
    m.add_argument("--model", required=True)
    m.add_argument("--adapters", nargs="+", required=True, help="adapter folders")
    m.add_argument("--weights", nargs="+", type=float, default=None)
    m.add_argument("--combination", default="linear",
                   choices=["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
    m.add_argument("--density", type=float, default=0.5)
    m.add_argument("--output", required=True)
    m.set_defaults(fn=cmd_merge)
    g = command("generate", "generate text (greedy by default), optionally with an adapter")
    g.add_argument("--model", required=True)
    g.add_argument("--adapter", default=None)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=cmd_generate)
    sv = command("serve", "serve a .jsonl file of requests, each with its own LoRA adapter, in one batch from one "
                          "adapter pool (spec/serving.md)")
    sv.add_argument("--model", required=True, help="base model folder or cached Hub repo id")
    sv.add_argument("--adapters", nargs="+", required=True, help="PEFT LoRA folders; a request names one by its "
                                                                 "folder's name")
    sv.add_argument("--requests", required=True, help='.jsonl file of {"prompt": text or ids, "adapter": name or '
                                                      'null, "max_new_tokens": n} records')
    sv.add_argument("--pages", type=int, default=1024, help="pages (rank rows) of each width in the pool")
    sv.add_argument("--max-new-tokens", type=int, default=32, help="for requests that give none")
    sv.add_argument("--max-batch", type=int, default=None, help="requests generated at once (waiting ones join as "
                                                                "others finish); default: all")
    sv.set_defaults(fn=cmd_serve)
    e = command("eval", "held-out loss of a model (with an adapter or not) on a .jsonl file, and exact match")
    e.add_argument("--model", required=True, help="model folder or cached Hub repo id")
    e.add_argument("--adapter", default=None, help="adapter folder to load first")
    e.add_argument("--data", required=True, help=".jsonl file of {text} or {prompt, completion} records")
    e.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    e.add_argument("--max-length", type=int, default=None, help="truncate examples to this many tokens")
    e.add_argument("--exact-match", action="store_true", help="also generate each completion greedily and count "
                                                              "the exact ones")
    e.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per prompt for --exact-match")
    e.set_defaults(fn=cmd_eval)
    i = command("inspect", "list the adapters in a folder: method, rank, targets, parameters")
    i.add_argument("folder")
    i.add_argument("--model", default=None, help="base model, to count the trainable parameters and their share "
                   "(default: the config's base_model_name_or_path when that folder exists)")
    i.set_defaults(fn=cmd_inspect)
    add_audit_parser(sub, parents=[common])
    me = command("memory", "estimate the memory of one training step (spec/memory.md), in GB")
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
    b = command("bench", "the speed suite against torch/PEFT/bitsandbytes (python -m benchmarks; "
                                     "a source checkout with the oracle and bench extras)")
    b.add_argument("--quick", action="store_true", help="tiny and small only, no long sequences")
    b.add_argument("--threads", type=int, default=None, help="threads for both sides (default: every core)")
    b.set_defaults(fn=cmd_bench)
    return ap


def main(argv=None):
    """CLI-4: every error is one line on stderr and a non-zero status (2: a minipeft error, 1: any other,
    130: Ctrl-C); --debug shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args._argv = argv[argv.index(args.cmd) + 1:]  # the subcommand's own arguments
    try:
        status = args.fn(args)
    except MiniPeftError as e:
        if args.debug:
            raise
        print(f"minipeft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("minipeft: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - CLI-4: one line, the traceback only with --debug
        if args.debug:
            raise
        print(f"minipeft: error: {type(e).__name__}: {e} (run again with --debug for the traceback)", file=sys.stderr)
        return 1
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
