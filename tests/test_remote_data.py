"""Training from a remote copy of the prepared data (here another local folder) through an empty cache."""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from composer import Callback
from composer.loggers import InMemoryLogger
from streaming import MDSWriter

import drprune.data.remote as remote
import drprune.data.shards as shards
import drprune.train
from drprune.atomic import TMP_PREFIX
from drprune.data.loaders import build_train_dataloader, fetch_data, validate_data_config
from drprune.data.shards import HASH_ALGO, ShardReader, columns
from drprune.data.testing import write_synthetic_mds
from drprune.errors import ConfigError, UserError
from drprune.node_checks import agreed
from drprune.run_config import RunConfig
from drprune.train import build_trainer, load_config, main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "prune.yaml")
VOCAB = 512  # the tiny config with a smaller vocabulary: fast steps


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Two domains of 320 rows in shards of about 12 rows, with a domains.json recording the tokenizer."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shards, "SIZE_LIMIT", 2048)
        root = write_synthetic_mds(tmp_path_factory.mktemp("remote") / "data", {"a": "repetitive", "b": "random"},
                                   seq_len=64, vocab_size=VOCAB, n_train=320, n_eval=8)
    (root / "domains.json").write_text(json.dumps({"train": ["a", "b"], "eval_only": [], "tokenizer": {
        "source": "synthetic", "vocab_size": VOCAB, "vocab_sha256": "0" * 64}}))
    return root


def shard_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("shard.*.mds"))


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def no_temp_left(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.startswith(TMP_PREFIX)]


class Record(Callback):
    """The global sample ids of every batch, in order."""

    def __init__(self):
        self.ids: list[list[int]] = []

    def after_dataloader(self, state, logger) -> None:
        self.ids.append(state.batch["idx"].tolist())


def train(data: list[str], save: Path, *extra: str) -> tuple[list[list[int]], list[float]]:
    args = [*data, "callbacks.data_loading.set_names=[a,b]", f"save_folder={save}", "loggers.inmemory={}",
            f"model.vocab_size={VOCAB}", "~eval_loader", "save_interval=2ba", "console_log_interval=1ba", *extra]
    trainer = build_trainer(load_config(TINY, args))
    record = Record()
    trainer.state.callbacks.append(record)
    trainer.fit()
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    losses = [float(v) for _, v in memory.data["loss/train/total"]]
    trainer.close()
    return record.ids, losses


def test_training_fetches_shards_on_demand_verifies_them_and_resumes_exactly(tmp_path, prepared, monkeypatch):
    ref_ids, ref_losses = train([f"data_local={prepared}"], tmp_path / "ref", "max_duration=4ba")
    assert len(ref_ids) == len(ref_losses) == 4 and len(set(ref_losses)) == 4

    verified: list[str] = []
    check = remote.check_bytes
    monkeypatch.setattr(remote, "check_bytes", lambda data, entry, *a: verified.append(entry["basename"])
                        or check(data, entry, *a))
    cache = tmp_path / "cache"
    source = [f"data_remote={prepared}", f"data_local={cache}"]
    ids, losses = train(source, tmp_path / "run", "max_duration=2ba")
    assert ids == ref_ids[:2] and losses == ref_losses[:2]

    # the cache holds exactly the shards of the samples read, plus the first of each domain (read by validation)
    sizes = [len(ShardReader(prepared / "train" / d)) for d in "ab"]
    for d, domain in enumerate("ab"):
        folder = cache / "train" / domain
        infos = json.loads((folder / "index.json").read_text())["shards"]
        starts = np.cumsum([0] + [info["samples"] for info in infos])
        rows = [i - sum(sizes[:d]) for batch in ids for i in batch if sum(sizes[:d]) <= i < sum(sizes[:d + 1])]
        read = {int(np.searchsorted(starts, r, side="right")) - 1 for r in rows}
        expected = sorted(infos[k]["raw_data"]["basename"] for k in read | {0})
        assert shard_names(folder) == expected, domain
        assert 1 < len(expected) < len(infos)  # on demand: some, not all
        for name in expected:
            assert (folder / name).read_bytes() == (prepared / "train" / domain / name).read_bytes()
    assert sorted(verified) == sorted(n for d in "ab" for n in shard_names(cache / "train" / d))
    assert no_temp_left(cache)

    # a cache that lost shards (another node's disk, a cleaned scratch folder) resumes onto the same samples
    for domain in "ab":
        for name in shard_names(cache / "train" / domain)[1:]:
            (cache / "train" / domain / name).unlink()
    ids, losses = train(source, tmp_path / "run", "max_duration=4ba", "autoresume=true")
    assert ids == ref_ids[2:] and losses == ref_losses[2:]


