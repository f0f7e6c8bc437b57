"""The capacity planner: its activation model against autograd, its memory terms, its verdicts and target shapes.

The memory model is checked three ways here: per-layer saved-activation bytes against the tensors
autograd really keeps (walking the graph of tiny decoders), term arithmetic on known shapes (fp32
master weights 4 B per parameter, FULL_SHARD dividing by the world size, the mask generator not), and
the command on shipped configs. Measured peaks of real training steps are in benchmarks/bench_planner.py.
"""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from drprune.cli import main as drprune
from drprune.convert.checkpoint import decoder_checkpoint_state, save_checkpoint
from drprune.masks import build_mask_generator
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder
from drprune.models.shapes import config_params
from drprune.plan.activations import ActivationSetup, activation_bytes, attention_kernel, recomputed_bytes
from drprune.plan.flops import step_time
from drprune.plan.memory import Layout, MemoryInputs, plan_memory
from drprune.plan.planner import Hardware, plan_run
from drprune.plan.target import shape_for_budget
from drprune.train import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "prune.yaml")
CONTINUE = str(ROOT / "configs" / "tiny" / "continue_pretrain.yaml")
LLAMA3 = str(ROOT / "configs" / "llama3" / "8b.yaml")
TINY_SHAPE = dict(family="llama", vocab_size=49152, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                  intermediate_size=128, norm_eps=1e-5, tie_word_embeddings=True)
FAMILIES = {
    "llama-gqa": dict(family="llama", n_heads=8, n_kv_heads=2, tie_word_embeddings=True),
    "llama-mha": dict(family="llama", n_heads=4, n_kv_heads=4),
    "pythia": dict(family="pythia", n_heads=4, norm="layernorm", mlp="plain", activation="gelu",
                   parallel_residual=True, qkv_bias=True, o_bias=True, mlp_bias=True, rotary_pct=0.25),
}
GENERATORS = {
    "none": None,
    "l0": {"name": "l0", "pruning_modules": ["head", "intermediate", "layer", "hidden"],
           "target_model": {"d_model": 32, "n_layers": 1, "intermediate_size": 48}},
    "hypernetwork": {"name": "hypernetwork", "target_ratio": 0.5},
}


