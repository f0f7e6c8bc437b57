"""Data-mixture update rules as pure functions on plain lists of floats.

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
from drprune.registry import MIXTURE_RULES

log = logging.getLogger(__name__)

SHEARED_ETA = 1.0  # step size of the exponentiated update (Sheared-LLaMA)
SHEARED_SMOOTHING = 1e-4  # mix with uniform so no domain ever reaches 0 (DoReMi)
DYALL_STEP = 0.1  # +DyAll: p0 <- norm((1 - step) p0 + step q)
_BISECTION_STEPS = 200
DISTRIBUTION_TOL = 1e-4  # proportions typed in a YAML file may carry rounding

DRO_CLAMP_MODES = ("reference", "exact")
DRO_FLAGS = ("", "+Eval", "+Dy", "+DyAll", "+Eval+Dy", "+Eval+DyAll")


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
    parsed = UpdateType(rule, use_eval="eval" in flags, dynamic_reference=bool({"dy", "dyall"} & set(flags)),
                        dynamic_ratio="dyall" in flags)
    valid = valid_update_types()
    ok = (len(set(flags)) == len(flags) and set(flags) <= {"eval", "dy", "dyall"}
          and not {"dy", "dyall"} <= set(flags) and parsed.text in valid)
    if not ok:
        raise ConfigError(f"update_type={text!r} is not valid; use one of {', '.join(valid)}")
    return parsed


def valid_update_types() -> list[str]:
    """Every spelling of a registered rule with the flags it takes, e.g. 'dro+Eval+DyAll'."""
    return [name + flag for name in MIXTURE_RULES.names() for flag in MIXTURE_RULES.get(name, key="update_type").flags]


@dataclass(frozen=True)
class RuleInputs:
    """What the data-loading callback knows at an evaluation; each rule reads what it needs."""

    update_type: UpdateType
    p: list[float]  # the current proportions
    p0: list[float]  # the reference ratio (dro)
    p0_init: list[float]  # p0 at the start (+DyAll's box)
    train_losses: list[float | None]  # EMA of per-domain training losses
    eval_losses: list[float] | None
    reference_loss: list[float] | None
    rho: float = 0.1
    min_prob: float = 0.2
    clamp_q_to_min: bool = True
    clamp_mode: str = "reference"
    move_p0: bool = False  # +DyAll and late enough in training


class MixtureRule:
    """An `update_type` rule (registered in MIXTURE_RULES): the next (proportions, p0) from RuleInputs.

    `flags` are the update_type suffixes it accepts; `losses` picks the losses it needs ("eval",
    "train" or None), and without one for every domain the proportions stay unchanged.
    """

    flags: tuple[str, ...] = ("",)

    @staticmethod
    def losses(update_type: UpdateType) -> str | None:
        return None

    @staticmethod
    def step(x: RuleInputs, losses: list[float]) -> tuple[list[float], list[float]]:
        raise NotImplementedError


@MIXTURE_RULES.register("constant")
class ConstantRule(MixtureRule):
    """'constant': the proportions never move (the static-mixture baseline)."""

    @staticmethod
    def step(x: RuleInputs, losses: list[float]) -> tuple[list[float], list[float]]:
        return constant_update(x.p), x.p0


@MIXTURE_RULES.register("sheared")
class ShearedRule(MixtureRule):
    """'sheared': Sheared-LLaMA's exponentiated update on eval losses against the reference losses."""

    @staticmethod
    def losses(update_type: UpdateType) -> str | None:
        return "eval"

    @staticmethod
    def step(x: RuleInputs, losses: list[float]) -> tuple[list[float], list[float]]:
        return sheared_update(x.p, losses, x.reference_loss), x.p0


@MIXTURE_RULES.register("dro")
class DroRule(MixtureRule):
    """'dro': χ²-ball DRO on training (or +Eval: eval) losses; with +DyAll (late enough), p0 also moves toward q."""

    flags = DRO_FLAGS

    @staticmethod
    def losses(update_type: UpdateType) -> str | None:
        return "eval" if update_type.use_eval else "train"

    @staticmethod
    def step(x: RuleInputs, losses: list[float]) -> tuple[list[float], list[float]]:
        q = dro_update(x.p0, losses, x.reference_loss, x.rho, min_prob=x.min_prob,
                       clamp_q_to_min=x.clamp_q_to_min, clamp_mode=x.clamp_mode)
        return q, dyall_ratio_update(x.p0, q, x.p0_init) if x.move_p0 else x.p0


def apply_rule(x: RuleInputs) -> tuple[list[float], list[float]]:
    """The registered rule of `x.update_type` applied to `x`: the next (proportions, p0)."""
    rule = MIXTURE_RULES.get(x.update_type.rule, key="update_type")
    kind = rule.losses(x.update_type)
    if kind is None:
        return rule.step(x, [])
    losses = x.eval_losses if kind == "eval" else x.train_losses
    if losses is None or any(v is None or not math.isfinite(v) for v in losses):
        log.warning("no %s loss for every domain yet; proportions unchanged", "eval" if kind == "eval" else "training")
        return list(x.p), x.p0
    return rule.step(x, losses)


# ------------------------------------------------------------------------------------------ rules
def constant_update(proportion: Sequence[float]) -> list[float]:
    """The 'constant' rule: proportions never move (a copy, so callers may mutate it)."""
    return [float(x) for x in proportion]


def sheared_update(proportion: Sequence[float], losses: Sequence[float],
                   reference_loss: Sequence[float]) -> list[float]:
    """Sheared-LLaMA: p <- softmax(ln p + η(ℓ − ℓ_ref)), η = 1, then p <- (1 − c)p + c/k, c = 1e-4."""
    p = distribution(proportion, "proportion")
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
    ref0 = distribution(p0, "p0")
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
    init = distribution(p0_init, "p0_init")
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


def distribution(values: Sequence[float], name: str) -> np.ndarray:
    """The one check of a mixture: finite, non-negative, summing to 1 within DISTRIBUTION_TOL; renormalised.

    ValueError names `name`; callers that read a config key wrap it with the key's path.
    """
    try:
        arr = np.asarray(list(values), dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}={values!r} is not a list of numbers") from err
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name}={list(values)} must be a non-empty list of finite non-negative numbers")
    if abs(arr.sum() - 1) > DISTRIBUTION_TOL:
        raise ValueError(f"{name}={arr.tolist()} sums to {arr.sum():.6f}; it must sum to 1")
    return arr / arr.sum()


def _matching(like: np.ndarray, values: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.shape != like.shape:
        raise ValueError(f"{name} has {arr.size} entries but there are {like.size} domains")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}={arr.tolist()} must be finite")
    return arr


VALID_UPDATE_TYPES = tuple(valid_update_types())  # the built-in rules' spellings