def test_a_missing_remote_is_named_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    def built(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(drprune.train, "build_mask_generator", built)
    monkeypatch.setattr(drprune.train, "PrunableLM", built)
    gone = tmp_path / "gone"
    assert main([TINY, f"data_remote={gone}", f"data_local={tmp_path / 'cache'}", f"save_folder={tmp_path / 'run'}",
                 "callbacks.data_loading.set_names=[a,b]"]) == 2
    err = capsys.readouterr().err
    assert f"cannot fetch {gone}/train/a/index.json" in err and "FileNotFoundError" in err
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "cache" / "train" / "a").exists()  # no empty folder left by the failed fetch


def test_an_unlisted_remote_without_set_names_asks_for_them(tmp_path, prepared):
    bare = tmp_path / "bare"
    shutil.copytree(prepared, bare)
    (bare / "domains.json").unlink()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "domains.json").write_text((prepared / "domains.json").read_text())  # stale
    run = RunConfig.from_cfg(load_config(TINY, [f"data_remote={bare}", f"data_local={tmp_path / 'cache'}",
                                                "callbacks.data_loading.set_names=null", f"save_folder={tmp_path}/r"]))
    with pytest.raises(ConfigError, match=rf"set_names is required: data_remote={bare} has no domains.json"):
        fetch_data(run.data)
    assert not (tmp_path / "cache" / "domains.json").exists()


def cache_of(source: Path, cache: Path, *extra: str) -> RunConfig:
    return RunConfig.from_cfg(load_config(TINY, [f"data_remote={source}", f"data_local={cache}",
                                                 "callbacks.data_loading.set_names=[a,b]", f"save_folder={cache}-run",
                                                 *extra]))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupted_remote_shard_is_an_error_naming_it(tmp_path, prepared, damage):
    source = tmp_path / "remote"
    shutil.copytree(prepared, source)
    bad = source / "train" / "a" / "shard.00003.mds"
    if damage == "flip":
        flip(bad)
    else:
        bad.write_bytes(bad.read_bytes()[:-7])
    run = cache_of(source, tmp_path / "cache")
    fetch_data(run.data)
    validate_data_config(run.data)  # shard 3 is not fetched yet: it is verified when it arrives
    reader = ShardReader(tmp_path / "cache" / "train" / "a")
    first = sum(info["samples"] for info in reader.infos[:3])
    reader[first - 1]  # shard 2 is fine
    message = "xxh64 hash does not match" if damage == "flip" else "has 7 bytes fewer|bytes, but"
    with pytest.raises(UserError, match=message) as err:
        reader[first]
    assert f"shard.00003.mds fetched from {source}/train/a/shard.00003.mds" in str(err.value)
    assert not (tmp_path / "cache" / "train" / "a" / "shard.00003.mds").exists()
    assert no_temp_left(tmp_path / "cache")


def test_a_second_reader_reuses_the_cache_without_downloading(tmp_path, prepared, monkeypatch):
    run = cache_of(prepared, tmp_path / "cache")
    fetch_data(run.data)
    downloads: list[str] = []
    fetch = remote.CloudDownloader.direct_download
    monkeypatch.setattr(remote.CloudDownloader, "direct_download",
                        lambda url, local, timeout: downloads.append(url) or fetch(url, local, timeout))
    folder = tmp_path / "cache" / "train" / "b"
    first = ShardReader(folder)
    rows = [first[i]["tokens"].tolist() for i in range(len(first))]
    assert len(downloads) == len(first.infos) - 1  # shard 0 was fetched ahead by fetch_data
    second = ShardReader(folder)
    assert [second[i]["tokens"].tolist() for i in range(len(second))] == rows
    assert len(downloads) == len(first.infos) - 1
    source = ShardReader(prepared / "train" / "b")
    assert rows == [source[i]["tokens"].tolist() for i in range(len(source))]
    # a second run's sync fetches the index files again but keeps every verified shard
    downloads.clear()
    fetch_data(run.data)
    assert all(url.endswith((".json")) for url in downloads) and len(shard_names(folder)) == len(first.infos)


