"""+Dy reference losses from a per-domain scaling law, fitted in-process.

The law is DRPruning's: L(D, s) = A·D^(−α)·s^(−β) + E with D the tokens seen of the domain and s
the sparsity (fraction of non-embedding parameters the masks remove). β may be negative (the loss
then rises with s). Without masks (every s = 0), or when every point has the same sparsity so β
cannot be identified, the s-term is dropped: L(D) = A·D^(−α) + E.

The fitter follows the reference procedure: a domain is fitted only once it has more than 10
points; the new reference is the law at the domain's end-of-training token count and the *target*
sparsity, capped at the lowest loss observed, and after the first fit a reference never rises
(min with the previous one). When to observe and refit (2% / 10% of training) is the callback's.

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
_BETA_STARTS = (-0.5, 0.0, 0.5)
_E_STARTS = (0.5, 0.9)  # as fractions of the lowest observed loss
_MAX_EXPONENT = 5.0
MIN_POINTS = 11  # the reference fits a domain once it has more than 10 points


@dataclass(frozen=True)
class ScalingLawFit:
    """Fitted A, α, β, E (β is None when the s-term was dropped) and the fit's RMS residual."""

    A: float
    alpha: float
    beta: float | None
    E: float
    rmse: float
    n_points: int

    def predict(self, tokens: float | np.ndarray, sparsity: float | np.ndarray) -> float | np.ndarray:
        """L(D, s) = A·D^(−α)·s^(−β) + E (sparsity ignored when β is None; it must be > 0 otherwise)."""
        d, s = np.asarray(tokens, dtype=np.float64), np.asarray(sparsity, dtype=np.float64)
        if self.beta is not None and np.any(s <= 0):
            raise ValueError(f"sparsity={sparsity} must be > 0 for a law with a sparsity term")
        s_term = 1.0 if self.beta is None else s ** (-self.beta)
        out = self.A * d ** (-self.alpha) * s_term + self.E
        return float(out) if np.ndim(out) == 0 else out


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
    use_beta = s.size > 0 and bool(np.all(s > 0)) and np.ptp(s) > 1e-9
    n_params = 4 if use_beta else 3
    if y.size < n_params + 1 or np.unique(d).size < 3:
        return None, f"{y.size} points over {np.unique(d).size} token counts; need {n_params + 1} over 3"
    # Work in x = ln(D / D_max) and z = ln s: the parameters are then of order one.
    d_max = float(d.max())
    x, z = np.log(d / d_max), (np.log(s) if use_beta else np.zeros_like(s))

    def residual(theta: np.ndarray) -> np.ndarray:
        a, alpha, beta, e = theta if use_beta else (*theta[:2], 0.0, theta[2])
        return np.exp(a - alpha * x - beta * z) + e - y

    best = None
    starts = itertools.product(_ALPHA_STARTS, _BETA_STARTS if use_beta else (0.0,), _E_STARTS)
    y_last = float(y[np.argmax(d)])
    for alpha0, beta0, e_frac in starts:
        e0 = e_frac * float(y.min())
        theta0 = [math.log(max(y_last - e0, 1e-3)), alpha0] + ([beta0] if use_beta else []) + [e0]
        lower = [-np.inf, 0.0] + ([-_MAX_EXPONENT] if use_beta else []) + [0.0]
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
    return ScalingLawFit(big_a, float(alpha), float(beta) if use_beta else None, float(e), rmse, int(y.size)), ""


