"""The work behind `drprune oneshot ...`: load, score, compact (or slice), evaluate, write.

Layer and width pruning emit hard masks and go through the shared compaction path
(`drprune.compact.fold.compact_decoder`); vocabulary pruning changes vocab_size, which masks do
not cover, so it slices the embedding and output rows directly (`vocab.slice_vocab`).
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drprune.convert.model_card import EvalTable, ModelCard
from drprune.errors import UserError
from drprune.masks.base import MaskSet
from drprune.models.decoder import PrunableDecoder
from drprune.oneshot import calib
from drprune.oneshot.options import OneshotOptions
from drprune.atomic import atomic_output, visible
from drprune.compact.export import export_hf as export_compact
from drprune.compact.fold import compact_decoder
from drprune.compute import resolve_compute
from drprune.convert.checkpoint import decoder_checkpoint_state, load_any_decoder, save_checkpoint
from drprune.data.identity import check_data_tokenizer, check_token_ids
from drprune.eval.perplexity import domain_perplexity, perplexity, read_token_rows
from drprune.oneshot.copy_importance import (check_copy_score, check_protect_heads, check_protect_layers,
                                             top_copy_groups, top_copy_layers)
from drprune.oneshot.importance import needs_calibration
from drprune.oneshot.layers import check_request, layer_masks, metric, normalize_skip, score_table, select_blocks
from drprune.oneshot.vocab import choose_tokens, load_vocab_files, prune_tokenizer_folder, remap_token_ids, slice_vocab
from drprune.oneshot.width import TARGET_KEYS, plan_target, removed_structures, taylor_ratio_defaults, width_prune

log = logging.getLogger(__name__)
# `oneshot width` target keys (HF names) -> ModelConfig keys, for the card's target shape
_HF_TO_OURS = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
               "intermediate_size": "intermediate_size"}


def load_model(opts: OneshotOptions) -> tuple[PrunableDecoder, dict[str, Any]]:
    """The decoder on --device in --dtype and the source config.json (empty for a checkpoint), for its special
    token ids; then --calib and --eval-data are checked against the model's tokenizer and vocabulary."""

    model = opts.model
    path = Path(model)
    if not path.exists():
        raise UserError(f"MODEL {model} does not exist (a HF model folder or a Composer checkpoint; "
                        "hub:NAME downloads NAME from the Hugging Face Hub)")
    compute = resolve_compute(opts.device, opts.dtype)
    decoder = compute.place(load_any_decoder(model, opts.trust_pickle)).eval()
    log.info("scoring on %s in %s", compute.device, compute.dtype_name)
    config_file = path / "config.json"  # a HF folder's; a checkpoint (file or sharded folder) has none
    hf_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    check_data(opts, decoder.cfg.vocab_size)
    return decoder, hf_config


def check_data(opts: OneshotOptions, vocab_size: int) -> None:
    """Refuse --calib / --eval-data prepared with another tokenizer than MODEL's (or --tokenizer's)."""

    tokenizer = calib.resolve_tokenizer(opts.model, opts.tokenizer)
    for data in (opts.calib, opts.eval_data):
        if data is not None and Path(data).exists():
            check_data_tokenizer(data, tokenizer=tokenizer, vocab_size=vocab_size)


def calibration_rows(opts: OneshotOptions, required: bool, vocab_size: int) -> np.ndarray | None:
    """Calibration rows, every id checked against the model's vocabulary before any scoring."""

    if opts.calib is None:
        if required:
            raise UserError("this pruner scores on calibration data: pass --calib (an MDS folder or text files)")
        return None
    tokenizer = calib.resolve_tokenizer(opts.model, opts.tokenizer)
    rows = calib.load_rows(opts.calib, tokenizer=tokenizer, seq_len=opts.seq_len, max_rows=opts.max_rows)
    check_token_ids(int(rows.max()), vocab_size, opts.calib)
    return rows


