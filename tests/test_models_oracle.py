"""spec/transformer.md against transformers (the minGPT test): for each family a tiny random HF model
(seeded, float32, eager attention, weights drawn with std 0.3 so that attention is far from
uniform) is saved with save_pretrained and loaded by minipeft. Compared: logits (BERT: the last
hidden state) with and without a left-padded mask, a sharded and a bf16 checkpoint, greedy
generation token for token, the gradient of a loss on every parameter, and minipeft's save()
read back by transformers. Each check prints its relative error (pytest -s), llm.c style.
torch and transformers are imported by a fixture, so a run that deselects `oracle` never
imports them."""
import copy

import numpy as np
import pytest

import minipeft
from helpers import assert_close, max_rel_err
from minipeft.autograd import Tensor
from minipeft.models.blocks import causal_lm_loss

pytestmark = pytest.mark.oracle

V, B, T = 64, 2, 10
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128)
FAMILIES = ("llama", "mistral", "qwen2", "phi", "gpt2", "bert")
CAUSAL = FAMILIES[:-1]


@pytest.fixture(scope="module")
def torch():
    pytest.importorskip("transformers")
    return pytest.importorskip("torch")


def hf_config(family):
    import transformers as t
    if family == "llama":
        return t.LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=False), t.LlamaForCausalLM
    if family == "mistral":  # a window shorter than the sequence
        return t.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=4), t.MistralForCausalLM
    if family == "qwen2":  # qkv bias, tied embeddings
        return t.Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True), t.Qwen2ForCausalLM
    if family == "phi":  # partial rotary (half of each head), qk_layernorm, grouped kv heads
        return t.PhiConfig(**COMMON, num_key_value_heads=2, qk_layernorm=True), t.PhiForCausalLM
    if family == "gpt2":
        return t.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128), t.GPT2LMHeadModel
    return t.BertConfig(**COMMON), t.BertModel


@pytest.fixture(scope="module")
def saved(torch, tmp_path_factory):
    """family -> (HF model in float32 eval mode, folder it was saved to); each built once."""
    cache = {}

    def get(family):
        if family not in cache:
            torch.manual_seed(0)
            cfg, cls = hf_config(family)
            cfg._attn_implementation = "eager"
            m = cls(cfg).eval()
            with torch.no_grad():
                for p in m.parameters():
                    p.normal_(0.0, 0.3)
            folder = tmp_path_factory.mktemp(family)
            m.save_pretrained(folder)
            cache[family] = m, str(folder)
        return cache[family]
    return get


