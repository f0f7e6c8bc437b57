"""Per-domain perplexity of a decoder on MDS eval shards (`eval/<domain>/` folders), with bootstrap intervals."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from drprune.errors import UserError
from drprune.eval.stats import Score, bootstrap_geomean, bootstrap_ppl
from drprune.models.losses import IGNORE_INDEX, token_losses
from drprune.models.decoder import PrunableDecoder
from drprune.data.shards import ShardReader
from drprune.progress import track

log = logging.getLogger(__name__)

# Fewer eval rows per domain than this cannot rank models.
MIN_RANK_ROWS = 64


def read_token_rows(folder: str | Path, max_rows: int | None = None) -> np.ndarray:
    """Token rows [N, T] of one MDS folder, in order; every shard read is checked against its recorded
    size and hash first, so a corrupted shard is an error naming it, never silently wrong tokens."""

    folder = Path(folder)
    if not (folder / "index.json").is_file():
        raise UserError(f"{folder} is not an MDS folder (no index.json): run `drprune data prepare` first")
    reader = ShardReader(folder, verify=True)
    n = len(reader) if max_rows is None else min(len(reader), max_rows)
    return np.stack([np.asarray(reader[i]["tokens"], dtype=np.int64) for i in range(n)])


@torch.no_grad()
def row_losses(decoder: PrunableDecoder, rows: np.ndarray, batch_size: int = 8, masks=None,
               loss_mask: np.ndarray | None = None, desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-row summed next-token loss (float64) and scored-token count (int64), [N] each.

    Kept per row because rows are the unit a bootstrap interval resamples. `loss_mask` [N, T] (bool)
    restricts the scored targets: position t scores the prediction of token t, so position 0 never counts.
    """
    if rows.ndim != 2:
        raise ValueError(f"rows must be [N, T], got shape {rows.shape}")
    if loss_mask is not None and loss_mask.shape != rows.shape:
        raise ValueError(f"loss_mask shape {loss_mask.shape} differs from rows shape {rows.shape}")
    decoder.eval()
    device = next(decoder.parameters()).device
    loss_sums = np.zeros(len(rows), dtype=np.float64)
    counts = np.zeros(len(rows), dtype=np.int64)
    starts = range(0, len(rows), batch_size)
    for start in starts if desc is None else track(starts, desc, unit="batches"):
        ids = torch.from_numpy(np.ascontiguousarray(rows[start:start + batch_size], dtype=np.int64)).to(device)
        labels = ids
        if loss_mask is not None:
            keep = torch.from_numpy(np.asarray(loss_mask[start:start + batch_size], dtype=bool)).to(device)
            labels = ids.masked_fill(~keep, IGNORE_INDEX)
        loss_sum, tokens = token_losses(decoder(ids, masks), labels)
        loss_sums[start:start + len(ids)] = loss_sum.double().cpu().numpy()
        counts[start:start + len(ids)] = tokens.cpu().numpy()
    return loss_sums, counts


def perplexity(decoder: PrunableDecoder, rows: np.ndarray, batch_size: int = 8, masks=None,
               desc: str | None = None) -> float:
    """exp(mean next-token cross-entropy) over every token of `rows`."""
    loss_sums, counts = row_losses(decoder, rows, batch_size, masks, desc=desc)
    return math.exp(loss_sums.sum() / counts.sum())


@dataclass
class EvalResult:
    """Per-domain scores and their geometric mean (every domain weighing the same), JSON round-trippable."""

    domains: dict[str, Score]
    geomean: Score
    rows: dict[str, tuple[np.ndarray, np.ndarray]] | None = field(default=None, compare=False)  # per-row sums, tokens

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"domains": {d: s.to_dict() for d, s in self.domains.items()},
                               "geomean": self.geomean.to_dict()}
        if self.rows is not None:  # kept so two models scored on the same rows can be compared paired
            out["rows"] = {d: {"loss_sums": loss.tolist(), "tokens": tok.tolist()}
                           for d, (loss, tok) in self.rows.items()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalResult:
        rows = d.get("rows")
        return cls(domains={k: Score.from_dict(v) for k, v in d["domains"].items()},
                   geomean=Score.from_dict(d["geomean"]),
                   rows=None if rows is None else {k: (np.asarray(v["loss_sums"], dtype=np.float64),
                                                       np.asarray(v["tokens"], dtype=np.int64))
                                                   for k, v in rows.items()})


def domain_rows(decoder: PrunableDecoder, data_dir: str | Path, domain: str, *, split: str = "eval",
                max_rows: int | None = None) -> np.ndarray:
    """Eval rows of one domain, checked against the model's vocab."""
    folder = Path(data_dir) / split / domain
    rows = read_token_rows(folder, max_rows)
    if int(rows.max()) >= decoder.cfg.vocab_size:
        raise UserError(f"{folder} has token ids beyond the model's vocab "
                        f"({decoder.cfg.vocab_size}): were the shards made with another tokenizer?")
    return rows


def evaluate_domains(decoder: PrunableDecoder, data_dir: str | Path, domains: list[str], *, split: str = "eval",
                     max_rows: int | None = None, batch_size: int = 8, masks=None, n_boot: int = 1000,
                     seed: int = 0) -> EvalResult:
    """Perplexity per domain of `data_dir/split/<domain>/` and their geometric mean, with 95% bootstrap intervals."""
    data_dir = Path(data_dir)
    missing = [d for d in domains if not (data_dir / split / d).is_dir()]
    if missing:
        raise UserError(f"no eval shards for domains {missing} under {data_dir / split}")
    if not domains:
        raise UserError(f"no domains to evaluate under {data_dir / split}")
    per_domain: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    scores: dict[str, Score] = {}
    for domain in domains:
        rows = domain_rows(decoder, data_dir, domain, split=split, max_rows=max_rows)
        if len(rows) < MIN_RANK_ROWS and max_rows is not None and len(rows) == max_rows:
            log.warning("%s: only %d eval rows (max_rows); ranking models needs >= %d per domain",
                        domain, len(rows), MIN_RANK_ROWS)
        per_domain[domain] = row_losses(decoder, rows, batch_size, masks, desc=f"ppl {domain}")
        scores[domain] = bootstrap_ppl(*per_domain[domain], n_boot=n_boot, seed=seed)
        s = scores[domain]
        log.info("perplexity %s: %.3f [%.3f, %.3f] (%d rows)", domain, s.ppl, s.lo, s.hi, s.rows)
    geomean = bootstrap_geomean(per_domain, n_boot=n_boot, seed=seed)
    log.info("perplexity geomean: %.3f [%.3f, %.3f]", geomean.ppl, geomean.lo, geomean.hi)
    return EvalResult(domains=scores, geomean=geomean, rows=per_domain)


def domain_perplexity(decoder: PrunableDecoder, data_dir: str | Path, domains: list[str], *, split: str = "eval",
                      max_rows: int | None = None, batch_size: int = 8, masks=None) -> dict[str, float]:
    """Perplexity per domain, reading `data_dir/split/<domain>/` (point estimates of `evaluate_domains`)."""
    result = evaluate_domains(decoder, data_dir, domains, split=split, max_rows=max_rows, batch_size=batch_size,
                              masks=masks)
    return {d: s.ppl for d, s in result.domains.items()}
