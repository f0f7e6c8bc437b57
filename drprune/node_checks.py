"""Expensive input checks done by one process per node, with every rank agreeing on the outcome.

Hashing every tensor of a checkpoint and every shard of the data is worth doing once per machine, not
once per rank: on 8 ranks per node that is 8 full reads of an 8B checkpoint and of the dataset before
step 0. `agreed` runs a check on every rank, telling it whether it is its node's leader (local rank 0,
the one that verifies hashes); then all ranks exchange their errors, so a bad input stops every rank with
the same one-line message instead of leaving the others waiting at the next collective.
"""
from __future__ import annotations

from typing import Callable, TypeVar

from composer.devices import DeviceCPU, DeviceGPU
from composer.utils import dist

from drprune.errors import ConfigError, UserError

T = TypeVar("T")
_ERRORS = {"UserError": UserError, "ConfigError": ConfigError}


def start_distributed(timeout: float, cuda: bool) -> None:
    """Initialise the process group now (Composer's Trainer finds it initialised and keeps it)."""
    dist.initialize_dist(DeviceGPU() if cuda else DeviceCPU(), timeout)


def agreed(check: Callable[[bool], T]) -> T:
    """`check(leader)` on every rank; if any rank raised a UserError, every rank raises the first one."""
    result, raised, error = None, None, None
    try:
        result = check(dist.get_local_rank() == 0)
    except UserError as err:
        raised, error = err, (type(err).__name__ if type(err).__name__ in _ERRORS else "UserError", str(err))
    if dist.get_world_size() > 1:
        errors = [e for e in dist.all_gather_object(error) if e is not None]
        first = errors[0] if errors else None
        if first is not None and first != error:
            raise _ERRORS[first[0]](first[1])
    if raised is not None:
        raise raised
    return result
