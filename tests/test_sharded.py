"""Sharded training equals DDP: the same tiny runs on 2 gloo ranks as DDP and as FSDP2 (FULL_SHARD and
SHARD_GRAD_OP) give the same per-step losses, the same Lagrange multipliers and the same compacted model.

Launched with `composer -n 2` exactly as users launch, through tests/scripts/train_recorded.py, which
records every batch's loss on every rank.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from drprune.cli import main as drprune
from drprune.convert.checkpoint import decoder_checkpoint_state, load_model_state, save_checkpoint
from drprune.data.testing import write_synthetic_mds
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PRUNE = str(ROOT / "configs" / "tiny" / "prune.yaml")
CONTINUE = str(ROOT / "configs" / "tiny" / "continue_pretrain.yaml")
SOURCE = dict(family="llama", vocab_size=49152, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
              intermediate_size=128, context_length=64, norm_eps=1e-5, tie_word_embeddings=True)
STEPS = 10
# Adam's eps: with the default 1e-8, rows of the tied 49k embedding whose tokens never occur get gradients of
# ~1e-9, where rounding-level differences between DDP's and FSDP's reductions flip signs that Adam turns into
# lr-sized steps: measured 7 of 2.4M embedding entries 2.7e-4 apart after 10 steps (mean 5e-8; every other
# tensor within 2.5e-6). 1e-6 puts that noise floor above those gradients, so the test compares the models.
ADAM_EPS = 1.0e-6
# how each run is sharded: (environment, overrides)
LAYOUTS = {
    "ddp": ({}, []),
    "fsdp2-full": ({"FSDP_VERSION": "2"}, ["fsdp_config.sharding_strategy=FULL_SHARD",
                                           "fsdp_config.state_dict_type=full"]),
    "fsdp2-grad-op": ({"FSDP_VERSION": "2"}, ["fsdp_config.sharding_strategy=SHARD_GRAD_OP",
                                              "fsdp_config.state_dict_type=full"]),
}
L0_DRO_KD = ["callbacks.data_loading.update_type=dro", "callbacks.data_loading.reference_loss=[9.0,9.0]",
             "distillation.kl_weight=0.5", "distillation.ce_weight=0.5"]
HYPERNETWORK = ["callbacks.data_loading.update_type=dro", "callbacks.data_loading.reference_loss=[9.0,9.0]",
                "model.mask_generator.name=hypernetwork", "model.mask_generator.target_ratio=0.5",
                "model.mask_generator.lr=1e-2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded")
    data = write_synthetic_mds(root / "data", {"a": "repetitive", "b": "random"}, seq_len=64, vocab_size=49152,
                               n_train=160, n_eval=8)
    torch.manual_seed(1)
    source = save_checkpoint(decoder_checkpoint_state(PrunableDecoder(ModelConfig(**SOURCE))), root / "source.pt")
    return {"root": root, "data": data, "source": source}


def train(world: dict[str, Path], name: str, layout: str, config: str, extra: list[str]) -> Path:
    """One 2-rank run; returns its save folder (the per-rank records sit beside it)."""
    env, sharding = LAYOUTS[layout]
    save = world["root"] / f"{name}-{layout}"
    record = world["root"] / f"{name}-{layout}.rec"
    args = [f"data_local={world['data']}", "callbacks.data_loading.set_names=[a,b]", f"save_folder={save}",
            f"max_duration={STEPS}ba", "eval_interval=5ba", f"save_interval={STEPS}ba", "log_to_console=false",
            "precision=fp32", f"optimizer.eps={ADAM_EPS}",
            *extra, *sharding]
    cmd = [str(Path(sys.executable).parent / "composer"), "-n", "2", "--stdout", f"{record}-out{{rank}}",
           "--stderr", f"{record}-err{{rank}}", str(ROOT / "tests" / "scripts" / "train_recorded.py"), str(record),
           config, *args]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True,
                          timeout=900)
    logs = "".join(p.read_text()[-3000:] for p in sorted(world["root"].glob(f"{record.name}-err*")))
    assert proc.returncode == 0, f"{name} {layout}: {proc.stderr[-2000:]}{logs}"
    return save


def losses(save: Path) -> list[list[float]]:
    """Per rank, the total loss of every batch."""
    return [[json.loads(line)["loss"] for line in Path(f"{save}.rec-rank{rank}").read_text().splitlines()]
            for rank in range(2)]


def sharding_layout(save: Path, rank: int = 0) -> dict[str, dict[str, int]]:
    """Per child of the model (model, mask_generator, teacher): its sharded and plain fp32 parameter counts."""
    return json.loads(Path(f"{save}.rec-rank{rank}-layout").read_text())


def assert_sharded_as_designed(runs: dict[str, Path]) -> None:
    """Under FSDP2 the decoder (and teacher) are sharded; the mask generator stays whole fp32 on every rank."""
    for layout_name, save in runs.items():
        for rank in range(2):
            children = sharding_layout(save, rank)
            for name, counts in children.items():
                sharded = layout_name != "ddp" and name != "mask_generator"
                assert counts["sharded"] == (counts["total"] if sharded else 0), (layout_name, rank, name)
                if name == "mask_generator":
                    assert counts["plain_fp32"] == counts["total"], (layout_name, rank)


def final_state(save: Path) -> dict[str, torch.Tensor]:
    return load_model_state(save / f"ep0-ba{STEPS}-rank0.pt", trust_pickle=True)


def compacted(save: Path) -> dict[str, torch.Tensor]:
    out = save / "compact.pt"
    assert drprune(["compact", str(save / f"ep0-ba{STEPS}-rank0.pt"), "--out", str(out), "--trust-pickle"]) == 0
    return {k: v for k, v in load_model_state(out).items() if torch.is_tensor(v)}


def assert_same_training(runs: dict[str, Path], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """Per-step losses within 1e-4 relative; the mask generator's final state within 1e-4; returns final states."""
    reference = losses(runs["ddp"])
    assert all(len(rank) == STEPS for rank in reference)
    states = {layout: final_state(save) for layout, save in runs.items()}
    for layout, save in runs.items():
        got = losses(save)
        for rank in range(2):
            assert got[rank] == pytest.approx(reference[rank], rel=1e-4), (layout, rank)
        for key, value in states["ddp"].items():
            if key.startswith(prefix) and torch.is_tensor(value):
                assert torch.allclose(states[layout][key], value, atol=1e-4, rtol=0), (layout, key)
    return states


