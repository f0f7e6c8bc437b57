"""Every shipped large-model config builds on the meta device, and Composer's FSDP wrap plan covers it.

The large configs (those on `base: ../base/prune.yaml`: 1B-13B models, FSDP, bf16, activation
checkpointing) cannot be trained in a test, but their shapes can: the PrunableLM and its mask generator
are built through drprune's own config path under `torch.device("meta")` (no weights, well under a second
each), then handed to Composer's wrapping logic: FSDP2's `prepare_fully_shard` with the policy Composer
builds (`generate_composer_model_policy`), `fully_shard` replaced by a recorder, and FSDP1's per-child
policy from `prepare_fsdp_module`. Every decoder block must be its own unit, the mask generator none,
and every other parameter must sit inside some unit (nothing left replicated by accident).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from composer.core import Precision
from composer.distributed import fsdp2
from composer.distributed.fsdp2_utils import generate_composer_model_policy
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.fsdp.wrap import CustomPolicy
from torchmetrics import Metric, MetricCollection

from drprune.masks import build_mask_generator
from drprune.models.composer_model import PrunableLM
from drprune.models.decoder import Block
from drprune.parallel import ShardingPlan, plan_sharding, prepare_model
from drprune.run_config import RunConfig
from drprune.train import load_config, model_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LARGE = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("*/*.yaml")
               if OmegaConf.load(p).get("base") == "../base/prune.yaml")
# the config's ??? keys: nothing is read, so nothing needs to exist
REQUIRED = ["data_local=/nonexistent/data", "save_folder=/nonexistent/save", "callbacks.data_loading.set_names=[a]",
            "model.path=/nonexistent/model.pt"]


def load_run(name: str) -> RunConfig:
    return RunConfig.from_cfg(load_config(str(CONFIGS / name), REQUIRED))


def meta_model(run: RunConfig, plan: ShardingPlan) -> PrunableLM:
    """The config's PrunableLM with its mask generator, shapes only, prepared for `plan` as train.py does."""
    mcfg = model_config(run.model, None)  # the YAML's shape keys (no checkpoint is read)
    with torch.device("meta"):
        generator = build_mask_generator(mcfg, run.model.mask_generator, run.model.mask_prefix)
        model = PrunableLM(mcfg, generator, ["a"])
    prepare_model(model, plan)
    return model


def fsdp2_units(model: PrunableLM, plan: ShardingPlan, monkeypatch: pytest.MonkeyPatch) -> list[nn.Module]:
    """The modules Composer's FSDP2 path calls `fully_shard` on, in order (nothing is sharded)."""
    units: list[nn.Module] = []
    monkeypatch.setattr(fsdp2, "fully_shard", lambda module, **kwargs: units.append(module))
    fsdp2.prepare_fully_shard(model, plan.config, Precision.AMP_BF16, generate_composer_model_policy(model))
    return units


def fsdp1_units(model: PrunableLM) -> list[nn.Module]:
    """The FSDP units of Composer 0.32's `prepare_fsdp_module`: each child of the model (not a metric, not
    marked `_fsdp_wrap = False`) is a root unit, auto-wrapped inside by its `lambda_fn` (a module's own
    `_fsdp_wrap`, else the child's `fsdp_wrap_fn`)."""
    units: list[nn.Module] = []
    for obj in model.children():
        if isinstance(obj, (Metric, MetricCollection)) or not getattr(obj, "_fsdp_wrap", True):
            continue

        def lambda_fn(module: nn.Module, obj: nn.Module = obj) -> bool:
            if hasattr(module, "_fsdp_wrap"):
                return bool(module._fsdp_wrap)
            return bool(obj.fsdp_wrap_fn(module)) if callable(getattr(obj, "fsdp_wrap_fn", None)) else False

        units += [obj, *CustomPolicy(lambda_fn)._run_policy(obj, set(), {})]
    return units


def assert_plan_covers_the_model(model: PrunableLM, units: list[nn.Module], n_layers: int) -> None:
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert len(blocks) == n_layers and all(any(b is u for u in units) for b in blocks)
    generator = {id(m) for m in model.mask_generator.modules()}
    assert not [u for u in units if id(u) in generator]
    sharded = {id(p) for u in units for p in u.parameters()}
    generator_params = {id(p) for p in model.mask_generator.parameters()}
    assert generator_params and not generator_params & sharded
    outside = [n for n, p in model.named_parameters() if id(p) not in generator_params and id(p) not in sharded]
    assert outside == []


def test_the_large_configs_are_found():
    assert {"llama2/7b.yaml", "llama2/13b.yaml", "llama3/8b.yaml", "qwen2/1.5b.yaml", "qwen2/7b.yaml",
            "pythia/1.4b.yaml", "pythia/2.8b.yaml", "smollm2/135m.yaml"} <= set(LARGE)


@pytest.mark.parametrize("name", LARGE)
def test_large_config_builds_on_meta_and_fsdp2_wraps_every_block(name, monkeypatch):
    monkeypatch.setenv("FSDP_VERSION", "2")
    run = load_run(name)
    plan = plan_sharding(run.fsdp_config, has_mask_generator=True)
    assert plan.version == 2 and plan.config.reshard_after_forward  # FULL_SHARD
    assert plan.config.activation_checkpointing and plan.config.mixed_precision == "DEFAULT"

    model = meta_model(run, plan)
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    n_layers = int(run.model.shape["n_layers"])
    units = fsdp2_units(model, plan, monkeypatch)
    assert units[-1] is model.model  # the decoder's own unit holds the embeddings and final norm
    assert len(units) == n_layers + 1
    assert_plan_covers_the_model(model, units, n_layers)


@pytest.mark.parametrize("name", LARGE)
def test_large_config_fsdp1_wraps_every_block(name, monkeypatch):
    monkeypatch.setenv("FSDP_VERSION", "1")
    run = load_run(name)
    plan = plan_sharding(run.fsdp_config, has_mask_generator=True, cuda=True)
    assert plan.version == 1 and plan.config.sharding_strategy == "FULL_SHARD"
    assert plan.config.activation_checkpointing and not plan.config.activation_checkpointing_reentrant

    model = meta_model(run, plan)
    n_layers = int(run.model.shape["n_layers"])
    units = fsdp1_units(model)
    assert units[0] is model.model and len(units) == n_layers + 1
    assert_plan_covers_the_model(model, units, n_layers)
