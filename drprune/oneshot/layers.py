"""Layer removal scored on calibration data: angular distance (Gromov et al.) or cosine (ShortGPT).

h_0 is the residual stream entering block 0 and h_i the stream leaving block i-1 (before the final
norm, so every state is a raw residual). Per token t:
  angular:  d_l = arccos(cos(h_l[t], h_{l+n}[t])) / pi for the window of n consecutive blocks
            l .. l+n-1; the window with the smallest mean distance changes the stream least.
  cosine:   BI_i = 1 - cos(h_i[t], h_{i+1}[t]) per block (Block Influence); the n blocks with the
            smallest mean BI are removed, consecutive or not.
Means run over every token ("all") or the last token of each row ("last"). Removal is a `layer`
mask, so the result goes through the same compaction and export as every other pruner.
Metrics are LayerMetric classes in the LAYER_METRICS registry (`--pruning-method NAME`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from drprune.errors import UserError
from drprune.masks.base import MaskSet
from drprune.models.decoder import PrunableDecoder
from drprune.progress import track
from drprune.registry import LAYER_METRICS

TOKENS = ("all", "last")
ALIASES = {"angular_distance": "angular", "cosine_similarity": "cosine"}  # PruneGPT's names


class LayerMetric:
    """A per-token score between two residual states; the lowest mean score is removed first.

    `window`: the candidates are windows of n consecutive blocks, scored across the window (h_l vs
    h_{l+n}); otherwise single blocks scored across themselves (h_i vs h_{i+1}), n lowest removed.
    """

    window: bool = False
    title: str = ""  # the score column of the table

    @staticmethod
    def score(cos: Tensor) -> Tensor:
        """Per-token score from the cosine similarity of the two states (clamped to [-1, 1])."""
        raise NotImplementedError


@LAYER_METRICS.register("angular")
class Angular(LayerMetric):
    """Gromov et al.: arccos(cos) / pi across a window of consecutive blocks, removed together."""

    window = True
    title = "angular distance"

    @staticmethod
    def score(cos: Tensor) -> Tensor:
        return torch.arccos(cos) / math.pi


@LAYER_METRICS.register("cosine")
class Cosine(LayerMetric):
    """ShortGPT's Block Influence, 1 - cos across each block; the n lowest go, consecutive or not."""

    title = "block influence (1 - cos)"

    @staticmethod
    def score(cos: Tensor) -> Tensor:
        return 1.0 - cos


def metric(method: str) -> type[LayerMetric]:
    """The registered metric named `method` (PruneGPT's names accepted)."""
    return LAYER_METRICS.get(ALIASES.get(method, method), key="pruning_method")


@dataclass
class LayerSelection:
    """The blocks to remove and the score of every candidate (window start or block)."""

    blocks: list[int]
    scores: list[float]
    method: str


def normalize_skip(skip_blocks: Sequence[int], n_layers: int, key: str = "skip_blocks") -> set[int]:
    """Skip indices as non-negative block ids; negative ones count from the end like Python's."""
    out = set()
    for b in skip_blocks:
        if not -n_layers <= b < n_layers:
            raise UserError(f"{key} entry {b} is outside the model's {n_layers} blocks "
                            f"(valid: {-n_layers}..{n_layers - 1})")
        out.add(b % n_layers)
    return out


def check_request(n_layers: int, num_blocks: int, method: str, token: str, skip_blocks: Sequence[int]) -> str:
    """Fail before any forward pass when the request cannot be met; returns the canonical method."""
    method = ALIASES.get(method, method)
    window = metric(method).window
    if token not in TOKENS:
        raise UserError(f"pruning_token {token!r} is unknown: use one of {TOKENS}")
    skip = normalize_skip(skip_blocks, n_layers)
    if not 1 <= num_blocks < n_layers:
        raise UserError(f"num_blocks_to_prune={num_blocks} must be in 1..{n_layers - 1} for a {n_layers}-block model")
    if window and not _windows(n_layers, num_blocks, skip):
        raise UserError(f"no {num_blocks} consecutive blocks avoid skip_blocks={sorted(skip)} in a "
                        f"{n_layers}-block model: prune fewer blocks or skip fewer")
    if not window and n_layers - len(skip) < num_blocks:
        raise UserError(f"only {n_layers - len(skip)} blocks are not in skip_blocks={sorted(skip)}, fewer than "
                        f"num_blocks_to_prune={num_blocks}: prune fewer blocks or skip fewer")
    return method