def assert_same_compact_model(runs: dict[str, Path]) -> None:
    models = {layout: compacted(save) for layout, save in runs.items()}
    for layout, model in models.items():
        assert model.keys() == models["ddp"].keys()
        for key, value in models["ddp"].items():
            assert model[key].shape == value.shape, (layout, key)
            assert float((model[key].float() - value.float()).abs().max()) <= 1e-4, (layout, key)


@pytest.fixture(scope="module")
def l0_runs(world) -> dict[str, Path]:
    extra = [f"model.path={world['source']}", f"distillation.teacher={world['source']}", *L0_DRO_KD]
    return {layout: train(world, "l0", layout, PRUNE, extra) for layout in LAYOUTS}


def assert_loaded_once(runs: dict[str, Path]) -> None:
    """Under FSDP rank 1 read no weights and started on the meta device (equal losses with DDP then prove
    that rank 0's broadcast gave it the student's and the teacher's weights); under DDP it loads them."""
    for layout, save in runs.items():
        log = Path(f"{save}.rec-err1").read_text()  # rank 0 logs to the launcher's own stderr
        assert ("arrive from rank 0" in log) == (layout != "ddp"), layout
        assert ("loaded weights from" in log) == (layout == "ddp"), layout


def test_l0_dro_distillation_matches_ddp(l0_runs):
    assert_loaded_once(l0_runs)
    assert_sharded_as_designed(l0_runs)
    assert {"model", "mask_generator", "teacher"} <= set(sharding_layout(l0_runs["fsdp2-full"]))
    states = assert_same_training(l0_runs, "mask_generator.")
    lambdas = {k: float(v) for k, v in states["fsdp2-full"].items() if ".lambda_" in k}
    assert lambdas and any(abs(v) > 1e-3 for v in lambdas.values())  # the multipliers moved
    for layout, state in states.items():
        assert not [k for k in state if k.startswith("teacher")], layout
    for layout, save in l0_runs.items():  # under FSDP2 no teacher weight stays gathered between steps
        gathered = {json.loads(line)["teacher_gathered"] for rank in range(2)
                    for line in Path(f"{save}.rec-rank{rank}").read_text().splitlines()}
        assert (gathered == {0}) == (layout != "ddp"), (layout, gathered)
    assert_same_compact_model(l0_runs)


def test_hypernetwork_with_a_frozen_llm_matches_ddp(world):
    extra = [f"model.path={world['source']}", *HYPERNETWORK]
    runs = {layout: train(world, "hyper", layout, PRUNE, extra) for layout in LAYOUTS}
    assert_sharded_as_designed(runs)
    states = assert_same_training(runs, "mask_generator.")
    source = load_model_state(world["source"])
    for layout, state in states.items():  # the LLM stays frozen under sharding too
        assert torch.equal(state["model.transformer.wte.weight"], source["model.transformer.wte.weight"]), layout
    assert_same_compact_model(runs)


def test_continued_pretraining_of_a_compacted_model_matches_ddp(world, l0_runs):
    student = l0_runs["ddp"] / "compact.pt"
    if not student.exists():
        compacted(l0_runs["ddp"])
    extra = [f"model.path={student}", f"distillation.teacher={world['source']}", "distillation.kl_weight=0.5"]
    runs = {layout: train(world, "continue", layout, CONTINUE, extra) for layout in LAYOUTS}
    assert_sharded_as_designed(runs)
    states = assert_same_training(runs, "model.")
    for layout, state in states.items():
        for key, value in states["ddp"].items():
            if torch.is_tensor(value):
                assert float((state[key].float() - value.float()).abs().max()) <= 1e-4, (layout, key)
