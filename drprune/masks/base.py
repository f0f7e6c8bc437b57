"""The one mask interface: `MaskSet`, `MaskGenerator`, shapes from masks, parameter counting.

Every generator (L0 hard-concrete, hypernetwork, one-shot pruners) produces a MaskSet; the decoder
multiplies it in and the compaction path folds it away. Parameter counting is one formula used
three ways: differentiable on soft masks (budget losses), exact on hard masks (predicted size of
the compact model) and on a compact config (its real size).
"""
from __future__ import annotations

import abc
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from drprune.errors import ConfigError, UserError
from drprune.models.config import LayerSpec, ModelConfig

# name -> shape in terms of the source config (L layers, H_kv KV groups, I intermediate, d hidden)
MASK_DIMS: dict[str, tuple[str, ...]] = {
    "head": ("L", "H_kv"),
    "head_layer": ("L",),
    "mlp": ("L",),
    "layer": ("L",),
    "intermediate": ("L", "I"),
    "hidden": ("d",),
    "attn_in": ("L", "d"),
    "attn_out": ("L", "d"),
    "mlp_in": ("L", "d"),
    "mlp_out": ("L", "d"),
}
RESIDUAL_SELECTIONS = ("attn_in", "attn_out", "mlp_in", "mlp_out")


def _legacy_name(name: str) -> str:
    """Sheared-LLaMA's zs files name masks `head_z`, `intermediate_z`, ...: drop the suffix."""
    return name[:-2] if name.endswith("_z") and name[:-2] in MASK_DIMS else name


def mask_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    sizes = {"L": cfg.n_layers, "H_kv": cfg.n_kv_heads, "I": cfg.intermediate_size, "d": cfg.d_model}
    return tuple(sizes[d] for d in MASK_DIMS[name])


MASKS_FORMAT = "drprune-masks/1"


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

        from drprune.atomic import atomic_output

        header = {"format": MASKS_FORMAT, "shapes": json.dumps({k: list(v.shape) for k, v in self.items()})}
        if source is not None:
            header["source_config"] = json.dumps(source.to_dict())
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.items()}
        with atomic_output(path, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp), metadata=header)
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
            from drprune.convert.integrity import torch_load

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
                meta = f.metadata() or {}
                masks = cls({k: f.get_tensor(k) for k in f.keys()})
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"cannot read mask file {path}: {err} (truncated or not a safetensors file?)") from err
        if meta.get("format") != MASKS_FORMAT:
            raise UserError(f"{path} is a safetensors file but not a drprune mask file (format "
                            f"{meta.get('format')!r}, expected {MASKS_FORMAT!r})")
        shapes = json.loads(meta.get("shapes", "{}"))
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
            text = (f.metadata() or {}).get("source_config")
        return ModelConfig.from_dict(json.loads(text)) if text else None

    def validate(self, cfg: ModelConfig) -> "MaskSet":
        if not cfg.is_uniform:
            raise ConfigError("masks apply to a full (uniform) model, not to an already compacted one")
        for name, value in self.items():
            if name not in MASK_DIMS:
                raise ConfigError(f"unknown mask {name!r}; valid masks are {sorted(MASK_DIMS)}")
            if tuple(value.shape) != mask_shape(name, cfg):
                raise ConfigError(
                    f"mask {name!r} has shape {tuple(value.shape)} but the model needs {mask_shape(name, cfg)}"
                )
        if "hidden" in self and any(n in self for n in RESIDUAL_SELECTIONS):
            raise ConfigError("a global `hidden` mask cannot be combined with per-layer residual selections")
        return self

    def detach(self) -> "MaskSet":
        return MaskSet({k: v.detach() for k, v in self.items()})


