"""Synthetic MDS datasets for tests and demos, written with the same writer code as `prepare`."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from drprune.data.prepare import EVAL_MERGE, merge
from drprune.atomic import atomic_output
from drprune.data.shards import Packer, open_writer, token_dtype

KINDS = ("random", "repetitive")


def _documents(kind: str, name: str, n: int, seq_len: int, vocab_size: int, seed: int, split: str) -> list[list[int]]:
    """n documents of seq_len-1 tokens (the packer adds EOS, so each becomes exactly one sequence)."""
    rng = np.random.default_rng([seed, zlib.crc32(f"{name}/{split}".encode())])
    body = vocab_size - 1  # the last id is EOS
    if kind == "random":
        return rng.integers(0, body, size=(n, seq_len - 1)).tolist()
    if kind == "repetitive":
        pattern = np.random.default_rng([seed, zlib.crc32(name.encode())]).integers(0, body, size=4)
        row = np.resize(pattern, seq_len - 1)
        return [row.tolist()] * n
    raise ValueError(f"domain kind {kind!r} is not one of {KINDS}")


def write_synthetic_mds(root, domains: dict[str, str], *, seq_len: int, vocab_size: int, n_train: int,
                        n_eval: int, seed: int = 0) -> Path:
    """Write root/train/<d>, root/eval/<d>, root/eval/eval_merge for domains {name: kind}; return root."""
    root = Path(root)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()  # an empty folder (e.g. pytest's tmp_path) is fine to write into
    dtype = token_dtype(vocab_size)
    with atomic_output(root, overwrite=False, folder=True) as tmp:
        for name, kind in domains.items():
            for split, n in (("train", n_train), ("eval", n_eval)):
                packer = Packer(open_writer(tmp / split / name, dtype), name, seq_len, dtype)
                packer.add(_documents(kind, name, n, seq_len, vocab_size, seed, split), vocab_size - 1)
                packer.close()
        merge(tmp / "eval", tmp / "eval", EVAL_MERGE, list(domains))
    return root
