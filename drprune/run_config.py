"""The run config, read once into typed sections before anything is built.

`RunConfig.from_cfg` turns the merged YAML (after `base:` inheritance, dot-list overrides and `~key`
deletions) into dataclasses: every default lives here, every key anywhere is checked (a misspelt
`max_duraton` or `train_loader.num_worker` is a ConfigError naming the nearest valid key), and plain
values Composer would only parse after the model and data are built (`max_duration=abc`,
`precision=fp13`, a batch size of 0) fail first. Modules take their section (`RunConfig.data`,
`.optimizer`, `.callbacks.data_loading`, ...), never the raw DictConfig.

The model node is checked against `ModelConfig`'s fields and the mask generator's own keys (each
generator says which keys it takes); callback, logger and scheduler options are checked by their
builders against the Composer classes they construct.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Union

from composer.core import Precision, Time
from composer.utils.parallelism import FSDPConfig
from omegaconf import DictConfig, OmegaConf

from drprune.errors import ConfigError, check_keys
from drprune.mixture import DRO_CLAMP_MODES, UpdateType, parse_update_type
from drprune.models.config import ModelConfig
from drprune.models.distill import DistillConfig

DEFAULT_SEED = 17
DroClamp = Literal["reference", "exact"]
assert set(typing.get_args(DroClamp)) == set(DRO_CLAMP_MODES)  # one list of modes, spelt for the type checker


# ---------------------------------------------------------------- generic typed reading

def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as type `hint` (a field annotation), or a ConfigError naming `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arm, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{key}={value!r} must be {' or '.join(_type_name(a) for a in args if a is not type(None))}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} must be one of {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(hint):
        return read_section(hint, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin is tuple and len(args) > 1 and args[1] is not Ellipsis and len(items) != len(args):
            raise ConfigError(f"{key}={value!r} must have {len(args)} values")
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r} must be a mapping of options (e.g. {key}={{}})")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if hint is float:
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return number
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a string")
        return str(value)
    raise TypeError(f"run_config cannot read {key} as {hint!r}")  # a missing case here, not a user error


def read_section(cls: type, node: Any, prefix: str) -> Any:
    """Dataclass `cls` from a mapping: unknown keys are errors naming the nearest field, values typed."""
    node = _container(node, prefix)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    check_keys(node, names, prefix)
    return cls(**{k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in node.items()})


# ---------------------------------------------------------------- sections

@dataclass(frozen=True)
class TrainDataset:
    """`train_loader.dataset`: the split a non-dynamic run trains on."""

    split: str | None = None  # ignored by a dynamic mixture (it reads data_local/train/<set_name>)
    shuffle: bool = True


@dataclass(frozen=True)
class EvalDataset:
    """`eval_loader.dataset`: the split evaluated (eval_merge holds every training domain)."""

    split: str = "eval_merge"
    shuffle: bool = False  # one fixed permutation, so an eval_subset_num_batches prefix spans every domain


@dataclass(frozen=True)
class TrainLoader:
    """`train_loader`: torch DataLoader options (Sheared-LLaMA's keys)."""

    name: str | None = None  # Sheared-LLaMA's loader name (text); informational
    num_workers: int = 0
    prefetch_factor: int | None = None
    pin_memory: bool | None = None  # None: on when CUDA is available
    drop_last: bool = True
    dataset: TrainDataset = field(default_factory=TrainDataset)

    def __post_init__(self) -> None:
        _at_least("train_loader.num_workers", self.num_workers, 0, " (0: load in the main process)")


@dataclass(frozen=True)
class EvalLoader:
    """`eval_loader`: present means the run evaluates; absent means it never does."""

    name: str | None = None
    num_workers: int = 0
    prefetch_factor: int | None = None
    dataset: EvalDataset = field(default_factory=EvalDataset)

    def __post_init__(self) -> None:
        _at_least("eval_loader.num_workers", self.num_workers, 0, " (0: load in the main process)")


@dataclass(frozen=True)
class DataLoading:
    """`callbacks.data_loading`: the domain mixture and the rule that moves it (DRPruning's keys)."""

    dynamic: bool = False
    set_names: list[str] | None = None  # None: the domain folders under data_local/train
    proportion: list[float] | None = None  # None: uniform
    update_type: str = "constant"
    reference_loss: list[float] | None = None
    rho: float = 0.1
    ema: float = 0.1
    min_prob: float = 0.2
    clamp_q_to_min: bool = True
    dro_clamp: DroClamp = "reference"

    def __post_init__(self) -> None:
        prefix = "callbacks.data_loading"
        try:
            parse_update_type(self.update_type)
        except ConfigError as err:
            raise ConfigError(f"{prefix}.{err}") from err
        ranges = {"rho": (self.rho >= 0, ">= 0 (the size of the χ² ball)"),
                  "ema": (0 < self.ema <= 1, "in (0, 1] (the weight of the newest loss)"),
                  "min_prob": (0 <= self.min_prob < 1, "in [0, 1) (a floor on q / p0)")}
        for key, (ok, expected) in ranges.items():
            if not ok:
                raise ConfigError(f"{prefix}.{key}={getattr(self, key)} must be {expected}")
        names = self.set_names
        if names is not None:
            if not names or not all(names):
                raise ConfigError(f"{prefix}.set_names={names!r} must be a non-empty list of domain names")
            if len(set(names)) != len(names):
                raise ConfigError(f"{prefix}.set_names={names} has duplicates")

    @property
    def rule(self) -> UpdateType:
        return parse_update_type(self.update_type)

    def check_domains(self, set_names: list[str]) -> None:
        """reference_loss must give one target per domain when the rule uses it."""
        if self.rule.rule == "constant":
            return
        prefix = "callbacks.data_loading"
        if self.reference_loss is None:
            raise ConfigError(
                f"{prefix}.reference_loss is required for update_type={self.update_type!r}: one target loss "
                f"per domain in set_names order ({set_names}), e.g. the source model's eval losses")
        if len(self.reference_loss) != len(set_names):
            raise ConfigError(f"{prefix}.reference_loss has {len(self.reference_loss)} values for {len(set_names)} "
                              f"domains ({set_names}): give one target loss per domain, in set_names order")


@dataclass(frozen=True)
class Callbacks:
    """`callbacks:` — data_loading (typed above) plus any registered callback by name with its options."""

    data_loading: DataLoading = field(default_factory=DataLoading)
    others: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def read(cls, node: Any) -> "Callbacks":
        node = dict(_container(node, "callbacks"))
        others = {}
        for name, params in node.items():
            if name != "data_loading":
                others[name] = _coerce(params or {}, dict, f"callbacks.{name}")
        return cls(read_section(DataLoading, node.get("data_loading"), "callbacks.data_loading"), others)


@dataclass(frozen=True)
class Optimizer:
    """`optimizer`: Composer's DecoupledAdamW; mask parameters get `lag_lr` and no weight decay."""

    name: Literal["decoupled_adamw"] = "decoupled_adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    lag_lr: float = 1.0  # learning rate of the mask logits and Lagrange multipliers
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8


@dataclass(frozen=True)
class Scheduler:
    """`scheduler.name` (a registered Composer scheduler) and its constructor's options."""

    name: str = "constant_with_warmup"
    options: dict[str, Any] = field(default_factory=lambda: {"t_warmup": "0ba"})

    @classmethod
    def read(cls, node: Any) -> "Scheduler":
        if node is None:
            return cls()
        options = dict(_container(node, "scheduler"))
        return cls(_coerce(options.pop("name", "cosine_with_warmup"), str, "scheduler.name"), options)


@dataclass(frozen=True)
class GradientClipping:
    """`algorithms.gradient_clipping`: Composer's GradientClipping algorithm."""

    clipping_threshold: float
    clipping_type: Literal["norm", "value", "adaptive"] = "norm"


@dataclass(frozen=True)
class Algorithms:
    """`algorithms`: the Composer algorithms a run may turn on."""

    gradient_clipping: GradientClipping | None = None


@dataclass(frozen=True)
class ModelSection:
    """`model:` — the shape (ModelConfig fields, or read from `path`) and the mask generator node.

    `model.max_seq_len` is where Sheared-LLaMA configs repeat the training sequence length; it must
    agree with the top-level `max_seq_len` and never sets the model's context (`model.context_length`).
    """

    shape: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    name: str | None = None  # Sheared-LLaMA's model name; informational
    mask_generator: dict[str, Any] | None = None  # {name: l0 | hypernetwork | ..., options}
    mask_prefix: str = "model.mask_generator"  # where the node came from, for messages
    max_seq_len: int | None = None

    EXTRAS = ("name", "path", "l0_module", "mask_generator", "max_seq_len")

    @classmethod
    def read(cls, node: Any) -> "ModelSection":
        node = dict(_container(node, "model"))
        check_keys(node, [f.name for f in dataclasses.fields(ModelConfig)] + list(cls.EXTRAS), "model")
        if node.get("mask_generator") is not None and node.get("l0_module") is not None:
            raise ConfigError("set either model.mask_generator or model.l0_module, not both")
        shape = {k: v for k, v in node.items() if k not in cls.EXTRAS}
        path = node.get("path")
        generator, prefix = node.get("mask_generator"), "model.mask_generator"
        if node.get("l0_module") is not None:  # Sheared-LLaMA's spelling of an L0 generator
            generator, prefix = {"name": "l0", **_coerce(node["l0_module"], dict, "model.l0_module")}, "model.l0_module"
        elif generator is not None:
            generator = {"name": "l0", **_coerce(generator, dict, prefix)}
        seq_len = node.get("max_seq_len")
        if seq_len is not None:
            _at_least("model.max_seq_len", seq_len, 1)
        return cls(shape, None if path is None else _coerce(path, str, "model.path"),
                   None if node.get("name") is None else str(node["name"]), generator, prefix, seq_len)


@dataclass(frozen=True)
class DataSection:
    """What the data loaders read: the top-level data keys with the loader and mixture sections."""

    data_local: str | None
    max_seq_len: int | None
    tokenizer: str | None
    verify_hashes: bool
    seed: int
    data_loading: DataLoading
    train_loader: TrainLoader
    eval_loader: EvalLoader | None
    data_remote: str | None = None  # data_local is then a cache of it (drprune.data.remote)
    data_remote_folders: dict[str, str] = field(default_factory=dict)  # {folder under data_local: its remote}


# ---------------------------------------------------------------- the run config

@dataclass(frozen=True)
class RunConfig:
    """Every key a run config may hold, with its default. Composer's Trainer options mirror its names."""

    model: ModelSection = field(default_factory=ModelSection)
    data_local: str | None = None
    data_remote: str | None = None
    data_remote_folders: dict[str, str] = field(default_factory=dict)
    max_seq_len: int | None = None
    tokenizer: str | None = None
    data_verify_hashes: bool = True
    train_loader: TrainLoader = field(default_factory=TrainLoader)
    eval_loader: EvalLoader | None = None
    callbacks: Callbacks = field(default_factory=Callbacks)
    loggers: dict[str, Any] = field(default_factory=dict)
    optimizer: Optimizer = field(default_factory=Optimizer)
    scheduler: Scheduler = field(default_factory=Scheduler)
    algorithms: Algorithms = field(default_factory=Algorithms)
    distillation: dict[str, Any] | None = None  # checked into a DistillConfig by `distill()`
    trust_pickle: bool = False
    allow_config_change: bool = False
    global_train_batch_size: int | None = None
    device_eval_batch_size: int | None = None
    # passed through to Composer's Trainer
    run_name: str | None = None
    seed: int = DEFAULT_SEED
    max_duration: int | str | None = None
    eval_interval: int | str = 1
    eval_subset_num_batches: int = -1
    progress_bar: bool = False
    log_to_console: bool = True
    console_log_interval: int | str = "1ba"
    precision: str = "fp32"
    device_train_microbatch_size: int | Literal["auto"] | None = None
    fsdp_config: dict[str, Any] | None = None
    save_folder: str | None = None
    save_interval: int | str = "1ep"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    load_path: str | None = None
    autoresume: bool = False
    python_log_level: str | None = None
    dist_timeout: float = 600.0
    activation_checkpointing: bool = False  # recompute each block's activations in backward, with or without FSDP

    CUSTOM = {"model": ModelSection.read, "callbacks": Callbacks.read, "scheduler": Scheduler.read}
    REQUIRED = ("max_duration", "global_train_batch_size")

    @classmethod
    def from_cfg(cls, cfg: DictConfig | Mapping[str, Any]) -> "RunConfig":
        """Check and type the whole config; raises ConfigError/UserError before anything is built."""
        node = dict(_container(cfg, "the run config"))
        plain = read_section(cls, {k: v for k, v in node.items() if k not in cls.CUSTOM}, "")  # unknown keys first
        for key in cls.REQUIRED:
            if getattr(plain, key) is None:
                raise ConfigError(f"{key} is required: set it in the YAML or on the command line ({key}=...)")
        run = dataclasses.replace(plain, **{k: read(node[k]) for k, read in cls.CUSTOM.items() if k in node})
        run._check_values()
        return run

    def _check_values(self) -> None:
        for key in ("max_duration", "eval_interval", "save_interval", "console_log_interval"):
            _duration(key, getattr(self, key))
        _at_least("global_train_batch_size", self.global_train_batch_size, 1, " (a positive batch size)")
        if self.device_eval_batch_size is not None:
            _at_least("device_eval_batch_size", self.device_eval_batch_size, 1, " (a positive batch size)")
        if self.device_train_microbatch_size not in (None, "auto"):
            _at_least("device_train_microbatch_size", self.device_train_microbatch_size, 1, " or auto")
        _at_least("seed", self.seed, 0)
        precisions = [p.value for p in Precision]
        if self.precision not in precisions:
            raise ConfigError(f"precision={self.precision!r} is unknown; use one of {', '.join(precisions)} "
                              "(amp_bf16 runs bf16 autocast on GPU and CPU)")
        if self.fsdp_config is not None:
            check_keys(self.fsdp_config, [f.name for f in dataclasses.fields(FSDPConfig) if f.init], "fsdp_config")
        if self.max_seq_len is not None:
            _at_least("max_seq_len", self.max_seq_len, 1)
        legacy = self.model.max_seq_len
        if None not in (self.max_seq_len, legacy) and self.max_seq_len != legacy:
            raise ConfigError(f"model.max_seq_len={legacy} differs from max_seq_len={self.max_seq_len}: both name the "
                              "training sequence length (the model's context is model.context_length); drop "
                              "model.max_seq_len")
        _check_remotes(self.data_remote, self.data_remote_folders)
        if self.callbacks.data_loading.dynamic and str(self.max_duration).endswith("ep"):
            raise ConfigError(f"max_duration={self.max_duration}: a dynamic mixture has no epochs; "
                              "use batches (e.g. 3200ba)")

    @property
    def data(self) -> DataSection:
        return DataSection(self.data_local, self.max_seq_len, self.tokenizer, self.data_verify_hashes, self.seed,
                           self.callbacks.data_loading, self.train_loader, self.eval_loader, self.data_remote,
                           self.data_remote_folders)

    def distill(self) -> DistillConfig | None:
        """The checked `distillation:` node (its teacher defaults to model.path); None when off."""
        return DistillConfig.from_node(self.distillation, self.model.path)

    def check_model_fits_data(self, context_length: int) -> None:
        """Training sequences must fit the model's context: beyond it a model is extrapolating, not training."""
        if self.max_seq_len is not None and context_length < self.max_seq_len:
            raise ConfigError(f"max_seq_len={self.max_seq_len} (the training sequence length) is longer than the "
                              f"model's context length {context_length}: use shorter sequences, or set "
                              f"model.context_length={self.max_seq_len} to extend the context")


def _container(node: Any, what: str) -> Mapping[str, Any]:
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    if not isinstance(node, Mapping):
        raise ConfigError(f"{what} must be a mapping of keys, got {node!r}")
    return node


def _at_least(key: str, value: Any, low: int, extra: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}={value!r} must be an integer >= {low}{extra}")


def _check_remotes(root: str | None, folders: Mapping[str, Any]) -> None:
    """data_remote is a URL or path; data_remote_folders maps folders under data_local to theirs."""
    if root is not None and not root.strip():
        raise ConfigError("data_remote='' is empty: give the remote copy of data_local (e.g. s3://bucket/prepared) "
                          "or drop the key")
    for folder, url in folders.items():
        key = f"data_remote_folders.{folder}"
        parts = str(folder).split("/")
        if str(folder).startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ConfigError(f"{key}: the key must be a folder under data_local written as a relative path, such as "
                              "train/wiki or eval/eval_merge")
        if not isinstance(url, str) or not url.strip():
            raise ConfigError(f"{key}={url!r} must be the remote of that MDS folder (a URL such as "
                              "s3://bucket/wiki/train, or a path)")


def _duration(key: str, value: Any) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return
    try:
        ok = isinstance(value, str) and Time.from_timestring(value).value > 0
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{key}={value!r} is not a positive duration: use e.g. 20ba (batches), 1ep (epochs) "
                          "or 100000tok (tokens)")


