"""Dynamic data loading: move the domain mixture during training (constant / sheared / dro...).

The rules themselves are pure functions in `drprune.mixture`; this callback gathers their inputs
(EMA of per-domain training losses reduced over ranks, per-domain eval losses, tokens seen per
domain), applies the rule after each evaluation, pushes the new proportions to the mixture dataset
on every rank (rank 0's result is broadcast, so ranks can never drift apart), logs them every batch,
and keeps all of it in Composer checkpoints for exact resume.

Timing follows DRPruning: +Dy records a (tokens, sparsity, loss) point per domain at every
evaluation from 2% of training on (the eval loss with +Eval, otherwise the mean training loss since
the previous evaluation), refits from 10% on, and predicts at the domain's end-of-training token
count and the run's target sparsity; +DyAll moves p0 only from 20% of training on. The EMA of
training losses starts from the first observed loss, not from 0 as in the reference (whose zero
start makes every excess loss negative for the first ~1/ema batches). Plots and a summary JSON go
beside the checkpoints (through `RunFiles`) at every evaluation and at the end of the run.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from drprune.atomic import write_json
from drprune.plots import plot_eval_losses, plot_weights
from drprune.callbacks.pruning import logging_step, unwrap_model
from drprune.errors import ConfigError
from drprune.mixture import ReferenceLossFitter, RuleInputs, UpdateType, apply_rule
from drprune.models.shapes import config_params
from drprune.registry import CALLBACKS
from drprune.run_config import DataLoading
from drprune.run_files import RunFiles

log = logging.getLogger(__name__)

DY_OBSERVE_FROM = 0.02  # fraction of training before +Dy records points
DY_FIT_FROM = 0.10  # ... before it refits the reference losses
DYALL_FROM = 0.20  # ... before +DyAll moves p0


class DynamicLoadingCallback(Callback):
    """The Composer side of dynamic data loading (module docstring): rule inputs, timing, resume state."""

    def __init__(
        self,
        set_names: list[str],
        proportion: list[float],
        update_type: UpdateType,
        dataset: Any,
        *,
        reference_loss: list[float] | None = None,
        rho: float = 0.1,
        ema: float = 0.1,
        min_prob: float = 0.2,
        clamp_q_to_min: bool = True,
        dro_clamp: str = "reference",
        save_folder: str | None = None,
        log_interval: int = 1,
    ) -> None:
        self.set_names, self.update_type, self.dataset = list(set_names), update_type, dataset
        self.log_interval = max(1, int(log_interval))
        self.rho, self.ema, self.min_prob, self.clamp_q_to_min = rho, ema, min_prob, clamp_q_to_min
        self.dro_clamp = dro_clamp
        self.files = RunFiles(save_folder)
        k = len(self.set_names)
        self.p = list(proportion)
        self.p0 = list(proportion)
        self.p0_init = list(proportion)
        self.reference_loss = list(reference_loss) if reference_loss is not None else None
        self.ema_loss: list[float | None] = [None] * k
        self._told_train_only = False
        self.tokens_seen = [0] * k
        self.interval_loss = [0.0] * k  # training loss sums and tokens since the last evaluation
        self.interval_tokens = [0] * k
        self.weight_history: list[tuple[int, list[float]]] = []
        self.eval_history: list[tuple[int, list[float], list[float] | None]] = []
        self._batch_sums: torch.Tensor | None = None  # this batch's per-domain loss sums and tokens, on device
        self._pending: list[torch.Tensor] = []  # reduced sums of batches not yet folded into the lists above
        self.fitter = None
        if update_type.dynamic_reference:
            self.fitter = ReferenceLossFitter(self.set_names)

    # ---------------------------------------------------------------- training losses
    def after_loss(self, state: State, logger: Logger) -> None:
        outputs, batch = state.outputs, state.batch
        if not isinstance(outputs, dict) or "loss_sum" not in outputs or "set" not in batch:
            return
        k = len(self.set_names)
        ids = batch["set"].to(outputs["loss_sum"].device)
        if self._batch_sums is None:
            self._batch_sums = torch.zeros(2 * k, dtype=torch.float64, device=ids.device)
        self._batch_sums[:k].index_add_(0, ids, outputs["loss_sum"].double())
        self._batch_sums[k:].index_add_(0, ids, outputs["tokens"].double())

    def batch_end(self, state: State, logger: Logger) -> None:
        """Reduce this batch's sums over ranks on the device; fold them into the EMA only when read."""
        sums = self._batch_sums if self._batch_sums is not None else torch.zeros(2 * len(self.set_names),
                                                                                dtype=torch.float64)
        self._batch_sums = None
        reduced = state.device.tensor_to_device(sums)
        dist.all_reduce(reduced)
        self._pending.append(reduced)
        step = int(state.timestamp.batch)
        self.weight_history.append((step, list(self.p)))
        logger.log_metrics({f"metrics/train/{name}_weight": w for name, w in zip(self.set_names, self.p)})
        if not logging_step(state, self.log_interval):
            return  # no host sync between logging steps
        self._fold()
        losses = {f"{name}_ema_loss": v for name, v in zip(self.set_names, self.ema_loss) if v is not None}
        losses.update({f"{name}_reference_loss": v for name, v in zip(self.set_names, self.reference_loss or [])})
        logger.log_metrics({f"metrics/train/{k}": v for k, v in losses.items()})  # the rule's inputs

    def _fold(self) -> None:
        """Apply the pending batches, in order, to the EMA, tokens seen and interval sums (one host read)."""
        if not self._pending:
            return
        rows = torch.stack(self._pending).tolist()
        self._pending = []
        k = len(self.set_names)
        for totals in rows:
            for i in range(k):
                tokens = totals[k + i]
                if tokens > 0:
                    mean = totals[i] / tokens
                    prev = self.ema_loss[i]
                    self.ema_loss[i] = mean if prev is None else (1 - self.ema) * prev + self.ema * mean
                    self.tokens_seen[i] += int(tokens)
                    self.interval_loss[i] += totals[i]
                    self.interval_tokens[i] += int(tokens)

    # ---------------------------------------------------------------- the rule
    def eval_end(self, state: State, logger: Logger) -> None:
        self._fold()
        eval_losses = self._eval_losses(state)
        step = int(state.timestamp.batch)
        elapsed = float(state.get_elapsed_duration() or 0.0)
        if self.fitter is not None:
            self._update_reference(state, eval_losses, elapsed)
        self.interval_loss, self.interval_tokens = [0.0] * len(self.set_names), [0] * len(self.set_names)
        self.eval_history.append((step, eval_losses or [], list(self.reference_loss) if self.reference_loss else None))
        new_p = self._apply_rule(eval_losses, elapsed)
        new_p = dist.all_gather_object(new_p)[0]  # rank 0's result everywhere
        if new_p != self.p:
            log.info("step %d: proportions %s -> %s", step, _fmt(self.p), _fmt(new_p))
        self.p = new_p
        self.dataset.update_proportion(self.p)
        self._write_outputs(state, logger)

    def _eval_losses(self, state: State) -> list[float] | None:
        """Per-domain eval losses; a train-only domain (no eval rows: a repeats domain) has its EMA
        training loss instead (its reference loss before it was sampled), so eval-loss rules can steer it."""
        metrics = state.eval_metrics.get("eval", {})
        values = []
        for name in self.set_names:
            metric = metrics.get(f"{name}_LanguageCrossEntropy")
            if metric is None:
                return None
            values.append(float(metric.compute()))
        return self._stand_in_for_missing(values)

    def _stand_in_for_missing(self, values: list[float]) -> list[float]:
        missing = [i for i, v in enumerate(values) if math.isnan(v)]
        for i in missing:
            fallback = self.ema_loss[i] if self.ema_loss[i] is not None else (
                self.reference_loss[i] if self.reference_loss else None)
            if fallback is not None:
                values[i] = fallback
        if missing and not self._told_train_only:
            log.info("no eval rows for %s (train-only domains): their EMA training loss stands in for the eval loss",
                     [self.set_names[i] for i in missing])
            self._told_train_only = True
        return values

    def _apply_rule(self, eval_losses: list[float] | None, elapsed: float) -> list[float]:
        """The registered update rule's next proportions (and p0, which +DyAll moves from DYALL_FROM on)."""
        new_p, self.p0 = apply_rule(RuleInputs(
            self.update_type, list(self.p), list(self.p0), self.p0_init, list(self.ema_loss), eval_losses,
            self.reference_loss, rho=self.rho, min_prob=self.min_prob, clamp_q_to_min=self.clamp_q_to_min,
            clamp_mode=self.dro_clamp, move_p0=self.update_type.dynamic_ratio and elapsed >= DYALL_FROM))
        return new_p

    def _update_reference(self, state: State, eval_losses: list[float] | None, elapsed: float) -> None:
        if elapsed < DY_OBSERVE_FROM:
            return
        if self.update_type.use_eval:
            losses = eval_losses
        else:
            losses = [s / t if t > 0 else math.nan for s, t in zip(self.interval_loss, self.interval_tokens)]
        if losses is None:
            log.warning("+Dy: no eval loss for every domain; no scaling-law point recorded")
            return
        sparsity = _model_sparsity(state)
        for i, name in enumerate(self.set_names):
            if math.isfinite(losses[i]) and self.tokens_seen[i] > 0:
                self.fitter.observe(name, self.tokens_seen[i], sparsity, losses[i])
        if elapsed >= DY_FIT_FROM:
            final_tokens = [t / elapsed for t in self.tokens_seen]
            self.reference_loss = self.fitter.refit(self.reference_loss, final_tokens, _target_sparsity(state))

    # ---------------------------------------------------------------- outputs
    def fit_end(self, state: State, logger: Logger) -> None:
        self._fold()
        self._write_outputs(state, logger)

    def close(self, state: State, logger: Logger) -> None:
        # Not at fit_end: Composer runs the evaluators due at the end of training after FIT_END.
        if self.fitter is not None:
            self.fitter.close()

    def _write_outputs(self, state: State, logger: Logger) -> None:
        if not self.files.enabled or dist.get_global_rank() != 0:
            return
        self.files.write("domain_weights.png", lambda path: plot_weights(self.weight_history, self.set_names, path),
                         state, logger)
        self.files.write("domain_eval_loss.png",
                         lambda path: plot_eval_losses(self.eval_history, self.set_names, path), state, logger)
        summary = {
            "update_type": self.update_type.text, "set_names": self.set_names, "final_proportion": self.p,
            "reference_ratio": self.p0, "reference_loss": self.reference_loss, "ema_train_loss": self.ema_loss,
            "tokens_seen": dict(zip(self.set_names, self.tokens_seen)),
            "last_eval_loss": self.eval_history[-1][1] if self.eval_history else None,
        }
        self.files.write("data_loading_summary.json", lambda path: write_json(path, summary), state, logger)

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        self._fold()
        return {
            "p": self.p, "p0": self.p0, "reference_loss": self.reference_loss, "ema_loss": self.ema_loss,
            "tokens_seen": self.tokens_seen, "interval_loss": self.interval_loss,
            "interval_tokens": self.interval_tokens, "weight_history": self.weight_history,
            "eval_history": self.eval_history,
            "fitter": self.fitter.state_dict() if self.fitter is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending, self._batch_sums = [], None
        self.p, self.p0 = list(state["p"]), list(state["p0"])
        self.reference_loss, self.ema_loss = state["reference_loss"], list(state["ema_loss"])
        self.tokens_seen = list(state["tokens_seen"])
        self.interval_loss = list(state.get("interval_loss", [0.0] * len(self.set_names)))
        self.interval_tokens = list(state.get("interval_tokens", [0] * len(self.set_names)))
        self.weight_history = [(s, list(w)) for s, w in state["weight_history"]]
        self.eval_history = [tuple(e) for e in state["eval_history"]]
        if self.fitter is not None and state.get("fitter") is not None:
            self.fitter.load_state_dict(state["fitter"])
        self.dataset.update_proportion(self.p)


def _fmt(p: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in p) + "]"


def _model_sparsity(state: State) -> float:
    """Fraction of non-embedding parameters the masks currently remove (0 without masks)."""
    model = unwrap_model(state)
    stats = getattr(model, "last_stats", {}) or {}
    if "expected_params" not in stats:
        return 0.0
    return max(0.0, 1.0 - float(stats["expected_params"]) / config_params(model.model.cfg, embeddings=False))


def _target_sparsity(state: State) -> float:
    """The fraction of non-embedding parameters the run prunes to (0 without masks)."""
    model = unwrap_model(state)
    target = getattr(getattr(model, "mask_generator", None), "target_params", None)
    if target is None:
        return 0.0
    return max(0.0, 1.0 - target / config_params(model.model.cfg, embeddings=False))


@CALLBACKS.register("data_loading")
def build_data_loading_callback(section: DataLoading, save_folder: str | None, model: Any,
                                loader: Any, log_interval: int = 1) -> Callback | None:
    """From `callbacks.data_loading`; None when the mixture is not dynamic."""
    if not section.dynamic:
        return None
    dataset = getattr(loader, "dataset", None)
    if not hasattr(dataset, "update_proportion"):
        raise ConfigError("callbacks.data_loading.dynamic=true needs the dynamic mixture dataset as the train loader")
    set_names = list(dataset.set_names)
    section.check_domains(set_names)
    return DynamicLoadingCallback(
        set_names, list(dataset.proportion), section.rule, dataset, reference_loss=section.reference_loss,
        rho=section.rho, ema=section.ema, min_prob=section.min_prob, clamp_q_to_min=section.clamp_q_to_min,
        dro_clamp=section.dro_clamp, save_folder=save_folder, log_interval=log_interval)
