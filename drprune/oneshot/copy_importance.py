"""Copy-aware importance: the KV groups and layers a model reads its context with.

In-context copying lives in a few attention heads (induction and retrieval heads: fewer than 5% of
heads, Wu et al. 2024, arXiv 2404.15574) that a calibration average of activations or weights does
not single out: pruning SmolLM2-135M by activation importance took its copy-probe perplexity from
3.9 to 90,000 (docs/quality.md). These scores ask the model what it copies with instead.

Scoring sequences are repeats rows (drprune.data.repeats) built from the calibration rows' tokens:
natural text in which earlier spans of the row come back after a gap. That is not the copy probe's
construction (ids drawn at random from a pool, one 64-token span repeated at once), so the probe
stays a held-out test. The scored positions are those whose next token the copy predicts.

  ablation   loss increase (nats per scored token) when one KV group's heads are masked (the decoder's
             `head` mask) or one block is skipped: what the model uses to copy. The residual stream
             entering every block is computed once, so each unit costs a forward pass from its layer on.
  induction  mean attention, at the scored positions, to the token after the current token's earlier
             occurrence (an induction head's signature); one forward pass. A KV group scores as its
             best query head: one induction head is reason enough to keep its group.

The two see different parts of a copying circuit. Ablation sees what is needed on its own, the
previous-token heads an induction head reads from included, but not heads that back each other up
(removing one of several induction heads costs little). The induction score sees every induction
head but not the heads it reads from. On SmolLM2-135M, protecting 3 or 10 KV groups by induction
saved copying better than by ablation (docs/copying.md), and it costs one forward pass: it is the
default of protection.

Registered scorers: `copy` (ablation) and `induction` score KV groups that way and MLP channels and
hidden dims by `activation`, so each is a complete width scorer. `top_copy_groups` (by either score)
and `top_copy_layers` (by ablation) pick the units `oneshot width --protect-copy-heads K
[--copy-score S]` and `oneshot layers --protect-copy-layers K` keep whatever the main importance says.
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drprune.data.repeats import copied_positions, repeat_rows
from drprune.errors import UserError
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder, apply_rotary
from drprune.oneshot.importance import Scores, activation
from drprune.oneshot.layers import residual_states
from drprune.progress import track
from drprune.registry import IMPORTANCE

COPY_ROWS = 16  # scoring sequences: ablation runs (layers x KV groups) partial forward passes over them
COPY_SEQ_LEN = 512  # at most this many tokens per scoring sequence: the induction score holds [B, H, T, T]
COPY_SCORES = ("ablation", "induction")
SEED_SALT = 0xC0B7  # the scoring sequences' random stream differs from the repeats domain's at the same seed

log = logging.getLogger(__name__)


@dataclass
class CopyScores:
    """Loss increase on copied tokens (nats/token) per masked KV group [L, H_kv] and per skipped block [L];
    `base` is the unpruned model's loss there. A unit not measured scores 0."""

    head: Tensor
    layer: Tensor
    base: float


def copy_sequences(rows: np.ndarray, *, max_rows: int = COPY_ROWS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids [N, T] int64, source [N, T] int64) from calibration rows [*, R]: repeats rows of their tokens
    (T = min(R, COPY_SEQ_LEN)), and for each position whose next token copying predicts, where its
    earlier occurrence's successor is (else -1)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 2 or rows.size == 0:
        raise UserError("copy-aware scoring needs calibration rows (--calib)")
    seq_len = min(rows.shape[1], COPY_SEQ_LEN)
    rng = np.random.default_rng([seed, SEED_SALT])
    made = list(itertools.islice(repeat_rows(iter(rows), seq_len, rng), max_rows))
    if not made:
        raise UserError(f"copy-aware scoring: {rows.size} calibration tokens do not fill one {seq_len}-token "
                        "scoring row; give more calibration rows (--max-rows)")
    ids = np.stack([row for row, _ in made])
    source = np.stack([copied_positions(copies, seq_len) for _, copies in made])
    if not (source >= 0).any():
        raise UserError(f"copy-aware scoring: {seq_len}-token calibration rows leave no room for a copied span; "
                        "use longer rows (--seq-len)")
    return ids, source


def _batches(ids: np.ndarray, source: np.ndarray, batch_size: int, device: torch.device):
    for start in range(0, len(ids), batch_size):
        yield (torch.from_numpy(ids[start:start + batch_size]).to(device),
               torch.from_numpy(source[start:start + batch_size]).to(device))