class ReferenceLossFitter:
    """Per-domain reference losses for +Dy (module docstring): fit, predict at the end of training, never rise."""

    def __init__(self, set_names: Sequence[str], *, min_points: int = MIN_POINTS) -> None:
        if min_points < 1:
            raise ValueError(f"min_points={min_points} must be >= 1")
        self.set_names = list(set_names)
        self.min_points = int(min_points)
        self.observations: dict[str, list[tuple[float, float, float]]] = {n: [] for n in self.set_names}
        self.fitted: dict[str, bool] = {n: False for n in self.set_names}
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

    def refit_async(self, current: Sequence[float], final_tokens: Sequence[float],
                    target_sparsity: float) -> Future:
        """Queue a fit of every domain; the Future yields the new references.

        ``final_tokens`` is each domain's token count at the end of training, ``target_sparsity``
        the sparsity the run prunes to (0 without masks): the point the law is evaluated at.
        """
        k = len(self.set_names)
        if len(current) != k or len(final_tokens) != k:
            raise ValueError(f"current ({len(current)}) and final_tokens ({len(final_tokens)}) need one value "
                             f"per domain ({k})")
        if not 0 <= target_sparsity < 1:
            raise ValueError(f"target_sparsity={target_sparsity} must be in [0, 1)")
        if not self._worker.is_alive():
            raise RuntimeError("the reference-loss fitter is closed")
        future: Future = Future()
        snapshot = {name: list(points) for name, points in self.observations.items()}
        job = (snapshot, [float(c) for c in current], [float(t) for t in final_tokens], float(target_sparsity))
        self._jobs.put((job, future))
        return future

    def refit(self, current: Sequence[float], final_tokens: Sequence[float], target_sparsity: float) -> list[float]:
        """`refit_async` and wait: the deterministic path training uses."""
        return self.refit_async(current, final_tokens, target_sparsity).result()

    def close(self) -> None:
        """Finish queued fits and stop the worker thread."""
        if self._worker.is_alive():
            self._jobs.put(None)
            self._worker.join()

    def state_dict(self) -> dict[str, Any]:
        """Plain lists of floats (one point per evaluation per domain), safe in any checkpoint."""
        return {"set_names": list(self.set_names), "fitted": dict(self.fitted),
                "observations": {n: [list(p) for p in pts] for n, pts in self.observations.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the observations with a checkpoint's (validated like `observe`)."""
        if list(state["set_names"]) != self.set_names:
            raise ValueError(f"checkpoint fitter has domains {state['set_names']}, this run {self.set_names}")
        self.observations = {n: [] for n in self.set_names}
        for name, points in state["observations"].items():
            for tokens, sparsity, loss in points:
                self.observe(name, tokens, sparsity, loss)
        self.fitted = {n: bool(state.get("fitted", {}).get(n, False)) for n in self.set_names}

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            (snapshot, current, final_tokens, target_s), future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                refs = [self._reference(n, snapshot[n], c, t, target_s)
                        for n, c, t in zip(self.set_names, current, final_tokens)]
            except Exception as err:  # handed to the waiting caller, never lost on this thread
                future.set_exception(err)
            else:
                future.set_result(refs)

    def _reference(self, name: str, points: list[tuple[float, float, float]], current: float,
                   final_tokens: float, target_s: float) -> float:
        if len(points) < self.min_points:
            log.info("reference loss of %s unchanged (%.4f): %d points, the fit needs %d",
                     name, current, len(points), self.min_points)
            return current
        tokens, sparsity, losses = (list(v) for v in zip(*points))
        fit, why = _fit(tokens, sparsity, losses)
        if fit is None:
            log.info("reference loss of %s unchanged (%.4f): %s", name, current, why)
            return current
        s_at = target_s if target_s > 0 else sparsity[-1]  # a law with an s-term needs s > 0
        predicted = fit.predict(max(final_tokens, max(tokens)), s_at)
        if not math.isfinite(predicted):
            log.info("reference loss of %s unchanged (%.4f): prediction %s", name, current, predicted)
            return current
        new = max(0.0, min(predicted, min(losses)))
        if self.fitted[name]:
            new = min(new, current)
        self.fitted[name] = True
        beta = "none" if fit.beta is None else f"{fit.beta:.3f}"
        log.info("reference loss of %s: %.4f -> %.4f (law at D=%.3g, s=%.3f: %.4f; A=%.4g alpha=%.3f beta=%s "
                 "E=%.3f rmse=%.4f, %d points)", name, current, new, final_tokens, s_at, predicted,
                 fit.A, fit.alpha, beta, fit.E, fit.rmse, fit.n_points)
        return new
