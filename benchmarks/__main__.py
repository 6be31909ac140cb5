"""The speed suite (issue 6): every case against its reference in one run, a table, JSON and a chart.

    python -m benchmarks                 # about 2.5 minutes on 2 cores
    python -m benchmarks --quick         # tiny and small only, no long sequences
    python -m benchmarks --threads 1

Cases (each minipeft and reference pair runs in fresh processes with the same threads, warm-up first):
  step-<size>-lora    LoRA r=8 on q_proj, v_proj: forward, backward, AdamW (PEFT on torch)   target <= 1.0
  step-small-fullft   full fine-tuning step (torch)
  step-<size>-qlora   NF4 base + LoRA (PEFT over bitsandbytes' 4-bit base on the CPU)
  generate-<size>     greedy, KV cache, 64 new tokens, batch 1 (transformers generate)        target tokens/s >= 1.0x
  nf4 (de)quantize    4096 x 4096 float32, with and without double quantization (bitsandbytes) target <= 1.0
  memory-<size>-<case> peak RSS of each training case against its reference's               LoRA target <= 1.0
  curve               LoRA step time at small size as the sequence doubles from 64 to 2048, and as the
                      model grows (the step-<size>-lora rows); both plotted
  threads-<size>-<case>-t<n>  the small (and medium) LoRA and full fine-tuning steps at 1, 2 and all threads:
                      the ratio at each, and each side's speed-up over its own one-thread time
  step-0.5b-lora      Qwen2.5-0.5B's shape as a llama, seq 256, batch 1, two timed steps (not in --quick)

Ratios are minipeft / reference of the fastest run (time: below 1 is faster; tokens/s: above 1 is
faster). The table, the machine and the command go to benchmarks/results/latest.json, the chart to
benchmarks/results/latest.png (needs matplotlib); a --quick run writes latest-quick.json and .png.
`minipeft bench [--quick] [--threads N]` runs this suite from the command line.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

from minipeft.fileio import atomic_write, atomic_write_json

HERE = os.path.dirname(os.path.abspath(__file__))
# every step-, threads- and curve- row has the target 1.0 (below); these are the other rows that have one
TARGETS = {"quantize": 1.0, "dequantize": 1.0, "quantize +dq": 1.0, "dequantize +dq": 1.0, "memory-small-lora": 1.0,
           "memory-medium-lora": 1.0}
FASTER_IS_HIGHER = ("generate",)


def script(name, args, threads):
    """Run benchmarks/<name>.py with --json; its rows."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.json")
        cmd = [sys.executable, os.path.join(HERE, f"{name}.py"), *args, "--threads", str(threads), "--json", out]
        print("  $ python benchmarks/" + " ".join([f"{name}.py", *args]), file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            data = json.load(f)
    return data["rows"] if "rows" in data else [data]


def thread_curve(sizes, threads: int) -> list[dict]:
    """The LoRA and full fine-tuning steps at 1, 2 and `threads` threads; speedup = own 1-thread time / time."""
    rows = []
    for size in sizes:
        ones = {}
        for n in sorted({1, min(2, threads), threads}):
            for r in script("bench_step", ["--size", size, "--cases", "lora", "fullft", "--repeats", "5"], n):
                ones.setdefault(r["case"], r)
                one = ones[r["case"]]
                rows.append(dict(r, case=f"threads-{size}-{r['case']}-t{n}", threads=n, minipeft=r["minipeft_seconds"],
                                 reference=r["torch_seconds"], unit="s",
                                 minipeft_speedup=one["minipeft_seconds"] / r["minipeft_seconds"],
                                 reference_speedup=one["torch_seconds"] / r["torch_seconds"]))
    return rows


def suite(quick: bool, threads: int) -> list[dict]:
    rows = []
    sizes = ["tiny", "small"] if quick else ["tiny", "small", "medium"]
    for size in sizes:
        cases = {"tiny": ["lora"], "small": ["lora", "fullft", "qlora"], "medium": ["lora", "qlora"]}[size]
        for r in script("bench_step", ["--size", size, "--cases", *cases, "--repeats", "5" if size == "medium" else "7"],
                        threads):
            rows.append(dict(r, case=f"step-{size}-{r['case']}", minipeft=r["minipeft_seconds"],
                             reference=r["torch_seconds"], unit="s"))
            rows.append({"case": f"memory-{size}-{r['case']}", "minipeft": r["minipeft_peak_rss_mb"],
                         "reference": r["torch_peak_rss_mb"], "unit": "MB RSS",
                         "ratio": r["minipeft_peak_rss_mb"] / r["torch_peak_rss_mb"]})
    for size in sizes[1:]:
        for r in script("bench_generate", ["--size", size], threads):
            rows.append(dict(r, minipeft=r["minipeft_tokens_per_s"], reference=r["transformers_tokens_per_s"],
                             unit="tok/s"))
    for r in script("bench_nf4", [] if not quick else ["--rows", "2048", "--cols", "2048"], threads):
        rows.append(dict(r, minipeft=r["minipeft_s"], reference=r["bnb_s"], unit="s"))
    if not quick:
        for r in script("bench_step", ["--size", "0.5b", "--cases", "lora", "--seq", "256", "--batch", "1",
                                       "--repeats", "2"], threads):
            rows.append(dict(r, case="step-0.5b-lora", minipeft=r["minipeft_seconds"], reference=r["torch_seconds"],
                             unit="s"))
    rows += thread_curve(sizes[1:], threads)
    for seq in [64, 128, 256] if quick else [64, 128, 256, 512, 1024, 2048]:
        for r in script("bench_step", ["--size", "small", "--cases", "lora", "--seq", str(seq), "--repeats", "5"],
                        threads):
            rows.append(dict(r, case=f"curve-seq{seq}", seq=seq, minipeft=r["minipeft_seconds"],
                             reference=r["torch_seconds"], unit="s"))
    for r in rows:
        target = TARGETS.get(r["case"], 1.0 if r["case"].startswith(FASTER_IS_HIGHER + ("threads-", "curve-", "step-"))
                             else None)
        r["target"] = target
        if target is not None:
            r["met"] = r["ratio"] >= target if r["case"].startswith(FASTER_IS_HIGHER) else r["ratio"] <= target
    return rows


def table(rows) -> str:
    lines = ["| case | minipeft | reference | unit | ratio | target | met |", "|---|--:|--:|---|--:|--:|---|"]
    for r in rows:
        target = "-" if r["target"] is None else (">= " if r["case"].startswith(FASTER_IS_HIGHER) else "<= ") + \
            f"{r['target']:g}"
        met = {True: "yes", False: "no"}.get(r.get("met"), "-")
        lines.append(f"| {r['case']} | {r['minipeft']:.4g} | {r['reference']:.4g} | {r['unit']} | {r['ratio']:.2f} | "
                     f"{target} | {met} |")
    return "\n".join(lines)


def chart(rows, path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(17, 4.5))
    main = [r for r in rows if not r["case"].startswith("curve")]
    colors = ["tab:green" if r.get("met") else ("tab:red" if r.get("met") is False else "tab:gray") for r in main]
    a.barh([r["case"] for r in main], [r["ratio"] for r in main], color=colors)
    a.axvline(1.0, color="black", lw=1)
    a.set_xlabel("minipeft / reference (time and memory: lower is better; tok/s: higher)")
    a.invert_yaxis()
    curve = [r for r in rows if r["case"].startswith("curve")]
    b.plot([r["seq"] for r in curve], [r["minipeft"] for r in curve], "o-", label="minipeft")
    b.plot([r["seq"] for r in curve], [r["reference"] for r in curve], "s-", label="PEFT (torch)")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("sequence length (small llama, LoRA step, batch 4)")
    b.set_ylabel("seconds per step")
    b.legend()
    grow = [r for r in rows if r["case"].startswith("step-") and r["case"].endswith("-lora")]
    names = [r["case"].split("-")[1] for r in grow]
    c.plot(names, [r["minipeft"] for r in grow], "o-", label="minipeft")
    c.plot(names, [r["reference"] for r in grow], "s-", label="PEFT (torch)")
    c.set_yscale("log")
    c.set_xlabel("model (tiny: hidden 64, 2 layers; small: 256, 4; medium: 512, 8)")
    c.set_ylabel("seconds per LoRA step")
    c.legend()
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    return True


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0] if names else platform.processor() or "unknown CPU"
    except OSError:
        return platform.processor() or "unknown CPU"


