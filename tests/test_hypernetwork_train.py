"""Hypernetwork runs of the tiny config through the real Composer Trainer on CPU."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from composer.loggers import InMemoryLogger

from drprune.cli import main
from drprune.data.testing import write_synthetic_mds
from drprune.models.shapes import config_params, expected_params
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
    """The contract override on top of the tiny L0 config (its L0 keys stay in the node), with DRO."""
    args = [f"data_local={data_dir}", "callbacks.data_loading.set_names=[a,b]", f"save_folder={save}",
            "loggers.inmemory={}", "callbacks.data_loading.update_type=dro",
            "callbacks.data_loading.reference_loss=[9.0,9.0]", "model.mask_generator.name=hypernetwork",
            f"model.mask_generator.target_ratio={TARGET}", "model.mask_generator.lr=1e-2",
            # hard_st: the budget counts the exported masks, so the size lands on the target (2%); the
            # default (soft, DISP-LLM) counts a noisy sample and lands farther (docs/hypernetwork.md)
            "model.mask_generator.train_masks=hard_st",
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
    weights_a = [float(v) for _, v in memory.data["metrics/train/a_weight"]]
    assert weights_a[0] == 0.5 and abs(weights_a[-1] - 0.5) > 0.05  # DRO steers the hypernetwork's data

    # after-training report: exact kept size, per-layer widths, hard-masked perplexity (= last eval)
    report = json.loads((save / "mask_report.json").read_text())
    assert report["kept_params"] == kept and report["target_params"] == round(TARGET * full)
    assert len(report["layers"]) == gen.cfg.n_layers
    hard = gen.hard_masks()
    assert [w["mlp_in"] for w in report["layers"]] == (hard["mlp_in"] != 0).sum(-1).tolist()
    eval_ce = float(memory.data["metrics/eval/LanguageCrossEntropy"][-1][1])
    assert report["perplexity"] == pytest.approx(math.exp(eval_ce), rel=1e-4)
    assert (save / "layer_widths.png").stat().st_size > 1000
    final_gen = {k: v.clone() for k, v in gen.state_dict().items() if torch.is_tensor(v)}

    # the contract: drprune compact, then composer-to-hf, gives a per-layer-shapes remote-code folder
    # whose logits are the hard-masked model's
    assert main(["compact", str(save / "latest-rank0.pt"), "--out", str(tmp_path / "compact.pt")]) == 0
    assert main(["convert", "composer-to-hf", str(tmp_path / "compact.pt"), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert hf.num_parameters() == kept + config_params(gen.cfg) - full
    ids = torch.randint(0, gen.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, trainer.state.model.model(ids, hard), atol=1e-5, rtol=0)
    trainer.close()

    # resuming from batch 20 continues exactly: the same hypernetwork and the same frozen LLM
    again = build(data_dir, tmp_path / "again", f"load_path={save / 'ep0-ba20-rank0.pt'}")
    again.fit()
    resumed = {k: v for k, v in again.state.model.mask_generator.state_dict().items() if torch.is_tensor(v)}
    assert resumed.keys() == final_gen.keys()
    assert all(torch.equal(v, final_gen[k]) for k, v in resumed.items())
    assert all(torch.equal(v, initial[k]) for k, v in weights(again).items())
    again.close()
