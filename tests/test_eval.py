"""Per-domain perplexity equals exp of the mean token loss computed by hand."""
from __future__ import annotations

import json
import math

import torch

from drprune.cli import main as drprune
from drprune.data.testing import write_synthetic_mds
from drprune.eval.perplexity import read_token_rows
from tests.conftest import VOCAB, random_hf_model


def test_eval_cli_matches_hand_computed_perplexity(tmp_path, capsys):
    data = write_synthetic_mds(tmp_path / "mds", {"easy": "repetitive", "hard": "random"}, seq_len=16,
                               vocab_size=VOCAB, n_train=2, n_eval=5)
    hf = random_hf_model("llama")
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "ppl.json"
    assert drprune(["eval", str(tmp_path / "hf"), "--data", str(data), "--json", str(out), "--batch-size", "2"]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"easy", "hard"}
    for domain, ppl in result.items():
        ids = torch.from_numpy(read_token_rows(data / "eval" / domain))
        assert ids.shape == (5, 16)
        with torch.no_grad():
            logits = hf(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        assert math.isclose(ppl, math.exp(loss.item()), rel_tol=1e-4)
    assert "hard" in capsys.readouterr().out


def test_eval_cli_errors(tmp_path, capsys):
    assert drprune(["eval", str(tmp_path), "--data", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