def inputs(family):
    """ids (B, T) and a left-padded mask (row 0 has 3 pads). BERT's ids avoid its pad id 0: HF's
    nn.Embedding(padding_idx=0) gives that row no gradient, minipeft's Embedding does (MODEL-5)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(1 if family == "bert" else 0, V, (B, T))
    mask = np.ones((B, T), dtype=np.int64)
    mask[0, :3] = 0
    return ids, mask


def pair(saved, family):
    """(HF model, the minipeft Model loaded from its folder, ids, mask)."""
    m, folder = saved(family)
    return (m, minipeft.load_model(folder)) + inputs(family)


def hf_out(m, torch, ids, mask=None, **kw):
    out = m(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask), **kw)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def check(actual, ref, label, rtol=1e-5):
    assert_close(actual, ref, rtol=rtol, label=label)
    print(f"{label}: OK rel err {max_rel_err(actual, ref):.1e}")


@pytest.mark.spec("MODEL-2", "MODEL-3", "MODEL-4", "MODEL-5", "MODEL-7")
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(torch, saved, family):
    m, mm, ids, mask = pair(saved, family)
    with torch.no_grad():
        ref, ref_masked = hf_out(m, torch, ids), hf_out(m, torch, ids, mask)
    check(mm(ids), ref, f"{family} logits")
    real = mask.astype(bool)  # pad positions' outputs are meaningless: only real ones are compared
    check(mm(ids, attention_mask=mask).data[real], ref_masked.numpy()[real], f"{family} left-padded")
    if family == "bert":  # token types reach the output
        tt = (np.arange(T)[None, :] >= T // 2).astype(np.int64).repeat(B, 0)
        with torch.no_grad():
            ref_tt = hf_out(m, torch, ids, token_type_ids=torch.tensor(tt))
        check(mm(ids, token_type_ids=tt), ref_tt, "bert token types")


@pytest.mark.spec("MODEL-7")
@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_and_bf16_checkpoints(torch, saved, family, tmp_path):
    m, _, ids, _ = pair(saved, family)
    m.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    with torch.no_grad():
        ref = hf_out(m, torch, ids)
    check(minipeft.load_model(str(tmp_path / "sharded"))(ids), ref, f"{family} sharded")
    m16 = copy.deepcopy(m)
    with torch.no_grad():  # the reference: the bf16 values held in float32. Only the parameters are
        for p in m16.parameters():  # rounded (.to(bfloat16) would round the rotary inv_freq buffer too)
            p.copy_(p.bfloat16().float())
        ref16 = hf_out(m16, torch, ids)
    m16.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    # both compute in float32 from identical weights: float32 rounding is the only difference
    check(minipeft.load_model(str(tmp_path / "bf16"))(ids), ref16, f"{family} bf16")


@pytest.mark.spec("MODEL-10")
@pytest.mark.parametrize("family", CAUSAL)
def test_greedy_generate_equals_transformers(torch, saved, family):
    m, mm, ids, mask = pair(saved, family)
    ids = np.where(mask == 1, ids, 0)  # the pads' ids are never read
    with torch.no_grad():  # finished rows are filled with eos in both (no pad_token_id in the configs)
        ref = m.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8,
                         do_sample=False).numpy()
    out = mm.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert out.shape == ref.shape and (out == ref).all(), f"{family}: {out[:, T:]} != {ref[:, T:]}"
    print(f"{family} greedy: OK, {out.shape[1] - T} new tokens equal in both rows")


@pytest.mark.spec("MODEL-6")
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_of_every_parameter_match_torch(torch, saved, family):
    m, mm, ids, mask = pair(saved, family)
    mm.net.requires_grad_(True)
    m.zero_grad()
    if family == "bert":  # no LM head: a fixed random projection of the last hidden state
        R = np.random.default_rng(2).standard_normal((B, T, 32)).astype(np.float32)
        loss_ref = (hf_out(m, torch, ids, mask) * torch.tensor(R)).sum()
        loss = (mm(ids, attention_mask=mask) * Tensor(R)).sum()
    else:
        labels = np.where(mask == 1, ids, -100)
        loss_ref = m(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss
        loss = causal_lm_loss(mm(ids, attention_mask=mask), labels)
    loss_ref.backward()
    loss.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    ref = {name: p.grad for name, p in m.named_parameters()}
    worst = 0.0
    for name, p in mm.net.named_parameters():
        if name.startswith("pooler."):  # the pooler takes no part in the last hidden state
            assert p.grad is None and (ref[name] is None or not ref[name].any())
        elif name.endswith("attention.self.key.bias"):
            # zero in exact arithmetic: q.(k + b) adds q.b to every score of a row, and softmax
            # ignores a shift, so both sides hold rounding noise; it must be small on the scale of the
            # weight's gradient, with the same 1e-4 relative tolerance as every other gradient
            scale = float(ref[name.replace(".bias", ".weight")].abs().max())
            assert max(float(np.abs(p.grad).max()), float(ref[name].abs().max())) < 1e-4 * scale, name
        else:
            err = max_rel_err(p.grad, ref[name])
            assert err < 1e-4, f"{family} {name}: NOT OK gradient rel err {err:.2e}"
            worst = max(worst, err)
    print(f"{family} gradients of {len(ref)} tensors: OK worst rel err {worst:.1e}")


@pytest.mark.spec("MODEL-8")
@pytest.mark.parametrize("family", FAMILIES)
def test_save_is_read_by_transformers(torch, saved, family, tmp_path):
    import transformers
    _, mm, ids, _ = pair(saved, family)
    mm.save(str(tmp_path / "out"))
    auto = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    back = auto.from_pretrained(str(tmp_path / "out"), attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf_out(back, torch, ids)
    check(mm(ids), ref, f"{family} saved, read by transformers")


@pytest.mark.spec("MODEL-11")
def test_saved_tokenizer_has_the_base_special_tokens(torch, tmp_path):
    """A base folder whose tokenizer transformers saved (special tokens, a chat template) plus a
    generation config and special_tokens_map.json: AutoTokenizer on the merged model minipeft saved has
    the base's special tokens, ids and template, and GenerationConfig the base's. Before (tokenizer.json
    alone) AutoTokenizer found no special token at all."""
    import os
    import shutil
    import transformers
    base = tmp_path / "base"
    shutil.copytree(os.path.join(os.path.dirname(minipeft.__file__), "data", "tiny-llama-chars"), base)
    tok = transformers.AutoTokenizer.from_pretrained(str(base))
    tok.add_special_tokens({"unk_token": "<unk>", "additional_special_tokens": ["<sep>"]})
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(str(base))
    (base / "special_tokens_map.json").write_text('{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}')
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, max_new_tokens=7).save_pretrained(str(base))
    m = minipeft.load_model(str(base)).apply_lora(target_modules=["q_proj", "v_proj"])
    m.merge_and_unload().save(str(tmp_path / "out"))
    ref, ours = (transformers.AutoTokenizer.from_pretrained(str(p)) for p in (base, tmp_path / "out"))
    assert ours.special_tokens_map == ref.special_tokens_map and ref.special_tokens_map["unk_token"] == "<unk>"
    assert ours.all_special_tokens == ref.all_special_tokens and "<sep>" in ours.all_special_tokens
    assert ours("ab <sep> c")["input_ids"] == ref("ab <sep> c")["input_ids"]
    assert ours.chat_template == ref.chat_template
    gen = [transformers.GenerationConfig.from_pretrained(str(p)).to_dict() for p in (base, tmp_path / "out")]
    assert gen[0] == gen[1] and gen[1]["max_new_tokens"] == 7
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(base / name, old / name)
    assert transformers.AutoTokenizer.from_pretrained(str(old)).special_tokens_map == {}
