"""FSDP1 as Composer builds it (`fsdp_config`, the seeds' key): the same tiny pruning run equals DDP.

Composer's own FSDP1 path (`prepare_fsdp_module`: every child of the model its own FSDP unit, one
unit per decoder block inside, the mask generator skipped) runs on 2 gloo ranks on CPU, launched
with `composer -n 2` through tests/scripts/train_fsdp1.py, which lifts the three CUDA-only spots
(see its docstring). The `gpu` tests run the same path unpatched on CUDA.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drprune.convert.checkpoint import load_model_state
from drprune.data.testing import write_synthetic_mds

ROOT = Path(__file__).resolve().parents[1]
PRUNE = str(ROOT / "configs" / "tiny" / "prune.yaml")
SCRIPTS = ROOT / "tests" / "scripts"
STEPS = 10
FSDP1 = ["fsdp_config.sharding_strategy=FULL_SHARD", "fsdp_config.state_dict_type=full"]
CPU = {"CUDA_VISIBLE_DEVICES": ""}  # the CPU comparison stays on CPU on a GPU machine too
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_synthetic_mds(tmp_path_factory.mktemp("mds") / "data", {"a": "repetitive", "b": "random"},
                               seq_len=64, vocab_size=49152, n_train=160, n_eval=8)


def launch(script: str, save: Path, data_dir: Path, ranks: int, extra: list[str], env: dict[str, str]) -> Path:
    """One `composer -n ranks` run of a tests/scripts recorder; returns its save folder (records beside it)."""
    record = Path(f"{save}.rec")
    args = [f"data_local={data_dir}", "callbacks.data_loading.set_names=[a,b]", f"save_folder={save}",
            f"max_duration={STEPS}ba", "eval_interval=5ba", f"save_interval={STEPS}ba", "log_to_console=false",
            *extra]
    cmd = [str(Path(sys.executable).parent / "composer"), "-n", str(ranks), "--stdout", f"{record}-out{{rank}}",
           "--stderr", f"{record}-err{{rank}}", str(SCRIPTS / script), str(record), PRUNE, *args]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True,
                          timeout=900)
    logs = "".join(p.read_text()[-3000:] for p in sorted(save.parent.glob(f"{record.name}-err*")))
    assert proc.returncode == 0, f"{script}: {proc.stdout[-3000:]}{proc.stderr[-2000:]}{logs}"
    return save


def rows(save: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in Path(f"{save}.rec-rank{rank}").read_text().splitlines()]


def layout(save: Path, rank: int) -> dict:
    """What train_fsdp1.py saw at fit end: the FSDP units and the mask generator's parameters."""
    return json.loads(Path(f"{save}.rec-layout-rank{rank}.json").read_text())


def assert_generator_stays_whole(found: dict, n_blocks: int) -> None:
    """Composer made the decoder and each of its blocks an FSDP unit; the mask generator is none, and
    its parameters are whole fp32 `nn.Parameter`s no FSDP unit owns (not views of a FlatParameter)."""
    assert found["units"] == ["PrunableDecoder", *["Block"] * n_blocks]
    assert found["blocks"] == found["blocks_wrapped"] == n_blocks
    assert found["flat_params"] == n_blocks + 1 and not found["generator_is_unit"]
    assert found["generator"]
    for name, param in found["generator"].items():
        assert param["type"] == "Parameter" and param["dtype"] == "torch.float32", name
        assert not param["in_fsdp"] and not param["flat"] and param["finite"], name


@pytest.mark.slow
def test_composer_fsdp1_full_shard_on_cpu_matches_ddp(tmp_path, data_dir):
    ddp = launch("train_recorded.py", tmp_path / "ddp", data_dir, 2, ["precision=fp32"], CPU)
    fsdp = launch("train_fsdp1.py", tmp_path / "fsdp1", data_dir, 2, ["precision=fp32", *FSDP1],
                  {**CPU, "DRPRUNE_FSDP1_ON_CPU": "1"})

    for rank in range(2):
        reference, got = rows(ddp, rank), rows(fsdp, rank)
        assert [r["batch"] for r in got] == list(range(1, STEPS + 1))
        assert [r["idx"] for r in got] == [r["idx"] for r in reference]
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in reference], rel=1e-4), rank
    # the mask generator is replicated: bit-identical on both ranks after every batch
    assert [r["masks"] for r in rows(fsdp, 0)] == [r["masks"] for r in rows(fsdp, 1)]

    found = layout(fsdp, 0)
    assert layout(fsdp, 1) == found
    assert_generator_stays_whole(found, n_blocks=4)
    assert found["generator"]["gates.intermediate.log_alpha"]["shape"] == [4, 128]  # whole, not a shard
    assert found["generator"]["lambda_1.head"]["shape"] == [1]

    states = {name: load_model_state(save / f"ep0-ba{STEPS}-rank0.pt", trust_pickle=True)
              for name, save in (("ddp", ddp), ("fsdp", fsdp))}
    lambdas = [k for k in states["ddp"] if ".lambda_" in k]
    assert len(lambdas) == 8 and all(abs(float(states["ddp"][k])) > 1.0 for k in lambdas)  # they moved
    for key in lambdas:
        assert float(states["fsdp"][key]) == pytest.approx(float(states["ddp"][key]), rel=1e-4), key

    reference, got = load_file(ddp / f"zs_s{STEPS}.safetensors"), load_file(fsdp / f"zs_s{STEPS}.safetensors")
    assert got.keys() == reference.keys() == {"head", "intermediate", "hidden", "layer"}
    for key, value in reference.items():  # the same units kept, with the same scales
        assert torch.equal(got[key] != 0, value != 0), key
        assert float((got[key] - value).abs().max()) <= 1e-4, key


@pytest.mark.gpu
@needs_cuda
def test_composer_fsdp1_on_gpu_keeps_the_mask_generator_unwrapped(tmp_path, data_dir):
    """Composer's FSDP1 path unpatched, bf16 mixed precision with activation checkpointing, on up to 2 GPUs."""
    ranks = min(2, torch.cuda.device_count())
    extra = [*FSDP1, "precision=amp_bf16", "fsdp_config.mixed_precision=DEFAULT",
             "fsdp_config.activation_checkpointing=true", f"global_train_batch_size={4 * ranks}"]
    fsdp = launch("train_fsdp1.py", tmp_path / "fsdp1-gpu", data_dir, ranks, extra, {})
    for rank in range(ranks):
        got = rows(fsdp, rank)
        assert [r["batch"] for r in got] == list(range(1, STEPS + 1))
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in got)
        assert_generator_stays_whole(layout(fsdp, rank), n_blocks=4)
    assert [r["masks"] for r in rows(fsdp, 0)] == [r["masks"] for r in rows(fsdp, ranks - 1)]
    assert (fsdp / f"zs_s{STEPS}.safetensors").is_file() and (fsdp / f"ep0-ba{STEPS}-rank0.pt").is_file()
