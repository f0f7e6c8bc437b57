"""The GPU check's code paths on a CPU: the throughput benchmark's tiny run and JSON, its FLOPs
accounting, the peak table, and scripts/gpu_check.sh refusing a machine without CUDA."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from drprune.models.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["plain", "l0", "hypernetwork", "distillation"]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the benchmarks import their shared step_setup
    return importlib.import_module("bench_throughput")


def test_tiny_cpu_run_reports_every_step_kind_with_positive_throughput(bench, tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--device", "cpu", "--peak-tflops", "2.0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["environment"]["torch"] == torch.__version__
    assert report["fsdp"]["version"] == 2 and report["fsdp"]["ranks"] == 1
    assert report["tokens_per_step"] == 2 * 32 and report["steps_timed"] == 2
    ran = {r["step"]: r for r in report["results"] if r["attn_impl"] == "sdpa"}
    assert sorted(ran) == sorted(KINDS)
    for r in ran.values():
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and len(r["step_ms_each"]) == 2
        assert r["tokens_per_s"] == pytest.approx(64 / (r["step_ms"] / 1e3))
        assert r["model_tflops_per_s"] == pytest.approx(r["model_flops_per_token"] * r["tokens_per_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["model_tflops_per_s"] / 2.0)
        assert r["peak_memory_gib"] is None  # CUDA's allocator statistics only
    flash = [r for r in report["results"] if r["attn_impl"] == "flash"]
    assert len(flash) == 4 and all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in flash)


def test_model_flops_per_token_counts_every_multiplying_parameter_once(bench):
    """Tiny shape by hand: per layer q, o 64x64, k, v 64x32, MLP 3 x 64x128, two norms; ln_f; head 256x64."""
    cfg = ModelConfig(**bench.TINY)
    n = 4 * (2 * 4096 + 2 * 2048 + 3 * 8192 + 2 * 64) + 64 + 256 * 64  # 164416: all but the input embedding
    attn = 4 * 4 * 16 * 32  # L * H * hd * T
    expected = {"plain": 6 * n + 12 * attn, "l0": 6 * n + 12 * attn, "hypernetwork": 4 * n + 12 * attn,
                "distillation": 8 * n + 16 * attn}
    assert {k: bench.model_flops_per_token(cfg, 32, k) for k in KINDS} == expected
    full = bench._shape_only(ModelConfig(**bench.TINYLLAMA_1B))
    assert sum(p.numel() for p in full.parameters()) == 1_100_048_384  # TinyLlama-1.1B's count


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0),
                                        ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA GeForce RTX 4090", None)])
def test_peak_is_looked_up_by_device_name_and_the_flag_wins(bench, monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert bench.device_peak("cuda:0", None)[:2] == (name, peak)
    assert bench.device_peak("cuda:0", 123.0)[1:] == (123.0, "--peak-tflops")


def test_bad_flags_are_refused_before_any_model_is_built(bench, tmp_path, capsys):
    for argv in (["--kinds", "plain,pruned"], ["--attn", "xformers"], ["--steps", "0"], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.main([*argv, "--tiny", "--out", str(tmp_path / "x.json")])
        assert exit_info.value.code == 2
    assert "pick from plain, l0, hypernetwork, distillation" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def gpu_check(*args: str, hide_gpus: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if hide_gpus else {})}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_gpu_check_refuses_a_machine_without_cuda(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = gpu_check("--out", str(out))
    assert run.returncode == 2
    assert "no CUDA device" in run.stderr and "--cpu-smoke" in run.stderr
    assert not out.exists()


@pytest.mark.slow
def test_gpu_check_cpu_smoke_gathers_tests_and_benchmark_into_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = gpu_check("--cpu-smoke", "--out", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["ok"] and result["cpu_smoke"]
    assert result["tests"]["skipped"] >= 1 and result["tests"]["failed"] == 0  # gpu tests skip without CUDA
    assert all(case["outcome"] == "skipped" for case in result["tests"]["cases"])
    statuses = {(r["step"], r["attn_impl"]): r["status"] for r in result["benchmark"]["report"]["results"]}
    assert {statuses[(k, "sdpa")] for k in KINDS} == {"ok"}
