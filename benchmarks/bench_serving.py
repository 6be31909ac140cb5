"""Serving many LoRA adapters (spec/serving.md): tokens/s and peak memory of one batch of greedy requests.

The random llama of bench_step.py (--size), --adapters random PEFT LoRA folders (ranks 2, 4, 8 in turn on
q/k/v/o_proj, B and A perturbed), a batch of --batch requests of --prompt tokens, --new-tokens each (no
end-of-sequence stop). Cases, each in its own process (its VmHWM is its own, benchmarks/peak_memory.py), the
same threads, a warm-up first, the fastest of --repeats:
  one      minipeft, one adapter loaded by load_adapters, every request through it (Model.generate)
  pool     minipeft AdapterPool holding every adapter, request b through its own adapter (pool.generate)
  mixed    minipeft, every adapter loaded by load_adapters, Model.generate(adapter_names=...) on the same batch
  peft     PEFT (torch): every adapter loaded by load_adapter, generate(adapter_names=...) on the same batch
The pool, mixed and peft rows' first tokens are compared, so a fast wrong answer shows.

    python benchmarks/bench_serving.py --size small --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench_step import SIZES, checkpoint_folder, timed

RANKS = (2, 4, 8)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
CASES = ("one", "pool", "mixed", "peft")


def adapter_folders(base: str, n: int) -> list:
    """n random LoRA folders on `base`, written once into /tmp (a temporary folder renamed into place)."""
    root = f"{base}-serving-{n}"
    if not os.path.isdir(root):
        import numpy as np
        import minipeft as mp
        tmp = f"{root}.tmp{os.getpid()}"
        model, rng = mp.load_model(base), np.random.default_rng(0)
        for i in range(n):
            model.apply_lora(rank=RANKS[i % len(RANKS)], alpha=8, target_modules=TARGETS)
            for p in model.trainable_parameters():
                p.data = (p.data + rng.standard_normal(p.shape) * 0.05).astype(np.float32)
            model.save_adapters(os.path.join(tmp, f"a{i}"))
            model.delete_adapter("default")
        os.replace(tmp, root)
    return [os.path.join(root, f"a{i}") for i in range(n)]


def run(case, base, folders, batch, prompt, new_tokens, repeats):
    import numpy as np
    ids = np.random.default_rng(0).integers(3, 200, (batch, prompt))
    names = [f"a{(7 * b) % len(folders)}" for b in range(batch)]  # a different adapter per request
    out = {}
    if case == "peft":
        import peft
        import torch
        import transformers
        hf = transformers.LlamaForCausalLM.from_pretrained(base, attn_implementation="sdpa").eval()
        t0 = time.perf_counter()
        model = peft.PeftModel.from_pretrained(hf, folders[0], adapter_name="a0")
        for i, f in enumerate(folders[1:], 1):
            model.load_adapter(f, adapter_name=f"a{i}")
        model.eval()
        t, mask = torch.tensor(ids), torch.ones(batch, prompt, dtype=torch.long)

        def step():
            with torch.no_grad():
                out["ids"] = model.generate(input_ids=t, attention_mask=mask, max_new_tokens=new_tokens,
                                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                            adapter_names=names).numpy()
    else:
        import minipeft as mp
        from minipeft.serving import AdapterPool, Request
        model = mp.load_model(base)
        t0 = time.perf_counter()
        if case == "one":
            model.load_adapters(folders[0])
            step = lambda: out.update(ids=model.generate(ids, max_new_tokens=new_tokens, eos_token_id=-1))  # noqa: E731
        elif case == "mixed":
            for i, f in enumerate(folders):
                model.load_adapters(f, name=f"a{i}")
            step = lambda: out.update(ids=model.generate(ids, max_new_tokens=new_tokens, eos_token_id=-1,  # noqa: E731
                                                         adapter_names=names))
        else:
            pages = 2 * len(TARGETS) * model.config.num_hidden_layers * sum(RANKS[i % len(RANKS)]
                                                                              for i in range(len(folders)))
            pool = AdapterPool(model, pages=pages, target_modules=TARGETS)
            for i, f in enumerate(folders):
                pool.add(f, name=f"a{i}")
            out["pool_mb"] = pool.nbytes() / 2 ** 20
            reqs = [Request(ids[b], n, new_tokens) for b, n in enumerate(names)]
            step = lambda: out.update(ids=np.stack(pool.generate(reqs, eos_token_id=-1)))  # noqa: E731
    load_s = time.perf_counter() - t0  # the adapters' loading (into the pool: add)
    res = timed(step, repeats)
    res.update(tokens_per_s=batch * new_tokens / res["seconds"], load_s=load_s, pool_mb=out.get("pool_mb"),
               first_tokens=[[int(i) for i in row[prompt:prompt + 6]] for row in np.asarray(out["ids"])[:4]])
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=SIZES)
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child == "peft":
            import torch
            torch.set_num_threads(args.threads)
        folders = adapter_folders(args.folder, args.adapters)
        print(json.dumps(run(args.child, args.folder, folders, args.batch, args.prompt, args.new_tokens,
                             args.repeats)))
        return
    folder = checkpoint_folder(args.size)
    adapter_folders(folder, args.adapters)  # built here once, so that no child's memory counts it
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
    print(f"size={args.size} adapters={args.adapters} batch={args.batch} prompt={args.prompt} "
          f"new={args.new_tokens} threads={args.threads}")
    print(f"{'case':6} {'tokens/s':>9} {'batch s':>8} {'adapters s':>10} {'peak MB':>8} {'pool MB':>8}  first tokens")
    rows = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--child", case, "--folder", folder, "--adapters", str(args.adapters),
               "--batch", str(args.batch), "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        res = json.loads(done.stdout.splitlines()[-1])
        rows.append({"case": f"serving-{args.size}-{case}", **res})
        pool_mb = f"{res['pool_mb']:8.1f}" if res["pool_mb"] is not None else f"{'-':>8}"
        print(f"{case:6} {res['tokens_per_s']:9.0f} {res['seconds']:8.2f} {res['load_s']:10.1f} "
              f"{res['peak_rss_mb']:8.0f} {pool_mb}  {res['first_tokens'][:2]}", flush=True)
    mixed = [r["first_tokens"] for r in rows if not r["case"].endswith("-one")]
    print(f"pool / mixed / peft first tokens equal: {all(m == mixed[0] for m in mixed)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
