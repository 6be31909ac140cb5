"""Faults and hostile files (issue 7): pickled checkpoints are refused at run time (IO-5), a save
killed at random instants never loses the previous folder (IO-9), training killed after a
checkpoint resumes bit for bit (TRAIN-8, ADALORA-13), limits are checked before work (TRAIN-9).

The kill tests fork a child (no interpreter start per trial) and SIGKILL it; their counts are
printed past pytest's capture."""
import json
import os
import pathlib
import pickle
import random
import signal
import time

import numpy as np
import pytest

import minipeft as mp
from minipeft.errors import CheckpointError, ConfigError
from minipeft.train import TrainingConfig
from tests.helpers import TINY_LLAMA, tiny_llama

QUIET = dict(progress=False)


# ---- IO-5: never unpickle, at run time ---------------------------------------------------------
class Touch:
    """Unpickling this runs pathlib.Path(marker).touch(): what a hostile checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def hostile_pickle(path, marker):
    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": Touch(marker)}))


@pytest.mark.spec("IO-5", "IO-4")
@pytest.mark.parametrize("with_config", [True, False])
def test_pickled_model_folder_is_refused_without_running_it(tmp_path, with_config):
    folder, marker = tmp_path / "model", tmp_path / "pwned"
    folder.mkdir()
    if with_config:
        (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    hostile_pickle(folder / "pytorch_model.bin", marker)
    with pytest.raises(CheckpointError) as e:
        mp.load_model(str(folder))
    msg = str(e.value)
    assert str(folder) in msg and "pytorch_model.bin" in msg and "safe_serialization=True" in msg
    assert not marker.exists()
    pickle.loads((folder / "pytorch_model.bin").read_bytes())  # the payload is live: loading it runs code
    assert marker.exists()


@pytest.mark.spec("IO-5", "IO-4")
@pytest.mark.parametrize("with_config", [True, False])
def test_pickled_adapter_folder_is_refused_without_running_it(tmp_path, with_config):
    model, folder, marker = tiny_llama(), tmp_path / "adapter", tmp_path / "pwned"
    folder.mkdir()
    if with_config:
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    hostile_pickle(folder / "adapter_model.bin", marker)
    with pytest.raises(CheckpointError) as e:
        model.load_adapters(str(folder))
    msg = str(e.value)
    assert str(folder) in msg and "adapter_model.bin" in msg and "PeftModel" in msg and "safe_serialization" in msg
    assert not marker.exists() and model.peft_configs == {}
    pickle.loads((folder / "adapter_model.bin").read_bytes())
    assert marker.exists()
