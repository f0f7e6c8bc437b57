"""Greedy continuations of prompts from a HF model folder: a quick look at what pruning kept."""
from __future__ import annotations

from pathlib import Path

import torch

from drprune.compute import Compute, resolve_compute


def load_hf_model(folder: str | Path, compute: Compute | None = None):
    """(model, tokenizer) from a HF folder, in eval mode on `compute`'s device and dtype (default: the auto
    choice, bf16 on a GPU and fp32 on CPU, whatever dtype the folder holds)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    compute = compute or resolve_compute()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=compute.dtype).to(compute.device).eval()
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
