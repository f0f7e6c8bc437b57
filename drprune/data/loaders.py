"""Train / eval dataloaders from a run config (Sheared-LLaMA / DRPruning keys).

Keys: data_local, max_seq_len, seed, train_loader.{num_workers, prefetch_factor, pin_memory,
drop_last, dataset.{split, shuffle}}, eval_loader.{num_workers, dataset.split},
callbacks.data_loading.{dynamic, set_names, proportion}, data_verify_hashes (default true), tokenizer
(optional: the model's tokenizer, compared with the one data_local was prepared with).
dynamic=true: a MixtureDataset over data_local/train/<set_name> (train_loader.dataset.split is
ignored); otherwise a shuffled map-style dataset over data_local/<split>. Eval reads
data_local/eval/<split> (or data_local/<split>) in order; `set` ids follow set_names.

Eval-only (held-out) domains, written by `prepare(eval_only=...)` (listed under "eval_only" in
data_local/domains.json, or having eval/<name> but no train/<name>), are never trained on: a
set_names entry naming one is a ConfigError; without set_names the train/ folders define the domains,
which leaves them out.

Remote data: `data_remote` (any URL mosaicml-streaming downloads, or a path) names a copy of the whole
prepared folder, and `data_remote_folders` {folder under data_local: its remote} one MDS folder each
(e.g. {train/wiki: s3://other/wiki}; it wins over data_remote). data_local is then the cache:
`fetch_data` (one process per node, before the model is built) fetches domains.json and the index.json
of every folder the run reads, plus the shards read before step 0; other shards are fetched, verified,
the first time the run reads one of their samples (drprune.data.remote). Without set_names, a remote's
domains.json lists the training domains.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer.utils import dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from drprune.atomic import visible
from drprune.data.collate import collate
from drprune.data.identity import DOMAINS_FILE, check_data_tokenizer, check_token_ids, max_token_id
from drprune.data.mixture_dataset import MixtureDataset, check_proportion
from drprune.data.remote import ATTEMPTS, fetch_file, join, remote_of, sync_index
from drprune.data.shards import ShardReader, verify_split
from drprune.data.prepare import EVAL_MERGE, read_domains
from drprune.errors import ConfigError, UserError, nearest
from drprune.run_config import DataSection

log = logging.getLogger(__name__)


class SplitDataset(Dataset):
    """Map-style view of MDS folders yielding {tokens, set (id in set_names), idx}."""

    def __init__(self, folders: list[Path], set_names: list[str], seq_len: int):
        self.readers = [ShardReader(f) for f in folders]
        self.starts = np.cumsum([0] + [len(r) for r in self.readers])
        self.ids = {name: i for i, name in enumerate(set_names)}
        self.seq_len = seq_len

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, idx: int) -> dict[str, Any]:
        k = int(np.searchsorted(self.starts, idx, side="right")) - 1
        sample = self.readers[k][idx - int(self.starts[k])]
        if sample["set"] not in self.ids:
            raise UserError(f"{self.readers[k].folder} holds domain {sample['set']!r}, which is not in "
                            f"callbacks.data_loading.set_names {list(self.ids)}")
        return {"tokens": sample["tokens"][: self.seq_len], "set": self.ids[sample["set"]], "idx": idx}


class FixedOrderSampler(DistributedSampler):
    """Composer re-seeds eval samplers before every eval; a fixed order keeps evals comparable."""

    def set_epoch(self, epoch: int) -> None:
        return None


class MixtureLoader(DataLoader):
    """DataLoader that tells its MixtureDataset how many batches the trainer has taken (see mixture_dataset.py)."""

    def __iter__(self):
        for batch in super().__iter__():
            self.dataset.note_consumed()
            yield batch


# ----- config reading -------------------------------------------------------------------------
def _data_local(data: DataSection) -> Path:
    if data.data_local is None:
        raise ConfigError("data_local is required: the folder written by `drprune data prepare`")
    root = Path(data.data_local)
    if not root.is_dir():
        raise ConfigError(f"data_local={root} is not a folder")
    return root


def _domain_folders(folder: Path) -> list[str]:
    return [p.name for p in visible(folder) if (p / "index.json").is_file()] if folder.is_dir() else []


def eval_only_domains(root: Path) -> list[str]:
    """The held-out domains of a prepared folder: domains.json's "eval_only" plus, when train/ holds
    per-domain folders, every eval/<name> without a train/<name> (eval_merge aside)."""
    listed = read_domains(root)
    names = set(listed["eval_only"]) if listed else set()
    train = _domain_folders(root / "train")
    if train:
        names |= {n for n in _domain_folders(root / "eval") if n not in train and n != EVAL_MERGE}
    return sorted(names)


def _refuse_eval_only(data: DataSection, names: list[str]) -> None:
    if data.data_local is None or not Path(data.data_local).is_dir():
        return  # _data_local reports it where the data is needed
    root = Path(data.data_local)
    if held_out := [n for n in names if n in set(eval_only_domains(root))]:
        raise ConfigError(
            f"callbacks.data_loading.set_names lists {held_out}: eval-only (held-out) domain(s) of {root} "
            f"(listed under eval_only in domains.json, or an eval/<name> without train/<name>), which training "
            f"never reads. "
            f"Remove {held_out} from set_names (and their proportion entries); evaluate them with "
            f"`drprune eval MODEL --data {root} --domains {' '.join(held_out)}`")


def set_names_of(data: DataSection) -> list[str]:
    """callbacks.data_loading.set_names, or the domain folders under data_local/train when absent.

    Eval-only domains are refused in set_names and are never among the train/ folders.
    """
    names = data.data_loading.set_names
    if names is None:
        root = _data_local(data)
        listed = read_domains(root) if data.data_remote is not None else None
        if listed is not None:  # a cache may hold folders of other runs: the remote's list is the truth
            return listed["train"]
        held_out = set(eval_only_domains(root))
        return [n for n in _domain_folders(root / "train") if n not in held_out]
    _refuse_eval_only(data, names)
    return list(names)


def proportion_of(data: DataSection, set_names: list[str]) -> list[float]:
    """callbacks.data_loading.proportion checked against `set_names`; uniform when it is not set."""
    p = data.data_loading.proportion
    if p is None:
        log.info("callbacks.data_loading.proportion not set: uniform over %s", set_names)
        return [1.0 / len(set_names)] * len(set_names)
    return check_proportion(p, set_names, key="callbacks.data_loading.proportion").tolist()


def _seq_len(data: DataSection) -> int:
    if data.max_seq_len is None:
        raise ConfigError("max_seq_len is required: the sequence length of the prepared data (e.g. 4096)")
    return data.max_seq_len


def _split_folders(root: Path, split: str, key: str, parents: tuple[str, ...]) -> list[Path]:
    """An MDS folder for `split`, or its domain sub-folders; tried under root and root/<parent>."""
    for base in (root, *(root / p for p in parents)):
        folder = base / split
        if (folder / "index.json").is_file():
            return [folder]
        if subs := _domain_folders(folder):
            return [folder / s for s in subs]
    tried = ", ".join(str(b / split) for b in (root, *(root / p for p in parents)))
    raise ConfigError(f"{key}={split!r}: no MDS data at {tried}")


def _train_folders(data: DataSection, set_names: list[str]) -> list[Path]:
    root = _data_local(data)
    if data.data_loading.dynamic:
        have = _domain_folders(root / "train")
        if missing := [n for n in set_names if n not in have]:
            raise ConfigError(f"callbacks.data_loading.set_names {missing} have no folder under {root / 'train'} "
                              f"(found: {have})")
        return [root / "train" / n for n in set_names]
    split = data.train_loader.dataset.split
    if not split:
        raise ConfigError("train_loader.dataset.split is required when callbacks.data_loading.dynamic is false")
    return _split_folders(root, str(split), "train_loader.dataset.split", ("train",))


def _eval_folders(data: DataSection) -> list[Path]:
    assert data.eval_loader is not None
    return _split_folders(_data_local(data), data.eval_loader.dataset.split, "eval_loader.dataset.split", ("eval",))


def validate_data_config(data: DataSection, hashes: bool = True) -> None:
    """Every data problem as a ConfigError/UserError naming the key or file, before any model is built.

    Shard hashes are checked when `hashes` (and `data_verify_hashes`); sizes always.
    """
    seq_len = _seq_len(data)
    set_names = set_names_of(data)
    folders = _data_folders(data)
    _check_remote_folders(data, folders)
    if data.data_loading.dynamic:
        proportion_of(data, set_names)
        data.data_loading.check_domains(set_names)
    for folder in folders:
        verify_split(folder, hashes=data.verify_hashes and hashes)
        have = ShardReader(folder).seq_len()
        if have < seq_len:
            raise ConfigError(f"max_seq_len={seq_len} but {folder} holds {have}-token sequences")
    if data.eval_loader is not None:
        _check_eval_domains(_eval_folders(data), set_names)


def _check_eval_domains(folders: list[Path], set_names: list[str]) -> None:
    """Every domain in the eval data must be in set_names: its per-domain loss has nowhere to go otherwise."""
    for folder in folders:
        reader = ShardReader(folder)
        found = {reader[i]["set"] for i in range(len(reader))}
        if missing := sorted(found - set(set_names)):
            raise ConfigError(
                f"{folder} holds eval data of domain(s) {missing}, which callbacks.data_loading.set_names "
                f"{set_names} does not list: add them to set_names (and to proportion), or point "
                "eval_loader.dataset.split at data of the listed domains only")


def _check_remote_folders(data: DataSection, folders: list[Path]) -> None:
    """Every data_remote_folders key must be a folder the run reads (a misspelt one would be ignored)."""
    if data.data_remote_folders:
        root = _data_local(data)
        _refuse_unread(data, [f.relative_to(root).as_posix() for f in folders])


def _refuse_unread(data: DataSection, read: list[str], parents: tuple[str, ...] = ()) -> None:
    """A ConfigError for the first data_remote_folders key neither in `read` nor directly under `parents`."""
    for key in data.data_remote_folders:
        if key in read or key.rpartition("/")[0] in parents:
            continue
        near = nearest(key, read)
        raise ConfigError(f"data_remote_folders.{key}: this run reads no folder {key} under data_local "
                          f"({'did you mean ' + near + '? ' if near else ''}folders it can read: {', '.join(read)}); "
                          "fix or remove the key")


def _check_remote_keys(data: DataSection) -> None:
    """Before fetching: the data_remote_folders keys must fit the folders the config can read."""
    loading = data.data_loading
    read: list[str] = []  # folders the run reads
    parents: list[str] = []  # folders whose domain sub-folders it may read
    if loading.dynamic and loading.set_names:
        read += [f"train/{name}" for name in loading.set_names]
    elif loading.dynamic:
        parents.append("train")
    elif data.train_loader.dataset.split:
        split = str(data.train_loader.dataset.split)
        read += [split, f"train/{split}"]
        parents += [split, f"train/{split}"]
    if data.eval_loader is not None:
        split = data.eval_loader.dataset.split
        read += [split, f"eval/{split}"]
        parents += [split, f"eval/{split}"]
    _refuse_unread(data, read, tuple(parents))


# ----- remote data ------------------------------------------------------------------------------
def fetch_data(data: DataSection, leader: bool = True) -> None:
    """Fill the data_local cache from data_remote / data_remote_folders (a no-op without them).

    The node's leader fetches domains.json, the index.json of every folder the run reads, the first
    shard of each (validation reads it on every rank) and every eval shard; the other ranks return at
    once and the caller's `agreed` holds them until it is done. An unreachable remote or a missing
    index is a UserError naming it, raised here, before the model is built.
    """
    if data.data_remote is None and not data.data_remote_folders:
        return
    if data.data_local is None:
        raise ConfigError("data_local is required with data_remote: the local cache folder (empty at first; the "
                          "shards the run reads are fetched into it)")
    root = Path(data.data_local)
    if data.data_remote is not None and "://" not in data.data_remote and \
            root.resolve() == Path(data.data_remote).resolve():
        raise ConfigError(f"data_remote={data.data_remote} is data_local itself: drop data_remote to read the folder "
                          "directly, or give another folder as data_local, the cache")
    _check_remote_keys(data)
    if not leader:
        return
    fetcher = _Fetcher(data, root)
    fetcher.sync_all()
    evals = _eval_folders(data) if data.eval_loader is not None else []
    for folder in [*_train_folders(data, set_names_of(data)), *evals]:
        if remote_of(folder) is not None:
            reader = ShardReader(folder)
            for k in range(len(reader.infos)) if folder in evals else (0,):
                reader.fetch(k)
    log.info("data cache %s: index files of %s fetched from %s; training shards are fetched as first read",
             root, sorted(fetcher.synced), data.data_remote or "data_remote_folders")


class _Fetcher:
    """Finds the folders a run reads on its remote by fetching their index.json into the cache."""

    def __init__(self, data: DataSection, root: Path):
        self.data, self.root = data, root
        self.synced: set[str] = set()
        self.errors: dict[str, str] = {}  # why a probed file could not be fetched

    def remote(self, rel: str) -> str | None:
        """rel's remote: its data_remote_folders entry, else its place under data_remote."""
        if rel in self.data.data_remote_folders:
            return self.data.data_remote_folders[rel]
        return None if self.data.data_remote is None else join(self.data.data_remote, rel)

    def sync(self, rel: str, probe: bool = False) -> bool:
        """Fetch rel/index.json; when `probe`, a failure returns False (and is kept for the message)."""
        url = self.remote(rel)
        if url is None or rel in self.synced:
            return url is not None
        try:
            sync_index(self.root / rel, url, attempts=1 if probe else ATTEMPTS)
        except UserError as err:
            self._prune(self.root / rel)
            if not probe:
                raise
            self.errors[rel] = str(err)
            return False
        self.synced.add(rel)
        return True

    def _prune(self, path: Path) -> None:
        """Remove the empty folders a failed fetch created under the cache root."""
        while path != self.root and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
            path = path.parent

    def sync_all(self) -> None:
        for rel in self.data.data_remote_folders:
            self.sync(rel)
        if self.data.data_remote is None:
            return  # the folders without a remote are local ones
        listed = self._domains()
        loading = self.data.data_loading
        if loading.dynamic:
            names = loading.set_names or (listed or {}).get("train")
            if not names:
                raise ConfigError(f"callbacks.data_loading.set_names is required: data_remote={self.data.data_remote} "
                                  f"has no domains.json to list its domains ({self.errors[DOMAINS_FILE]})")
            for name in names:
                self.sync(f"train/{name}")
        elif self.data.train_loader.dataset.split:
            self._split(str(self.data.train_loader.dataset.split), "train", "train_loader.dataset.split", listed)
        if self.data.eval_loader is not None:
            self._split(self.data.eval_loader.dataset.split, "eval", "eval_loader.dataset.split", listed)

    def _domains(self) -> dict[str, list[str]] | None:
        """data_remote's domains.json, copied into the cache (older data has none: then neither has the cache)."""
        local = self.root / DOMAINS_FILE
        try:
            fetch_file(join(str(self.data.data_remote), DOMAINS_FILE), local)
        except UserError as err:
            self.errors[DOMAINS_FILE] = str(err)
            local.unlink(missing_ok=True)  # a stale copy would describe another dataset
            log.info("no %s at %s: the domains are set_names and token ids are scanned", DOMAINS_FILE,
                     self.data.data_remote)
            return None
        return read_domains(self.root)

    def _split(self, split: str, parent: str, key: str, listed: dict[str, list[str]] | None) -> None:
        """The MDS folder `split` or parent/split, or else the domain folders under one of them."""
        bases = [split, f"{parent}/{split}"]
        if any(self.sync(rel, probe=True) for rel in bases):
            return
        names = sorted({*(listed or {}).get("train", []), *(listed or {}).get("eval_only", []), EVAL_MERGE,
                        *(self.data.data_loading.set_names or [])})
        for base in bases:
            if [name for name in names if self.sync(f"{base}/{name}", probe=True)]:
                return
        tried = ", ".join(str(self.remote(rel)) for rel in bases)
        raise UserError(f"{key}={split!r}: no MDS data at {tried} (nor domain folders under them) on the remote: "
                        f"{self.errors[bases[-1]]}")