def _windows(n_layers: int, n: int, skip: set[int]) -> list[int]:
    return [s for s in range(n_layers - n + 1) if not skip & set(range(s, s + n))]


def state_scores(states: list[Tensor], method: str, n: int, token: str) -> tuple[Tensor, int]:
    """Summed per-token scores for each candidate and the number of tokens summed, from states [B,T,d]."""
    m = metric(method)
    span = n if m.window else 1
    if token == "last":
        states = [h[:, -1:] for h in states]
    sums = []
    for start in range(len(states) - span):
        cos = F.cosine_similarity(states[start].float(), states[start + span].float(), dim=-1).clamp(-1.0, 1.0)
        sums.append(m.score(cos).sum())
    return torch.stack(sums), states[0].shape[0] * states[0].shape[1]


@torch.no_grad()
def residual_states(decoder: PrunableDecoder, ids: Tensor) -> list[Tensor]:
    """[h_0, ..., h_L]: the residual stream entering block 0 and leaving every block."""
    blocks = decoder.transformer["blocks"]
    states: list[Tensor] = []
    hooks = [blocks[0].register_forward_pre_hook(lambda _m, args: states.append(args[0]))]
    hooks += [b.register_forward_hook(lambda _m, _a, out: states.append(out)) for b in blocks]
    try:
        decoder(ids)
    finally:
        for h in hooks:
            h.remove()
    return states


@torch.no_grad()
def score_blocks(decoder: PrunableDecoder, rows: np.ndarray, *, method: str, num_blocks: int,
                 token: str = "all", batch_size: int = 8) -> Tensor:
    """Mean score per candidate: window starts 0..L-n (window metrics) or blocks 0..L-1."""
    decoder.eval()
    device = next(decoder.parameters()).device
    total, count = None, 0
    for start in track(range(0, len(rows), batch_size), f"calibration: {method} scores", unit="batches"):
        ids = torch.from_numpy(rows[start:start + batch_size]).long().to(device)
        sums, n = state_scores(residual_states(decoder, ids), method, num_blocks, token)
        total = sums if total is None else total + sums
        count += n
    return (total / count).cpu()


def choose_blocks(scores: Sequence[float], *, method: str, num_blocks: int, n_layers: int,
                  skip_blocks: Sequence[int] = ()) -> list[int]:
    """The blocks to remove: the best allowed window (window metrics) or the lowest-scoring blocks."""
    skip = normalize_skip(skip_blocks, n_layers)
    if metric(method).window:
        starts = _windows(n_layers, num_blocks, skip)
        best = min(starts, key=lambda s: (scores[s], s))
        return list(range(best, best + num_blocks))
    allowed = sorted((i for i in range(n_layers) if i not in skip), key=lambda i: (scores[i], i))
    return sorted(allowed[:num_blocks])


def select_blocks(decoder: PrunableDecoder, rows: np.ndarray, *, num_blocks: int, method: str = "angular",
                  token: str = "all", skip_blocks: Sequence[int] = (), batch_size: int = 8) -> LayerSelection:
    """Score the blocks of `decoder` on `rows` and pick `num_blocks` to remove."""
    n_layers = decoder.cfg.n_layers
    method = check_request(n_layers, num_blocks, method, token, skip_blocks)
    scores = score_blocks(decoder, rows, method=method, num_blocks=num_blocks, token=token,
                          batch_size=batch_size).tolist()
    blocks = choose_blocks(scores, method=method, num_blocks=num_blocks, n_layers=n_layers, skip_blocks=skip_blocks)
    return LayerSelection(blocks, scores, method)


def layer_masks(n_layers: int, blocks: Sequence[int]) -> MaskSet:
    """Hard masks that remove `blocks` (0) and keep every other block unscaled (1)."""
    layer = torch.ones(n_layers)
    layer[list(blocks)] = 0.0
    return MaskSet(layer=layer)


def score_table(selection: LayerSelection, num_blocks: int) -> str:
    """The score of every candidate, the chosen ones marked with *."""
    m = metric(selection.method)
    lines = [f"{'window' if m.window else 'block':>9}  {m.title}"]
    for i, score in enumerate(selection.scores):
        name = f"{i}-{i + num_blocks - 1}" if m.window and num_blocks > 1 else str(i)
        chosen = (i == selection.blocks[0]) if m.window else i in selection.blocks
        lines.append(f"{name:>9}  {score:.6f}{'  *' if chosen else ''}")
    lines.append(f"removing blocks {selection.blocks}")
    return "\n".join(lines)
