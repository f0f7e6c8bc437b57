"""Per-domain perplexity of a decoder on MDS eval shards (`eval/<domain>/` folders)."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from drprune.errors import UserError
from drprune.models.composer_model import token_losses
from drprune.models.decoder import PrunableDecoder

log = logging.getLogger(__name__)


def read_token_rows(folder: str | Path, max_rows: int | None = None) -> np.ndarray:
    """Token rows [N, T] of one MDS folder, in order (plain streaming reader, no shuffling)."""
    from streaming import LocalDataset

    folder = Path(folder)
    if not (folder / "index.json").is_file():
        raise UserError(f"{folder} is not an MDS folder (no index.json): run `drprune data prepare` first")
    dataset = LocalDataset(local=str(folder))
    n = len(dataset) if max_rows is None else min(len(dataset), max_rows)
    if n == 0:
        raise UserError(f"MDS folder {folder} holds no samples")
    return np.stack([np.asarray(dataset[i]["tokens"], dtype=np.int64) for i in range(n)])


@torch.no_grad()
def perplexity(decoder: PrunableDecoder, rows: np.ndarray, batch_size: int = 8, masks=None,
               desc: str | None = None) -> float:
    """exp(mean next-token cross-entropy) over every token of `rows`."""
    decoder.eval()
    device = next(decoder.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False, disable=desc is None):
        ids = torch.from_numpy(rows[start:start + batch_size]).to(device)
        loss_sum, tokens = token_losses(decoder(ids, masks), ids)
        total += float(loss_sum.sum())
        count += int(tokens.sum())
    return math.exp(total / count)


def domain_perplexity(decoder: PrunableDecoder, data_dir: str | Path, domains: list[str], *, split: str = "eval",
                      max_rows: int | None = None, batch_size: int = 8, masks=None) -> dict[str, float]:
    """Perplexity per domain, reading `data_dir/split/<domain>/`."""
    data_dir = Path(data_dir)
    missing = [d for d in domains if not (data_dir / split / d).is_dir()]
    if missing:
        raise UserError(f"no eval shards for domains {missing} under {data_dir / split}")
    out = {}
    for domain in domains:
        rows = read_token_rows(data_dir / split / domain, max_rows)
        if int(rows.max()) >= decoder.cfg.vocab_size:
            raise UserError(f"{data_dir / split / domain} has token ids beyond the model's vocab "
                            f"({decoder.cfg.vocab_size}): were the shards made with another tokenizer?")
        out[domain] = perplexity(decoder, rows, batch_size, masks, desc=f"ppl {domain}")
        log.info("perplexity %s: %.3f", domain, out[domain])
    return out
