"""Guards on a training run's `save_folder`, applied by train.py before Composer starts.

- One run per folder: `save_folder/.drprune-run.lock` is flock'ed by the run (global rank 0) and
  holds its host and pid. A second run on the same folder refuses while the owner lives; the kernel
  drops the flock of a killed owner, so its stale file is simply taken over (on a file system
  without flock, the liveness of the recorded pid decides).
- Checkpoints half-written by a killed run are set aside (renamed `*.partial`) before autoresume:
  a `ep*-ba*-rank*.pt` that is not a complete zip archive, a sharded checkpoint folder `ep*-ba*/`
  (`state_dict_type: sharded`) without its `.metadata` or with a shard missing or short, or either
  kind newer than the checkpoint `latest-rank0.pt` points to (Composer links `latest` only after a
  checkpoint is fully written, and would otherwise refuse to start with FileExistsError, or write
  into the stale folder). Autoresume then continues from the last complete checkpoint; a dangling
  or broken `latest` link is re-pointed to it.
- A folder holding checkpoints is continued only with `autoresume: true` (`save_overwrite: true`
  replaces them); anything else is a UserError instead of Composer's FileExistsError.
- `save_folder/run_fingerprint.json` (seed, global batch size, sequence length, domains, mask
  generator and its target) is written when training starts; resuming (autoresume, or a `load_path`
  from a folder holding one) with a different fingerprint is refused unless
  `allow_config_change: true`.

Only local folders are guarded, `{run_name}` templates formatted as Composer formats them (a remote
save_folder, or a template whose run name Composer picks at start, is left to Composer).
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
import zipfile
from pathlib import Path
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from drprune.atomic import pid_alive, write_json
from drprune.convert.sharded import incomplete_reason
from drprune.errors import UserError
from drprune.run_config import RunConfig
from drprune.run_files import local_save_folder

log = logging.getLogger(__name__)

LOCK_FILE = ".drprune-run.lock"
FINGERPRINT_FILE = "run_fingerprint.json"
LATEST = "latest-rank0.pt"
CHECKPOINT = re.compile(r"^ep(\d+)-ba(\d+)(-rank\d+\.pt)?$")  # a file, or (no suffix) a sharded folder
_HELD: dict[Path, "RunLock"] = {}


class RunLock:
    """An exclusive lock on a save_folder, held from `acquire` until `release` (or process death)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.path, self.fd, self.created = folder, folder / LOCK_FILE, None, False

    def acquire(self) -> None:
        if self.path in _HELD:  # an earlier trainer of this process that was never closed
            _HELD.pop(self.path).release()
        self.created = not self.folder.is_dir()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create save_folder {self.folder}: {err.strerror or err}; "
                            "choose a writable folder") from err
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise UserError(f"cannot write to save_folder {self.folder}: {err.strerror or err}; "
                                "choose a writable folder") from err
            previous = _read_owner(fd)
            if not self._lock(fd, previous):
                os.close(fd)
                raise UserError(
                    f"save_folder {self.folder} is in use by another run (pid {previous.get('pid')} on host "
                    f"{previous.get('host')}, started {previous.get('started')}): two runs would interleave "
                    "their checkpoints. Wait for it to finish, or choose another save_folder")
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was removed by its previous owner while we opened it: try again
        if previous.get("pid"):
            log.info("save_folder %s: took over the lock of pid %s, which is gone", self.folder, previous["pid"])
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        os.fsync(fd)
        self.fd = fd
        _HELD[self.path] = self
        atexit.register(self.release)

    @staticmethod
    def _lock(fd: int, previous: dict[str, Any]) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        log.warning("the file system of the save_folder has no flock: the lock relies on the recorded pid")
        pid = previous.get("pid")
        return not (pid and previous.get("host") == socket.gethostname() and pid_alive(int(pid)))

    def release(self) -> None:
        if self.fd is None:
            return
        _HELD.pop(self.path, None)
        try:
            self.path.unlink()  # before unlocking: a waiter re-checks the inode it locked
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        if self.created:  # a run that failed before writing anything leaves no empty folder behind
            try:
                self.folder.rmdir()
            except OSError:
                pass


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------- checkpoints

def _checkpoints(folder: Path) -> dict[Path, tuple[int, int]]:
    """Composer checkpoints of `folder` (files, sharded folders) -> (epoch, batch)."""
    out = {}
    for p in folder.iterdir():
        m = CHECKPOINT.match(p.name)
        if m and (p.is_file() if m[3] else p.is_dir() and not p.is_symlink()):
            out[p] = (int(m[1]), int(m[2]))
    return out


def _complete(path: Path) -> bool:
    """torch.save writes a zip archive whose directory comes last: a truncated file has none. A sharded
    folder is whole when its `.metadata` (written last) is there and every shard it names is."""
    return incomplete_reason(path) is None if path.is_dir() else zipfile.is_zipfile(path)


