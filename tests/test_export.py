"""Compact models export to HF (stock class or remote code), give the same logits, and round-trip exactly."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from drprune.cli import main
from drprune.compact.fold import compact_decoder
from drprune.convert.checkpoint import decoder_checkpoint_state, load_decoder, load_model_state, save_checkpoint
from drprune.masks.base import MaskSet
from drprune.models.shapes import config_params
from tests.test_compact import GLOBAL, PER_LAYER, random_masks

IDS = torch.randint(0, 131, (2, 11), generator=torch.Generator().manual_seed(2))


def uniform_masks(cfg) -> MaskSet:
    """Same shape in every layer: half the KV groups, 2/3 of the channels, one layer gone, and a hidden
    width that keeps GPT-NeoX's hidden_size == heads * head_dim (so every family fits its stock class)."""
    gen = torch.Generator().manual_seed(3)
    n_kv, inter = cfg.n_kv_heads // 2, cfg.intermediate_size * 2 // 3
    d = n_kv * cfg.group_size * cfg.head_dim if cfg.family == "pythia" else cfg.d_model - 8
    masks = MaskSet()
    for name, (rows, n, k) in {"head": (cfg.n_layers, cfg.n_kv_heads, n_kv),
                               "intermediate": (cfg.n_layers, cfg.intermediate_size, inter),
                               "hidden": (1, cfg.d_model, d)}.items():
        scores = torch.rand(rows, n, generator=gen)
        keep = torch.zeros(rows, n).scatter_(1, scores.topk(k, dim=1).indices, 1.0)
        masks[name] = (keep * (0.5 + torch.rand(rows, n, generator=gen))).squeeze(0)
    masks["layer"] = torch.tensor([1.0, 0.0, 0.9])
    return masks.validate(cfg)


def source_decoder(tmp_path, hf_dir):
    assert main(["convert", "hf-to-composer", str(hf_dir), str(tmp_path / "full.pt")]) == 0
    return load_decoder(tmp_path / "full.pt").eval()


def export(tmp_path, compact, name="hf"):
    save_checkpoint(decoder_checkpoint_state(compact), tmp_path / f"{name}.pt")
    out = tmp_path / name
    assert main(["convert", "composer-to-hf", str(tmp_path / f"{name}.pt"), str(out)]) == 0
    return out


@pytest.mark.parametrize("kind", ["uniform", "global", "per_layer"])
def test_exported_folder_gives_masked_logits_and_round_trips_bit_exact(tmp_path, family, hf_dir, kind):
    decoder = source_decoder(tmp_path, hf_dir)
    cfg = decoder.cfg
    masks = uniform_masks(cfg) if kind == "uniform" else random_masks(cfg, GLOBAL if kind == "global" else PER_LAYER)
    compact = compact_decoder(decoder, masks)
    assert compact.cfg.is_uniform == (kind == "uniform")
    out = export(tmp_path, compact)
    config = json.loads((out / "config.json").read_text())
    remote = kind != "uniform"
    assert ("auto_map" in config) == remote and (out / "modeling_drprune.py").exists() == remote
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote).eval()
    if not remote:
        assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                     "gpt_neox": "GPTNeoXForCausalLM"}[config["model_type"]]
    with torch.no_grad():
        masked = decoder(IDS, masks)
        assert torch.allclose(hf(IDS).logits, masked, atol=1e-5, rtol=0)
    assert hf.num_parameters() == compact.num_params() == config_params(compact.cfg)

    assert main(["convert", "hf-to-composer", str(out), str(tmp_path / "back.pt")]) == 0
    before, after = load_model_state(tmp_path / "hf.pt"), load_model_state(tmp_path / "back.pt")
    assert before.keys() == after.keys() and before["model._extra_state"] == after["model._extra_state"]
    assert all(torch.equal(before[k], after[k]) for k in before if torch.is_tensor(before[k]))


def test_remote_code_model_generates_and_handles_padding(tmp_path):
    from tests.conftest import random_hf_model

    hf_dir = tmp_path / "src"
    random_hf_model("llama_gqa").save_pretrained(hf_dir)
    decoder = source_decoder(tmp_path, hf_dir)
    out = export(tmp_path, compact_decoder(decoder, random_masks(decoder.cfg, PER_LAYER)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    prompt = IDS[:1, :5]
    with torch.no_grad():
        generated = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                                pad_token_id=0)
        ids = prompt
        for _ in range(4):
            ids = torch.cat([ids, hf(ids).logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(generated, ids)
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(prompt)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = hf(padded, attention_mask=mask, position_ids=positions).logits[:, 3:]
        assert torch.allclose(logits, hf(prompt).logits, atol=1e-5)


def test_tokenizer_is_copied_and_overrides_are_checked(tmp_path, capsys):
    from tests.conftest import random_hf_model

    hf_dir = tmp_path / "src"
    random_hf_model("qwen2").save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_text("{}")
    decoder = source_decoder(tmp_path, hf_dir)
    compact = compact_decoder(decoder, random_masks(decoder.cfg, GLOBAL))
    save_checkpoint(decoder_checkpoint_state(compact), tmp_path / "c.pt")
    args = ["convert", "composer-to-hf", str(tmp_path / "c.pt"), str(tmp_path / "out")]
    assert main([*args, "hidden_size=7"]) == 2 and "contradict" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*args, "_name_or_path=pruned", "--tokenizer", str(hf_dir)]) == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["_name_or_path"] == "pruned"
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
