"""The floating dtypes drprune stores, exports and runs models in, by their torch names (HF's `torch_dtype`).

Kept free of imports so the command-line options can list them without loading torch.
"""
from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16")
