"""`minipeft audit <command>` (spec/audit.md AUDIT-1): each command prints its report (text, or --json) and
exits 0 when verified, 1 on a finding that breaks the claim, 2 on bad input (a one-line error, CLI-4)."""
from __future__ import annotations

import argparse

from ..adapters.combine import COMBINATIONS


def add_audit_parser(sub, parents):
    a = sub.add_parser("audit", parents=parents, help="verify and explain adapters and merged checkpoints: "
                       "exit 0 verified, 1 a finding, 2 bad input (spec/audit.md)")
    commands = a.add_subparsers(dest="audit_cmd", required=True)
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="print the report as JSON")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    out.add_argument("--html", metavar="FILE", default=None, help="also write the report as one self-contained HTML "
                     "file, with plots when matplotlib is installed")

    def command(name, help):
        return commands.add_parser(name, help=help, parents=[*parents, out],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = command("merged", "is MERGED = BASE + ADAPTER? every tensor recomputed by the method's own merge")
    m.add_argument("base", help="base model folder (or cached Hub id)")
    m.add_argument("adapter", help="adapter folder (PEFT's layout)")
    m.add_argument("merged", help="merged model folder")
    m.add_argument("--tol", type=float, default=1e-5, help="allowed |M - E| per value, times (1 + |E|), beyond the "
                                                          "stored dtype's rounding")
    m.set_defaults(fn=cmd_merged)
    d = command("adapter", "per layer dW: norms, singular values, stable and effective rank, scale; checks the "
                "file against its config")
    d.add_argument("adapter", help="adapter folder (PEFT's layout)")
    d.add_argument("--base", default=None, help="base model folder (default: the config's base_model_name_or_path; "
                   "a plain LoRA needs none)")
    d.add_argument("--intruder-k", type=int, default=10, help="intruder dimensions are counted among the top k "
                   "singular vectors of W0 + dW (with a base; 0: not counted)")
    d.add_argument("--intruder-epsilon", type=float, default=0.5, help="a singular vector is an intruder when its "
                   "|cos| with every singular vector of W0 is below this")
    d.add_argument("--reduce-intruders", metavar="OUT", default=None, help="write to OUT this LoRA with each "
                   "layer's intruder dimensions scaled by --mitigation-lambda (PEFT's reduce_intruder_dimension; "
                   "needs the base)")
    d.add_argument("--mitigation-lambda", type=float, default=0.75, help="the part of each intruder dimension kept "
                   "by --reduce-intruders")
    d.set_defaults(fn=cmd_adapter)
    f = command("diff", "how alike are adapters A and B? per layer: cosine of dW, principal angles between the "
                "column and row spaces, norm ratio; a summary")
    f.add_argument("a", help="adapter folder A (PEFT's layout)")
    f.add_argument("b", help="adapter folder B")
    f.add_argument("--base", default=None, help="base model folder for both (default: each config's "
                   "base_model_name_or_path; a plain LoRA needs none)")
    f.set_defaults(fn=cmd_diff)
    c = command("combine", "is COMBINED the weighted combination --type of the --adapters? (minipeft's "
                "merge_adapters or PEFT's add_weighted_adapter), layer by layer against the type's definition")
    c.add_argument("--adapters", nargs="+", required=True, help="the source adapter folders, in order")
    c.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per source")
    c.add_argument("--type", required=True, dest="combination", choices=COMBINATIONS, help="the combination type")
    c.add_argument("--combined", required=True, help="the combined adapter folder")
    c.add_argument("--density", type=float, default=None, help="the density of ties / dare / magnitude_prune types")
    c.add_argument("--majority-sign-method", default="total", choices=("total", "frequency"))
    c.add_argument("--base", default=None, help="base model folder (default: each config's base_model_name_or_path; "
                   "plain LoRAs need none)")
    c.add_argument("--tol", type=float, default=1e-5, help="allowed relative Frobenius error")
    c.add_argument("--svd-clamp", type=float, default=None, help="the *svd types' clamp quantile it was combined with "
                   "(merge_adapters' svd_clamp, PEFT's add_weighted_adapter svd_clamp)")
    c.set_defaults(fn=cmd_combine)
    v = command("convert", "write ADAPTER (any mergeable method) as a plain LoRA of rank K, each layer's dW by "
                "truncated SVD (PEFT's convert_to_lora / save_as_lora), with each layer's relative error")
    v.add_argument("adapter", help="adapter folder (PEFT's layout)")
    v.add_argument("out", help="folder to write the LoRA to")
    v.add_argument("--rank", required=True, type=rank_arg, help="an integer: the rank of every layer; a number in "
                   "(0, 1) or 1.0: per layer the smallest rank whose singular values keep that share of ||dW||_F^2")
    v.add_argument("--base", default=None, help="base model folder (default: the config's base_model_name_or_path; "
                   "a plain LoRA needs none)")
    v.set_defaults(fn=cmd_convert)
    return a


def rank_arg(text: str):
    """--rank: '8' is a rank, '0.9' or '1.0' an energy share (PEFT: an int is a rank, a float a threshold)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither a rank (an integer) nor an energy share "
                                             "(a number in (0, 1])") from None


def show(report, args) -> int:
    print(report.to_json() if args.json else report.text())
    if args.html:
        from .html import write_html
        write_html(report, args.html)
    return report.status


def cmd_merged(args):
    from .merged import audit_merged
    return show(audit_merged(args.base, args.adapter, args.merged, tol=args.tol, show_progress=not args.no_progress),
                args)


def cmd_adapter(args):
    from .adapter import audit_adapter
    return show(audit_adapter(args.adapter, args.base, show_progress=not args.no_progress, intruder_k=args.intruder_k,
                              intruder_epsilon=args.intruder_epsilon, reduce_intruders=args.reduce_intruders,
                              mitigation_lambda=args.mitigation_lambda), args)


def cmd_diff(args):
    from .diff import audit_diff
    return show(audit_diff(args.a, args.b, args.base, show_progress=not args.no_progress), args)


def cmd_combine(args):
    from .combine import audit_combine
    return show(audit_combine(args.adapters, args.weights, args.combination, args.combined, args.base, args.density,
                              args.majority_sign_method, args.tol, show_progress=not args.no_progress,
                              svd_clamp=args.svd_clamp), args)


def cmd_convert(args):
    from .convert import audit_convert
    return show(audit_convert(args.adapter, args.rank, args.out, args.base, show_progress=not args.no_progress), args)
