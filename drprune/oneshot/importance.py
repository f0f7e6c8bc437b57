"""Importance of every prunable structure: KV groups, MLP channels and hidden (residual) dimensions.

A structure owns every weight that disappears with it, which is what makes pruning coupled:
  KV group g of layer l   the rows of wq for its query heads, the rows of wk and wv for head g (and
                          their biases), the columns of out_proj for its query heads
  channel j of layer l    row j of gate_proj and up_proj (and biases), column j of down_proj
  hidden dim k            column k of every input projection, row k of every output projection and
                          its bias, element k of every norm, column k of the embedding and the head
Weight criteria reduce a per-element tensor over these groups:
  l1 = sum |w|,  l2 = sqrt(sum w^2),  taylor element-wise = sum |w * dL/dw|,
  taylor vector-wise = sum over the structure's rows (or columns) of each matrix of |sum_row w * dL/dw|
  (LLM-Pruner's `vectorize`: the first-order loss change of zeroing one row, in absolute value)
`activation` is the mean |activation| on calibration data: each head's context (out_proj input),
each channel's gated activation (down_proj input), and each hidden dim of the normalised sub-layer
inputs summed over layers. `random` draws seeded uniform scores (Pruning-LLMs' random masks).

Scorers live in the IMPORTANCE registry (`--importance NAME`). A scorer takes the decoder and, by
parameter name, whichever of `rows` (calibration token rows), `seed`, `taylor_mode` and `batch_size`
it uses; taking `rows` makes --calib required for it.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from drprune.errors import UserError
from drprune.models.losses import token_losses
from drprune.models.decoder import PrunableDecoder
from drprune.progress import track
from drprune.registry import IMPORTANCE

TAYLOR_MODES = ("element", "vector")
TAYLOR_MIN_ROWS = 64  # fewer calibration rows gave taylor a KV group choice that wrecked SmolLM2

log = logging.getLogger(__name__)


@dataclass
class Scores:
    """Higher = more important. head [L, H_kv], intermediate [L, I], hidden [d]."""

    head: Tensor
    intermediate: Tensor
    hidden: Tensor


def _zeros(cfg, device: torch.device) -> Scores:
    """Score accumulators on the model's device (sums of GPU tensors stay on the GPU)."""
    return Scores(torch.zeros(cfg.n_layers, cfg.n_kv_heads, dtype=torch.float64, device=device),
                  torch.zeros(cfg.n_layers, cfg.intermediate_size, dtype=torch.float64, device=device),
                  torch.zeros(cfg.d_model, dtype=torch.float64, device=device))


def aggregate(decoder: PrunableDecoder, element: Callable[[nn.Parameter], Tensor],
              per_row: Callable[[Tensor], Tensor] | None = None) -> Scores:
    """Sum `element(p)` (same shape as p) over each structure's weights, for every structure.

    `per_row` (e.g. abs) is applied to each row's (or column's) sum before the rows of a structure
    are added up: within a matrix, a structure owns whole rows or whole columns.
    """
    cfg = decoder.cfg
    if not cfg.is_uniform:
        raise UserError("width pruning applies to a full model, not an already compacted one")
    post = per_row or (lambda v: v)
    t = decoder.transformer
    out = _zeros(cfg, t["wte"].weight.device)

    def rows(w: Tensor) -> Tensor:
        """Per output row of a matrix (or per element of a vector)."""
        return post(w.double().sum(1) if w.dim() == 2 else w.double())

    def cols(w: Tensor) -> Tensor:
        return post(w.double().sum(0))

    out.hidden.add_(cols(element(t["wte"].weight)))
    if not cfg.tie_word_embeddings:
        out.hidden.add_(cols(element(t["output"].weight)))
    for p in t["ln_f"].parameters():
        out.hidden.add_(rows(element(p)))
    kv = cfg.n_kv_heads
    for i, block in enumerate(t["blocks"]):
        attn, mlp = block.attn, block.mlp
        for p in [*block.ln_1.parameters(), *block.ln_2.parameters()]:
            out.hidden.add_(rows(element(p)))
        for lin in (attn.wq, attn.wk, attn.wv):
            w = element(lin.weight)
            out.head[i] += rows(w).view(kv, -1).sum(1)
            out.hidden.add_(cols(w))
            if lin.bias is not None:
                out.head[i] += rows(element(lin.bias)).view(kv, -1).sum(1)
        w = element(attn.out_proj.weight)
        out.head[i] += cols(w).view(kv, -1).sum(1)
        out.hidden.add_(rows(w))
        if attn.out_proj.bias is not None:
            out.hidden.add_(rows(element(attn.out_proj.bias)))
        for lin in (mlp.gate_proj, mlp.up_proj):
            if lin is None:
                continue
            w = element(lin.weight)
            out.intermediate[i] += rows(w)
            out.hidden.add_(cols(w))
            if lin.bias is not None:
                out.intermediate[i] += rows(element(lin.bias))
        w = element(mlp.down_proj.weight)
        out.intermediate[i] += cols(w)
        out.hidden.add_(rows(w))
        if mlp.down_proj.bias is not None:
            out.hidden.add_(rows(element(mlp.down_proj.bias)))
    return out


def magnitude(decoder: PrunableDecoder, norm: str) -> Scores:
    """l1 = sum |w|, l2 = sqrt(sum w^2) over each structure's weights."""
    with torch.no_grad():
        if norm == "l1":
            return aggregate(decoder, lambda p: p.detach().abs())
        s = aggregate(decoder, lambda p: p.detach().double().pow(2))
    return Scores(s.head.sqrt(), s.intermediate.sqrt(), s.hidden.sqrt())


