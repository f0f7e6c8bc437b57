"""Run a training config, appending one JSON line per batch to RECORD (each rank: RECORD-rank{r}), for kill tests.

    python tests/scripts/train_recorded.py RECORD CONFIG key=value ...
    composer -n 2 tests/scripts/train_recorded.py RECORD CONFIG key=value ...

A line holds the batch number, total loss, sample ids, domain proportions and sha256 digests of the
mask generator's state (masks, Lagrange multipliers, hypernetwork) and of the whole model, so runs
can be compared bit for bit. Kill switches (environment, rank 0 only):
  KILL_AT_BATCH=N       SIGKILL right after batch N is recorded
  KILL_IN_CHECKPOINT=N  write the batch-N checkpoint half, then SIGKILL (a run killed while saving): a
                        checkpoint file cut in half; a sharded checkpoint folder with every rank's shard
                        written, rank 0's cut in half, and no .metadata (which the coordinator writes last)
  DRPRUNE_TEST_KILL_AT  drprune's own kill points (drprune.atomic.kill_point)
"""
import hashlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

import torch
from composer.core import Callback
from composer.utils import checkpoint as composer_checkpoint
from composer.utils import dist
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.tensor import DTensor

from drprune.train import build_trainer, load_config

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
logging.getLogger("drprune").setLevel(logging.INFO)  # what each rank decided (e.g. where its weights came from)


def digest(module: torch.nn.Module) -> str:
    """sha256 of the module's tensors; under FSDP2 of this rank's shards."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if torch.is_tensor(tensor):
            tensor = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def layout(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Per child of the ComposerModel: how many of its parameters are sharded (DTensor) and how many plain fp32."""
    out = {}
    for name, child in model.named_children():
        params = list(child.parameters())
        if params:
            out[name] = {"sharded": sum(isinstance(p, DTensor) for p in params),
                         "plain_fp32": sum(not isinstance(p, DTensor) and p.dtype == torch.float32 for p in params),
                         "total": len(params)}
    return out


class Record(Callback):
    """Appends a row per batch; at the start of training writes RECORD-layout (how the model is sharded)."""

    def __init__(self, path: Path, kill_at: int | None) -> None:
        self.path, self.kill_at = path, kill_at

    def fit_start(self, state, logger) -> None:
        model = state.model.module if hasattr(state.model, "module") else state.model
        Path(f"{self.path}-layout").write_text(json.dumps(layout(model)))

    def batch_end(self, state, logger) -> None:
        model = state.model.module if hasattr(state.model, "module") else state.model
        loss = state.loss["total"] if isinstance(state.loss, dict) else state.loss
        dataset = state.train_dataloader.dataset
        row = {"batch": int(state.timestamp.batch), "loss": float(loss), "idx": state.batch["idx"].tolist(),
               "proportion": list(getattr(dataset, "proportion", [])), "model": digest(model.model),
               "masks": digest(model.mask_generator) if model.mask_generator is not None else None,
               "teacher_gathered": sum(p.numel() for p in model.teacher.parameters() if not isinstance(p, DTensor))
               if getattr(model, "teacher", None) is not None else None}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if row["batch"] == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_while_saving(batch: int) -> None:
    original = composer_checkpoint._write_checkpoint_file

    def write(state_dict, filename: str) -> None:
        original(state_dict, filename)
        if f"-ba{batch}-" in os.path.basename(filename):
            size = os.path.getsize(filename)
            os.truncate(filename, size // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    composer_checkpoint._write_checkpoint_file = write
    finish = dcp_filesystem._FileSystemWriter.finish  # runs on the coordinator once every shard is written

    def finish_sharded(self, metadata, results) -> None:
        if os.path.basename(os.path.normpath(str(self.path))).endswith(f"-ba{batch}"):
            shard = Path(self.path) / "__0_0.distcp"
            os.truncate(shard, shard.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        finish(self, metadata, results)

    dcp_filesystem._FileSystemWriter.finish = finish_sharded


def main() -> None:
    record, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    rank0 = dist.get_global_rank() == 0
    env = {k: int(os.environ[k]) for k in ("KILL_AT_BATCH", "KILL_IN_CHECKPOINT") if os.environ.get(k) and rank0}
    if "KILL_IN_CHECKPOINT" in env:
        kill_while_saving(env["KILL_IN_CHECKPOINT"])
    trainer = build_trainer(load_config(config, overrides))
    trainer.state.callbacks.append(Record(Path(f"{record}-rank{dist.get_global_rank()}"), env.get("KILL_AT_BATCH")))
    trainer.fit()
    trainer.close()


if __name__ == "__main__":
    main()
