"""Composer entry point: `composer drprune/train.py CONFIG.yaml key=value ...`.

Also `python -m drprune.train CONFIG.yaml key=value ...` for one process. Everything is built from
the YAML (Sheared-LLaMA / DRPruning keys) plus omegaconf dot-list overrides; every config problem is
raised before the model is built or data is read.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from composer.optim import ConstantWithWarmupScheduler, CosineAnnealingWithWarmupScheduler, LinearWithWarmupScheduler
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from drprune.errors import ConfigError, UserError
from drprune.paths import packaged_config
from drprune.registry import SCHEDULERS

log = logging.getLogger("drprune.train")

# Keys of the `model` node that are not ModelConfig fields.
MODEL_NODE_EXTRAS = ("name", "path", "l0_module", "mask_generator")
# Composer 0.32 has no scheduler registry: its schedulers under llm-foundry's `scheduler.name`s
for _name, _cls in (("cosine_with_warmup", CosineAnnealingWithWarmupScheduler),
                    ("constant_with_warmup", ConstantWithWarmupScheduler),
                    ("linear_decay_with_warmup", LinearWithWarmupScheduler)):
    SCHEDULERS.register(_name)(_cls)


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML file merged over its `base:` file (a path relative to it), recursively."""
    if path in seen:
        raise ConfigError(f"config {path} includes itself through `base:`")
    if path.is_dir():
        raise UserError(f"config {path} is a folder, not a config file: give a YAML file "
                        "(e.g. configs/tiny/prune.yaml)")
    if not path.is_file():
        raise UserError(f"config file {path} does not exist (shipped configs are named like configs/tiny/prune.yaml)")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - yaml and omegaconf raise many types for a broken file
        raise UserError(f"config {path} is not valid YAML: {' '.join(str(err).split())}; fix the file") from err
    if not isinstance(cfg, DictConfig) or not cfg:
        raise UserError(f"config {path} is {'empty' if not cfg else 'not a mapping'}: a run config is a YAML "
                        "mapping of keys (see configs/tiny/prune.yaml)")
    base = cfg.pop("base", None)
    if base is None:
        return cfg
    base_path = (path.parent / str(base)).resolve()
    if not base_path.is_file():
        raise UserError(f"config {path}: its `base: {base}` ({base_path}) does not exist; fix the path (relative "
                        "to the config's folder)")
    return OmegaConf.merge(_load_yaml(base_path, (*seen, path)), cfg)


def load_config(path: str, overrides: list[str]) -> DictConfig:
    """The YAML with dot-list overrides applied; `~a.b` deletes key a.b (e.g. `~model.mask_generator`)."""
    given = Path(path)
    shipped = None if given.exists() else packaged_config(given)
    if shipped is not None:
        log.info("config %s: not a file here, using the one shipped with drprune (%s)", path, shipped)
    cfg = _load_yaml((shipped or given).resolve())
    deletions = [item[1:] for item in overrides if item.startswith("~")]
    assignments = [item for item in overrides if not item.startswith("~")]
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. max_duration=20ba) or ~key")
    for item in assignments:
        try:
            OmegaConf.from_dotlist([item])
        except Exception as err:  # noqa: BLE001 - omegaconf's grammar and YAML errors
            raise ConfigError(f"override {item!r} cannot be parsed ({' '.join(str(err).split())[:200]}): check its "
                              "quotes and brackets, e.g. key='a b' or key=[a,b]") from err
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(assignments))
    for key in deletions:
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if not isinstance(parent, DictConfig) or leaf not in parent:
            raise ConfigError(f"override ~{key}: the config has no key {key}")
        parent.pop(leaf)
    OmegaConf.resolve(cfg)
    return cfg


def model_config(cfg: DictConfig, init_state: dict | None):
    """Model shape from the YAML, or from the `model.path` checkpoint (YAML shape keys must agree)."""
    from drprune.convert.checkpoint import config_of_state
    from drprune.models.config import ModelConfig

    node = OmegaConf.to_container(cfg.model, resolve=True)
    shape = {k: v for k, v in node.items() if k not in MODEL_NODE_EXTRAS}
    if init_state is not None:
        from_ckpt = config_of_state(init_state, ModelConfig.from_dict(shape) if shape else None)
        merged = from_ckpt.to_dict()
        runtime_only = {"attn_impl", "init_std", "max_seq_len"}
        conflicts = {k: (v, merged[k]) for k, v in shape.items() if k in merged and merged[k] != v
                     and k not in runtime_only}
        if conflicts:
            raise ConfigError(
                "model keys contradict the checkpoint in model.path: "
                + ", ".join(f"model.{k}={v!r} but the checkpoint has {c!r}" for k, (v, c) in conflicts.items())
                + " (drop them from the YAML: the shape is read from the checkpoint)"
            )
        merged.update({k: v for k, v in shape.items() if k in runtime_only})
        return ModelConfig.from_dict(merged)
    return ModelConfig.from_dict(shape)


