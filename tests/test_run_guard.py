"""save_folder guards (drprune.run_guard) and fresh-run reproducibility, through the real trainer where it matters."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from composer.loggers import InMemoryLogger

from drprune.data.testing import write_synthetic_mds
from drprune.errors import UserError
from drprune.run_config import RunConfig
from drprune.run_guard import FINGERPRINT_FILE, LATEST, LOCK_FILE, RunLock, guard_save_folder, repair_checkpoints
from drprune.train import build_trainer, load_config, main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "prune.yaml")


def cfg(save: Path, **extra):
    base = {"save_folder": str(save), "seed": 17, "global_train_batch_size": 4, "max_seq_len": 64,
            "model": {"mask_generator": {"name": "l0", "target_model": {"d_model": 48, "n_layers": 3}}}}
    return RunConfig.from_cfg({**base, "max_duration": "1ba", **extra})


def checkpoint(path: Path, truncate: bool = False) -> Path:
    torch.save({"state": {"model": {"w": torch.arange(1000.0)}}}, path)
    if truncate:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def test_a_second_run_on_a_locked_folder_refuses_and_a_dead_runs_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from drprune.run_guard import RunLock; "
         "RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by another run \\(pid {holder.pid} "):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert str(holder.pid) in (tmp_path / LOCK_FILE).read_text()  # a SIGKILLed owner leaves its file
    lock = RunLock(tmp_path)
    lock.acquire()
    assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_FILE).read_text()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_half_written_and_unpublished_checkpoints_are_set_aside(tmp_path, monkeypatch):
    checkpoint(tmp_path / "ep0-ba3-rank0.pt")
    checkpoint(tmp_path / "ep0-ba5-rank0.pt")
    (tmp_path / LATEST).symlink_to("ep0-ba5-rank0.pt")
    checkpoint(tmp_path / "ep0-ba6-rank0.pt", truncate=True)
    monkeypatch.chdir(tmp_path.parent)  # a relative save_folder, as users give it
    assert repair_checkpoints(Path(tmp_path.name)) == Path(tmp_path.name) / "ep0-ba5-rank0.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ep0-ba3-rank0.pt", "ep0-ba5-rank0.pt", "ep0-ba6-rank0.pt.partial", LATEST]

    # `latest` itself broken (e.g. a power cut after the link): back to the newest complete checkpoint
    checkpoint(tmp_path / "ep0-ba5-rank0.pt", truncate=True)
    assert repair_checkpoints(tmp_path) == tmp_path / "ep0-ba3-rank0.pt"
    assert os.readlink(tmp_path / LATEST) == "ep0-ba3-rank0.pt"
    assert (tmp_path / "ep0-ba5-rank0.pt.partial").is_file()


def sharded(folder: Path, unfinished: bool = False) -> Path:
    """A sharded checkpoint folder as Composer writes it (torch.distributed.checkpoint, `.metadata` last)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"state": {"model": {"w": torch.arange(1000.0)}}}, storage_writer=dcp.FileSystemWriter(str(folder)),
             no_dist=True)
    if unfinished:
        (folder / ".metadata").unlink()
    return folder


def test_half_written_and_unpublished_sharded_checkpoints_are_set_aside(tmp_path):
    sharded(tmp_path / "ep0-ba3")
    sharded(tmp_path / "ep0-ba5")
    (tmp_path / LATEST).symlink_to("ep0-ba5")
    sharded(tmp_path / "ep0-ba6", unfinished=True)  # killed before the coordinator wrote .metadata
    assert repair_checkpoints(tmp_path) == tmp_path / "ep0-ba5"
    sharded(tmp_path / "ep0-ba7")  # whole, but killed before `latest` was re-linked to it
    assert repair_checkpoints(tmp_path) == tmp_path / "ep0-ba5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep0-ba3", "ep0-ba5", "ep0-ba6.partial", "ep0-ba7.partial",
                                                          LATEST]
    sharded(tmp_path / "ep0-ba6", unfinished=True)  # killed at the same checkpoint again: the older partial goes
    assert repair_checkpoints(tmp_path) == tmp_path / "ep0-ba5"
    assert not (tmp_path / "ep0-ba6.partial" / ".metadata").exists() and not (tmp_path / "ep0-ba6").exists()

    # the folder `latest` links to lost a shard: back to the newest whole checkpoint
    os.truncate(tmp_path / "ep0-ba5" / "__0_0.distcp", 100)
    assert repair_checkpoints(tmp_path) == tmp_path / "ep0-ba3"
    assert os.readlink(tmp_path / LATEST) == "ep0-ba3" and (tmp_path / "ep0-ba5.partial").is_dir()
    with pytest.raises(UserError, match=r"already holds checkpoints of an earlier run \(ep0-ba3\)"):
        guard_save_folder(cfg(tmp_path), [])


