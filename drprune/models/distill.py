"""Logit distillation from a teacher (Minitron-style): the `distillation:` node of a run config.

    distillation:
      teacher: null        # checkpoint path; null = model.path (the source model)
      kl_weight: 0.5       # loss = ce_weight * CE + kl_weight * KL(teacher || student) (+ mask loss)
      ce_weight: 0.5
      temperature: 1.0     # KL on softmax(logits / T), multiplied by T^2
      teacher_dtype: auto  # storage of the frozen teacher: auto = the run's compute dtype (bfloat16
                           # under amp_bf16, else float32), or float32 / bfloat16 / float16

Everything here is checked before any model is built or data is read (`DistillConfig.from_node`,
`check_teacher`); `build_teacher` then loads the frozen teacher decoder.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


from drprune.dtypes import DTYPES
from drprune.errors import ConfigError, UserError, check_keys
from drprune.models.config import ModelConfig

NODE = "distillation"
# runtime knobs a teacher takes from the student instead of from its checkpoint
RUNTIME_KEYS = ("attn_impl",)
TEACHER_DTYPES = ("auto", *DTYPES)


@dataclass(frozen=True)
class DistillConfig:
    """The validated `distillation:` node; build it with `from_node`, which also checks the teacher file."""

    teacher: str
    kl_weight: float = 0.5
    ce_weight: float = 0.5
    temperature: float = 1.0
    teacher_dtype: str = "auto"

    @classmethod
    def from_node(cls, node: Mapping[str, Any] | None, model_path: str | None) -> "DistillConfig | None":
        """The validated node; None when distillation is off (node absent or null)."""
        if node is None:
            return None
        if not isinstance(node, Mapping):
            raise ConfigError(f"{NODE} must be a mapping of {_fields()} (or null to turn distillation off), "
                              f"got {node!r}")
        check_keys(node, _fields(), NODE)
        values = {k: _number(node, k, default) for k, default in
                  (("kl_weight", cls.kl_weight), ("ce_weight", cls.ce_weight), ("temperature", cls.temperature))}
        for key in ("kl_weight", "ce_weight"):
            if not 0.0 <= values[key] <= 1.0:
                raise ConfigError(f"{NODE}.{key}={values[key]} is outside [0, 1]")
        if values["kl_weight"] == 0 and values["ce_weight"] == 0:
            raise ConfigError(f"{NODE}.kl_weight and {NODE}.ce_weight are both 0: nothing to train on "
                              f"(set one of them > 0, or drop the {NODE} node)")
        if not values["temperature"] > 0:
            raise ConfigError(f"{NODE}.temperature={values['temperature']} must be > 0 (1.0 is plain KL)")
        dtype = str(node.get("teacher_dtype") or "auto")
        if dtype not in TEACHER_DTYPES:
            raise ConfigError(f"{NODE}.teacher_dtype={dtype!r} is not one of {', '.join(TEACHER_DTYPES)}")
        teacher = node.get("teacher")
        if teacher is None:
            if not model_path:
                raise ConfigError(f"{NODE}.teacher is not set and there is no model.path to default to: "
                                  f"set {NODE}.teacher=CHECKPOINT (a Composer checkpoint of the teacher)")
            teacher = model_path
        teacher = str(teacher)
        if not Path(teacher).is_file():
            raise UserError(f"{NODE}.teacher: checkpoint {teacher} does not exist: point {NODE}.teacher at a "
                            f"Composer checkpoint (e.g. one written by `drprune convert hf-to-composer`)")
        return cls(teacher=teacher, teacher_dtype=dtype, **values)


def _fields() -> list[str]:
    return [f.name for f in dataclasses.fields(DistillConfig)]


def _number(node: Mapping[str, Any], key: str, default: float) -> float:
    value = node.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{NODE}.{key}={value!r} must be a number")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{NODE}.{key}={value} must be finite")
    return value


def same_file(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    """Whether two paths name one file; False when either is unset or missing, never an error."""
    if not a or not b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_teacher(teacher_cfg: ModelConfig, student_cfg: ModelConfig, path: str) -> None:
    """The teacher must predict over the student's vocabulary.

    Checkpoints carry no tokenizer identity, so only vocab_size can be compared.
    """
    if teacher_cfg.vocab_size != student_cfg.vocab_size:
        raise ConfigError(
            f"{NODE}.teacher: {path} has vocab_size={teacher_cfg.vocab_size} but the student has "
            f"vocab_size={student_cfg.vocab_size}: logit distillation needs the same vocabulary (and tokenizer); "
            "use a teacher trained with the student's tokenizer"
        )


