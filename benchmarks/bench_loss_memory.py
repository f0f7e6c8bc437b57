"""Peak memory of the training loss (cross-entropy, and cross-entropy + distillation KL) over bf16 logits:
the whole-tensor fp32 computation drprune used before against the fused, chunked one it uses now.

    python benchmarks/bench_loss_memory.py [--vocab 49152] [--tokens 2048] [--batch 1]

Each variant runs forward and backward in its own process, which reports its peak resident memory above
what it held once the inputs existed (interpreter, torch and inputs cancel out). That peak includes the
bf16 gradient of the logits, which every implementation must hand to the model's backward; the table
shows the peak with it and the loss's own memory beyond it (the target: >= 4x lower). The default is
SmolLM2's vocabulary at 2048 tokens.
"""
from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = r"""
import resource, sys, torch, torch.nn.functional as F
from drprune.models.losses import IGNORE_INDEX, kd_token_losses, token_losses
variant, kd, batch, tokens, vocab = sys.argv[1], sys.argv[2] == "1", *map(int, sys.argv[3:6])
torch.manual_seed(0)
logits = torch.randn(batch, tokens, vocab, dtype=torch.bfloat16).requires_grad_()
teacher = torch.randn(batch, tokens, vocab, dtype=torch.bfloat16) if kd else None
labels = torch.randint(0, vocab, (batch, tokens))
import os
base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024  # resident now, KiB
if variant == "whole":  # drprune's former computation: one fp32 copy of every [B, T, V] tensor
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").sum()
    if kd:
        log_s = F.log_softmax(logits[:, :-1].float(), dim=-1)
        log_t = F.log_softmax(teacher[:, :-1].float(), dim=-1)
        loss = loss + F.kl_div(log_s, log_t, log_target=True, reduction="none").sum()
else:
    loss = token_losses(logits, labels)[0].sum()
    if kd:
        loss = loss + kd_token_losses(logits, teacher, labels)[0].sum()
loss.backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024, float(loss))
"""


def measure(variant: str, kd: bool, batch: int, tokens: int, vocab: int) -> tuple[int, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, variant, "1" if kd else "0", str(batch), str(tokens),
                          str(vocab)], capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), float(out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    logits_mb = args.batch * args.tokens * args.vocab * 2 / 2**20
    print(f"bf16 logits [{args.batch}, {args.tokens}, {args.vocab}] = {logits_mb:.0f} MiB; peak above them, "
          "forward + backward")
    print(f"{'loss':<8} {'peak MiB: whole fp32':>21} {'fused':>6} {'ratio':>6} | {'beyond the gradient: whole':>27} "
          f"{'fused':>6} {'ratio':>6} | {'loss rel. diff':>14}")
    grad = logits_mb * 2**20
    for kd in (False, True):
        whole, whole_loss = measure("whole", kd, args.batch, args.tokens, args.vocab)
        fused, fused_loss = measure("fused", kd, args.batch, args.tokens, args.vocab)
        own_whole, own_fused = whole - grad, max(fused - grad, 1)
        print(f"{'CE + KL' if kd else 'CE':<8} {whole / 2**20:>21.0f} {fused / 2**20:>6.0f} {whole / fused:>5.1f}x | "
              f"{own_whole / 2**20:>27.0f} {own_fused / 2**20:>6.0f} {own_whole / own_fused:>5.1f}x | "
              f"{abs(whole_loss - fused_loss) / abs(whole_loss):>14.1e}")

if __name__ == "__main__":
    main()
