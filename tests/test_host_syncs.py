"""No host synchronisation from drprune's code inside a training step, outside logging steps.

Every way a tensor's value reaches Python (`item`, `float`, `int`, `bool`, `tolist`, `numpy`, `cpu`) is
patched for the whole run and counted when it is called from a drprune module, per batch; Composer's own
calls are not ours to remove and are not counted. On CPU these calls are cheap, on a GPU each one
stalls the step, so the count is the property that matters, not the time.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from composer.core import Callback

import drprune
from drprune.data.testing import write_synthetic_mds
from drprune.train import build_trainer, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "prune.yaml")
PACKAGE = str(Path(drprune.__file__).parent)
SYNCS = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy", "cpu")
STEPS, LOG_EVERY = 6, 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_synthetic_mds(tmp_path_factory.mktemp("mds") / "data", {"a": "repetitive", "b": "random"},
                               seq_len=64, vocab_size=49152, n_train=64, n_eval=4)


class BatchStart(Callback):
    """First callback: which batch is running, from its start (before drprune's callbacks see it)."""

    def __init__(self) -> None:
        self.batch: int | None = None

    def batch_start(self, state, logger) -> None:
        self.batch = int(state.timestamp.batch) + 1


class BatchEnd(Callback):
    """Last callback: the batch is over once every other callback's batch_end has run."""

    def __init__(self, clock: BatchStart) -> None:
        self.clock = clock

    def batch_end(self, state, logger) -> None:
        self.clock.batch = None


@pytest.mark.parametrize("generator,extra", [
    ("l0", ["callbacks.data_loading.update_type=dro", "callbacks.data_loading.reference_loss=[9.0,9.0]"]),
    ("hypernetwork", ["model.mask_generator.name=hypernetwork", "model.mask_generator.target_ratio=0.5"]),
    ("l0+distillation", ["distillation.teacher=SOURCE", "distillation.kl_weight=0.5"]),
])
def test_no_host_sync_from_drprune_outside_logging_steps(tmp_path, data_dir, monkeypatch, generator, extra):
    from drprune.convert.checkpoint import decoder_checkpoint_state, save_checkpoint
    from drprune.models.config import ModelConfig
    from drprune.models.decoder import PrunableDecoder

    source = tmp_path / "source.pt"
    save_checkpoint(decoder_checkpoint_state(PrunableDecoder(ModelConfig(
        family="llama", vocab_size=49152, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=128,
        norm_eps=1e-5, tie_word_embeddings=True))), source)
    extra = [e.replace("SOURCE", str(source)) for e in extra]
    trainer = build_trainer(load_config(TINY, [
        f"data_local={data_dir}", "callbacks.data_loading.set_names=[a,b]", f"save_folder={tmp_path / 'run'}",
        f"model.path={source}", f"max_duration={STEPS}ba", f"console_log_interval={LOG_EVERY}ba",
        f"eval_interval={10 * STEPS}ba", f"save_interval={10 * STEPS}ba", "precision=fp32", *extra]))
    clock = BatchStart()
    trainer.state.callbacks.insert(0, clock)
    trainer.state.callbacks.append(BatchEnd(clock))
    counts: Counter = Counter()

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if clock.batch is not None and caller.startswith(PACKAGE):
                counts[(clock.batch, name, f"{Path(caller).name}:{sys._getframe(1).f_lineno}")] += 1
            return original(self, *args, **kwargs)
        return wrapper

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    trainer.fit()
    trainer.close()
    monkeypatch.undo()
    outside = {k: v for k, v in counts.items() if k[0] % LOG_EVERY}
    assert not outside, outside
    assert any(k[0] % LOG_EVERY == 0 for k in counts)  # the counter sees drprune's reads on logging steps
