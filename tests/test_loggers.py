"""`loggers:` builds Composer's own loggers by name; masks, lambdas, the mixture and per-domain losses reach them."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from drprune.data.testing import write_synthetic_mds
from drprune.models.composer_model import PrunableLM
from drprune.train import build_trainer, load_config, main

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "prune.yaml")
MODULES = ("head", "intermediate", "layer", "hidden")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_synthetic_mds(tmp_path_factory.mktemp("mds") / "data", {"a": "repetitive", "b": "random"},
                               seq_len=64, vocab_size=49152, n_train=32, n_eval=4)


def overrides(data_dir: Path, save: Path, *extra: str) -> list[str]:
    return [f"data_local={data_dir}", "callbacks.data_loading.set_names=[a,b]", f"save_folder={save}",
            "max_duration=4ba", "eval_interval=2ba", "save_interval=4ba", *extra]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logger_receives_masks_lambdas_mixture_and_domain_losses(tmp_path, data_dir):
    pytest.importorskip("tensorboard")
    tb = tmp_path / "tb"
    cfg = load_config(TINY, overrides(
        data_dir, tmp_path / "run", "run_name=tb-run", f"loggers.tensorboard.log_dir={tb}",
        "loggers.tensorboard.flush_interval=1", "callbacks.data_loading.update_type=dro",
        "callbacks.data_loading.reference_loss=[9.0,11.0]", "console_log_interval=2ba"))
    trainer = build_trainer(cfg)
    trainer.fit()
    trainer.close()
    got = scalars(tb / "tb-run")

    for m in MODULES:
        sparsity, size = dict(got[f"pruning/expected_sparsity/{m}"]), dict(got[f"pruning/expected_size/{m}"])
        n = trainer.state.model.mask_generator.gates[m].n
        assert sorted(size) == sorted(sparsity) == [2, 4]  # at the console interval: no host sync between
        for step, s in sparsity.items():  # expected kept units = (1 - expected sparsity) * units per row
            assert size[step] == pytest.approx((1 - s) * n, rel=1e-4)
        assert f"pruning/lambda_1/{m}" in got and f"pruning/lambda_2/{m}" in got
    weights = [dict(got[f"metrics/train/{d}_weight"]) for d in ("a", "b")]
    assert sorted(weights[0]) == [1, 2, 3, 4]
    for step in weights[0]:
        assert weights[0][step] + weights[1][step] == pytest.approx(1.0, abs=1e-6)
    reference = got["metrics/train/b_reference_loss"]  # the rule's inputs, at the console interval
    assert reference == [(2, pytest.approx(11.0)), (4, pytest.approx(11.0))]
    for split in ("train", "eval"):
        for d in ("a", "b"):
            losses = [v for _, v in got[f"metrics/{split}/{d}_LanguageCrossEntropy"]]
            assert losses and all(math.isfinite(v) and 0 < v < 20 for v in losses), (split, d)
    assert all(math.isfinite(v) for _, v in got["metrics/train/a_ema_loss"])


def test_unknown_logger_names_the_nearest_before_the_model_is_built(tmp_path, data_dir, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was built before the logger config was checked")

    monkeypatch.setattr(PrunableLM, "__init__", never)
    assert main([TINY, *overrides(data_dir, tmp_path / "run", "loggers.tensorbord.log_dir=x")]) == 2
    err = capsys.readouterr().err
    assert "loggers.tensorbord is unknown: did you mean loggers.tensorboard?" in err
    assert main([TINY, *overrides(data_dir, tmp_path / "run", "loggers.file.filenam=x")]) == 2
    err = capsys.readouterr().err
    assert "loggers.file:" in err and "filenam" in err and "FileLogger" in err
    assert not (tmp_path / "run").exists()
