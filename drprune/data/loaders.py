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
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from drprune.atomic import visible
from drprune.data.collate import collate
from drprune.data.mixture import MixtureDataset, check_proportion
from drprune.data.shards import ShardReader, verify_split
from drprune.errors import ConfigError, UserError

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
    """DataLoader that tells its MixtureDataset how many batches the trainer has taken (see mixture.py)."""

    def __iter__(self):
        for batch in super().__iter__():
            self.dataset.note_consumed()
            yield batch


# ----- config reading -------------------------------------------------------------------------
def _data_loading(cfg: DictConfig) -> dict[str, Any]:
    node = (cfg.get("callbacks") or {}).get("data_loading") or {}
    return dict(node)


def is_dynamic(cfg: DictConfig) -> bool:
    value = _data_loading(cfg).get("dynamic", False)
    if not isinstance(value, bool):
        raise ConfigError(f"callbacks.data_loading.dynamic={value!r} must be true or false")
    return value


def _data_local(cfg: DictConfig) -> Path:
    if cfg.get("data_local") is None:
        raise ConfigError("data_local is required: the folder written by `drprune data prepare`")
    root = Path(str(cfg.data_local))
    if not root.is_dir():
        raise ConfigError(f"data_local={root} is not a folder")
    return root


def _domain_folders(folder: Path) -> list[str]:
    return [p.name for p in visible(folder) if (p / "index.json").is_file()] if folder.is_dir() else []


def eval_only_domains(root: Path) -> list[str]:
    """The held-out domains of a prepared folder: domains.json's "eval_only" plus, when train/ holds
    per-domain folders, every eval/<name> without a train/<name> (eval_merge aside)."""
    from drprune.data.prepare import EVAL_MERGE, read_domains

    listed = read_domains(root)
    names = set(listed["eval_only"]) if listed else set()
    train = _domain_folders(root / "train")
    if train:
        names |= {n for n in _domain_folders(root / "eval") if n not in train and n != EVAL_MERGE}
    return sorted(names)


def _refuse_eval_only(cfg: DictConfig, names: list[str]) -> None:
    root = cfg.get("data_local")
    if root is None or not Path(str(root)).is_dir():
        return  # _data_local reports it where the data is needed
    root = Path(str(root))
    if held_out := [n for n in names if n in set(eval_only_domains(root))]:
        raise ConfigError(
            f"callbacks.data_loading.set_names lists {held_out}: eval-only (held-out) domain(s) of {root} "
            f"(listed under eval_only in domains.json, or an eval/<name> without train/<name>), which training "
            f"never reads. "
            f"Remove {held_out} from set_names (and their proportion entries); evaluate them with "
            f"`drprune eval MODEL --data {root} --domains {' '.join(held_out)}`")


def set_names_of(cfg: DictConfig) -> list[str]:
    """callbacks.data_loading.set_names, or the domain folders under data_local/train when absent.

    Eval-only domains are refused in set_names and are never among the train/ folders.
    """
    names = _data_loading(cfg).get("set_names")
    if names is None:
        root = _data_local(cfg)
        held_out = set(eval_only_domains(root))
        return [n for n in _domain_folders(root / "train") if n not in held_out]
    names = list(names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"callbacks.data_loading.set_names={names!r} must be a non-empty list of domain names")
    if len(set(names)) != len(names):
        raise ConfigError(f"callbacks.data_loading.set_names={names} has duplicates")
    _refuse_eval_only(cfg, names)
    return names


def proportion_of(cfg: DictConfig, set_names: list[str]) -> list[float]:
    p = _data_loading(cfg).get("proportion")
    if p is None:
        log.info("callbacks.data_loading.proportion not set: uniform over %s", set_names)
        return [1.0 / len(set_names)] * len(set_names)
    return check_proportion(p, set_names, key="callbacks.data_loading.proportion").tolist()


def _seq_len(cfg: DictConfig) -> int:
    value = cfg.get("max_seq_len")
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"max_seq_len={value!r} must be a positive integer")
    return value


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


def _train_folders(cfg: DictConfig, set_names: list[str]) -> list[Path]:
    root = _data_local(cfg)
    if is_dynamic(cfg):
        have = _domain_folders(root / "train")
        if missing := [n for n in set_names if n not in have]:
            raise ConfigError(f"callbacks.data_loading.set_names {missing} have no folder under {root / 'train'} "
                              f"(found: {have})")
        return [root / "train" / n for n in set_names]
    split = (cfg.get("train_loader") or {}).get("dataset", {}).get("split")
    if not split:
        raise ConfigError("train_loader.dataset.split is required when callbacks.data_loading.dynamic is false")
    return _split_folders(root, str(split), "train_loader.dataset.split", ("train",))


def _eval_folders(cfg: DictConfig) -> list[Path]:
    split = cfg.eval_loader.get("dataset", {}).get("split", "eval_merge")
    return _split_folders(_data_local(cfg), str(split), "eval_loader.dataset.split", ("eval",))


