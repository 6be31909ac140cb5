"""Training-step time and peak memory: minipeft against torch (+ PEFT) on the same random llama.

Each case runs in a fresh subprocess (its peak RSS, VmHWM, is its own: benchmarks/peak_memory.py), with the same thread count,
a warm-up step, then --repeats steps; the table's times and ratio are the fastest step of each
(host stalls only add time), with the medians beside them, and the ratio of CPU seconds per
step (process time of all threads: immune to stalls, and a fair basis with --threads 1). Cases:
  full   forward + backward of every parameter (torch eager reference)       [issue 2 target <= 1.5x]
  fullft full fine-tuning step: forward + backward + AdamW on every parameter (memory against lora)
  lora   LoRA r=8 on q_proj, v_proj, forward + backward + AdamW (PEFT reference) [issue 3 target <= 1.5x]
  frozen forward + backward with every weight frozen (shows no gradient buffers are allocated)
  qlora  QLoRA: NF4 base (double quantization, float32 compute) + LoRA r=8 on q_proj, v_proj, with AdamW
         (reference: PEFT over transformers' bitsandbytes 4-bit base on the CPU)

    python benchmarks/bench_step.py                 # hidden 256, 4 layers, seq 128, batch 4
    python benchmarks/bench_step.py --size tiny
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from peak_memory import peak_rss_mb  # noqa: E402

SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=172, vocab_size=256, seq=64),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=688, vocab_size=2048, seq=128),
    "medium": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376, vocab_size=8192, seq=256),
    # Qwen2.5-0.5B's shape as a llama (about 0.5B parameters): for the GPU check, too big for a quick CPU run
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, seq=512),
}


def make_checkpoint(size: str, folder: str) -> None:
    import torch
    import transformers
    s = dict(SIZES[size])
    s.pop("seq")
    s.setdefault("num_key_value_heads", s["num_attention_heads"])
    cfg = transformers.LlamaConfig(**s, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)


def checkpoint_folder(size: str) -> str:
    """/tmp/minipeft-bench-<size>-p4096: the random llama of `size` (positions up to 4096 for the sequence
    curve), built once with torch in a child process (this one never imports torch, so its peak memory stays
    its own) into a temporary folder renamed into place (a crash leaves no half checkpoint to reuse)."""
    folder = os.path.join("/tmp", f"minipeft-bench-{size}-p4096")
    if not os.path.isdir(folder):
        tmp = f"{folder}.tmp{os.getpid()}"
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); import bench_step; "
                        f"bench_step.make_checkpoint({size!r}, {tmp!r})"], check=True)
        os.replace(tmp, folder)
    return folder


def run_minipeft(folder, case, seq, batch, repeats, device):
    import numpy as np
    import minipeft as mp
    from minipeft.models.blocks import causal_lm_loss
    from minipeft.nn.optim import AdamW
    quant = mp.QuantizationConfig(compute_dtype="float32") if case == "qlora" else None
    model = mp.load_model(folder, quantization=quant)
    if case in ("lora", "qlora"):
        model.apply_lora(mp.LoRAConfig(rank=8, alpha=16, target_modules=("q_proj", "v_proj")))
    elif case in ("full", "fullft"):
        model.net.requires_grad_(True)
    model.net.train()
    ids = mp.backend.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seq)))
    named = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    opt = AdamW(named, lr=1e-4) if case in ("lora", "qlora", "fullft") else None  # full: forward + backward only

    def step():  # on CuPy (MINIPEFT_BACKEND=cupy, --device cuda) reading the loss back waits for the stream
        logits = model(ids)
        loss = causal_lm_loss(logits, ids)
        loss.backward()
        if opt:
            opt.step()
        for p in named.values():
            p.grad = None
        mp.backend.to_host(loss.data)

    return timed(step, repeats)


def run_torch(folder, case, seq, batch, repeats, device):
    import torch
    import transformers
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32) if case == "qlora" else None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa", quantization_config=quant,
                                                          device_map=device)  # a 4-bit model cannot be moved later
    if case in ("lora", "qlora"):
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    elif case == "frozen":
        model.requires_grad_(False)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if case in ("lora", "qlora", "fullft") else None

    def step():
        out = model(input_ids=ids, labels=ids)
        if params:  # with every weight frozen there is nothing to differentiate: forward only
            out.loss.backward()
        if opt:
            opt.step()
            opt.zero_grad()
        else:
            model.zero_grad(set_to_none=True)
        sync()

    return timed(step, repeats)


def timed(step, repeats):
    step()  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    # the minimum is the ratio's basis: on a shared host, stalls only ever add time to a step
    return {"seconds": min(times), "median_s": statistics.median(times), "cpu_s": min(cpu),
            "peak_rss_mb": peak_rss_mb()}


def child(args):
    fn = run_minipeft if args.impl == "minipeft" else run_torch
    if args.impl != "minipeft":
        import torch
        torch.set_num_threads(args.threads)
    print(json.dumps(fn(args.folder, args.case, args.seq, args.batch, args.repeats, args.device)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=SIZES)
    ap.add_argument("--cases", nargs="+", default=["full", "lora", "frozen"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: minipeft on CuPy, torch on the GPU")
    ap.add_argument("--json", default=None, help="also write the table here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=None)
    args = ap.parse_args()
    if args.child:
        return child(args)
    seq = args.seq or SIZES[args.size]["seq"]
    folder = checkpoint_folder(args.size)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MINIPEFT_BACKEND="cupy" if args.device == "cuda" else os.environ.get("MINIPEFT_BACKEND", "numpy"))
    rows = []
    print(f"size={args.size} seq={seq} batch={args.batch} threads={args.threads}")
    print(f"{'case':8} {'minipeft s':>11} {'torch s':>9} {'ratio':>6} {'medians s':>15} {'cpu ratio':>9} {'minipeft MB':>12} {'torch MB':>9}")
    for case in args.cases:
        res = {}
        for impl in ("minipeft", "torch"):
            cmd = [sys.executable, __file__, "--child", "--impl", impl, "--case", case, "--folder", folder,
                   "--seq", str(seq), "--batch", str(args.batch), "--repeats", str(args.repeats),
                   "--threads", str(args.threads), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            res[impl] = json.loads(out.strip().splitlines()[-1])
        ratio = res["minipeft"]["seconds"] / res["torch"]["seconds"]
        rows.append({"case": case, **{f"{k}_{m}": v for k, r in res.items() for m, v in r.items()}, "ratio": ratio})
        print(f"{case:8} {res['minipeft']['seconds']:11.4f} {res['torch']['seconds']:9.4f} {ratio:6.2f} "
              f"{res['minipeft']['median_s']:7.3f}/{res['torch']['median_s']:<7.3f} "
              f"{res['minipeft']['cpu_s'] / res['torch']['cpu_s']:9.2f} "
              f"{res['minipeft']['peak_rss_mb']:12.0f} {res['torch']['peak_rss_mb']:9.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "seq": seq, "batch": args.batch, "threads": args.threads, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
