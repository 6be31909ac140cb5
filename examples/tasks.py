"""The synthetic tasks of the demo: words of 3-6 lowercase letters, one instruction each.

    copy abcd = abcd        the base model is pre-trained on this (and on "sort")
    sort dbca = abcd
    next abcd = bcde        the LoRA demo teaches this: every letter moves one step (z -> a)

A model that knows `copy` and `sort` but never saw `next` answers it wrong (it copies or sorts),
so held-out exact match starts near 0 and measures what the adapter taught.
"""
from __future__ import annotations

import os
import random
import string

LETTERS = string.ascii_lowercase


def word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def answer(task: str, w: str) -> str:
    if task == "copy":
        return w
    if task == "sort":
        return "".join(sorted(w))
    if task == "next":
        return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in w)
    raise ValueError(task)


def examples(task: str, n: int, seed: int, exclude=frozenset()) -> list[dict]:
    """n prompt/completion pairs whose prompts are not in `exclude` (the held-out records' prompts stay unseen)."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        w = word(rng)
        prompt = f"{task} {w} ="
        if prompt in exclude or w in seen:
            continue
        seen.add(w)
        out.append({"prompt": prompt, "completion": f" {answer(task, w)}"})
    return out


def main(argv=None) -> None:
    """python examples/tasks.py next 2000 --seed 7 --out train.jsonl [--exclude held.jsonl]"""
    import argparse
    import json
    ap = argparse.ArgumentParser(description="write a task's prompt/completion records as .jsonl",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("task", choices=["copy", "sort", "next"], help="the task")
    ap.add_argument("n", type=int, help="how many records")
    ap.add_argument("--seed", type=int, default=0, help="seed of the words")
    ap.add_argument("--out", required=True, help=".jsonl file to write")
    ap.add_argument("--exclude", default=None, help="a .jsonl file whose words stay out (held-out records)")
    args = ap.parse_args(argv)
    held = set()
    if args.exclude:
        with open(args.exclude, encoding="utf-8") as f:
            held = {json.loads(line)["prompt"] for line in f if line.strip()}
    rows = examples(args.task, args.n, args.seed, exclude=held)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(rows)} {args.task} records written to {args.out}")


if __name__ == "__main__":
    main()