def test_rerun_into_a_folder_with_checkpoints_needs_autoresume(tmp_path):
    checkpoint(tmp_path / "ep0-ba5-rank0.pt")
    with pytest.raises(UserError, match="already holds checkpoints of an earlier run \\(ep0-ba5-rank0.pt\\): "
                                        "pass autoresume=true"):
        guard_save_folder(cfg(tmp_path), [])
    assert not (tmp_path / LOCK_FILE).exists()
    guard_save_folder(cfg(tmp_path, save_overwrite=True), [])[0].lock.release()


@pytest.mark.parametrize("change,message", [
    ({"global_train_batch_size": 8}, "global_train_batch_size: 4 -> 8"),
    ({"seed": 1}, "seed: 17 -> 1"),
    ({"model": {"mask_generator": {"target_model": {"d_model": 32}}}}, "mask_generator"),
])
def test_resuming_with_a_changed_config_is_refused_unless_allowed(tmp_path, change, message):
    [guard] = guard_save_folder(cfg(tmp_path), ["a", "b"])
    guard.fit_start(None, None)  # writes the fingerprint as a starting run does
    guard.lock.release()
    checkpoint(tmp_path / "ep0-ba5-rank0.pt")
    (tmp_path / LATEST).symlink_to("ep0-ba5-rank0.pt")
    with pytest.raises(UserError, match=f"changed config \\(.*{message}"):
        guard_save_folder(cfg(tmp_path, autoresume=True, **change), ["a", "b"])
    guard_save_folder(cfg(tmp_path, autoresume=True), ["a", "b"])[0].lock.release()  # unchanged: fine
    guard_save_folder(cfg(tmp_path, autoresume=True, allow_config_change=True, **change), ["a", "b"])[0].lock.release()
    assert (tmp_path / FINGERPRINT_FILE).is_file()


# ---------------------------------------------------------------- through the real trainer

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_synthetic_mds(tmp_path_factory.mktemp("mds") / "data", {"a": "repetitive", "b": "random"},
                               seq_len=64, vocab_size=49152, n_train=80, n_eval=4)


def args(data_dir: Path, save: Path, *extra: str) -> list[str]:
    return [f"data_local={data_dir}", "callbacks.data_loading.set_names=[a,b]", f"save_folder={save}",
            "loggers.inmemory={}", "callbacks.data_loading.update_type=dro",
            "callbacks.data_loading.reference_loss=[9.0,9.0]", "eval_interval=3ba", "save_interval=3ba",
            "max_duration=6ba", "log_to_console=false", *extra]


def losses(arguments: list[str]) -> list[float]:
    trainer = build_trainer(load_config(TINY, arguments))
    trainer.fit()
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    trainer.close()
    return [float(v) for _, v in memory.data["loss/train/total"]]


@pytest.mark.parametrize("generator", [[], ["model.mask_generator.name=hypernetwork",
                                            "model.mask_generator.target_ratio=0.5"]], ids=["l0", "hypernetwork"])
def test_two_fresh_runs_with_one_seed_are_bit_identical(tmp_path, data_dir, generator):
    first = losses(args(data_dir, tmp_path / "a", "max_duration=4ba", *generator))
    torch.rand(7)  # whatever ran before in this process must not matter
    second = losses(args(data_dir, tmp_path / "b", "max_duration=4ba", *generator))
    assert len(first) == 4 and first == second


def test_autoresume_sets_a_half_written_checkpoint_aside_and_resumes(tmp_path, data_dir, capsys):
    save = tmp_path / "run"
    full = losses(args(data_dir, save))
    assert main([TINY, *args(data_dir, save)]) == 2  # checkpoints there, no autoresume
    assert "pass autoresume=true to continue it" in capsys.readouterr().err
    # a run killed while writing its batch-9 checkpoint: truncated file beside latest -> ba6
    (save / "ep0-ba9-rank0.pt").write_bytes((save / "ep0-ba6-rank0.pt").read_bytes()[:5000])
    resumed = losses(args(data_dir, save, "autoresume=true", "max_duration=9ba"))
    assert len(full) == 6 and len(resumed) == 3
    assert (save / "ep0-ba9-rank0.pt.partial").stat().st_size == 5000
    assert os.readlink(save / LATEST) == "ep0-ba9-rank0.pt" and (save / "ep0-ba9-rank0.pt").stat().st_size > 5000
    assert not (save / LOCK_FILE).exists()
