"""Kill-anywhere safe outputs: the one way drprune writes a file or a folder.

An output is built under a temporary sibling name `.drprune-tmp-<name>-<host>-<pid>-<random>` (a file
under its own name inside a temp folder of that name), its files are fsync'ed, it is renamed onto the
final name (an existing output is swapped with the new one in one step where Linux allows,
`renameat2(RENAME_EXCHANGE)`; elsewhere it is renamed aside first), and the folder is fsync'ed. A process
killed at any moment therefore leaves the previous output or the new one, never a mix, plus at most a
temp entry. The next drprune process that writes into the same folder removes temp entries whose
owner (same host, that pid) is gone. Readers never take them for results: every temp name starts
with a dot, and listings of domains and splits skip dot names (`visible`).

Multi-file outputs that readers open as a whole (MDS splits, HF folders) end with a completion
marker (`mark_complete`, written last: the size of every file); `check_complete` refuses a folder
whose marker disagrees with its files (a partial copy) and any temp-named folder. Folders written
before markers existed have none and are accepted as they are.

Test hook (tiny on purpose): with DRPRUNE_TEST_KILL_AT=<label>[:<n>] in the environment, the process
SIGKILLs itself the n-th time (default: the first) it passes `kill_point(label)`. Labels here:
atomic.begin, atomic.written, atomic.synced, atomic.committed; writers add their own (mds.row,
safetensors.tensor). tests/test_kill_safety.py uses it to kill every writer at named points.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import zlib
from pathlib import Path
from typing import Any, Iterator

from drprune.errors import UserError

log = logging.getLogger(__name__)

TMP_PREFIX = ".drprune-tmp-"
MARKER = ".drprune-complete"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _parse_kill_at(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    label, _, count = value.partition(":")
    return label, int(count or 1)


_KILL_AT = _parse_kill_at(os.environ.get("DRPRUNE_TEST_KILL_AT"))
_kill_hits = 0


def kill_point(label: str) -> None:
    """SIGKILL this process here when DRPRUNE_TEST_KILL_AT names this point (tests only; free otherwise)."""
    global _kill_hits
    if _KILL_AT is None or _KILL_AT[0] != label:
        return
    _kill_hits += 1
    if _kill_hits == _KILL_AT[1]:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- temp names and stale temps

def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def temp_path(final: Path) -> Path:
    """A fresh temp sibling of `final`, named after it, this host and this pid."""
    return final.parent / f"{TMP_PREFIX}{final.name}-{_host_tag()}-{os.getpid()}-{secrets.token_hex(3)}"


def is_temp(path: str | Path) -> bool:
    """True for a drprune temp name: an unfinished output that readers must never take for a result."""
    return Path(path).name.startswith(TMP_PREFIX)


def _owner(name: str) -> tuple[str, int] | None:
    """(host tag, pid) of a temp name, None when the name is not one of ours."""
    parts = name[len(TMP_PREFIX):].rsplit("-", 3)
    if not name.startswith(TMP_PREFIX) or len(parts) != 4 or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs on this host; another user's live process counts, so its temp entries are kept."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale(folder: Path) -> list[Path]:
    """Remove the temp entries in `folder` left by killed drprune processes of this host; return them.

    A temp entry of a live process (a concurrent writer) or of another host is left alone.
    """
    if not folder.is_dir():
        return []
    host = _host_tag()
    removed = []
    for entry in folder.iterdir():
        owner = _owner(entry.name)
        if owner is None or owner[0] != host or pid_alive(owner[1]):
            continue
        _remove(entry)
        removed.append(entry)
        log.info("removed %s, left by a killed drprune process (pid %d)", entry, owner[1])
    return removed


def visible(folder: Path) -> list[Path]:
    """The entries of `folder`, sorted, without dot names (temp outputs of running or killed writers)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


# ---------------------------------------------------------------- durability

