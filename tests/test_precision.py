"""precision=amp_bf16 on CPU is real bf16 autocast; the pruning state stays fp32."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from composer.loggers import InMemoryLogger
from omegaconf import OmegaConf

from drprune.data.testing import write_synthetic_mds
from drprune.errors import ConfigError
from drprune.masks import build_mask_generator
from drprune.models.composer_model import PrunableLM
from drprune.models.config import ModelConfig
from drprune.precision import fp32_region, resolve_precision
from drprune.run_config import ModelSection
from drprune.train import build_trainer, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "prune.yaml")
SECTION = ModelSection.read(OmegaConf.load(TINY)["model"])  # the tiny run's shape and L0 generator
CFG = ModelConfig.from_dict(SECTION.shape)
SEQ = int(OmegaConf.load(TINY)["max_seq_len"])  # the tiny run's training length
HYPERNETWORK = {"name": "hypernetwork", "target_ratio": 0.6, "embedding_dim": 16, "hidden_size": 16}


@pytest.mark.parametrize("precision,cuda,expected", [
    ("fp32", False, ("fp32", None)),
    ("amp_bf16", False, ("fp32", torch.bfloat16)),
    ("amp_bf16", True, ("amp_bf16", None)),
    ("amp_fp16", True, ("amp_fp16", None)),
])
def test_resolve_precision(precision, cuda, expected):
    assert resolve_precision(precision, cuda) == expected


@pytest.mark.parametrize("precision", ["amp_fp16", "amp_fp8"])
def test_cpu_refuses_what_it_cannot_run_instead_of_falling_back(precision):
    with pytest.raises(ConfigError, match=f"precision={precision} needs a GPU.*amp_bf16.*fp32"):
        resolve_precision(precision, cuda=False)


def test_fp32_region_turns_cpu_autocast_off_and_back_on():
    layer, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with fp32_region():
            assert layer(x).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
        assert layer(x).dtype == torch.bfloat16


def build_model(generator_node: dict | None, cpu_autocast: torch.dtype | None) -> PrunableLM:
    torch.manual_seed(0)
    generator = build_mask_generator(CFG, generator_node)
    return PrunableLM(CFG, generator, cpu_autocast=cpu_autocast)


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, CFG.vocab_size, (4, SEQ), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("node", [SECTION.mask_generator, HYPERNETWORK], ids=["l0", "hypernetwork"])
def test_bf16_reaches_attention_and_mlp_while_masks_and_regularizer_stay_fp32(node, monkeypatch):
    model = build_model(node, torch.bfloat16).train()
    seen: dict[str, list] = {"sdpa": [], "mlp": [], "generator": []}
    real_sdpa = F.scaled_dot_product_attention

    def sdpa(q, k, v, **kw):
        seen["sdpa"].append((q.dtype, k.dtype, v.dtype))
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    for block in model.model.transformer["blocks"]:
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(block.mlp, name).register_forward_hook(
                lambda mod, args, out, name=name: seen["mlp"].append((name, args[0].dtype, out.dtype)))
    model.mask_generator.register_forward_pre_hook(
        lambda mod, args: seen["generator"].append(torch.is_autocast_enabled("cpu")))

    outputs = model(batch())
    losses = model.loss(outputs, batch())

    assert seen["sdpa"] == [(torch.bfloat16,) * 3] * CFG.n_layers
    assert len(seen["mlp"]) == 3 * CFG.n_layers
    assert all(out == torch.bfloat16 for _, _, out in seen["mlp"])  # the matmuls ran in bf16
    assert all(inp == torch.bfloat16 for name, inp, _ in seen["mlp"] if name == "down_proj")
    assert outputs["logits"].dtype == torch.bfloat16
    assert seen["generator"] == [False]  # autocast off inside the mask generator
    assert all(m.dtype == torch.float32 for m in outputs["masks"].values())
    assert losses["mask_loss"].dtype == torch.float32 and losses["ce_loss"].dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast never casts storage
    losses["total"].backward()
    assert all(p.grad.dtype == torch.float32 for p in model.mask_generator.parameters() if p.grad is not None)


@pytest.mark.parametrize("node", [None, SECTION.mask_generator], ids=["dense", "l0"])
def test_bf16_loss_and_gradients_are_close_to_fp32(node):
    model = build_model(node, None).train()
    results = {}
    for dtype in (None, torch.bfloat16):
        model.cpu_autocast = dtype
        model.zero_grad()
        if model.mask_generator is not None:
            model.mask_generator.set_step(3)  # the same noise, so the same sampled masks, in both runs
        losses = model.loss(model(batch()), batch())
        losses["total"].backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[dtype] = float(losses["ce_loss"]), grads
    (ce32, g32), (ce16, g16) = results[None], results[torch.bfloat16]
    assert abs(ce16 - ce32) / ce32 <= 1e-4  # measured 3.6e-6 (dense), 4.0e-6 (l0)
    assert (g16 - g32).norm() / g32.norm() <= 2e-2  # measured 5.9e-3 (dense), 5.2e-3 (l0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_synthetic_mds(tmp_path_factory.mktemp("mds") / "data", {"a": "repetitive", "b": "random"},
                               seq_len=64, vocab_size=49152, n_train=64, n_eval=8)


def fit(data_dir: Path, save: Path, precision: str, monkeypatch) -> tuple[list[float], list]:
    """Per-step CE of an 8-batch tiny pruning run, and the dtypes that reached SDPA during it."""
    seen: list = []
    real_sdpa = F.scaled_dot_product_attention

    def sdpa(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    trainer = build_trainer(load_config(TINY, [
        f"data_local={data_dir}", "callbacks.data_loading.set_names=[a,b]", f"save_folder={save}",
        "loggers.inmemory={}", "max_duration=8ba", "eval_interval=8ba", "save_interval=8ba",
        f"precision={precision}"]))
    assert trainer.state.precision.value == "fp32"  # Composer's CPU device; the autocast is drprune's
    assert trainer.state.model.cpu_autocast == (torch.bfloat16 if precision == "amp_bf16" else None)
    trainer.fit()
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    trainer.close()
    monkeypatch.undo()
    return [float(v) for _, v in memory.data["loss/train/ce_loss"]], seen


def test_amp_bf16_trains_in_bf16_through_the_composer_trainer_and_tracks_fp32(tmp_path, data_dir, monkeypatch):
    ce16, seen16 = fit(data_dir, tmp_path / "bf16", "amp_bf16", monkeypatch)
    ce32, seen32 = fit(data_dir, tmp_path / "fp32", "fp32", monkeypatch)
    assert seen16 and set(seen16) == {(torch.bfloat16,) * 3}  # training and eval forwards
    assert set(seen32) == {(torch.float32,) * 3}
    assert len(ce16) == len(ce32) == 8
    assert ce32[-1] < ce32[0] - 0.3  # it learns, so the comparison is not of two constant losses
    worst = max(abs(a - b) / b for a, b in zip(ce16, ce32))
    assert worst <= 2e-3  # measured 5.0e-5 (CE 10.77 -> 9.92 over the 8 steps)
