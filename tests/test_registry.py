"""drprune.registry: one decorator adds a scorer / rule that the CLI and configs then accept by name."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from drprune.cli import main as drprune
from drprune.errors import ConfigError
from drprune.mixture import RuleInputs, apply_rule, parse_update_type
from drprune.mixture.rules import MixtureRule
from drprune.oneshot.importance import Scores
from drprune.registry import IMPORTANCE, LAYER_METRICS, MIXTURE_RULES, Registry
from tests.conftest import random_hf_model


@IMPORTANCE.register("keep_last")
def keep_last(decoder) -> Scores:
    """Later structures score higher, so pruning removes the first ones (no calibration data needed)."""
    cfg = decoder.cfg
    return Scores(torch.arange(cfg.n_kv_heads, dtype=torch.float64).repeat(cfg.n_layers, 1),
                  torch.arange(cfg.intermediate_size, dtype=torch.float64).repeat(cfg.n_layers, 1),
                  torch.arange(cfg.d_model, dtype=torch.float64))


@MIXTURE_RULES.register("uniform")
class UniformRule(MixtureRule):
    @staticmethod
    def step(x: RuleInputs, losses: list[float]) -> tuple[list[float], list[float]]:
        return [1 / len(x.p)] * len(x.p), x.p0


def test_register_returns_the_object_and_get_suggests_the_nearest_name():
    reg: Registry = Registry("widget")

    @reg.register("round")
    class Round:
        pass

    assert reg.register("square")(len) is len and reg.get("round", key="shape") is Round
    assert reg.names() == ["round", "square"] and "round" in reg and "oval" not in reg
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("round")(str)
    with pytest.raises(ConfigError, match=r"shape='rund' is unknown: did you mean 'round'\? "
                                          r"valid widgets: round, square"):
        reg.get("rund", key="shape")
    with pytest.raises(ConfigError, match=r"shapes\.squar is unknown: did you mean shapes\.square\?"):
        reg.get("squar", key="shapes", nested=True)


def test_registry_imports_nothing_from_drprune_but_errors():
    tree = ast.parse(Path("drprune/registry.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in modules if m and m.startswith("drprune")} == {"drprune.errors"}


def test_a_scorer_registered_here_prunes_through_the_cli(tmp_path):
    src, out = tmp_path / "hf", tmp_path / "out"
    random_hf_model("llama").save_pretrained(src)
    assert drprune(["oneshot", "width", str(src), "--importance", "keep_last", "--hidden-size", "48",
                    "--intermediate-size", "64", "--out", str(out)]) == 0
    removed = json.loads((out / "removed.json").read_text())
    assert removed["importance"] == "keep_last"
    assert removed["hidden_dims"] == list(range(16))  # d_model 64 -> 48: the 16 lowest-scoring dims
    assert json.loads((out / "hf" / "config.json").read_text())["hidden_size"] == 48


def test_unknown_names_fail_before_the_model_is_read_with_the_nearest_one(tmp_path, capsys):
    missing = tmp_path / "no_model"
    assert drprune(["oneshot", "width", str(missing), "--importance", "tayler", "--hidden-size", "48",
                    "--out", str(tmp_path / "o")]) == 2
    assert "importance='tayler' is unknown: did you mean 'taylor'?" in capsys.readouterr().err
    assert drprune(["oneshot", "layers", str(missing), "--pruning-method", "cosin", "--num-blocks-to-prune", "1",
                    "--out", str(tmp_path / "o")]) == 2
    assert "pruning_method='cosin' is unknown: did you mean 'cosine'?" in capsys.readouterr().err


def test_scheduler_and_mask_generator_names_come_from_their_registries():
    from drprune.masks import build_mask_generator
    from drprune.models.config import ModelConfig
    from drprune.run_config import Scheduler
    from drprune.train import build_scheduler

    with pytest.raises(ConfigError, match="scheduler.name='cosine_warmup' is unknown: did you mean "
                                          "'cosine_with_warmup'"):
        build_scheduler(Scheduler.read({"name": "cosine_warmup", "t_warmup": "0ba"}))
    cfg = ModelConfig(family="llama", vocab_size=97, d_model=32, n_layers=2, n_heads=4, intermediate_size=48)
    with pytest.raises(ConfigError, match="name='hypernet' is unknown: did you mean 'hypernetwork'"):
        build_mask_generator(cfg, {"name": "hypernet"})


@pytest.mark.parametrize("command, flag, registry", [("width", "--importance", IMPORTANCE),
                                                     ("layers", "--pruning-method", LAYER_METRICS)])
def test_cli_help_lists_the_registry(command, flag, registry, capsys):
    with pytest.raises(SystemExit) as done:
        drprune(["oneshot", command, "--help"])
    assert done.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert " | ".join(registry.names()) in help_text
    assert {"keep_last", "taylor", "l1", "random"} <= set(IMPORTANCE.names())
    assert {"angular", "cosine"} <= set(LAYER_METRICS.names())


def test_a_mixture_rule_registered_here_parses_applies_and_is_listed():
    t = parse_update_type("Uniform")
    x = RuleInputs(t, p=[0.7, 0.2, 0.1], p0=[0.7, 0.2, 0.1], p0_init=[0.7, 0.2, 0.1], train_losses=[None] * 3,
                   eval_losses=None, reference_loss=None)
    assert apply_rule(x) == ([1 / 3] * 3, [0.7, 0.2, 0.1])
    with pytest.raises(ConfigError, match="uniform") as err:
        parse_update_type("uniform+Eval")  # the rule takes no flags
    assert "dro+Eval+DyAll" in str(err.value)


def test_an_entry_in_its_own_file_registers_itself(tmp_path, monkeypatch):
    """Discovery imports every module of the registry's package: a new file is all it takes."""
    package = tmp_path / "plugpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mine.py").write_text(
        "from tests.test_registry import PLUGGED\n\n@PLUGGED.register('mine')\ndef mine(decoder):\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert PLUGGED.names() == ["mine"] and PLUGGED.get("mine", key="importance")(None) == 1


PLUGGED: Registry = Registry("plugged", ("plugpkg",))


def test_builtin_registries_find_their_entries_without_imports():
    """A fresh interpreter that imports only drprune.registry still lists every built-in entry."""
    import subprocess
    import sys

    code = ("from drprune.registry import IMPORTANCE, LAYER_METRICS, MASK_GENERATORS, MIXTURE_RULES, SCHEDULERS; "
            "print(IMPORTANCE.names(), LAYER_METRICS.names(), MASK_GENERATORS.names(), MIXTURE_RULES.names(), "
            "SCHEDULERS.names())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'taylor'" in out and "'angular'" in out and "'hypernetwork'" in out and "'dro'" in out
    assert "'cosine_with_warmup'" in out
