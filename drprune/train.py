"""Composer entry point: `composer drprune/train.py CONFIG.yaml key=value ...`.

Also `python -m drprune.train CONFIG.yaml key=value ...` for one process. Everything is built from
the YAML (Sheared-LLaMA / DRPruning keys) plus omegaconf dot-list overrides; every config problem is
raised before the model is built or data is read.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from composer import Evaluator, Trainer
from composer.optim import (ConstantWithWarmupScheduler, CosineAnnealingWithWarmupScheduler, DecoupledAdamW,
                            LinearWithWarmupScheduler)
from composer.utils import dist, reproducibility
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from drprune.callbacks import build_callbacks, build_loggers, check_callbacks
from drprune.convert.checkpoint import config_of_state, decoder_state, load_decoder_weights, load_model_state
from drprune.data.loaders import (build_eval_dataloader, build_train_dataloader, check_data_vocab, fetch_data,
                                  validate_data_config)
from drprune.errors import ConfigError, UserError
from drprune.masks import build_mask_generator
from drprune.models.composer_model import PrunableLM
from drprune.models.config import ModelConfig, with_context_length
from drprune.models.decoder import PrunableDecoder
from drprune.models.distill import RUNTIME_KEYS, DistillConfig, check_teacher, same_file
from drprune.node_checks import agreed, start_distributed
from drprune.parallel import ShardingPlan, plan_sharding, prepare_model, sharding_algorithms
from drprune.paths import packaged_config
from drprune.precision import resolve_precision
from drprune.progress import composer_console
from drprune.registry import SCHEDULERS, check_options
from drprune.run_config import ModelSection, Optimizer, RunConfig, Scheduler
from drprune.resume import check_load_path, check_resume_source
from drprune.run_files import uploader_for
from drprune.run_guard import guard_save_folder

log = logging.getLogger("drprune.train")

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


def model_config(model: ModelSection, init_state: dict | None, seq_len: int | None = None) -> ModelConfig:
    """Model shape from the YAML, or from the `model.path` checkpoint (YAML shape keys must agree).

    The context length is the checkpoint's whatever `seq_len` (the training length) is, so what the
    run saves and exports still says the source's; `model.context_length` overrides it explicitly. A
    model described by the YAML alone has the training length as its context unless it says otherwise.
    """
    shape = model.shape
    from_yaml = {"context_length": seq_len, **shape} if seq_len is not None else shape
    if init_state is None:
        return ModelConfig.from_dict(from_yaml)
    from_ckpt = config_of_state(init_state, ModelConfig.from_dict(from_yaml) if shape else None)
    merged = from_ckpt.to_dict()
    overridable = {"attn_impl", "init_std", "context_length"}
    conflicts = {k: (v, merged[k]) for k, v in shape.items() if k in merged and merged[k] != v
                 and k not in overridable}
    if conflicts:
        raise ConfigError(
            "model keys contradict the checkpoint in model.path: "
            + ", ".join(f"model.{k}={v!r} but the checkpoint has {c!r}" for k, (v, c) in conflicts.items())
            + " (drop them from the YAML: the shape is read from the checkpoint)"
        )
    merged.update({k: v for k, v in shape.items() if k in overridable - {"context_length"}})
    cfg = ModelConfig.from_dict(merged)
    context = shape.get("context_length", cfg.context_length)
    if context != cfg.context_length:
        log.info("model.context_length=%s overrides the checkpoint's context length %d", context, cfg.context_length)
        cfg = with_context_length(cfg, context)
    return cfg


def _batch_sizes(run: RunConfig) -> tuple[int, int]:
    """Per-rank train and eval batch sizes: each rank's share of the global batch is whole microbatches.

    A remainder would silently end every step with a short microbatch on every rank (Composer splits
    without a word), so the step no longer averages equal parts, each with its own sampled masks. A
    microbatch at least the rank's share is one microbatch, which is how Composer runs it.
    """
    world = dist.get_world_size()
    global_bs = run.global_train_batch_size
    if global_bs % world:
        raise ConfigError(f"global_train_batch_size={global_bs} is not divisible by the world size {world}")
    train_bs, micro = global_bs // world, run.device_train_microbatch_size
    if isinstance(micro, int) and micro < train_bs and train_bs % micro:
        raise ConfigError(
            f"global_train_batch_size={global_bs} is not divisible by the world size {world} times "
            f"device_train_microbatch_size={micro}: each rank's {train_bs} samples would end in a short "
            f"microbatch; use a global batch that is a multiple of {world * micro}, or a microbatch that "
            f"divides {train_bs}")
    return train_bs, run.device_eval_batch_size or train_bs


def build_optimizer(opt: Optimizer, model: PrunableLM) -> DecoupledAdamW:
    """DecoupledAdamW over the model's parameter groups (weights at lr, masks and multipliers at lag_lr)."""
    groups = model.param_groups(lr=opt.lr, weight_decay=opt.weight_decay, lag_lr=opt.lag_lr)
    return DecoupledAdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps)


