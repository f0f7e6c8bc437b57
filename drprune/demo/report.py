"""The demo's report folder: report.md (tables), PNG plots and summary.json.

Everything is drawn from the summary dict alone, so the report can be rebuilt from summary.json.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from drprune.callbacks import plots as run_plots  # noqa: E402

MODELS = (("source", "source"), ("pruned_before_continued", "pruned, before continued pretraining"),
          ("pruned", "pruned (L0 + DRO)"), ("baseline", "baseline (one-shot, same shape)"))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def plot_weights(mixture: dict[str, Any], domains: list[str], path: Path) -> None:
    history = [(s, w) for s, w in mixture.get("weights") or []]
    run_plots.plot_weights(history, domains, path, title="DRO data mixture during pruning")


def plot_domain_loss(ppl: dict[str, dict[str, float]], domains: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    present = [(key, label) for key, label in MODELS if key in ppl]
    width = 0.8 / len(present)
    for j, (key, label) in enumerate(present):
        xs = [i + (j - (len(present) - 1) / 2) * width for i in range(len(domains))]
        ax.bar(xs, [math.log(ppl[key][d]) for d in domains], width, label=label)
    ax.set_xticks(range(len(domains)), domains)
    ax.set(ylabel="eval loss (nats/token)", title="Per-domain loss before and after pruning")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    run_plots.save_figure(fig, path)


def plot_sparsity(mixture: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    targets, warmup = mixture.get("target_sparsity") or {}, mixture.get("lagrangian_warmup_steps") or 0
    for module, points in sorted((mixture.get("sparsity") or {}).items()):
        steps = [p[0] for p in points]
        line, = ax.plot(steps, [p[1] for p in points], label=module)
        if module in targets:  # the schedule the Lagrangian pulls toward: linear warm-up to the target
            ramp = [targets[module] * (1.0 if warmup <= 0 else min(1.0, s / warmup)) for s in steps]
            ax.plot(steps, ramp, "--", color=line.get_color(), alpha=0.6, label=f"{module} target")
    ax.set(xlabel="pruning step", ylabel="expected sparsity", title="Expected sparsity per pruned module",
           ylim=(0, 1))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    run_plots.save_figure(fig, path)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _mean_ppl(values: dict[str, float]) -> float:
    """Geometric mean over domains (= exp of the mean per-domain loss): every domain weighs the same."""
    return math.exp(sum(math.log(v) for v in values.values()) / len(values))


def render_markdown(s: dict[str, Any]) -> str:
    domains, ppl, params = s["domains"], s["perplexity"], s["parameters"]
    present = [(k, label) for k, label in MODELS if k in ppl]
    ppl_rows = [[d, *(f"{ppl[k][d]:.2f}" for k, _ in present)] for d in domains]
    ppl_rows.append(["**mean (geometric)**", *(f"**{_mean_ppl(ppl[k]):.2f}**" for k, _ in present)])
    src_ne = params["source"]["non_embedding"]
    param_rows = [[name, f"{p['total'] / 1e6:.1f}M", f"{p['non_embedding'] / 1e6:.1f}M",
                   f"{p['non_embedding'] / src_ne:.0%}",
                   ", ".join(f"{k}={v}" for k, v in p["shape"].items())] for name, p in params.items()]
    speed = s.get("speed", {})
    speed_rows = [[name, f"{v['prefill_tokens_per_s']:.0f}", f"{v['decode_tokens_per_s']:.1f}"]
                  for name, v in speed.items()]
    sample_blocks = []
    for prompt in next(iter(s["samples"].values())):
        sample_blocks.append(f"**Prompt:** `{prompt}`\n")
        for name, outs in s["samples"].items():
            sample_blocks.append(f"- *{name}*: {json.dumps(outs[prompt])}")
        sample_blocks.append("")
    opts, method = s["options"], s["baseline_method"]
    final_p = s["mixture"].get("final_proportion")
    mixture_line = (", ".join(f"{d} {p:.2f}" for d, p in zip(domains, final_p)) if final_p else "n/a")
    return "\n".join([
        "# drprune demo report",
        "",
        f"Source: `{Path(s['model']['gguf']).name}`"
        + (f" (first {s['model']['source_layers']} layers)" if s["model"]["source_layers"] else "")
        + f"; {len(domains)} domains; device {s['device']}; {opts['steps']} pruning steps, "
        f"{opts['continue_steps']} continued-pretraining steps, batch "
        f"{opts['batch_size']} x {opts['seq_len']} tokens.",
        "",
        "## Per-domain perplexity (held-out eval shards)",
        "",
        _table(["domain", *(label for _, label in present)], ppl_rows),
        "",
        f"Baseline: width by {method['width']}, layers by {method['layers']} choice, then the same "
        "continued pretraining as the pruned model. The L0 masks start from the baseline's selection "
        "and refine it while the weights train under the masks (DRO data mixture).",
        "",
        "## Parameters",
        "",
        _table(["model", "total", "non-embedding", "of source", "shape"], param_rows),
        "",
        "## Inference speed (" + s["device"].upper() + ", best of 3)",
        "",
        _table(["model", "prefill tokens/s", "greedy decode tokens/s"], speed_rows),
        "",
        "## Generation samples (greedy, 24 new tokens)",
        "",
        *sample_blocks,
        "## Data mixture and sparsity",
        "",
        f"Final DRO domain weights after pruning: {mixture_line}.",
        "",
        "![domain weights](plots/domain_weights.png)",
        "![per-domain loss](plots/domain_loss.png)",
        "![expected sparsity](plots/expected_sparsity.png)",
        "",
        "## Run",
        "",
        _table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in s["timings_s"].items()]
               + [["**total (wall)**", f"**{s['total_seconds']:.1f}**"],
                  ["total CPU time (all cores)", f"{s['cpu_seconds']:.1f}"]]),
        "",
        f"Peak memory: {s['peak_memory_gb']:.2f} GB. The pruned model is in `hf/` (loads with "
        "`transformers.AutoModelForCausalLM.from_pretrained`).",
        "",
    ])


def write_report(summary: dict[str, Any], out: Path) -> None:
    """OUT/summary.json, OUT/report.md and OUT/plots/*.png."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_weights(summary["mixture"], summary["domains"], plots / "domain_weights.png")
    plot_domain_loss(summary["perplexity"], summary["domains"], plots / "domain_loss.png")
    plot_sparsity(summary["mixture"], plots / "expected_sparsity.png")
    _write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _write_text(out / "report.md", render_markdown(summary))
