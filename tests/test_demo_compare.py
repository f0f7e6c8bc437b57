"""Verdicts of the equal-budget comparison: ties when intervals overlap, targets read from numbers."""
from __future__ import annotations

import math

from drprune.demo.compare import gain, head_to_head, overlap, target_checks, verdict


def _s(ppl: float, half: float) -> dict:
    return {"ppl": ppl, "lo": ppl - half, "hi": ppl + half, "rows": 64, "tokens": 8128}


def _eval(ppl: float, half: float, held: dict[str, float], copy: float) -> dict:
    return {"in_domain": {"domains": {"a": _s(ppl, half), "b": _s(ppl, half)}, "geomean": _s(ppl, half)},
            "held_out": {"domains": {d: _s(v, half) for d, v in held.items()},
                         "geomean": _s(math.exp(sum(math.log(v) for v in held.values()) / len(held)), half)},
            "copy": _s(copy, 0.1)}


def test_overlap_and_verdict():
    assert overlap(_s(10, 1), _s(11.5, 1)) and verdict(_s(10, 1), _s(11.5, 1)) == "tie"
    assert not overlap(_s(10, 1), _s(13, 1))
    assert verdict(_s(10, 1), _s(13, 1)) == "better" and verdict(_s(13, 1), _s(10, 1)) == "worse"
    assert math.isclose(gain(_s(90, 1), _s(100, 1)), 0.1)


def test_head_to_head_calls_overlap_a_tie_and_names_worse_domains():
    evals = {"l": _eval(80, 2, {"x": 50, "y": 70}, 2.0), "b": _eval(90, 2, {"x": 40, "y": 70}, 2.0)}
    text = "\n".join(head_to_head(evals, "l", "b", names=("l", "b")))
    assert "in-domain geometric mean" in text and "**l better** by 11.1%" in text
    assert "worse: x" in text
    assert "copying probe" in text and "**tie**" in text


def test_target_checks_report_met_and_unmet_from_numbers():
    evals = {"source": _eval(30, 1, {"x": 20, "y": 25}, 1.5),
             "learned": _eval(50, 1, {"x": 45, "y": 110}, 2.0),
             "base": _eval(60, 1, {"x": 40, "y": 120}, 2.0)}
    met = {r["target"]: r["met"] for r in target_checks(evals, "learned", "base", "source", 9.0, 4.5)}
    assert len(met) == 10
    by_start = {t.split(" ")[0] + " " + t.split(" ")[1]: v for t, v in met.items()}
    assert by_start["learned beats"] is True            # 1 - 50/60 = 16.7%, intervals separated
    assert by_start["learned not"] is False             # x: 45 vs 40 outside the intervals
    assert by_start["in-domain geo-mean"] is True       # 50/30 = 1.67x
    assert by_start["no held-out"] is False             # y: 110/25 = 4.4x
    assert by_start["demo <="] is True and by_start["peak memory"] is False
    copy = next(r for r in target_checks(evals, "learned", "base", "source", None, None)
                if r["target"].startswith("copying"))
    assert copy["met"] is True                          # ln 2 / ln 1.5 = 1.7x
    assert by_start["copying-probe perplexity"] is True  # 2.0 / 1.5 = 1.33x
    assert by_start["learned copies"] is False          # 2.0 vs 2.0: a tie
    evals["learned"]["copy"] = _s(3.5, 0.1)              # 3.5 / 1.5 = 2.3x, and worse than the baseline's 2.0
    rows = {r["target"].split(" <=")[0]: r for r in target_checks(evals, "learned", "base", "source", None, None)}
    assert rows["copying-probe perplexity"]["met"] is False and "(2.3x)" in rows["copying-probe perplexity"]["measured"]
    evals["base"]["copy"] = _s(9.0, 0.5)
    better = next(r for r in target_checks(evals, "learned", "base", "source", None, None)
                  if r["target"].startswith("learned copies"))
    assert better["met"] is True and better["measured"] == "3.5 vs 9 (better)"


def test_head_to_head_adds_a_paired_ratio_when_rows_are_kept():
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.gamma(4.0, 1.0, size=64) * 100

    def ev(shift: float) -> dict:
        e = _eval(80 + shift, 5, {"x": 50}, 2.0)
        e["in_domain"]["rows"] = {d: {"loss_sums": (base + shift * 100).tolist(), "tokens": [100] * 64}
                                  for d in ("a", "b")}
        return e

    text = "\n".join(head_to_head({"l": ev(0.0), "b": ev(0.05)}, "l", "b", names=("l", "b")))
    assert "paired on the same eval rows: l/b perplexity ratio 0.951" in text and "l better" in text