class MaskGenerator(nn.Module, abc.ABC):
    """Produces masks for a decoder: sampled in training, deterministic in eval."""

    @abc.abstractmethod
    def forward(self) -> MaskSet:
        """Masks for the next forward pass (sampled when `self.training`)."""

    @abc.abstractmethod
    def regularization(self, masks: MaskSet) -> tuple[Tensor, dict[str, float]]:
        """(loss added to cross-entropy, scalar stats to log)."""

    @abc.abstractmethod
    def hard_masks(self) -> MaskSet:
        """Deterministic masks for compaction: 0 where pruned, else the scale to fold in."""

    def set_step(self, step: int) -> None:
        """Training progress (batches), for schedules; default: unused."""

    def model_parameters_frozen(self) -> bool:
        """True when only the generator trains and the LLM stays fixed."""
        return False

    def param_groups(self, lag_lr: float) -> list[dict[str, Any]]:
        """Optimizer groups for the generator's own parameters."""
        return [{"params": list(self.parameters()), "lr": lag_lr, "weight_decay": 0.0}]


def mask_generator_from_state(cfg: ModelConfig, state: Mapping[str, Any]) -> MaskGenerator:
    """Rebuild a checkpoint's mask generator (in eval mode) from the config it recorded.

    `state` is a model state dict holding `mask_generator.*` entries, as the Composer Trainer saves it.
    """
    from drprune.masks import build_mask_generator  # the registry imports this module

    prefix = "mask_generator."
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not own:
        raise UserError("the checkpoint holds no mask generator (no mask_generator.* entries): it is not a "
                        "pruning checkpoint, so there are no masks to fold")
    extra = own.get("_extra_state")
    if not isinstance(extra, dict) or "name" not in extra:
        raise UserError("the checkpoint's mask generator does not record its config (_extra_state with a name): "
                        "it was written by an older drprune; re-save it from a current pruning run")
    generator = build_mask_generator(cfg, {"mask_generator": {"name": extra["name"], **extra.get("params", {})}})
    assert generator is not None  # a mask_generator node was given
    try:
        generator.load_state_dict(own, strict=True)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"the checkpoint's mask generator does not match its model: {err}") from err
    return generator.eval()


# ------------------------------------------------------------------ shapes from hard masks

def _kept(mask: Tensor | None) -> list[int] | None:
    return None if mask is None else torch.nonzero(mask != 0).flatten().tolist()


def compact_config(cfg: ModelConfig, masks: Mapping[str, Tensor]) -> tuple[ModelConfig, list[int]]:
    """The config of the model left after removing what hard `masks` zero, and the kept layer ids."""
    MaskSet(masks).validate(cfg)
    hidden = _kept(masks.get("hidden"))
    d_model = cfg.d_model if hidden is None else len(hidden)
    specs, kept_layers = [], []
    for i in range(cfg.n_layers):
        if "layer" in masks and masks["layer"][i] == 0:
            continue
        n_kv = cfg.n_kv_heads if "head" not in masks else int((masks["head"][i] != 0).sum())
        if "head_layer" in masks and masks["head_layer"][i] == 0:
            n_kv = 0
        inter = cfg.intermediate_size if "intermediate" not in masks else int((masks["intermediate"][i] != 0).sum())
        if "mlp" in masks and masks["mlp"][i] == 0:
            inter = 0
        sel = {n: _kept(masks[n][i]) if n in masks else None for n in RESIDUAL_SELECTIONS}
        if n_kv == 0:
            sel["attn_in"] = sel["attn_out"] = None
        if inter == 0:
            sel["mlp_in"] = sel["mlp_out"] = None
        if n_kv == 0 and inter == 0:
            continue
        specs.append(LayerSpec(n_kv * cfg.group_size, n_kv, inter, **sel))
        kept_layers.append(i)
    if not specs:
        raise ConfigError("the masks remove every layer (every head and every MLP channel): nothing is left")
    first = specs[0]
    uniform = all(
        s == first and s.has_attn and s.has_mlp and all(getattr(s, n) is None for n in RESIDUAL_SELECTIONS)
        for s in specs
    )
    new = replace(
        cfg, d_model=d_model, n_layers=len(specs),
        n_heads=first.n_heads if uniform else cfg.n_heads,
        n_kv_heads=first.n_kv_heads if uniform else cfg.n_kv_heads,
        intermediate_size=first.intermediate_size if uniform else cfg.intermediate_size,
        layers=None if uniform else specs,
    )
    return new, kept_layers


