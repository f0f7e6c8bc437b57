"""Sharded checkpoints (`fsdp_config.state_dict_type: sharded`): read by every command, resumed, guarded.

Fast tests build torch.distributed.checkpoint folders in one process (`dcp.save(no_dist=True)`, the
layout Composer writes: `state.model`, `state.optimizers`, `rng`). The slow ones train the tiny
configs under `composer -n 2` with FSDP2 on CPU: scripts/prune.sh compacts the sharded checkpoint
`latest-rank0.pt` links to; the same run saved sharded and saved full compacts to the same model; a
sharded checkpoint of 2 ranks (continued pretraining: no per-rank mask noise) resumes through
`load_path` on 1 rank with the same samples and the same losses to rounding.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp

from drprune.cli import main as drprune
from drprune.convert.checkpoint import decoder_checkpoint_state, load_any_decoder, load_model_state
from drprune.data.testing import write_synthetic_mds
from drprune.errors import UserError
from drprune.resume import check_resume_source
from drprune.train import main as train_main
from tests.test_compact import random_decoder
from tests.test_compact_cli import CFG, IDS, pruning_lm

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "prune.yaml")
CONTINUE = str(ROOT / "configs" / "tiny" / "continue_pretrain.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "FSDP_VERSION": "2"}


def composer_state(model_state: dict, world_size: int = 2) -> dict:
    """What Composer saves: the model, optimizer state (never needed to compact), metadata, RNG."""
    optim = {k: {"exp_avg": torch.ones_like(v)} for k, v in model_state.items() if torch.is_tensor(v)}
    return {"state": {"model": model_state, "optimizers": {"DecoupledAdamW": {"state": optim}},
                      "metadata": {"world_size": world_size}}, "rng": [{"torch": torch.get_rng_state()}]}


def save_sharded(state: dict, folder: Path) -> Path:
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    return folder


def save_full(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


def test_a_sharded_folder_reads_as_the_full_checkpoint_and_compacts_to_the_same_model(tmp_path):
    lm = pruning_lm()
    state = composer_state(lm.state_dict())
    save_sharded(state, tmp_path / "run" / "ep0-ba2")
    (tmp_path / "run" / "latest-rank0.pt").symlink_to("ep0-ba2")
    save_full(state, tmp_path / "full.pt")

    sharded, full = load_model_state(tmp_path / "run" / "ep0-ba2"), load_model_state(tmp_path / "full.pt")
    assert sorted(sharded) == sorted(full) and len(full) == len(lm.state_dict())  # the model only
    for key, value in full.items():
        assert torch.equal(sharded[key], value) if torch.is_tensor(value) else sharded[key] == value, key

    assert drprune(["compact", str(tmp_path / "full.pt"), "--out", str(tmp_path / "from-full.pt")]) == 0
    assert drprune(["compact", str(tmp_path / "run" / "ep0-ba2")]) == 0  # default: pruned-ep0-ba2.pt beside it
    assert drprune(["compact", str(tmp_path / "run" / "latest-rank0.pt")]) == 0  # the link to the folder
    expected = load_model_state(tmp_path / "from-full.pt")
    for out in ("pruned-ep0-ba2.pt", "pruned-latest-rank0.pt"):
        got = load_model_state(tmp_path / "run" / out)
        tensors = [k for k in expected if torch.is_tensor(expected[k])]
        assert [got[k].shape for k in tensors] == [expected[k].shape for k in tensors]
        assert max((got[k] - expected[k]).abs().max().item() for k in tensors) <= 1e-6
    small = load_any_decoder(tmp_path / "run" / "pruned-ep0-ba2.pt")
    with torch.no_grad():
        assert torch.allclose(small(IDS), lm.model(IDS, lm.mask_generator.hard_masks()), atol=1e-5, rtol=0)


def test_every_command_reads_a_sharded_folder_through_the_same_loader(tmp_path):
    decoder = random_decoder(CFG)
    folder = save_sharded(composer_state(decoder_checkpoint_state(decoder)), tmp_path / "ep0-ba4")
    assert drprune(["convert", "composer-to-hf", str(folder), str(tmp_path / "hf")]) == 0
    save_full(composer_state(decoder_checkpoint_state(decoder)), tmp_path / "full.pt")
    assert drprune(["convert", "composer-to-hf", str(tmp_path / "full.pt"), str(tmp_path / "hf-full")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (tmp_path / "hf-full" / "model.safetensors"
                                                                     ).read_bytes()
    with torch.no_grad():  # eval, oneshot and model.path load through load_any_decoder / load_model_state
        assert torch.equal(load_any_decoder(folder)(IDS), decoder(IDS))


def test_a_broken_sharded_folder_is_one_clear_error(tmp_path, capsys):
    def fails(folder: Path, message: str, *extra: str) -> None:
        assert drprune(["compact", str(folder), "--out", str(tmp_path / "out.pt"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("drprune: error:") == 1, err
        assert not (tmp_path / "out.pt").exists()

    state = composer_state(pruning_lm().state_dict())
    killed = save_sharded(state, tmp_path / "killed")
    (killed / ".metadata").unlink()
    fails(killed, "has no .metadata, which is written last: the run was killed while saving it")

    short = save_sharded(state, tmp_path / "short")
    shard = short / "__0_0.distcp"
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    fails(short, f"is incomplete: __0_0.distcp has {size // 2} bytes of {size}")

    hostile = save_sharded(state, tmp_path / "hostile")
    (hostile / ".metadata").write_bytes(pickle.dumps(SimpleNamespace(x=1)))  # a global beyond the metadata classes
    fails(hostile, "names types.SimpleNamespace, which is not part of a checkpoint's metadata")

    custom = save_sharded(composer_state({**pruning_lm().state_dict(), "model._extra_state": {"x": Path("p")}}),
                          tmp_path / "custom")  # a value only full unpickling builds
    fails(custom, "--trust-pickle")


def test_a_checkpoint_of_the_other_layout_is_refused_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    data = write_synthetic_mds(tmp_path / "data", {"a": "random", "b": "random"}, seq_len=64, vocab_size=49152,
                               n_train=8, n_eval=2)
    state = composer_state({})
    folder, file = save_sharded(state, tmp_path / "ep0-ba2"), save_full(state, tmp_path / "ep0-ba2-rank0.pt")
    common = [TINY, f"data_local={data}", "callbacks.data_loading.set_names=[a,b]", f"save_folder={tmp_path / 'run'}"]

    assert train_main([*common, f"load_path={folder}"]) == 2
    assert "is a sharded checkpoint folder, which Composer loads only into a sharded run: set " \
           "fsdp_config.state_dict_type=sharded" in capsys.readouterr().err
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert train_main([*common, f"load_path={file}", "fsdp_config.state_dict_type=sharded"]) == 2
    assert "is a checkpoint file, but this run loads sharded checkpoint folders (fsdp_config.state_dict_type: " \
           "sharded): set fsdp_config.state_dict_type=full" in capsys.readouterr().err
    (folder / ".metadata").unlink()
    assert train_main([*common, f"load_path={folder}", "fsdp_config.state_dict_type=sharded"]) == 2
    assert "load_path: sharded checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sharded", [True, False])
def test_a_change_of_world_size_is_named(tmp_path, caplog, sharded):
    def resume(saved_world_size: int) -> str:
        state = composer_state({"model.w": torch.zeros(3)}, saved_world_size)
        name = f"ws{saved_world_size}"
        path = save_sharded(state, tmp_path / name) if sharded else save_full(state, tmp_path / f"{name}.pt")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="drprune.resume"):
            check_resume_source(SimpleNamespace(save_folder=None, autoresume=False, run_name=None,
                                                load_path=str(path)), sharded_state_dict=sharded)
        return caplog.text

    assert "written by 4 ranks, on 1: model and optimizer state are resharded" in resume(4)  # this process: 1 rank
    assert resume(1) == ""


def test_autoresume_checks_what_latest_links_to(tmp_path):
    save_sharded(composer_state({}), tmp_path / "tiny-prune" / "ep0-ba2")
    (tmp_path / "tiny-prune" / "latest-rank0.pt").symlink_to("ep0-ba2")
    run = SimpleNamespace(save_folder=str(tmp_path / "{run_name}"), autoresume=True, run_name="tiny-prune",
                          load_path=None)
    with pytest.raises(UserError, match="latest-rank0.pt is a sharded checkpoint folder"):
        check_resume_source(run, sharded_state_dict=False)
    check_resume_source(run, sharded_state_dict=True)


# ---------------------------------------------------------------- 2 ranks, FSDP2 (slow)

def train(record: Path, save: Path, data: Path, ranks: int, config: str, *extra: str) -> subprocess.CompletedProcess:
    args = [f"data_local={data}", "callbacks.data_loading.set_names=[a,b]", f"save_folder={save}", "precision=fp32",
            "fsdp_config.sharding_strategy=FULL_SHARD", "eval_interval=3ba", "save_interval=3ba",
            "save_num_checkpoints_to_keep=-1", "log_to_console=false", *extra]
    script = [str(ROOT / "tests" / "scripts" / "train_recorded.py"), str(record), config, *args]
    launcher = [str(Path(sys.executable).parent / "composer"), "-n", "2", "--stdout", f"{record}-out{{rank}}",
                "--stderr", f"{record}-err{{rank}}"] if ranks == 2 else [sys.executable]
    proc = subprocess.run([*launcher, *script], env=ENV, capture_output=True, text=True, timeout=600, cwd=ROOT)
    logs = "".join(p.read_text()[-3000:] for p in record.parent.glob(f"{record.name}-err*"))
    assert proc.returncode == 0, proc.stderr[-3000:] + logs
    return proc


def rows(record: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in Path(f"{record}-rank{rank}").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory) -> Path:
    """2-rank FSDP2 runs: scripts/prune.sh with sharded checkpoints (3 batches, compacted by the script);
    the same pruning run saved full; continued pretraining of the compact model, sharded (6 batches)."""
    root = tmp_path_factory.mktemp("fsdp2")
    data = write_synthetic_mds(root / "data", {"a": "repetitive", "b": "random"}, seq_len=64, vocab_size=49152,
                               n_train=160, n_eval=8)
    common = ["max_duration=3ba", "save_interval=3ba", "eval_interval=3ba", "log_to_console=false", "precision=fp32",
              "fsdp_config.sharding_strategy=FULL_SHARD"]
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "prune.sh"), str(data), "[a,b]", str(root / "prune"),
                           *common, "fsdp_config.state_dict_type=sharded"],
                          env={**ENV, "NPROC": "2", "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(root / "full", root / "full-run", data, 2, TINY, *common, "fsdp_config.state_dict_type=full")
    train(root / "continue", root / "continue-run", data, 2, CONTINUE, "max_duration=6ba",
          f"model.path={root / 'prune' / 'pruned-latest-rank0.pt'}", "fsdp_config.state_dict_type=sharded")
    return root


@pytest.mark.slow
def test_prune_sh_on_two_ranks_with_sharded_checkpoints_compacts_the_last_one(two_rank_runs):
    run = two_rank_runs / "prune"
    assert os.readlink(run / "latest-rank0.pt") == "ep0-ba3"
    assert sorted(p.name for p in (run / "ep0-ba3").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    small = load_any_decoder(run / "pruned-latest-rank0.pt").cfg
    assert (small.d_model, small.n_heads, small.n_layers, small.intermediate_size) == (48, 2, 3, 64)  # tiny's target


@pytest.mark.slow
def test_the_same_run_saved_sharded_and_full_compacts_to_the_same_model(two_rank_runs, tmp_path):
    folder, file = two_rank_runs / "prune" / "ep0-ba3", two_rank_runs / "full-run" / "ep0-ba3-rank0.pt"
    sharded, full = load_model_state(folder), load_model_state(file)
    assert sorted(sharded) == sorted(full)  # the same run, shard for shard
    assert all(torch.equal(sharded[k], v) for k, v in full.items() if torch.is_tensor(v))

    assert drprune(["compact", str(folder), "--out", str(tmp_path / "a.pt")]) == 0
    assert drprune(["compact", str(file), "--out", str(tmp_path / "b.pt")]) == 0
    b = load_model_state(tmp_path / "b.pt")
    tensors = [k for k in b if torch.is_tensor(b[k])]
    for compact in (tmp_path / "a.pt", two_rank_runs / "prune" / "pruned-latest-rank0.pt"):  # folder; prune.sh's
        a = load_model_state(compact)
        assert [a[k].shape for k in tensors] == [b[k].shape for k in tensors]
        assert max((a[k] - b[k]).abs().max().item() for k in tensors) <= 1e-6
        assert a["model._extra_state"]["model_config"] == b["model._extra_state"]["model_config"]


@pytest.mark.slow
def test_a_two_rank_sharded_checkpoint_resumes_on_one_rank(two_rank_runs, tmp_path):
    root = two_rank_runs
    proc = train(tmp_path / "one", tmp_path / "one-run", root / "data", 1, CONTINUE, "max_duration=6ba",
                 f"model.path={root / 'prune' / 'pruned-latest-rank0.pt'}", "fsdp_config.state_dict_type=sharded",
                 f"load_path={root / 'continue-run' / 'ep0-ba3'}")
    assert "written by 2 ranks, on 1" in proc.stderr
    resumed = rows(tmp_path / "one", 0)
    assert [r["batch"] for r in resumed] == [4, 5, 6]
    two = [rows(root / "continue", rank)[3:] for rank in (0, 1)]
    for row, r0, r1 in zip(resumed, *two):
        assert row["idx"] == r0["idx"] + r1["idx"]  # the same samples, in the same order
        assert abs(row["loss"] - (r0["loss"] + r1["loss"]) / 2) <= 1e-4 * abs(row["loss"])  # the same run, to rounding
