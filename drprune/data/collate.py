"""Batch collation shared by the train mixture and the eval loaders."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples {tokens, set (int), idx} into int64 input_ids/labels [B, T], set [B], idx [B].

    Tokens are cast from uint16/uint32 here (torch has no usable uint16 embedding input); labels equal
    input_ids because the model shifts them.
    """
    input_ids = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
    return {
        "input_ids": input_ids,
        "labels": input_ids.clone(),
        "set": torch.tensor([s["set"] for s in samples], dtype=torch.int64),
        "idx": torch.tensor([s["idx"] for s in samples], dtype=torch.int64),
    }
