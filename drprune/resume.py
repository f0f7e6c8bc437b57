"""What a run resumes from, checked against the run before its model is built.

Composer loads `load_path` (with autoresume: the checkpoint `save_folder/latest-rank0.pt` links to)
with the loader of the run's own `state_dict_type`: a sharded checkpoint folder only into a run with
`fsdp_config.state_dict_type: sharded`, a checkpoint file only into the others. The other way round
it fails after the model is built (with an error about directories, or about a missing FSDP config);
here it is one line naming the setting that fits.

A checkpoint written by another number of ranks resumes, and that was checked rather than assumed
(tests/test_sharded_checkpoints.py): torch.distributed.checkpoint reshards the model and optimizer
state of a sharded checkpoint, a full one is whole, and the data mixture's resume state counts
global samples, so with the same global batch (kept by the run fingerprint) the same samples follow
in the same order. Without a mask generator the losses then match the original world size's to
rounding (sums over another number of ranks); a mask generator's noise is drawn per rank, so a
pruning run continues with another draw of its masks. A warning names both world sizes.
"""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path

from composer.utils import dist

from drprune.convert.integrity import torch_load
from drprune.convert.sharded import incomplete_reason, looks_sharded, saved_world_size
from drprune.errors import UserError
from drprune.run_config import RunConfig
from drprune.run_files import local_save_folder
from drprune.run_guard import LATEST

log = logging.getLogger(__name__)


def resume_source(run: RunConfig) -> Path | None:
    """The local checkpoint the Trainer will load: autoresume's latest when there is one, else load_path."""
    folder = local_save_folder(run.save_folder, run.run_name)
    if run.autoresume and folder is not None and (folder / LATEST).exists():
        return folder / LATEST
    if run.load_path is None or "://" in run.load_path:
        return None
    return Path(run.load_path)


def check_resume_source(run: RunConfig, sharded_state_dict: bool) -> None:
    """Refuse a checkpoint the run's `state_dict_type` cannot load; log a change of world size."""
    source = resume_source(run)
    if source is None or not source.exists():
        return
    sharded = looks_sharded(source)
    if sharded and not sharded_state_dict:
        raise UserError(
            f"{source} is a sharded checkpoint folder, which Composer loads only into a sharded run: set "
            "fsdp_config.state_dict_type=sharded (with FSDP; FSDP_VERSION=2 on CPU) to resume it, or give it as "
            "model.path to start a new run from its weights")
    if not sharded and sharded_state_dict:
        raise UserError(
            f"{source} is a checkpoint file, but this run loads sharded checkpoint folders "
            "(fsdp_config.state_dict_type: sharded): set fsdp_config.state_dict_type=full to resume from it")
    if dist.get_global_rank() == 0:
        saved, now = _world_size(source, sharded), dist.get_world_size()
        if saved is not None and saved != now:
            log.warning("resuming %s, written by %d ranks, on %d: model and optimizer state are resharded and the "
                        "data continues at the same global sample, but the run is not the %d-rank run bit for bit "
                        "(sums over another number of ranks; mask noise is drawn per rank)", source, saved, now,
                        saved)


def _world_size(source: Path, sharded: bool) -> int | None:
    """The world size Composer recorded in a checkpoint; None when it cannot be read without unpickling code."""
    if sharded:
        return saved_world_size(source)
    try:
        obj = torch_load(source)
    except UserError:
        return None
    size = obj.get("state", {}).get("metadata", {}).get("world_size") if isinstance(obj, dict) else None
    return size if isinstance(size, int) else None


def check_load_path(load_path: str | None) -> None:
    """A local load_path must be a complete checkpoint: a file (torch.save writes a zip archive, its directory
    last) or a sharded checkpoint folder (its `.metadata` written last, naming every shard)."""
    if load_path is None or "://" in load_path:
        return
    path = Path(load_path)
    if looks_sharded(path):
        reason = incomplete_reason(path)
        if reason is not None:
            raise UserError(f"load_path: {reason}")
        return
    if not path.is_file():
        raise UserError(f"load_path={path} does not exist (or is not a checkpoint): give a checkpoint written by a "
                        "run, e.g. save_folder/latest-rank0.pt, or drop load_path")
    if not zipfile.is_zipfile(path):
        raise UserError(f"load_path={path} is not a complete checkpoint (truncated, or another kind of file): "
                        "give another checkpoint of the run")