# ------------------------------------------------------------------ parameter counting

def _norm_params(cfg: ModelConfig, width: Any) -> Any:
    return width * (2 if cfg.norm == "layernorm" else 1)


def _attn_params(cfg: ModelConfig, n_kv: Any, d_in: Any, d_out: Any) -> Any:
    q_out = n_kv * cfg.group_size * cfg.head_dim
    qkv_out = q_out + 2 * n_kv * cfg.head_dim
    n = d_in * qkv_out + q_out * d_out + _norm_params(cfg, d_in)
    if cfg.qkv_bias:
        n = n + qkv_out
    if cfg.o_bias:
        n = n + d_out
    return n


def _mlp_params(cfg: ModelConfig, inter: Any, d_in: Any, d_out: Any) -> Any:
    n_in = 2 if cfg.mlp == "gated" else 1
    n = d_in * inter * n_in + inter * d_out + _norm_params(cfg, d_in)
    if cfg.mlp_bias:
        n = n + inter * n_in + d_out
    return n


def _embedding_params(cfg: ModelConfig, d: Any) -> Any:
    """Token embedding and output head; the final norm counts as a non-embedding parameter."""
    return cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)


def config_params(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Exact parameter count of a (possibly compact) model config."""
    def width(selection: list[int] | None) -> int:
        return cfg.d_model if selection is None else len(selection)

    total = _norm_params(cfg, cfg.d_model) + (_embedding_params(cfg, cfg.d_model) if embeddings else 0)
    for i in range(cfg.n_layers):
        s = cfg.layer_spec(i)
        if s.has_attn:
            total += _attn_params(cfg, s.n_kv_heads, width(s.attn_in), width(s.attn_out))
        if s.has_mlp:
            total += _mlp_params(cfg, s.intermediate_size, width(s.mlp_in), width(s.mlp_out))
    return int(total)


def expected_params(cfg: ModelConfig, masks: Mapping[str, Tensor], embeddings: bool = True) -> Tensor:
    """Differentiable parameter count for soft masks (values are keep probabilities or samples).

    With hard 0/1 masks it equals `config_params(compact_config(cfg, masks))`.
    """
    def total(name: str, i: int | None, full: int) -> Tensor | int:
        if name not in masks:
            return full
        m = masks[name] if i is None else masks[name][i]
        return m.sum()

    d = total("hidden", None, cfg.d_model)
    count = _norm_params(cfg, d) + (_embedding_params(cfg, d) if embeddings else 0)
    for i in range(cfg.n_layers):
        layer = masks["layer"][i] if "layer" in masks else 1.0
        n_kv = total("head", i, cfg.n_kv_heads)
        inter = total("intermediate", i, cfg.intermediate_size)
        attn_on = layer * (masks["head_layer"][i] if "head_layer" in masks else 1.0) * _nonzero(n_kv)
        mlp_on = layer * (masks["mlp"][i] if "mlp" in masks else 1.0) * _nonzero(inter)
        attn = _attn_params(cfg, n_kv, total("attn_in", i, d), total("attn_out", i, d))
        mlp = _mlp_params(cfg, inter, total("mlp_in", i, d), total("mlp_out", i, d))
        count = count + attn_on * attn + mlp_on * mlp
    return torch.as_tensor(count, dtype=torch.float32)


def _nonzero(x: Tensor | int) -> Tensor | float:
    """1 when any unit is kept: a sub-layer with no unit left is removed whole (norm included)."""
    if isinstance(x, Tensor):
        return (x > 0).to(x.dtype)
    return float(x > 0)