def machine(threads: int) -> dict:
    """The host a run measured: CPU, cores, the BLAS under NumPy and under torch (asked in a child, so this
    process never imports torch), threads."""
    from minipeft import backend
    torch_blas = subprocess.run([sys.executable, "-c", "import re, torch; c = torch.__config__.show(); print("
                                 "re.search(r'BLAS_INFO=(\\w+)', c).group(1), '|', "
                                 "re.search(r'CPU capability usage: (\\S+)', c).group(1))"],
                                capture_output=True, text=True).stdout.strip() or "torch not found"
    m = dict(cpu=cpu_model(), arch=platform.machine(), cores=os.cpu_count(), python=platform.python_version(),
             numpy_blas=backend.host_blas(), torch_blas=torch_blas, threads=threads)
    m["summary"] = (f"{m['cpu']} ({m['arch']}), {m['cores']} cores, threads {threads}, Python {m['python']}, "
                    f"NumPy on {m['numpy_blas']}, torch on {torch_blas}")
    return m


def main():
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    rows = suite(args.quick, args.threads)
    m = machine(args.threads)
    print(f"{datetime.date.today()} on {m['summary']}: python -m benchmarks{' --quick' if args.quick else ''}\n")
    print(table(rows))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "latest-quick" if args.quick else "latest")  # a quick run keeps the full table
    atomic_write_json(stem + ".json", {"date": str(datetime.date.today()), "machine": m["summary"], "host": m, "quick": args.quick,
                                       "rows": rows})
    print(f"\nwrote {stem}.json" + (f" and {stem}.png" if chart(rows, stem + ".png") else
                                     " (pip install matplotlib for the chart)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
