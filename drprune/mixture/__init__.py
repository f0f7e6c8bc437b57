"""Data-mixture math: the update rules (constant / sheared / dro) and the +Dy scaling-law reference fit."""
from drprune.mixture.rules import (
    DRO_CLAMP_MODES,
    VALID_UPDATE_TYPES,
    MixtureRule,
    RuleInputs,
    UpdateType,
    apply_rule,
    chi2_divergence,
    constant_update,
    dro_update,
    dyall_ratio_update,
    ema_update,
    parse_update_type,
    sheared_update,
)
from drprune.mixture.scaling_law import ReferenceLossFitter, ScalingLawFit, fit_scaling_law

__all__ = [
    "DRO_CLAMP_MODES", "VALID_UPDATE_TYPES", "MixtureRule", "ReferenceLossFitter", "RuleInputs", "ScalingLawFit",
    "UpdateType", "apply_rule", "chi2_divergence",
    "constant_update", "dro_update", "dyall_ratio_update", "ema_update", "fit_scaling_law", "parse_update_type",
    "sheared_update",
]
