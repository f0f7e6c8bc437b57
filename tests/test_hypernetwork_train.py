"""Hypernetwork runs of the tiny config through the real Composer Trainer on CPU (DESIGN.md 4.2)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from composer.loggers import InMemoryLogger

from drprune.data.testing import write_synthetic_mds
from drprune.masks.base import config_params, expected_params
from drprune.masks.hypernetwork import HypernetworkMaskGenerator
from drprune.train import build_trainer, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "prune.yaml")
TARGET = 0.5


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_synthetic_mds(tmp_path_factory.mktemp("mds") / "data", {"a": "repetitive", "b": "random"},
                               seq_len=64, vocab_size=49152, n_train=160, n_eval=8)


def build(data_dir: Path, save: Path, *extra: str):
    """The contract override on top of the tiny L0 config (its L0 keys stay in the node)."""
    args = [f"data_local={data_dir}", "callbacks.data_loading.set_names=[a,b]", f"save_folder={save}",
            "loggers.inmemory={}", "model.mask_generator.name=hypernetwork",
            f"model.mask_generator.target_ratio={TARGET}", "model.mask_generator.lr=1e-2",
            "max_duration=30ba", *extra]
    return build_trainer(load_config(TINY, args))


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.state.model.model.named_parameters()}


def test_hypernetwork_run_hits_the_target_with_a_frozen_llm_and_resumes_exactly(tmp_path, data_dir):
    save = tmp_path / "run"
    trainer = build(data_dir, save)
    gen = trainer.state.model.mask_generator
    assert isinstance(gen, HypernetworkMaskGenerator)
    initial = weights(trainer)
    trainer.fit()

    # the LLM is bit-identical; only the hypernetwork moved, and the kept size is on target
    assert all(torch.equal(v, initial[k]) for k, v in weights(trainer).items())
    full = config_params(gen.cfg, embeddings=False)
    kept = float(expected_params(gen.cfg, gen.hard_masks(), embeddings=False))
    assert kept / full == pytest.approx(TARGET, rel=0.02)
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    assert float(memory.data["pruning/kept_ratio"][0][1]) > 0.95  # offset +3: everything starts kept

    # after-training report: exact kept size, per-layer widths, hard-masked perplexity (= last eval)
    report = json.loads((save / "mask_report.json").read_text())
    assert report["kept_params"] == kept and report["target_params"] == round(TARGET * full)
    assert len(report["layers"]) == gen.cfg.n_layers
    hard = gen.hard_masks()
    assert [w["mlp_in"] for w in report["layers"]] == (hard["mlp_in"] != 0).sum(-1).tolist()
    eval_ce = float(memory.data["metrics/eval/LanguageCrossEntropy"][-1][1])
    assert report["perplexity"] == pytest.approx(math.exp(eval_ce), rel=1e-4)
    assert (save / "layer_widths.png").stat().st_size > 1000
    final_gen = {k: v.clone() for k, v in gen.state_dict().items()}
    trainer.close()

    # resuming from batch 20 continues exactly: the same hypernetwork and the same frozen LLM
    again = build(data_dir, tmp_path / "again", f"load_path={save / 'ep0-ba20-rank0.pt'}")
    again.fit()
    for key, value in again.state.model.mask_generator.state_dict().items():
        assert torch.equal(value, final_gen[key]), key
    assert all(torch.equal(v, initial[k]) for k, v in weights(again).items())
    again.close()
