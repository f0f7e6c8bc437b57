"""Bootstrap intervals cover the truth as often as they claim; row losses and the copy probe match hand math."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from drprune.errors import UserError
from drprune.eval.copying import copy_probe, copy_rows, token_pool_of
from drprune.eval.perplexity import perplexity, row_losses
from drprune.eval.stats import Score, bootstrap_geomean, bootstrap_ppl, intervals_overlap
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder

VOCAB = 97


def tiny_decoder(context_length: int = 64) -> PrunableDecoder:
    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      intermediate_size=48, context_length=context_length)
    decoder = PrunableDecoder(cfg).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            p.normal_(0, 0.3)  # far from uniform logits, so a wrong position shows in the loss
    return decoder


def synthetic_rows(rng: np.random.Generator, n: int, mean_loss: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 8..32 tokens, skewed (gamma) per-token losses with mean `mean_loss`: true ppl = exp(mean_loss)."""
    tokens = rng.integers(8, 33, size=n)
    shape = 2.0  # the sum of t iid Gamma(2, s) tokens is Gamma(2t, s)
    loss_sums = rng.gamma(shape * tokens, mean_loss / shape)
    return loss_sums, tokens


def test_bootstrap_interval_covers_the_true_perplexity():
    rng = np.random.default_rng(123)
    true_loss = 2.5
    covered = 0
    trials = 200
    for i in range(trials):
        score = bootstrap_ppl(*synthetic_rows(rng, 80, true_loss), n_boot=1000, seed=i)
        assert score.lo <= score.ppl <= score.hi
        covered += score.lo <= math.exp(true_loss) <= score.hi
    assert 0.88 * trials <= covered <= 0.99 * trials, covered


def test_bootstrap_point_estimate_deterministic_and_fast():
    rng = np.random.default_rng(0)
    loss_sums, tokens = synthetic_rows(rng, 400, 3.0)
    start = time.perf_counter()
    a = bootstrap_ppl(loss_sums, tokens, n_boot=1000, seed=7)
    assert time.perf_counter() - start < 0.5
    assert a == bootstrap_ppl(loss_sums, tokens, n_boot=1000, seed=7)
    assert math.isclose(a.ppl, math.exp(loss_sums.sum() / tokens.sum()))
    assert (a.rows, a.tokens) == (400, int(tokens.sum()))
    assert Score.from_dict(a.to_dict()) == a
    wider = bootstrap_ppl(loss_sums, tokens, n_boot=1000, seed=7, level=0.99)
    assert wider.lo < a.lo and wider.hi > a.hi
    with pytest.raises(ValueError):
        bootstrap_ppl(loss_sums, tokens[:-1])
    with pytest.raises(ValueError):
        bootstrap_ppl(loss_sums, tokens, n_boot=0)


def test_geomean_weighs_domains_equally():
    rng = np.random.default_rng(1)
    per_domain = {"big": synthetic_rows(rng, 300, 2.0), "small": synthetic_rows(rng, 20, 4.0),
                  "mid": synthetic_rows(rng, 70, 3.0)}
    g = bootstrap_geomean(per_domain, n_boot=1000, seed=3)
    log_ppls = [math.log(bootstrap_ppl(*rows, n_boot=1).ppl) for rows in per_domain.values()]
    assert math.isclose(g.ppl, math.exp(np.mean(log_ppls)), rel_tol=1e-12)
    assert g.lo < g.ppl < g.hi
    assert g.rows == 390 and g.tokens == sum(int(t.sum()) for _, t in per_domain.values())
    # Order of the dict does not change the draws.
    assert g == bootstrap_geomean(dict(reversed(per_domain.items())), n_boot=1000, seed=3)
    # One domain: the geomean is that domain's perplexity.
    one = bootstrap_geomean({"big": per_domain["big"]}, n_boot=1000, seed=3)
    assert math.isclose(one.ppl, bootstrap_ppl(*per_domain["big"]).ppl)


def test_intervals_overlap():
    a = Score(ppl=10.0, lo=9.0, hi=11.0, rows=64, tokens=1000)
    assert intervals_overlap(a, Score(10.5, 10.9, 12.0, 64, 1000))
    assert intervals_overlap(a, Score(10.2, 9.5, 10.5, 64, 1000))  # nested
    assert intervals_overlap(a, Score(11.5, 11.0, 12.0, 64, 1000))  # touching
    assert not intervals_overlap(a, Score(12.0, 11.1, 13.0, 64, 1000))
    assert not intervals_overlap(Score(8.0, 7.0, 8.9, 64, 1000), a)


