"""A thin wrapper over a folder's tokenizer.json (the `tokenizers` library)."""
from __future__ import annotations

import json
import os

from ..errors import CheckpointError


class Tokenizer:
    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer
        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as e:  # the Rust library raises its own exception type
            raise CheckpointError(f"{path}: cannot read tokenizer ({e})") from e
        self.path = path
        cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        extra = {}
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                extra = json.load(f)
        self.eos_token = extra.get("eos_token") if isinstance(extra.get("eos_token"), str) else None

    @classmethod
    def from_folder(cls, folder: str):
        path = os.path.join(folder, "tokenizer.json")
        return cls(path) if os.path.isfile(path) else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str):
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()
