"""Shared fixtures: tiny random HF models of every family, built locally (no downloads)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 131


def hf_config(family: str):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=128)
    if family == "llama":
        return transformers.LlamaConfig(**common, num_key_value_heads=4)
    if family == "llama_gqa":
        return transformers.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, num_key_value_heads=2, head_dim=24)
    if family == "pythia":
        return transformers.GPTNeoXConfig(**common, rotary_pct=0.25)
    raise ValueError(family)


FAMILIES = ("llama", "llama_gqa", "qwen2", "pythia")


def random_hf_model(family: str, seed: int = 0):
    """A random HF model with non-trivial norms and biases, so key mix-ups cannot hide."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def hf_dir(tmp_path, family):
    model = random_hf_model(family)
    out = tmp_path / f"hf-{family}"
    model.save_pretrained(out)
    return out
