"""Width pruning: importance equals hand-computed values, masks respect coupling, targets are met."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from drprune.errors import UserError
from drprune.models.shapes import compact_config
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder
from drprune.oneshot.importance import activation, importance_scores, magnitude, taylor
from drprune.oneshot.width import plan_target, removed_structures, width_prune

V, D, H, KV, HD, I = 11, 6, 4, 2, 2, 5  # group size 2, head_dim independent of d_model


def toy(family: str = "llama", n_layers: int = 1, seed: int = 0) -> PrunableDecoder:
    torch.manual_seed(seed)
    extra = dict(norm="layernorm", mlp="plain", activation="gelu", qkv_bias=True, o_bias=True, mlp_bias=True,
                 n_kv_heads=H) if family == "pythia" else dict(n_kv_heads=KV, qkv_bias=family == "qwen2")
    cfg = ModelConfig(family=family, vocab_size=V, d_model=D, n_layers=n_layers, n_heads=H, head_dim=HD,
                      intermediate_size=I, context_length=16, init_std=0.5, **extra)
    dec = PrunableDecoder(cfg).eval()
    with torch.no_grad():
        for name, p in dec.named_parameters():
            if "ln" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.3)
    return dec


def hand_groups(dec: PrunableDecoder, value) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum value(p)[slice] over each structure of a one-layer llama/qwen2 toy, by explicit slicing."""
    t = dec.transformer
    b = t["blocks"][0]
    a, m = b.attn, b.mlp
    g = H // KV
    head = torch.zeros(KV, dtype=torch.float64)
    for k in range(KV):
        q_rows, kv_rows = slice(k * g * HD, (k + 1) * g * HD), slice(k * HD, (k + 1) * HD)
        head[k] = (value(a.wq.weight)[q_rows].sum() + value(a.wk.weight)[kv_rows].sum()
                   + value(a.wv.weight)[kv_rows].sum() + value(a.out_proj.weight)[:, q_rows].sum())
        if a.wq.bias is not None:
            head[k] += (value(a.wq.bias)[q_rows].sum() + value(a.wk.bias)[kv_rows].sum()
                        + value(a.wv.bias)[kv_rows].sum())
    inter = torch.tensor([float(value(m.gate_proj.weight)[j].sum() + value(m.up_proj.weight)[j].sum()
                                + value(m.down_proj.weight)[:, j].sum()) for j in range(I)], dtype=torch.float64)
    hidden = torch.zeros(D, dtype=torch.float64)
    for k in range(D):
        cols = [t["wte"].weight, t["output"].weight, a.wq.weight, a.wk.weight, a.wv.weight,
                m.gate_proj.weight, m.up_proj.weight]
        hidden[k] = sum(float(value(w)[:, k].sum()) for w in cols)
        hidden[k] += float(value(a.out_proj.weight)[k].sum() + value(m.down_proj.weight)[k].sum())
        hidden[k] += float(value(t["ln_f"].weight)[k] + value(b.ln_1.weight)[k] + value(b.ln_2.weight)[k])
    return head, inter, hidden


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_magnitude_equals_hand_computed(family):
    dec = toy(family)
    s = magnitude(dec, "l1")
    head, inter, hidden = hand_groups(dec, lambda p: p.detach().double().abs())
    assert torch.allclose(s.head[0], head) and torch.allclose(s.intermediate[0], inter)
    assert torch.allclose(s.hidden, hidden)
    s = magnitude(dec, "l2")
    head, inter, hidden = hand_groups(dec, lambda p: p.detach().double() ** 2)
    assert torch.allclose(s.head[0], head.sqrt()) and torch.allclose(s.intermediate[0], inter.sqrt())
    assert torch.allclose(s.hidden, hidden.sqrt())


def test_taylor_equals_hand_computed():
    dec = toy("qwen2")
    rows = np.random.default_rng(0).integers(0, V, size=(3, 7))
    ids = torch.from_numpy(rows)
    # reference gradient: two batches (2 rows, 1 row), each the mean next-token loss, summed
    losses = [F.cross_entropy(dec(x)[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1)) for x in (ids[:2], ids[2:])]
    grads = dict(zip([n for n, _ in dec.named_parameters()],
                     torch.autograd.grad(sum(losses), list(dec.parameters()))))
    by_param = {id(p): grads[n] for n, p in dec.named_parameters()}
    s = taylor(dec, rows, "element", batch_size=2)
    head, inter, hidden = hand_groups(dec, lambda p: (p.detach().double() * by_param[id(p)].double()).abs())
    assert torch.allclose(s.head[0], head) and torch.allclose(s.intermediate[0], inter)
    assert torch.allclose(s.hidden, hidden)
    s = taylor(dec, rows, "vector", batch_size=2)
    head, inter, hidden = hand_vector(dec, lambda p: p.detach().double() * by_param[id(p)].double())
    assert torch.allclose(s.head[0], head) and torch.allclose(s.intermediate[0], inter)
    assert torch.allclose(s.hidden, hidden)
    # not the old whole-group |sum w g|, which lets one matrix's positive and another's negative cancel
    whole_head, _, whole_hidden = hand_groups(dec, lambda p: p.detach().double() * by_param[id(p)].double())
    assert not torch.allclose(s.hidden, whole_hidden.abs()) and not torch.allclose(s.head[0], whole_head.abs())
    assert all(p.grad is None for p in dec.parameters())


