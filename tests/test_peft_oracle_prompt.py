"""Prompt learning against HF PEFT 0.21 (spec/prompt_tuning.md, prefix_tuning.md, ptuning.md,
ptuning_v2.md), in the set-up of test_peft_oracle.py: a tiny random Llama (GQA: 4 heads, 2 KV heads)
or GPT-2, every prompt parameter perturbed with seeded noise. Checked: PEFT's save loads here with
equal logits on every position PEFT returns (virtual ones included for prompt tuning and P-tuning)
and the reverse (PEFT ignores minipeft's extra prompt_encoder.* keys); one training step's
gradients of every prompt parameter, encoder included, with PEFT's own label rule; greedy generate
token for token. Run with `pytest -s` for the errors."""
import numpy as np
import pytest

import minipeft
from helpers import max_rel_err
from minipeft.adapters.registry import config_class
from minipeft.models.blocks import causal_lm_loss
from minipeft.safetensors_io import write_safetensors
from test_peft_oracle import (IDS, base, hf_logits, hf_model, lib, minipeft_saved_in_peft, perturb_minipeft,  # noqa: F401
                              perturb_peft, report)

pytestmark = pytest.mark.oracle
GRAD_TOL = 1e-4

# name -> (base kind, PEFT config class, kwargs); minipeft reads the same dict through from_peft
CASES = {
    "prompt": ("llama", "PromptTuningConfig", dict(num_virtual_tokens=4)),
    "prefix": ("llama", "PrefixTuningConfig", dict(num_virtual_tokens=3)),
    "prefix_projection": ("llama", "PrefixTuningConfig", dict(num_virtual_tokens=3, prefix_projection=True,
                                                                encoder_hidden_size=16)),
    "ptuning_mlp": ("llama", "PromptEncoderConfig", dict(num_virtual_tokens=4, encoder_hidden_size=16)),
    "ptuning_lstm": ("llama", "PromptEncoderConfig", dict(num_virtual_tokens=3, encoder_hidden_size=8,
                                                          encoder_reparameterization_type="LSTM")),
    "prefix_gpt2": ("gpt2", "PrefixTuningConfig", dict(num_virtual_tokens=3)),
    "prompt_gpt2": ("gpt2", "PromptTuningConfig", dict(num_virtual_tokens=4)),
}
PEFT_TYPE = {"PromptTuningConfig": "PROMPT_TUNING", "PrefixTuningConfig": "PREFIX_TUNING",
             "PromptEncoderConfig": "P_TUNING"}
SPEC = {"prompt": "PROMPT", "prefix": "PREFIX", "ptuning": "PTUNING"}


def peft_model(lib, base, case):
    _, _, peft = lib
    kind, cls, kw = CASES[case]
    pm = peft.get_peft_model(hf_model(lib, base(kind)), getattr(peft, cls)(task_type="CAUSAL_LM", **kw))
    perturb_peft(lib, pm)
    return pm.eval()


def minipeft_config(case):
    _, cls, kw = CASES[case]
    d = dict(peft_type=PEFT_TYPE[cls], **kw)
    return config_class(d["peft_type"], fields=d).from_peft(d)


@pytest.mark.spec("PROMPT-2", "PROMPT-5", "PREFIX-2", "PREFIX-3", "PREFIX-6", "PTUNING-1", "PTUNING-2",
                  "PTUNING-3", "PTUNING-5")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_saved_loads_in_minipeft(lib, base, tmp_path, case):
    pm = peft_model(lib, base, case)
    pm.save_pretrained(tmp_path)
    model = minipeft.load_model(base(CASES[case][0]))
    model.load_adapters(str(tmp_path))
    ours, theirs = model(IDS), hf_logits(lib, pm)
    assert ours.shape == theirs.shape
    report(f"PEFT->minipeft {case}", max_rel_err(ours, theirs))


