"""+Dy reference losses from a per-domain scaling law, fitted in-process (DESIGN 4.3).

The law is L(D, s) = A·D^(−α)·(1 − s)^(−β) + E with D the tokens seen of the domain and s the
sparsity (fraction of non-embedding parameters the masks remove). DESIGN writes s^(−β); we give
the s-term the kept fraction 1 − s instead, so the law is finite at s = 0 (continued pretraining,
no masks) and the loss rises as pruning removes more. When every point has the same sparsity the
β term cannot be identified and is dropped (β = 0).

The fit runs on a background thread fed by a queue: `ReferenceLossFitter.refit_async` hands the
worker a snapshot of the observations and returns a Future; `refit` waits for it, so a run that
always waits is exactly reproducible. No sockets, no pickles: observations are plain floats.
"""
from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import least_squares

log = logging.getLogger(__name__)

ROBUST_LOSS = "soft_l1"
F_SCALE = 0.02  # nats: residuals beyond this count linearly, so a noisy eval cannot drag the fit
_ALPHA_STARTS = (0.1, 0.3, 0.7)
_BETA_STARTS = (0.2, 1.0)
_E_STARTS = (0.5, 0.9)  # as fractions of the lowest observed loss
_MAX_EXPONENT = 5.0


@dataclass(frozen=True)
class ScalingLawFit:
    """Fitted A, α, β, E (β = 0 when the points had one sparsity) and the fit's RMS residual."""

    A: float
    alpha: float
    beta: float
    E: float
    rmse: float
    n_points: int

    def predict(self, tokens: float | np.ndarray, sparsity: float | np.ndarray) -> float | np.ndarray:
        """L(D, s) = A·D^(−α)·(1 − s)^(−β) + E."""
        d, s = np.asarray(tokens, dtype=np.float64), np.asarray(sparsity, dtype=np.float64)
        out = self.A * d ** (-self.alpha) * (1 - s) ** (-self.beta) + self.E
        return float(out) if out.ndim == 0 else out


def fit_scaling_law(tokens_seen: Sequence[float], sparsity: Sequence[float],
                    losses: Sequence[float]) -> ScalingLawFit | None:
    """Robust least-squares fit of the law from several starts; None when too few points or no fit."""
    return _fit(tokens_seen, sparsity, losses)[0]


def _fit(tokens_seen: Sequence[float], sparsity: Sequence[float],
         losses: Sequence[float]) -> tuple[ScalingLawFit | None, str]:
    """The fit and, when there is none, why (for the fitter's log)."""
    d, s, y = (np.asarray(list(v), dtype=np.float64) for v in (tokens_seen, sparsity, losses))
    if not d.shape == s.shape == y.shape or d.ndim != 1:
        raise ValueError(f"tokens_seen, sparsity and losses need equal lengths ({d.size}, {s.size}, {y.size})")
    if np.any(~np.isfinite(d) | (d <= 0)) or np.any(~np.isfinite(s) | (s < 0) | (s >= 1)) or not np.all(np.isfinite(y)):
        raise ValueError("tokens_seen must be > 0, sparsity in [0, 1) and losses finite")
    use_beta = s.size > 0 and np.ptp(s) > 1e-9
    n_params = 4 if use_beta else 3
    if y.size < n_params + 1 or np.unique(d).size < 3:
        return None, f"{y.size} points over {np.unique(d).size} token counts; need {n_params + 1} over 3"
    # Work in x = ln(D / D_max) and z = ln(1 − s): the parameters are then of order one.
    d_max = float(d.max())
    x, z = np.log(d / d_max), np.log1p(-s)

    def residual(theta: np.ndarray) -> np.ndarray:
        a, alpha, beta, e = theta if use_beta else (*theta[:2], 0.0, theta[2])
        return np.exp(a - alpha * x - beta * z) + e - y

    best = None
    starts = itertools.product(_ALPHA_STARTS, _BETA_STARTS if use_beta else (0.0,), _E_STARTS)
    y_last = float(y[np.argmax(d)])
    for alpha0, beta0, e_frac in starts:
        e0 = e_frac * float(y.min())
        theta0 = [math.log(max(y_last - e0, 1e-3)), alpha0] + ([beta0] if use_beta else []) + [e0]
        lower = [-np.inf, 0.0] + ([0.0] if use_beta else []) + [0.0]
        upper = [np.inf, _MAX_EXPONENT] + ([_MAX_EXPONENT] if use_beta else []) + [float(y.max())]
        try:
            res = least_squares(residual, theta0, bounds=(lower, upper), loss=ROBUST_LOSS, f_scale=F_SCALE)
        except (ValueError, FloatingPointError) as err:
            log.debug("scaling-law start %s failed: %s", theta0, err)
            continue
        if res.status > 0 and np.all(np.isfinite(res.x)) and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        return None, "no start converged"
    a, alpha, beta, e = best.x if use_beta else (*best.x[:2], 0.0, best.x[2])
    big_a = math.exp(a + alpha * math.log(d_max))
    if not math.isfinite(big_a):
        return None, "the fitted A overflows"
    rmse = float(np.sqrt(np.mean(residual(best.x) ** 2)))
    return ScalingLawFit(big_a, float(alpha), float(beta), float(e), rmse, int(y.size)), ""


