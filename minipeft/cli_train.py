"""`minipeft train`: its flags, a --config file of them (JSON or YAML), and Ctrl-C (spec/cli.md CLI-1..CLI-4).

Every flag has a default shown in --help. A --config file maps flag names (`lr`, `batch_size`, or
`batch-size`) to values; flags given on the command line override it. The resolved options are written
to <output>/train_config.json, a --config file that repeats the run.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import shlex
import sys

from .errors import ConfigError, TrainingInterrupted

CONFIG_NAME = "train_config.json"  # the resolved options, next to the adapter
REQUIRED = ("model", "data", "output")  # required, on the command line or in the --config file
NOT_SAVED = ("config", "debug", "fn", "cmd", "resume_from")  # options that do not describe the run itself
LISTS = ("set", "optimizer_arg", "procedure_arg")  # FIELD=VALUE lists; a --config file may give them as {FIELD: VALUE}
DEFAULT_LR, DEFAULT_EPOCHS, DEFAULT_BATCH = 2e-3, 3, 8  # they teach the carried model `next`: README "CLI defaults"

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
    from .adapters.registry import method
    from .optimizers import optimisers
    values = field_values(args.optimizer_arg, "--optimizer-arg")
    if args.optimizer == "adamw":
        if values:
            raise ConfigError(f"--optimizer-arg needs --optimizer ({', '.join(m.name for m in optimisers())}); "
                              f"AdamW takes --lr")
        return None
    return made(method(args.optimizer).config, values, f"--optimizer {args.optimizer}", "option")


def procedure_options(args):
    """--procedure and --procedure-arg: None, or the procedure's options (minipeft/procedures)."""
    from .adapters.registry import method
    values = field_values(args.procedure_arg, "--procedure-arg")
    if args.procedure is None:
        if values:
            raise ConfigError("--procedure-arg needs --procedure NAME")
        return None
    return made(method(args.procedure).config, values, f"--procedure {args.procedure}", "option")


def procedure_hooks(args, model, options) -> tuple:
    """The --procedure's training hook on the adapted model; one that reads data (LoRA-drop) gets --data."""
    if options is None:
        return ()
    from .adapters.registry import method
    hook = method(args.procedure).hook
    extra = {"data": args.data, "max_length": args.max_length} if getattr(hook, "NEEDS_DATA", False) else {}
    return (hook(model, options, **extra),)


def made(cls, values: dict, where: str, what: str):
    """cls(**values), after saying which of the values' names cls has no field for, and which it has."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{where} has no {what} {', '.join(unknown)}; its {what}s: {', '.join(sorted(fields))}")
    return cls(**values)


def method_config(args):
    """The --method's config from the flags that name its fields (--rank, --alpha, ...) and --set FIELD=VALUE
    (VALUE read as JSON where it parses, else as a string); unset flags leave the config's defaults."""
    from .adapters.registry import METHODS
    given = {"rank": args.rank, "alpha": args.alpha, "dropout": args.dropout, "init": args.init,
             "use_rslora": args.rslora or None,
             "target_modules": None if args.target_modules is None else
             ("all-linear" if args.target_modules == ["all-linear"] else tuple(args.target_modules))}
    kwargs = {k: v for k, v in given.items() if v is not None}
    kwargs.update(field_values(args.set, "--set"))
    return made(METHODS[args.method], kwargs, f"--method {args.method}", "field")


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


