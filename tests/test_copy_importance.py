"""Copy-aware importance on a tiny model built by hand to copy, and copy protection through `oneshot`.

The model (d_model 64, 4 query heads in 2 KV groups, vocab 16) holds an induction circuit: KV group
1 of layer 0 is a previous-token head (RoPE on constant q/k biases peaks at offset -1) writing the
previous token into its own residual dims; KV group 0 of the next layer is an induction head whose
query is the current token and whose key is that previous-token copy (in RoPE's slowest dims, nearly
position-free), writing the attended token into dims the output layer reads. Every other group is a
decoy with large values written where nothing reads, so activation importance prefers the decoys.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from drprune.cli import main as drprune
from drprune.convert.checkpoint import decoder_checkpoint_state, load_decoder, save_checkpoint
from drprune.data.testing import write_synthetic_mds
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder
from drprune.oneshot.copy_importance import (ablation_scores, copy_sequences, induction_scores, top_copy_groups,
                                             top_copy_layers)
from drprune.oneshot.importance import activation, importance_scores
from drprune.oneshot.width import width_prune

V, D, H, KV, HD = 16, 64, 4, 2, 32
TOK, PREV, OUT, FREE = 0, 16, 32, 48  # residual dims: token, previous token, copied token, unread
SLOW = list(range(8, 16)) + list(range(24, 32))  # head dims of RoPE's slowest frequencies
PREV_HEAD, INDUCTION_HEAD = (0, 1), (1, 0)  # (layer, KV group)


def planted(n_layers: int = 2, loud_mlp: tuple[int, ...] = (), seed: int = 0) -> PrunableDecoder:
    """The copying model of the module docstring; `loud_mlp` layers write large values to the unread dims."""
    cfg = ModelConfig(family="qwen2", vocab_size=V, d_model=D, n_layers=n_layers, n_heads=H, n_kv_heads=KV,
                      head_dim=HD, intermediate_size=32, context_length=128, rope_theta=1e6, qkv_bias=True)
    dec = PrunableDecoder(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    theta = dec.rotary.inv_freq
    eye = torch.eye(V)
    with torch.no_grad():
        for name, p in dec.named_parameters():
            if "ln" not in name:
                p.zero_()
        t = dec.transformer
        t["wte"].weight[:, TOK:TOK + V] = 8.0 * eye
        t["output"].weight[:, OUT:OUT + V] = 2.5 * eye
        for i, block in enumerate(t["blocks"]):
            a, m = block.attn, block.mlp
            for grp in range(KV):
                q0, kv0 = grp * 2 * HD, grp * HD  # the group's first query head, its KV head
                if (i, grp) == PREV_HEAD:
                    a.wq.bias[q0:q0 + 8] = 200.0  # q.k = 200 * sum_j cos(theta_j (s - t + 1))
                    a.wk.bias[kv0:kv0 + 8] = torch.cos(theta[:8])
                    a.wk.bias[kv0 + 16:kv0 + 24] = torch.sin(theta[:8])
                    a.wv.weight[kv0:kv0 + V, TOK:TOK + V] = eye
                    a.out_proj.weight[PREV:PREV + V, q0:q0 + V] = eye
                elif (i, grp) == INDUCTION_HEAD:
                    for j, d in enumerate(SLOW):
                        a.wq.weight[q0 + d, TOK + j] = 4.0
                        a.wk.weight[kv0 + d, PREV + j] = 1.0
                    a.wv.weight[kv0:kv0 + V, TOK:TOK + V] = eye
                    a.out_proj.weight[OUT:OUT + V, q0:q0 + V] = eye
                else:
                    a.wq.weight[q0:q0 + 2 * HD] = torch.randn(2 * HD, D, generator=g) * 0.3
                    a.wk.weight[kv0:kv0 + HD] = torch.randn(HD, D, generator=g) * 0.3
                    a.wv.weight[kv0:kv0 + HD] = torch.randn(HD, D, generator=g)
                    a.out_proj.weight[FREE:, q0:q0 + 2 * HD] = torch.randn(D - FREE, 2 * HD, generator=g) * 0.002
            m.gate_proj.weight.copy_(torch.randn(32, D, generator=g) * 0.3)
            m.up_proj.weight.copy_(torch.randn(32, D, generator=g) * 0.3)
            m.down_proj.weight[FREE:] = torch.randn(D - FREE, 32, generator=g) * (1.0 if i in loud_mlp else 0.01)
    return dec


def calib_rows(n: int = 24, seq_len: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, V, size=(n, seq_len))


def copied_loss(dec: PrunableDecoder, ids: np.ndarray, source: np.ndarray, masks=None) -> float:
    """Mean loss on the positions whose next token the copy predicts, through the decoder's own forward."""
    x = torch.from_numpy(ids)
    with torch.no_grad():
        logits = dec(x, masks)
    scored = torch.from_numpy(source[:, :-1] >= 0)
    return float(F.cross_entropy(logits[:, :-1][scored], x[:, 1:][scored]))


