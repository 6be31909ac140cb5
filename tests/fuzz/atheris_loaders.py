"""Coverage-guided fuzzing of minipeft's loaders with atheris (libFuzzer for Python); not collected by
pytest (no test_ prefix). Targets: read_safetensors (IO-3), config.json parsing (IO-6) and
adapter_config.json parsing (IO-7). Any exception that is not a MiniPeftError is a crash libFuzzer
reports, with the input saved as crash-<sha1>.

    pip install -e ".[fuzz]"     # atheris
    python tests/fuzz/atheris_loaders.py safetensors -atheris_runs=100000
    python tests/fuzz/atheris_loaders.py config -max_total_time=60
    python tests/fuzz/atheris_loaders.py adapter_config -max_total_time=60 corpus_dir/

The first argument picks the target; the rest go to libFuzzer (-max_total_time, -runs, a corpus folder).
"""
import json
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from minipeft.adapters.peft_io import read_adapter_config
    from minipeft.errors import MiniPeftError
    from minipeft.models.config import config_from_dict
    from minipeft.safetensors_io import read_safetensors

FOLDER = tempfile.mkdtemp(prefix="atheris_minipeft_")


def json_value(data: bytes):
    """The input as JSON when it parses (libFuzzer finds JSON quickly from the seed), else None."""
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def fuzz_safetensors(data: bytes):
    path = os.path.join(FOLDER, "x.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    try:
        read_safetensors(path)
    except MiniPeftError:
        pass


BASE_CONFIG = {"model_type": "llama", "vocab_size": 48, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 64, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
BASE_ADAPTER = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj"],
                "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "init_r": 4, "num_virtual_tokens": 3}


def structured(data: bytes, base: dict):
    """Inputs that are not JSON edit a valid base instead: a key (known or new) gets a drawn value."""
    fdp = atheris.FuzzedDataProvider(data)
    out = dict(base)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        keys = sorted(out) + ["new"]
        key = keys[fdp.ConsumeIntInRange(0, len(keys) - 1)]
        kind = fdp.ConsumeIntInRange(0, 6)
        out[key] = [None, fdp.ConsumeBool(), fdp.ConsumeInt(8), fdp.ConsumeFloat(),
                    fdp.ConsumeUnicodeNoSurrogates(8), [fdp.ConsumeInt(2)], {"factor": fdp.ConsumeFloat()}][kind]
    out["peft_type"] = out.get("peft_type") if fdp.ConsumeBool() else fdp.PickValueInList(
        ["LORA", "LOHA", "LOKR", "IA3", "VERA", "ADALORA", "PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "X"])
    return out


def fuzz_config(data: bytes):
    raw = json_value(data)
    raw = structured(data, BASE_CONFIG) if raw is None else raw
    raw.pop("peft_type", None) if isinstance(raw, dict) else None
    try:
        config_from_dict(raw, "config.json")
    except MiniPeftError:
        pass


def fuzz_adapter_config(data: bytes):
    if json_value(data) is None:
        data = json.dumps(structured(data, BASE_ADAPTER)).encode()
    with open(os.path.join(FOLDER, "adapter_config.json"), "wb") as f:
        f.write(data)
    try:
        read_adapter_config(FOLDER)
    except MiniPeftError:
        pass


TARGETS = {"safetensors": fuzz_safetensors, "config": fuzz_config, "adapter_config": fuzz_adapter_config}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