def hand_vector(dec: PrunableDecoder, wg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLM-Pruner's vector-wise Taylor on the one-layer toy, written out: per matrix, each row (or column)
    the structure owns contributes |sum of w*g over that row|; vector entries (biases, norms) |w*g|."""
    t, b = dec.transformer, dec.transformer["blocks"][0]
    a, m = b.attn, b.mlp
    g = H // KV

    def row(w, r):  # |sum over row r|
        return abs(float(wg(w)[r].sum()))

    def col(w, c):
        return abs(float(wg(w)[:, c].sum()))

    head = torch.zeros(KV, dtype=torch.float64)
    for k in range(KV):
        q_rows, kv_rows = range(k * g * HD, (k + 1) * g * HD), range(k * HD, (k + 1) * HD)
        head[k] = (sum(row(a.wq.weight, r) + abs(float(wg(a.wq.bias)[r])) + col(a.out_proj.weight, r) for r in q_rows)
                   + sum(row(w, r) + abs(float(wg(bias)[r])) for r in kv_rows
                         for w, bias in ((a.wk.weight, a.wk.bias), (a.wv.weight, a.wv.bias))))
    inter = torch.tensor([row(m.gate_proj.weight, j) + row(m.up_proj.weight, j) + col(m.down_proj.weight, j)
                          for j in range(I)], dtype=torch.float64)
    hidden = torch.zeros(D, dtype=torch.float64)
    col_mats = [t["wte"].weight, t["output"].weight, a.wq.weight, a.wk.weight, a.wv.weight,
                m.gate_proj.weight, m.up_proj.weight]
    for k in range(D):
        hidden[k] = sum(col(w, k) for w in col_mats) + row(a.out_proj.weight, k) + row(m.down_proj.weight, k)
        hidden[k] += sum(abs(float(wg(w)[k])) for w in (t["ln_f"].weight, b.ln_1.weight, b.ln_2.weight))
    return head, inter, hidden


def test_activation_equals_hand_computed():
    # rows of one token: causal attention over one position returns v, so every activation is explicit
    dec = toy("llama")
    rows = np.array([[3], [7], [3], [10]])
    s = activation(dec, rows, batch_size=3)
    b = dec.transformer["blocks"][0]
    with torch.no_grad():
        x0 = dec.transformer["wte"](torch.from_numpy(rows[:, 0]))  # [N, D]
        n1 = b.ln_1(x0)
        v = b.attn.wv(n1).view(-1, KV, HD)
        ctx = v.repeat_interleave(H // KV, dim=1)  # [N, H, HD]
        x1 = x0 + b.attn.out_proj(ctx.reshape(len(rows), -1))
        n2 = b.ln_2(x1)
        act = F.silu(b.mlp.gate_proj(n2)) * b.mlp.up_proj(n2)
    assert torch.allclose(s.head[0], v.abs().mean((0, 2)).double(), atol=1e-6)
    assert torch.allclose(s.intermediate[0], act.abs().mean(0).double(), atol=1e-6)
    assert torch.allclose(s.hidden, (n1.abs().mean(0) + n2.abs().mean(0)).double(), atol=1e-6)


def test_random_is_seeded():
    dec = toy("llama", n_layers=3)
    target = {"hidden_size": 4, "intermediate_size": 3}
    a = width_prune(dec, None, importance="random", target=target, seed=1)
    b = width_prune(dec, None, importance="random", target=target, seed=1)
    c = width_prune(dec, None, importance="random", target=target, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("importance", ["taylor", "l1", "l2", "activation", "random"])
def test_target_shape_met_exactly_with_gqa_coupling(importance):
    dec = toy("llama", n_layers=3)
    rows = np.random.default_rng(0).integers(0, V, size=(2, 6))
    target = {"hidden_size": 4, "num_attention_heads": 2, "intermediate_size": 3, "drop_layers": [-1]}
    masks = width_prune(dec, rows, importance=importance, target=target)
    assert masks["head"].shape == (3, KV) and (masks["head"].sum(1) == 1).all()  # one whole KV group per layer
    assert (masks["intermediate"].sum(1) == 3).all() and masks["hidden"].sum() == 4
    assert masks["layer"].tolist() == [1, 1, 0]
    cfg, kept = compact_config(dec.cfg, masks)
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size, cfg.n_layers) == (4, 2, 1, 3, 2)
    assert kept == [0, 1] and cfg.is_uniform
    removed = removed_structures(dec.cfg, masks)
    assert removed["layers"] == [2] and len(removed["hidden_dims"]) == 2
    assert all(len(v) == 1 for v in removed["kv_groups"].values())


def test_highest_scores_are_kept():
    dec = toy("llama")
    with torch.no_grad():
        dec.transformer["blocks"][0].mlp.down_proj.weight[:, 2] *= 50  # channel 2 dominates l2
        dec.transformer["blocks"][0].attn.wk.weight[HD:] *= 50          # KV group 1 dominates
    masks = width_prune(dec, None, importance="l2", target={"num_key_value_heads": 1, "intermediate_size": 1})
    assert masks["head"].tolist() == [[0.0, 1.0]]
    assert masks["intermediate"][0].tolist() == [0, 0, 1, 0, 0]


def test_ratio_plan_follows_layer_ranges():
    dec = toy("llama", n_layers=4)
    plan = plan_target(dec.cfg, {"pruning_ratio": 0.4, "block_attention_layer_start": 1,
                                 "block_attention_layer_end": 3, "block_mlp_layer_start": 2})
    assert plan.kv_groups == [2, 1, 1, 2] and plan.intermediate == [5, 5, 3, 3] and plan.hidden == D
    masks = width_prune(dec, None, importance="l1", target={"pruning_ratio": 0.4, "block_mlp_layer_start": 2,
                                                             "block_attention_layer_start": 1,
                                                             "block_attention_layer_end": 3})
    cfg, _ = compact_config(dec.cfg, masks)
    assert [(s.n_heads, s.intermediate_size) for s in cfg.layers] == [(4, 5), (2, 5), (2, 3), (4, 3)]


def test_pythia_plain_mlp_and_biases_are_scored():
    dec = toy("pythia")
    s = importance_scores(dec, None, "l1")
    b = dec.transformer["blocks"][0]
    j = 1
    expected = float(b.mlp.up_proj.weight[j].abs().sum() + b.mlp.up_proj.bias[j].abs()
                     + b.mlp.down_proj.weight[:, j].abs().sum())
    assert s.intermediate[0, j].item() == pytest.approx(expected)
    assert s.head.shape == (1, H)


@pytest.mark.parametrize("target,msg", [
    ({"pruning_ratio": 1.0}, "strictly between 0 and 1"),
    ({"pruning_ratio": 0.0}, "strictly between 0 and 1"),
    ({"hidden_size": D + 1}, "larger than the source"),
    ({"intermediate_size": 0}, "at least 1"),
    ({"num_attention_heads": 3}, "multiple of the 2"),
    ({"num_attention_heads": 2, "num_key_value_heads": 2}, "GQA ratio"),
    ({"hidden_size": 4, "pruning_ratio": 0.5}, "not both"),
    ({"drop_layers": [0, 1, 2]}, "every one"),
    ({"hiden_size": 3}, "unknown width target"),
    ({}, "no width target"),
    ({"pruning_ratio": 0.5, "block_mlp_layer_start": 3, "block_mlp_layer_end": 2}, "0 <= start < end"),
])
def test_bad_targets(target, msg):
    with pytest.raises(UserError, match=msg):
        plan_target(toy("llama", n_layers=3).cfg, target)


def test_unknown_importance_and_missing_calibration():
    dec = toy()
    with pytest.raises(UserError, match="unknown"):
        importance_scores(dec, None, "magnitude")
    with pytest.raises(UserError, match="needs calibration data"):
        importance_scores(dec, None, "taylor")


def test_compact_model_matches_masked_model():
    from drprune.compact.fold import compact_decoder

    dec = toy("qwen2", n_layers=3)
    rows = np.random.default_rng(3).integers(0, V, size=(2, 8))
    masks = width_prune(dec, rows, importance="taylor",
                        target={"hidden_size": 4, "num_attention_heads": 2, "intermediate_size": 2})
    ids = torch.from_numpy(rows)
    with torch.no_grad():
        small = compact_decoder(dec, masks)
        assert torch.allclose(small(ids), dec(ids, masks), atol=1e-5)
    assert (small.cfg.d_model, small.cfg.n_heads, small.cfg.intermediate_size) == (4, 2, 2)


def test_taylor_ratio_keeps_first_four_and_last_two_blocks(caplog):
    import logging

    dec = toy("llama", n_layers=8)
    rows = np.random.default_rng(4).integers(0, V, size=(4, 8))
    with caplog.at_level(logging.WARNING, logger="drprune.oneshot.importance"):
        masks = width_prune(dec, rows, importance="taylor", target={"pruning_ratio": 0.5})
    assert "taylor importance from 4 calibration rows" in caplog.text
    kept = masks["intermediate"].sum(1).tolist()
    assert kept == [I] * 4 + [I - 2] * 2 + [I] * 2  # layers 4, 5 pruned (round(5 * 0.5) = 2 channels)
    assert masks["head"].sum(1).tolist() == [KV] * 4 + [1, 1] + [KV] * 2
    # given ranges win; other importances prune every layer
    masks = width_prune(dec, rows, importance="taylor", target={"pruning_ratio": 0.5, "block_mlp_layer_start": 0})
    assert masks["intermediate"].sum(1).tolist() == [I - 2] * 6 + [I] * 2
    masks = width_prune(dec, None, importance="l1", target={"pruning_ratio": 0.5})
    assert masks["intermediate"].sum(1).tolist() == [I - 2] * 8
