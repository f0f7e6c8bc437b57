"""prune -> compact -> continued pretraining -> HF, with the tiny config on CPU (scripts/prune.sh)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import transformers
from composer.loggers import InMemoryLogger

from drprune.cli import main
from drprune.convert.checkpoint import load_decoder
from drprune.data.testing import write_synthetic_mds
from drprune.train import build_trainer, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_pruning_run_compacts_to_its_target_and_continues_training(tmp_path):
    data = write_synthetic_mds(tmp_path / "mds", {"a": "random", "b": "repetitive"}, seq_len=64,
                               vocab_size=49152, n_train=64, n_eval=8)
    run = tmp_path / "prune"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "prune.sh"), str(data), "[a,b]", str(run), "max_duration=6ba",
         "save_interval=6ba", "eval_interval=6ba",
         "loggers.inmemory={}"],  # build_loggers fails without any logger (callbacks/__init__.py)
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compact = run / "pruned-latest-rank0.pt"
    cfg = load_decoder(compact).cfg
    target = load_config(str(ROOT / "configs/tiny/prune.yaml"), []).model.mask_generator.target_model
    assert cfg.is_uniform
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.intermediate_size) == (
        target.d_model, target.n_heads, target.n_layers, target.intermediate_size)

    overrides = [f"model.path={compact}", f"data_local={data}", "callbacks.data_loading.set_names=[a,b]",
                 f"save_folder={tmp_path / 'cont'}", "loggers.inmemory={}", "max_duration=16ba"]
    trainer = build_trainer(load_config(str(ROOT / "configs/tiny/continue_pretrain.yaml"), overrides))
    assert trainer.state.model.mask_generator is None
    trainer.fit()
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    ce = [float(v) for _, v in memory.data["loss/train/ce_loss"]]
    assert sum(ce[-3:]) / 3 < sum(ce[:3]) / 3 - 0.3, ce
    trainer.close()

    hf_dir = tmp_path / "hf"
    assert main(["convert", "composer-to-hf", str(tmp_path / "cont" / "latest-rank0.pt"), str(hf_dir)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    decoder = load_decoder(tmp_path / "cont" / "latest-rank0.pt").eval()
    ids = torch.randint(0, 49152, (1, 12))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, decoder(ids), atol=1e-5)
