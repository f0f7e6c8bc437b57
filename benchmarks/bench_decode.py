"""Greedy decoding speed of the remote-code model (KV cache) against stock LlamaForCausalLM of the same shape.

    python benchmarks/bench_decode.py [--d-model 256] [--layers 4] [--heads 4] [--new-tokens 256] [--device cpu]

Builds a random LLaMA, saves it as a stock HF folder and exports the same weights through the remote-code
path (`export_hf(..., remote_code=True)`), then times a greedy generation of --new-tokens tokens from a
16-token prompt: best of --repeats runs, the models taking turns so that load on a shared CPU hits them
alike. Target: remote-code decode tokens/s >= 0.9x stock. The remote-code model without its cache is
shown for scale.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import transformers

from drprune.compact.export import export_hf
from drprune.convert.checkpoint import load_hf


def build_folders(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """(stock folder, remote-code folder) holding the same random weights."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_model * 8 // 3 // 16 * 16,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=2048,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(work / "stock")
    cfg, tensors, _ = load_hf(str(work / "stock"))
    export_hf(cfg, tensors, work / "remote", remote_code=True)
    return work / "stock", work / "remote"


@torch.no_grad()
def decode_tokens_per_s(runs: dict[str, tuple], new_tokens: int, repeats: int, device: str) -> dict[str, float]:
    """Best greedy tokens/s of each (model, generate kwargs) in `runs`, runs interleaved."""
    prompt = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)

    def seconds(model, kwargs) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for model, kwargs in runs.values():  # warm-up
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, pad_token_id=0, **kwargs)
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            best[name] = min(best[name], seconds(*run))
    return {name: new_tokens / s for name, s in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        stock_dir, remote_dir = build_folders(Path(tmp), args)
        stock = transformers.AutoModelForCausalLM.from_pretrained(stock_dir).to(args.device).eval()
        remote = transformers.AutoModelForCausalLM.from_pretrained(remote_dir, trust_remote_code=True)
        remote = remote.to(args.device).eval()
    runs = {"stock LlamaForCausalLM": (stock, {}), "remote code, KV cache": (remote, {}),
            "remote code, no cache": (remote, {"use_cache": False})}
    rows = decode_tokens_per_s(runs, args.new_tokens, args.repeats, args.device)

    base = rows["stock LlamaForCausalLM"]
    print(f"\nd_model {args.d_model}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}; greedy "
          f"{args.new_tokens} new tokens from 16, fp32 on {args.device} ({torch.get_num_threads()} threads)")
    print(f"{'model':<26}{'decode tok/s':>14}{'vs stock':>10}")
    for name, tokens_per_s in rows.items():
        print(f"{name:<26}{tokens_per_s:>14.1f}{tokens_per_s / base:>10.2f}")


if __name__ == "__main__":
    main()
