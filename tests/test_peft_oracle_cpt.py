"""CPT against HF PEFT 0.21 (spec/cpt.md), on test_peft_oracle.py's tiny random Llama (GQA) and GPT-2: PEFT's
save loads here with equal logits on every position and the reverse; the CPT loss and its gradient from one
state in both libraries, "none" and "decay", with the default and a given input_type_mask; and a few AdamW
steps of model.train against PEFT's own loop with torch's AdamW (its projection at the start of each
forward): every step's loss and the final prompt. Run with `pytest -s` for the errors."""
import numpy as np
import pytest

import minipeft
from helpers import max_rel_err
from minipeft import CPTConfig, TrainingConfig
from minipeft.adapters.cpt import cpt_loss
from test_peft_oracle import (IDS, base, hf_logits, hf_model, lib, minipeft_saved_in_peft,  # noqa: F401
                              peft_train_losses, perturb_peft, report)

pytestmark = pytest.mark.oracle

# two in-context examples: [input template, input, input, output template, label] each
CPT = dict(cpt_token_ids=[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], cpt_tokens_type_mask=[1, 2, 2, 3, 4, 5, 6, 6, 7, 8],
           opt_projection_epsilon=0.2, opt_projection_format_epsilon=0.05)
DECAY = dict(CPT, opt_weighted_loss_type="decay", opt_loss_decay_factor=0.6)
LABELS = np.where(np.arange(IDS.shape[1]) < 4, -100, IDS)  # (2, 9): the first 4 tokens are the prompt
LABELS[1, 6] = -100
TYPES = np.array([[1, 2, 2, 3, 4, 4, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8, 8]])  # input_type_mask: example ids 1, 2


def peft_cpt(lib, base, kw, kind="llama"):
    pm = lib[2].get_peft_model(hf_model(lib, base(kind)), lib[2].CPTConfig(task_type="CAUSAL_LM", **kw))
    perturb_peft(lib, pm)
    return pm.eval()


@pytest.mark.spec("CPT-2", "CPT-7")
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_saved_loads_in_minipeft(lib, base, tmp_path, kind):
    pm = peft_cpt(lib, base, CPT, kind)
    theirs = hf_logits(lib, pm)  # the forward projects the perturbed D first, and saving saves E[c] + that D
    pm.save_pretrained(tmp_path)
    model = minipeft.load_model(base(kind))
    model.load_adapters(str(tmp_path))
    cfg = model.peft_configs["default"]
    assert type(cfg) is CPTConfig and cfg.cpt_token_ids == CPT["cpt_token_ids"]
    ours = model(IDS).numpy()
    assert ours.shape == theirs.shape == (2, 10 + 9, 64)
    print(f"\n  max abs diff {np.abs(ours - theirs).max():.2e}")
    report(f"PEFT->minipeft CPT {kind}", max_rel_err(ours, theirs))


@pytest.mark.spec("CPT-2", "CPT-7")
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_minipeft_saved_loads_in_peft(lib, base, tmp_path, kind):
    model, pm = minipeft_saved_in_peft(lib, base(kind), CPTConfig(**CPT), tmp_path)
    ours, theirs = model(IDS).numpy(), hf_logits(lib, pm)
    print(f"\n  max abs diff {np.abs(ours - theirs).max():.2e}")
    report(f"minipeft->PEFT CPT {kind}", max_rel_err(ours, theirs))


def same_state(lib, base, kw):
    """PEFT's perturbed model (its D projected by one forward) and minipeft's with that E[c] and D."""
    torch = lib[0]
    pm = peft_cpt(lib, base, kw)
    with torch.no_grad():
        pm(input_ids=torch.tensor(IDS))  # PEFT projects D here
    enc = pm.prompt_encoder["default"]
    model = minipeft.load_model(base("llama")).apply_cpt(**kw)
    ours = model.net.prompt_encoder["default"]
    assert np.array_equal(ours.embedding.weight.numpy(), enc.embedding.weight.detach().numpy())  # CPT-1: E[c]
    ours.delta_embedding.weight.data = enc.delta_embedding.weight.detach().numpy().copy()
    return pm, model


