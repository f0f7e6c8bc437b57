"""Greedy continuations of prompts from a HF model folder: a quick look at what pruning kept."""
from __future__ import annotations

from pathlib import Path

import torch


def load_hf_model(folder: str | Path, device: str = "cpu"):
    """(model, tokenizer) from a HF folder, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    return model, tokenizer


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """The generated continuation (prompt excluded) of every prompt, greedy so runs are comparable."""
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").to(model.device)
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out
