"""The typed request of `drprune oneshot`: light to import, so the CLI builds it before any heavy module loads."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class OneshotOptions:
    """One `drprune oneshot` request: flags over --config values over defaults (resolved by the CLI)."""

    command: str  # layers | width | vocab
    model: str
    out: str
    calib: str | None = None
    tokenizer: str | None = None
    seq_len: int = 256
    max_rows: int = 32
    batch_size: int = 4
    eval_data: str | None = None
    eval_max_rows: int | None = None
    overwrite: bool = False
    trust_pickle: bool = False
    device: str = "auto"  # where the model is scored and evaluated (drprune.compute)
    dtype: str = "auto"   # its weights' dtype meanwhile; model.pt holds them in it, the HF export the source's
    # layers
    num_blocks_to_prune: int | None = None
    pruning_method: str = "angular"
    pruning_token: str = "all"
    skip_blocks: list[int] = field(default_factory=list)
    protect_copy_layers: int = 0  # the K blocks copying needs most are never removed (copy_importance)
    # width
    importance: str = "taylor"
    taylor: str = "element"
    seed: int = 0
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    intermediate_size: int | None = None
    protect_copy_heads: int = 0  # the K KV groups copying needs most are kept whatever the importance says
    copy_score: str = "induction"  # how protect_copy_heads ranks them: induction | ablation (copy_importance)
    drop_layers: list[int] | None = None
    pruning_ratio: float | None = None
    block_attention_layer_start: int | None = None
    block_attention_layer_end: int | None = None
    block_mlp_layer_start: int | None = None
    block_mlp_layer_end: int | None = None
    # vocab
    keep: int | None = None