def _data_folders(data: DataSection) -> list[Path]:
    """Every MDS folder the run reads: the train folders, then the eval ones."""
    folders = _train_folders(data, set_names_of(data))
    if data.eval_loader is not None:
        folders += _eval_folders(data)
    return folders


def check_data_vocab(data: DataSection, vocab_size: int, scan: bool = True) -> None:
    """Refuse data made with another tokenizer than the run's `tokenizer` (when set), or whose ids do not
    fit the model's vocab_size, before the model is built. Data that records no tokenizer is scanned
    (when `scan`: one rank per node does it)."""
    root = _data_local(data)
    tokenizer = data.tokenizer
    if tokenizer is not None and not Path(str(tokenizer)).exists():
        raise ConfigError(f"tokenizer={tokenizer} does not exist: give the model's HF tokenizer folder or "
                          "SentencePiece .model (or drop the key)")
    if check_data_tokenizer(root, tokenizer=None if tokenizer is None else str(tokenizer), vocab_size=vocab_size):
        return
    log.info("%s records no tokenizer (older data or another tool): scanning its token ids%s", root,
             f"; tokenizer={tokenizer} cannot be compared" if tokenizer is not None else "")
    for folder in _data_folders(data) if scan else ():
        check_token_ids(max_token_id(folder), vocab_size, folder)


