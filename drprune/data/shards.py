"""MDS shard I/O shared by `prepare`, `merge`, the synthetic writer and the loaders.

Writing goes through streaming's `MDSWriter` inside an `atomic_output` folder that is renamed only
when complete, so a failed or killed run never leaves a half-written dataset; every finished split
gets a completion marker (`finish`), which the readers check. Reading goes through streaming's own
shard readers (`reader_from_json`), which gives cheap random access without StreamingDataset's
shared-memory machinery; `verify_split` catches truncated or corrupted shards by size and hash.
A folder cached from a remote (drprune.data.remote) may lack shards: the reader fetches one, verified,
the first time one of its samples is read, and `verify_split` leaves absent ones to that check.
"""
from __future__ import annotations

import bisect
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from streaming import MDSWriter

from drprune.atomic import check_complete, kill_point, mark_complete
from drprune.data.remote import fetch_shard, remote_of
from drprune.errors import UserError

log = logging.getLogger(__name__)

HASH_ALGO = "xxh64"
SIZE_LIMIT = 1 << 26  # 64 MiB per shard


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32; a forced width must fit the vocab."""
    if requested not in ("auto", "uint16", "uint32"):
        raise UserError(f"token width {requested!r} is not one of auto, uint16, uint32")
    if vocab_size > 1 << 32:
        raise UserError(f"vocabulary of {vocab_size} tokens does not fit uint32")
    if requested == "auto":
        return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    dtype = np.dtype(requested)
    if vocab_size > np.iinfo(dtype).max + 1:
        raise UserError(f"vocabulary of {vocab_size} tokens does not fit {requested}; use uint32 or auto")
    return dtype


def columns(dtype: np.dtype) -> dict[str, str]:
    """The MDS column spec of a split: token ids of `dtype` plus the domain name."""
    return {"tokens": f"ndarray:{dtype.name}", "set": "str"}


def open_writer(folder: Path, dtype: np.dtype) -> MDSWriter:
    """An MDSWriter into `folder`; close it with `finish`, which adds the completion marker readers check."""
    return MDSWriter(out=str(folder), columns=columns(dtype), hashes=[HASH_ALGO], size_limit=SIZE_LIMIT,
                     progress_bar=False)


def finish(writer) -> None:
    """Close an MDS writer and mark its split complete (the marker is the split's last file)."""
    writer.finish()
    mark_complete(Path(writer.local))


def _check_shard(folder: Path, info: dict[str, Any], hashes: bool, remote: str | None = None) -> None:
    """One shard against its index.json entry: present, of the recorded size, and (`hashes`) of the recorded hash."""
    from streaming.base.hashing import get_hash

    raw = info["raw_data"]
    path = Path(folder) / raw["basename"]
    fix = f" (delete it to fetch it again from {remote})" if remote else ""
    if not path.is_file():
        raise UserError(f"shard {path} listed in {Path(folder) / 'index.json'} is missing")
    if path.stat().st_size != raw["bytes"]:
        raise UserError(f"shard {path} is truncated or corrupted: {path.stat().st_size} bytes, "
                        f"index.json says {raw['bytes']}{fix}")
    if hashes:
        for algo, expected in (raw.get("hashes") or {}).items():
            if get_hash(algo, path.read_bytes()) != expected:
                raise UserError(f"shard {path} is corrupted: its {algo} hash does not match index.json{fix}")


def verify_split(folder: Path, hashes: bool = True) -> int:
    """Check an MDS folder's shards against index.json (size, and hash when recorded); return #samples."""
    index = Path(folder) / "index.json"
    if not index.is_file():
        raise UserError(f"{folder} is not an MDS folder: {index} is missing (run `drprune data prepare`)")
    try:
        shards = json.loads(index.read_text())["shards"]
    except (ValueError, KeyError) as err:
        raise UserError(f"{index} is corrupted: {err}") from err
    remote = remote_of(Path(folder))
    total = 0
    for info in shards:
        total += int(info["samples"])
        if remote is not None and not (Path(folder) / info["raw_data"]["basename"]).is_file():
            continue  # not fetched yet: verified on arrival
        _check_shard(Path(folder), info, hashes, remote)
    if remote is None:  # a cache holds some shards by design; its remote's index is the whole list
        check_complete(folder, "MDS folder")  # after the shard checks, whose messages name the shard
    return total


class ShardReader:
    """Random access to the samples of one MDS folder, via streaming's shard readers.

    `verify=True` checks each shard's size and hash the first time one of its samples is read, for
    readers that take a few rows (eval, calibration) without a `verify_split` of the whole folder.
    In a folder cached from a remote, a shard not there yet is fetched (and verified) at that moment.
    """

    def __init__(self, folder: Path, verify: bool = False):
        from streaming.base.format import reader_from_json

        self.folder = Path(folder)
        self.remote = remote_of(self.folder)
        if self.remote is None:
            check_complete(self.folder, "MDS folder")
        index = self.folder / "index.json"
        if not index.is_file():
            raise UserError(f"{self.folder} is not an MDS folder: {index} is missing")
        obj = json.loads(index.read_text())
        self.infos = obj["shards"]
        self.unverified = set(range(len(self.infos))) if verify else set()
        self.absent = ({k for k, info in enumerate(self.infos)
                        if not (self.folder / info["raw_data"]["basename"]).is_file()} if self.remote else set())
        self.shards = [reader_from_json(str(self.folder), None, info) for info in obj["shards"]]
        for shard in self.shards:
            shard.validate(allow_unsafe_types=False)
        self.starts = list(np.cumsum([0] + [s.samples for s in self.shards[:-1]]))
        self.num_samples = sum(s.samples for s in self.shards)
        if self.num_samples == 0:
            raise UserError(f"{self.folder} holds no samples")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, Any]:
        k = bisect.bisect_right(self.starts, idx) - 1
        shard = self.shards[k]
        if k in self.absent:
            self.fetch(k)
        if k in self.unverified:
            _check_shard(self.folder, self.infos[k], hashes=True, remote=self.remote)
            self.unverified.discard(k)
        try:
            return shard.decode_sample(shard.get_sample_data(idx - self.starts[k]))
        except (IndexError, ValueError, OSError) as err:
            raise UserError(f"cannot read sample {idx} from shard "
                            f"{self.folder / shard.raw_data.basename}: {err}") from err

    def seq_len(self) -> int:
        return len(self[0]["tokens"])

    def fetch(self, k: int) -> None:
        """Make shard `k` local: fetched from the remote, verified, unless another process already did."""
        if k not in self.absent:
            return
        if not (self.folder / self.infos[k]["raw_data"]["basename"]).is_file():
            assert self.remote is not None
            fetch_shard(self.folder, self.remote, self.infos[k])
        self.absent.discard(k)
        self.unverified.discard(k)  # verified on arrival, here or by the process that renamed it into place


