"""HF <-> Composer: logits equal HF's, round trips are bit-exact, loading is strict."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from drprune.cli import main as drprune
from drprune.convert.checkpoint import load_decoder, load_model_state, read_hf_tensors, save_checkpoint
from drprune.errors import UserError
from tests.conftest import VOCAB, random_hf_model


def test_logits_match_hf_and_round_trip_is_bit_exact(tmp_path, family, hf_dir):
    ckpt = tmp_path / "model.pt"
    assert drprune(["convert", "hf-to-composer", str(hf_dir), str(ckpt)]) == 0
    decoder = load_decoder(ckpt).eval()
    hf = random_hf_model(family)
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(ids).logits - decoder(ids)).abs().max().item()
    assert diff < 1e-5

    back = tmp_path / "hf-back"
    assert drprune(["convert", "composer-to-hf", str(ckpt), str(back)]) == 0
    original, restored = read_hf_tensors(hf_dir), read_hf_tensors(back)
    if decoder.cfg.tie_word_embeddings:
        original.pop("lm_head.weight", None)
    assert set(original) == set(restored)
    for key, tensor in original.items():
        assert torch.equal(tensor, restored[key]), key
    cfg_in, cfg_out = json.loads((hf_dir / "config.json").read_text()), json.loads((back / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        assert cfg_in[key] == cfg_out[key]


def test_exported_folder_loads_in_transformers(tmp_path, hf_dir, family):
    import transformers

    ckpt, back = tmp_path / "m.pt", tmp_path / "back"
    drprune(["convert", "hf-to-composer", str(hf_dir), str(ckpt)])
    drprune(["convert", "composer-to-hf", str(ckpt), str(back)])
    model = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    ids = torch.arange(20)[None] % VOCAB
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, random_hf_model(family)(ids).logits, atol=1e-5)


def test_missing_and_unexpected_hf_keys_are_named(tmp_path):
    model = random_hf_model("llama")
    model.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(weights)
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(UserError, match="model.layers.1.mlp.extra.weight"):
        from drprune.convert.checkpoint import load_hf

        load_hf(str(tmp_path / "hf"))
    tensors.pop("model.layers.1.mlp.extra.weight")
    save_file(tensors, weights, metadata={"format": "pt"})
    from drprune.convert.checkpoint import load_hf

    with pytest.raises(UserError, match=r"missing keys \['transformer.blocks.1.mlp.up_proj.weight'\]"):
        load_hf(str(tmp_path / "hf"))
    model.save_pretrained(tmp_path / "full")
    cfg, ours, _ = load_hf(str(tmp_path / "full"))
    ours.pop("transformer.blocks.1.mlp.up_proj.weight")
    state = {f"model.{k}": v for k, v in ours.items()}
    save_checkpoint(state, tmp_path / "broken.pt")
    with pytest.raises(UserError, match="transformer.blocks.1.mlp.up_proj.weight"):
        load_decoder(tmp_path / "broken.pt", cfg)


def test_sheared_style_state_dict_loads_with_a_config(tmp_path, hf_dir):
    """A plain Sheared-LLaMA state dict (no Composer wrapper, no config inside) loads given a config."""
    ckpt = tmp_path / "m.pt"
    drprune(["convert", "hf-to-composer", str(hf_dir), str(ckpt)])
    state = load_model_state(ckpt)
    cfg = load_decoder(ckpt).cfg
    plain = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    torch.save(plain, tmp_path / "sheared.pt")
    with pytest.raises(UserError, match="no model config"):
        load_decoder(tmp_path / "sheared.pt")
    assert load_decoder(tmp_path / "sheared.pt", cfg).cfg == cfg


def test_cli_errors_are_clear(tmp_path, hf_dir, capsys):
    assert drprune(["convert", "hf-to-composer", str(tmp_path / "nope"), str(tmp_path / "o.pt")]) == 2
    assert "not found (use hub:NAME to download from the Hugging Face Hub)" in capsys.readouterr().err
    ckpt = tmp_path / "m.pt"
    drprune(["convert", "hf-to-composer", str(hf_dir), str(ckpt)])
    assert drprune(["convert", "hf-to-composer", str(hf_dir), str(ckpt)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert drprune(["convert", "composer-to-hf", str(ckpt), str(tmp_path / "x"), "hidden_size=7"]) == 2
    assert "contradict" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
