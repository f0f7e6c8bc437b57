"""Calibration data for one-shot pruners: token rows from an MDS folder or from raw text files.

One-shot scores only need a little data, so rows are read eagerly into one int64 array. An MDS
input may be a single MDS folder or the root written by `drprune data prepare` (its train/<domain>
folders are read in turn); anything else is raw text (.txt/.jsonl/.json files or folders), which
needs a tokenizer and is packed into rows the way `data prepare` packs it (EOS between documents).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from drprune.atomic import visible
from drprune.errors import UserError
from drprune.data.identity import model_tokenizer
from drprune.data.shards import ShardReader
from drprune.data.sources import Tokenizer, iter_documents
from drprune.eval.perplexity import read_token_rows
from drprune.progress import track

log = logging.getLogger(__name__)

EVAL_MERGE = "eval_merge"


def mds_folders(data: Path, split: str = "train") -> list[Path]:
    """The MDS folders behind `data`: itself, or `data/<split>/<domain>` of a prepared root."""
    if (data / "index.json").is_file():
        return [data]
    split_dir = data / split
    if split_dir.is_dir():
        found = [p for p in visible(split_dir) if (p / "index.json").is_file() and p.name != EVAL_MERGE]
        if found:
            return found
    return []


def resolve_tokenizer(model: str | Path, tokenizer: str | Path | None) -> str | None:
    """The tokenizer to read text with: the flag, else MODEL when it is a HF folder holding one."""

    return str(tokenizer) if tokenizer is not None else model_tokenizer(model)


def load_rows(data: str | Path, *, tokenizer: str | None, seq_len: int, max_rows: int) -> np.ndarray:
    """At most `max_rows` rows [N, T] of token ids (T = seq_len for text, the stored length for MDS)."""
    if max_rows < 1 or seq_len < 2:
        raise UserError(f"calibration needs max_rows >= 1 and seq_len >= 2 (got {max_rows}, {seq_len})")
    path = Path(data)
    if not path.exists():
        raise UserError(f"calibration data {path} does not exist (an MDS folder or text files)")
    folders = mds_folders(path)
    if folders:
        return _mds_rows(folders, max_rows)
    tokens = _text_tokens(path, tokenizer, max_tokens=max_rows * seq_len)
    if len(tokens) < seq_len:
        return tokens[None, :]
    n = min(max_rows, len(tokens) // seq_len)
    return tokens[: n * seq_len].reshape(n, seq_len)


def token_counts(data: str | Path, *, tokenizer: str | None, vocab_size: int) -> np.ndarray:
    """How often each token id occurs in all of `data` (every MDS row, or all of the text)."""
    path = Path(data)
    if not path.exists():
        raise UserError(f"calibration data {path} does not exist (an MDS folder or text files)")
    folders = mds_folders(path)
    tokens = _mds_rows(folders, None).ravel() if folders else _text_tokens(path, tokenizer, None)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise UserError(f"{path} holds token ids beyond the vocabulary ({vocab_size}): made with another tokenizer?")
    return np.bincount(tokens, minlength=vocab_size)


def balanced_quota(sizes: list[int], max_rows: int) -> list[int]:
    """Rows to take from each domain: dealt round-robin, one at a time, so domains differ by at most
    one row (the first domains get the extra ones) and a small domain's unused share goes to the
    others. Taking ceil(max_rows / k) from each and truncating would starve the last domains."""
    quota = [0] * len(sizes)
    left = min(max_rows, sum(sizes))
    while left:
        for i, size in enumerate(sizes):
            if left and quota[i] < size:
                quota[i] += 1
                left -= 1
    return quota


def _mds_rows(folders: list[Path], max_rows: int | None) -> np.ndarray:
    if max_rows is None:
        return np.concatenate([read_token_rows(f) for f in folders])
    quota = balanced_quota([len(ShardReader(f)) for f in folders], max_rows)
    log.info("calibration rows per domain: %s", ", ".join(f"{f.name} {q}" for f, q in zip(folders, quota)))
    return np.concatenate([read_token_rows(f, q) for f, q in zip(folders, quota) if q])


def _text_tokens(path: Path, tokenizer: str | None, max_tokens: int | None) -> np.ndarray:
    if tokenizer is None:
        raise UserError(
            f"{path} is raw text (not an MDS folder), which needs a tokenizer: pass --tokenizer "
            "(a HF tokenizer folder or a SentencePiece .model) or a MODEL folder that holds one"
        )
    tok = Tokenizer(tokenizer)
    out: list[int] = []
    for doc in track(iter_documents(path), f"calibration text {path.name}", unit="docs"):
        out.extend(tok.encode([doc])[0])
        out.append(tok.eos_id)
        if max_tokens is not None and len(out) >= max_tokens:
            break
    if len(out) < 2:
        raise UserError(f"{path} yields fewer than two tokens: not enough calibration text")
    return np.asarray(out if max_tokens is None else out[:max_tokens], dtype=np.int64)
