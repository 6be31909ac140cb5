"""NF4 quantize / dequantize throughput: minipeft against bitsandbytes' CPU path, in one run.

A (rows, cols) float32 matrix, with and without double quantization; each case is timed for both
libraries in this process, same threads, a warm-up first, then --repeats runs. The table gives the
fastest run of each (host stalls only add time), GB/s of float32 input read (quantize) or output
written (dequantize), and the ratio minipeft / bitsandbytes (below 1: minipeft is faster).

    python benchmarks/bench_nf4.py                  # 4096 x 4096
    python benchmarks/bench_nf4.py --rows 1024 --cols 1024 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os

from bench_step import timed  # one timing loop for every benchmark (fastest run, warm-up first)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args()
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MINIPEFT_NUM_THREADS"):  # BLAS, torch, minipeft
        os.environ.setdefault(var, str(args.threads))
    import numpy as np
    import torch
    import bitsandbytes.functional as F
    from minipeft.quant import nf4_dequantize, nf4_quantize
    torch.set_num_threads(args.threads)

    w = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    wt = torch.from_numpy(w)
    gb = w.nbytes / 1e9
    rows = []
    print(f"{args.rows} x {args.cols} float32, block {args.block_size}, threads {args.threads}")
    print(f"{'case':18} {'minipeft s':>10} {'bnb s':>8} {'minipeft GB/s':>13} {'bnb GB/s':>9} {'ratio':>6}")
    for dq in (False, True):
        t = nf4_quantize(w, block_size=args.block_size, double_quantization=dq)
        q, state = F.quantize_4bit(wt, blocksize=args.block_size, quant_type="nf4", compress_statistics=dq)
        cases = {
            "quantize": (lambda: nf4_quantize(w, block_size=args.block_size, double_quantization=dq),
                         lambda: F.quantize_4bit(wt, blocksize=args.block_size, quant_type="nf4",
                                                 compress_statistics=dq)),
            "dequantize": (lambda: nf4_dequantize(t, "float32"), lambda: F.dequantize_4bit(q, state)),
        }
        for op, (mine, ref) in cases.items():
            a, b = timed(mine, args.repeats)["seconds"], timed(ref, args.repeats)["seconds"]
            name = f"{op}{' +dq' if dq else ''}"
            rows.append({"case": name, "minipeft_s": a, "bnb_s": b, "ratio": a / b})
            print(f"{name:18} {a:10.4f} {b:8.4f} {gb / a:13.2f} {gb / b:9.2f} {a / b:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
