"""Feeds training progress to the mask generator, logs its stats, saves masks at every eval."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

log = logging.getLogger(__name__)


class PruningCallback(Callback):
    def __init__(self, save_folder: str | None = None) -> None:
        self.save_folder = save_folder

    @staticmethod
    def _generator(state: State):
        return getattr(state.model, "mask_generator", None) or getattr(
            getattr(state.model, "module", None), "mask_generator", None
        )

    def batch_start(self, state: State, logger: Logger) -> None:
        gen = self._generator(state)
        if gen is not None:
            gen.set_step(int(state.timestamp.batch))

    def batch_end(self, state: State, logger: Logger) -> None:
        model = state.model.module if hasattr(state.model, "module") else state.model
        if model.last_stats:
            logger.log_metrics({f"pruning/{k}": v for k, v in model.last_stats.items()})

    def eval_end(self, state: State, logger: Logger) -> None:
        gen = self._generator(state)
        if gen is None or self.save_folder is None or dist.get_global_rank() != 0:
            return
        step = int(state.timestamp.batch)
        path = Path(self.save_folder) / f"zs_s{step}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        masks = {k: v.cpu() for k, v in gen.hard_masks().items()}
        tmp = path.with_suffix(".pt.tmp")
        torch.save(masks, tmp)
        tmp.replace(path)
        log.info("saved masks of step %d to %s", step, path)
