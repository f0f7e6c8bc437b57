"""drprune.parallel: the sharding plan, its refusals (one line, before any model or checkpoint is read), and
the gradient clipping that stands in for Composer's under FSDP."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from composer.core import Event
from composer.utils import FSDP2Config, FSDPConfig

import drprune.train
from drprune.data.testing import write_synthetic_mds
from drprune.errors import ConfigError
from drprune.parallel import ShardedGradients, global_grad_norm, plan_sharding, prepare_model, reduce_scatter_avg_factor
from drprune.train import build_trainer, load_config, main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "prune.yaml")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_synthetic_mds(tmp_path_factory.mktemp("mds") / "data", {"a": "repetitive", "b": "random"},
                               seq_len=64, vocab_size=49152, n_train=16, n_eval=4)


def test_no_fsdp_config_is_ddp():
    plan = plan_sharding(None, has_mask_generator=True)
    assert plan.version == 0 and not plan.sharded and plan.parallelism_config() is None


@pytest.mark.parametrize("strategy,reshard", [("FULL_SHARD", True), ("SHARD_GRAD_OP", False), ("shard_grad_op", False)])
def test_fsdp2_translates_the_sharding_strategy(monkeypatch, strategy, reshard):
    monkeypatch.setenv("FSDP_VERSION", "2")
    plan = plan_sharding({"sharding_strategy": strategy, "activation_checkpointing": True, "mixed_precision": "DEFAULT",
                          "use_orig_params": True, "state_dict_type": "full"}, has_mask_generator=True, cuda=False)
    assert plan.version == 2 and isinstance(plan.config, FSDP2Config)
    assert plan.config.reshard_after_forward is reshard and plan.config.activation_checkpointing
    assert plan.config.state_dict_type == "full" and plan.parallelism_config() == {"fsdp": plan.config}


def test_fsdp1_defaults_to_non_reentrant_checkpointing(monkeypatch):
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    plan = plan_sharding({"sharding_strategy": "FULL_SHARD", "activation_checkpointing": True},
                         has_mask_generator=True, cuda=True)
    assert plan.version == 1 and isinstance(plan.config, FSDPConfig)
    assert plan.config.activation_checkpointing_reentrant is False


@pytest.mark.parametrize("env,node,cuda,message", [
    (None, {"sharding_strategy": "FULL_SHARD"}, False, "set FSDP_VERSION=2"),
    ("2", {"activation_checkpointing": True, "activation_checkpointing_reentrant": True}, False,
     "activation_checkpointing_reentrant=true cannot train a mask generator"),
    (None, {"activation_checkpointing": True, "activation_checkpointing_reentrant": True}, True,
     "activation_checkpointing_reentrant=true cannot train a mask generator"),
    ("2", {"sharding_strategy": "HYBRID_SHARD"}, False, "sharding_strategy=HYBRID_SHARD is not supported"),
    ("3", {"sharding_strategy": "FULL_SHARD"}, False, "FSDP_VERSION='3' must be 1 or 2"),
])
def test_refusals(monkeypatch, env, node, cuda, message):
    if env is None:
        monkeypatch.delenv("FSDP_VERSION", raising=False)
    else:
        monkeypatch.setenv("FSDP_VERSION", env)
    with pytest.raises(ConfigError, match=message):
        plan_sharding(node, has_mask_generator=True, cuda=cuda)


def test_reentrant_checkpointing_is_fine_without_masks(monkeypatch):
    monkeypatch.setenv("FSDP_VERSION", "2")
    plan_sharding({"activation_checkpointing": True, "activation_checkpointing_reentrant": True},
                  has_mask_generator=False)


@pytest.mark.parametrize("env,extra,message", [
    (None, ["fsdp_config.sharding_strategy=FULL_SHARD"], "FSDP1, which in Composer needs CUDA"),
    ("2", ["fsdp_config.activation_checkpointing=true", "fsdp_config.activation_checkpointing_reentrant=true"],
     "reentrant checkpointing does not track the masks"),
])
def test_the_run_is_refused_in_one_line_before_the_model(tmp_path, data_dir, capsys, monkeypatch, env, extra,
                                                         message):
    if torch.cuda.is_available() and env is None:
        pytest.skip("FSDP1 is allowed with CUDA")
    if env is None:
        monkeypatch.delenv("FSDP_VERSION", raising=False)
    else:
        monkeypatch.setenv("FSDP_VERSION", env)

    def built(*args, **kwargs):
        raise AssertionError("a model or checkpoint was read")

    for name in ("build_mask_generator", "PrunableLM", "load_model_state"):
        monkeypatch.setattr(drprune.train, name, built)
    save = tmp_path / "run"
    args = [f"data_local={data_dir}", "callbacks.data_loading.set_names=[a,b]", f"save_folder={save}",
            "model.path=never-read.pt", *extra]
    assert main([TINY, *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("drprune: error:")]
    assert len(lines) == 1 and message in lines[0], lines
    assert not save.exists()


def test_one_process_sharded_clipping_equals_torch(tmp_path, data_dir):
    """Without a process group the global norm is torch's total norm and the clip is torch's clip."""
    trainer = build_trainer(load_config(TINY, [f"data_local={data_dir}", "callbacks.data_loading.set_names=[a,b]",
                                               f"save_folder={tmp_path / 'run'}", "precision=fp32"]))
    model = trainer.state.model
    prepare_model(model, plan_sharding({"sharding_strategy": "FULL_SHARD"}, has_mask_generator=True, cuda=True))
    assert model.mask_generator._fsdp_wrap is False
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    expected = [p.grad.clone() for p in model.parameters()]
    total = float(torch.nn.utils.get_total_norm(expected))
    assert float(global_grad_norm(model)) == pytest.approx(total, rel=1e-6)
    ShardedGradients(check_average=True, clipping=("norm", 1.0)).apply(Event.AFTER_TRAIN_BATCH, trainer.state,
                                                                        trainer.logger)
    scale = min(1.0, 1.0 / (total + 1e-6))
    for p, g in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, g * scale, rtol=1e-6, atol=0)
    assert reduce_scatter_avg_factor(torch.device("cpu")) == 1.0  # no process group: nothing to correct
    trainer.close()