def saved_activation_bytes(model: PrunableDecoder, generator, ids: torch.Tensor, autocast: bool) -> int:
    """Bytes of the distinct per-token tensors autograd keeps for backward (a multiple of the batch's tokens:
    not parameters, autocast's weight copies or the masks' own tensors, which the planner counts apart)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids, generator() if generator is not None else None)
    weights = [*model.parameters(), *(generator.parameters() if generator is not None else [])]
    params = {p.untyped_storage().data_ptr() for p in weights}
    sizes = {p.numel() for p in model.parameters()}
    seen, todo, done, total = set(), [logits.grad_fn], set(), 0
    while todo:
        node = todo.pop()
        if node is None or node in done:
            continue
        done.add(node)
        todo.extend(n for n, _ in node.next_functions)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            value = getattr(node, name)
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if not isinstance(t, torch.Tensor):
                    continue
                key = t.untyped_storage().data_ptr()
                weight_copy = t.dtype == torch.bfloat16 and t.numel() in sizes and t.shape[0] != ids.numel()
                if key in seen or key in params or weight_copy or t.numel() % ids.numel():
                    continue
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("family,generator,autocast", itertools.product(FAMILIES, GENERATORS, [False, True]))
def test_saved_activations_are_what_autograd_keeps(family, generator, autocast):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layers=2, intermediate_size=160, context_length=128,
                      **FAMILIES[family])
    node = GENERATORS[generator]
    if node is not None and node["name"] == "l0":
        node = {**node, "target_model": {**node["target_model"], "n_heads": cfg.n_heads // 2 if cfg.group_size == 1
                                         else cfg.group_size}}
    mask_generator = build_mask_generator(cfg, node)
    model = PrunableDecoder(cfg)
    trainable = mask_generator is None or not mask_generator.model_parameters_frozen()
    model.requires_grad_(trainable)
    batch, seq_len = 2, 96
    measured = saved_activation_bytes(model, mask_generator, torch.randint(0, 300, (batch, seq_len)), autocast)
    c = 2 if autocast else 4
    masks = frozenset(mask_generator()) if mask_generator is not None else frozenset()
    setup = ActivationSetup(c, 4, trainable, masks, *attention_kernel(cfg, "cpu", c))
    planned = activation_bytes(cfg, setup, batch, seq_len, checkpointing=False)
    assert planned == measured


def llama(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(family="llama", vocab_size=32000, d_model=1024, n_layers=8, n_heads=16,
                                 n_kv_heads=4, intermediate_size=2816), **kw})


def inputs(layout: Layout, mask_params: int = 1000, precision_bytes: int = 4, **kw) -> MemoryInputs:
    cfg = llama()
    setup = ActivationSetup(precision_bytes, 4, True, frozenset({"head", "intermediate"}), "fused")
    return MemoryInputs(cfg, setup, layout, microbatch=2, microbatches=1, seq_len=512, mask_params=mask_params,
                        mask_units=100, **kw)


def test_weights_gradients_and_adam_state_are_4_4_and_8_bytes_per_parameter_divided_by_full_shard():
    params = config_params(llama())
    whole = plan_memory(inputs(Layout(1, "single", False))).terms
    assert (whole["weights"].bytes, whole["gradients"].bytes, whole["optimizer state"].bytes) == (
        4 * params, 4 * params, 8 * params)
    assert whole["weight working copy"].bytes == 0  # fp32: no autocast copies
    sharded = plan_memory(inputs(Layout(8, "full_shard", False))).terms
    assert (sharded["weights"].bytes, sharded["gradients"].bytes, sharded["optimizer state"].bytes) == (
        4 * params // 8, 4 * params // 8, 8 * params // 8)
    # the mask generator stays whole on every rank: 16 B per parameter (weight, gradient, 2 Adam states)
    assert sharded["mask generator"].bytes == whole["mask generator"].bytes == 16 * 1000 + 8 * 4 * 100
    ddp = plan_memory(inputs(Layout(8, "ddp", False))).terms
    assert ddp["gradients"].bytes == 8 * params  # DDP's gradient buckets are a second fp32 copy
    assert ddp["weights"].bytes == 4 * params
    autocast = plan_memory(inputs(Layout(1, "single", False), precision_bytes=2)).terms
    assert autocast["weight working copy"].bytes == 2 * (params - 32000 * 1024 - 17 * 1024)  # matmul weights only
    grad_op = plan_memory(inputs(Layout(8, "shard_grad_op", False, gather_bytes=2))).terms
    assert grad_op["weight working copy"].bytes == 2 * params  # kept gathered from forward to backward


def test_checkpointing_keeps_one_block_input_per_layer_and_rebuilds_one_block():
    cfg = llama()
    setup = ActivationSetup(2, 2, True, frozenset(), "fused")
    full = activation_bytes(cfg, setup, 2, 512, False)
    kept = activation_bytes(cfg, setup, 2, 512, True)
    per_layer = (full - activation_bytes(dataclasses.replace(cfg, n_layers=7), setup, 2, 512, False)) // (2 * 512)
    assert full - kept == 2 * 512 * (8 * per_layer - 8 * 2 * cfg.d_model)
    assert recomputed_bytes(cfg, setup, 2, 512) == 2 * 512 * per_layer
    plan = plan_memory(inputs(Layout(8, "full_shard", True, gather_bytes=2)))
    assert plan.terms["activations"].bytes < plan.activations_full
    assert "backward (recomputation)" in plan.phases


def test_step_time_is_6nd_plus_attention_over_the_assumed_throughput():
    cfg = llama(tie_word_embeddings=True)
    n = config_params(cfg) - (2 * 8 + 1) * 1024  # matmul weights: everything but the norms (tied head counted once)
    t = step_time(cfg, sequences=4, seq_len=512, trainable=True, checkpointing=False, teacher=None, ranks=2,
                  peak_flops=1e15, mfu=0.5, steps=10)
    model = 6 * n * 2048 + 12 * 8 * 16 * 64 * 512**2 * 4
    assert t.model_flops == pytest.approx(model)
    assert t.seconds == pytest.approx(model / (2 * 1e15 * 0.5))
    assert t.run_seconds == pytest.approx(10 * t.seconds)
    frozen = step_time(cfg, sequences=4, seq_len=512, trainable=False, checkpointing=True, teacher=cfg, ranks=2,
                       peak_flops=1e15, mfu=0.5)
    assert frozen.model_flops == pytest.approx(model - 2 * n * 2048 + 2 * n * 2048 + 4 * 8 * 16 * 64 * 512**2 * 4)
    assert frozen.hardware_flops - frozen.model_flops == pytest.approx(2 * n * 2048 + 4 * 8 * 16 * 64 * 512**2 * 4)


def test_a_tiny_run_fits_and_its_weights_are_the_configs(capsys):
    assert drprune(["plan", TINY]) == 0
    out = capsys.readouterr().out
    params = config_params(ModelConfig(**TINY_SHAPE))
    assert f"{params:,} parameters x 4 B (fp32 master)" in out
    assert "one process over 1 rank" in out and ": fits" in out
    assert "not set, not needed to plan: callbacks.data_loading.set_names, data_local, save_folder" in out


def test_llama3_8b_on_8_gpus_is_fully_sharded_and_fits(capsys):
    assert drprune(["plan", LLAMA3, "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "FSDP1 FULL_SHARD over 8 ranks" in out and "activation checkpointing on" in out
    params = config_params(llama(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                                 intermediate_size=14336))
    assert f"{params:,} parameters x 4 B (fp32 master) / 8 ranks" in out


def test_a_run_that_does_not_fit_exits_1_naming_the_largest_term_and_what_to_change(capsys):
    assert drprune(["plan", LLAMA3]) == 1  # 8B with Adam on one GPU
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "the largest term is optimizer state" in out
    assert "--gpus 4 (4 ranks)" in out
    # activations: without checkpointing a microbatch of 4 x 4096 tokens is the largest term, and the plan says so
    assert drprune(["plan", LLAMA3, "--gpus", "8", "fsdp_config.activation_checkpointing=false"]) == 1
    out = capsys.readouterr().out
    assert "the largest term is activations" in out
    assert "fsdp_config.activation_checkpointing=true" in out and "device_train_microbatch_size=1" in out


def test_a_global_batch_the_ranks_cannot_divide_is_bad_input(capsys):
    assert drprune(["plan", LLAMA3, "--gpus", "3"]) == 2
    assert "global_train_batch_size=32 is not divisible by the world size 3" in capsys.readouterr().err


def test_the_shape_comes_from_the_checkpoint_without_its_weights(tmp_path, capsys):
    cfg = ModelConfig(**{**TINY_SHAPE, "d_model": 96, "n_layers": 3})
    ckpt = save_checkpoint(decoder_checkpoint_state(PrunableDecoder(cfg)), tmp_path / "model.pt")
    plan = plan_run(CONTINUE, [f"model.path={ckpt}"], Hardware())
    assert plan.run.model == cfg
    assert plan.memory.terms["weights"].bytes == 4 * config_params(cfg)
    folder = tmp_path / "sharded"  # a sharded checkpoint folder: only its config entry is read
    dcp.save({"state": {"model": decoder_checkpoint_state(PrunableDecoder(cfg))}},
             storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    assert plan_run(CONTINUE, [f"model.path={folder}"], Hardware()).run.model == cfg
    assert drprune(["plan", CONTINUE]) == 2
    assert "model.path is not set and the config gives no model shape" in capsys.readouterr().err


def test_a_teacher_is_counted_in_its_dtype_and_its_logits_with_the_students(tmp_path):
    teacher = save_checkpoint(decoder_checkpoint_state(PrunableDecoder(ModelConfig(**TINY_SHAPE))), tmp_path / "t.pt")
    base = plan_run(TINY, [], Hardware())
    plan = plan_run(TINY, [f"distillation.teacher={teacher}"], Hardware())
    params = config_params(ModelConfig(**TINY_SHAPE))
    assert plan.memory.terms["teacher"].bytes == 2 * params  # amp_bf16: the teacher is stored in bf16
    tokens_vocab = 4 * 64 * 49152
    assert plan.memory.terms["logits"].bytes - base.memory.terms["logits"].bytes == 2 * 2 * tokens_vocab
    fp32 = plan_run(TINY, [f"distillation.teacher={tmp_path / 'missing.pt'}", "precision=fp32"], Hardware())
    assert fp32.memory.terms["teacher"].bytes == 4 * params
    assert any("does not exist here" in note for note in fp32.run.notes)


def test_a_frozen_llm_has_no_gradients_or_adam_state_and_no_second_copy_as_teacher():
    plan = plan_run(TINY, ["model.mask_generator.name=hypernetwork", "model.mask_generator.target_ratio=0.5",
                           "distillation.kl_weight=0.5", "model.path=source.pt"], Hardware())
    terms = plan.memory.terms
    assert terms["gradients"].bytes == terms["optimizer state"].bytes == terms["teacher"].bytes == 0
    assert terms["mask generator"].bytes > 16 * 10_000  # the GRU and one head per mask kind


@pytest.mark.parametrize("source,budget,layers", [
    (dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, intermediate_size=11008), 1.3e9, None),
    (dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, intermediate_size=11008), 1.3e9, 24),
    (dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336), 1.9e9,
     None),
    (dict(vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2, intermediate_size=8960,
          tie_word_embeddings=True, qkv_bias=True), 6e8, None),
])
def test_a_parameter_budget_becomes_an_engine_friendly_target_within_2_percent(source, budget, layers):
    cfg = ModelConfig(family="llama", **source)
    target = shape_for_budget(cfg, budget, ["head", "intermediate", "layer", "hidden"], layers)
    shape = target.config
    assert shape.d_model % 64 == 0 and shape.intermediate_size % 64 == 0
    assert shape.n_heads == shape.n_kv_heads * cfg.group_size and shape.head_dim == cfg.head_dim
    assert shape.n_layers == (layers or cfg.n_layers)
    assert abs(target.error) < 0.02 and target.params == config_params(shape)
    # the overrides are a target the L0 generator accepts
    generator = build_mask_generator(cfg, {"name": "l0", "target_model": target.target_model()})
    assert generator.sizes["head"] == shape.n_kv_heads and generator.sizes["intermediate"] == shape.intermediate_size


def test_target_overrides_parse_and_the_command_prints_them(capsys):
    assert drprune(["plan", TINY, "--target-params", "3.2e6"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("  overrides: "))
    overrides = line.split(": ", 1)[1].split()
    target = load_config(TINY, overrides).model.mask_generator.target_model
    assert target.d_model % 64 == 0 and target.n_heads % 2 == 0
    assert drprune(["plan", TINY, "--target-params", "1e3"]) == 2  # below what widths of 64 reach
