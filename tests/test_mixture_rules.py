"""The mixture rules on crafted losses: closed forms, the χ² ball, floors, clamps, rescaling, parsing."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from drprune.errors import ConfigError
from drprune.mixture import (
    VALID_UPDATE_TYPES,
    chi2_divergence,
    constant_update,
    dro_update,
    dyall_ratio_update,
    ema_update,
    parse_update_type,
    sheared_update,
)
from drprune.mixture.rules import excess_loss

exact_dro = functools.partial(dro_update, clamp_mode="exact")


# ------------------------------------------------------------------------------ update_type
def test_parse_update_type_flags_and_canonical_text() -> None:
    assert [parse_update_type(t).text for t in VALID_UPDATE_TYPES] == list(VALID_UPDATE_TYPES)
    t = parse_update_type("DRO+dyall+eval")
    assert (t.rule, t.use_eval, t.dynamic_reference, t.dynamic_ratio) == ("dro", True, True, True)
    assert t.text == "dro+Eval+DyAll"
    t = parse_update_type("dro+Dy")
    assert (t.use_eval, t.dynamic_reference, t.dynamic_ratio) == (False, True, False)
    assert parse_update_type("sheared") == parse_update_type(" Sheared ")


@pytest.mark.parametrize("bad", ["drop", "sheared+Eval", "dro+Dy+DyAll", "dro+Eval+Eval", "dro+", "constant+Dy", ""])
def test_parse_update_type_rejects_and_lists_valid(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_update_type(bad)
    assert all(v in str(err.value) for v in VALID_UPDATE_TYPES)


# ------------------------------------------------------------------------------ constant / sheared
def test_constant_returns_a_copy() -> None:
    p = [0.2, 0.8]
    out = constant_update(p)
    assert out == p and out is not p


def test_sheared_matches_closed_form() -> None:
    # Δ = (ln 3, 0) on p = (½, ½): softmax gives (¾, ¼), then (1 − 1e-4)·p + 1e-4/2.
    out = sheared_update([0.5, 0.5], [2.0 + math.log(3), 2.0], [2.0, 2.0])
    assert out == pytest.approx([0.75 * (1 - 1e-4) + 0.5e-4, 0.25 * (1 - 1e-4) + 0.5e-4], abs=1e-12)
    p, delta = np.array([0.5, 0.3, 0.2]), np.array([0.2, -0.1, 0.5])
    w = p * np.exp(delta)
    expected = (1 - 1e-4) * w / w.sum() + 1e-4 / 3
    out = sheared_update(p.tolist(), (3 + delta).tolist(), [3.0] * 3)
    assert out == pytest.approx(expected.tolist(), abs=1e-12)
    assert sum(out) == pytest.approx(1, abs=1e-12) and int(np.argmax(np.array(out) / p)) == 2


def test_sheared_revives_a_zero_domain_through_smoothing() -> None:
    out = sheared_update([1.0, 0.0], [2.0, 9.0], [2.0, 2.0])
    assert out == pytest.approx([1 - 0.5e-4, 0.5e-4], abs=1e-12)


# ------------------------------------------------------------------------------ dro, clamp_mode='exact'
def test_dro_two_domains_closed_form() -> None:
    # p0 = (½, ½), q = (½(1+t), ½(1−t)): χ² = t²/2, so rho = 0.02 gives t = 0.2 exactly.
    q = exact_dro([0.5, 0.5], [3.0, 2.5], [2.0, 2.0], rho=0.02, min_prob=0.0, clamp_q_to_min=False)
    assert q == pytest.approx([0.6, 0.4], abs=1e-9)


def test_dro_binding_ball_and_floors_hold_together() -> None:
    # Domains 2, 3 sit at their floor 0.2·0.25; then q0 + q1 = 0.9 and ½(4Σq² − 1) = 0.5 give
    # q0, q1 = 0.45 ± √0.18 / 2.
    p0 = [0.25] * 4
    q = exact_dro(p0, [3.0, 2.5, 2.0, 2.0], [2.0] * 4, rho=0.5, min_prob=0.2, clamp_q_to_min=False)
    half = math.sqrt(0.18) / 2
    assert q == pytest.approx([0.45 + half, 0.45 - half, 0.05, 0.05], abs=1e-9)
    assert chi2_divergence(q, p0) == pytest.approx(0.5, abs=1e-9)
    # A smaller ball: no floor binds, the order of q follows the order of Δ.
    q = exact_dro(p0, [3.0, 2.5, 2.0, 2.0], [2.0] * 4, rho=0.1, min_prob=0.2, clamp_q_to_min=False)
    assert chi2_divergence(q, p0) == pytest.approx(0.1, abs=1e-9) and sum(q) == pytest.approx(1, abs=1e-12)
    assert q[0] > q[1] > q[2] > 0.05 and q[2] == pytest.approx(q[3], abs=1e-12)


def test_dro_extreme_inside_the_ball_is_taken() -> None:
    # Only domain 0 is above the others; rho is huge: every other domain sits at min_prob·p0.
    q = exact_dro([0.25] * 4, [3.0, 2.0, 2.0, 2.0], [2.0] * 4, rho=10.0, min_prob=0.2, clamp_q_to_min=False)
    assert q == pytest.approx([0.85, 0.05, 0.05, 0.05], abs=1e-12)
    assert chi2_divergence(q, [0.25] * 4) < 10


def test_dro_clamp_to_min_p0_is_the_anchors_soft_clamp() -> None:
    # unclamped extreme with min_prob 0.2: (0.92, 0.06, 0.02) -> clamp at 0.1 -> (0.92, 0.1, 0.1) / 1.12
    p0 = [0.6, 0.3, 0.1]
    expected = [0.92 / 1.12, 0.1 / 1.12, 0.1 / 1.12]
    assert exact_dro(p0, [4.0, 2.0, 2.0], [2.0] * 3, rho=1.0) == pytest.approx(expected, abs=1e-12)
    q = exact_dro(p0, [2.0, 2.0, 4.0], [2.0] * 3, rho=0.05)
    assert chi2_divergence(q, p0) == pytest.approx(0.05, abs=1e-6)
    assert q[2] > 0.1 and q[0] < 0.6


def test_dro_uniform_p0_with_clamp_still_moves() -> None:
    """A hard floor at min(p0) would pin a uniform p0; the soft clamp lets the worst domain gain."""
    q = exact_dro([0.25] * 4, [3.0, 2.0, 2.0, 2.0], [2.0] * 4, rho=0.01)
    assert q[0] > 0.25 and sum(q) == pytest.approx(1.0)
    assert chi2_divergence(q, [0.25] * 4) == pytest.approx(0.01, abs=1e-6)
    # most extreme: (0.85, 0.05, 0.05, 0.05) clamped to 0.25 and renormalised
    q = exact_dro([0.25] * 4, [3.0, 2.0, 2.0, 2.0], [2.0] * 4, rho=10.0)
    assert q == pytest.approx([0.85 / 1.6, 0.25 / 1.6, 0.25 / 1.6, 0.25 / 1.6], abs=1e-12)


def test_dro_all_negative_excess_rescales_reference() -> None:
    # Raw Δ = (−0.5, −0.4) favours domain 1; ref·0.7 gives Δ = (0.25, 0.02), which favours domain 0.
    assert excess_loss(np.array([2.0, 1.0]), np.array([2.5, 1.4])) == pytest.approx([0.25, 0.02], abs=1e-12)
    q = exact_dro([0.5, 0.5], [2.0, 1.0], [2.5, 1.4], rho=0.02, min_prob=0.0, clamp_q_to_min=False)
    assert q == pytest.approx([0.6, 0.4], abs=1e-9)
    # A positive excess anywhere leaves the reference alone.
    assert excess_loss(np.array([2.0, 1.0]), np.array([1.5, 1.4])) == pytest.approx([0.5, -0.4], abs=1e-12)


@pytest.mark.parametrize("p0, losses, rho", [
    ([0.3, 0.7], [2.0, 3.0], 0.0),  # rho = 0: the ball is the point p0
    ([0.3, 0.7], [2.5, 2.5], 0.5),  # all Δ equal: no domain is worse
    ([1.0], [5.0], 0.5),  # one domain
])
def test_dro_edge_cases_return_p0(p0: list[float], losses: list[float], rho: float) -> None:
    assert exact_dro(p0, losses, [2.0] * len(p0), rho, min_prob=0.0, clamp_q_to_min=False) == pytest.approx(p0)


def test_dro_zero_weight_domain_stays_zero() -> None:
    q = exact_dro([0.5, 0.0, 0.5], [3.0, 9.0, 2.0], [2.0] * 3, rho=0.02, min_prob=0.0, clamp_q_to_min=False)
    assert q == pytest.approx([0.6, 0.0, 0.4], abs=1e-9)


def test_dro_random_instances_keep_every_promise() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        k = int(rng.integers(2, 7))
        p0 = rng.dirichlet(np.ones(k))
        losses, ref = rng.uniform(2, 3, k), rng.uniform(1.5, 2.0, k)  # every Δ > 0: no rescale
        rho, min_prob, clamp = float(rng.choice([0.01, 0.1, 0.5])), float(rng.choice([0.0, 0.2])), bool(rng.integers(2))
        q = np.array(exact_dro(p0.tolist(), losses.tolist(), ref.tolist(), rho, min_prob, clamp))
        div = chi2_divergence(q, p0)
        assert q.sum() == pytest.approx(1, abs=1e-12)
        if clamp:  # soft clamp: nothing below min(p0) / (renormaliser <= 2)
            assert np.all(q >= p0.min() / 2 - 1e-12)
        else:
            floor = min_prob * p0
            assert np.all(q >= floor - 1e-12)
        assert div <= rho + 1e-9
        if div < rho - 1e-3 and not clamp:  # not binding: the extreme, every domain but the worst at its floor
            others = np.argsort(losses - ref)[:-1]
            assert q[others] == pytest.approx(floor[others], abs=1e-12)
        assert (q / p0)[np.argmax(losses - ref)] == pytest.approx(np.max(q / p0), abs=1e-12)  # worst gains most


# ------------------------------------------------------------------------------ dro, clamp_mode='reference'
def _reference_procedure(p0: list[float], losses: list[float], ref: list[float], rho: float, min_prob: float = 0.2,
                         clamp_q_to_min: bool = True) -> np.ndarray:
    """DRPruning's update written out independently: bisection on the unclamped candidate, then clamp."""
    p0_, delta = np.array(p0), np.array(losses) - np.array(ref)

    def candidate(eta: float) -> np.ndarray:
        q = p0_ * np.maximum(delta - eta, 0)
        q = np.maximum(q / q.sum(), min_prob * p0_)
        return q / q.sum()

    def gap(eta: float) -> float:
        return 0.5 * float((p0_ * (candidate(eta) / p0_ - 1) ** 2).sum()) - rho

    lo, hi = -(1 / (math.sqrt(2 * rho + 1) - 1)) * delta.max(), delta.max() - 1e-12
    while gap(lo) > 0:
        lo -= 2 * (hi - lo)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gap(mid) < 0 else (lo, mid)
    q = candidate(lo)
    if clamp_q_to_min:
        q = np.maximum(q, p0_.min())
    return q / q.sum()


