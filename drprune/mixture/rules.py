"""Data-mixture update rules (DESIGN 4.3) as pure functions on plain lists of floats.

The Composer callback owns all state (EMA of training losses, reference losses, p0); these
functions only map their inputs to the next proportions, so they are easy to test and to replay.

DRO (χ²-ball around the reference ratio p0, excess losses Δ = ℓ − ℓ_ref) comes in two clamp modes:

``reference`` (default) is DRPruning's procedure, so a ported ρ moves the mixture as published:
q(η) = p0·relu(Δ − η) normalised, q/p0 floored at ``min_prob`` and renormalised once; η by
bisection so that χ²(q(η), p0) = ρ; *then* ``clamp_q_to_min`` raises every q_i to min(p0) and
renormalises. The clamp after the bisection pulls q back inside the ball, so it moves less than ρ
allows (uniform p0 over 4 domains, one domain 1 nat worse, ρ = 0.1: worst-domain weight ≈ 0.317).

``exact`` solves  max_q Σ q_i Δ_i  s.t. q in the simplex, q_i ≥ min_prob·p0_i, χ²(q, p0) ≤ ρ  with
the clamp inside the bisection, so the returned q sits exactly on the ball (same case: 0.379). Its
KKT conditions give q_i = max(c·p0_i·relu(Δ_i − η), f_i·p0_i); the renormalisation is water-filling
(`_fill`) so the floors still hold after it. The soft clamp (raise to min(p0), renormalise) is
applied to every candidate before its divergence is measured.

In both modes, when even the most extreme q (all spare mass on the worst domains) stays inside the
ball, that q is returned. rho = 0, all Δ equal or a single domain give q = p0. A domain with
p0_i = 0 keeps q_i = 0 (any mass there has infinite χ² cost).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from drprune.errors import ConfigError

log = logging.getLogger(__name__)

SHEARED_ETA = 1.0  # step size of the exponentiated update (Sheared-LLaMA)
SHEARED_SMOOTHING = 1e-4  # mix with uniform so no domain ever reaches 0 (DoReMi)
DYALL_STEP = 0.1  # +DyAll: p0 <- norm((1 - step) p0 + step q)
_BISECTION_STEPS = 200

DRO_CLAMP_MODES = ("reference", "exact")
VALID_UPDATE_TYPES = (
    "constant", "sheared", "dro", "dro+Eval", "dro+Dy", "dro+DyAll", "dro+Eval+Dy", "dro+Eval+DyAll",
)


@dataclass(frozen=True)
class UpdateType:
    """A parsed ``update_type``: the rule plus the dro flags (``+Eval``, ``+Dy``, ``+DyAll``)."""

    rule: str  # 'constant' | 'sheared' | 'dro'
    use_eval: bool = False  # dro on eval losses instead of the EMA of training losses
    dynamic_reference: bool = False  # reference losses from a fitted scaling law (+Dy, +DyAll)
    dynamic_ratio: bool = False  # p0 moves toward q after each update (+DyAll)

    @property
    def text(self) -> str:
        """The canonical spelling, e.g. 'dro+Eval+DyAll'."""
        flag = "+DyAll" if self.dynamic_ratio else "+Dy" if self.dynamic_reference else ""
        return self.rule + ("+Eval" if self.use_eval else "") + flag


def parse_update_type(text: str) -> UpdateType:
    """Parse 'dro+Eval+Dy' and friends (flags in any order, any case); ConfigError lists the valid ones."""
    parts = [part.strip().lower() for part in str(text).split("+")]
    rule, flags = parts[0], parts[1:]
    ok = (
        rule in ("constant", "sheared", "dro")
        and (rule == "dro" or not flags)
        and len(set(flags)) == len(flags)
        and set(flags) <= {"eval", "dy", "dyall"}
        and not {"dy", "dyall"} <= set(flags)
    )
    if not ok:
        raise ConfigError(
            f"callbacks.data_loading.update_type={text!r} is not valid; use one of {', '.join(VALID_UPDATE_TYPES)}"
        )
    return UpdateType(rule, use_eval="eval" in flags, dynamic_reference=bool({"dy", "dyall"} & set(flags)),
                      dynamic_ratio="dyall" in flags)


# ------------------------------------------------------------------------------------------ rules
def constant_update(proportion: Sequence[float]) -> list[float]:
    """The 'constant' rule: proportions never move (a copy, so callers may mutate it)."""
    return [float(x) for x in proportion]


def sheared_update(proportion: Sequence[float], losses: Sequence[float],
                   reference_loss: Sequence[float]) -> list[float]:
    """Sheared-LLaMA: p <- softmax(ln p + η(ℓ − ℓ_ref)), η = 1, then p <- (1 − c)p + c/k, c = 1e-4."""
    p = _distribution(proportion, "proportion")
    ell, ref = _matching(p, losses, "losses"), _matching(p, reference_loss, "reference_loss")
    with np.errstate(divide="ignore"):
        logits = np.log(p) + SHEARED_ETA * (ell - ref)
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    return ((1 - SHEARED_SMOOTHING) * weights + SHEARED_SMOOTHING / p.size).tolist()


def dro_update(p0: Sequence[float], losses: Sequence[float], reference_loss: Sequence[float], rho: float,
               min_prob: float = 0.2, clamp_q_to_min: bool = True, clamp_mode: str = "reference") -> list[float]:
    """χ²-ball DRO (module docstring): the worst-case mixture around p0 for these excess losses.

    ``losses`` is the caller's estimate (EMA of training losses, or eval losses with +Eval). If every
    excess loss is negative the reference is scaled by 0.9, 0.8, ..., 0 until one is positive.
    ``clamp_mode`` is "reference" (DRPruning: clamp after the bisection) or "exact" (q on the ball).
    """
    ref0 = _distribution(p0, "p0")
    ell, ref = _matching(ref0, losses, "losses"), _matching(ref0, reference_loss, "reference_loss")
    if not (math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho={rho} must be a finite number >= 0")
    if not 0 <= min_prob < 1:
        raise ValueError(f"min_prob={min_prob} must be in [0, 1)")
    if clamp_mode not in DRO_CLAMP_MODES:
        raise ValueError(f"clamp_mode={clamp_mode!r} must be one of {DRO_CLAMP_MODES}")
    q = np.zeros_like(ref0)
    support = ref0 > 0  # a domain outside p0's support has infinite χ² cost, so it keeps q = 0
    q[support] = _dro_on_support(ref0[support], excess_loss(ell[support], ref[support]), rho, min_prob,
                                 clamp_q_to_min, clamp_mode == "exact")
    return q.tolist()


def _dro_on_support(p0: np.ndarray, delta: np.ndarray, rho: float, min_prob: float,
                    clamp_q_to_min: bool, exact: bool) -> np.ndarray:
    """`dro_update` for a p0 with no zero entries."""
    if rho == 0 or np.ptp(delta) == 0:
        return p0.copy()
    top = float(delta.max())
    floor, no_cap = p0 * min_prob, np.full_like(p0, np.inf)

    def soft_clamp(q: np.ndarray) -> np.ndarray:
        q = np.maximum(q, p0.min()) if clamp_q_to_min else q
        return q / q.sum()

    def candidate(eta: float) -> np.ndarray:
        """q(η) at η; at η = max Δ its limit (all spare mass on the argmax)."""
        u = (delta >= top).astype(float) if eta >= top else np.maximum(delta - eta, 0.0)
        if exact:
            return soft_clamp(_fill(p0 * u, floor, no_cap))
        q = p0 * u / (p0 * u).sum()
        q = np.maximum(q, floor)
        return q / q.sum()

    eta = _bisect_eta(candidate, p0, delta, rho)
    q = candidate(eta)
    return q if exact else soft_clamp(q)


def _bisect_eta(candidate, p0: np.ndarray, delta: np.ndarray, rho: float) -> float:
    """The η at which χ²(candidate(η), p0) = ρ (divergence falls as η falls); max Δ if never reached."""
    top = float(delta.max())
    if chi2_divergence(candidate(top), p0) <= rho:
        return top
    lo, hi = top - float(np.ptp(delta)), top
    while chi2_divergence(candidate(lo), p0) > rho:  # the divergence -> 0 as η -> -inf, so this ends
        lo = hi - 2 * (hi - lo)
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if chi2_divergence(candidate(mid), p0) > rho:
            hi = mid
        else:
            lo = mid
    return lo


def excess_loss(losses: np.ndarray, reference_loss: np.ndarray) -> np.ndarray:
    """Δ = ℓ − ℓ_ref; if all Δ < 0, ℓ_ref is scaled by 0.9, 0.8, ..., 0 until some Δ is positive."""
    delta = losses - reference_loss
    if np.all(delta < 0):
        for tenths in range(9, -1, -1):
            delta = losses - reference_loss * (tenths / 10)
            if np.any(delta > 0):
                break
    return delta


def chi2_divergence(q: Sequence[float] | np.ndarray, p0: Sequence[float] | np.ndarray) -> float:
    """½ Σ p0_i (q_i/p0_i − 1)² = ½(Σ q_i²/p0_i − 1); infinite if q puts mass where p0 has none."""
    q, p0 = np.asarray(q, dtype=np.float64), np.asarray(p0, dtype=np.float64)
    if np.any(q[p0 <= 0] > 0):
        return math.inf
    support = p0 > 0
    return float(0.5 * (p0[support] * (q[support] / p0[support] - 1) ** 2).sum())


def dyall_ratio_update(p0: Sequence[float], q: Sequence[float], p0_init: Sequence[float]) -> list[float]:
    """+DyAll: p0 <- norm(0.9 p0 + 0.1 q) kept inside [p0_init/2, 2 p0_init] ∩ [min p0_init, max p0_init].

    The box is DRPruning's (both clamps); a uniform p0_init therefore never moves. Norm and clamp are
    one water-filling step (scale, clip, with the scale chosen so the result sums to 1), so the result
    is a distribution *and* inside the box, where the reference's clamp-then-renormalise can step
    outside it; it equals the plain normalisation whenever no bound binds.
    """
    init = _distribution(p0_init, "p0_init")
    cur, new = _matching(init, p0, "p0"), _matching(init, q, "q")
    mixed = (1 - DYALL_STEP) * cur + DYALL_STEP * new
    if np.any(mixed < 0) or mixed.sum() <= 0:
        raise ValueError(f"p0={cur.tolist()} and q={new.tolist()} must be non-negative with positive mass")
    lower = np.maximum(init / 2, init.min())
    upper = np.minimum(2 * init, init.max())
    return _fill(mixed / mixed.sum(), lower, upper).tolist()


def ema_update(prev: Sequence[float | None] | None, new: Sequence[float], alpha: float) -> list[float]:
    """(1 − α)·prev + α·new per entry; a missing (None) previous value takes the new one as is."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    prev = [None] * len(new) if prev is None else prev
    if len(prev) != len(new):
        raise ValueError(f"prev has {len(prev)} entries but new has {len(new)}")
    return [float(n) if p is None else (1 - alpha) * float(p) + alpha * float(n) for p, n in zip(prev, new)]


