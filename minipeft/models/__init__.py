"""The transformer stack: one module per family, attribute paths equal to HF checkpoint keys."""
import importlib

# model_type -> (module, class); a family is imported when first used
FAMILIES = {"llama": ("llama", "LlamaForCausalLM"), "mistral": ("llama", "LlamaForCausalLM"),
            "qwen2": ("llama", "LlamaForCausalLM"), "phi": ("phi", "PhiForCausalLM"),
            "gpt2": ("gpt2", "GPT2LMHeadModel"), "bert": ("bert", "BertModel")}
HF_CLASS_NAMES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "phi": "PhiForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertModel"}


def model_class(model_type: str):
    module, cls = FAMILIES[model_type]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