def test_fetch_data_fetches_indexes_first_shards_and_eval_ahead(tmp_path, prepared):
    cache = tmp_path / "cache"
    run = cache_of(prepared, cache)
    fetch_data(run.data, leader=False)
    assert not cache.exists()  # only the node's leader fetches
    fetch_data(run.data)
    assert (cache / "domains.json").read_text() == (prepared / "domains.json").read_text()
    for domain in "ab":
        assert shard_names(cache / "train" / domain) == ["shard.00000.mds"]
        assert json.loads((cache / "train" / domain / remote.REMOTE_FILE).read_text()) == {
            "remote": f"{prepared}/train/{domain}"}
    assert shard_names(cache / "eval" / "eval_merge") == shard_names(prepared / "eval" / "eval_merge")
    assert not (cache / "eval_merge").exists()  # the probe of data_remote/eval_merge left nothing behind
    validate_data_config(run.data)
    loader = build_train_dataloader(run.data, 4)
    assert len(loader.dataset.readers[0]) == len(ShardReader(prepared / "train" / "a"))


def test_a_remote_prepared_again_replaces_stale_cached_shards(tmp_path, prepared):
    source = tmp_path / "remote"
    shutil.copytree(prepared, source)
    run = cache_of(source, tmp_path / "cache")
    fetch_data(run.data)
    cached = tmp_path / "cache" / "train" / "a" / "shard.00000.mds"
    old = cached.read_bytes()
    shutil.rmtree(source)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shards, "SIZE_LIMIT", 2048)
        write_synthetic_mds(source, {"a": "random", "b": "random"}, seq_len=64, vocab_size=VOCAB, n_train=100,
                            n_eval=8, seed=5)
    (source / "domains.json").write_text((prepared / "domains.json").read_text())
    fetch_data(run.data)
    assert cached.read_bytes() != old and cached.read_bytes() == (source / "train" / "a" / cached.name).read_bytes()
    assert len(ShardReader(cached.parent)) == 100


def test_per_folder_remotes_override_and_complete_a_local_folder(tmp_path, prepared):
    local = tmp_path / "local"
    shutil.copytree(prepared, local)
    shutil.rmtree(local / "train" / "a")
    elsewhere = tmp_path / "elsewhere" / "a-train"
    shutil.copytree(prepared / "train" / "a", elsewhere)
    args = [f"data_local={local}", "callbacks.data_loading.set_names=[a,b]", f"save_folder={tmp_path}/r"]
    run = RunConfig.from_cfg(load_config(TINY, [*args, f"data_remote_folders={{train/a: {elsewhere}}}"]))
    fetch_data(run.data)
    validate_data_config(run.data)
    assert shard_names(local / "train" / "a") == ["shard.00000.mds"]
    assert remote.remote_of(local / "train" / "b") is None  # untouched local folder
    typo = RunConfig.from_cfg(load_config(TINY, [*args, f"data_remote_folders={{train/aa: {elsewhere}}}"]))
    with pytest.raises(ConfigError, match=r"data_remote_folders.train/aa: this run reads no folder train/aa under "
                                          r"data_local \(did you mean train/a\?"):
        fetch_data(typo.data)
        validate_data_config(typo.data)