class ReferenceLossFitter:
    """Per-domain reference losses for +Dy: fit each domain's law, predict ahead, never exceed the best seen.

    The new reference of a domain is the law's loss after ``horizon`` times the tokens it has seen so
    far, at ``target_sparsity`` (default: the latest observed sparsity), capped at the lowest loss
    observed for that domain. A domain with too few points or a failed fit keeps its reference.
    """

    def __init__(self, set_names: Sequence[str], *, horizon: float = 2.0,
                 target_sparsity: float | None = None) -> None:
        if not horizon >= 1:
            raise ValueError(f"horizon={horizon} must be >= 1")
        if target_sparsity is not None and not 0 <= target_sparsity < 1:
            raise ValueError(f"target_sparsity={target_sparsity} must be in [0, 1)")
        self.set_names = list(set_names)
        self.horizon, self.target_sparsity = float(horizon), target_sparsity
        self.observations: dict[str, list[tuple[float, float, float]]] = {n: [] for n in self.set_names}
        self._jobs: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="drprune-reference-fit", daemon=True)
        self._worker.start()

    def observe(self, domain: str, tokens: float, sparsity: float, loss: float) -> None:
        """Record one (D, s, loss) point of a domain (one per evaluation)."""
        if domain not in self.observations:
            raise ValueError(f"unknown domain {domain!r}; known: {self.set_names}")
        if not (tokens > 0 and 0 <= sparsity < 1 and math.isfinite(loss)):
            raise ValueError(f"bad observation for {domain}: tokens={tokens}, sparsity={sparsity}, loss={loss}")
        self.observations[domain].append((float(tokens), float(sparsity), float(loss)))

    def refit_async(self, current: Sequence[float]) -> Future:
        """Queue a fit of every domain on the observations so far; the Future yields the new references."""
        if len(current) != len(self.set_names):
            raise ValueError(f"current has {len(current)} reference losses for {len(self.set_names)} domains")
        if not self._worker.is_alive():
            raise RuntimeError("the reference-loss fitter is closed")
        future: Future = Future()
        snapshot = {name: list(points) for name, points in self.observations.items()}
        self._jobs.put((snapshot, [float(c) for c in current], future))
        return future

    def refit(self, current: Sequence[float]) -> list[float]:
        """`refit_async` and wait: the deterministic path training uses."""
        return self.refit_async(current).result()

    def close(self) -> None:
        """Finish queued fits and stop the worker thread."""
        if self._worker.is_alive():
            self._jobs.put(None)
            self._worker.join()

    def state_dict(self) -> dict[str, Any]:
        """Plain lists of floats (one point per evaluation per domain), safe in any checkpoint."""
        return {"set_names": list(self.set_names),
                "observations": {n: [list(p) for p in pts] for n, pts in self.observations.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the observations with a checkpoint's (validated like `observe`)."""
        if list(state["set_names"]) != self.set_names:
            raise ValueError(f"checkpoint fitter has domains {state['set_names']}, this run {self.set_names}")
        self.observations = {n: [] for n in self.set_names}
        for name, points in state["observations"].items():
            for tokens, sparsity, loss in points:
                self.observe(name, tokens, sparsity, loss)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            snapshot, current, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result([self._reference(n, snapshot[n], c) for n, c in zip(self.set_names, current)])
            except Exception as err:  # handed to the waiting caller, never lost on this thread
                future.set_exception(err)

    def _reference(self, name: str, points: list[tuple[float, float, float]], current: float) -> float:
        if not points:
            log.info("reference loss of %s unchanged (%.4f): no observations yet", name, current)
            return current
        tokens, sparsity, losses = (list(v) for v in zip(*points))
        fit, why = _fit(tokens, sparsity, losses)
        if fit is None:
            log.info("reference loss of %s unchanged (%.4f): %s", name, current, why)
            return current
        target_s = sparsity[-1] if self.target_sparsity is None else self.target_sparsity
        predicted = fit.predict(self.horizon * max(tokens), target_s)
        if not math.isfinite(predicted):
            log.info("reference loss of %s unchanged (%.4f): prediction %s", name, current, predicted)
            return current
        new = min(predicted, min(losses))
        log.info("reference loss of %s: %.4f -> %.4f (A=%.4g alpha=%.3f beta=%.3f E=%.3f rmse=%.4f, %d points)",
                 name, current, new, fit.A, fit.alpha, fit.beta, fit.E, fit.rmse, fit.n_points)
        return new
