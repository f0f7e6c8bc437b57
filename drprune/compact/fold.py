"""Fold hard masks into weights and drop what they zero: the one compaction path.

Every pruner (L0, hypernetwork, one-shot) ends in `compact_decoder`. The per-tensor rules live in
`fold_state`, a generator that reads one source tensor at a time through a getter and yields the
compact tensors under renumbered names, so the CLI can stream a checkpoint through the same code.

Where each mask value goes (the masked decoder multiplies them in at the places its docstring lists):
  hidden z        embedding columns and the output-head columns, once (a tied head shares the scaled
                  embedding, so the final norm is never scaled); ln_1/ln_2 weight and bias; out_proj /
                  down_proj rows and biases (sub-layer outputs are multiplied by z in the residual)
  head z          out_proj input columns of the kept heads (each KV group with its query heads), so
                  every bias of q/k/v (Qwen2's v-bias too) is scaled exactly as the masked context is
  head_layer, mlp, layer z, attn_out/mlp_out values
                  out_proj / down_proj rows and biases
  intermediate z  down_proj input columns
  attn_in/mlp_in values
                  the sub-layer norm's weight (and bias) at the kept residual dimensions
The attention scale stays 1/sqrt(head_dim): head_dim is never pruned.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor

from drprune.convert.checkpoint import decoder_keys
from drprune.errors import UserError
from drprune.masks.base import MaskSet
from drprune.models.shapes import compact_config
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder
from drprune.progress import track

log = logging.getLogger(__name__)

Getter = Callable[[str], Tensor]


@dataclass
class Plan:
    """What compaction keeps: the source and compact configs, kept layer ids and the hard masks."""

    source: ModelConfig
    target: ModelConfig
    kept_layers: list[int]
    masks: dict[str, Tensor]


@dataclass
class _Axis:
    """Kept positions along one tensor axis and the values to multiply them by (None = all / 1)."""

    index: Tensor | None = None
    scale: Tensor | None = None


def plan_compaction(cfg: ModelConfig, masks: Mapping[str, Tensor]) -> Plan:
    """Validate hard masks against `cfg` and decide the compact shape, before touching any weight."""
    hard = {k: v.detach().to("cpu", torch.float32) for k, v in masks.items()}
    for name, value in hard.items():
        if not torch.isfinite(value).all():
            raise UserError(f"mask {name!r} holds NaN or infinite values: the pruning run diverged")
    target, kept = compact_config(cfg, MaskSet(hard))
    if not any(target.layer_spec(j).has_attn for j in range(target.n_layers)):
        raise UserError(
            "the masks remove every attention head of every layer: the compact model could not read "
            "context. Keep at least one head (check target_model.n_heads / the head masks)"
        )
    return Plan(cfg, target, kept, hard)


def compact_decoder(decoder: PrunableDecoder, masks: MaskSet) -> PrunableDecoder:
    """A new, smaller decoder equal to `decoder` run with hard `masks` (0 = drop, value = scale)."""
    plan = plan_compaction(decoder.cfg, masks)
    state = decoder.state_dict()
    tensors = dict(track(fold_state(plan, state.__getitem__), "compact", total=len(decoder_keys(plan.target)),
                         unit="tensors"))
    device = decoder.transformer["wte"].weight.device
    compact = PrunableDecoder(plan.target).to(device)
    compact.load_state_dict({**tensors, "_extra_state": compact.get_extra_state()}, strict=True, assign=True)
    return compact.train(decoder.training)


def fold_state(plan: Plan, get: Getter) -> Iterator[tuple[str, Tensor]]:
    """Yield (compact name, new tensor) one at a time; each source tensor is read once via `get`."""
    src, m = plan.source, plan.masks
    hidden = _axis(m.get("hidden"))
    _warn_dropped_biases(plan, get)
    # The vocabulary-sized matrices go first, while little output is held, so a streaming caller's
    # peak stays near the output size plus one of them.
    yield "transformer.wte.weight", _fold(get("transformer.wte.weight"), cols=hidden)
    if not src.tie_word_embeddings:
        yield "transformer.output.weight", _fold(get("transformer.output.weight"), cols=hidden)
    kept_dims = _Axis(hidden.index)
    for kind in ("weight", "bias") if src.norm == "layernorm" else ("weight",):
        yield f"transformer.ln_f.{kind}", _fold(get(f"transformer.ln_f.{kind}"), rows=kept_dims)
    for j, i in enumerate(plan.kept_layers):
        spec = plan.target.layer_spec(j)
        if spec.has_attn:
            yield from _fold_attention(plan, get, i, j, hidden)
        if spec.has_mlp:
            yield from _fold_mlp(plan, get, i, j, hidden)


def _warn_dropped_biases(plan: Plan, get: Getter) -> None:
    """A sub-layer whose heads / channels are all zero but whose gates are not still adds its output
    bias in the masked model; removing it drops that constant, so say so instead of hiding it."""
    src, m = plan.source, plan.masks
    kept = dict(zip(plan.kept_layers, (plan.target.layer_spec(j) for j in range(plan.target.n_layers))))
    for i in range(src.n_layers):
        spec = kept.get(i)
        for has_bias, present, gate, key in (
            (src.o_bias, spec is not None and spec.has_attn, "head_layer", "attn.out_proj.bias"),
            (src.mlp_bias, spec is not None and spec.has_mlp, "mlp", "mlp.down_proj.bias"),
        ):
            if not has_bias or present or any(n in m and m[n][i] == 0 for n in ("layer", gate)):
                continue
            if get(f"transformer.blocks.{i}.{key}").abs().max() > 0:
                log.warning("layer %d: every unit of %s is pruned, so the sub-layer is removed with its "
                            "non-zero output bias; the compact model differs from the masked one there", i, key)


def _sublayer_axes(m: MaskSet, i: int, hidden: _Axis, kind: str, gates: tuple[str, ...]) -> tuple[_Axis, _Axis]:
    """The residual dimensions sub-layer `kind` (attn | mlp) of layer i reads and writes."""
    return _residual_axis(m, f"{kind}_in", i, hidden), _output_axis(m, gates, f"{kind}_out", i, hidden)


def _fold_attention(plan: Plan, get: Getter, i: int, j: int, hidden: _Axis) -> Iterator[tuple[str, Tensor]]:
    src, m = plan.source, plan.masks
    old, new = f"transformer.blocks.{i}", f"transformer.blocks.{j}"
    reads, writes = _sublayer_axes(m, i, hidden, "attn", ("head_layer", "layer"))
    kv = _axis(m["head"][i]) if "head" in m else _Axis()
    q_heads = _group_axis(kv, src.group_size)
    yield from _fold_norm(src, get, f"{old}.ln_1", f"{new}.ln_1", reads)
    for name, heads in (("wq", q_heads), ("wk", kv), ("wv", kv)):
        rows = _Axis(_expand(heads, src.head_dim).index)  # the head scale goes into out_proj only
        yield f"{new}.attn.{name}.weight", _fold(get(f"{old}.attn.{name}.weight"), rows=rows, cols=_Axis(reads.index))
        if src.qkv_bias:
            yield f"{new}.attn.{name}.bias", _fold(get(f"{old}.attn.{name}.bias"), rows=rows)
    cols = _expand(q_heads, src.head_dim)
    yield f"{new}.attn.out_proj.weight", _fold(get(f"{old}.attn.out_proj.weight"), rows=writes, cols=cols)
    if src.o_bias:
        yield f"{new}.attn.out_proj.bias", _fold(get(f"{old}.attn.out_proj.bias"), rows=writes)


def _fold_mlp(plan: Plan, get: Getter, i: int, j: int, hidden: _Axis) -> Iterator[tuple[str, Tensor]]:
    src, m = plan.source, plan.masks
    old, new = f"transformer.blocks.{i}", f"transformer.blocks.{j}"
    reads, writes = _sublayer_axes(m, i, hidden, "mlp", ("mlp", "layer"))
    channels = _axis(m["intermediate"][i]) if "intermediate" in m else _Axis()
    yield from _fold_norm(src, get, f"{old}.ln_2", f"{new}.ln_2", reads)
    for name in ("gate_proj", "up_proj") if src.mlp == "gated" else ("up_proj",):
        yield f"{new}.mlp.{name}.weight", _fold(get(f"{old}.mlp.{name}.weight"), rows=_Axis(channels.index),
                                                cols=_Axis(reads.index))
        if src.mlp_bias:
            yield f"{new}.mlp.{name}.bias", _fold(get(f"{old}.mlp.{name}.bias"), rows=_Axis(channels.index))
    yield f"{new}.mlp.down_proj.weight", _fold(get(f"{old}.mlp.down_proj.weight"), rows=writes, cols=channels)
    if src.mlp_bias:
        yield f"{new}.mlp.down_proj.bias", _fold(get(f"{old}.mlp.down_proj.bias"), rows=writes)


def _fold_norm(src: ModelConfig, get: Getter, old: str, new: str, reads: _Axis) -> Iterator[tuple[str, Tensor]]:
    for kind in ("weight", "bias") if src.norm == "layernorm" else ("weight",):
        yield f"{new}.{kind}", _fold(get(f"{old}.{kind}"), rows=reads)


# ------------------------------------------------------------------ axes from masks

def _axis(mask: Tensor | None) -> _Axis:
    if mask is None:
        return _Axis()
    index = torch.nonzero(mask != 0).flatten()
    return _Axis(index, mask[index])


def _residual_axis(m: Mapping[str, Tensor], name: str, i: int, hidden: _Axis) -> _Axis:
    """The residual dims a sub-layer reads, scaled by the value its normalised input is multiplied by."""
    return _axis(m[name][i]) if name in m else hidden


def _output_axis(m: Mapping[str, Tensor], gates: tuple[str, ...], selection: str, i: int, hidden: _Axis) -> _Axis:
    """The residual dims a sub-layer writes, scaled by every mask on its output."""
    axis = _axis(m[selection][i]) if selection in m else hidden
    gate = 1.0
    for name in gates:
        if name in m:
            gate = gate * float(m[name][i])
    if gate == 1.0:
        return axis
    if axis.index is None:
        return _Axis(None, torch.tensor(gate))
    return _Axis(axis.index, axis.scale * gate)


def _group_axis(kv: _Axis, group: int) -> _Axis:
    """KV-head selection -> query-head selection (each KV group keeps or drops its query heads)."""
    return kv if kv.index is None else _repeat(kv, group)


def _expand(heads: _Axis, head_dim: int) -> _Axis:
    """Head selection -> row/column selection of head_dim entries per head."""
    return heads if heads.index is None else _repeat(heads, head_dim)


def _repeat(axis: _Axis, n: int) -> _Axis:
    """Unit u -> positions u*n .. u*n+n-1, each with u's scale."""
    index = (axis.index[:, None] * n + torch.arange(n)).flatten()
    return _Axis(index, None if axis.scale is None else axis.scale.repeat_interleave(n))


def _fold(t: Tensor, rows: _Axis = _Axis(), cols: _Axis = _Axis()) -> Tensor:
    """Gather kept rows (dim 0) / columns (dim 1) and multiply by their scales; always a new tensor.

    The scaling is in place on the gathered copy (computed in fp32, so bf16 weights round once), so
    at most one output-sized tensor exists at a time.
    """
    out = t
    if rows.index is not None:
        out = out.index_select(0, rows.index.to(t.device))
    if cols.index is not None:
        out = out.index_select(1, cols.index.to(t.device))
    out = out.clone() if out is t else out.contiguous()
    if rows.scale is not None:
        out.mul_(rows.scale.to(t.device).reshape(-1, *([1] * (t.dim() - 1))))
    if cols.scale is not None:
        out.mul_(cols.scale.to(t.device))
    return out