def _set_aside(path: Path, why: str) -> None:
    target = path.with_name(path.name + ".partial")
    if target.is_dir() and not target.is_symlink():  # set aside by an earlier kill at the same checkpoint
        shutil.rmtree(target)
    os.replace(path, target)
    log.warning("set aside %s as %s: %s", path, target.name, why)


def repair_checkpoints(folder: Path) -> Path | None:
    """Set aside half-written or unpublished checkpoints; return the checkpoint autoresume will load."""
    ckpts = {p.name: when for p, when in _checkpoints(folder).items()}
    latest = folder / LATEST
    linked = os.path.basename(os.readlink(latest)) if latest.is_symlink() else None
    if latest.exists() and (linked is None or linked not in ckpts):
        return latest  # a plain file, or a link to what is not a checkpoint of this folder: Composer's
    if linked is not None and _complete(folder / linked):
        for name, when in ckpts.items():
            if when > ckpts[linked]:
                _set_aside(folder / name, f"newer than {LATEST} -> {linked}: written by a run killed before it "
                                          "published it")
        return folder / linked
    for name in [n for n in ckpts if not _complete(folder / n)]:
        _set_aside(folder / name, "not a complete checkpoint (a run was killed while writing it)")
        del ckpts[name]
    if latest.is_symlink():
        latest.unlink()
    if not ckpts:
        return None
    newest = max(ckpts, key=ckpts.__getitem__)
    latest.symlink_to(newest)
    log.warning("%s now points to %s, the newest complete checkpoint", latest, newest)
    return folder / newest


# ---------------------------------------------------------------- fingerprint

def fingerprint(run: RunConfig, set_names: list[str]) -> dict[str, Any]:
    """What must not change when a run is resumed: its data order, batches and pruning target."""
    node = run.model.mask_generator
    gen = None if node is None else {k: v for k, v in node.items()
                                     if k in ("name", "target_model", "target_ratio", "pruning_modules")}
    return {"seed": run.seed, "global_train_batch_size": run.global_train_batch_size,
            "max_seq_len": run.max_seq_len, "set_names": list(set_names), "mask_generator": gen}


def _check_fingerprint(run: RunConfig, new: dict[str, Any], saved_file: Path) -> None:
    if not saved_file.is_file():
        return
    try:
        old = json.loads(saved_file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{saved_file} is corrupted ({err}): delete it to resume without the check") from err
    changed = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    if not changed:
        return
    what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
    if run.allow_config_change:
        log.warning("resuming with a changed config (allow_config_change=true): %s", what)
        return
    raise UserError(f"resuming the run of {saved_file.parent} with a changed config ({what}) would not continue "
                    "the same run: restore those values, choose another save_folder, or pass "
                    "allow_config_change=true to resume anyway")


class RunGuardCallback(Callback):
    """Writes the run's fingerprint when training starts; releases the save_folder lock on close."""

    def __init__(self, lock: RunLock, fingerprint: dict[str, Any]) -> None:
        self.lock, self.fingerprint = lock, fingerprint

    def fit_start(self, state: State, logger: Logger) -> None:
        write_json(self.lock.folder / FINGERPRINT_FILE, self.fingerprint)

    def close(self, state: State, logger: Logger) -> None:
        self.lock.release()


def guard_save_folder(run: RunConfig, set_names: list[str]) -> list[Callback]:
    """Lock the save_folder, repair it for autoresume, refuse unsafe re-runs; [] on non-zero ranks."""
    if run.save_folder is None or dist.get_global_rank() != 0:
        return []
    folder = local_save_folder(run.save_folder, run.run_name)
    if folder is None:
        log.info("save_folder %s is remote, or templated without a run_name: drprune's save_folder guards are off",
                 run.save_folder)
        return []
    lock = RunLock(folder)
    lock.acquire()
    try:
        new = fingerprint(run, set_names)
        autoresume = run.autoresume
        resumed_from = repair_checkpoints(folder) if autoresume else None
        existing = sorted(p.name for p in _checkpoints(folder))
        if existing and not autoresume and not run.save_overwrite:
            raise UserError(f"save_folder {folder} already holds checkpoints of an earlier run "
                            f"({', '.join(existing)}): pass autoresume=true to continue it, or choose another "
                            "save_folder (save_overwrite=true replaces them)")
        load_path = run.load_path
        if resumed_from is not None:
            _check_fingerprint(run, new, folder / FINGERPRINT_FILE)
        elif load_path and Path(str(load_path)).exists():
            _check_fingerprint(run, new, Path(str(load_path)).parent / FINGERPRINT_FILE)
    except BaseException:
        lock.release()
        raise
    return [RunGuardCallback(lock, new)]
