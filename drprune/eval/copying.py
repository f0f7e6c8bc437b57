"""In-context copying probe: a random token span followed by the same span again.

Once the first copy has been read, every token of the second copy after its first is exactly
predictable by looking back (induction heads). Perplexity there is close to 1 for a healthy model and
rises sharply when pruning removes the heads a model copies with, which plain eval perplexity can miss.
Spans are drawn uniformly from a pool of ids the model knows (e.g. those in the eval data), so the probe
measures copying rather than how rare the tokens are.
"""
from __future__ import annotations

import logging

import numpy as np

from drprune.errors import UserError
from drprune.eval.perplexity import row_losses
from drprune.eval.stats import Score, bootstrap_ppl
from drprune.models.decoder import PrunableDecoder

log = logging.getLogger(__name__)


def token_pool_of(rows: np.ndarray, min_count: int = 1) -> np.ndarray:
    """Sorted distinct token ids occurring at least `min_count` times in `rows` (int64)."""
    ids, counts = np.unique(np.asarray(rows, dtype=np.int64), return_counts=True)
    return ids[counts >= min_count]


def copy_rows(token_pool: np.ndarray, *, rows: int = 64, span: int = 64,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids [rows, 2*span] int64, loss_mask [rows, 2*span] bool) for the copying probe.

    Each row is `span` ids drawn uniformly with replacement from `token_pool`, then the same span again.
    loss_mask is True on positions span+1 .. 2*span-1: the second copy's tokens that copying predicts
    exactly (its first token follows the random last token of the first copy, so it is not predictable).
    """
    pool = np.asarray(token_pool, dtype=np.int64).ravel()
    if len(pool) == 0:
        raise UserError("the copying probe needs a non-empty token pool")
    if rows < 1:
        raise UserError(f"copy probe rows={rows} must be >= 1")
    if span < 2:
        raise UserError(f"copy probe span={span} must be >= 2 (the second copy's first token is not scored)")
    rng = np.random.default_rng(seed)
    first = pool[rng.integers(0, len(pool), size=(rows, span))]
    ids = np.concatenate([first, first], axis=1)
    loss_mask = np.zeros_like(ids, dtype=bool)
    loss_mask[:, span + 1:] = True
    return ids, loss_mask


def copy_probe(decoder: PrunableDecoder, token_pool: np.ndarray, *, rows: int = 64, span: int = 64, seed: int = 0,
               batch_size: int = 8, n_boot: int = 1000) -> Score:
    """Perplexity on the predictable second-copy positions, with a bootstrap interval over rows."""
    max_len = decoder.cfg.context_length
    if 2 * span > max_len:
        raise UserError(f"copy probe span={span} needs sequences of 2*span={2 * span} tokens, beyond the model's "
                        f"context length {max_len}: use a span <= {max_len // 2}")
    pool = np.asarray(token_pool, dtype=np.int64)
    vocab = decoder.cfg.vocab_size
    if len(pool) and (int(pool.min()) < 0 or int(pool.max()) >= vocab):
        raise UserError(f"copy probe token pool has ids outside the model's vocab [0, {vocab}): "
                        f"was it taken from data made with another tokenizer?")
    ids, loss_mask = copy_rows(pool, rows=rows, span=span, seed=seed)
    loss_sums, counts = row_losses(decoder, ids, batch_size, loss_mask=loss_mask, desc="copy probe")
    score = bootstrap_ppl(loss_sums, counts, n_boot=n_boot, seed=seed)
    log.info("copy probe (span %d, %d rows, pool %d ids): %.3f [%.3f, %.3f]",
             span, rows, len(pool), score.ppl, score.lo, score.hi)
    return score
