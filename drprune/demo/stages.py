"""Cached, fingerprinted stages of the demo inside its output folder.

A stage folder is reused only when its `stage.json` fingerprint equals the one computed from the
current inputs; fingerprints chain (a stage's inputs include the fingerprints of the stages it reads),
so a new source model or corpus rebuilds everything downstream and models are never mixed. A stage is
built in a temporary folder that is renamed into place only when it succeeds.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

from drprune.atomic import atomic_output

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"


def fingerprint(inputs: dict[str, Any]) -> str:
    """Short hash of a stage's inputs (sorted JSON; other values by str()), so any change rebuilds it."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_identity(path: Path) -> dict[str, Any]:
    """Cheap identity of a large input file (path, size, mtime) without hashing gigabytes."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class Stage:
    """One cached demo step in root/name; reused only while its inputs' fingerprint is unchanged."""

    def __init__(self, root: Path, name: str, inputs: dict[str, Any]) -> None:
        self.name, self.inputs = name, inputs
        self.dir = root / name
        self.fingerprint = fingerprint(inputs)

    def is_valid(self) -> bool:
        try:
            saved = json.loads((self.dir / STAGE_FILE).read_text())
        except (OSError, ValueError):
            return False
        return saved.get("fingerprint") == self.fingerprint

    def ensure(self, build: Callable[[Path], None]) -> Path:
        """Reuse the stage folder if valid, else build it afresh into a temporary folder first."""
        if self.is_valid():
            log.info("stage %s: reusing %s", self.name, self.dir)
            return self.dir
        if self.dir.exists():
            log.info("stage %s: %s is from other inputs (or incomplete); rebuilding", self.name, self.dir)
        with atomic_output(self.dir, overwrite=True, folder=True) as tmp:
            build(tmp)
            (tmp / STAGE_FILE).write_text(json.dumps(
                {"fingerprint": self.fingerprint, "inputs": self.inputs}, indent=2, default=str) + "\n")
        return self.dir