def _batch_sizes(cfg: DictConfig) -> tuple[int, int]:
    from composer.utils import dist

    world = dist.get_world_size()
    global_bs = int(cfg.global_train_batch_size)
    if global_bs % world:
        raise ConfigError(f"global_train_batch_size={global_bs} is not divisible by the world size {world}")
    return global_bs // world, int(cfg.get("device_eval_batch_size", global_bs // world))


def build_optimizer(cfg: DictConfig, model) -> Any:
    from composer.optim import DecoupledAdamW

    opt = cfg.get("optimizer", {})
    name = opt.get("name", "decoupled_adamw")
    if name != "decoupled_adamw":
        raise ConfigError(f"optimizer.name={name!r} is not supported; use decoupled_adamw")
    lr = float(opt.get("lr", 1e-4))
    groups = model.param_groups(lr=lr, weight_decay=float(opt.get("weight_decay", 0.0)),
                                lag_lr=float(opt.get("lag_lr", 1.0)))
    return DecoupledAdamW(groups, lr=lr, betas=tuple(opt.get("betas", (0.9, 0.95))), eps=float(opt.get("eps", 1e-8)))


def build_scheduler(cfg: DictConfig) -> Any:
    node = dict(cfg.get("scheduler", {"name": "constant_with_warmup", "t_warmup": "0ba"}))
    name = node.pop("name", "cosine_with_warmup")
    return SCHEDULERS.get(name, key="scheduler.name")(**node)


def _precision(cfg: DictConfig) -> str:
    precision = cfg.get("precision", "fp32")
    if precision != "fp32" and not torch.cuda.is_available():
        log.warning("precision=%s needs a GPU; running in fp32 on CPU", precision)
        return "fp32"
    return precision


