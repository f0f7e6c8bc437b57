"""Hashes are verified by one process per node, and every rank stops with the same error when one fails."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from composer.utils import dist

from drprune.convert.checkpoint import decoder_checkpoint_state, load_model_state, save_checkpoint
from drprune.data.loaders import validate_data_config
from drprune.data.testing import write_synthetic_mds
from drprune.errors import ConfigError, UserError
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder
from drprune.node_checks import agreed
from drprune.run_config import RunConfig
from drprune.train import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "prune.yaml")


def flip(path: Path, at: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_only_the_node_leader_is_told_to_verify(monkeypatch):
    seen = []
    for local_rank in (0, 1):
        monkeypatch.setattr(dist, "get_local_rank", lambda r=local_rank: r)
        assert agreed(lambda leader: seen.append(leader) or "ok") == "ok"
    assert seen == [True, False]
    with pytest.raises(ConfigError, match="bad key"):
        agreed(lambda leader: (_ for _ in ()).throw(ConfigError("bad key")))


def test_a_checkpoint_is_hashed_only_when_asked(tmp_path):
    cfg = ModelConfig(family="llama", vocab_size=64, d_model=16, n_layers=1, n_heads=2, intermediate_size=32)
    path = save_checkpoint(decoder_checkpoint_state(PrunableDecoder(cfg)), tmp_path / "m.pt")
    state = {k: v.clone() for k, v in load_model_state(path).items() if torch.is_tensor(v)}  # not the mapped file
    name = "model.transformer.blocks.0.mlp.up_proj.weight"
    blob = bytearray(path.read_bytes())
    raw = state[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    at = bytes(blob).index(raw[:64])
    blob[at + 5] ^= 0xFF  # one byte of one tensor: the zip container stays valid, the checksum does not
    path.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="checksum|corrupt"):
        load_model_state(path)
    assert not torch.equal(load_model_state(path, verify=False)[name], state[name])  # read, unverified


def test_shard_hashes_are_checked_only_when_asked(tmp_path):
    data = write_synthetic_mds(tmp_path / "data", {"a": "random"}, seq_len=64, vocab_size=500, n_train=32, n_eval=4)
    flip(next((data / "train" / "a").glob("shard.*.mds")), 0.5)
    run = RunConfig.from_cfg(load_config(TINY, [f"data_local={data}", "callbacks.data_loading.set_names=[a]",
                                                f"save_folder={tmp_path / 'run'}"]))
    with pytest.raises(UserError, match="hash does not match"):
        validate_data_config(run.data)
    validate_data_config(run.data, hashes=False)  # sizes still checked; the leader hashes


def _two_ranks(rank: int, init: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)

    def check(leader: bool) -> None:
        if not leader:  # only rank 1 finds the problem; rank 0 must not go on alone
            raise UserError("shard x.mds is corrupted")

    try:
        agreed(check)
        message = "no error"
    except UserError as err:
        message = f"{type(err).__name__}: {err}"
    Path(f"{out}{rank}").write_text(message)
    torch.distributed.destroy_process_group()


def test_every_rank_raises_the_error_one_rank_found(tmp_path):
    mp.spawn(_two_ranks, args=(f"file://{tmp_path / 'store'}", str(tmp_path / "out")), nprocs=2, join=True)
    assert [(tmp_path / f"out{r}").read_text() for r in range(2)] == ["UserError: shard x.mds is corrupted"] * 2
