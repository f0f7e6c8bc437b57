"""MDS folders cached from a remote copy: s3://, gs://, hf://, oci://, a plain path, ... (whatever
mosaicml-streaming downloads, through its own `CloudDownloader`).

A cache folder records the remote it mirrors in `.drprune-remote.json` (a dot name, so listings of
domains skip it). `sync_index` fetches a folder's index.json (run once per node before training) and
drops cached shards the new index no longer describes; `fetch_shard` fetches one shard, which
`ShardReader` calls the first time one of its samples is read. A shard is verified on arrival against
its index.json entry (size, and every hash recorded: drprune's writer records xxh64): a mismatch or an
unreachable remote is a UserError naming the shard and the remote, never a skipped shard.

Every download lands in a temp folder beside its target (a `.drprune-tmp-` name) and is renamed into
place only once verified, so a killed process leaves no partial file, and two processes fetching the
same shard both rename the same verified bytes. Which samples a run reads never depends on what is
cached: the readers' sizes come from index.json alone.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from streaming.base.compression import decompress
from streaming.base.hashing import get_hash
from streaming.base.storage import CloudDownloader

from drprune.atomic import fsync_tree, temp_path, write_json
from drprune.errors import UserError

log = logging.getLogger(__name__)

REMOTE_FILE = ".drprune-remote.json"
INDEX_FILE = "index.json"
ATTEMPTS = 3  # a transient network error mid-run should not end a long run
TIMEOUT_S = 60.0  # streaming's own default per download
# Errors no retry can fix: a missing object, no permission, an unsupported scheme, a missing client package.
_FINAL = (FileNotFoundError, PermissionError, ValueError, ImportError)


def join(remote: str, *parts: str) -> str:
    """`remote`/part/...: a URL or a path, joined with '/' (what every streaming downloader takes)."""
    return "/".join([remote.rstrip("/"), *parts])


def remote_of(folder: Path) -> str | None:
    """The remote a cache folder mirrors, None for a plain local folder."""
    path = Path(folder) / REMOTE_FILE
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text())["remote"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is corrupted ({err}): delete it, and the next training run records the folder's "
                        "remote again") from err


@contextlib.contextmanager
def _staging(final: Path) -> Iterator[Path]:
    """A temp folder beside `final` (same file system: the last rename is atomic), removed afterwards."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(final)
        tmp.mkdir()
    except OSError as err:
        raise UserError(f"cannot write the data cache {final.parent}: {err.strerror or err}; set data_local to a "
                        "writable folder") from err
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(url: str, local: Path, attempts: int = ATTEMPTS) -> None:
    """Fetch `url` to the fresh path `local` with streaming's downloader for its scheme.

    Transient errors are retried (`attempts` in all, with backoff); the last one, or a missing object,
    is a UserError naming `url`.
    """
    for attempt in range(1, attempts + 1):
        try:
            CloudDownloader.direct_download(url, str(local), TIMEOUT_S)
            return
        except Exception as err:  # noqa: BLE001 - every storage client raises its own types
            if isinstance(err, _FINAL) or attempt == attempts:
                raise UserError(f"cannot fetch {url}: {type(err).__name__}: {err}. Check the remote (data_remote or "
                                "data_remote_folders), that it holds data written by `drprune data prepare`, and "
                                "the credentials of its storage") from err
            log.warning("fetching %s failed (%s: %s); retrying (%d of %d)", url, type(err).__name__, err,
                        attempt + 1, attempts)
            time.sleep(2 ** attempt)


def check_bytes(data: bytes, entry: dict[str, Any], url: str, remote: str) -> None:
    """`data` fetched from `url` against its index.json `entry` (bytes, hashes); a UserError on any mismatch."""
    index = join(remote, INDEX_FILE)
    if len(data) != entry["bytes"]:
        raise UserError(f"shard {entry['basename']} fetched from {url} has {len(data)} bytes, but {index} says "
                        f"{entry['bytes']}: the remote copy is damaged or was rewritten after its index; prepare or "
                        "upload that folder again")
    for algo, expected in (entry.get("hashes") or {}).items():
        if get_hash(algo, data) != expected:
            raise UserError(f"shard {entry['basename']} fetched from {url} is corrupted: its {algo} hash does not "
                            f"match {index}; the remote copy is damaged: prepare or upload that folder again")


def fetch_shard(folder: Path, remote: str, info: dict[str, Any]) -> None:
    """Fetch the shard of index entry `info` from `remote` into `folder`, verified, then renamed into place.

    A compressed shard (zip_data) is fetched compressed, verified, decompressed and verified again.
    """
    raw = info["raw_data"]
    zipped = info.get("zip_data") if info.get("compression") else None
    url = join(remote, (zipped or raw)["basename"])
    final = Path(folder) / raw["basename"]
    with _staging(final) as tmp:
        got = tmp / "download"
        download(url, got)
        data = got.read_bytes()
        if zipped:
            check_bytes(data, zipped, url, remote)
            data = decompress(info["compression"], data)
        check_bytes(data, raw, url, remote)
        out = tmp / raw["basename"]
        if zipped:
            out.write_bytes(data)
        else:
            os.rename(got, out)
        fsync_tree(out)
        os.replace(out, final)
    log.debug("fetched %s (%d bytes, verified)", url, len(data))


def fetch_file(url: str, final: Path, attempts: int = ATTEMPTS) -> None:
    """Fetch a small file (domains.json) to `final`, which changes only once the new copy has fully arrived."""
    with _staging(Path(final)) as tmp:
        got = tmp / Path(final).name
        download(url, got, attempts)
        fsync_tree(got)
        os.replace(got, final)


def _index_entries(index: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {info["raw_data"]["basename"]: info["raw_data"] for info in index["shards"]}


def sync_index(folder: Path, remote: str, attempts: int = ATTEMPTS) -> dict[str, Any]:
    """Fetch `remote`/index.json into the cache `folder`, record the remote, and return the index.

    Cached shards that the new index describes otherwise (or that an older index did not list) are
    removed, so a remote prepared again is fetched again rather than mixed with the old copy.
    """
    folder = Path(folder)
    url = join(remote, INDEX_FILE)
    with _staging(folder / INDEX_FILE) as tmp:
        got = tmp / INDEX_FILE
        download(url, got, attempts)
        try:
            index = json.loads(got.read_text())
            fresh = _index_entries(index)
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{url} is not an MDS index.json ({type(err).__name__}: {err}): point the remote at a "
                            "folder written by `drprune data prepare`") from err
        old_path = folder / INDEX_FILE
        try:
            cached = _index_entries(json.loads(old_path.read_text())) if old_path.is_file() else {}
        except (ValueError, KeyError, TypeError):
            cached = {}
        for name, entry in fresh.items():
            shard = folder / name
            if shard.is_file() and cached.get(name) != entry:
                shard.unlink()
                log.info("removed cached %s: %s describes it otherwise", shard, url)
        write_json(folder / REMOTE_FILE, {"remote": remote})
        os.replace(got, old_path)
    return index