def eval_domains(data: str) -> list[str]:
    """The domain folders under DATA/eval (not eval_merge); a UserError when there are none."""
    split_dir = Path(data) / "eval"
    if not split_dir.is_dir():
        raise UserError(f"{split_dir} does not exist: --eval-data must be a folder from `drprune data prepare`")
    domains = [p.name for p in visible(split_dir) if p.is_dir() and p.name != calib.EVAL_MERGE]
    if not domains:
        raise UserError(f"no domain folders under {split_dir}")
    return domains


def evaluate(decoder: PrunableDecoder, opts: OneshotOptions) -> dict[str, float] | None:
    """Per-domain perplexity on --eval-data; None without it, and the before/after table is skipped."""
    if opts.eval_data is None:
        return None
    return domain_perplexity(decoder, opts.eval_data, eval_domains(opts.eval_data),
                             max_rows=opts.eval_max_rows, batch_size=opts.batch_size)


def eval_lines(before: dict[str, float] | None, after: dict[str, float] | None) -> list[str]:
    """The before/after perplexity table the CLI prints (none without --eval-data)."""
    if before is None or after is None:
        return []
    width = max(len(d) for d in before)
    return [f"{'domain':<{width}}  {'ppl before':>10}  {'ppl after':>10}",
            *(f"{domain:<{width}}  {before[domain]:10.3f}  {after[domain]:10.3f}" for domain in before)]


def compact(decoder: PrunableDecoder, masks: MaskSet) -> PrunableDecoder:
    """compact_decoder without autograd, in eval mode: a one-shot result is not trained further here."""
    with torch.no_grad():
        return compact_decoder(decoder, masks).eval()


def write_outputs(decoder: PrunableDecoder, opts: OneshotOptions, removed: dict[str, Any],
                  evals: dict[str, Any] | None, hf_config: dict[str, Any], tokenizer_dir: Path | None,
                  card: ModelCard, token_ids: dict[str, Any] | None = None, masks: MaskSet | None = None,
                  source: PrunableDecoder | None = None) -> str:
    """OUT/model.pt, OUT/hf/ (its README.md from `card` and `evals`), OUT/removed.json (+ OUT/eval.json,
    + OUT/masks.safetensors: the selection on the source model, which `init_masks` can warm-start L0 from),
    renamed into place at the end. Returns the line that says what was written."""

    if token_ids is None:  # same vocabulary: the source's special token ids carry over unchanged
        token_ids = {k: v for k, v in hf_config.items() if k.endswith("_token_id") and v is not None}
    decoder = decoder.cpu()  # a checkpoint of GPU tensors would load only where that GPU is
    with atomic_output(opts.out, overwrite=opts.overwrite, folder=True) as tmp:
        save_checkpoint(decoder_checkpoint_state(decoder), tmp / "model.pt")
        export_hf(decoder, tmp / "hf", tokenizer_dir, token_ids, replace(card, evaluation=eval_tables(evals)))
        (tmp / "removed.json").write_text(json.dumps(removed, indent=2) + "\n")
        if masks is not None:
            masks.save(tmp / "masks.safetensors", source=source.cfg if source is not None else None)
        if evals is not None:
            (tmp / "eval.json").write_text(json.dumps(evals, indent=2) + "\n")
    extra = (", masks.safetensors" if masks is not None else "") + (", eval.json" if evals else "")
    return f"wrote {opts.out}: model.pt, hf/, removed.json{extra}"


def export_hf(decoder: PrunableDecoder, out_dir: Path, tokenizer_dir: Path | None, token_ids: dict[str, Any],
              card: ModelCard) -> None:
    """Stock HF classes where one fits, the remote-code folder for per-layer shapes (drprune.compact)."""

    tensors = {k: v for k, v in decoder.state_dict().items() if not k.endswith("_extra_state")}
    export_compact(decoder.cfg, tensors, out_dir, tokenizer_dir=tokenizer_dir, config_overrides=token_ids, card=card)


