"""Throughput of the dynamic mixture vs plain StreamingDataset on the same shards, and of `prepare`.

    python benchmarks/bench_data_loader.py [--samples 4000] [--seq-len 512] [--tokenizer HF_DIR]

Prints mixture/plain samples-per-second ratios for num_workers 0 and 2 (target >= 0.9), and the
tokens/s of `drprune data prepare` with a fast tokenizer (a small BPE trained here unless given).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from drprune.data.collate import collate
from drprune.data.loaders import build_train_dataloader
from drprune.run_config import RunConfig
from drprune.data.testing import write_synthetic_mds

DOMAINS = {"a": "random", "b": "repetitive", "c": "random", "d": "random"}


def _rate(loader, batches: int) -> float:
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * loader.batch_size / (time.perf_counter() - start)


def bench_loaders(root: Path, seq_len: int, batch: int, batches: int) -> None:
    from streaming import Stream, StreamingDataset

    for workers in (0, 2):
        plain = StreamingDataset(streams=[Stream(local=str(root / "train" / d)) for d in DOMAINS], shuffle=True,
                                 batch_size=batch, shuffle_seed=1)
        plain_rate = _rate(DataLoader(plain, batch_size=batch, num_workers=workers,
                                      collate_fn=lambda s: collate([{**x, "set": 0, "idx": 0} for x in s])), batches)
        cfg = RunConfig.from_cfg({"data_local": str(root), "max_seq_len": seq_len, "seed": 1, "max_duration": "1ba",
                                  "global_train_batch_size": batch,
                                "train_loader": {"num_workers": workers},
                                "callbacks": {"data_loading": {"dynamic": True, "set_names": list(DOMAINS),
                                                               "proportion": [0.4, 0.3, 0.2, 0.1]}}})
        mix_rate = _rate(build_train_dataloader(cfg.data, batch), batches)
        print(f"num_workers={workers}: plain {plain_rate:9.0f} samples/s  mixture {mix_rate:9.0f} samples/s  "
              f"ratio {mix_rate / plain_rate:.2f}")


def bench_prepare(tmp: Path, tokenizer: str | None, chars: int) -> None:
    from drprune.data.prepare import prepare

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9))) for _ in range(3000)]
    docs = [" ".join(rng.choice(words, size=200)) for _ in range(chars // 1200)]
    src = tmp / "src"
    src.mkdir()
    (src / "d.jsonl").write_text("\n".join(f'{{"text": "{d}"}}' for d in docs))
    if tokenizer is None:
        from tokenizers import ByteLevelBPETokenizer
        from transformers import PreTrainedTokenizerFast

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(docs[:200], vocab_size=4000, special_tokens=["<eos>"], show_progress=False)
        PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>").save_pretrained(tmp / "tok")
        tokenizer = str(tmp / "tok")
    start = time.perf_counter()
    stats = prepare({"d": src / "d.jsonl"}, tokenizer, 512, tmp / "out", eval_fraction=0.01)
    seconds = time.perf_counter() - start
    tokens = sum(s.tokens for s in stats if s.domain == "d")
    print(f"prepare: {tokens} tokens in {seconds:.2f}s = {tokens / seconds:,.0f} tokens/s ({len(docs)} docs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000, help="train sequences per domain")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--chars", type=int, default=3_000_000, help="raw text size for the prepare benchmark")
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer folder (default: a BPE trained here)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_mds(Path(tmp) / "data", DOMAINS, seq_len=args.seq_len, vocab_size=32000,
                                   n_train=args.samples, n_eval=8)
        bench_loaders(root, args.seq_len, args.batch, args.batches)
        bench_prepare(Path(tmp), args.tokenizer, args.chars)


if __name__ == "__main__":
    main()
