"""After-training report of a pruning run: kept parameters vs target, per-layer widths, perplexity.

Written at `fit_end` by the pruning callback beside the checkpoints (`mask_report.json`,
`layer_widths.png`, through `RunFiles`), so a run says what model it will compact to without running
compaction.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

import matplotlib
from composer.utils import dist
from torch import Tensor

from drprune.atomic import write_json
from drprune.plots import save_figure
from drprune.masks.base import MaskGenerator
from drprune.models.shapes import compact_config, config_params, expected_params
from drprune.models.config import ModelConfig
from drprune.run_files import RunFiles

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)

WIDTH_KEYS = ("attn_in", "attn_out", "mlp_in", "mlp_out", "intermediate", "n_kv_heads")


def layer_widths(cfg: ModelConfig, masks: Mapping[str, Tensor]) -> list[dict[str, int]]:
    """Per source layer, the widths the compact model keeps (0 for a removed sub-layer)."""
    compact, kept = compact_config(cfg, masks)
    out = [dict.fromkeys(WIDTH_KEYS, 0) for _ in range(cfg.n_layers)]
    for spec_id, layer in enumerate(kept):
        s = compact.layer_spec(spec_id)
        size = {n: compact.d_model if getattr(s, n) is None else len(getattr(s, n))
                for n in ("attn_in", "attn_out", "mlp_in", "mlp_out")}
        if s.has_attn:
            out[layer].update(attn_in=size["attn_in"], attn_out=size["attn_out"], n_kv_heads=s.n_kv_heads)
        if s.has_mlp:
            out[layer].update(mlp_in=size["mlp_in"], mlp_out=size["mlp_out"], intermediate=s.intermediate_size)
    return out


def mask_report(cfg: ModelConfig, masks: Mapping[str, Tensor], target_params: int | None = None) -> dict[str, Any]:
    """Kept non-embedding parameters (exact, = the compact model's) against the source and target."""
    masks = {k: v.detach().cpu() for k, v in masks.items()}
    full = config_params(cfg, embeddings=False)
    kept = int(expected_params(cfg, masks, embeddings=False))
    return {"source_params": full, "kept_params": kept, "kept_ratio": kept / full, "target_params": target_params,
            "target_ratio": None if target_params is None else target_params / full,
            "layers": layer_widths(cfg, masks)}


def plot_widths(cfg: ModelConfig, report: Mapping[str, Any], path: Path) -> None:
    """Grouped bars per layer: each width as a fraction of its source size."""
    full = {"attn_in": cfg.d_model, "attn_out": cfg.d_model, "mlp_in": cfg.d_model, "mlp_out": cfg.d_model,
            "intermediate": cfg.intermediate_size, "n_kv_heads": cfg.n_kv_heads}
    layers = report["layers"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(layers)), 4))
    bar = 0.8 / len(WIDTH_KEYS)
    for j, key in enumerate(WIDTH_KEYS):
        ax.bar([i + (j - len(WIDTH_KEYS) / 2 + 0.5) * bar for i in range(len(layers))],
               [w[key] / full[key] for w in layers], bar, label=key)
    title = f"kept {report['kept_ratio']:.1%} of non-embedding params"
    if report.get("target_ratio") is not None:
        title += f" (target {report['target_ratio']:.1%})"
    if report.get("perplexity") is not None:
        title += f", ppl {report['perplexity']:.2f}"
    ax.set(xlabel="layer", ylabel="kept fraction of source width", title=title, ylim=(0, 1.05),
           xticks=range(len(layers)))
    ax.legend(fontsize=7, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def final_eval_perplexity(state: Any) -> float | None:
    """exp of the eval cross-entropy Composer computed at the end of training, None without an eval loader.

    Composer evaluates once more when training ends, in eval mode, so with the generator's eval masks: this
    is the hard-masked model's perplexity on the eval batches (eval_subset_num_batches of them), over ranks.
    """
    value = state.eval_metric_values.get("LanguageCrossEntropy")
    return None if value is None else math.exp(float(value))


def write_report(state: Any, generator: MaskGenerator, files: RunFiles, logger: Any) -> dict[str, Any]:
    """Rank 0 writes mask_report.json and layer_widths.png; every rank returns the report."""
    model = state.model.module if hasattr(state.model, "module") else state.model
    cfg = model.model.cfg
    report = mask_report(cfg, generator.hard_masks(), getattr(generator, "target_params", None))
    report["perplexity"] = final_eval_perplexity(state)
    if dist.get_global_rank() == 0:
        where = files.write("mask_report.json", lambda path: write_json(path, report, indent=1), state, logger)
        files.write("layer_widths.png", lambda path: plot_widths(cfg, report, path), state, logger)
        log.info("kept %d of %d non-embedding parameters (%.2f%%, target %s), hard-masked perplexity %s; "
                 "report in %s", report["kept_params"], report["source_params"], 100 * report["kept_ratio"],
                 report["target_params"], report["perplexity"], where)
    return report
