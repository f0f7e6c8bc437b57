"""Dynamic multi-domain mixture over per-domain MDS folders.

The sample stream is a pure function of (seed, p-schedule), laid out in global steps of
G = batch_size * world_size positions:

* step s covers positions [s, s+G); rank r takes positions [s + r*B, s + (r+1)*B), so ranks never
  share a position, and dataloader worker w of W takes every W-th step (the DataLoader's own
  round-robin order), so the stream does not depend on num_workers;
* the domains of step s are drawn i.i.d. from the p in force at s with an RNG seeded by (seed, s);
* the n-th draw of domain d is sample perm(seed, d, n // size_d)[n % size_d]: every pass over a
  domain is a fresh permutation, so a domain that runs out starts a reshuffled pass (logged) and
  no sample repeats within a pass.

Every worker replays the (cheap, integer-only) draws of all steps to keep the per-domain counters,
so the checkpoint holds only counters at one position plus the p-schedule: a few numbers.

p changes: `update_proportion` (main process, same call on every rank) appends (start, p) to a
schedule held in a shared-memory ring that forked workers read. `start` is the consumed position
plus `lag_batches` global steps, where lag_batches = num_workers * prefetch_factor is the most
batches the DataLoader can have requested ahead of the trainer; so a new p takes effect exactly
lag_batches batches after the call (immediately with num_workers=0), identically on every rank,
with or without a restart in between.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from drprune.data.shards import ShardReader
from drprune.errors import ConfigError
from drprune.mixture.rules import distribution

log = logging.getLogger(__name__)

HISTORY = 256  # p-schedule entries visible to workers; far more than can fall inside a lag window
_PERM_SALT = 0x5EED


def check_proportion(p, set_names: list[str], key: str) -> np.ndarray:
    """Validate a proportion vector (named `key` in errors) against set_names; float64 summing to exactly 1."""
    try:
        arr = distribution(p, key)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if arr.shape != (len(set_names),):
        raise ConfigError(f"{key} has {arr.size} entries but set_names has {len(set_names)} ({set_names})")
    return arr


class MixtureDataset(IterableDataset):
    """Infinite stream of {tokens, set, idx} drawn from per-domain folders root/<name> by proportion p."""

    def __init__(self, root: Path, set_names: list[str], proportion, *, batch_size: int, seq_len: int,
                 seed: int, rank: int = 0, world_size: int = 1, lag_batches: int = 0):
        super().__init__()
        self.set_names = list(set_names)
        self.readers = [ShardReader(Path(root) / name) for name in self.set_names]
        self.sizes = np.array([len(r) for r in self.readers], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.seq_len, self.seed, self.batch_size = seq_len, seed, batch_size
        self.rank, self.world_size, self.lag_batches = rank, world_size, lag_batches
        self.global_batch = batch_size * world_size
        p = check_proportion(proportion, self.set_names, key="proportion")
        # Main-process bookkeeping: counters at _base_pos, schedule from there on, consumed position.
        self._base_pos, self._base_counts = 0, np.zeros(len(self.set_names), dtype=np.int64)
        self._schedule: list[tuple[int, np.ndarray]] = [(0, p)]
        self._consumed = 0
        self._ring = torch.zeros(HISTORY, 1 + len(self.set_names), dtype=torch.float64).share_memory_()
        self._ring_count = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._publish(0, 0, p)

    # ----- proportion ---------------------------------------------------------------------------
    @property
    def proportion(self) -> list[float]:
        """The latest p (possibly still pending for lag_batches batches)."""
        return self._schedule[-1][1].tolist()

    def update_proportion(self, p) -> None:
        """Use p from `lag_batches` global steps after the samples consumed so far (see module doc)."""
        arr = check_proportion(p, self.set_names, key="update_proportion(p)")
        if np.array_equal(arr, self._schedule[-1][1]):
            return
        start = self._consumed + self.lag_batches * self.global_batch
        index = int(self._ring_count[0])
        if self._schedule[-1][0] == start:  # a second update before the first took effect
            self._schedule[-1] = (start, arr)
            index -= 1
        else:
            self._schedule.append((start, arr))
        self._publish(index, start, arr)
        log.info("proportion -> %s from global sample %d", np.round(arr, 4).tolist(), start)

    def _publish(self, index: int, start: int, p: np.ndarray) -> None:
        """Write schedule entry number `index` into the shared ring: the row first, then the count."""
        self._ring[index % HISTORY, 0] = float(start)
        self._ring[index % HISTORY, 1:] = torch.from_numpy(p)
        self._ring_count[0] = index + 1

    def note_consumed(self) -> None:
        """Called by the loader for every batch handed to the trainer."""
        self._consumed += self.global_batch

    # ----- drawing ------------------------------------------------------------------------------
    @staticmethod
    def _ring_rows(ring: np.ndarray, count: int) -> np.ndarray:
        """The ring's entries oldest first (start in column 0)."""
        return ring[[i % HISTORY for i in range(max(0, count - HISTORY), count)]]

    @staticmethod
    def _p_at(pos: int, rows: np.ndarray) -> np.ndarray:
        k = int(np.searchsorted(rows[:, 0], pos, side="right")) - 1
        if k < 0:
            raise RuntimeError(f"proportion history overrun at global sample {pos}: more than {HISTORY} "
                               "update_proportion calls within the prefetch window")
        return rows[k, 1:]

    def _draw(self, pos: int, p: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Domains and per-domain draw numbers of the step at `pos`; advances `counts` in place."""
        cum = np.cumsum(p)
        u = np.random.default_rng([self.seed, pos]).random(self.global_batch)
        domains = np.searchsorted(cum / cum[-1], u, side="right")
        onehot = domains[:, None] == np.arange(len(p))
        within = np.cumsum(onehot, axis=0)[np.arange(self.global_batch), domains] - 1
        draws = counts[domains] + within
        counts += onehot.sum(axis=0)
        return domains, draws

    def _replay(self, pos: int, counts: np.ndarray, until: int, schedule) -> np.ndarray:
        while pos < until:
            self._draw(pos, schedule(pos), counts)
            pos += self.global_batch
        return counts

    def _permutation(self, domain: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _PERM_SALT, domain, epoch])
        return rng.permutation(int(self.sizes[domain])).astype(np.int64)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        G, B = self.global_batch, self.batch_size
        cache: dict[str, Any] = {"count": -1}

        def schedule(pos: int) -> np.ndarray:
            count = int(self._ring_count[0])
            if count != cache["count"]:
                cache["rows"], cache["count"] = self._ring_rows(self._ring.numpy().copy(), count), count
            return self._p_at(pos, cache["rows"])

        counts = self._base_counts.copy()
        pos = self._base_pos
        step = self._consumed + worker * G  # first step this worker produces
        perms: dict[int, tuple[int, np.ndarray]] = {}
        verbose = worker == 0 and self.rank == 0
        while True:
            counts = self._replay(pos, counts, step, schedule)
            touched = -(-counts // self.sizes)  # passes begun so far
            domains, draws = self._draw(step, schedule(step), counts)
            if verbose:
                for d in np.flatnonzero(-(-counts // self.sizes) > np.maximum(touched, 1)):
                    log.info("domain %s exhausted at global sample %d: starting pass %d, reshuffled",
                             self.set_names[d], step, -(-counts[d] // self.sizes[d]) - 1)
            for d, n in zip(domains[self.rank * B:(self.rank + 1) * B], draws[self.rank * B:(self.rank + 1) * B]):
                epoch, j = divmod(int(n), int(self.sizes[d]))
                if perms.get(d, (None,))[0] != epoch:
                    perms[d] = (epoch, self._permutation(d, epoch))
                sid = int(perms[d][1][j])
                yield {"tokens": self.readers[d][sid]["tokens"][: self.seq_len], "set": int(d),
                       "idx": int(self.offsets[d]) + sid}
            pos = step + G
            step += workers * G

    # ----- checkpoint (Composer's dataset state protocol) ---------------------------------------
    def _schedule_at(self, pos: int) -> np.ndarray:
        return [p for start, p in self._schedule if start <= pos][-1]

    def state_dict(self, num_samples: int, from_beginning: bool = True) -> dict[str, Any]:
        """State after `num_samples` global samples (Composer passes sample_in_epoch, from_beginning)."""
        pos = int(num_samples) if from_beginning else self._base_pos + int(num_samples)
        if pos % self.global_batch:
            raise ValueError(f"cannot checkpoint the mixture at sample {pos}: not a multiple of the global "
                             f"batch {self.global_batch} (use drop_last=true)")
        if pos < self._base_pos:
            raise ValueError(f"cannot checkpoint the mixture at sample {pos}, before {self._base_pos}")
        counts = self._replay(self._base_pos, self._base_counts.copy(), pos, self._schedule_at)
        self._base_pos, self._base_counts = pos, counts
        keep = max(i for i, (start, _) in enumerate(self._schedule) if start <= pos)
        self._schedule = self._schedule[keep:]
        return {"version": 1, "set_names": self.set_names, "seed": self.seed, "position": pos,
                "counts": counts.tolist(), "schedule": [(s, p.tolist()) for s, p in self._schedule]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the checkpointed position with its counters and p-schedule (p restored)."""
        if state.get("set_names") != self.set_names:
            raise ConfigError(f"the checkpoint's data mixture has set_names {state.get('set_names')} but "
                              f"callbacks.data_loading.set_names is {self.set_names}")
        if state["position"] % self.global_batch:
            raise ConfigError(f"cannot resume at sample {state['position']} with global batch "
                              f"{self.global_batch}: keep global_train_batch_size as in the checkpoint")
        if state["seed"] != self.seed:
            log.warning("resuming the mixture with the checkpoint's seed %d (config seed %d)", state["seed"], self.seed)
            self.seed = int(state["seed"])
        self._base_pos = self._consumed = int(state["position"])
        self._base_counts = np.asarray(state["counts"], dtype=np.int64)
        self._schedule = [(int(s), np.asarray(p, dtype=np.float64)) for s, p in state["schedule"]]
        for index, (start, p) in enumerate(self._schedule):
            self._publish(index, start, p)
        log.info("mixture resumed at global sample %d, p=%s", self._base_pos, np.round(self.proportion, 4).tolist())
