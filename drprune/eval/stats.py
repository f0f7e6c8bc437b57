"""Bootstrap confidence intervals for perplexity, so that two models can be ranked.

A perplexity is exp(total loss / total tokens) over eval rows. Rows (sequences), not tokens, are the
resampling unit: tokens inside a row are strongly correlated, so resampling tokens would give intervals
that are far too narrow. Intervals are percentile intervals over `n_boot` resamples; two models whose
intervals overlap are called a tie.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

# Bound the [replicates, rows] index block built at once (~32 MiB of int64 indices).
_MAX_BLOCK = 4_000_000


@dataclass
class Score:
    """A perplexity with its bootstrap interval and what it was measured on."""

    ppl: float
    lo: float
    hi: float
    rows: int
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Score:
        return cls(ppl=float(d["ppl"]), lo=float(d["lo"]), hi=float(d["hi"]), rows=int(d["rows"]),
                   tokens=int(d["tokens"]))


def _check_rows(loss_sums: np.ndarray, tokens: np.ndarray, what: str = "rows") -> tuple[np.ndarray, np.ndarray]:
    loss_sums = np.asarray(loss_sums, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.int64)
    if loss_sums.ndim != 1 or loss_sums.shape != tokens.shape:
        raise ValueError(f"{what}: loss_sums {loss_sums.shape} and tokens {tokens.shape} must be equal 1-D shapes")
    if len(loss_sums) == 0:
        raise ValueError(f"{what}: no rows to evaluate")
    if tokens.sum() <= 0:
        raise ValueError(f"{what}: no scored tokens")
    return loss_sums, tokens


def _check_args(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot} must be >= 1")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} must be in (0, 1)")


def _boot_mean_losses(loss_sums: np.ndarray, tokens: np.ndarray, n_boot: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Mean token loss of `n_boot` row resamples, [n_boot]; NaN where a resample scored no token."""
    n = len(loss_sums)
    block = max(1, _MAX_BLOCK // n)
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, block):
        idx = rng.integers(0, n, size=(min(block, n_boot - start), n))
        loss, count = loss_sums[idx].sum(1), tokens[idx].sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[start:start + len(idx)] = np.where(count > 0, loss / np.maximum(count, 1), np.nan)
    return out


def _interval(mean_losses: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of exp(mean loss); exp is monotone, so percentiles commute with it."""
    alpha = (1.0 - level) / 2.0
    lo, hi = np.nanpercentile(mean_losses, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return float(np.exp(lo)), float(np.exp(hi))


def bootstrap_ppl(loss_sums: np.ndarray, tokens: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                  level: float = 0.95) -> Score:
    """Perplexity of all rows with a percentile interval from resampling rows with replacement.

    `loss_sums[i]` is row i's summed next-token loss (nats), `tokens[i]` how many tokens it scored.
    """
    _check_args(n_boot, level)
    loss_sums, tokens = _check_rows(loss_sums, tokens)
    point = float(np.exp(loss_sums.sum() / tokens.sum()))
    lo, hi = _interval(_boot_mean_losses(loss_sums, tokens, n_boot, np.random.default_rng(seed)), level)
    return Score(ppl=point, lo=lo, hi=hi, rows=len(loss_sums), tokens=int(tokens.sum()))


def bootstrap_geomean(per_domain: Mapping[str, tuple[np.ndarray, np.ndarray]], *, n_boot: int = 1000,
                      seed: int = 0, level: float = 0.95) -> Score:
    """Geometric mean over domains of per-domain perplexity, every domain weighing the same.

    Equals exp(mean over domains of each domain's mean token loss), so a large domain cannot drown a
    small one. Each bootstrap replicate resamples rows independently inside every domain (domains are
    fixed strata, not resampled).
    """
    _check_args(n_boot, level)
    if not per_domain:
        raise ValueError("bootstrap_geomean needs at least one domain")
    rng = np.random.default_rng(seed)
    points, boots, rows, tokens = [], [], 0, 0
    for name in sorted(per_domain):  # sorted: the same seed gives the same draws whatever the dict order
        loss_sums, counts = _check_rows(*per_domain[name], what=f"domain {name!r}")
        points.append(loss_sums.sum() / counts.sum())
        boots.append(_boot_mean_losses(loss_sums, counts, n_boot, rng))
        rows += len(loss_sums)
        tokens += int(counts.sum())
    lo, hi = _interval(np.mean(boots, axis=0), level)
    return Score(ppl=float(np.exp(np.mean(points))), lo=lo, hi=hi, rows=rows, tokens=tokens)


@dataclass
class Ratio:
    """Ratio of two models' perplexities on the same rows, with a paired percentile interval."""

    ratio: float
    lo: float
    hi: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def paired_geomean_ratio(a: Mapping[str, tuple[np.ndarray, np.ndarray]],
                         b: Mapping[str, tuple[np.ndarray, np.ndarray]], *, n_boot: int = 1000, seed: int = 0,
                         level: float = 0.95) -> Ratio:
    """Geometric-mean perplexity of model a over that of model b, both scored on the same eval rows.

    Each replicate draws one set of row indices per domain and scores both models on it, so the
    row-to-row variation both share cancels: a difference far smaller than either model's own
    interval can still be resolved (independent intervals only say when two models are far apart).
    """
    _check_args(n_boot, level)
    if set(a) != set(b) or not a:
        raise ValueError(f"paired comparison needs the same domains, got {sorted(a)} and {sorted(b)}")
    rng = np.random.default_rng(seed)
    points, boots = [], []
    for name in sorted(a):
        la, ta = _check_rows(*a[name], what=f"domain {name!r}")
        lb, tb = _check_rows(*b[name], what=f"domain {name!r}")
        if len(la) != len(lb) or not np.array_equal(ta, tb):
            raise ValueError(f"domain {name!r}: the two models were not scored on the same rows")
        points.append(la.sum() / ta.sum() - lb.sum() / tb.sum())
        n, diff = len(la), np.empty(n_boot)
        block = max(1, _MAX_BLOCK // n)
        for start in range(0, n_boot, block):
            idx = rng.integers(0, n, size=(min(block, n_boot - start), n))
            count = np.maximum(ta[idx].sum(1), 1)
            diff[start:start + len(idx)] = (la[idx].sum(1) - lb[idx].sum(1)) / count
        boots.append(diff)
    lo, hi = _interval(np.mean(boots, axis=0), level)
    return Ratio(ratio=float(np.exp(np.mean(points))), lo=lo, hi=hi)


def intervals_overlap(a: Score, b: Score) -> bool:
    """True when the two intervals share a point: the models are tied at this level."""
    return a.lo <= b.hi and b.lo <= a.hi
