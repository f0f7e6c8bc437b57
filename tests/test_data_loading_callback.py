"""Dynamic data loading through the real Composer Trainer: rules steer, ranks agree, resume is exact."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drprune.callbacks.data_loading import DynamicLoadingCallback
from drprune.data.testing import write_synthetic_mds
from drprune.train import build_trainer, load_config, main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "prune.yaml")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_synthetic_mds(tmp_path_factory.mktemp("mix") / "data", {"easy": "repetitive", "hard": "random"},
                               seq_len=32, vocab_size=49152, n_train=200, n_eval=4)


def args(data_dir: Path, save: Path, update_type: str, *extra: str) -> list[str]:
    return [f"data_local={data_dir}", "callbacks.data_loading.set_names=[easy,hard]", f"save_folder={save}",
            "max_seq_len=32", f"callbacks.data_loading.update_type={update_type}",
            "callbacks.data_loading.reference_loss=[2.0,2.0]", "max_duration=10ba", "eval_interval=3ba",
            "save_interval=5ba", "log_to_console=false", *extra]


def fit(arguments: list[str]):
    trainer = build_trainer(load_config(TINY, arguments))
    trainer.fit()
    callback = next(c for c in trainer.state.callbacks if isinstance(c, DynamicLoadingCallback))
    return trainer, callback


@pytest.mark.parametrize("update_type,masks", [("dro", True), ("dro+Eval", False), ("sheared", False),
                                               ("constant", True)])
def test_hard_domain_gains_weight_under_dro_and_sheared(tmp_path, data_dir, update_type, masks):
    extra = [] if masks else ["~model.mask_generator"]
    trainer, cb = fit(args(data_dir, tmp_path / "run", update_type, *extra))
    trainer.close()
    weights = [w for _, w in cb.weight_history]
    assert len(weights) == 10 and all(abs(sum(w) - 1) < 1e-9 for w in weights)
    if update_type == "constant":
        assert all(w == [0.5, 0.5] for w in weights)
    else:
        assert weights[-1][1] > 0.55 > weights[0][1] - 0.06
    summary = json.loads((tmp_path / "run" / "data_loading_summary.json").read_text())
    assert summary["final_proportion"] == cb.p and summary["update_type"] == update_type
    for png in ("domain_weights.png", "domain_eval_loss.png"):
        assert (tmp_path / "run" / png).stat().st_size > 1000


def test_resume_continues_proportions_ema_and_references_exactly(tmp_path, data_dir):
    full, cb_full = fit(args(data_dir, tmp_path / "a", "dro+Dy"))
    full.close()
    checkpoint = tmp_path / "a" / "ep0-ba5-rank0.pt"
    resumed, cb_resumed = fit(args(data_dir, tmp_path / "b", "dro+Dy", f"load_path={checkpoint}"))
    resumed.close()
    a, b = cb_full.state_dict(), cb_resumed.state_dict()
    for key in ("p", "p0", "reference_loss", "ema_loss", "tokens_seen", "interval_loss", "interval_tokens",
                "weight_history", "eval_history", "fitter"):
        assert a[key] == b[key], key


def test_bad_data_loading_config(tmp_path, data_dir, capsys):
    base = args(data_dir, tmp_path / "r", "dro")
    assert main([TINY, *base, "callbacks.data_loading.update_type=dro+Bogus"]) == 2
    assert "dro+Eval+Dy" in capsys.readouterr().err  # lists the valid strings
    assert main([TINY, *base, "callbacks.data_loading.reference_loss=[2.0]"]) == 2
    assert "reference_loss has 1 values for 2 domains" in capsys.readouterr().err
    assert main([TINY, *base, "~callbacks.data_loading.reference_loss"]) == 2
    assert "reference_loss is required" in capsys.readouterr().err
    assert main([TINY, *base, "callbacks.data_loading.proportion=[0.7,0.7]"]) == 2
    assert "must sum to 1" in capsys.readouterr().err


def test_two_ranks_hold_the_same_proportions(tmp_path, data_dir):
    launcher = Path(sys.executable).parent / "composer"
    cmd = [str(launcher), "-n", "2", "--stdout", str(tmp_path / "out{rank}.txt"),
           "--stderr", str(tmp_path / "err{rank}.txt"), str(ROOT / "tests" / "scripts" / "record_proportions.py"),
           str(tmp_path), TINY, *args(data_dir, tmp_path / "run", "dro", "max_duration=8ba")]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    logs = "".join(p.read_text() for p in tmp_path.glob("err*.txt"))
    assert proc.returncode == 0, proc.stderr[-2000:] + logs[-3000:]
    rank0 = json.loads((tmp_path / "proportions-rank0.json").read_text())
    rank1 = json.loads((tmp_path / "proportions-rank1.json").read_text())
    assert len(rank0) == 8 and rank0 == rank1
    assert rank0[-1] != rank0[0]  # the rule did move p


class _Dataset:
    def update_proportion(self, p: list[float]) -> None:
        self.p = p


def test_dy_timing_follows_the_reference(monkeypatch):
    """+Dy records points from 2% of training (mean training loss since the last eval without +Eval),
    refits from 10% at (tokens / elapsed, target sparsity); +DyAll moves p0 only from 20%."""
    from drprune.callbacks import data_loading
    from drprune.mixture import parse_update_type

    monkeypatch.setattr(data_loading, "_model_sparsity", lambda state: 0.0)
    monkeypatch.setattr(data_loading, "_target_sparsity", lambda state: 0.0)
    cb = DynamicLoadingCallback(["a", "b"], [0.6, 0.4], parse_update_type("dro+DyAll"), _Dataset(),
                                reference_loss=[2.0, 2.0])
    calls = []
    monkeypatch.setattr(cb.fitter, "refit", lambda cur, final, target: calls.append((final, target)) or list(cur))
    try:
        cb.tokens_seen, cb.interval_loss, cb.interval_tokens = [100, 50], [300.0, 100.0], [100, 50]
        cb._update_reference(None, None, elapsed=0.01)
        assert cb.fitter.observations == {"a": [], "b": []}
        cb._update_reference(None, None, elapsed=0.05)
        assert cb.fitter.observations == {"a": [(100.0, 0.0, 3.0)], "b": [(50.0, 0.0, 2.0)]} and calls == []
        cb._update_reference(None, None, elapsed=0.1)
        assert calls == [([1000.0, 500.0], 0.0)]
        cb.ema_loss = [2.0, 3.0]
        cb._apply_rule(None, elapsed=0.19)
        assert cb.p0 == [0.6, 0.4]
        cb._apply_rule(None, elapsed=0.2)
        assert cb.p0[1] > 0.4  # domain b is 1 nat above its reference: p0 moves toward it
    finally:
        cb.fitter.close()


def test_a_train_only_domain_is_steered_by_its_training_loss():
    """A domain with no eval rows (a repeats domain) computes a NaN eval loss: eval-loss rules use its
    EMA training loss instead (its reference before it was sampled), so its weight still moves."""
    from drprune.mixture import parse_update_type

    cb = DynamicLoadingCallback(["text", "repeats"], [0.5, 0.5], parse_update_type("dro+Eval"), _Dataset(),
                                reference_loss=[2.0, 2.0])
    assert cb._stand_in_for_missing([2.5, float("nan")]) == [2.5, 2.0]  # not sampled yet: its reference
    cb.ema_loss = [2.5, 4.0]
    losses = cb._stand_in_for_missing([2.5, float("nan")])
    assert losses == [2.5, 4.0]
    new_p = cb._apply_rule(losses, elapsed=0.5)
    assert new_p[1] > 0.5 and abs(sum(new_p) - 1) < 1e-9  # 2 nats above its reference: repeats gains weight