def test_dro_reference_and_exact_on_a_uniform_p0() -> None:
    """The issue's case: 5 uniform domains, one 1 nat worse, rho 0.1; the reference's clamp after the
    bisection moves less (and leaves q inside the ball) than the exact solution on the ball."""
    args = ([0.2] * 5, [3.0, 2.0, 2.0, 2.0, 2.0], [2.0] * 5, 0.1)
    ref_q, exact_q = dro_update(*args), dro_update(*args, clamp_mode="exact")
    assert ref_q[0] == pytest.approx(0.3214, abs=1e-3) and exact_q[0] == pytest.approx(0.3789, abs=1e-3)
    assert ref_q == pytest.approx(_reference_procedure(*args).tolist(), abs=1e-6)
    assert chi2_divergence(ref_q, args[0]) < 0.1 - 0.01
    assert chi2_divergence(exact_q, args[0]) == pytest.approx(0.1, abs=1e-6)
    assert dro_update(*args) == dro_update(*args, clamp_mode="reference")  # reference is the default


def test_dro_reference_matches_the_procedure_on_random_cases() -> None:
    rng = np.random.default_rng(1)
    for _ in range(30):
        k = int(rng.integers(2, 7))
        p0 = rng.dirichlet(np.ones(k)).tolist()
        losses, ref = rng.uniform(2, 3, k).tolist(), rng.uniform(1.5, 2.0, k).tolist()
        rho, min_prob, clamp = float(rng.choice([0.01, 0.1, 0.5])), float(rng.choice([0.0, 0.2])), bool(rng.integers(2))
        expected = _reference_procedure(p0, losses, ref, rho, min_prob, clamp)
        if chi2_divergence(expected, p0) > rho + 1e-6 or not clamp and 0.5 * np.sum(
                (expected / np.array(p0) - 1) ** 2 * np.array(p0)) < rho - 1e-3:
            continue  # the extreme lies inside the ball: the written-out bisection has no root to find
        got = dro_update(p0, losses, ref, rho, min_prob=min_prob, clamp_q_to_min=clamp)
        assert got == pytest.approx(expected.tolist(), abs=1e-6)
        assert chi2_divergence(got, p0) <= rho + 1e-9  # clamping only pulls q back toward p0