class Packer:
    """Concatenate documents (each followed by EOS) and write fixed-length rows to an MDS writer.

    The tail shorter than `seq_len` is dropped at `close` (counted in `dropped`), so every stored
    sequence is full and the loaders never pad.
    """

    def __init__(self, writer, domain: str, seq_len: int, dtype: np.dtype):
        self.writer, self.domain, self.seq_len, self.dtype = writer, domain, seq_len, dtype
        self.buffer = np.zeros(0, dtype=dtype)
        self.documents = self.tokens = self.sequences = self.dropped = 0

    def add(self, docs: list[list[int]], eos_id: int) -> None:
        if not docs:
            return
        flat = np.fromiter((t for d in docs for t in (*d, eos_id)), dtype=np.int64,
                           count=sum(len(d) + 1 for d in docs))
        limit = np.iinfo(self.dtype).max
        if flat.size and (flat.max() > limit or flat.min() < 0):
            raise UserError(f"token id {int(flat.max())} does not fit {self.dtype.name} (domain {self.domain}); "
                            "use a wider token width")
        self.documents += len(docs)
        self.tokens += flat.size
        self.buffer = np.concatenate([self.buffer, flat.astype(self.dtype)])
        n = len(self.buffer) // self.seq_len
        for row in self.buffer[: n * self.seq_len].reshape(n, self.seq_len):
            self.writer.write({"tokens": row, "set": self.domain})
            kill_point("mds.row")
        self.sequences += n
        self.buffer = self.buffer[n * self.seq_len:]

    def close(self) -> None:
        self.dropped = len(self.buffer)
        finish(self.writer)
