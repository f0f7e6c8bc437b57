"""Feeds training progress to the mask generator, logs its stats, saves masks at every eval.

Also keeps the expected sparsity of each module per step (in checkpoints, for exact resume) and
plots it to `expected_sparsity.png` at every eval and at the end of the run. Files go beside the
checkpoints through `RunFiles` (a `{run_name}` or object-store save_folder included).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from drprune.masks.report import write_report
from drprune.plots import plot_series
from drprune.run_files import RunFiles

log = logging.getLogger(__name__)


def unwrap_model(state: State) -> Any:
    """The ComposerModel inside any DDP wrapper."""
    return state.model.module if hasattr(state.model, "module") else state.model


def logging_step(state: State, interval: int) -> bool:
    """Every `interval` batches, and the last batch of training (so short runs log too)."""
    elapsed = state.get_elapsed_duration()
    return int(state.timestamp.batch) % interval == 0 or (elapsed is not None and float(elapsed) >= 1.0)


def stats_to_floats(stats: dict[str, Any]) -> dict[str, float]:
    """Logged values as floats: every 0-d tensor read in one transfer (one host sync, not one per stat)."""
    tensors = {k: v for k, v in stats.items() if torch.is_tensor(v)}
    out = {k: float(v) for k, v in stats.items() if not torch.is_tensor(v)}
    if tensors:
        out.update(zip(tensors, torch.stack([v.detach().float().reshape(()) for v in tensors.values()]).tolist()))
    return out


class PruningCallback(Callback):
    """Steps the mask generator's schedule, logs its stats every `log_interval` batches (Composer's console
    interval) and writes masks, plots and the final report."""

    def __init__(self, save_folder: str | None = None, log_interval: int = 1) -> None:
        self.files = RunFiles(save_folder)
        self.log_interval = max(1, int(log_interval))
        self.sparsity_history: dict[str, list[tuple[int, float]]] = {}

    def batch_start(self, state: State, logger: Logger) -> None:
        unwrap_model(state).mask_generator.set_step(int(state.timestamp.batch))

    def batch_end(self, state: State, logger: Logger) -> None:
        unwrap_model(state).mask_generator.after_optimizer_step()
        stats = unwrap_model(state).last_stats
        step = int(state.timestamp.batch)
        if not stats or not logging_step(state, self.log_interval):
            return  # the stats stay tensors: read (one host sync) only on logging steps
        stats = stats_to_floats(stats)
        logger.log_metrics({f"pruning/{k}": v for k, v in stats.items()})
        for key, value in stats.items():
            if key.startswith("expected_sparsity/"):
                self.sparsity_history.setdefault(key.split("/", 1)[1], []).append((step, value))

    def eval_end(self, state: State, logger: Logger) -> None:
        if not self.files.enabled or dist.get_global_rank() != 0:
            return
        step = int(state.timestamp.batch)
        model = unwrap_model(state)
        masks = model.mask_generator.hard_masks()
        where = self.files.write(f"zs_s{step}.safetensors", lambda path: masks.save(path, source=model.model.cfg),
                                 state, logger)
        log.info("saved masks of step %d to %s", step, where)
        self._plot(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        if not self.files.enabled:
            return
        report = write_report(state, unwrap_model(state).mask_generator, self.files, logger)
        logger.log_metrics({f"report/{k}": v for k, v in report.items() if isinstance(v, (int, float))})
        if dist.get_global_rank() == 0:
            self._plot(state, logger)

    def _plot(self, state: State, logger: Logger) -> None:
        if self.sparsity_history:
            self.files.write("expected_sparsity.png", lambda path: plot_series(
                self.sparsity_history, path, ylabel="expected sparsity", title="Expected sparsity per pruned module"),
                state, logger)

    def state_dict(self) -> dict[str, Any]:
        return {"sparsity_history": self.sparsity_history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sparsity_history = {k: [tuple(p) for p in v] for k, v in state["sparsity_history"].items()}