def _workers(num_workers: int, prefetch_factor: int | None) -> tuple[int, int | None]:
    return num_workers, (None if num_workers == 0 else prefetch_factor or 2)


def build_train_dataloader(data: DataSection, device_batch_size: int) -> DataLoader:
    """The train loader: a dynamic MixtureDataset (exact resume via its state_dict) or a shuffled split."""
    node = data.train_loader
    workers, prefetch = _workers(node.num_workers, node.prefetch_factor)
    set_names, seq_len = set_names_of(data), _seq_len(data)
    folders = _train_folders(data, set_names)
    pin = torch.cuda.is_available() if node.pin_memory is None else node.pin_memory
    common = dict(batch_size=device_batch_size, num_workers=workers, prefetch_factor=prefetch,
                  collate_fn=collate, pin_memory=pin)
    if data.data_loading.dynamic:
        lag = workers * (prefetch or 0)
        dataset = MixtureDataset(folders[0].parent, set_names, proportion_of(data, set_names),
                                 batch_size=device_batch_size, seq_len=seq_len, seed=data.seed,
                                 rank=dist.get_global_rank(), world_size=dist.get_world_size(), lag_batches=lag)
        log.info("dynamic mixture over %s, p=%s; a proportion update takes effect %d batches later",
                 set_names, dataset.proportion, lag)
        return MixtureLoader(dataset, **common)
    dataset = SplitDataset(folders, set_names, seq_len)
    sampler = dist.get_sampler(dataset, shuffle=node.dataset.shuffle, drop_last=node.drop_last, seed=data.seed)
    return DataLoader(dataset, sampler=sampler, drop_last=node.drop_last, **common)


def build_eval_dataloader(data: DataSection, device_batch_size: int) -> DataLoader:
    """Loader over eval_loader.dataset.split (normally eval_merge), split across ranks.

    With eval_loader.dataset.shuffle the order is one fixed permutation (the same at every eval), so
    an `eval_subset_num_batches` prefix covers every domain instead of the first one in eval_merge.
    """
    assert data.eval_loader is not None
    workers, prefetch = _workers(data.eval_loader.num_workers, data.eval_loader.prefetch_factor)
    dataset = SplitDataset(_eval_folders(data), set_names_of(data), _seq_len(data))
    sampler = FixedOrderSampler(dataset, num_replicas=dist.get_world_size(), rank=dist.get_global_rank(),
                                shuffle=data.eval_loader.dataset.shuffle, seed=data.seed, drop_last=False)
    return DataLoader(dataset, batch_size=device_batch_size, sampler=sampler, num_workers=workers,
                      prefetch_factor=prefetch, collate_fn=collate)