@pytest.mark.parametrize("override,message", [
    ("data_remot=s3://b/x", "unknown config key data_remot .*did you mean data_remote\\?"),
    ("data_remote_folder={train/a: s3://b/x}", "did you mean data_remote_folders\\?"),
    ("data_remote_folders={../a: s3://b/x}", "data_remote_folders.../a: the key must be a folder under data_local"),
    ("data_remote_folders={train/a: ''}", "data_remote_folders.train/a='' must be the remote of that MDS folder"),
    ("data_remote=''", "data_remote='' is empty"),
])
def test_remote_keys_are_checked(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_cfg(load_config(TINY, [f"data_local={tmp_path}", "callbacks.data_loading.set_names=[a]",
                                              f"save_folder={tmp_path}/r", override]))


def test_data_remote_must_not_be_the_cache_itself(tmp_path, prepared):
    with pytest.raises(ConfigError, match="is data_local itself"):
        fetch_data(cache_of(prepared, prepared).data)


def test_two_processes_fetching_one_shard_both_land_the_same_verified_file(tmp_path, prepared, monkeypatch):
    run = cache_of(prepared, tmp_path / "cache")
    fetch_data(run.data)
    folder = tmp_path / "cache" / "train" / "a"
    both = threading.Barrier(2)
    fetch = remote.CloudDownloader.direct_download

    def in_step(url, local, timeout):
        both.wait(timeout=30)  # both downloads are under way before either is renamed into place
        fetch(url, local, timeout)

    monkeypatch.setattr(remote.CloudDownloader, "direct_download", in_step)
    readers = [ShardReader(folder), ShardReader(folder)]
    errors: list[BaseException] = []

    def read(reader):
        try:
            reader.fetch(4)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=read, args=(r,)) for r in readers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    name = readers[0].infos[4]["raw_data"]["basename"]
    assert (folder / name).read_bytes() == (prepared / "train" / "a" / name).read_bytes()
    assert no_temp_left(tmp_path / "cache")


def test_a_compressed_remote_shard_is_verified_and_decompressed(tmp_path):
    source = tmp_path / "remote" / "train" / "a"
    rows = np.random.default_rng(0).integers(0, 500, size=(30, 16)).astype(np.uint16)
    with MDSWriter(out=str(source), columns=columns(np.dtype(np.uint16)), hashes=[HASH_ALGO], compression="gz",
                   size_limit=1024, progress_bar=False) as writer:
        for row in rows:
            writer.write({"tokens": row, "set": "a"})
    cache = tmp_path / "cache" / "train" / "a"
    infos = remote.sync_index(cache, str(source))["shards"]
    assert len(infos) > 1 and all(info["zip_data"] for info in infos)
    reader = ShardReader(cache, verify=True)
    assert np.array_equal(np.stack([reader[i]["tokens"] for i in range(len(reader))]), rows)
    assert shard_names(cache) == sorted(info["raw_data"]["basename"] for info in infos)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_mixture_reads_the_same_samples_through_an_empty_cache(tmp_path, prepared, workers):
    def ids(run: RunConfig) -> list[list[int]]:
        loader = build_train_dataloader(run.data, 4)
        return [batch["idx"].tolist() for _, batch in zip(range(12), loader)]

    local = RunConfig.from_cfg(load_config(TINY, [f"data_local={prepared}", "callbacks.data_loading.set_names=[a,b]",
                                                  f"save_folder={tmp_path}/r", f"train_loader.num_workers={workers}"]))
    run = cache_of(prepared, tmp_path / "cache", f"train_loader.num_workers={workers}")
    fetch_data(run.data)
    assert ids(run) == ids(local)  # forked workers fetch the shards they read, in place for the others
    assert len(shard_names(tmp_path / "cache" / "train" / "a")) > 1 and no_temp_left(tmp_path / "cache")


def _two_ranks_fetch(rank: int, init: str, source: str, cache: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    fetched: list[str] = []
    fetch = remote.CloudDownloader.direct_download
    remote.CloudDownloader.direct_download = lambda url, local, t: fetched.append(url) or fetch(url, local, t)
    run = cache_of(Path(source), Path(cache))
    agreed(lambda leader: fetch_data(run.data, leader=leader))
    agreed(lambda leader: validate_data_config(run.data, hashes=leader))
    rows = len(ShardReader(Path(cache) / "train" / "b"))
    Path(f"{out}{rank}").write_text(json.dumps({"fetched": fetched, "rows": rows}))
    torch.distributed.barrier()  # neither rank tears gloo down while the other still talks to it
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about 25 s on a shared 2-core machine
def test_one_process_per_node_fetches_the_indexes_and_the_others_wait(tmp_path, prepared):
    cache = tmp_path / "cache"
    mp.spawn(_two_ranks_fetch, args=(f"file://{tmp_path / 'store'}", str(prepared), str(cache), str(tmp_path / "out")),
             nprocs=2, join=True)
    leader, other = (json.loads((tmp_path / f"out{r}").read_text()) for r in range(2))
    assert other == {"fetched": [], "rows": 320}
    assert leader["rows"] == 320 and f"{prepared}/train/a/index.json" in leader["fetched"]
