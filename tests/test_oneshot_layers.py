"""Layer removal: scores equal their definitions, skipped blocks are never chosen, removal = layer masks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from drprune.errors import UserError
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder
from drprune.oneshot.layers import (
    check_request, choose_blocks, layer_masks, residual_states, score_blocks, select_blocks, state_scores,
)


def tiny_decoder(n_layers: int = 5, seed: int = 0) -> PrunableDecoder:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=23, d_model=16, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                      intermediate_size=24, context_length=32, init_std=0.3)
    return PrunableDecoder(cfg).eval()


def make_identity(decoder: PrunableDecoder, blocks: list[int]) -> None:
    """Zero the output projections so these blocks pass the residual stream through unchanged."""
    with torch.no_grad():
        for i in blocks:
            decoder.transformer["blocks"][i].attn.out_proj.weight.zero_()
            decoder.transformer["blocks"][i].mlp.down_proj.weight.zero_()


def test_scores_equal_definitions_on_crafted_states():
    # one row, two tokens, 2-d states; cos(h0,h1) per token = (0, 1); cos(h1,h2) = (-1, 1/sqrt2)
    h0 = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    h1 = torch.tensor([[[0.0, 3.0], [0.0, 1.0]]])
    h2 = torch.tensor([[[0.0, -1.0], [1.0, 1.0]]])
    states = [h0, h1, h2]
    sums, n = state_scores(states, "cosine", 1, "all")
    assert n == 2
    assert torch.allclose(sums / n, torch.tensor([(1 + 0) / 2, (2 + (1 - 1 / math.sqrt(2))) / 2]))
    sums, n = state_scores(states, "angular", 1, "all")
    assert torch.allclose(sums / n, torch.tensor([(0.5 + 0) / 2, (1 + 0.25) / 2]))
    # window of 2: h0 vs h2 per token: cos = (0, 1/sqrt2) -> angular (0.5, 0.25)
    sums, n = state_scores(states, "angular", 2, "all")
    assert torch.allclose(sums / n, torch.tensor([0.375]))
    sums, n = state_scores(states, "angular", 2, "last")
    assert n == 1 and torch.allclose(sums, torch.tensor([0.25]))
    sums, n = state_scores(states, "cosine", 1, "last")
    assert torch.allclose(sums, torch.tensor([0.0, 1 - 1 / math.sqrt(2)]))


def test_residual_states_are_block_inputs_and_outputs():
    dec = tiny_decoder(3)
    ids = torch.randint(0, 23, (2, 7))
    states = residual_states(dec, ids)
    assert len(states) == 4
    x = dec.transformer["wte"](ids)
    rope = dec.rotary(7, ids.device)
    assert torch.equal(states[0], x)
    for i, block in enumerate(dec.transformer["blocks"]):
        x = block(x, rope, {})
        assert torch.allclose(states[i + 1], x)


def test_identity_blocks_score_zero_and_are_chosen():
    dec = tiny_decoder(5)
    make_identity(dec, [2, 3])
    rows = np.random.default_rng(0).integers(0, 23, size=(3, 9))
    angular = score_blocks(dec, rows, method="angular", num_blocks=2, batch_size=2)
    assert angular.shape == (4,) and angular[2] < 1e-3 and angular.min() == angular[2]
    assert (angular[[0, 1, 3]] > 0.01).all()
    cosine = score_blocks(dec, rows, method="cosine", num_blocks=2, token="last")
    assert cosine.shape == (5,) and cosine[2] < 1e-6 and cosine[3] < 1e-6
    assert select_blocks(dec, rows, num_blocks=2, method="angular").blocks == [2, 3]
    assert select_blocks(dec, rows, num_blocks=2, method="cosine_similarity").blocks == [2, 3]
    # skipping block 3 moves the choice elsewhere, never onto a skipped block
    sel = select_blocks(dec, rows, num_blocks=2, method="angular", skip_blocks=[-2])
    assert 3 not in sel.blocks and len(sel.blocks) == 2 and sel.blocks[1] == sel.blocks[0] + 1
    sel = select_blocks(dec, rows, num_blocks=2, method="cosine", skip_blocks=[3])
    assert 2 in sel.blocks and 3 not in sel.blocks


def test_choose_blocks_respects_skip_blocks():
    scores = [0.0, 0.1, 0.2, 0.3, 0.05, 0.9]  # angular windows of 1 or cosine per block, 6 blocks
    assert choose_blocks(scores, method="angular", num_blocks=1, n_layers=6, skip_blocks=[0]) == [4]
    assert choose_blocks(scores, method="cosine", num_blocks=3, n_layers=6, skip_blocks=[0, -2]) == [1, 2, 3]
    windows = [0.0, 0.5, 0.1, 0.4]  # windows of 3 in 6 blocks
    assert choose_blocks(windows, method="angular", num_blocks=3, n_layers=6, skip_blocks=[1]) == [2, 3, 4]


@pytest.mark.parametrize("n,method,skip,msg", [
    (3, "angular", [0, 3, -1], "consecutive"),      # windows of 3 in blocks 1,2,4 do not exist
    (5, "cosine", [0, 1], "fewer than"),
    (6, "angular", [], "must be in 1..5"),
    (1, "angular", [6], "outside"),
    (1, "magic", [], "unknown"),
])
def test_bad_layer_requests(n, method, skip, msg):
    with pytest.raises(UserError, match=msg):
        check_request(6, n, method, "all", skip)


def test_removing_blocks_equals_layer_masks():
    from drprune.compact.fold import compact_decoder

    dec = tiny_decoder(5)
    rows = np.random.default_rng(1).integers(0, 23, size=(2, 8))
    sel = select_blocks(dec, rows, num_blocks=2, method="angular")
    masks = layer_masks(5, sel.blocks)
    ids = torch.from_numpy(rows)
    with torch.no_grad():
        expected = dec(ids, masks)
        small = compact_decoder(dec, masks)
        got = small(ids)
    assert small.cfg.n_layers == 3
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, dec(ids), atol=1e-3)
