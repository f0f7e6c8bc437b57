"""Errors the user can fix: the CLI prints them without a traceback."""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """Bad input (config, path, checkpoint); the message names the problem and the fix."""


class ConfigError(UserError):
    """A config key holds a value we cannot use; raised before any heavy work starts."""


def nearest(key: str, valid: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The valid name closest to a misspelt `key` (None when nothing is close)."""
    near = difflib.get_close_matches(str(key), sorted(valid), n=1, cutoff=cutoff)
    return near[0] if near else None


def check_keys(given: Iterable[str], valid: Iterable[str], prefix: str) -> None:
    """Refuse the first key of `given` not in `valid`, naming `prefix.key` and the nearest valid key."""
    valid = sorted(valid)
    unknown = sorted(set(given) - set(valid))
    if not unknown:
        return
    key = str(unknown[0])
    where = f"{prefix}.{key}" if prefix else key
    near = nearest(key, valid)
    hint = f"did you mean {f'{prefix}.' if prefix else ''}{near}?" if near else f"valid keys: {', '.join(valid)}."
    raise ConfigError(f"unknown config key {where} (it would be ignored): {hint} Fix or remove it")
