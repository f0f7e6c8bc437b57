"""The mixture under Composer: exact resume from a checkpoint, and disjoint ranks under `composer -n 2`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from drprune.data.loaders import build_train_dataloader
from drprune.data.testing import write_synthetic_mds
from drprune.run_config import RunConfig

SET_NAMES = ["a", "b", "c"]


def _cfg(root: Path, workers: int):
    return OmegaConf.create({
        "data_local": str(root), "max_seq_len": 8, "seed": 3, "max_duration": "5ba", "global_train_batch_size": 4,
        "train_loader": {"num_workers": workers, "prefetch_factor": 1 if workers else None},
        "callbacks": {"data_loading": {"dynamic": True, "set_names": SET_NAMES, "proportion": [0.6, 0.3, 0.1]}},
    })


def _fit(cfg, batches: int, save_folder: Path | None = None, load_path: str | None = None) -> list[list[int]]:
    """Train a one-parameter model; record each batch's idx; move p after batch 3 (as a callback would).

With 2 workers (lag 2 batches) the new p is still pending at the batch-4 checkpoint."""
    from composer import Callback, Trainer
    from composer.models import ComposerModel

    class Tiny(ComposerModel):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, batch):
            return self.w * batch["input_ids"].float().mean()

        def loss(self, outputs, batch):
            return outputs.sum() ** 2

    seen: list[list[int]] = []

    class Record(Callback):
        def after_dataloader(self, state, logger):
            seen.append(state.batch["idx"].tolist())

        def batch_end(self, state, logger):
            if int(state.timestamp.batch) == 3:
                state.train_dataloader.dataset.update_proportion([0.1, 0.1, 0.8])

    loader = build_train_dataloader(RunConfig.from_cfg(cfg).data, 4)
    model = Tiny()
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=f"{batches}ba",
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.0),
                      callbacks=[Record()], save_folder=str(save_folder) if save_folder else None,
                      save_interval="4ba", load_path=load_path, progress_bar=False, log_to_console=False,
                      seed=3, device="cpu")
    trainer.fit()
    p = list(loader.dataset.proportion)
    trainer.close()
    seen.append(p)
    return seen


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_checkpoint_continues_the_same_sample_sequence(tmp_path, workers):
    root = write_synthetic_mds(tmp_path / "data", dict.fromkeys(SET_NAMES, "random"), seq_len=8,
                               vocab_size=50, n_train=6, n_eval=1)  # tiny domains: passes wrap often
    full = _fit(_cfg(root, workers), 9)
    _fit(_cfg(root, workers), 4, save_folder=tmp_path / "ckpt")
    resumed = _fit(_cfg(root, workers), 9, load_path=str(tmp_path / "ckpt" / "ep0-ba4-rank0.pt"))
    assert len(full) == 10 and len(resumed) == 6
    assert resumed[:5] == full[4:9]
    assert resumed[5] == full[9] == pytest.approx([0.1, 0.1, 0.8])


RANK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from composer import Callback, Trainer
    from composer.models import ComposerModel
    from composer.utils import dist
    from omegaconf import OmegaConf
    from drprune.data.loaders import build_train_dataloader
    from drprune.run_config import RunConfig

    class Tiny(ComposerModel):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
        def forward(self, batch):
            return self.w * batch["input_ids"].float().mean()
        def loss(self, outputs, batch):
            return outputs.sum() ** 2

    seen = []
    class Record(Callback):
        def after_dataloader(self, state, logger):
            seen.append(state.batch["idx"].tolist())

    cfg = OmegaConf.create(json.loads(sys.argv[1]))
    model = Tiny()
    loader = build_train_dataloader(RunConfig.from_cfg(cfg).data, 4)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration="5ba",
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.0), callbacks=[Record()],
                      progress_bar=False, log_to_console=False, seed=3, device="cpu")
    trainer.fit()
    with open(f"{sys.argv[2]}/rank{dist.get_global_rank()}.json", "w") as fh:
        json.dump({"ids": seen, "p": trainer.state.train_dataloader.dataset.proportion}, fh)
""")


def test_two_ranks_draw_disjoint_samples_of_one_global_stream(tmp_path):
    root = write_synthetic_mds(tmp_path / "data", dict.fromkeys(SET_NAMES, "random"), seq_len=8,
                               vocab_size=50, n_train=40, n_eval=1)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cfg = OmegaConf.to_container(_cfg(root, 0))
    composer = Path(sys.executable).parent / "composer"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(composer), "-n", "2", "--stdout", str(tmp_path / "out{rank}.txt"),
                          "--stderr", str(tmp_path / "err{rank}.txt"), str(script), json.dumps(cfg), str(tmp_path)],
                         capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + (tmp_path / "err1.txt").read_text()[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())["ids"] for r in range(2)]
    # One process with world size 2 and batch 4 defines the global stream: rank r takes half of each step.
    from drprune.data.mixture_dataset import MixtureDataset

    single = MixtureDataset(root / "train", SET_NAMES, [0.6, 0.3, 0.1], batch_size=8, seq_len=8, seed=3)
    stream = iter(single)
    for step in range(5):
        glob = [next(stream)["idx"] for _ in range(8)]
        assert ranks[0][step] == glob[:4] and ranks[1][step] == glob[4:]
    flat = [i for r in ranks for b in r for i in b]
    assert len(flat) == len(set(flat)) == 40  # 40 draws from 120 samples: no repeats across ranks