def build_scheduler(scheduler: Scheduler) -> Any:
    """The registered Composer scheduler, its options checked against its constructor."""
    cls = SCHEDULERS.get(scheduler.name, key="scheduler.name")
    check_options(cls, scheduler.options, "scheduler")
    return cls(**scheduler.options)


def teacher_config(state: Mapping[str, Any], path: str, fallback: ModelConfig | None) -> ModelConfig:
    """The teacher's decoder config from its checkpoint (`fallback` for config-less Sheared files)."""
    try:
        return config_of_state(dict(state), fallback)
    except UserError as err:
        raise UserError(f"distillation.teacher: checkpoint {path} carries no model config (an older "
                        "Sheared-LLaMA/DRPruning file?): convert it with `drprune convert` to a drprune checkpoint "
                        "first") from err


def build_teacher(state: Mapping[str, Any], teacher_cfg: ModelConfig, student_cfg: ModelConfig,
                  path: str, dtype: torch.dtype = torch.float32, load: bool = True) -> PrunableDecoder:
    """A frozen, eval-mode PrunableDecoder with the teacher's weights (runtime knobs from the student).

    Built on the meta device and stored in `dtype`; `load=False` leaves it there for a rank that
    receives the weights from rank 0 (`weights_from_rank0`). Buffers (RoPE) stay fp32.
    """
    cfg = dataclasses.replace(teacher_cfg, **{k: getattr(student_cfg, k) for k in RUNTIME_KEYS})
    with torch.device("meta"):
        teacher = PrunableDecoder(cfg)
    for param in teacher.parameters():
        param.data = param.data.to(dtype)
    if load:
        load_decoder_weights(teacher, decoder_state(dict(state)), path)
    teacher.requires_grad_(False)
    return teacher.eval()


def weights_from_rank0(sharding: ShardingPlan) -> bool:
    """Whether only global rank 0 loads checkpoint weights, the other ranks building on the meta device.

    Composer's FSDP start then shards rank 0's model and broadcasts it (FSDP2 detects the mixed start
    itself; FSDP1 needs `sync_module_states`, which drprune turns on). Without FSDP every rank loads.
    """
    if not sharding.sharded or dist.get_world_size() == 1:
        return False
    return sharding.version == 2 or bool(getattr(sharding.config, "sync_module_states", False))


def teacher_dtype(distill: DistillConfig, autocast: torch.dtype | None, precision: str) -> torch.dtype:
    """The teacher's storage dtype: `distillation.teacher_dtype`, or for `auto` the run's compute dtype."""
    if distill.teacher_dtype != "auto":
        return getattr(torch, distill.teacher_dtype)
    return torch.bfloat16 if autocast == torch.bfloat16 or precision == "amp_bf16" else torch.float32


def _build_teacher(distill: DistillConfig, init_path: str | None, init_state: dict | None, mcfg: ModelConfig,
                   mask_generator: Any, trust_pickle: bool = False, dtype: torch.dtype = torch.float32,
                   load: bool = True) -> Any:
    """Check the teacher against the student (before either is built), then load it.

    None when the student's own unmasked weights are the teacher: the mask generator freezes the LLM
    (hypernetwork) and the teacher is the model.path checkpoint, so no second copy is needed.
    """
    same = same_file(distill.teacher, init_path)
    state = init_state if same else agreed(lambda leader: load_model_state(distill.teacher, trust_pickle,
                                                                          verify=leader))
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
    teacher = build_teacher(state, teacher_cfg, mcfg, distill.teacher, dtype, load)
    log.info("distillation from %s (%.2fM parameters in %s, frozen, not trained, not checkpointed); %s",
             distill.teacher, teacher.num_params() / 1e6, str(dtype).removeprefix("torch."), recipe)
    return teacher


def build_trainer(cfg: DictConfig | RunConfig) -> Trainer:
    """Validate the whole config, then build model, data, optimizer and the Composer Trainer.

    A failure after the save_folder guard releases its lock (and removes the folder when the guard
    created it), so a refused run leaves nothing behind even in a process that goes on.
    """
    guards: list = []
    try:
        return _build_trainer(cfg if isinstance(cfg, RunConfig) else RunConfig.from_cfg(cfg), guards)
    except BaseException:
        for guard in guards:
            guard.lock.release()
        raise


