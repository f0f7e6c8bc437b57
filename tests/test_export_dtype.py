"""HF exports write the dtype the source came in (recorded at conversion), or the one `--dtype` names:
every tensor in the safetensors files and config.json's torch_dtype agree."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from drprune.cli import main
from drprune.compact.export import export_hf
from drprune.convert.checkpoint import load_decoder, load_model_state
from drprune.demo.pipeline import export_hf as demo_export
from drprune.convert.model_card import ModelCard
from tests.conftest import VOCAB, random_hf_model
from tests.test_compact_cli import pruning_lm, write

IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
SAFETENSORS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def written(folder: Path) -> tuple[str, set[str]]:
    """(config.json's torch_dtype, the dtypes of every tensor in the folder's safetensors files)."""
    dtypes = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            dtypes |= {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}
    return json.loads((folder / "config.json").read_text())["torch_dtype"], dtypes


@pytest.fixture
def bf16_checkpoint(tmp_path) -> Path:
    random_hf_model("llama").to(torch.bfloat16).save_pretrained(tmp_path / "src")
    assert main(["convert", "hf-to-composer", str(tmp_path / "src"), str(tmp_path / "src.pt")]) == 0
    return tmp_path / "src.pt"


def test_export_defaults_to_the_source_dtype(tmp_path, bf16_checkpoint):
    decoder = load_decoder(bf16_checkpoint).eval()
    assert decoder.cfg.dtype == "bfloat16"
    assert main(["convert", "composer-to-hf", str(bf16_checkpoint), str(tmp_path / "bf16")]) == 0
    assert written(tmp_path / "bf16") == ("bfloat16", {"BF16"})
    # the bf16 weights were exact all along: the export loses nothing
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(hf(IDS).logits, decoder(IDS), atol=1e-5, rtol=0)

    random_hf_model("llama").save_pretrained(tmp_path / "src32")  # an fp32 source exports fp32
    assert main(["convert", "hf-to-composer", str(tmp_path / "src32"), str(tmp_path / "src32.pt")]) == 0
    assert main(["convert", "composer-to-hf", str(tmp_path / "src32.pt"), str(tmp_path / "fp32")]) == 0
    assert written(tmp_path / "fp32") == ("float32", {"F32"})
    size = {n: (tmp_path / n / "model.safetensors").stat().st_size for n in ("bf16", "fp32")}
    assert 0.49 < size["bf16"] / size["fp32"] < 0.51


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtype_flag_sets_tensors_and_config(tmp_path, bf16_checkpoint, dtype):
    out = tmp_path / dtype
    assert main(["convert", "composer-to-hf", str(bf16_checkpoint), str(out), "--dtype", dtype]) == 0
    assert written(out) == (dtype, {SAFETENSORS[dtype]})
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    decoder = load_decoder(bf16_checkpoint).eval()
    with torch.no_grad():
        err = (hf(IDS).logits - decoder(IDS)).abs().max().item()
    # bf16 values are exact in fp32 and bf16; fp16 rounds each to 11 significant bits (weights ~0.1 here)
    assert err <= {"float32": 1e-5, "bfloat16": 1e-5, "float16": 5e-3}[dtype], err


def test_compact_hf_dtype_and_the_unknown_source_default(tmp_path, caplog):
    ckpt = write(tmp_path / "latest-rank0.pt", pruning_lm().state_dict())  # a model with no recorded dtype
    assert main(["compact", ckpt, "--out", str(tmp_path / "a.pt"), "--hf", str(tmp_path / "bf16"),
                 "--dtype", "bfloat16"]) == 0
    assert written(tmp_path / "bf16") == ("bfloat16", {"BF16"})
    with caplog.at_level(logging.INFO):
        assert main(["compact", ckpt, "--out", str(tmp_path / "b.pt"), "--hf", str(tmp_path / "fp32")]) == 0
    assert written(tmp_path / "fp32") == ("float32", {"F32"})
    assert "does not record the dtype its source came in" in caplog.text


def test_remote_code_export_in_bf16(tmp_path, bf16_checkpoint):
    decoder = load_decoder(bf16_checkpoint).eval()
    tensors = {k: v for k, v in decoder.state_dict().items() if not k.endswith("_extra_state")}
    export_hf(decoder.cfg, tensors, tmp_path / "remote", remote_code=True, dtype="bfloat16")
    assert written(tmp_path / "remote") == ("bfloat16", {"BF16"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "remote", trust_remote_code=True,
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(hf(IDS).logits, decoder(IDS), atol=1e-5, rtol=0)


def test_demo_export_takes_a_dtype(tmp_path, bf16_checkpoint):
    assert load_model_state(bf16_checkpoint)["model.transformer.wte.weight"].dtype == torch.bfloat16
    demo_export(bf16_checkpoint, tmp_path / "src", tmp_path / "hf", ModelCard(source="test"), "float16")
    assert written(tmp_path / "hf") == ("float16", {"F16"})


def test_every_export_command_takes_dtype():
    from drprune.cli import build_parser

    parser = build_parser()
    for argv in (["convert", "composer-to-hf", "c.pt", "out"], ["compact", "c.pt", "--hf", "out"], ["demo"]):
        assert parser.parse_args([*argv, "--dtype", "bfloat16"]).dtype == "bfloat16"
        assert parser.parse_args(argv).dtype is None  # the source's
