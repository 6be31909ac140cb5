"""Build the small base model minipeft carries (minipeft/data/tiny-llama-chars), reproducibly.

1. A character-level tokenizer.json (the `tokenizers` library): a-z, space, '=', and <s>, </s>, <pad>.
2. A random llama (hidden 96, 2 layers, 4 heads, 2 KV heads), pre-trained *with minipeft itself*
   (full fine-tuning) on the generated `copy` and `sort` tasks of examples/tasks.py.
3. Saved as an HF folder (config.json, model.safetensors, tokenizer.json) that transformers loads.

    python examples/make_base_model.py            # a few minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import minipeft as mp  # noqa: E402
from minipeft.models.config import config_from_dict  # noqa: E402
from minipeft.models.io import build, save_net  # noqa: E402
from minipeft.train import TrainingConfig  # noqa: E402
from tasks import LETTERS, examples  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>"]
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 96,
          "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
          "tie_word_embeddings": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
          "torch_dtype": "float32"}


def make_tokenizer(path: str) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    vocab = {t: i for i, t in enumerate(SPECIALS + list(LETTERS) + [" ", "="])}
    assert len(vocab) <= CONFIG["vocab_size"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(SPECIALS)
    tok.save(path)
    with open(os.path.join(os.path.dirname(path), "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "pad_token": "<pad>"}, f, indent=2)


def random_init(net, seed: int) -> None:
    """Normal(0, 0.02) weights, ones for norms (the usual transformer init)."""
    rng = mp.backend.RNG(seed)
    for name, p in net.named_parameters():
        if not name.endswith("norm.weight"):
            p.data = rng.normal(p.shape, std=0.02)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "minipeft", "data",
                                                  "tiny-llama-chars"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tmp = args.out + ".build"
    os.makedirs(tmp, exist_ok=True)
    make_tokenizer(os.path.join(tmp, "tokenizer.json"))
    cfg = config_from_dict(dict(CONFIG))
    net = build(cfg)
    random_init(net, args.seed)
    save_net(net, tmp, os.path.join(tmp, "tokenizer.json"))
    model = mp.load_model(tmp)
    model.net.requires_grad_(True)  # full pre-training
    data = examples("copy", 3000, seed=1) + examples("sort", 3000, seed=2)
    model.train(data, TrainingConfig(learning_rate=3e-3, batch_size=32, max_steps=args.steps, warmup_steps=100,
                                     schedule="cosine", weight_decay=0.01, seed=args.seed))
    model.net.requires_grad_(False)
    for task in ("copy", "sort"):
        held = examples(task, 50, seed=99)
        ok = sum(model.generate(e["prompt"], max_new_tokens=8).strip() == e["completion"].strip() for e in held)
        print(f"{task}: held-out exact match {ok}/{len(held)}")
    model.save(args.out)
    import shutil
    shutil.copyfile(os.path.join(tmp, "tokenizer_config.json"), os.path.join(args.out, "tokenizer_config.json"))
    shutil.rmtree(tmp)
    print("saved", os.path.abspath(args.out))


if __name__ == "__main__":
    main()