def _container_or_value(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def _trust_pickle(cfg: DictConfig) -> bool:
    """`trust_pickle: true` is the only way a run fully unpickles model.path / distillation.teacher."""
    value = cfg.get("trust_pickle", False)
    if not isinstance(value, bool):
        raise ConfigError(f"trust_pickle={value!r} must be true or false")
    return value


def _build_teacher(distill, init_path: str | None, init_state: dict | None, mcfg, mask_generator,
                   trust_pickle: bool = False):
    """Check the teacher against the student (before either is built), then load it.

    None when the student's own unmasked weights are the teacher: the mask generator freezes the LLM
    (hypernetwork) and the teacher is the model.path checkpoint, so no second copy is needed.
    """
    from drprune.convert.checkpoint import load_model_state
    from drprune.models.distill import build_teacher, check_teacher, same_file, teacher_config

    same = same_file(distill.teacher, init_path)
    state = init_state if same else load_model_state(distill.teacher, trust_pickle)
    teacher_cfg = teacher_config(state, distill.teacher, mcfg if same else None)
    check_teacher(teacher_cfg, mcfg, distill.teacher)
    recipe = (f"loss = {distill.ce_weight:g} * CE + {distill.kl_weight:g} * KL(teacher || student), "
              f"temperature {distill.temperature:g}")
    if same and mask_generator is not None and mask_generator.model_parameters_frozen():
        log.info("distillation from %s, the frozen LLM's own unmasked weights (no second copy); %s",
                 distill.teacher, recipe)
        return None
    if same and mask_generator is None:
        log.warning("distillation.teacher is model.path (%s): the teacher is the student's own initial weights; "
                    "set distillation.teacher to the uncompressed source checkpoint to distil from it",
                    distill.teacher)
    teacher = build_teacher(state, teacher_cfg, mcfg, distill.teacher)
    log.info("distillation from %s (%.2fM parameters, frozen, not trained, not checkpointed); %s",
             distill.teacher, teacher.num_params() / 1e6, recipe)
    return teacher


def build_trainer(cfg: DictConfig):
    """Validate the whole config, then build model, data, optimizer and the Composer Trainer.

    A failure after the save_folder guard releases its lock (and removes the folder when the guard
    created it), so a refused run leaves nothing behind even in a process that goes on.
    """
    guards: list = []
    try:
        return _build_trainer(cfg, guards)
    except BaseException:
        for guard in guards:
            guard.lock.release()
        raise


def _build_trainer(cfg: DictConfig, guards: list):
    from composer import Evaluator, Trainer
    from composer.algorithms import GradientClipping
    from composer.utils import reproducibility

    from drprune.callbacks import build_callbacks, build_loggers
    from drprune.convert.checkpoint import decoder_state, load_decoder_weights, load_model_state
    from drprune.data.loaders import (build_eval_dataloader, build_train_dataloader, check_data_vocab,
                                      validate_data_config)
    from drprune.masks import build_mask_generator
    from drprune.models.composer_model import PrunableLM
    from drprune.models.distill import DistillConfig
    from drprune.run_config import check_model_fits_data, check_run_values, check_top_level_keys
    from drprune.run_guard import guard_save_folder

    check_top_level_keys(cfg)
    for key in ("max_duration", "global_train_batch_size"):
        if cfg.get(key) is None:
            raise ConfigError(f"{key} is required")
    check_run_values(cfg)
    validate_data_config(cfg)
    loggers = build_loggers(cfg)  # an unknown logger or a missing package fails here, before the model
    init_path = cfg.model.get("path")
    distill = DistillConfig.from_node(_container_or_value(cfg.get("distillation")), init_path)
    init_state = load_model_state(init_path, _trust_pickle(cfg)) if init_path else None
    mcfg = model_config(cfg, init_state)
    check_model_fits_data(cfg, mcfg.max_seq_len)
    check_data_vocab(cfg, mcfg.vocab_size)  # another tokenizer's data, ids beyond the vocabulary
    train_bs, eval_bs = _batch_sizes(cfg)
    reproducibility.seed_all(int(cfg.get("seed", 17)))  # before any generator: fresh runs are bit-identical
    mask_generator = build_mask_generator(mcfg, cfg.model)  # validates target_model
    set_names = list(cfg.get("callbacks", {}).get("data_loading", {}).get("set_names", []) or [])
    guard = guard_save_folder(cfg, set_names)  # lock, half-written checkpoints, resume fingerprint
    guards.extend(guard)
    teacher = (_build_teacher(distill, init_path, init_state, mcfg, mask_generator, _trust_pickle(cfg))
               if distill else None)

    model = PrunableLM(mcfg, mask_generator, set_names, distill=distill, teacher=teacher)
    if init_state is not None:
        load_decoder_weights(model.model, decoder_state(init_state), init_path)
        log.info("loaded weights from %s", init_path)
    # The weights are copied: drop the memory-mapped checkpoint now. A traceback cached by some
    # optional import can keep this frame alive, and with it the whole mapped file (a model's size).
    del init_state
    log.info("model: %s, %.2fM parameters%s", mcfg.family, model.model.num_params() / 1e6,
             f", mask generator {type(mask_generator).__name__}" if mask_generator else "")

    train_loader = build_train_dataloader(cfg, train_bs)
    evaluators = []
    if cfg.get("eval_loader") is not None:
        evaluators.append(Evaluator(label="eval", dataloader=build_eval_dataloader(cfg, eval_bs),
                                    metric_names=list(model.eval_metrics)))
    algorithms = []
    clip = cfg.get("algorithms", {}).get("gradient_clipping")
    if clip is not None:
        algorithms.append(GradientClipping(clip.get("clipping_type", "norm"), float(clip.clipping_threshold)))
    parallelism = {"fsdp": OmegaConf.to_container(cfg.fsdp_config)} if cfg.get("fsdp_config") else None

    return Trainer(
        run_name=cfg.get("run_name"),
        seed=int(cfg.get("seed", 17)),
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=evaluators or None,
        optimizers=build_optimizer(cfg, model),
        schedulers=build_scheduler(cfg),
        max_duration=cfg.max_duration,
        eval_interval=cfg.get("eval_interval", 1),
        eval_subset_num_batches=int(cfg.get("eval_subset_num_batches", -1)),
        algorithms=algorithms,
        callbacks=[*build_callbacks(cfg, model, train_loader), *guard],
        loggers=loggers,
        progress_bar=bool(cfg.get("progress_bar", False)),
        log_to_console=bool(cfg.get("log_to_console", True)),
        console_log_interval=cfg.get("console_log_interval", "1ba"),
        precision=_precision(cfg),
        device_train_microbatch_size=cfg.get("device_train_microbatch_size", train_bs),
        parallelism_config=parallelism,
        save_folder=cfg.get("save_folder"),
        save_interval=cfg.get("save_interval", "1ep"),
        save_num_checkpoints_to_keep=int(cfg.get("save_num_checkpoints_to_keep", -1)),
        save_overwrite=bool(cfg.get("save_overwrite", False)),
        load_path=cfg.get("load_path"),
        autoresume=bool(cfg.get("autoresume", False)),
        python_log_level=cfg.get("python_log_level", None),
        dist_timeout=float(cfg.get("dist_timeout", 600)),
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("drprune: error: no run config given; usage: python -m drprune.train CONFIG.yaml [key=value ...]",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(argv[0], argv[1:])
        trainer = build_trainer(cfg)
    except MissingMandatoryValue as err:
        print(f"drprune: error: config key {err.full_key} is required: add {err.full_key}=... "
              "to the command line", file=sys.stderr)
        return 2
    except UserError as err:
        print(f"drprune: error: {err}", file=sys.stderr)
        return 2
    trainer.fit()
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