def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems cannot fsync a directory; the data files still are
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder under a folder (so a rename never publishes lost data)."""
    if not path.is_dir():
        _fsync_path(path)
        return
    for root, _, files in os.walk(path):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root))


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2); False where the OS or file system cannot."""
    fn = getattr(_LIBC, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _commit(tmp: Path, path: Path) -> None:
    """Put `tmp` at `path`; an existing `path` stays whole until the new one is in place."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
    elif not path.is_dir() and not tmp.is_dir():
        os.replace(tmp, path)
    elif not _exchange(tmp, path):  # swapped: the old output is now at `tmp`, removed by the caller
        old = temp_path(path)
        os.rename(path, old)
        os.rename(tmp, path)
        _remove(old)


def check_output(path: str | Path, overwrite: bool = False, *, folder: bool = False, what: str = "output") -> None:
    """Refuse an output path that cannot be written, so a command fails before its expensive work.

    Refused: an existing path without `overwrite`, an existing one of the other kind (a folder where
    a file is written, or the reverse: replacing it would silently drop it), and a path under a file
    or in a folder this process may not write.
    """
    path = Path(path)
    if os.path.lexists(path):
        if not overwrite:
            raise UserError(f"{what} {path} already exists; pass --overwrite to replace it, or choose another path")
        if path.is_dir() != folder:
            have, need = ("a folder", "file") if path.is_dir() else ("a file", "folder")
            raise UserError(f"{what} {path} is {have}, but a {need} is written there: remove it or choose "
                            "another path")
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {what} {path}: {parent} is a file, not a folder; choose a writable location")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {path}: {parent} is not writable; choose a writable location")


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool = False, *, folder: bool = False) -> Iterator[Path]:
    """Yield a temp path to write `path` into; it becomes `path` only when the block succeeds.

    `folder=True` yields an empty temp folder. Otherwise the yielded path (to create as a file) has
    `path`'s own name inside a temp folder, since some writers record the file name (torch.save
    names its zip archive after it): the result is byte for byte what writing `path` directly gives.
    An existing `path` is refused unless `overwrite`; on any error (or kill) nothing at `path` changes.
    """
    path = Path(path)
    check_output(path, overwrite, folder=folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path.parent)
        tmp = temp_path(path)
        tmp.mkdir()
    except OSError as err:
        raise UserError(f"cannot write output {path}: {err.strerror or err}; choose a writable location") from err
    target = tmp if folder else tmp / path.name
    kill_point("atomic.begin")
    try:
        yield target
        kill_point("atomic.written")
        fsync_tree(target)
        kill_point("atomic.synced")
        _commit(target, path)
    finally:
        _remove(tmp)  # after a commit: the old output (a folder swapped out) or the emptied temp folder
    _fsync_path(path.parent)
    kill_point("atomic.committed")


def write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write a whole text file atomically (UTF-8)."""
    with atomic_output(path, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any, overwrite: bool = True, **dumps: Any) -> Path:
    """Write JSON atomically; `dumps` are json.dumps options (default indent=2), plus a final newline."""
    return write_text(path, json.dumps(obj, **{"indent": 2, **dumps}) + "\n", overwrite)


# ---------------------------------------------------------------- completion markers

def mark_complete(folder: Path) -> None:
    """Write the completion marker last: the relative path and size of every file of `folder`."""
    sizes = {str(p.relative_to(folder)): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}
    (folder / MARKER).write_text(json.dumps({"files": sizes}, indent=1, sort_keys=True) + "\n")


def check_complete(folder: str | Path, what: str = "folder") -> None:
    """Refuse a temp-named folder, and a folder whose completion marker disagrees with its files.

    A folder without a marker (written by an older drprune, or by another tool) is accepted.
    """
    folder = Path(folder)
    if is_temp(folder):
        raise UserError(f"{what} {folder} is the unfinished output of a drprune run that was killed or is still "
                        "running, not a result: use the folder without the .drprune-tmp- prefix, or delete it")
    marker = folder / MARKER
    if not marker.is_file():
        return
    try:
        sizes = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{what} {folder}: its completion marker {MARKER} is corrupted ({err}); "
                        "write or copy the folder again") from err
    for name, size in sizes.items():
        file = folder / name
        have = file.stat().st_size if file.is_file() else None
        if have != size:
            state = "is missing" if have is None else f"has {have} bytes, not {size}"
            raise UserError(f"{what} {folder} is incomplete: {name} {state} (a partial copy?); "
                            "write or copy the folder again")