def test_copy_rows():
    pool = np.array([3, 5, 8, 13, 21])
    ids, mask = copy_rows(pool, rows=7, span=10, seed=4)
    assert ids.shape == mask.shape == (7, 20) and ids.dtype == np.int64 and mask.dtype == bool
    assert (ids[:, :10] == ids[:, 10:]).all()
    assert np.isin(ids, pool).all()
    assert (mask.nonzero()[1].reshape(7, -1) == np.arange(11, 20)).all()
    again, _ = copy_rows(pool, rows=7, span=10, seed=4)
    assert (again == ids).all()
    assert not (copy_rows(pool, rows=7, span=10, seed=5)[0] == ids).all()
    assert (token_pool_of(np.array([[5, 3, 3], [9, 5, 3]])) == [3, 5, 9]).all()
    assert (token_pool_of(np.array([[5, 3, 3], [9, 5, 3]]), min_count=2) == [3, 5]).all()
    with pytest.raises(UserError):
        copy_rows(pool, span=1)


def test_row_losses_with_loss_mask_match_cross_entropy():
    decoder = tiny_decoder()
    rng = np.random.default_rng(0)
    rows = rng.integers(0, VOCAB, size=(5, 12))
    loss_mask = rng.random((5, 12)) < 0.5
    loss_mask[:, 0] = True  # position 0 must never count
    loss_mask[3] = False  # a row with no scored token
    loss_sums, counts = row_losses(decoder, rows, batch_size=2, loss_mask=loss_mask)
    assert loss_sums.dtype == np.float64 and counts.dtype == np.int64
    ids = torch.from_numpy(rows)
    with torch.no_grad():
        logits = decoder(ids)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none").view(5, 11)
    keep = torch.from_numpy(loss_mask[:, 1:])
    np.testing.assert_allclose(loss_sums, (ce * keep).sum(1).double().numpy(), rtol=1e-5)
    np.testing.assert_array_equal(counts, keep.sum(1).numpy())
    assert counts[3] == 0 and loss_sums[3] == 0.0
    # Without a mask every target counts, and perplexity() agrees.
    full, n = row_losses(decoder, rows, batch_size=3)
    np.testing.assert_allclose(full, ce.sum(1).double().numpy(), rtol=1e-5)
    assert (n == 11).all()
    assert math.isclose(perplexity(decoder, rows, batch_size=4), math.exp(ce.mean().item()), rel_tol=1e-5)


def test_copy_probe_matches_masked_loss():
    decoder = tiny_decoder()
    pool = np.arange(10, 60)
    score = copy_probe(decoder, pool, rows=6, span=8, seed=2, batch_size=4, n_boot=200)
    ids, mask = copy_rows(pool, rows=6, span=8, seed=2)
    t = torch.from_numpy(ids)
    with torch.no_grad():
        logits = decoder(t)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), t[:, 1:].reshape(-1), reduction="none")
    expected = math.exp(ce[torch.from_numpy(mask[:, 1:]).reshape(-1)].mean().item())
    assert math.isclose(score.ppl, expected, rel_tol=1e-5)
    assert (score.rows, score.tokens) == (6, 6 * 7)
    assert score.lo <= score.ppl <= score.hi


def test_copy_probe_rejects_bad_inputs():
    decoder = tiny_decoder(context_length=16)
    with pytest.raises(UserError, match="context length 16"):
        copy_probe(decoder, np.arange(10), span=9)
    with pytest.raises(UserError, match="vocab"):
        copy_probe(decoder, np.array([1, VOCAB]), span=8)
    with pytest.raises(UserError, match="vocab"):
        copy_probe(decoder, np.array([-1, 2]), span=8)
    with pytest.raises(UserError, match="non-empty"):
        copy_probe(decoder, np.array([], dtype=np.int64), span=8)


def test_paired_ratio_resolves_a_small_shift_that_independent_intervals_call_a_tie():
    from drprune.eval.stats import bootstrap_geomean, intervals_overlap, paired_geomean_ratio

    rng = np.random.default_rng(3)
    tokens = np.full(64, 127)
    a, b = {}, {}
    for d in ("x", "y"):
        base = rng.gamma(4.0, 1.0, size=64) * tokens  # rows differ a lot from each other
        a[d] = (base, tokens)
        b[d] = (base + 0.05 * tokens + rng.normal(0, 0.01, 64) * tokens, tokens)  # b: 0.05 nats/token worse
    ga, gb = bootstrap_geomean(a), bootstrap_geomean(b)
    assert intervals_overlap(ga, gb)
    r = paired_geomean_ratio(a, b)
    assert r.lo <= r.ratio <= r.hi < 1.0
    assert r.ratio == pytest.approx(np.exp(-0.05), rel=1e-2)
    same = paired_geomean_ratio(a, a)
    assert same.ratio == same.lo == same.hi == 1.0
    with pytest.raises(ValueError, match="same rows"):
        paired_geomean_ratio(a, {d: (x[:10], t[:10]) for d, (x, t) in b.items()})


def test_eval_result_keeps_rows_through_json():
    import json

    from drprune.eval.perplexity import EvalResult
    from drprune.eval.stats import Score

    s = Score(ppl=2.0, lo=1.5, hi=2.5, rows=2, tokens=10)
    r = EvalResult(domains={"x": s}, geomean=s, rows={"x": (np.array([1.0, 2.0]), np.array([5, 5]))})
    back = EvalResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.rows["x"][0].tolist() == [1.0, 2.0] and back.rows["x"][1].tolist() == [5, 5]
