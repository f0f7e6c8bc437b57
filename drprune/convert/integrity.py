"""Safe loading and checksums of the weight files drprune reads and writes.

Unpickling can run arbitrary code, so checkpoints are read with `torch.load(weights_only=True)`:
tensors, containers and plain values, plus an allow-list of the few plain types a Composer training
checkpoint holds (numpy arrays of its RNG state, a `timedelta`, torch's version string). A file that
needs anything else is refused, naming `--trust-pickle` (`trust_pickle: true` in a run config) as
the only way to unpickle it fully.

Checksums (sha256): a model-only checkpoint from `save_checkpoint` carries one per tensor (plus one
over its plain values) beside its state; a HF folder from `write_safetensors_shards` carries
`drprune_checksums.json` with one per weight file. Readers verify them, so a bit flip or a partial
copy is an error naming the tensor or file instead of a silently different model.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from drprune.errors import UserError

ALGORITHM = "sha256"
STATE_CHECKSUMS_KEY = "drprune_checksums"  # top-level key of a drprune model-only checkpoint
FOLDER_CHECKSUMS_FILE = "drprune_checksums.json"
TRUST_HINT = ("pass --trust-pickle (`trust_pickle: true` in a run config) only if you trust where the file "
              "comes from")

# Plain types of a Composer training checkpoint: RNG states (numpy uint32 arrays), the timestamp's
# timedelta, torch's version string. None of them runs code when built.
SAFE_GLOBALS: list[Any] = [
    np._core.multiarray._reconstruct, np._core.multiarray.scalar, np.ndarray, np.dtype,
    np.dtypes.UInt32DType, np.dtypes.Int64DType, np.dtypes.Float64DType, np.dtypes.Float32DType,
    np.dtypes.BoolDType, datetime.timedelta, torch.torch_version.TorchVersion,
]


def _allowed_names() -> set[str]:
    return {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}


def torch_load(path: Path, *, trust_pickle: bool = False, mmap: bool = True) -> Any:
    """`torch.load` on CPU that never runs code from the file unless `trust_pickle`; every failure is a UserError."""
    if mmap and not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive): is it empty, "
                        "truncated or another kind of file?")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            unsafe = _unsafe_globals(path)
            if unsafe:
                raise UserError(
                    f"{path} holds Python objects ({', '.join(unsafe[:5])}) that only full unpickling builds, and "
                    f"unpickling can run arbitrary code, so drprune does not do it by default: {TRUST_HINT}"
                ) from None
        raise UserError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from err
    except Exception as err:  # noqa: BLE001 - any other failure means the file is unusable
        raise UserError(f"cannot read checkpoint {path}: {err}") from err


def _unsafe_globals(path: Path) -> list[str]:
    """Globals the file's pickle names beyond the weights-only set and our allow-list (parsed, never run)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - an unparsable pickle is reported as unreadable by the caller
        return []
    allowed = _allowed_names()
    return sorted(n for n in names if n not in allowed)


# ---------------------------------------------------------------- checkpoint checksums

def _tensor_digest(t: Tensor) -> str:
    h = hashlib.new(ALGORITHM, f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _plain_digest(state: dict[str, Any]) -> str:
    plain = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
    return hashlib.new(ALGORITHM, json.dumps(plain, sort_keys=True, default=repr).encode()).hexdigest()


def state_checksums(state: dict[str, Any]) -> dict[str, Any]:
    """Checksums of a model state dict: one per tensor, one over the plain values (the config)."""
    return {"algorithm": ALGORITHM, "plain": _plain_digest(state),
            "tensors": {k: _tensor_digest(v) for k, v in state.items() if isinstance(v, Tensor)}}


def verify_state(state: dict[str, Any], recorded: Any, source: Path,
                 release: Callable[[Tensor], None] | None = None) -> None:
    """Compare a loaded state with the checksums it was saved with; `release` gives back each tensor's pages."""
    if not isinstance(recorded, dict) or recorded.get("algorithm") != ALGORITHM:
        raise UserError(f"checkpoint {source}: its checksum record is unreadable; write or copy the file again")
    tensors = recorded.get("tensors") or {}
    have = {k for k, v in state.items() if isinstance(v, Tensor)}
    if have != set(tensors):
        raise UserError(f"checkpoint {source} is corrupted: its tensors {sorted(have ^ set(tensors))[:3]} differ "
                        "from the ones recorded when it was written; write or copy the file again")
    for key in sorted(have):
        ok = _tensor_digest(state[key]) == tensors[key]
        if release is not None:
            release(state[key])
        if not ok:
            raise UserError(f"checkpoint {source} is corrupted: tensor {key} does not match the {ALGORITHM} "
                            "recorded when it was written (a bit flip or a partial copy?); "
                            "write or copy the file again")
    if _plain_digest(state) != recorded.get("plain"):
        raise UserError(f"checkpoint {source} is corrupted: its config (non-tensor entries) does not match the "
                        f"{ALGORITHM} recorded when it was written; write or copy the file again")


# ---------------------------------------------------------------- folder checksums

def file_digest(path: Path) -> str:
    """sha256 of a file, streamed (never the whole file in memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, ALGORITHM).hexdigest()


def write_folder_checksums(folder: Path, digests: dict[str, str]) -> None:
    """`drprune_checksums.json`: the sha256 of each named file of `folder`."""
    record = {"algorithm": ALGORITHM, "files": dict(sorted(digests.items()))}
    (folder / FOLDER_CHECKSUMS_FILE).write_text(json.dumps(record, indent=2) + "\n")


def verify_folder(folder: Path) -> None:
    """Check every file listed in `folder/drprune_checksums.json`; a folder without one is not checked."""
    record_file = folder / FOLDER_CHECKSUMS_FILE
    if not record_file.is_file():
        return
    try:
        record = json.loads(record_file.read_text())
        files = dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{record_file} is corrupted ({err}); write or copy the folder again") from err
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path} is missing: {FOLDER_CHECKSUMS_FILE} lists it; write or copy the folder again")
        if file_digest(path) != expected:
            raise UserError(f"{path} is corrupted: its {ALGORITHM} does not match {FOLDER_CHECKSUMS_FILE} "
                            "(a bit flip or a partial copy?); write or copy the folder again")
