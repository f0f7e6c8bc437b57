"""The +Dy scaling law: the fit recovers known parameters from noisy points; the fitter's references."""
from __future__ import annotations

import logging
from concurrent.futures import Future

import numpy as np
import pytest

from drprune.mixture import ReferenceLossFitter, fit_scaling_law

A, ALPHA, BETA, E = 50.0, 0.3, -0.4, 1.8  # DRPruning's form: the loss rises with s when β < 0


def law(tokens: np.ndarray, sparsity: np.ndarray) -> np.ndarray:
    return A * tokens ** -ALPHA * sparsity ** -BETA + E


def points(n: int, seed: int, max_sparsity: float = 0.7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = np.exp(rng.uniform(np.log(1e6), np.log(1e9), n))
    sparsity = rng.uniform(0.05, max_sparsity, n)
    return tokens, sparsity, law(tokens, sparsity) + rng.normal(0, 0.003, n)


def test_fit_recovers_known_parameters_despite_an_outlier() -> None:
    tokens, sparsity, losses = points(40, seed=0)
    losses[5] += 0.5  # one broken eval: the robust loss must shrug it off
    fit = fit_scaling_law(tokens, sparsity, losses)
    assert fit is not None and fit.n_points == 40
    assert fit.alpha == pytest.approx(ALPHA, abs=0.02)
    assert fit.beta == pytest.approx(BETA, abs=0.03)
    assert fit.E == pytest.approx(E, abs=0.02)
    assert fit.predict(1e10, 0.5) == pytest.approx(float(law(np.array(1e10), np.array(0.5))), abs=0.01)


def test_fit_without_pruning_drops_the_sparsity_term() -> None:
    tokens, _, _ = points(30, seed=1)
    losses = A * tokens ** -ALPHA + E + np.random.default_rng(2).normal(0, 0.003, 30)
    fit = fit_scaling_law(tokens, np.zeros(30), losses)
    assert fit is not None and fit.beta is None
    assert fit.alpha == pytest.approx(ALPHA, abs=0.03) and fit.E == pytest.approx(E, abs=0.03)
    assert fit.predict(np.array([1e9, 1e10]), 0.0) == pytest.approx(A * np.array([1e9, 1e10]) ** -ALPHA + E, abs=0.01)


def test_fit_needs_enough_points_and_valid_input() -> None:
    tokens, sparsity, losses = points(4, seed=3)
    assert fit_scaling_law(tokens, sparsity, losses) is None  # 4 parameters need 5 points
    with pytest.raises(ValueError, match="sparsity"):
        fit_scaling_law([1e6, 2e6], [0.0, 1.0], [3.0, 2.9])
    with pytest.raises(ValueError, match="lengths"):
        fit_scaling_law([1e6, 2e6], [0.0], [3.0, 2.9])


def _feed(fitter: ReferenceLossFitter, name: str, n: int, seed: int) -> np.ndarray:
    tokens, sparsity, losses = points(n, seed, max_sparsity=0.5)
    order = np.argsort(tokens)
    for i in order:
        fitter.observe(name, float(tokens[i]), float(sparsity[i]), float(losses[i]))
    return losses


def test_fitter_predicts_at_final_tokens_and_target_sparsity(caplog: pytest.LogCaptureFixture) -> None:
    fitter = ReferenceLossFitter(["web", "code"])
    try:
        _feed(fitter, "web", 20, seed=4)
        _feed(fitter, "code", 10, seed=5)  # 10 points: the reference waits for more than 10
        with caplog.at_level(logging.INFO, logger="drprune.mixture.scaling_law"):
            new = fitter.refit([9.0, 9.0], final_tokens=[1e10, 1e10], target_sparsity=0.3)
        assert new[0] == pytest.approx(float(law(np.array(1e10), np.array(0.3))), abs=0.01)
        assert new[0] < min(p[2] for p in fitter.observations["web"]) - 0.01  # a real prediction, not the cap
        assert new[1] == 9.0 and "reference loss of code unchanged (9.0000): 10 points, the fit needs 11" in caplog.text
    finally:
        fitter.close()


def test_synthetic_run_reference_follows_the_law_and_never_rises() -> None:
    """A pruning run whose losses follow the law exactly while sparsity ramps to the target: every refit
    predicts the law at (final tokens, target sparsity), capped at the lowest loss seen, and the
    reference never rises from one refit to the next."""
    final_tokens, target = 4e8, 0.5
    fitter = ReferenceLossFitter(["web"])
    refs, current = [], 5.0
    try:
        for step in range(1, 41):
            frac = step / 40
            tokens, sparsity = final_tokens * frac, 0.05 + 0.45 * min(1.0, 2 * frac)  # warm-up to the target
            fitter.observe("web", tokens, sparsity, float(law(np.array(tokens), np.array(sparsity))))
            if step in (5, 10) or step % 6 == 5:  # an evaluation every few steps: 5, 10, 11, 17, ..., 35
                current = fitter.refit([current], [final_tokens], target)[0]
                refs.append(current)
        expected = float(law(np.array(final_tokens), np.array(target)))
        assert refs[-1] == pytest.approx(expected, abs=1e-3)
        assert refs[:2] == [5.0, 5.0]  # 5 and 10 points: the fit waits for more than 10
        fitted = refs[2:]
        assert all(b <= a + 1e-12 for a, b in zip(fitted, fitted[1:]))
        assert fitted[0] == pytest.approx(expected, abs=1e-3)
        # A refit whose prediction is higher (a sparser target) leaves the reference where it was.
        assert float(law(np.array(final_tokens), np.array(0.9))) > current + 0.02
        assert fitter.refit([current], [final_tokens], 0.9) == [current]
    finally:
        fitter.close()


def test_fitter_never_exceeds_the_lowest_observed_loss() -> None:
    # Predicting at a sparsity far beyond the observed ones gives a loss above all observations.
    fitter = ReferenceLossFitter(["web"])
    try:
        losses = _feed(fitter, "web", 20, seed=6)
        assert fitter.refit([9.0], [1e6], 0.95) == [pytest.approx(float(losses.min()), abs=0)]
    finally:
        fitter.close()


def test_fitter_is_deterministic_and_resumes_from_state_dict() -> None:
    first, second = ReferenceLossFitter(["web"]), ReferenceLossFitter(["web"])
    try:
        _feed(first, "web", 12, seed=7)
        future = first.refit_async([5.0], [1e9], 0.3)
        assert isinstance(future, Future)
        result = future.result()
        second.load_state_dict(first.state_dict())
        assert second.observations == first.observations and second.fitted == {"web": True}
        assert second.refit([5.0], [1e9], 0.3) == result == first.refit([5.0], [1e9], 0.3)
        with pytest.raises(ValueError, match="domains"):
            ReferenceLossFitter(["code"]).load_state_dict(first.state_dict())
    finally:
        first.close()
        second.close()