def source_card(opts: OneshotOptions, source: PrunableDecoder, method: str, options: dict[str, Any],
                target: dict[str, Any] | None = None) -> ModelCard:
    """What the HF folder's README says about the pruning: MODEL (its license), the method and its options."""
    return ModelCard(source=str(opts.model), method=method, options=options, target=target or {},
                     source_config=source.cfg.to_dict()).with_source_facts(opts.model)


def eval_tables(evals: dict[str, Any] | None) -> list[EvalTable]:
    """The before/after perplexities of `--eval-data` as the card's table (none without --eval-data)."""
    if not evals:
        return []
    domains = list(evals["before"])
    caption = "Perplexity per domain of the `--eval-data` eval split (lower is better)."
    if "rows_used" in evals:
        domains = list(evals["rows_used"])
        caption += " Only rows made of kept tokens are scored: rows used " + ", ".join(
            f"{d} {u}" for d, u in evals["rows_used"].items()) + "."
    return [EvalTable(caption, ["source", "pruned"],
                      {d: [evals["before"].get(d), evals["after"].get(d)] for d in domains})]


def tokenizer_folder(opts: OneshotOptions, staging: Path) -> Path | None:
    """A folder of tokenizer files for the HF output: MODEL's or --tokenizer's (a .model is staged)."""
    spec = calib.resolve_tokenizer(opts.model, opts.tokenizer)
    if spec is None:
        log.warning("no tokenizer found (MODEL is a checkpoint and no --tokenizer): the HF folder has none")
        return None
    path = Path(spec)
    if path.is_file():
        staging.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, staging / "tokenizer.model")
        return staging
    return path


def sizes(before: PrunableDecoder, after: PrunableDecoder) -> dict[str, Any]:
    """Source and result shapes for removed.json, so a reader sees the size change without loading."""
    def shape(d: PrunableDecoder) -> dict[str, Any]:
        c = d.cfg
        return {"params": d.num_params(), "n_layers": c.n_layers, "d_model": c.d_model, "n_heads": c.n_heads,
                "n_kv_heads": c.n_kv_heads, "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size,
                "per_layer": None if c.is_uniform else [[s.n_heads, s.intermediate_size] for s in c.layers]}

    return {"source": shape(before), "result": shape(after)}


# ------------------------------------------------------------------ commands

def run_layers(opts: OneshotOptions) -> list[str]:
    """Remove blocks by a layer metric; returns the lines the CLI prints (scores, perplexities, output)."""

    metric(opts.pruning_method)  # an unknown name fails before the model is read
    decoder, hf_config = load_model(opts)
    n = opts.num_blocks_to_prune
    if n is None:
        raise UserError("`oneshot layers` needs --num-blocks-to-prune")
    check_request(decoder.cfg.n_layers, n, opts.pruning_method, opts.pruning_token, opts.skip_blocks)
    if opts.protect_copy_layers:
        check_protect_layers(decoder.cfg, opts.protect_copy_layers)
    rows = calibration_rows(opts, required=True, vocab_size=decoder.cfg.vocab_size)
    before = evaluate(decoder, opts)
    skip, protected = copy_protected_skip(decoder, rows, opts)
    sel = select_blocks(decoder, rows, num_blocks=n, method=opts.pruning_method, token=opts.pruning_token,
                        skip_blocks=skip, batch_size=opts.batch_size)
    lines = [score_table(sel, n)]
    masks = layer_masks(decoder.cfg.n_layers, sel.blocks)
    small = compact(decoder, masks)
    removed = {"method": sel.method, "pruning_token": opts.pruning_token, "removed_blocks": sel.blocks,
               "scores": sel.scores, "skip_blocks": list(opts.skip_blocks), **sizes(decoder, small)}
    options = {"removed_blocks": sel.blocks, "pruning_token": opts.pruning_token, "skip_blocks": list(opts.skip_blocks)}
    if protected:
        removed["copy_protected_blocks"] = options["copy_protected_blocks"] = protected
        lines.insert(0, f"copy-protected blocks (kept): {protected}")
    card = source_card(opts, decoder, f"{sel.method} layer removal", options, {"n_layers": decoder.cfg.n_layers - n})
    return lines + _finish(small, opts, removed, before, hf_config, card, masks, decoder)


