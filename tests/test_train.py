"""Pruning runs of the tiny config through the real Composer Trainer on CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from composer.loggers import InMemoryLogger
from composer.utils import dist

import drprune.train
from drprune.data.testing import write_synthetic_mds
from drprune.masks.base import MaskSet
from drprune.run_config import RunConfig
from drprune.train import _batch_sizes, build_trainer, load_config, main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "prune.yaml")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_synthetic_mds(tmp_path_factory.mktemp("mds") / "data", {"a": "repetitive", "b": "random"},
                               seq_len=64, vocab_size=49152, n_train=160, n_eval=8)


def overrides(data_dir: Path, save: Path, *extra: str) -> list[str]:
    return [f"data_local={data_dir}", "callbacks.data_loading.set_names=[a,b]", f"save_folder={save}",
            "loggers.inmemory={}", *extra]


def run(args: list[str]):
    trainer = build_trainer(load_config(TINY, args))
    trainer.fit()
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    return trainer, memory


def test_pruning_run_learns_prunes_and_resumes(tmp_path, data_dir):
    save = tmp_path / "run"
    trainer, memory = run(overrides(data_dir, save, "max_duration=20ba", "console_log_interval=1ba"))
    ce = [float(v) for _, v in memory.data["loss/train/ce_loss"]]
    assert sum(ce[-3:]) / 3 < sum(ce[:3]) / 3 - 0.5
    gen = trainer.state.model.mask_generator
    for module in ("head", "intermediate", "hidden", "layer"):
        # the Lagrangian pulls the expected sparsity to its target; in 20 steps it may overshoot (the 4 layer
        # gates often do), so the test is that it reached the target's neighbourhood, not where it ended
        path = [float(v) for _, v in memory.data[f"pruning/expected_sparsity/{module}"]]
        target = gen.gates[module].target_sparsity
        assert min(abs(s - target) for s in path) < abs(path[0] - target) / 2, (module, path)
    assert (save / "latest-rank0.pt").exists() and (save / "zs_s20.safetensors").exists()
    masks = MaskSet.load(save / "zs_s20.safetensors")
    assert int((masks["hidden"] != 0).sum()) == 48 and int((masks["layer"] != 0).sum()) == 3
    final = {k: v.clone() for k, v in trainer.state.model.state_dict().items() if torch.is_tensor(v)}
    trainer.close()

    # autoresume picks up the latest checkpoint and continues to the new duration
    resumed, _ = run(overrides(data_dir, save, "max_duration=24ba", "autoresume=true"))
    assert int(resumed.state.timestamp.batch) == 24
    resumed.close()

    # resuming from batch 10 reproduces the uninterrupted run exactly
    again, _ = run(overrides(data_dir, tmp_path / "again", "max_duration=20ba",
                             f"load_path={save / 'ep0-ba10-rank0.pt'}"))
    for key, value in again.state.model.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, final[key]), key
    again.close()


@pytest.mark.parametrize("extra,message", [
    (["model.mask_generator.target_model.n_heads=3"], "whole number of GQA groups"),
    (["model.mask_generator.target_model.d_model=512"], "larger than the source"),
    (["model.mask_generator.pruning_modules=[head,attention]"], "unknown modules"),
    (["global_train_batch_size=3", "model.mask_generator.target_model.n_layers=9"], "larger than the source"),
])
def test_bad_configs_fail_before_training(tmp_path, data_dir, capsys, extra, message):
    save = tmp_path / "run"
    assert main([TINY, *overrides(data_dir, save, *extra)]) == 2
    assert message in capsys.readouterr().err
    assert not save.exists()


def test_missing_required_key_is_named(tmp_path, capsys):
    assert main([TINY, f"save_folder={tmp_path}", "callbacks.data_loading.set_names=[a]"]) == 2
    assert "data_local is required" in capsys.readouterr().err


@pytest.mark.parametrize("world,batch,micro,per_rank", [
    (2, 16, 4, 8),  # two microbatches of 4 on each rank
    (4, 24, 3, 6),
    (2, 4, 4, 2),  # a microbatch beyond a rank's share is one microbatch (how the 2-rank tiny runs go)
])
def test_batch_sizes_per_rank(monkeypatch, world, batch, micro, per_rank):
    monkeypatch.setattr(dist, "get_world_size", lambda: world)
    run = RunConfig.from_cfg(load_config(TINY, overrides(Path("/nonexistent"), Path("/nonexistent/save"),
                                                         f"global_train_batch_size={batch}",
                                                         f"device_train_microbatch_size={micro}")))
    assert _batch_sizes(run) == (per_rank, 4)  # the tiny config's device_eval_batch_size


@pytest.mark.parametrize("world,batch,micro,message", [
    (2, 12, 4, "global_train_batch_size=12 is not divisible by the world size 2 times device_train_microbatch_size=4: "
               "each rank's 6 samples would end in a short microbatch; use a global batch that is a multiple of 8"),
    (4, 40, 4, "multiple of 16, or a microbatch that divides 10"),
    (3, 4, 4, "global_train_batch_size=4 is not divisible by the world size 3"),
])
def test_a_batch_not_split_into_whole_microbatches_fails_before_the_model(tmp_path, data_dir, capsys, monkeypatch,
                                                                         world, batch, micro, message):
    def built(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(dist, "get_world_size", lambda: world)
    monkeypatch.setattr(drprune.train, "build_mask_generator", built)
    monkeypatch.setattr(drprune.train, "PrunableLM", built)
    save = tmp_path / "run"
    args = overrides(data_dir, save, f"global_train_batch_size={batch}", f"device_train_microbatch_size={micro}")
    assert main([TINY, *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("drprune: error:")]
    assert len(lines) == 1 and message in lines[0], lines
    assert not save.exists()


def test_two_process_run_with_composer_launcher(tmp_path, data_dir):
    save = tmp_path / "run2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = Path(sys.executable).parent / "composer"
    cmd = [str(launcher), "-n", "2", "--stdout", str(tmp_path / "out{rank}.txt"),
           "--stderr", str(tmp_path / "err{rank}.txt"), str(ROOT / "drprune" / "train.py"), TINY,
           *overrides(data_dir, save, "max_duration=6ba", "save_interval=6ba", "eval_interval=3ba")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in tmp_path.glob("err*.txt"))
    assert proc.returncode == 0, proc.stderr[-3000:] + logs[-3000:]
    assert (save / "ep0-ba6-rank0.pt").exists()


def test_activation_checkpointing_without_fsdp_trains_identically(tmp_path, data_dir):
    """`activation_checkpointing=true` on one process: every block is wrapped (Composer's apply_ac), the
    losses, masks and saved weights equal the plain run's, and the checkpoint's keys are the same."""
    runs = {}
    for name, extra in (("plain", []), ("ckpt", ["activation_checkpointing=true"])):
        trainer, memory = run(overrides(data_dir, tmp_path / name, "max_duration=6ba", "console_log_interval=1ba",
                                        *extra))
        wrapped = [m for m in trainer.state.model.modules() if type(m).__name__ == "CheckpointWrapper"]
        runs[name] = ([float(v) for _, v in memory.data["loss/train/total"]], len(wrapped),
                      drprune.train.load_model_state(str(tmp_path / name / "latest-rank0.pt"), trust_pickle=True))
        trainer.close()
    (plain_losses, plain_wrapped, plain_state), (losses, wrapped, state) = runs["plain"], runs["ckpt"]
    assert plain_wrapped == 0 and wrapped == 4  # the tiny config's 4 blocks
    assert losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-6)
    assert state.keys() == plain_state.keys()
    for key, value in plain_state.items():
        if torch.is_tensor(value) and value.is_floating_point():
            assert torch.allclose(state[key], value, rtol=1e-4, atol=1e-6), key


def test_activation_checkpointing_keeps_fewer_activations():
    """What the forward saves for backward: with every block checkpointed, less than a third of it."""
    from drprune.masks.l0 import L0MaskGenerator
    from drprune.models.composer_model import PrunableLM
    from drprune.models.config import ModelConfig
    from drprune.parallel import plan_sharding, prepare_model

    cfg = ModelConfig(family="llama", vocab_size=97, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                      intermediate_size=128)
    batch = {"input_ids": torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(0))}
    batch["labels"] = batch["input_ids"]
    saved = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = PrunableLM(cfg, L0MaskGenerator(cfg, pruning_modules=["head", "intermediate"],
                                                target_model={"n_heads": 2, "intermediate_size": 64}))
        prepare_model(model, plan_sharding(None, has_mask_generator=True, activation_checkpointing=checkpointing))
        sizes: list[int] = []

        def pack(t: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.loss(model(batch), batch)["total"].backward()
        saved[checkpointing] = sum(sizes)
    assert saved[True] < saved[False] / 3, saved
