"""Progress of long loops that reads well wherever stderr goes.

On a terminal: a tqdm bar on stderr, redrawn in place and gone when the loop ends. Anywhere else (a
log file, CI, a pipe), every redraw of a bar is one more line of carriage returns, so the loop logs
instead: one INFO line every `LOG_EVERY_S` seconds ("compact model.pt: 120/291 tensors (41%), 41s,
about 59s left") and a closing line once it has logged any, the way Composer's console logger reports
training. Loops shorter than the interval leave nothing in a log. Every drprune loop that can take
minutes (data prepare, calibration scoring, compaction, HF and GGUF export, perplexity) goes through
here. Training's Composer bar follows the same rule (`composer_console`), and other libraries' bars
(transformers' GGUF de-quantizing, datasets, hub downloads) are switched off in logs (`bars_off_terminal`).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0  # seconds between log lines where stderr is not a terminal
# tqdm's default for `disable`, read once, when tqdm is first imported (tqdm >= 4.66).
TQDM_SWITCH = "TQDM_DISABLE"

T = TypeVar("T")


class Progress:
    """Counts units of work done (`update`); a context manager that closes its bar or logs its last line."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", every_s: float | None = None):
        self.desc, self.total, self.unit = desc, total, unit
        self.every_s = LOG_EVERY_S if every_s is None else every_s
        self.done = 0
        self._bar = None
        # Asked when the loop starts, not at import: a test or the demo may redirect stderr in between.
        if sys.stderr.isatty():
            from tqdm import tqdm  # here, not at the top: `bars_off_terminal` must run before tqdm loads

            self._bar = tqdm(desc=desc, total=total, unit=unit, leave=False)
        self._start = self._last = time.monotonic()
        self._logged = False

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._log(now - self._start)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._logged:
            log.info("%s: %s %s done in %.0fs", self.desc, f"{self.done:,}", self.unit, time.monotonic() - self._start)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _log(self, elapsed: float) -> None:
        self._logged = True
        if not self.total:
            log.info("%s: %s %s, %.0fs", self.desc, f"{self.done:,}", self.unit, elapsed)
            return
        left = elapsed * (self.total - self.done) / max(self.done, 1)
        log.info("%s: %s/%s %s (%.0f%%), %.0fs, about %.0fs left", self.desc, f"{self.done:,}", f"{self.total:,}",
                 self.unit, 100 * self.done / self.total, elapsed, left)


def composer_console(progress_bar: bool, log_to_console: bool) -> tuple[bool, bool]:
    """Composer's (progress_bar, log_to_console) for a run config's: its bars draw train and eval on two
    lines with cursor-up codes, which a log file keeps as one line per refresh, so off a terminal a
    requested bar becomes Composer's console logger (a line every `console_log_interval`)."""
    if progress_bar and not sys.stderr.isatty():
        return False, True
    return progress_bar, log_to_console


def bars_off_terminal() -> None:
    """Off a terminal, make tqdm's bars off by default: other libraries' bars (transformers' GGUF
    de-quantizing, datasets, hub downloads; child processes inherit it) have no log-line mode. tqdm reads
    the switch when first imported, so the CLI calls this before any command runs, and nothing the CLI
    imports first loads tqdm. A bar its caller switches on explicitly (lm-evaluation-harness's) still
    draws."""
    if not sys.stderr.isatty():
        os.environ[TQDM_SWITCH] = "1"


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
          every_s: float | None = None) -> Iterator[T]:
    """`items`, one at a time, counted by a `Progress` (total: len(items) when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(desc, total, unit, every_s) as progress:
        for item in items:
            yield item
            progress.update()
