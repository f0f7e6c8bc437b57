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

from drprune.atomic import write_json, write_text  # noqa: E402
from drprune import plots as run_plots  # noqa: E402
from drprune.demo.compare import fmt, head_to_head, target_checks  # noqa: E402

MODELS = (("source", "source"), ("pruned", "learned (L0 + DRO)"), ("baseline", "one-shot baseline, same shape"))


def plot_weights(mixture: dict[str, Any], domains: list[str], path: Path) -> None:
    """The DRO domain weights of the pruning run, from the summary's mixture history."""
    history = [(s, w) for s, w in mixture.get("weights") or []]
    run_plots.plot_weights(history, domains, path, title="DRO data mixture during pruning")


def plot_domain_loss(ppl: dict[str, dict[str, float]], domains: list[str], path: Path) -> None:
    """Per-domain eval loss (log perplexity) of every model present, as grouped bars."""
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


def selection_line(changes: dict[str, dict[str, int]]) -> str:
    """What the L0 phase changed in the one-shot selection it was warm-started from."""
    if not changes:
        return "The learned masks were not compared with the one-shot selection (an older run)."
    moved = {k: c for k, c in changes.items() if c["added"] or c["removed"]}
    if not moved:
        return ("The L0 phase kept the one-shot selection unit for unit (" + ", ".join(
            f"{k}: {c['units']}" for k, c in changes.items()) + " units compared): the learned model differs from "
                "the baseline by its training, not by what it removed (a smaller `--warm-logit` or a larger "
                "`--mask-lr` lets the masks move).")
    return "The L0 phase changed the one-shot selection: " + "; ".join(
        f"{k}: {c['added']} of {c['units']} units added, {c['removed']} removed" for k, c in moved.items()) + "."


def plot_sparsity(mixture: dict[str, Any], path: Path) -> None:
    """Expected sparsity per pruned module, with the warm-up ramp the Lagrangian pulls it toward."""
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


def task_rows(tasks: dict[str, dict[str, dict[str, float]]], models: list[str]) -> list[list[str]]:
    """Rows [task, metric, one cell per model] of lm-eval scores {model: {task: {metric: value}}}; a cell is
    "value ± stderr" (the harness's bootstrap standard error) when the harness gave one."""
    def cell(got: dict[str, float], metric: str) -> str:
        if metric not in got:
            return "n/a"
        err = got.get(f"{metric}_stderr")
        return f"{got[metric]:.3f}" + ("" if err is None else f" ± {err:.3f}")

    return [[task, metric, *(cell(tasks[m].get(task, {}), metric) for m in models)]
            for task, metrics in tasks[models[0]].items() for metric in metrics if not metric.endswith("_stderr")]


def _tasks_section(s: dict[str, Any]) -> list[str]:
    if not s.get("tasks"):
        return []
    keys, labels = zip(*[(k, label) for k, label in MODELS if k in s["tasks"]])
    return ["## lm-eval tasks", "",
            "Scores from lm-evaluation-harness (`--tasks`, as `drprune eval --tasks`), ± the harness's bootstrap "
            "standard error. The local tasks (drprune_copy, drprune_cloze) are built from the demo's eval rows.", "",
            _table(["task", "metric", *labels], task_rows(s["tasks"], list(keys))), ""]


def _present(s: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k, label) for k, label in MODELS if k in s["eval"]]


def _domain_table(s: dict[str, Any], table: str) -> str:
    present = [(k, label) for k, label in _present(s) if s["eval"][k].get(table)]
    domains = list(s["eval"]["source"][table]["domains"])
    rows = [[d, *(fmt(s["eval"][k][table]["domains"][d]) for k, _ in present)] for d in domains]
    rows.append(["**geometric mean**", *(f"**{fmt(s['eval'][k][table]['geomean'])}**" for k, _ in present)])
    rows.append(["eval rows per domain", *(", ".join(str(x["rows"]) for x in s["eval"][k][table]["domains"].values())
                                           for k, _ in present)])
    return _table(["domain", *(label for _, label in present)], rows)


def _budget_rows(s: dict[str, Any]) -> list[list[str]]:
    rows = []
    for key, label in _present(s):
        b, e = s["budget"][key], s["eval"][key]
        rows.append([label, str(b["prune_steps"]), str(b["continue_steps"]), f"{b['tokens']:,}",
                     f"{b['wall_s']:.0f}", f"{b['cpu_s']:.0f}", fmt(e["in_domain"]["geomean"]),
                     fmt(e["held_out"]["geomean"]) if e.get("held_out") else "n/a",
                     fmt(e["copy"], 2) if e.get("copy") else "n/a"])
    return rows


