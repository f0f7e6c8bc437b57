"""Logit distillation from a teacher: the KL math, tiny runs through the real Trainer, config errors."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from composer.loggers import InMemoryLogger

from drprune.convert.checkpoint import decoder_checkpoint_state, save_checkpoint
from drprune.data.testing import write_synthetic_mds
from drprune.errors import UserError
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder
from drprune.models.losses import IGNORE_INDEX, kd_token_losses, token_losses
from drprune.train import build_trainer, load_config

ROOT = Path(__file__).resolve().parents[1]
PRUNE = str(ROOT / "configs" / "tiny" / "prune.yaml")
CONTINUE = str(ROOT / "configs" / "tiny" / "continue_pretrain.yaml")
# the tiny pruning config's source shape
SOURCE = dict(family="llama", vocab_size=49152, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
              intermediate_size=128, context_length=64, norm_eps=1e-5, tie_word_embeddings=True)


# ---------------------------------------------------------------- the KL


def _softmax(row: list[float], t: float) -> list[float]:
    m = max(row)
    e = [math.exp((x - m) / t) for x in row]
    return [x / sum(e) for x in e]


def test_kd_token_losses_is_the_hand_computed_forward_kl():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 4, 5, generator=g) * 2, torch.randn(2, 4, 5, generator=g) * 2
    labels = torch.tensor([[1, 2, 3, 4], [0, 1, IGNORE_INDEX, 3]])
    t = 2.0
    kd, tokens = kd_token_losses(student, teacher, labels, t)
    for b in range(2):
        expected = 0.0
        for pos in range(3):  # position pos predicts labels[pos + 1]
            if labels[b, pos + 1] == IGNORE_INDEX:
                continue
            p_t, p_s = _softmax(teacher[b, pos].tolist(), t), _softmax(student[b, pos].tolist(), t)
            expected += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s)) * t * t
        assert float(kd[b]) == pytest.approx(expected, rel=1e-5)
    assert tokens.tolist() == [3, 2] == token_losses(student, labels)[1].tolist()
    assert kd.dtype == torch.float32

    same, _ = kd_token_losses(student.bfloat16(), student.bfloat16(), labels, 0.7)
    assert same.abs().max() < 1e-6


def test_teacher_is_frozen_eval_only_and_out_of_state_dicts():
    from drprune.models.composer_model import PrunableLM
    from drprune.models.distill import DistillConfig

    cfg = ModelConfig(family="llama", vocab_size=50, d_model=16, n_layers=1, n_heads=2, intermediate_size=8)
    lm = PrunableLM(cfg, None, ["a"], DistillConfig("unused.pt"), PrunableDecoder(cfg))
    lm.train()
    assert lm.training and lm.model.training and not lm.teacher.training
    assert not any(p.requires_grad for p in lm.teacher.parameters())
    grouped = {id(p) for g in lm.param_groups(1e-3, 0.0, 1.0) for p in g["params"]}
    assert grouped == {id(p) for p in lm.model.parameters()}
    assert sorted(k for k in lm.get_metrics() if "KL" in k) == ["KLDivergence", "a_KLDivergence"]
    state = lm.state_dict()
    assert state and not [k for k in state if k.startswith("teacher")]
    lm.load_state_dict(state, strict=True)  # teacher keys may be missing ...
    del state["model.transformer.wte.weight"]
    with pytest.raises(RuntimeError, match="model.transformer.wte.weight"):  # ... no other key may
        lm.load_state_dict(state, strict=True)


# ---------------------------------------------------------------- tiny runs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_synthetic_mds(tmp_path_factory.mktemp("mds") / "data", {"a": "repetitive", "b": "random"},
                               seq_len=64, vocab_size=49152, n_train=48, n_eval=8)


def write_model(path: Path, seed: int = 1, **shape) -> Path:
    """A random decoder checkpoint; init_std 0.2 gives peaked (informative) teacher distributions."""
    torch.manual_seed(seed)
    decoder = PrunableDecoder(ModelConfig(**{**SOURCE, "init_std": 0.2, **shape}))
    return save_checkpoint(decoder_checkpoint_state(decoder), path)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("teacher") / "teacher.pt")


def args(data_dir: Path, save: Path, *extra: str) -> list[str]:
    return [f"data_local={data_dir}", "callbacks.data_loading.set_names=[a,b]", f"save_folder={save}",
            "loggers.inmemory={}", "console_log_interval=100ba", *extra]


def fit(config: str, overrides: list[str]):
    trainer = build_trainer(load_config(config, overrides))
    before = {k: v.clone() for k, v in trainer.state.model.state_dict().items() if torch.is_tensor(v)}
    teacher = trainer.state.model.teacher
    teacher_before = {k: v.clone() for k, v in teacher.named_parameters()} if teacher is not None else {}
    trainer.fit()
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    return trainer, memory, before, teacher_before


def test_pruning_run_distils_without_training_or_saving_the_teacher(tmp_path, data_dir, teacher_ckpt):
    save = tmp_path / "run"
    common = ["eval_interval=2ba", "save_interval=2ba", f"distillation.teacher={teacher_ckpt}",
              "distillation.temperature=2.0", "distillation.kl_weight=0.7", "distillation.ce_weight=0.3"]
    trainer, memory, before, teacher_before = fit(PRUNE, args(data_dir, save, "max_duration=4ba", *common))
    lm = trainer.state.model
    # the teacher: bit-identical, eval mode, in no optimizer group; the student moved
    assert teacher_before and all(torch.equal(v, teacher_before[k]) for k, v in lm.teacher.named_parameters())
    assert not lm.teacher.training and lm.training
    optimized = {id(p) for opt in trainer.state.optimizers for g in opt.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in lm.teacher.parameters()}
    assert not torch.equal(lm.model.transformer["wte"].weight, before["model.transformer.wte.weight"])

    # the loss is 0.3 * CE + 0.7 * KL + mask loss; KL metrics overall and per domain, train and eval
    step = {k: float(memory.data[f"loss/train/{k}"][-1][1]) for k in ("total", "ce_loss", "kd_loss", "mask_loss")}
    assert step["total"] == pytest.approx(0.3 * step["ce_loss"] + 0.7 * step["kd_loss"] + step["mask_loss"], rel=1e-4)
    assert step["kd_loss"] > 0
    for split in ("train", "eval"):
        for name in ("KLDivergence", "a_KLDivergence", "b_KLDivergence", "a_LanguageCrossEntropy"):
            values = [float(v) for _, v in memory.data[f"metrics/{split}/{name}"]]
            assert values and all(math.isfinite(v) and v >= 0 for v in values), (split, name)

    # checkpoints hold no teacher keys, and resuming from one reproduces the uninterrupted run
    for ckpt in ("ep0-ba2-rank0.pt", "latest-rank0.pt"):
        keys = torch.load(save / ckpt, weights_only=False)["state"]["model"].keys()
        assert "model.transformer.wte.weight" in keys and not [k for k in keys if k.startswith("teacher")]
    final = {k: v.clone() for k, v in lm.state_dict().items() if torch.is_tensor(v)}
    trainer.close()
    again, _, _, _ = fit(PRUNE, args(data_dir, tmp_path / "again", "max_duration=4ba", *common,
                                     f"load_path={save / 'ep0-ba2-rank0.pt'}"))
    assert int(again.state.timestamp.batch) == 4
    state = {k: v for k, v in again.state.model.state_dict().items() if torch.is_tensor(v)}
    assert state.keys() == final.keys()
    for key, value in state.items():
        assert torch.equal(value, final[key]), key
    again.close()


def test_without_the_node_nothing_changes(tmp_path, data_dir):
    trainer = build_trainer(load_config(PRUNE, args(data_dir, tmp_path / "run", "distillation=null")))
    lm = trainer.state.model
    assert lm.distill is None and lm.teacher is None
    assert not [k for k in lm.eval_metrics if "KLDivergence" in k]
    trainer.close()


def test_continued_pretraining_with_an_explicit_teacher(tmp_path, data_dir, teacher_ckpt, caplog):
    student = write_model(tmp_path / "compact.pt", seed=2, d_model=48, n_heads=2, n_kv_heads=1, n_layers=3,
                          intermediate_size=64, init_std=0.02)
    common = args(data_dir, tmp_path / "run", f"model.path={student}", "max_duration=3ba", "eval_interval=3ba",
                  "save_interval=3ba")
    trainer, memory, before, teacher_before = fit(CONTINUE, [*common, f"distillation.teacher={teacher_ckpt}"])
    lm = trainer.state.model
    assert lm.mask_generator is None and lm.teacher.cfg.d_model == 64 and lm.model.cfg.d_model == 48
    assert teacher_before and all(torch.equal(v, teacher_before[k]) for k, v in lm.teacher.named_parameters())
    ce = float(memory.data["loss/train/ce_loss"][-1][1])
    kd = float(memory.data["loss/train/kd_loss"][-1][1])
    assert float(memory.data["loss/train/total"][-1][1]) == pytest.approx(0.5 * ce + 0.5 * kd, rel=1e-4)
    assert "metrics/eval/b_KLDivergence" in memory.data
    keys = torch.load(tmp_path / "run" / "latest-rank0.pt", weights_only=False)["state"]["model"].keys()
    assert not [k for k in keys if k.startswith("teacher")]
    trainer.close()

    # no teacher given: model.path (the student's own starting point) is the teacher, with a warning
    again = args(data_dir, tmp_path / "run2", f"model.path={student}", "max_duration=3ba", "eval_interval=3ba",
                 "save_interval=3ba")  # a fresh save_folder: the first one holds that run's checkpoints
    with caplog.at_level(logging.WARNING, logger="drprune.train"):
        trainer = build_trainer(load_config(CONTINUE, [*again, "distillation.kl_weight=0.5"]))
    assert "the student's own initial weights" in caplog.text
    assert trainer.state.model.teacher is not None
    trainer.close()


def test_hypernetwork_distils_from_its_own_unmasked_llm(tmp_path, data_dir, teacher_ckpt):
    trainer, memory, before, _ = fit(PRUNE, args(
        data_dir, tmp_path / "run", f"model.path={teacher_ckpt}",
        "model.mask_generator.name=hypernetwork", "model.mask_generator.target_ratio=0.5",
        "max_duration=3ba", "eval_interval=3ba", "save_interval=3ba", "distillation.kl_weight=1.0",
        "distillation.ce_weight=0.0"))
    lm = trainer.state.model
    assert lm.teacher is None and lm.distill is not None  # no second copy of the frozen LLM
    assert all(torch.equal(p, before[f"model.{k}"]) for k, p in lm.model.named_parameters())
    # training samples drop some units, so the student departs from its teacher; the eval masks (offset +3:
    # everything starts kept) are all ones after 3 steps, so the eval student is its teacher
    assert float(memory.data["loss/train/kd_loss"][0][1]) > 0
    for name in ("KLDivergence", "a_KLDivergence", "b_KLDivergence"):
        assert float(memory.data[f"metrics/eval/{name}"][-1][1]) < 1e-6
    trainer.close()


# ---------------------------------------------------------------- errors before anything is built


@pytest.fixture
def nothing_built(monkeypatch):
    """Fail the test if a config error is raised only after the model was built or data was read."""
    import drprune.data.loaders as loaders
    import drprune.models.composer_model as composer_model

    def boom(*a, **k):
        raise AssertionError("built the model or read data before rejecting the config")

    monkeypatch.setattr(composer_model.PrunableLM, "__init__", boom)
    monkeypatch.setattr(loaders, "build_train_dataloader", boom)


@pytest.mark.parametrize("extra,message", [
    (["distillation.teacher={missing}"], "{missing} does not exist"),
    (["distillation.teacher={small_vocab}"], "vocab_size=131 but the student has vocab_size=49152"),
    (["distillation.teacher={teacher}", "distillation.kl_weight=1.5"], "distillation.kl_weight=1.5 is outside [0, 1]"),
    (["distillation.teacher={teacher}", "distillation.kl_weight=0", "distillation.ce_weight=0"], "both 0"),
    (["distillation.teacher={teacher}", "distillation.temperature=0"], "distillation.temperature=0.0 must be > 0"),
    (["distillation.teacher={teacher}", "distillation.temprature=2"], "did you mean distillation.temperature"),
    (["distillation.kl_weight=0.5"], "no model.path to default to"),
])
def test_bad_distillation_configs_fail_before_the_model_is_built(tmp_path, data_dir, teacher_ckpt, nothing_built,
                                                                 extra, message):
    paths = {"missing": str(tmp_path / "nope.pt"), "teacher": str(teacher_ckpt),
             "small_vocab": str(write_model(tmp_path / "small.pt", vocab_size=131))}
    extra = [e.format(**paths) for e in extra]
    with pytest.raises(UserError) as err:
        build_trainer(load_config(PRUNE, args(data_dir, tmp_path / "run", *extra)))
    assert message.format(**paths) in str(err.value)
    assert not (tmp_path / "run").exists()
