"""Step time from FLOPs: what one optimizer step computes, over what the ranks deliver at an assumed utilisation.

Per optimizer step over all ranks, with D tokens (global batch x sequence length T) in S sequences:
- the student: 6 N D (forward 2, backward 4: activation and weight gradients), or 4 N D when the LLM is
  frozen (a hypernetwork: no weight gradients), N its matmul weights (every Linear and the output head;
  the embedding lookup costs nothing);
- attention scores and context: 12 L dq T^2 per sequence (forward 4, backward 8; no discount for the
  causal mask, as PaLM counts model FLOPs), dq = heads x head_dim;
- a teacher forward: 2 N_t D + 4 L_t dq_t T^2 S;
- activation checkpointing recomputes the student's forward, 2 N D + 4 L dq T^2 S more: hardware
  FLOPs, which the time uses, not model FLOPs, which utilisation is quoted against.
The mask generator, norms and losses are left out (well under 1% at LLM sizes).
time = hardware FLOPs / (ranks x peak FLOP/s x MFU).
"""
from __future__ import annotations

from dataclasses import dataclass

from drprune.models.config import ModelConfig
from drprune.plan.memory import cast_params

FORMULA = ("model FLOPs = (6 or, frozen LLM, 4) N D + 12 L dq T^2 S + teacher 2 N_t D + 4 L_t dq_t T^2 S; "
           "checkpointing adds 2 N D + 4 L dq T^2 S; time = FLOPs / (ranks x peak x MFU)")


@dataclass(frozen=True)
class StepTime:
    """One optimizer step's work and its estimated time."""

    tokens: int
    model_flops: float
    hardware_flops: float
    seconds: float
    run_seconds: float | None  # for max_duration given in batches

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def _attention(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of attention scores and context for one sequence (4 L dq T^2)."""
    return 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len**2


def step_time(student: ModelConfig, *, sequences: int, seq_len: int, trainable: bool, checkpointing: bool,
              teacher: ModelConfig | None, ranks: int, peak_flops: float, mfu: float,
              steps: int | None = None) -> StepTime:
    """Estimated time of one optimizer step of `sequences` sequences over all ranks."""
    tokens = sequences * seq_len
    n = cast_params(student)
    model = (6.0 if trainable else 4.0) * n * tokens + 3 * _attention(student, seq_len) * sequences
    if teacher is not None:
        model += 2.0 * cast_params(teacher) * tokens + _attention(teacher, seq_len) * sequences
    hardware = model + ((2.0 * n * tokens + _attention(student, seq_len) * sequences) if checkpointing else 0.0)
    seconds = hardware / (ranks * peak_flops * mfu)
    return StepTime(tokens, model, hardware, seconds, None if steps is None else steps * seconds)
