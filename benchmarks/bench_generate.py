"""Greedy generation with the KV cache: minipeft against transformers' generate, tokens per second.

The random llama of bench_step.py (--size), batch 1, a 16-token prompt, --new-tokens new tokens
(64 by default; no end-of-sequence stop, so both make exactly that many). Each library runs in its
own process with the same threads, a warm-up first; the table gives the fastest of --repeats runs
and the ratio minipeft / transformers of tokens per second (above 1: minipeft is faster). The
first generated tokens of both are compared, so a fast wrong answer shows.

    python benchmarks/bench_generate.py --size small
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench_step import SIZES, checkpoint_folder, timed

PROMPT_LEN = 16


def run(impl, folder, new_tokens, repeats):
    import numpy as np
    ids = np.random.default_rng(0).integers(3, 200, (1, PROMPT_LEN))
    out = {}
    if impl == "minipeft":
        import minipeft as mp
        model = mp.load_model(folder)

        def step():
            out["ids"] = model.generate(ids, max_new_tokens=new_tokens, eos_token_id=-1)
    else:
        import torch
        import transformers
        model = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
        t = torch.tensor(ids)

        def step():
            with torch.no_grad():
                out["ids"] = model.generate(t, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                            pad_token_id=0).numpy()
    res = timed(step, repeats)
    res["tokens_per_s"] = new_tokens / res["seconds"]
    res["first_tokens"] = [int(i) for i in np.asarray(out["ids"])[0, PROMPT_LEN:PROMPT_LEN + 8]]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=SIZES)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None, help="also write the row here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child != "minipeft":
            import torch
            torch.set_num_threads(args.threads)
        print(json.dumps(run(args.child, args.folder, args.new_tokens, args.repeats)))
        return
    folder = checkpoint_folder(args.size)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
    res = {}
    for impl in ("minipeft", "transformers"):
        cmd = [sys.executable, __file__, "--child", impl, "--folder", folder, "--size", args.size,
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        res[impl] = json.loads(out.strip().splitlines()[-1])
    ratio = res["minipeft"]["tokens_per_s"] / res["transformers"]["tokens_per_s"]
    same = res["minipeft"]["first_tokens"] == res["transformers"]["first_tokens"]
    print(f"size={args.size} batch=1 prompt={PROMPT_LEN} new={args.new_tokens} threads={args.threads}")
    print(f"minipeft {res['minipeft']['tokens_per_s']:.0f} tok/s, transformers {res['transformers']['tokens_per_s']:.0f}"
          f" tok/s, ratio {ratio:.2f}; first 8 tokens equal: {same}")
    row = {"case": f"generate-{args.size}", "ratio": ratio, "same_tokens": same,
           **{f"{impl}_{k}": v for impl, r in res.items() for k, v in r.items()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)


if __name__ == "__main__":
    main()
