"""Sharded checkpoints: the folders Composer writes with `fsdp_config.state_dict_type: sharded`.

A sharded checkpoint is a torch.distributed.checkpoint (DCP) folder, `save_folder/ep0-ba400/`: one
`__<rank>_0.distcp` file per rank plus `.metadata`, which the coordinating rank writes last (so a
folder without it was never finished), and which lists every stored chunk with its file, offset and
length. `latest-rank0.pt` is then a link to the folder.

drprune reads one without a process group, in one process: only the model state (`state.model.*`,
never the optimizer, two thirds of the bytes with Adam) is planned and read, the shards of each
tensor assembled whole. So every command that reads a checkpoint (`compact`, `convert`, `eval`,
`model.path`, the teacher) takes the folder through `load_model_state`.

Both DCP files are pickles: `.metadata` is read by an unpickler that builds only DCP's own metadata
classes, sizes and dtypes, and the non-tensor values (the model config) with torch's weights-only
loader, so nothing in the folder runs code unless `trust_pickle`.
"""
from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from drprune.convert.integrity import SAFE_GLOBALS, TRUST_HINT
from drprune.errors import UserError

log = logging.getLogger(__name__)

METADATA = ".metadata"
SHARD_SUFFIX = ".distcp"
MODEL_PREFIX = "state.model"  # where Composer keeps the model in a checkpoint's state dict
_SAFE_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


def looks_sharded(path: str | Path) -> bool:
    """A folder (or a link to one) that holds DCP files: a sharded checkpoint, finished or not."""
    path = Path(path)
    return path.is_dir() and ((path / METADATA).exists() or any(path.glob(f"*{SHARD_SUFFIX}")))


class _Refused(pickle.UnpicklingError):
    """A global outside the metadata allow-list."""


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch sizes and dtypes, paths; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _SAFE_CLASSES.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                      torch.dtype)):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def read_metadata(folder: str | Path, trust_pickle: bool = False) -> Metadata:
    """The `.metadata` of a sharded checkpoint; a missing, truncated or foreign one is a UserError."""
    path = Path(folder) / METADATA
    if not path.is_file():
        raise UserError(f"sharded checkpoint {folder} has no {METADATA}, which is written last: the run was killed "
                        "while saving it; use an earlier checkpoint of the run")
    try:
        with open(path, "rb") as f:
            metadata = pickle.load(f) if trust_pickle else _MetadataUnpickler(f).load()
    except _Refused as err:
        raise UserError(f"{path} names {err}, which is not part of a checkpoint's metadata; unpickling it could "
                        f"run code: {TRUST_HINT}") from None
    except (OSError, EOFError, AttributeError, ValueError, TypeError, pickle.UnpicklingError) as err:
        raise UserError(f"{path} is not readable checkpoint metadata ({err}): is the folder complete?") from err
    if not isinstance(metadata, Metadata):
        raise UserError(f"{path} is not the metadata of a torch.distributed checkpoint")
    return metadata


def incomplete_reason(folder: str | Path, metadata: Metadata | None = None) -> str | None:
    """Why `folder` is not a whole sharded checkpoint (no metadata, a shard missing or short); None if whole."""
    folder = Path(folder)
    try:
        metadata = metadata or read_metadata(folder)
    except UserError as err:
        return str(err)
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = folder / name
        have = shard.stat().st_size if shard.is_file() else None
        if have is None or have < size:
            state = "is missing" if have is None else f"has {have} bytes of {size}"
            return f"sharded checkpoint {folder} is incomplete: {name} {state} (a partial copy, or a killed save)"
    return None


def check_complete(folder: str | Path, metadata: Metadata | None = None) -> None:
    """Refuse a sharded checkpoint that is not whole, before anything is read from it."""
    reason = incomplete_reason(folder, metadata)
    if reason is not None:
        raise UserError(reason)


class _Reader(FileSystemReader):
    """DCP's file reader, given the `.metadata` the safe unpickler read (DCP's own would unpickle anything)."""

    def __init__(self, folder: Path, metadata: Metadata) -> None:
        super().__init__(str(folder))
        self.metadata = metadata

    def read_metadata(self) -> Metadata:
        metadata = self.metadata
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _Planner(_EmptyStateDictLoadPlanner):
    """Rebuilds the state dict under `keys` from the metadata; non-tensor values loaded weights-only."""

    def __init__(self, keys: set[str], folder: Path, trust_pickle: bool) -> None:
        super().__init__(keys=keys)
        self.folder, self.trust_pickle = folder, trust_pickle

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                obj = torch.load(value, map_location="cpu", weights_only=not self.trust_pickle)
        except pickle.UnpicklingError as err:
            raise UserError(f"sharded checkpoint {self.folder}: {fqn} holds Python objects that only full unpickling "
                            f"builds, which can run code: {TRUST_HINT}") from err
        set_element(self.original_state_dict, self.mappings[fqn], obj)


def read_state(folder: str | Path, keys: set[str], trust_pickle: bool = False) -> dict[str, Any]:
    """The entries of a sharded checkpoint under `keys` (dotted prefixes such as `state.model`), nested as saved."""
    folder = Path(folder)
    metadata = read_metadata(folder, trust_pickle)
    check_complete(folder, metadata)
    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, _Reader(folder, metadata), planner=_Planner(keys, folder, trust_pickle),
                         no_dist=True)
    except CheckpointException as wrapped:  # DCP wraps every failure of a step, ours included
        err = next(iter(wrapped.failures.values()))[0]
        if isinstance(err, UserError):
            raise err from None
        raise UserError(f"cannot read sharded checkpoint {folder}: {type(err).__name__}: "
                        f"{' '.join(str(err).split())[:300]}") from None
    return state


def load_sharded_model_state(folder: str | Path, trust_pickle: bool = False) -> dict[str, Any]:
    """The model state dict of a sharded Composer checkpoint: the same keys and values as the full one's."""
    folder = Path(folder)
    state = read_state(folder, {MODEL_PREFIX}, trust_pickle)
    model = state.get("state", {}).get("model")
    if not model:
        raise UserError(f"sharded checkpoint {folder} holds no model state (`{MODEL_PREFIX}`): is it a Composer "
                        "training checkpoint?")
    log.info("read the model state of sharded checkpoint %s (%d entries; optimizer state not read)",
             folder.resolve(), len(model))
    return model


def saved_world_size(folder: str | Path) -> int | None:
    """How many ranks wrote a sharded checkpoint (Composer's `state.metadata.world_size`), None if unrecorded."""
    state = read_state(folder, {"state.metadata.world_size"})
    size = state.get("state", {}).get("metadata", {}).get("world_size")
    return int(size) if isinstance(size, int) else None