def test_scoring_sequences_repeat_spans_of_the_calibration_text():
    rows = calib_rows()
    ids, source = copy_sequences(rows, max_rows=8)
    assert ids.shape == (8, 64)
    b, t = np.nonzero(source >= 0)
    assert len(t) > 8 * 10
    assert (ids[b, t] == ids[b, source[b, t] - 1]).all() and (ids[b, t + 1] == ids[b, source[b, t]]).all()
    assert (source[b, t] <= t).all()  # the earlier occurrence's successor is at or before t
    text = rows.ravel()
    first = ids[0][: np.argmax(source[0] >= 0)]  # the first row opens with fresh calibration text, in order
    assert np.array_equal(first[:8], text[:8])
    assert copy_sequences(calib_rows(4, 2048), max_rows=2)[0].shape == (2, 512)  # long rows: scored in 512s


def test_ablation_equals_the_masked_decoder_and_ranks_the_planted_groups_first():
    dec = planted()
    ids, source = copy_sequences(calib_rows())
    scores = ablation_scores(dec, ids, source)
    base = copied_loss(dec, ids, source)
    assert scores.base == pytest.approx(base, abs=1e-4)
    head = torch.ones(2, KV)
    head[INDUCTION_HEAD] = 0
    assert float(scores.head[INDUCTION_HEAD]) == pytest.approx(copied_loss(dec, ids, source, {"head": head}) - base,
                                                               abs=1e-4)
    assert float(scores.layer[0]) == pytest.approx(
        copied_loss(dec, ids, source, {"layer": torch.tensor([0.0, 1.0])}) - base, abs=1e-4)
    order = [divmod(int(i), KV) for i in torch.argsort(scores.head.flatten(), descending=True)]
    assert set(order[:2]) == {PREV_HEAD, INDUCTION_HEAD}
    assert base < 1.5 < np.log(V)  # the model copies: well below a uniform guess (2.77)
    assert float(scores.head[PREV_HEAD]) > 1.0 and float(scores.head[INDUCTION_HEAD]) > 1.0
    assert all(abs(float(scores.head[u])) < 0.05 for u in order[2:])
    # activation importance prefers the decoys, which is why copying needs its own score
    act = activation(dec, calib_rows()).head
    assert int(act[0].argmax()) != PREV_HEAD[1] and int(act[1].argmax()) != INDUCTION_HEAD[1]


def test_induction_score_finds_the_induction_head():
    dec = planted()
    ids, source = copy_sequences(calib_rows())
    scores = induction_scores(dec, ids, source)
    assert scores.shape == (2, KV)
    assert divmod(int(scores.argmax()), KV) == INDUCTION_HEAD
    assert float(scores[INDUCTION_HEAD]) > 0.3  # attention mass on the right token (split among repeats)
    assert float(scores.flatten().sort().values[-2]) < 0.1


@pytest.mark.parametrize("name", ["copy", "induction"])
def test_registered_copy_scorers_keep_the_copying_groups(name):
    dec = planted()
    rows = calib_rows()
    scores = importance_scores(dec, rows, name)
    assert int(scores.head[0].argmax()) == PREV_HEAD[1] or name == "induction"
    assert int(scores.head[1].argmax()) == INDUCTION_HEAD[1]
    assert torch.equal(scores.intermediate, activation(dec, rows).intermediate.cpu())


def test_protection_keeps_the_copying_groups_whatever_activation_says():
    dec = planted()
    rows = calib_rows()
    ids, source = copy_sequences(rows, seed=1)
    target = {"num_key_value_heads": 1}
    plain = width_prune(dec, rows, importance="activation", target=target)
    protected = top_copy_groups(dec, rows, 2, score="ablation")
    assert set(protected) == {PREV_HEAD, INDUCTION_HEAD}
    kept = width_prune(dec, rows, importance="activation", target=target, protect=protected)
    assert plain["head"][PREV_HEAD] == 0 and plain["head"][INDUCTION_HEAD] == 0
    assert kept["head"][PREV_HEAD] == 1 and kept["head"][INDUCTION_HEAD] == 1
    full, lost, saved = (copied_loss(dec, ids, source, m) for m in (None, plain, kept))
    assert lost > 2.5 and saved < full + 0.1  # without protection copying is gone; with it, intact
    # the induction score protects the induction head but cannot see the previous-token head it reads from
    by_induction = top_copy_groups(dec, rows, 2)  # the default score
    assert by_induction[0] == INDUCTION_HEAD and PREV_HEAD not in by_induction
    half = width_prune(dec, rows, importance="activation", target=target, protect=by_induction)
    assert half["head"][INDUCTION_HEAD] == 1 and half["head"][PREV_HEAD] == 0
    assert copied_loss(dec, ids, source, half) > 2.0