def _build_trainer(run: RunConfig, guards: list) -> Trainer:
    data = run.data
    train_bs, eval_bs = _batch_sizes(run)  # layout checks before any data or checkpoint is read
    sharding = plan_sharding(run.fsdp_config, has_mask_generator=run.model.mask_generator is not None,
                             activation_checkpointing=run.activation_checkpointing)
    composer_precision, autocast = resolve_precision(run.precision, torch.cuda.is_available())
    if autocast is not None:
        log.info("precision=%s on CPU: torch's CPU autocast to %s (Composer's CPU device only runs fp32)",
                 run.precision, autocast)
    check_load_path(run.load_path)
    start_distributed(run.dist_timeout, torch.cuda.is_available())  # so one rank per node verifies hashes
    agreed(lambda leader: fetch_data(data, leader=leader))  # data_remote: one process per node fills data_local
    agreed(lambda leader: validate_data_config(data, hashes=leader))
    check_callbacks(run.callbacks)
    loggers = build_loggers(run.loggers)  # an unknown logger or a missing package fails here, before the model
    loggers += uploader_for(run.save_folder, loggers)  # drprune's own files reach an object-store save_folder
    scheduler = build_scheduler(run.scheduler)  # its options are checked before the model too
    init_path = run.model.path
    distill = run.distill()
    init_state = (agreed(lambda leader: load_model_state(init_path, run.trust_pickle, verify=leader))
                  if init_path else None)
    mcfg = model_config(run.model, init_state, run.max_seq_len)
    run.check_model_fits_data(mcfg.context_length)
    agreed(lambda leader: check_data_vocab(data, mcfg.vocab_size, scan=leader))  # another tokenizer's data
    reproducibility.seed_all(run.seed)  # before any generator: fresh runs are bit-identical
    mask_generator = build_mask_generator(mcfg, run.model.mask_generator, run.model.mask_prefix)
    set_names = list(run.callbacks.data_loading.set_names or [])
    guard = guard_save_folder(run, set_names)  # lock, half-written checkpoints, resume fingerprint
    guards.extend(guard)
    check_resume_source(run, sharded_state_dict=getattr(sharding.config, "state_dict_type", None) == "sharded")
    # Checkpoint weights are loaded into storage-less (meta) models: nothing is drawn at random only to
    # be overwritten, and under FSDP only rank 0 loads them (Composer broadcasts them as it shards).
    load_here = not weights_from_rank0(sharding) or dist.get_global_rank() == 0
    teacher = (_build_teacher(distill, init_path, init_state, mcfg, mask_generator, run.trust_pickle,
                              teacher_dtype(distill, autocast, run.precision), load_here)
               if distill else None)

    model = PrunableLM(mcfg, mask_generator, set_names, distill=distill, teacher=teacher, cpu_autocast=autocast,
                       on_meta=init_state is not None)
    if init_state is not None and load_here:
        load_decoder_weights(model.model, decoder_state(init_state), init_path)
        log.info("loaded weights from %s", init_path)
    elif init_state is not None:
        log.info("rank %d: weights of %s arrive from rank 0 as the model is sharded", dist.get_global_rank(),
                 init_path)
    # The weights are copied: drop the memory-mapped checkpoint now. A traceback cached by some
    # optional import can keep this frame alive, and with it the whole mapped file (a model's size).
    del init_state
    prepare_model(model, sharding)
    log.info("model: %s, %.2fM parameters%s", mcfg.family, model.model.num_params() / 1e6,
             f", mask generator {type(mask_generator).__name__}" if mask_generator else "")

    train_loader = build_train_dataloader(data, train_bs)
    evaluators = []
    if run.eval_loader is not None:
        evaluators.append(Evaluator(label="eval", dataloader=build_eval_dataloader(data, eval_bs),
                                    metric_names=list(model.eval_metrics)))
    clip = run.algorithms.gradient_clipping
    algorithms = sharding_algorithms(sharding, None if clip is None else (clip.clipping_type, clip.clipping_threshold))
    progress_bar, log_to_console = composer_console(run.progress_bar, run.log_to_console)

    return Trainer(
        run_name=run.run_name,
        seed=run.seed,
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=evaluators or None,
        optimizers=build_optimizer(run.optimizer, model),
        schedulers=scheduler,
        max_duration=run.max_duration,
        eval_interval=run.eval_interval,
        eval_subset_num_batches=run.eval_subset_num_batches,
        algorithms=algorithms,
        callbacks=[*build_callbacks(run.callbacks, run.save_folder, model, train_loader,
                                    run.console_log_interval), *guard],
        loggers=loggers,
        progress_bar=progress_bar,
        log_to_console=log_to_console,
        console_log_interval=run.console_log_interval,
        precision=composer_precision,
        device_train_microbatch_size=run.device_train_microbatch_size or train_bs,
        parallelism_config=sharding.parallelism_config(),
        save_folder=run.save_folder,
        save_interval=run.save_interval,
        save_num_checkpoints_to_keep=run.save_num_checkpoints_to_keep,
        save_overwrite=run.save_overwrite,
        load_path=run.load_path,
        autoresume=run.autoresume,
        python_log_level=run.python_log_level,
        dist_timeout=run.dist_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m drprune.train CONFIG.yaml key=value ...`; a config problem is one error line and exit code 2."""
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