BUDGET_HEADER = ["model", "L0 steps", "continued steps", "training tokens", "wall s", "CPU s",
                 "in-domain ppl [95% CI]", "held-out ppl [95% CI]", "copying-probe ppl [95% CI]"]


def comparison_table(s: dict[str, Any]) -> str:
    """The equal-budget table as plain text (what `drprune demo` prints at the end)."""
    rows = [BUDGET_HEADER, *_budget_rows(s)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(BUDGET_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    verdicts = head_to_head(s["eval"], "pruned", "baseline")
    return "\n".join(lines + [line.lstrip("- ").replace("**", "") for line in verdicts])


def render_markdown(s: dict[str, Any]) -> str:
    """report.md from the summary dict alone, so it can be rebuilt from summary.json."""
    domains, held_out, params = s["domains"], s.get("held_out", []), s["parameters"]
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
    changes = s["mixture"].get("selection_changes") or {}
    checks = target_checks(s["eval"], "pruned", "baseline", "source", s["total_seconds"] / 60,
                           s["peak_memory_gb"])
    budget_note = (f"Every trained model gets the same budget: {opts['steps']} batches of {opts['batch_size']} x "
                   f"{opts['seq_len']} tokens. The learned model spends {opts['prune_steps']} of them learning L0 "
                   f"masks (the weights train under the masks) and the rest on continued pretraining of the "
                   f"compacted model; the baseline spends all of them on continued pretraining. "
                   + (f"Every training run distils from the source (KL weight {opts['kd']}, CE weight "
                      f"{1 - opts['kd']:.2f}). " if opts["kd"]
                      else "Training uses cross-entropy only (no distillation). ")
                   + "Wall and CPU seconds include the one-shot selection both models start from.")
    return "\n".join([
        "# drprune demo report",
        "",
        f"Source: `{Path(s['model']['gguf']).name}`"
        + (f" (first {s['model']['source_layers']} layers)" if s["model"]["source_layers"] else "")
        + f"; {len(domains)} training domains ({', '.join(domains)}); {len(held_out)} held-out domains "
        f"({', '.join(held_out) or 'none'}); device {s['device']}.",
        "",
        "## Equal-budget comparison",
        "",
        budget_note,
        "",
        _table(BUDGET_HEADER, _budget_rows(s)),
        "",
        "Perplexities are geometric means over domains with 95% bootstrap intervals (rows resampled); "
        "the copying probe is the perplexity of the second copy of a random token span repeated twice. "
        "Overlapping intervals are a tie:",
        "",
        *head_to_head(s["eval"], "pruned", "baseline"),
        "",
        "## Targets (issue 11, at this budget)",
        "",
        _table(["target", "measured", "met"], [[c["target"], c["measured"], "yes" if c["met"] else "**no**"]
                                               for c in checks]),
        "",
        "## Per-domain perplexity, training domains (held-out eval rows, 95% intervals)",
        "",
        _domain_table(s, "in_domain"),
        "",
        *(["## Per-domain perplexity, held-out domains (eval only, never trained on)", "",
           _domain_table(s, "held_out"), ""] if held_out else []),
        f"Baseline: width by {method['width']}, layers by {method['layers']} choice. The L0 masks start from "
        "the same selection and refine it while the weights train under the masks (DRO data mixture).",
        "",
        *_tasks_section(s),
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
        selection_line(changes),
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
        f"Peak memory: {s['peak_memory_gb']:.2f} GB. Stages reused from an earlier run take no time here; "
        "the budget table shows what each stage cost when it was built. The pruned model is in `hf/` "
        "(loads with `transformers.AutoModelForCausalLM.from_pretrained`).",
        "",
    ])


def write_report(summary: dict[str, Any], out: Path) -> None:
    """OUT/summary.json, OUT/report.md and OUT/plots/*.png."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_weights(summary["mixture"], summary["domains"], plots / "domain_weights.png")
    ppl = {m: {**{d: x["ppl"] for d, x in e["in_domain"]["domains"].items()},
               **{f"{d} (held out)": x["ppl"] for d, x in (e.get("held_out") or {}).get("domains", {}).items()}}
           for m, e in summary["eval"].items()}
    plot_domain_loss(ppl, list(next(iter(ppl.values()))), plots / "domain_loss.png")
    plot_sparsity(summary["mixture"], plots / "expected_sparsity.png")
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", render_markdown(summary))
