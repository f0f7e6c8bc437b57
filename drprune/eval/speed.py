"""Inference throughput of a HF model: prefill tokens/s and greedy decoding tokens/s.

Shared CPUs are noisy, so every number is the best of a few repeats (the least disturbed run).
"""
from __future__ import annotations

import time

import torch


def _best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def throughput(model, *, batch: int = 4, seq_len: int = 128, new_tokens: int = 32, repeats: int = 3,
               seed: int = 0) -> dict[str, float]:
    """{"prefill_tokens_per_s", "decode_tokens_per_s"} on random token ids (speed only, not quality)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(model.device)
    prompt = ids[:1, :16]
    model(ids)  # warm-up
    prefill = _best_seconds(lambda: model(ids), repeats)
    decode = _best_seconds(lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                  do_sample=False, pad_token_id=0), repeats)
    return {"prefill_tokens_per_s": batch * seq_len / prefill, "decode_tokens_per_s": new_tokens / decode}
