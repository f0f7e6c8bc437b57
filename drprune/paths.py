"""Where the configs that ship inside the package live (found the same way in editable and wheel installs)."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def config_dir(*parts: str) -> Path:
    """drprune/configs/<parts>: the shipped run configs, demo configs and lm-eval task pack."""
    return Path(str(files("drprune"))).joinpath("configs", *parts)


def packaged_config(path: str | Path) -> Path | None:
    """A shipped config named like a checkout path (`configs/tiny/prune.yaml` or `tiny/prune.yaml`), if any."""
    parts = Path(path).parts
    if parts[:1] == ("configs",):
        parts = parts[1:]
    if not parts or Path(path).is_absolute():
        return None
    candidate = config_dir(*parts)
    return candidate if candidate.is_file() else None