@pytest.mark.parametrize("kwargs, name", [
    (dict(p0=[0.5, 0.5], losses=[1.0, 1.0], reference_loss=[1.0, 1.0], rho=0.1, clamp_mode="ball"), "clamp_mode"),
    (dict(p0=[0.5, 0.5], losses=[1.0], reference_loss=[1.0, 1.0], rho=0.1), "losses"),
    (dict(p0=[0.5, 0.6], losses=[1.0, 1.0], reference_loss=[1.0, 1.0], rho=0.1), "p0"),
    (dict(p0=[0.5, 0.5], losses=[1.0, 1.0], reference_loss=[1.0], rho=0.1), "reference_loss"),
    (dict(p0=[0.5, 0.5], losses=[1.0, 1.0], reference_loss=[1.0, 1.0], rho=-0.1), "rho"),
    (dict(p0=[0.5, 0.5], losses=[1.0, 1.0], reference_loss=[1.0, 1.0], rho=0.1, min_prob=1.0), "min_prob"),
    (dict(p0=[0.5, 0.5], losses=[1.0, float("nan")], reference_loss=[1.0, 1.0], rho=0.1), "losses"),
])
def test_dro_validates_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        dro_update(**kwargs)


# ------------------------------------------------------------------------------ helpers
def test_dyall_moves_p0_toward_q_within_the_reference_box() -> None:
    # 0.9·(0.5, 0.3, 0.2) + 0.1·(0.2, 0.3, 0.5) = (0.47, 0.3, 0.23): inside [min, max] of p0_init and its ½x-2x box
    init = [0.5, 0.3, 0.2]
    assert dyall_ratio_update(init, [0.2, 0.3, 0.5], init) == pytest.approx([0.47, 0.3, 0.23], abs=1e-12)
    # A uniform p0_init gives the box [0.5, 0.5]: as in DRPruning, p0 never moves.
    assert dyall_ratio_update([0.5, 0.5], [0.7, 0.3], [0.5, 0.5]) == pytest.approx([0.5, 0.5], abs=1e-12)
    # 0.9·(0.82, 0.18) + 0.1·(0, 1) = (0.738, 0.262); domain 1 is capped at min(2·0.1, 0.9), domain 0 takes the rest.
    assert dyall_ratio_update([0.82, 0.18], [0.0, 1.0], [0.9, 0.1]) == pytest.approx([0.8, 0.2], abs=1e-12)
    # Lower bound max(p0_init/2, min p0_init) = 0.4 for both: (0.27, 0.73) -> (0.4, 0.6).
    out = dyall_ratio_update([0.3, 0.7], [0.0, 1.0], [0.6, 0.4])
    assert out == pytest.approx([0.4, 0.6], abs=1e-12)


def test_ema_update() -> None:
    assert ema_update([None, 1.0], [2.0, 3.0], 0.1) == pytest.approx([2.0, 1.2])
    assert ema_update(None, [2.0], 0.5) == [2.0]
    with pytest.raises(ValueError, match="alpha"):
        ema_update([1.0], [1.0], 1.5)