def copy_protected_skip(decoder: PrunableDecoder, rows: np.ndarray,
                        opts: OneshotOptions) -> tuple[list[int], list[int]]:
    """(skip_blocks with the --protect-copy-layers blocks added, those blocks); a UserError when no
    allowed choice of blocks is left."""
    if not opts.protect_copy_layers:
        return list(opts.skip_blocks), []
    n_layers = decoder.cfg.n_layers
    protected = top_copy_layers(decoder, rows, opts.protect_copy_layers, seed=opts.seed, batch_size=opts.batch_size)
    skip = sorted(normalize_skip(opts.skip_blocks, n_layers) | set(protected))
    try:
        check_request(n_layers, opts.num_blocks_to_prune, opts.pruning_method, opts.pruning_token, skip)
    except UserError as err:
        raise UserError(f"{err} (skip_blocks include the copy-protected blocks {sorted(protected)}: lower "
                        "--protect-copy-layers)") from err
    return skip, protected


def run_width(opts: OneshotOptions) -> list[str]:
    """Prune heads/channels/hidden dims to a shape or a ratio; returns the lines the CLI prints."""

    # an unknown name fails before the model is read; copy protection scores on calibration text
    calib_required = needs_calibration(opts.importance) or opts.protect_copy_heads > 0
    check_copy_score(opts.copy_score)
    decoder, hf_config = load_model(opts)
    target = {k: getattr(opts, k) for k in TARGET_KEYS if getattr(opts, k) not in (None, [])}
    if opts.importance == "taylor":
        target = taylor_ratio_defaults(decoder.cfg, target)
    plan_target(decoder.cfg, target)
    if opts.protect_copy_heads:
        check_protect_heads(decoder.cfg, opts.protect_copy_heads)
    rows = calibration_rows(opts, required=calib_required, vocab_size=decoder.cfg.vocab_size)
    before = evaluate(decoder, opts)
    protected: list[tuple[int, int]] = []
    if opts.protect_copy_heads:
        protected = top_copy_groups(decoder, rows, opts.protect_copy_heads, score=opts.copy_score, seed=opts.seed,
                                    batch_size=opts.batch_size)
    masks = width_prune(decoder, rows, importance=opts.importance, target=target, seed=opts.seed,
                        taylor_mode=opts.taylor, batch_size=opts.batch_size, protect=protected)
    small = compact(decoder, masks)
    removed = {"importance": opts.importance, "target": target, **removed_structures(decoder.cfg, masks),
               **sizes(decoder, small)}
    if opts.importance == "taylor":
        removed["taylor"] = opts.taylor
    lines = [f"params {decoder.num_params():,} -> {small.num_params():,}"]
    options = {**target, **({"taylor": opts.taylor} if opts.importance == "taylor" else {})}
    if protected:
        removed["copy_protected_kv_groups"] = [list(p) for p in protected]
        removed["copy_score"] = opts.copy_score
        options.update(protect_copy_heads=opts.protect_copy_heads, copy_score=opts.copy_score)
        lines.insert(0, "copy-protected KV groups (layer, group): " + ", ".join(f"{a}.{b}" for a, b in protected))
    card = source_card(opts, decoder, f"{opts.importance} width pruning", options,
                       {_HF_TO_OURS[k]: v for k, v in target.items() if k in _HF_TO_OURS})
    return lines + _finish(small, opts, removed, before, hf_config, card, masks, decoder)


def _finish(small: PrunableDecoder, opts: OneshotOptions, removed: dict[str, Any],
            before: dict[str, float] | None, hf_config: dict[str, Any], card: ModelCard, masks: MaskSet,
            source: PrunableDecoder) -> list[str]:
    after = evaluate(small, opts)
    evals = None if before is None else {"before": before, "after": after}
    with tempfile.TemporaryDirectory() as staging:
        wrote = write_outputs(small, opts, removed, evals, hf_config, tokenizer_folder(opts, Path(staging)), card,
                              masks=masks, source=source)
    return [*eval_lines(before, after), wrote]