@pytest.mark.spec("CPT-1", "CPT-4", "CPT-5")
@pytest.mark.parametrize("kw", [CPT, DECAY], ids=["none", "decay"])
@pytest.mark.parametrize("types", [None, TYPES], ids=["default-types", "given-types"])
def test_loss_and_gradient_equal_peft(lib, base, kw, types):
    torch = lib[0]
    pm, model = same_state(lib, base, kw)
    pm.train()
    extra = {} if types is None else {"input_type_mask": torch.tensor(types)}
    out = pm(input_ids=torch.tensor(IDS), labels=torch.tensor(LABELS), **extra)
    out.loss.backward()
    theirs_g = pm.prompt_encoder["default"].delta_embedding.weight.grad.numpy()
    loss = cpt_loss(model(IDS), LABELS, model.peft_configs["default"], types)
    loss.backward()
    ours_g = model.net.prompt_encoder["default"].delta_embedding.weight.grad
    print(f"\n  loss {loss.item():.6f} vs {out.loss.item():.6f}: abs diff {abs(loss.item() - out.loss.item()):.2e}; "
          f"gradient max abs diff {np.abs(ours_g - theirs_g).max():.2e}")
    assert abs(loss.item() - out.loss.item()) < 1e-5
    assert not np.any(ours_g[[4, 9]]) and not np.any(theirs_g[[4, 9]])  # CPT-1: the label tokens stay
    assert max_rel_err(ours_g, theirs_g) < 1e-4


@pytest.mark.spec("CPT-3", "CPT-5", "CPT-6")
@pytest.mark.parametrize("kw", [CPT, DECAY], ids=["none", "decay"])
def test_training_trajectory_equals_peft(lib, base, kw):
    """4 AdamW steps (lr 0.02, weight decay 0.01, constant schedule, no clipping) from D = 0 on one batch of both
    rows: model.train's losses and final prompt against PEFT's loop. The balls (0.025 input, 0.00625 format for
    d = 32) bind: the steps move D beyond them."""
    torch = lib[0]
    steps, lr = 4, 0.02
    pm = lib[2].get_peft_model(hf_model(lib, base("llama")), lib[2].CPTConfig(task_type="CAUSAL_LM", **kw))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    theirs = peft_train_losses(lib, pm, opt, steps, LABELS)
    enc = pm.prompt_encoder["default"]
    unprojected = enc.delta_embedding.weight.detach().norm(dim=1)
    P_theirs = pm.get_prompt_embedding_to_save("default").numpy()  # E[c] + D projected
    model = minipeft.load_model(base("llama")).apply_cpt(**kw)
    rows = [{"input_ids": IDS[b].tolist(), "labels": LABELS[b].tolist()} for b in range(2)]
    hist = model.train(rows, TrainingConfig(learning_rate=lr, weight_decay=0.01, batch_size=2, max_steps=steps,
                                            schedule="constant", max_grad_norm=None, shuffle=False, progress=False))
    P_ours = model.net.prompt_encoder["default"].output().numpy()
    eps = model.peft_configs["default"].epsilons()
    print(f"\n  losses {np.round(hist['loss'], 6).tolist()} vs {np.round(theirs, 6).tolist()}: max abs diff "
          f"{np.abs(np.array(hist['loss']) - theirs).max():.2e}; prompt max abs diff "
          f"{np.abs(P_ours - P_theirs).max():.2e}")
    assert bool((unprojected.numpy() > eps * 1.01).any())  # the projection binds
    assert np.abs(np.array(hist["loss"]) - theirs).max() < 1e-5
    assert np.abs(P_ours - P_theirs).max() < 1e-5


@pytest.mark.spec("CPT-2")
def test_greedy_generate_equals_peft_forward(lib, base, tmp_path):
    """minipeft's cached generate against greedy decoding by PEFT's full forward (PROMPT-6's reference)."""
    from test_peft_oracle_prompt import greedy_by_full_forward
    pm = peft_cpt(lib, base, CPT)
    theirs = greedy_by_full_forward(lib[0], pm, 5)
    pm.save_pretrained(tmp_path)
    model = minipeft.load_model(base("llama"))
    model.load_adapters(str(tmp_path))
    ours = model.generate(IDS, max_new_tokens=5, eos_token_id=[])
    print(f"\n  generate CPT: {ours[:, IDS.shape[1]:].tolist()}")
    assert ours.tolist() == theirs.tolist()
