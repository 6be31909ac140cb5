"""The synthetic tasks of the demo: words of 3-6 lowercase letters, one instruction each.

    copy abcd = abcd        the base model is pre-trained on this (and on "sort")
    sort dbca = abcd
    next abcd = bcde        the LoRA demo teaches this: every letter moves one step (z -> a)

A model that knows `copy` and `sort` but never saw `next` answers it wrong (it copies or sorts),
so held-out exact match starts near 0 and measures what the adapter taught.
"""
from __future__ import annotations

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
    """n prompt/completion pairs whose words are not in `exclude` (held-out words stay unseen)."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        w = word(rng)
        if w in exclude or w in seen:
            continue
        seen.add(w)
        out.append({"prompt": f"{task} {w} =", "completion": f" {answer(task, w)}"})
    return out
