"""Per-domain perplexity equals exp of the mean token loss computed by hand; the CLI prints intervals."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from drprune.cli import main as drprune
from drprune.data.testing import write_synthetic_mds
from drprune.eval.copying import copy_rows, token_pool_of
from drprune.eval.perplexity import EvalResult, read_token_rows
from tests.conftest import VOCAB, random_hf_model


def _hand_loss(hf, ids: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    with torch.no_grad():
        logits = hf(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1),
                                             reduction="none")
    if mask is not None:
        return loss[mask[:, 1:].reshape(-1)].mean().item()
    return loss.mean().item()


def test_eval_cli_matches_hand_computed_perplexity(tmp_path, capsys):
    data = write_synthetic_mds(tmp_path / "mds", {"easy": "repetitive", "hard": "random"}, seq_len=16,
                               vocab_size=VOCAB, n_train=2, n_eval=5)
    hf = random_hf_model("llama")
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "ppl.json"
    assert drprune(["eval", str(tmp_path / "hf"), "--data", str(data), "--json", str(out), "--batch-size", "2",
                    "--bootstrap", "200", "--copy-probe", "--copy-span", "1000", "--copy-rows", "6"]) == 0
    raw = json.loads(out.read_text())
    result = EvalResult.from_dict(raw)
    assert EvalResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    assert set(result.domains) == {"easy", "hard"}
    losses, all_rows = [], []
    for domain, score in result.domains.items():
        rows = read_token_rows(data / "eval" / domain)
        all_rows.append(rows)
        ids = torch.from_numpy(rows)
        assert ids.shape == (5, 16)
        losses.append(_hand_loss(hf, ids))
        assert math.isclose(score.ppl, math.exp(losses[-1]), rel_tol=1e-4)
        assert score.lo <= score.ppl <= score.hi
        assert (score.rows, score.tokens) == (5, 5 * 15)
    assert math.isclose(result.geomean.ppl, math.exp(np.mean(losses)), rel_tol=1e-4)

    # Copy probe: span capped to max_seq_len // 2 = 64, pool = ids of the evaluated eval rows.
    copy = raw["copy"]
    assert copy["rows"] == 6 and copy["tokens"] == 6 * 63
    ids, mask = copy_rows(token_pool_of(np.concatenate([r.ravel() for r in all_rows])), rows=6, span=64, seed=0)
    expected = math.exp(_hand_loss(hf, torch.from_numpy(ids), torch.from_numpy(mask)))
    assert math.isclose(copy["ppl"], expected, rel_tol=1e-4)

    printed = capsys.readouterr().out
    assert "capped to 64" in printed
    lines = {line.split()[0]: line for line in printed.splitlines() if line.strip()}
    hard = result.domains["hard"]
    assert f"[{hard.lo:.3f}, {hard.hi:.3f}]" in lines["hard"] and lines["hard"].split()[-1] == "5"
    assert f"{result.geomean.ppl:.3f}" in lines["geomean"]
    assert "copy" in lines


def test_eval_cli_errors(tmp_path, capsys):
    assert drprune(["eval", str(tmp_path), "--data", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--bootstrap", "0"), ("--copy-rows", "0"), ("--copy-span", "1"),
                                        ("--max-rows", "0"), ("--batch-size", "-1"), ("--seed", "-3")])
def test_eval_cli_rejects_bad_numbers_before_loading(tmp_path, capsys, flag, value):
    # The model path does not exist: the flag error must come first.
    assert drprune(["eval", str(tmp_path / "no-model"), "--data", str(tmp_path), flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and "must be >=" in err
