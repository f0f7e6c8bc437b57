"""Run a training config through Composer's own FSDP1 path, recording every batch, on CPU or GPU.

    composer -n 2 tests/scripts/train_fsdp1.py RECORD CONFIG key=value ...

Rows go to RECORD-rank{r} as in train_recorded.py. At the end each rank writes RECORD-layout-rank{r}.json:
how Composer wrapped the model (the FSDP units, whether every block is one) and, for every parameter of
the mask generator, its type, dtype, shape and whether FSDP owns it, so a test can check that the
pruning state stayed whole, fp32 and out of FSDP.

Without CUDA (DRPRUNE_FSDP1_ON_CPU=1) four things are patched in this process only, so that Composer's
real `prepare_fsdp_module` runs over gloo: `torch.cuda.current_device`, which Composer passes to FSDP as
`device_id` (torch's FSDP1 accepts the CPU device); drprune's "FSDP1 needs CUDA" refusal (the `cuda`
argument of `drprune.parallel.plan_sharding`); and torch's `FlatParamHandle.to_cpu`, which a full
state dict with `offload_to_cpu` (how Composer saves a full checkpoint) enters: it "moves" the gathered
parameter to the CPU, a no-op there, then frees the gathered storage it still points to, and the
checkpoint's clone of it segfaults; and torch's refusal to `sync_module_states` CPU tensors (the
broadcast from rank 0 that drprune turns on, so that only rank 0 loads the weights, runs over gloo).
"""
import contextlib
import functools
import json
import os
import sys
from pathlib import Path

import torch
from composer.core import Callback
from composer.utils import dist
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp import _init_utils as fsdp_init
from torch.distributed.fsdp._flat_param import FlatParameter, FlatParamHandle

import drprune.train
from drprune.models.decoder import Block
from drprune.parallel import plan_sharding
from train_recorded import Record


def run_fsdp1_on_cpu() -> None:
    """Let Composer's CUDA-only FSDP1 path run on CPU (see the module docstring for the four patches)."""
    torch.cuda.current_device = lambda: torch.device("cpu")
    drprune.train.plan_sharding = functools.partial(plan_sharding, cuda=True)
    FlatParamHandle.to_cpu = already_on_cpu
    fsdp_init._check_module_states_for_sync_module_states = lambda states: None


@contextlib.contextmanager
def already_on_cpu(handle: FlatParamHandle):
    """FlatParamHandle.to_cpu when the compute device is the CPU: the gathered parameter stays as it is."""
    yield


def unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The module FSDP1 or its checkpoint wrapper wraps (the module itself when not wrapped)."""
    for name in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module"):
        if hasattr(module, name):
            return unwrapped(getattr(module, name))
    return module


class Layout(Callback):
    """At fit end: the FSDP units Composer built and the state of the mask generator's parameters."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fit_end(self, state, logger) -> None:
        model = state.model
        units = [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]
        flats = [u._flat_param for u in units if u._flat_param is not None]
        owned = {id(p) for u in units for p in u.parameters()} | {id(p) for f in flats for p in f._params or []}
        generator = model.mask_generator
        layout = {
            "units": [type(unwrapped(u)).__name__ for u in units],
            "blocks": sum(isinstance(m, Block) for m in model.modules()),
            "blocks_wrapped": sum(isinstance(unwrapped(u), Block) for u in units),
            "generator_is_unit": isinstance(generator, FullyShardedDataParallel),
            "flat_params": len(flats),
            "generator": {name: {"type": type(p).__name__, "dtype": str(p.dtype), "shape": list(p.shape),
                                 "in_fsdp": id(p) in owned, "flat": isinstance(p, FlatParameter),
                                 "finite": bool(torch.isfinite(p).all())}
                          for name, p in generator.named_parameters()},
        }
        self.path.write_text(json.dumps(layout, indent=1))


def main() -> None:
    record, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    if os.environ.get("DRPRUNE_FSDP1_ON_CPU") == "1":
        run_fsdp1_on_cpu()
    trainer = drprune.train.build_trainer(drprune.train.load_config(config, overrides))
    rank = dist.get_global_rank()
    trainer.state.callbacks.extend([Record(Path(f"{record}-rank{rank}"), None),
                                    Layout(Path(f"{record}-layout-rank{rank}.json"))])
    trainer.fit()
    trainer.close()


if __name__ == "__main__":
    main()
