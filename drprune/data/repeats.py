"""Rows of natural text in which earlier spans of the same row come back: data that teaches copying.

A model recovers in-context copying only from text where looking back pays; ordinary training text
rarely repeats long spans. A repeats row is the text of one domain, in order, in which after every
stretch of fresh text a span of what the row already holds is copied again:

    [fresh text, GAP tokens] [copy of an earlier span, SPAN tokens] [fresh text] [copy] ...

How this differs from the copy probe (`drprune.eval.copying`), which must stay a held-out test:
  token source  probe: ids drawn uniformly at random from a pool (no text);
                repeats: the domain's own tokens, in their order (natural text).
  span length   probe: one span of 64 tokens; repeats: several spans of `min_span`..`max_span`
                tokens (8..32 at the default limits, never 64).
  offsets       probe: the span starts the row and its copy follows at once (distance = span);
                repeats: each span starts at a random earlier offset of the row (distance span..row
                so far), and copies are `min_gap`..`max_gap` tokens of fresh text apart (16..64).
The one-shot copy-aware scorer (`drprune.oneshot.copy_importance`) builds its scoring sequences
the same way from calibration rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from drprune.errors import UserError

SPAN = (8, 32)  # copied span lengths at full size
GAP = (16, 64)  # fresh-text lengths between copies at full size


@dataclass(frozen=True)
class RepeatLimits:
    """Inclusive ranges of copied span lengths and of fresh-text gaps, in tokens."""

    min_span: int
    max_span: int
    min_gap: int
    max_gap: int

    def as_dict(self) -> dict[str, list[int]]:
        return {"span": [self.min_span, self.max_span], "gap": [self.min_gap, self.max_gap]}


@dataclass(frozen=True)
class Copy:
    """row[dst : dst + length] == row[src : src + length], with src + length <= dst."""

    src: int
    dst: int
    length: int


def limits_for(seq_len: int) -> RepeatLimits:
    """The default limits (spans 8..32, gaps 16..64), scaled down for rows too short to hold them."""
    if seq_len < 8:
        raise UserError(f"rows of {seq_len} tokens are too short for a repeated span: repeats rows need >= 8 tokens")
    max_span = min(SPAN[1], seq_len // 4)
    max_gap = min(GAP[1], seq_len // 2)
    return RepeatLimits(min(SPAN[0], max(2, max_span // 2)), max_span, min(GAP[0], max(2, max_gap // 2)), max_gap)


def repeat_row(text: np.ndarray, seq_len: int, rng: np.random.Generator,
               limits: RepeatLimits) -> tuple[np.ndarray, list[Copy], int] | None:
    """(row [seq_len], its copies, fresh tokens of `text` consumed), or None when `text` runs out first.

    Fresh text and copies alternate; a copy whose room left in the row is below `min_span` is not made
    (the row is filled with fresh text instead), and the last copy may be cut at the row's end.
    """
    row = np.empty(seq_len, dtype=text.dtype)
    copies: list[Copy] = []
    n = pos = 0
    while n < seq_len:
        take = min(int(rng.integers(limits.min_gap, limits.max_gap + 1)), seq_len - n)
        if seq_len - n - take < limits.min_span:
            take = seq_len - n
        if pos + take > len(text):
            return None
        row[n:n + take] = text[pos:pos + take]
        n, pos = n + take, pos + take
        if n == seq_len:
            break
        span = min(int(rng.integers(limits.min_span, limits.max_span + 1)), n, seq_len - n)
        src = int(rng.integers(0, n - span + 1))
        row[n:n + span] = row[src:src + span]
        copies.append(Copy(src, n, span))
        n += span
    return row, copies, pos


def repeat_rows(chunks: Iterable[np.ndarray], seq_len: int, rng: np.random.Generator,
                limits: RepeatLimits | None = None) -> Iterator[tuple[np.ndarray, list[Copy]]]:
    """Repeats rows from a stream of token chunks (read in order, each fresh token used once), until
    the stream cannot fill another row; memory stays at a few rows whatever the stream's length."""
    limits = limits or limits_for(seq_len)
    buffer = np.zeros(0, dtype=np.int64)
    chunks = iter(chunks)
    exhausted = False
    while True:
        while not exhausted and len(buffer) < 2 * seq_len:
            chunk = next(chunks, None)
            if chunk is None:
                exhausted = True
            else:
                buffer = np.concatenate([buffer, np.asarray(chunk, dtype=np.int64).ravel()])
        made = repeat_row(buffer, seq_len, rng, limits)
        if made is None:
            return
        row, copies, used = made
        buffer = buffer[used:]
        yield row, copies


def copied_positions(copies: list[Copy], seq_len: int) -> np.ndarray:
    """[seq_len] int64: for a position t whose next token copying predicts, the position of the token
    after t's earlier occurrence (where an induction head looks); -1 elsewhere.

    Within a copy, position dst + i (i < length - 1) is followed by row[src + i + 1], which the copy's
    source holds; the copy's first token is predicted from the gap before it, so it is not counted.
    """
    out = np.full(seq_len, -1, dtype=np.int64)
    for c in copies:
        i = np.arange(c.length - 1)
        out[c.dst + i] = c.src + i + 1
    return out
