"""Memory and time of `drprune compact` and `convert composer-to-hf`, and the compact model's speed-up.

    python benchmarks/bench_compact.py [--size 1b|tiny] [--dtype fp32|bf16] [--workdir DIR]

Builds a random ~1B-parameter LLaMA pruning checkpoint (weights + L0 mask generator) with a ~50%
parameter target, runs both commands as separate processes and reports each one's peak RSS over the
output model's size in bytes (target <= 1.5) and wall time, then the inference tokens/s of the
compact HF model over the full one (stock LlamaForCausalLM both; target >= 1.6x on CPU).
"""
from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from drprune.convert.checkpoint import decoder_state, load_model_state, write_hf_folder
from drprune.models.shapes import config_params
from drprune.masks.l0 import L0MaskGenerator
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder

SIZES = {  # source shape, ~50% parameter target
    "1b": (dict(d_model=2048, n_layers=16, n_heads=16, intermediate_size=5504, vocab_size=32000),
           dict(d_model=1536, n_heads=12, n_layers=14, intermediate_size=4096)),
    "tiny": (dict(d_model=256, n_layers=4, n_heads=4, intermediate_size=688, vocab_size=4000),
             dict(d_model=192, n_heads=3, n_layers=3, intermediate_size=512)),
}
MODULES = ["head", "intermediate", "layer", "hidden"]
RSS_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(rc)")


def make_checkpoint(path: Path, cfg: ModelConfig, target: dict, dtype: torch.dtype) -> None:
    """A pruning checkpoint as the Trainer writes it: decoder + mask generator under state.model."""
    torch.manual_seed(0)
    decoder = PrunableDecoder(cfg).to(dtype)
    generator = L0MaskGenerator(cfg, MODULES, target)
    with torch.no_grad():
        for gate in generator.gates.values():
            gate.log_alpha.normal_(0, 2)
    state = {f"model.{k}": v for k, v in decoder.state_dict().items()}
    state.update({f"mask_generator.{k}": v for k, v in generator.state_dict().items()})
    torch.save({"state": {"model": state}}, path)


def measured(*args: str) -> tuple[int, float]:
    """(peak RSS in bytes, wall seconds) of `python -m drprune.cli ARGS` in its own process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RSS_WRAPPER, sys.executable, "-m", "drprune.cli", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return int(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def tokens_per_s(hf_dir: Path, batch: int, seq_len: int, new_tokens: int) -> dict[str, float]:
    import transformers

    from drprune.eval.speed import throughput

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = throughput(model, batch=batch, seq_len=seq_len, new_tokens=new_tokens, repeats=2)
    del model
    gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--workdir", help="where the checkpoints go (default: a temporary folder)")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    shape, target = SIZES[args.size]
    cfg = ModelConfig(family="llama", context_length=2048, **shape)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-compact-"))
    work.mkdir(parents=True, exist_ok=True)

    ckpt = work / "prune.pt"
    make_checkpoint(ckpt, cfg, target, dtype)
    gc.collect()
    rss_c, t_c = measured("compact", str(ckpt), "--out", str(work / "compact.pt"))
    rss_h, t_h = measured("convert", "composer-to-hf", str(work / "compact.pt"), str(work / "hf-compact"))
    compact_cfg = ModelConfig.from_dict(load_model_state(work / "compact.pt")["model._extra_state"]["model_config"])
    out_bytes = config_params(compact_cfg) * dtype.itemsize

    full_state = load_model_state(ckpt)
    write_hf_folder(cfg, decoder_state(full_state), work / "hf-full")
    del full_state
    speed_args = dict(batch=1, seq_len=128, new_tokens=16)
    full, small = tokens_per_s(work / "hf-full", **speed_args), tokens_per_s(work / "hf-compact", **speed_args)

    print(f"\nsource {config_params(cfg) / 1e6:.0f}M params ({args.dtype}, checkpoint "
          f"{ckpt.stat().st_size / 2**30:.2f} GiB) -> compact {config_params(compact_cfg) / 1e6:.0f}M params "
          f"({config_params(compact_cfg) / config_params(cfg):.0%}); output model {out_bytes / 2**30:.2f} GiB; "
          f"{torch.get_num_threads()} threads")
    print(f"{'step':<34}{'peak RSS GiB':>13}{'RSS / output':>14}{'wall s':>9}")
    for name, rss, wall in (("drprune compact", rss_c, t_c), ("convert composer-to-hf", rss_h, t_h)):
        print(f"{name:<34}{rss / 2**30:>13.2f}{rss / out_bytes:>14.2f}{wall:>9.1f}")
    print(f"{'inference (HF, fp32)':<34}{'full tok/s':>13}{'compact tok/s':>14}{'ratio':>9}")
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        print(f"{key:<34}{full[key]:>13.1f}{small[key]:>14.1f}{small[key] / full[key]:>9.2f}")


if __name__ == "__main__":
    main()