def run_vocab(opts: OneshotOptions) -> list[str]:
    """Keep the most frequent tokens of --calib (plus special/byte ones); returns the lines the CLI prints."""

    if opts.keep is None:
        raise UserError("`oneshot vocab` needs --keep N")
    if opts.calib is None:
        raise UserError("`oneshot vocab` counts token frequencies on --calib (an MDS folder or text files)")
    tokenizer = calib.resolve_tokenizer(opts.model, opts.tokenizer)
    if tokenizer is None:
        raise UserError("`oneshot vocab` prunes a tokenizer: pass --tokenizer or a MODEL folder that holds one")
    files = load_vocab_files(tokenizer)
    decoder, hf_config = load_model(opts)
    counts = calib.token_counts(opts.calib, tokenizer=tokenizer, vocab_size=decoder.cfg.vocab_size)
    keep, stats = choose_tokens(counts, opts.keep, files)
    small = slice_vocab(decoder, keep)
    new_id = {old: new for new, old in enumerate(keep)}
    evals, lines = vocab_eval(decoder, small, keep, opts)
    kept = set(keep)
    removed = {"method": "vocab", "kept_token_ids": keep,
               "removed_token_ids": [i for i in range(decoder.cfg.vocab_size) if i not in kept],
               "counts": stats, "data_tokens_covered": float(counts[keep].sum() / max(1, counts.sum())),
               **sizes(decoder, small)}
    lines.insert(0, f"vocabulary {decoder.cfg.vocab_size} -> {len(keep)} ({stats['frequent']} frequent, "
                    f"{stats['required']} special/byte, {stats['merge_parts']} merge parts); "
                    f"params {decoder.num_params():,} -> {small.num_params():,}")
    with tempfile.TemporaryDirectory() as staging:
        tok_dir = Path(staging)
        prune_tokenizer_folder(tokenizer, files, keep, tok_dir)
        card = source_card(opts, decoder, "vocabulary pruning", {"keep": opts.keep}, {"vocab_size": len(keep)})
        lines.append(write_outputs(small, opts, removed, evals, hf_config, tok_dir, card,
                                   remap_token_ids(hf_config, new_id)))
    return lines


def vocab_eval(decoder: PrunableDecoder, small: PrunableDecoder, keep: list[int],
               opts: OneshotOptions) -> tuple[dict[str, Any] | None, list[str]]:
    """Perplexity before/after on the eval rows made only of kept tokens (others cannot be scored), and its
    table for the CLI."""

    if opts.eval_data is None:
        return None, []
    lookup = np.full(decoder.cfg.vocab_size, -1, dtype=np.int64)
    lookup[keep] = np.arange(len(keep))
    out: dict[str, Any] = {"before": {}, "after": {}, "rows_used": {}}
    for domain in eval_domains(opts.eval_data):
        rows = read_token_rows(Path(opts.eval_data) / "eval" / domain, opts.eval_max_rows)
        inside = rows[(lookup[rows] >= 0).all(1)]
        out["rows_used"][domain] = f"{len(inside)}/{len(rows)}"
        if len(inside):
            out["before"][domain] = perplexity(decoder, inside, opts.batch_size)
            out["after"][domain] = perplexity(small, lookup[inside], opts.batch_size)
    width = max(len(d) for d in out["rows_used"])
    lines = [f"{'domain':<{width}}  {'rows':>9}  {'ppl before':>10}  {'ppl after':>10}"]
    for d, used in out["rows_used"].items():
        b, a = out["before"].get(d, float("nan")), out["after"].get(d, float("nan"))
        lines.append(f"{d:<{width}}  {used:>9}  {b:10.3f}  {a:10.3f}")
    return out, lines