@pytest.fixture
def model_and_calib(tmp_path):
    model = save_checkpoint(decoder_checkpoint_state(planted()), tmp_path / "copier.pt")
    calib = write_synthetic_mds(tmp_path / "calib", {"text": "random"}, seq_len=64, vocab_size=V, n_train=24,
                                n_eval=4)
    return model, calib


def test_oneshot_width_protect_copy_heads(tmp_path, model_and_calib, capsys):
    model, calib = model_and_calib
    common = ["oneshot", "width", str(model), "--num-key-value-heads", "1", "--calib", str(calib)]
    assert drprune([*common, "--importance", "activation", "--out", str(tmp_path / "plain")]) == 0
    assert drprune([*common, "--importance", "activation", "--protect-copy-heads", "2", "--copy-score", "ablation",
                    "--out", str(tmp_path / "kept")]) == 0
    assert "copy-protected KV groups" in capsys.readouterr().out
    assert drprune([*common, "--importance", "copy", "--out", str(tmp_path / "copy")]) == 0
    plain, kept, copy = (json.loads((tmp_path / d / "removed.json").read_text()) for d in ("plain", "kept", "copy"))
    assert plain["kv_groups"] == {"0": [PREV_HEAD[1]], "1": [INDUCTION_HEAD[1]]}
    assert sorted(map(tuple, kept["copy_protected_kv_groups"])) == sorted([PREV_HEAD, INDUCTION_HEAD])
    assert kept["copy_score"] == "ablation"
    assert kept["kv_groups"] == copy["kv_groups"] == {"0": [1 - PREV_HEAD[1]], "1": [1 - INDUCTION_HEAD[1]]}
    ids, source = copy_sequences(calib_rows(), seed=1)
    losses = {d: copied_loss(load_decoder(tmp_path / d / "model.pt"), ids, source) for d in ("plain", "kept")}
    assert losses["plain"] > 2.5 and losses["kept"] < 1.5, losses


def test_oneshot_layers_protect_copy_layers(tmp_path):
    dec = planted(n_layers=3, loud_mlp=(2,))  # block 2 moves the residual most but copies nothing
    assert top_copy_layers(dec, calib_rows(), 2) in ([0, 1], [1, 0])
    model = save_checkpoint(decoder_checkpoint_state(dec), tmp_path / "copier3.pt")
    calib = write_synthetic_mds(tmp_path / "calib", {"text": "random"}, seq_len=64, vocab_size=V, n_train=24,
                                n_eval=4)
    common = ["oneshot", "layers", str(model), "--num-blocks-to-prune", "1", "--calib", str(calib)]
    assert drprune([*common, "--out", str(tmp_path / "plain")]) == 0
    assert drprune([*common, "--protect-copy-layers", "2", "--out", str(tmp_path / "kept")]) == 0
    plain, kept = (json.loads((tmp_path / d / "removed.json").read_text()) for d in ("plain", "kept"))
    assert plain["removed_blocks"] == [1]  # angular distance takes the induction layer
    assert kept["removed_blocks"] == [2] and sorted(kept["copy_protected_blocks"]) == [0, 1]
    assert kept["skip_blocks"] == []


@pytest.mark.parametrize("argv,msg", [
    (["width", "--importance", "l1", "--num-key-value-heads", "1", "--protect-copy-heads", "5", "--calib", "{calib}"],
     "protect_copy_heads=5 must be in 1..4"),
    (["width", "--importance", "l1", "--num-key-value-heads", "1", "--protect-copy-heads", "1"], "pass --calib"),
    (["width", "--importance", "l1", "--num-key-value-heads", "1", "--protect-copy-heads", "-1"], "integer >= 0"),
    (["width", "--importance", "l1", "--num-key-value-heads", "1", "--config", "{config}"],
     "copy_score='best' is unknown"),
    (["layers", "--num-blocks-to-prune", "1", "--protect-copy-layers", "2", "--calib", "{calib}"],
     "protect_copy_layers=2 must be in 1..1"),
])
def test_bad_protection_requests_are_user_errors(tmp_path, model_and_calib, capsys, argv, msg):
    model, calib = model_and_calib
    (tmp_path / "bad.yaml").write_text("copy_score: best\nprotect_copy_heads: 1\n")
    args = [a.replace("{calib}", str(calib)).replace("{config}", str(tmp_path / "bad.yaml")) for a in argv]
    assert drprune(["oneshot", args[0], str(model), *args[1:], "--out", str(tmp_path / "out")]) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