# ---------------------------------------------------------------------------------------- helpers
def _fill(weights: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """x = clip(c·weights, lower, upper) with the c ≥ 0 that makes Σx = 1 (needs Σlower ≤ 1 ≤ reachable).

    Σ clip(c·w, lo, hi) is piecewise linear and non-decreasing in c: evaluate it at its breakpoints
    and interpolate on the segment that crosses 1, which is exact up to rounding.
    """
    def total(c: float) -> float:
        return float(np.clip(c * weights, lower, upper).sum())

    if total(0.0) >= 1:
        return lower.copy()
    pos = weights > 0
    knots = np.concatenate([lower[pos] / weights[pos], upper[pos] / weights[pos]])
    knots = np.unique(knots[np.isfinite(knots) & (knots > 0)])
    c_lo, g_lo = 0.0, total(0.0)
    for c_hi in knots:
        g_hi = total(c_hi)
        if g_hi >= 1:
            c = c_lo + (c_hi - c_lo) * (1 - g_lo) / (g_hi - g_lo)
            return np.clip(c * weights, lower, upper)
        c_lo, g_lo = c_hi, g_hi
    slope = float(weights[pos & np.isinf(upper)].sum())
    if slope <= 0:
        raise ValueError("no distribution satisfies these bounds")
    return np.clip((c_lo + (1 - g_lo) / slope) * weights, lower, upper)


def _distribution(values: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name}={list(values)} must be a non-empty list of finite non-negative numbers")
    if abs(arr.sum() - 1) > 1e-6:
        raise ValueError(f"{name}={arr.tolist()} sums to {arr.sum():.8f}; it must be a distribution (sum 1)")
    return arr / arr.sum()


def _matching(like: np.ndarray, values: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.shape != like.shape:
        raise ValueError(f"{name} has {arr.size} entries but there are {like.size} domains")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}={arr.tolist()} must be finite")
    return arr