def cmd_train(args):
    from .adapters.data_init import init_batches
    from .adapters.registry import method
    from .model import load_model
    from .quant import QuantizationConfig
    from .train import TrainingConfig
    args = resolve(args)
    cfg = method_config(args)
    optimizer = optimizer_options(args)  # checked before the model is loaded
    procedure = procedure_options(args)
    train_cfg = TrainingConfig(
        learning_rate=args.lr, batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        epochs=args.epochs, max_steps=args.max_steps, warmup_steps=args.warmup, schedule=args.schedule,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, seed=args.seed,
        max_length=args.max_length, eval_data=args.eval_data, eval_steps=args.eval_steps,
        output_dir=args.output, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        load_best_model_at_end=args.load_best, early_stopping_patience=args.early_stopping_patience,
        early_stopping_threshold=args.early_stopping_threshold, resume_from=args.resume_from,
        plot_path=args.plot, optimizer=optimizer)
    model = load_model(args.model, quantization=QuantizationConfig(compute_dtype="float32")
                       if method(args.method).quantized_base else None)
    data = init_batches(model, args.data, args.batch_size, args.max_length) if getattr(cfg, "NEEDS_DATA", False) \
        else None  # METHOD-11: a data-driven initialiser reads the training data, in batches of --batch-size
    model.apply_adapter(cfg, data=data)
    train_cfg = dataclasses.replace(train_cfg, hooks=procedure_hooks(args, model, procedure))
    trainable, total = model.parameter_counts()
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    try:
        hist = model.train(args.data, train_cfg)
    except TrainingInterrupted as e:
        print(f"minipeft: interrupted after step {e.step}; checkpoint saved to {e.checkpoint}\n"
              f"resume with: {resume_command(args._argv, args.output)}", file=sys.stderr)
        return 130
    finally:
        if os.path.isdir(args.output):  # training began (a refused run writes nothing)
            from .fileio import atomic_write_json
            atomic_write_json(os.path.join(args.output, CONFIG_NAME), {
                k: v for k, v in sorted(vars(args).items()) if k not in NOT_SAVED and not k.startswith("_")})
    model.save_adapters(args.output)
    evals = f"; eval loss {hist['eval_loss'][-1][1]:.4f}" if hist["eval_loss"] else ""
    best = f"; best checkpoint {hist['best_checkpoint']} loaded" if "best_checkpoint" in hist else ""
    print(f"final loss {hist['loss'][-1]:.4f}{evals}{best}; adapter saved to {args.output}")


def resume_command(argv: list, output: str) -> str:
    """CLI-3: the command line that continues the run from output's latest checkpoint."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume-from":
            skip = True
        elif not a.startswith("--resume-from="):
            out.append(a)
    return shlex.join(["minipeft", "train", *out, "--resume-from", output])


def read_config_file(path: str) -> dict:
    """A --config file: a JSON object, or YAML (needs pyyaml) when the name ends in .yaml or .yml."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:
            raise ConfigError(f"--config {path}: a YAML file needs pyyaml (pip install pyyaml), or write it as "
                              f"JSON") from e
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML: {e}") from e
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config {path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: the file must hold one mapping of option names to values")
    return values


def resolve(args):
    """CLI-2: the --config file's values under the command line's; the required options checked after both."""
    parser = args._parser
    if args.config:
        values = read_config_file(args.config)
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", "debug")}
        given = {}
        for key, v in values.items():
            dest = key.lstrip("-").replace("-", "_")
            if dest not in actions:
                near = difflib.get_close_matches(dest, list(actions), n=3)
                raise ConfigError(f"--config {args.config}: unknown option {key!r}"
                                  f"{'; did you mean ' + ', '.join(near) + '?' if near else ''} "
                                  f"(the options are minipeft train's flags: see minipeft train --help)")
            given[dest] = _config_value(args.config, key, v, actions[dest])
        parser.set_defaults(**given)
        argv = args._argv
        args = parser.parse_args(argv)  # the command line overrides the file
        args._argv = argv
    missing = [f"--{d}" for d in REQUIRED if getattr(args, d) is None]
    if missing:
        raise ConfigError(f"minipeft train needs {' and '.join(missing)} (on the command line, or in a --config "
                          f"file)")
    return args


def _config_value(path, key, v, action):
    """A --config value checked as its flag would check it."""
    if action.dest in LISTS and isinstance(v, dict):
        return [f"{k}={json.dumps(x)}" for k, x in v.items()]
    if action.nargs == "+" and isinstance(v, str):
        return [v]
    kind = action.type
    if isinstance(v, str) and kind is not None:
        try:
            v = kind(v)
        except ValueError as e:
            raise ConfigError(f"--config {path}: {key}={v!r} is not a {kind.__name__}") from e
    if kind in (int, float) and v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or
                                                   kind is int and not isinstance(v, int)):
        raise ConfigError(f"--config {path}: {key}={v!r} must be a{'n' if kind is int else ''} {kind.__name__}")
    if action.choices is not None and v is not None and v not in action.choices:
        raise ConfigError(f"--config {path}: {key}={v!r}; choose one of {', '.join(map(str, action.choices))}")
    return v