def _check(decoder: PrunableDecoder) -> None:
    if not decoder.cfg.is_uniform:
        raise UserError("copy-aware scoring applies to a full model, not an already compacted one")


def _copied_loss(decoder: PrunableDecoder, x: Tensor, start: int, rope: tuple[Tensor, Tensor], scored: Tensor,
                 targets: Tensor) -> float:
    """Summed loss on the `scored` positions, running blocks start.. on the residual stream x."""
    for block in decoder.transformer["blocks"][start:]:
        x = block(x, rope, {})
    h = decoder.transformer["ln_f"](x)[scored]
    return float(F.cross_entropy(F.linear(h, decoder.output_weight()).float(), targets, reduction="sum"))


@torch.no_grad()
def ablation_scores(decoder: PrunableDecoder, ids: np.ndarray, source: np.ndarray, *, heads: bool = True,
                    layers: bool = True, batch_size: int = 4) -> CopyScores:
    """Loss increase on the copied positions of `ids` (`source >= 0`) when each KV group / block is removed."""
    _check(decoder)
    cfg = decoder.cfg
    decoder.eval()
    device = next(decoder.parameters()).device
    blocks = decoder.transformer["blocks"]
    head = torch.zeros(cfg.n_layers, cfg.n_kv_heads, dtype=torch.float64)
    layer = torch.zeros(cfg.n_layers, dtype=torch.float64)
    base_total, count = 0.0, 0
    units = cfg.n_layers * ((cfg.n_kv_heads if heads else 0) + (1 if layers else 0))
    log.info("copy ablation: %d scoring rows, %d copied tokens, %d units", len(ids), int((source >= 0).sum()), units)
    for x_ids, src in track(list(_batches(ids, source, batch_size, device)), "calibration: copy ablation",
                            unit="batches"):
        scored = src >= 0  # copied_positions never marks the last position, which has no next token
        targets = x_ids[:, 1:][scored[:, :-1]]
        rope = decoder.rotary(x_ids.shape[1], device)
        states = residual_states(decoder, x_ids)
        base = _copied_loss(decoder, states[-1], cfg.n_layers, rope, scored, targets)
        base_total += base
        count += int(targets.numel())
        for i in range(cfg.n_layers):
            if layers:
                layer[i] += _copied_loss(decoder, states[i], i + 1, rope, scored, targets) - base
            for g in range(cfg.n_kv_heads if heads else 0):
                z = torch.ones(cfg.n_kv_heads, device=device)
                z[g] = 0.0
                x = blocks[i](states[i], rope, {"head": z})
                head[i, g] += _copied_loss(decoder, x, i + 1, rope, scored, targets) - base
    return CopyScores(head / count, layer / count, base_total / count)