@pytest.mark.spec("PROMPT-2", "PROMPT-5", "PREFIX-3", "PREFIX-6", "PTUNING-3", "PTUNING-5", "PTV2-3")
@pytest.mark.parametrize("case", list(CASES))
def test_minipeft_saved_loads_in_peft(lib, base, tmp_path, case):
    model, pm = minipeft_saved_in_peft(lib, base(CASES[case][0]), minipeft_config(case), tmp_path)
    report(f"minipeft->PEFT {case}", max_rel_err(model(IDS), hf_logits(lib, pm)))


def peft_state_as_minipeft_file(lib, pm, folder):
    """PEFT's full prompt encoder (what save_pretrained drops) in minipeft's layout: the encoder's
    tensors under prompt_encoder.<path> next to prompt_embeddings."""
    enc = pm.prompt_encoder["default"]
    tensors = {"prompt_embeddings": pm.get_prompt_embedding_to_save("default").detach().numpy()}
    if len(list(enc.parameters())) > 1:
        tensors.update({f"prompt_encoder.{k}": v.detach().numpy() for k, v in enc.state_dict().items()})
    pm.save_pretrained(folder)  # adapter_config.json; the weights are replaced next
    write_safetensors(str(folder / "adapter_model.safetensors"), tensors, {"format": "pt"})
    return {k.removeprefix("prompt_encoder.default."): p for k, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.spec("PROMPT-3", "PROMPT-4", "PREFIX-5", "PTUNING-4", "PTV2-2")
@pytest.mark.parametrize("case", list(CASES))
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    """PEFT's loss with labels = IDS (its -100 labels for virtual tokens) against causal_lm_loss on
    minipeft's logits: the gradient of every prompt parameter, encoder weights included."""
    torch = lib[0]
    pm = peft_model(lib, base, case)
    params = peft_state_as_minipeft_file(lib, pm, tmp_path)
    pm(input_ids=torch.tensor(IDS), labels=torch.tensor(IDS)).loss.backward()
    theirs = {k: p.grad.numpy() for k, p in params.items()}
    model = minipeft.load_model(base(CASES[case][0]))
    model.load_adapters(str(tmp_path))
    causal_lm_loss(model(IDS), IDS).backward()
    ours = {k.removeprefix("prompt_encoder.default."): p.grad for k, p in model.net.named_parameters()
            if p.requires_grad}
    assert sorted(ours) == sorted(theirs)
    worst = max(max_rel_err(ours[k], theirs[k]) for k in ours)
    print(f"\n  gradients {case} ({len(ours)} tensors): max rel err {worst:.2e}")
    assert worst < GRAD_TOL


def greedy_by_full_forward(torch, pm, n):
    """Greedy decoding by definition: argmax of a full forward over the sequence so far, n times."""
    seq = torch.tensor(IDS)
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, pm(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq.numpy()


@pytest.mark.spec("PROMPT-6", "PREFIX-4", "PTUNING-3")
@pytest.mark.parametrize("case", ["prompt", "prefix", "prefix_projection", "ptuning_mlp", "prefix_gpt2"])
def test_greedy_generate_equals_peft_forward(lib, base, tmp_path, case):
    """minipeft's cached generate against PEFT's full forward, step by step. Not against PEFT's own
    generate: with transformers 5.24 it drops the prefix of prefix tuning (its tokens equal the base
    model's) and its P-tuning tokens part from its own forward after a few steps (measured here)."""
    torch = lib[0]
    pm = peft_model(lib, base, case)
    pm.save_pretrained(tmp_path)
    theirs = greedy_by_full_forward(torch, pm, 5)
    model = minipeft.load_model(base(CASES[case][0]))
    model.load_adapters(str(tmp_path))
    ours = model.generate(IDS, max_new_tokens=5, eos_token_id=[])
    print(f"\n  generate {case}: {ours[:, IDS.shape[1]:].tolist()}")
    assert ours.tolist() == theirs.tolist()


@pytest.mark.spec("PROMPT-2", "PREFIX-2", "PTUNING-1")
@pytest.mark.parametrize("case", ["prompt", "prefix", "ptuning_mlp", "prompt_gpt2", "prefix_gpt2"])
def test_left_padded_batch_equals_peft(lib, base, tmp_path, case):
    """Row 0 left-padded by 3 pads: the logits of every real (and virtual) position equal PEFT's."""
    torch = lib[0]
    pm = peft_model(lib, base, case)
    pm.save_pretrained(tmp_path)
    model = minipeft.load_model(base(CASES[case][0]))
    model.load_adapters(str(tmp_path))
    mask = np.ones_like(IDS)
    mask[0, :3] = 0
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(model(IDS, attention_mask=mask).data)
    assert ours.shape == theirs.shape
    lead = theirs.shape[1] - IDS.shape[1]  # virtual positions PEFT returns (prompt tuning, P-tuning)
    keep = np.concatenate([np.ones((2, lead), bool), mask == 1], axis=1)  # pads' own logits are not compared
    report(f"left-padded {case}", max_rel_err(ours[keep], theirs[keep]))


@pytest.mark.spec("PREFIX-3")
@pytest.mark.parametrize("n_virtual", [2, 6])
def test_prefix_under_a_sliding_window_equals_peft(lib, tmp_path, n_virtual):
    """Mistral with a 4-token window and 9 tokens: the prefix keys are positions 0..T-1, so the window
    passes over them as it does in transformers (they are not always visible)."""
    torch, transformers, peft = lib
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     sliding_window=4, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    hf = transformers.MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(hf_model(lib, str(tmp_path / "base")),
                             peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual))
    perturb_peft(lib, pm)
    pm.eval().save_pretrained(tmp_path / "adapter")
    model = minipeft.load_model(str(tmp_path / "base"))
    model.load_adapters(str(tmp_path / "adapter"))
    assert IDS.shape[1] + n_virtual > cfg.sliding_window
    report(f"prefix {n_virtual} under a window of 4", max_rel_err(model(IDS), hf_logits(lib, pm)))


@pytest.mark.spec("PROMPT-9", "PROMPT-1")
def test_init_text_adapter_loads_in_peft(lib, tmp_path):
    """An init_text prompt adapter on the carried model (which has a tokenizer): PEFT refuses its config
    without tokenizer_name_or_path (the old file), loads the saved one with equal logits, and PEFT's TEXT
    init, tokenizing init_text with the tokenizer the file names, is minipeft's P bit for bit."""
    import json
    import os
    torch, _, peft = lib
    folder = os.path.join(os.path.dirname(minipeft.__file__), "data", "tiny-llama-chars")
    model = minipeft.load_model(folder).apply_prompt_tuning(num_virtual_tokens=7, init_text="next")
    P0 = model.net.prompt_encoder["default"].embedding.weight.data.copy()
    perturb_minipeft(model)
    model.save_adapters(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    old = {k: v for k, v in saved.items() if k != "tokenizer_name_or_path"}
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        peft.PromptTuningConfig(**{k: v for k, v in old.items() if k != "peft_type"})
    ids = [[1, 3, 4, 5, 6]]
    pm = peft.PeftModel.from_pretrained(hf_model(lib, folder), str(tmp_path)).eval()
    with torch.no_grad():
        theirs = pm(torch.tensor(ids)).logits.numpy()
    report("init_text minipeft->PEFT", max_rel_err(model(ids), theirs))
    fresh = peft.get_peft_model(hf_model(lib, folder), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text="next",
        tokenizer_name_or_path=saved["tokenizer_name_or_path"]))
    theirs_P = fresh.prompt_encoder["default"].embedding.weight.detach().numpy()
    print(f"\n  init_text P: max abs diff {np.abs(P0 - theirs_P).max():.1e}")
    assert np.array_equal(P0, theirs_P)
