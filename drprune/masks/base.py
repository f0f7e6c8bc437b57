"""The one mask interface: `MaskSet` (and its file format) and `MaskGenerator`.

Every generator (L0 hard-concrete, hypernetwork, one-shot pruners) produces a MaskSet; the decoder
multiplies it in and the compaction path folds it away. The shape math behind masks (kinds, compact
configs, parameter counts) lives in `drprune.models.shapes`.
"""
from __future__ import annotations

import abc
import inspect
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from drprune.errors import ConfigError, UserError
from drprune.models.config import ModelConfig
from drprune.models.shapes import MASK_DIMS, validate_masks
from drprune.atomic import atomic_output
from drprune.convert.integrity import torch_load

def _legacy_name(name: str) -> str:
    """Sheared-LLaMA's zs files name masks `head_z`, `intermediate_z`, ...: drop the suffix."""
    return name[:-2] if name.endswith("_z") and name[:-2] in MASK_DIMS else name


MASKS_FORMAT = "drprune-masks/1"
HEADER_KEY = "drprune"  # the safetensors metadata key holding the JSON header


class MaskSet(dict):
    """Named mask tensors; a missing entry means that structure is not pruned.

    On disk (`save`/`load`, the one owner of mask files): safetensors holding one float32 tensor per
    mask, with a JSON header naming the format, every mask's shape and, when known, the source config
    the masks apply to. `load` also reads the legacy `torch.save` dicts (`zs_s*.pt`), without
    unpickling code.
    """

    def save(self, path: str | Path, *, source: ModelConfig | None = None, overwrite: bool = True) -> Path:
        """Write the masks atomically (a kill leaves the previous file or the new one)."""
        from safetensors.torch import save_file


        header = {"format": MASKS_FORMAT, "shapes": {k: list(v.shape) for k, v in self.items()},
                  "source_config": None if source is None else source.to_dict()}
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.items()}
        with atomic_output(path, overwrite=overwrite) as tmp:  # one sorted key: the same masks give the same bytes
            save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, cfg: ModelConfig | None = None) -> "MaskSet":
        """Read a mask file (validated against `cfg` when given); bad files are a UserError naming them."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"mask file {path} does not exist: give a file written by drprune (masks.safetensors, "
                            "zs_s*.safetensors) or a legacy torch.save dict of masks (zs_s*.pt)")
        if path.suffix == ".safetensors":
            masks = cls._read_safetensors(path)
        else:

            data = torch_load(path, mmap=False)
            if not isinstance(data, Mapping) or not all(torch.is_tensor(v) for v in data.values()):
                raise UserError(f"{path} is not a mask file: expected a mapping of mask names to tensors")
            masks = cls({_legacy_name(str(k)): v for k, v in data.items()})
        if cfg is not None:
            try:
                masks.validate(cfg)
            except ConfigError as err:
                raise UserError(f"{path}: {err}") from err
        return masks

    @classmethod
    def _read_safetensors(cls, path: Path) -> "MaskSet":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(HEADER_KEY, "{}"))
                masks = cls({k: f.get_tensor(k) for k in f.keys()})
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"cannot read mask file {path}: {err} (truncated or not a safetensors file?)") from err
        if meta.get("format") != MASKS_FORMAT:
            raise UserError(f"{path} is a safetensors file but not a drprune mask file (format "
                            f"{meta.get('format')!r}, expected {MASKS_FORMAT!r})")
        shapes = meta.get("shapes", {})
        if {k: list(v.shape) for k, v in masks.items()} != shapes:
            raise UserError(f"{path}: the masks do not match the shapes in its header ({shapes}); the file is corrupt")
        return masks

    @staticmethod
    def source_config(path: str | Path) -> ModelConfig | None:
        """The source config recorded in a mask file's header (None for legacy files or when absent)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            config = json.loads((f.metadata() or {}).get(HEADER_KEY, "{}")).get("source_config")
        return ModelConfig.from_dict(config) if config else None

    def validate(self, cfg: ModelConfig) -> "MaskSet":
        validate_masks(self, cfg)
        return self

    def detach(self) -> "MaskSet":
        return MaskSet({k: v.detach() for k, v in self.items()})


class MaskGenerator(nn.Module, abc.ABC):
    """Produces masks for a decoder: sampled in training, deterministic in eval."""

    @abc.abstractmethod
    def forward(self) -> MaskSet:
        """Masks for the next forward pass (sampled when `self.training`)."""

    @abc.abstractmethod
    def regularization(self, masks: MaskSet) -> tuple[Tensor, dict[str, Tensor | float]]:
        """(loss added to cross-entropy, scalar stats to log: 0-d tensors, read only when logged)."""

    @abc.abstractmethod
    def hard_masks(self) -> MaskSet:
        """Deterministic masks for compaction: 0 where pruned, else the scale to fold in."""

    def set_step(self, step: int) -> None:
        """Training progress (batches), for schedules; default: unused."""

    def after_optimizer_step(self) -> None:
        """Projection of the parameters after each optimizer step (e.g. clamping); default: none.

        Never done inside forward: an in-place change there breaks autograd views and FSDP.
        """

    def model_parameters_frozen(self) -> bool:
        """True when only the generator trains and the LLM stays fixed."""
        return False

    def param_groups(self, lag_lr: float) -> list[dict[str, Any]]:
        """Optimizer groups for the generator's own parameters."""
        return [{"params": list(self.parameters()), "lr": lag_lr, "weight_decay": 0.0}]


def keyed_generator(device: torch.device, seed: int, step: int, draw: int) -> torch.Generator:
    """A generator on `device` seeded from (seed, step, rank, draw): noise that a resumed run draws again
    exactly, whatever else consumed the global RNG, and that differs between ranks (each rank samples its
    own masks, as dropout would). Composer does not restore its RNG state when a self-resuming dataset
    restarts mid-epoch, so the global RNG could not give this."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    key = int(np.random.SeedSequence([seed, step, rank, draw]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(key)


def config_keys(generator: type[MaskGenerator]) -> list[str]:
    """The config keys a generator class takes: its constructor's parameters but the model config and prefix."""
    return [k for k in inspect.signature(generator).parameters if k not in ("cfg", "config_prefix")]