def validate_data_config(cfg: DictConfig) -> None:
    """Every data problem as a ConfigError/UserError naming the key or file, before any model is built."""
    seq_len = _seq_len(cfg)
    set_names = set_names_of(cfg)
    folders = _data_folders(cfg)
    if is_dynamic(cfg):
        from drprune.callbacks.data_loading import check_data_loading

        proportion_of(cfg, set_names)
        check_data_loading(_data_loading(cfg), set_names)
        duration = str(cfg.get("max_duration", ""))
        if duration.endswith("ep"):
            raise ConfigError(f"max_duration={duration}: a dynamic mixture has no epochs; use batches (e.g. 3200ba)")
    hashes = bool(cfg.get("data_verify_hashes", True))
    for folder in folders:
        verify_split(folder, hashes=hashes)
        have = ShardReader(folder).seq_len()
        if have < seq_len:
            raise ConfigError(f"max_seq_len={seq_len} but {folder} holds {have}-token sequences")
    if cfg.get("eval_loader") is not None:
        _check_eval_domains(_eval_folders(cfg), set_names)


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


def _data_folders(cfg: DictConfig) -> list[Path]:
    """Every MDS folder the run reads: the train folders, then the eval ones."""
    folders = _train_folders(cfg, set_names_of(cfg))
    if cfg.get("eval_loader") is not None:
        folders += _eval_folders(cfg)
    return folders


def check_data_vocab(cfg: DictConfig, vocab_size: int) -> None:
    """Refuse data made with another tokenizer than the run's `tokenizer` (when set), or whose ids do not
    fit the model's vocab_size, before the model is built. Data that records no tokenizer is scanned."""
    from drprune.data.identity import check_data_tokenizer, check_token_ids, max_token_id

    root = _data_local(cfg)
    tokenizer = cfg.get("tokenizer")
    if tokenizer is not None and not Path(str(tokenizer)).exists():
        raise ConfigError(f"tokenizer={tokenizer} does not exist: give the model's HF tokenizer folder or "
                          "SentencePiece .model (or drop the key)")
    if check_data_tokenizer(root, tokenizer=None if tokenizer is None else str(tokenizer), vocab_size=vocab_size):
        return
    log.info("%s records no tokenizer (older data or another tool): scanning its token ids%s", root,
             f"; tokenizer={tokenizer} cannot be compared" if tokenizer is not None else "")
    for folder in _data_folders(cfg):
        check_token_ids(max_token_id(folder), vocab_size, folder)


def _workers(node) -> tuple[int, int | None]:
    workers = int(node.get("num_workers", 0))
    prefetch = node.get("prefetch_factor")
    return workers, (None if workers == 0 else int(prefetch or 2))


def build_train_dataloader(cfg: DictConfig, device_batch_size: int) -> DataLoader:
    """The train loader: a dynamic MixtureDataset (exact resume via its state_dict) or a shuffled split."""
    from composer.utils import dist

    node = cfg.get("train_loader") or {}
    workers, prefetch = _workers(node)
    set_names, seq_len, seed = set_names_of(cfg), _seq_len(cfg), int(cfg.get("seed", 17))
    folders = _train_folders(cfg, set_names)
    common = dict(batch_size=device_batch_size, num_workers=workers, prefetch_factor=prefetch,
                  collate_fn=collate, pin_memory=bool(node.get("pin_memory", False)))
    if is_dynamic(cfg):
        lag = workers * (prefetch or 0)
        dataset = MixtureDataset(folders[0].parent, set_names, proportion_of(cfg, set_names),
                                 batch_size=device_batch_size, seq_len=seq_len, seed=seed,
                                 rank=dist.get_global_rank(), world_size=dist.get_world_size(), lag_batches=lag)
        log.info("dynamic mixture over %s, p=%s; a proportion update takes effect %d batches later",
                 set_names, dataset.proportion, lag)
        return MixtureLoader(dataset, **common)
    dataset = SplitDataset(folders, set_names, seq_len)
    drop_last = bool(node.get("drop_last", True))
    sampler = dist.get_sampler(dataset, shuffle=bool(node.get("dataset", {}).get("shuffle", True)),
                               drop_last=drop_last, seed=seed)
    return DataLoader(dataset, sampler=sampler, drop_last=drop_last, **common)


def build_eval_dataloader(cfg: DictConfig, device_batch_size: int) -> DataLoader:
    """Loader over eval_loader.dataset.split (normally eval_merge), split across ranks.

    With eval_loader.dataset.shuffle the order is one fixed permutation (the same at every eval), so
    an `eval_subset_num_batches` prefix covers every domain instead of the first one in eval_merge.
    """
    from composer.utils import dist

    workers, prefetch = _workers(cfg.eval_loader)
    dataset = SplitDataset(_eval_folders(cfg), set_names_of(cfg), _seq_len(cfg))
    shuffle = bool(cfg.eval_loader.get("dataset", {}).get("shuffle", False))
    sampler = FixedOrderSampler(dataset, num_replicas=dist.get_world_size(), rank=dist.get_global_rank(),
                                shuffle=shuffle, seed=int(cfg.get("seed", 17)), drop_last=False)
    return DataLoader(dataset, batch_size=device_batch_size, sampler=sampler, num_workers=workers,
                      prefetch_factor=prefetch, collate_fn=collate)