def add_train_parser(sub, parents=()) -> None:
    from .adapters.lora import INITS
    from .adapters.registry import METHODS, methods
    from .optimizers import optimisers
    t = sub.add_parser("train", help="fine-tune a model with an adapter (LoRA by default) and save it (PEFT format)",
                       parents=list(parents), formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Fine-tune with an adapter. Ctrl-C saves a checkpoint and prints the command "
                                   "that resumes.")
    t.add_argument("--config", default=None, help="a JSON or YAML file of these options (flag names as keys); "
                                                   "flags given here override it")
    t.add_argument("--model", default=None, help="model folder or cached Hub repo id (required)")
    t.add_argument("--data", default=None, help=".jsonl file of {text} or {prompt, completion} records (required)")
    t.add_argument("--output", default=None, help="adapter folder to write; checkpoints and log.jsonl go there too "
                                                  "(required)")
    t.add_argument("--eval-data", default=None, help=".jsonl file to evaluate on (eval loss on the bar and in the log)")
    t.add_argument("--method", default="lora", choices=sorted(METHODS),
                   help="the adapter method (qlora loads the model in NF4 first)")
    t.add_argument("--rank", type=int, default=None, help="the method's rank (None: the method's default; LoRA 8)")
    t.add_argument("--alpha", type=float, default=None, help="LoRA's alpha (None: the method's default; LoRA 16)")
    t.add_argument("--dropout", type=float, default=None, help="adapter dropout (None: the method's default)")
    t.add_argument("--target-modules", nargs="+", default=None,
                   help="module names, or all-linear (None: the method's default; LoRA q_proj v_proj)")
    t.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r)")
    t.add_argument("--init", default=None, choices=list(INITS), help="LoRA's initialisation (spec/lora.md LORA-1)")
    t.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="any other config field, VALUE as JSON (e.g. --set initial_rank=12 --set total_step=300)")
    t.add_argument("--optimizer", default="adamw", choices=["adamw"] + [m.name for m in optimisers()],
                   help="AdamW, or an adapter optimiser: LoRA+, LoRA-FA, Riemannian (spec/<name>.md)")
    t.add_argument("--optimizer-arg", action="append", metavar="OPTION=VALUE",
                   help="an option of --optimizer, VALUE as JSON (e.g. --optimizer-arg loraplus_lr_ratio=16)")
    t.add_argument("--procedure", default=None, choices=[m.name for m in methods() if m.kind == "procedure"],
                   help="a training procedure over the LoRA adapter (ReLoRA, DyLoRA, LoRA-drop, ...; spec/<name>.md)")
    t.add_argument("--procedure-arg", action="append", metavar="OPTION=VALUE",
                   help="an option of --procedure, VALUE as JSON (e.g. --procedure-arg warmup_steps=20)")
    t.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate")
    t.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"],
                   help="learning-rate decay after the warmup")
    t.add_argument("--warmup", type=int, default=0, help="warmup steps")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradients' global norm (0: no clipping)")
    t.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="examples per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="passes over --data")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (overrides "
                                                               "--epochs)")
    t.add_argument("--max-length", type=int, default=None, help="truncate examples to this many tokens (None: an "
                                                                "example longer than the context is an error)")
    t.add_argument("--eval-steps", type=int, default=None, help="evaluate every N steps (None: at each epoch's end)")
    t.add_argument("--save-steps", type=int, default=None, help="a checkpoint every N steps (None: 500), and one "
                                                                "at the end")
    t.add_argument("--save-total-limit", type=int, default=2, help="keep the newest N checkpoints (and the best "
                                                                   "with --load-best)")
    t.add_argument("--load-best", action="store_true", help="load the checkpoint with the lowest eval loss at the "
                                                            "end (needs --eval-data, --eval-steps)")
    t.add_argument("--early-stopping-patience", type=int, default=None,
                   help="stop after N evaluations without improvement (needs --eval-data)")
    t.add_argument("--early-stopping-threshold", type=float, default=0.0,
                   help="an improvement is an eval loss lower than the best by more than this")
    t.add_argument("--resume-from", default=None, help="a checkpoint folder, or an output folder (its latest "
                                                       "checkpoint)")
    t.add_argument("--plot", default=None, help="write the loss curve to this PNG (needs matplotlib)")
    t.add_argument("--seed", type=int, default=0, help="seed of the data order and dropout")
    t.set_defaults(fn=cmd_train, _parser=t)
