"""`minipeft audit merged` and `audit adapter` on a large random llama: wall time and peak RSS against the size of
the checkpoint (issue 20: an audit streams a tensor at a time, so its peak memory must stay well under the model's).

The base is bench_step's random llama of --size (0.5b: Qwen2.5-0.5B's shape, float32, untied head); a LoRA of
--rank on every linear layer with random factors and its merge (minipeft's merge_and_unload().save()) are
written once by a child process into /tmp/minipeft-bench-audit-<size>-r<rank> (a temporary folder renamed into
place). Each audit then runs in a fresh child process, whose own peak RSS (VmHWM) is reported.

    python benchmarks/bench_audit.py                # 0.5b, rank 16
    python benchmarks/bench_audit.py --size small   # a quick run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from bench_step import SIZES, checkpoint_folder  # noqa: E402
from peak_memory import peak_rss_mb  # noqa: E402


def folder_mb(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith(".safetensors")) / 2 ** 20


def make_files(base: str, out: str, rank: int) -> None:
    """out/adapter (a LoRA of `rank` on every linear layer, factors drawn N(0, 0.02)) and out/merged."""
    import numpy as np

    import minipeft as mp
    model = mp.load_model(base)
    model.apply_lora(rank=rank, alpha=2 * rank, target_modules="all-linear")
    rng = np.random.default_rng(0)
    for _, p in model.net.named_parameters():
        if p.requires_grad:
            p.data = (rng.standard_normal(p.shape) * 0.02).astype(np.float32)
    model.save_adapters(os.path.join(out, "adapter"))
    model.merge_and_unload().save(os.path.join(out, "merged"))


def files_folder(size: str, rank: int) -> tuple[str, str]:
    base = checkpoint_folder(size)
    folder = os.path.join("/tmp", f"minipeft-bench-audit-{size}-r{rank}")
    if not os.path.isdir(folder):
        tmp = f"{folder}.tmp{os.getpid()}"
        subprocess.run([sys.executable, __file__, "--make", base, tmp, "--rank", str(rank)], check=True)
        os.replace(tmp, folder)
    return base, folder


def child(command: str, base: str, folder: str) -> dict:
    from minipeft.audit import audit_adapter, audit_merged
    start = time.perf_counter()
    if command == "merged":
        report = audit_merged(base, os.path.join(folder, "adapter"), os.path.join(folder, "merged"), show_progress=False)
    else:
        report = audit_adapter(os.path.join(folder, "adapter"), base, show_progress=False)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "status": report.status,
            "findings": len(report.findings)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.5b", choices=SIZES)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--commands", nargs="+", default=["merged", "adapter"], choices=["merged", "adapter"])
    ap.add_argument("--json", default=None, help="also write the table here")
    ap.add_argument("--make", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        return make_files(*args.make, args.rank)
    if args.child:
        return print(json.dumps(child(*args.child)))
    base, folder = files_folder(args.size, args.rank)
    sizes = {"base": folder_mb(base), "merged": folder_mb(os.path.join(folder, "merged")),
             "adapter": folder_mb(os.path.join(folder, "adapter"))}
    print(f"size={args.size} rank={args.rank}: base {sizes['base']:.0f} MB, merged {sizes['merged']:.0f} MB, "
          f"adapter {sizes['adapter']:.1f} MB (float32 safetensors)")
    print(f"{'command':16} {'seconds':>8} {'peak RSS MB':>12} {'RSS / model':>12} {'status':>6}")
    rows = []
    for command in args.commands:
        out = subprocess.run([sys.executable, __file__, "--child", command, base, folder], capture_output=True,
                             text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        r.update(command=f"audit {command}", model_mb=sizes["base"], ratio=r["peak_rss_mb"] / sizes["base"])
        rows.append(r)
        print(f"{r['command']:16} {r['seconds']:8.1f} {r['peak_rss_mb']:12.0f} {r['ratio']:12.3f} {r['status']:>6}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "rank": args.rank, "sizes_mb": sizes, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