def _attention_probs(attn: nn.Module, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """[B, H, T, T] softmax attention of `Attention` on its input x (its q/k path, causal, 1/sqrt(hd) scale)."""
    b, t, _ = x.shape
    q = attn.wq(x).view(b, t, attn.n_heads, attn.hd).transpose(1, 2)
    k = attn.wk(x).view(b, t, attn.n_kv, attn.hd).transpose(1, 2)
    q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    k = k.repeat_interleave(attn.n_heads // attn.n_kv, dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(attn.hd)
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


@torch.no_grad()
def induction_scores(decoder: PrunableDecoder, ids: np.ndarray, source: np.ndarray, *,
                     batch_size: int = 4) -> Tensor:
    """[L, H_kv]: per KV group, its best query head's mean attention from each copied position to the
    token after that token's earlier occurrence."""
    _check(decoder)
    cfg = decoder.cfg
    decoder.eval()
    device = next(decoder.parameters()).device
    per_head = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64, device=device)
    count = 0
    current: dict[str, Tensor] = {}

    def hook(i: int):
        def read(module: nn.Module, args: tuple) -> None:  # returns None: the input stays as is
            x, rope = args[0], args[1]
            probs = _attention_probs(module, x, rope)  # [B, H, T, T]
            src = current["source"]
            b, t = torch.nonzero(src >= 0, as_tuple=True)
            per_head[i] += probs[b, :, t, src[b, t]].double().sum(0)

        return read

    handles = [block.attn.register_forward_pre_hook(hook(i)) for i, block in enumerate(decoder.transformer["blocks"])]
    try:
        for x_ids, src in track(list(_batches(ids, source, batch_size, device)), "calibration: induction scores",
                                unit="batches"):
            current["source"] = src
            decoder(x_ids)
            count += int((src >= 0).sum())
    finally:
        for h in handles:
            h.remove()
    groups = (per_head / count).view(cfg.n_layers, cfg.n_kv_heads, cfg.group_size)
    return groups.amax(-1).cpu()


def _with_heads(decoder: PrunableDecoder, rows: np.ndarray, head: Tensor, batch_size: int) -> Scores:
    """Activation importance for channels and hidden dims, `head` for KV groups."""
    scores = activation(decoder, rows, batch_size=batch_size)
    return Scores(head.to(scores.head), scores.intermediate, scores.hidden)


@IMPORTANCE.register("copy")
def copy_ablation(decoder: PrunableDecoder, rows: np.ndarray, seed: int = 0, batch_size: int = 4) -> Scores:
    """Importance 'copy': KV groups by the loss increase on copied tokens when masked; channels and hidden
    dims by activation."""
    ids, source = copy_sequences(rows, seed=seed)
    head = ablation_scores(decoder, ids, source, layers=False, batch_size=batch_size).head
    return _with_heads(decoder, rows, head, batch_size)


@IMPORTANCE.register("induction")
def induction(decoder: PrunableDecoder, rows: np.ndarray, seed: int = 0, batch_size: int = 4) -> Scores:
    """Importance 'induction': KV groups by attention to the token after an earlier occurrence; channels and
    hidden dims by activation."""
    ids, source = copy_sequences(rows, seed=seed)
    return _with_heads(decoder, rows, induction_scores(decoder, ids, source, batch_size=batch_size), batch_size)


def check_protect_heads(cfg: ModelConfig, k: int) -> None:
    """Refuse a protect_copy_heads count the model cannot hold, before any scoring."""
    if not 1 <= k <= cfg.n_layers * cfg.n_kv_heads:
        raise UserError(f"protect_copy_heads={k} must be in 1..{cfg.n_layers * cfg.n_kv_heads} (the model's "
                        f"{cfg.n_layers} layers x {cfg.n_kv_heads} KV groups)")


def check_protect_layers(cfg: ModelConfig, k: int) -> None:
    """Refuse a protect_copy_layers count that would leave no block to remove, before any scoring."""
    if not 1 <= k < cfg.n_layers:
        raise UserError(f"protect_copy_layers={k} must be in 1..{cfg.n_layers - 1} for a {cfg.n_layers}-block model")


def check_copy_score(score: str) -> None:
    """Refuse an unknown copy_score before the model is read."""
    if score not in COPY_SCORES:
        raise UserError(f"copy_score={score!r} is unknown: use one of {COPY_SCORES}")


def top_copy_groups(decoder: PrunableDecoder, rows: np.ndarray, k: int, *, score: str = "induction", seed: int = 0,
                    batch_size: int = 4) -> list[tuple[int, int]]:
    """The k (layer, KV group) pairs that score highest for copying by `score` (COPY_SCORES), best first."""
    cfg = decoder.cfg
    check_protect_heads(cfg, k)
    check_copy_score(score)
    ids, source = copy_sequences(rows, seed=seed)
    if score == "ablation":
        head = ablation_scores(decoder, ids, source, layers=False, batch_size=batch_size).head
    else:
        head = induction_scores(decoder, ids, source, batch_size=batch_size)
    order = torch.argsort(head.flatten(), descending=True, stable=True)[:k].tolist()
    top = [divmod(int(i), cfg.n_kv_heads) for i in order]
    log.info("copy-protected KV groups by %s (layer.group: score): %s", score,
             ", ".join(f"{layer}.{group}: {float(head[layer, group]):.3f}" for layer, group in top))
    return top


def top_copy_layers(decoder: PrunableDecoder, rows: np.ndarray, k: int, *, seed: int = 0,
                    batch_size: int = 4) -> list[int]:
    """The k blocks whose removal raises the loss on copied tokens most, best first."""
    check_protect_layers(decoder.cfg, k)
    ids, source = copy_sequences(rows, seed=seed)
    scores = ablation_scores(decoder, ids, source, heads=False, batch_size=batch_size)
    top = torch.argsort(scores.layer, descending=True, stable=True)[:k].tolist()
    log.info("copy-protected blocks (block: loss increase): %s (copied-token loss %.3f)",
             ", ".join(f"{i}: {float(scores.layer[i]):+.3f}" for i in top), scores.base)
    return [int(i) for i in top]