@IMPORTANCE.register("l1")
def l1(decoder: PrunableDecoder) -> Scores:
    """Importance 'l1': sum of |w| per structure; needs no calibration data."""
    return magnitude(decoder, "l1")


@IMPORTANCE.register("l2")
def l2(decoder: PrunableDecoder) -> Scores:
    """Importance 'l2': sqrt of the sum of w^2 per structure; needs no calibration data."""
    return magnitude(decoder, "l2")


def accumulate_gradients(decoder: PrunableDecoder, rows: np.ndarray, batch_size: int) -> None:
    """p.grad = d(sum over batches of the mean next-token loss)/dp, in fp32."""
    decoder.eval()
    device = next(decoder.parameters()).device
    decoder.zero_grad(set_to_none=True)
    for start in track(range(0, len(rows), batch_size), "calibration: taylor gradients", unit="batches"):
        ids = torch.from_numpy(rows[start:start + batch_size]).long().to(device)
        loss_sum, tokens = token_losses(decoder(ids), ids)
        (loss_sum.sum() / tokens.sum()).backward()


@IMPORTANCE.register("taylor")
def taylor(decoder: PrunableDecoder, rows: np.ndarray, taylor_mode: str = "element", batch_size: int = 4) -> Scores:
    """First-order Taylor importance; gradients are freed afterwards."""
    if taylor_mode not in TAYLOR_MODES:
        raise UserError(f"taylor mode {taylor_mode!r} is unknown: use one of {TAYLOR_MODES}")
    if len(rows) < TAYLOR_MIN_ROWS:
        log.warning("taylor importance from %d calibration rows: below %d its choices are unreliable (one KV "
                    "group can carry the model); raise --max-rows", len(rows), TAYLOR_MIN_ROWS)
    accumulate_gradients(decoder, rows, batch_size)
    try:
        with torch.no_grad():
            if taylor_mode == "element":
                return aggregate(decoder, lambda p: (p.double() * p.grad.double()).abs())
            return aggregate(decoder, lambda p: p.double() * p.grad.double(), per_row=torch.abs)
    finally:
        decoder.zero_grad(set_to_none=True)


@IMPORTANCE.register("activation")
@torch.no_grad()
def activation(decoder: PrunableDecoder, rows: np.ndarray, batch_size: int = 8) -> Scores:
    """Mean |activation| per head (context), channel (gated activation) and hidden dim (norm outputs)."""
    cfg = decoder.cfg
    device = next(decoder.parameters()).device
    out = _zeros(cfg, device)
    tokens = 0
    hooks = []

    def on(module: nn.Module, fn: Callable[[Tensor], object]) -> None:
        def hook(_m: nn.Module, args: tuple[Tensor, ...]) -> None:  # returns None: the input stays as is
            fn(args[0].detach().double().abs())

        hooks.append(module.register_forward_pre_hook(hook))

    for i, block in enumerate(decoder.transformer["blocks"]):
        on(block.attn.out_proj, lambda x, i=i: out.head[i].add_(
            x.reshape(-1, cfg.n_kv_heads, x.shape[-1] // cfg.n_kv_heads).sum((0, 2))))
        on(block.mlp.down_proj, lambda x, i=i: out.intermediate[i].add_(x.reshape(-1, x.shape[-1]).sum(0)))
        on(block.attn.wq, lambda x: out.hidden.add_(x.reshape(-1, x.shape[-1]).sum(0)))
        on(block.mlp.up_proj, lambda x: out.hidden.add_(x.reshape(-1, x.shape[-1]).sum(0)))
    decoder.eval()
    try:
        for start in track(range(0, len(rows), batch_size), "calibration: activations", unit="batches"):
            ids = torch.from_numpy(rows[start:start + batch_size]).long().to(device)
            decoder(ids)
            tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    per_head = cfg.group_size * cfg.head_dim
    return Scores(out.head / (tokens * per_head), out.intermediate / tokens, out.hidden / tokens)


@IMPORTANCE.register("random")
def random_scores(decoder: PrunableDecoder, seed: int) -> Scores:
    """Importance 'random': seeded uniform scores, the floor any real scorer should beat."""
    cfg = decoder.cfg
    g = torch.Generator().manual_seed(seed)
    return Scores(torch.rand(cfg.n_layers, cfg.n_kv_heads, generator=g, dtype=torch.float64),
                  torch.rand(cfg.n_layers, cfg.intermediate_size, generator=g, dtype=torch.float64),
                  torch.rand(cfg.d_model, generator=g, dtype=torch.float64))


def needs_calibration(importance: str) -> bool:
    """Whether the scorer named `importance` reads calibration rows (so --calib is required)."""
    return "rows" in inspect.signature(IMPORTANCE.get(importance, key="importance")).parameters


def importance_scores(decoder: PrunableDecoder, rows: np.ndarray | None, importance: str, *, seed: int = 0,
                      taylor_mode: str = "element", batch_size: int = 4) -> Scores:
    """Scores by registered name; `rows` (calibration token rows) go to the scorers that take them."""
    scorer = IMPORTANCE.get(importance, key="importance")
    wanted = inspect.signature(scorer).parameters
    if "rows" in wanted and (rows is None or len(rows) == 0):
        raise UserError(f"importance {importance!r} needs calibration data (--calib)")
    offered = {"rows": rows, "seed": seed, "taylor_mode": taylor_mode, "batch_size": batch_size}
    scores = scorer(decoder, **{k: v for k, v in offered.items() if k in wanted})
    return Scores(scores.head.cpu(), scores.intermediate.cpu(), scores.hidden.cpu())  # masks are built on CPU
