"""The typed run config: read once, every key checked at any depth, defaults in one place."""
from __future__ import annotations

import pytest

import drprune.train as train_module
from drprune.errors import ConfigError
from drprune.run_config import (DataLoading, EvalLoader, GradientClipping, ModelSection, Optimizer, RunConfig,
                                Scheduler, TrainLoader)

MINIMAL = {"max_duration": "10ba", "global_train_batch_size": 4}


def test_defaults_live_in_the_dataclasses():
    run = RunConfig.from_cfg(MINIMAL)
    assert run.seed == 17 and run.precision == "fp32" and run.eval_loader is None
    assert run.train_loader == TrainLoader() and run.train_loader.dataset.shuffle is True
    assert run.optimizer == Optimizer() and run.optimizer.betas == (0.9, 0.95)
    assert run.scheduler == Scheduler("constant_with_warmup", {"t_warmup": "0ba"})
    assert run.callbacks.data_loading == DataLoading() and run.callbacks.data_loading.dro_clamp == "reference"
    assert run.model == ModelSection() and run.model.mask_generator is None
    data = run.data
    assert (data.seed, data.verify_hashes, data.data_loading) == (17, True, DataLoading())


def test_values_are_typed():
    run = RunConfig.from_cfg({**MINIMAL, "eval_loader": {"dataset": {"split": "eval_merge"}},
                              "optimizer": {"lr": "1e-3", "betas": [0.8, 0.9]},
                              "algorithms": {"gradient_clipping": {"clipping_threshold": 1}},
                              "callbacks": {"data_loading": {"rho": 1, "proportion": [1, 0]},
                                            "lr_monitor": None}})
    assert run.optimizer.lr == 1e-3 and run.optimizer.betas == (0.8, 0.9)
    assert run.eval_loader == EvalLoader() and run.eval_loader.dataset.shuffle is False
    assert run.algorithms.gradient_clipping == GradientClipping(1.0, "norm")
    assert run.callbacks.data_loading.rho == 1.0 and run.callbacks.data_loading.proportion == [1.0, 0.0]
    assert run.callbacks.others == {"lr_monitor": {}}


def test_sheared_l0_module_is_the_l0_generator():
    run = RunConfig.from_cfg({**MINIMAL, "model": {"n_layers": 2, "l0_module": {"target_model": {"n_layers": 1}}}})
    assert run.model.mask_generator == {"name": "l0", "target_model": {"n_layers": 1}}
    assert run.model.mask_prefix == "model.l0_module" and run.model.shape == {"n_layers": 2}


@pytest.mark.parametrize("change, message", [
    ({"max_duraton": "1ba"}, "max_duraton (it would be ignored): did you mean max_duration?"),
    ({"train_loader": {"dataset": {"shufle": True}}}, "did you mean train_loader.dataset.shuffle?"),
    ({"eval_loader": {"num_worker": 1}}, "did you mean eval_loader.num_workers?"),
    ({"callbacks": {"data_loading": {"update_typ": "dro"}}}, "did you mean callbacks.data_loading.update_type?"),
    ({"optimizer": {"weight_decy": 0.1}}, "did you mean optimizer.weight_decay?"),
    ({"algorithms": {"gradient_cliping": {}}}, "did you mean algorithms.gradient_clipping?"),
    ({"model": {"d_modle": 8}}, "did you mean model.d_model?"),
    ({"fsdp_config": {"sharding_strateg": "FULL_SHARD"}}, "did you mean fsdp_config.sharding_strategy?"),
    ({"seed": "x"}, "seed='x' must be an integer"),
    ({"progress_bar": "yes"}, "progress_bar='yes' must be true or false"),
    ({"optimizer": {"name": "adam"}}, "optimizer.name='adam' must be one of 'decoupled_adamw'"),
    ({"optimizer": {"betas": [0.9, 0.95, 0.99]}}, "must have 2 values"),
    ({"callbacks": {"data_loading": {"dro_clamp": "exactly"}}}, "one of 'reference', 'exact'"),
    ({"callbacks": {"data_loading": {"ema": 0}}}, "ema=0.0 must be in (0, 1]"),
    ({"callbacks": {"data_loading": {"update_type": "droo"}}}, "callbacks.data_loading.update_type"),
    ({"callbacks": {"data_loading": {"set_names": ["a", "a"]}}}, "has duplicates"),
    ({"callbacks": {"data_loading": {"dynamic": True}}, "max_duration": "1ep"}, "a dynamic mixture has no epochs"),
    ({"model": {"mask_generator": {}, "l0_module": {}}}, "not both"),
    ({"max_duration": None}, "max_duration is required"),
    ({"precision": "fp13"}, "precision='fp13' is unknown"),
    ({"train_loader": {"num_workers": -1}}, "train_loader.num_workers=-1 must be an integer >= 0"),
])
def test_a_bad_key_anywhere_is_refused_naming_the_fix(change, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_cfg({**MINIMAL, **change})
    assert message in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("model.mask_generator.target_modle.n_layers=3", "did you mean model.mask_generator.target_model?"),
    ("model.mask_generator.target_model.n_head=2", "did you mean model.mask_generator.target_model.n_heads?"),
    ("scheduler.t_warmpu=1ba", "t_warmpu"),
    ("callbacks.speed_monitor.window=3", "callbacks.speed_monitor"),
    ("loggers.tensorbord={}", "did you mean loggers.tensorboard?"),
])
def test_builder_checked_keys_fail_before_the_model_is_built(override, message, tmp_path, monkeypatch, capsys):
    """Mask generator, scheduler, callback and logger options are checked by their builders: still before
    any model or data work (the model class and the data check would raise if reached)."""
    from drprune.data.testing import write_synthetic_mds

    data = write_synthetic_mds(tmp_path / "data", {"a": "random"}, seq_len=64, vocab_size=97, n_train=4, n_eval=2)

    def reached(*args, **kwargs):
        raise AssertionError("built the model before refusing the config")

    monkeypatch.setattr(train_module, "PrunableLM", reached)
    code = train_module.main([str(train_module.packaged_config("tiny/prune.yaml")), f"data_local={data}",
                              "callbacks.data_loading.set_names=[a]", f"save_folder={tmp_path / 'run'}",
                              "model.vocab_size=97", override])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err[-2000:]
    assert not (tmp_path / "run").exists()
