"""The remote-code model decodes with a KV cache: same tokens and logits as without one, per-layer shapes,
left padding, and a uniform model matches stock LlamaForCausalLM."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers.cache_utils import DynamicCache

from drprune.compact import export as export_module
from drprune.compact.export import export_hf
from drprune.compact.fold import compact_decoder
from drprune.convert.checkpoint import load_hf
from tests.conftest import random_hf_model
from tests.test_compact import CFGS, PER_LAYER, random_decoder, random_masks
from tests.test_export import export

IDS = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(4))


def per_layer_masks(cfg):
    """Layer 0 without attention (so cache entry 0 is not block 0), layer 1 removed, layers 2 and 3 with
    different KV-head counts."""
    masks = random_masks(cfg, PER_LAYER)
    masks["head_layer"][0], masks["head_layer"][2] = 0.0, 1.0
    masks["head"][2] = 1.0
    masks["head"][3, 1:] = 0.0
    return masks


@pytest.fixture(scope="module", params=["llama_gqa", "pythia"])
def folder(request, tmp_path_factory) -> Path:
    cfg = CFGS[request.param]
    compact = compact_decoder(random_decoder(cfg), per_layer_masks(cfg))
    return export(tmp_path_factory.mktemp(request.param), compact)


@pytest.fixture(scope="module")
def model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


def attn_kv_heads(model) -> list[int]:
    return [s["n_kv_heads"] for s in model.config.layers if s["n_heads"] > 0]


def greedy(model, ids, n, **kw):
    return model.generate(ids, attention_mask=kw.pop("attention_mask", torch.ones_like(ids)), max_new_tokens=n,
                          do_sample=False, pad_token_id=0, **kw)


def test_model_has_per_layer_shapes(model):
    assert model.config.layers[0]["n_heads"] == 0
    assert len(set(attn_kv_heads(model))) == 2


@torch.no_grad()
def test_greedy_with_and_without_cache_agree_and_cache_feeds_one_token(model):
    prompt, n = IDS[:, :6], 10
    lengths = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    try:
        cached = greedy(model, prompt, n, use_cache=True, return_dict_in_generate=True)
        assert lengths == [6] + [1] * (n - 1)
        lengths.clear()
        plain = greedy(model, prompt, n, use_cache=False)
        assert lengths == list(range(6, 6 + n))
    finally:
        hook.remove()
    assert torch.equal(cached.sequences, plain) and plain.shape == (2, 6 + n)
    cache = cached.past_key_values
    assert isinstance(cache, DynamicCache)
    shapes = [tuple(layer.keys.shape) for layer in cache.layers if layer.is_initialized]
    hd = model.config.head_dim
    assert shapes == [(2, kv, 6 + n - 1, hd) for kv in attn_kv_heads(model)]


@torch.no_grad()
def test_incremental_logits_equal_full_forward(model):
    full = model(IDS, use_cache=False).logits
    cache, pieces = DynamicCache(config=model.config), []
    for a, b in [(0, 5), (5, 6), (6, 9), (9, 10), (10, 13)]:  # a prefix, single tokens and chunks after it
        out = model(IDS[:, a:b], past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache and cache.get_seq_length() == b
        pieces.append(out.logits)
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_left_padded_batch_decodes_like_each_prompt_alone(model):
    long, short = IDS[0, :7], IDS[1, :4]
    batch = torch.stack([long, torch.cat([torch.zeros(3, dtype=torch.long), short])])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = greedy(model, batch, 6, attention_mask=mask)
    for row, prompt in enumerate([long, short]):
        alone = greedy(model, prompt[None], 6)
        assert torch.equal(out[row, 7:], alone[0, len(prompt):])

    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    prefill = model(batch, attention_mask=mask, position_ids=positions, use_cache=True)
    nxt = prefill.logits[:, -1:].argmax(-1)
    step = model(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], dim=1), position_ids=positions[:, -1:] + 1,
                 past_key_values=prefill.past_key_values).logits[:, -1]
    for row, prompt in enumerate([long, short]):
        reference = model(torch.cat([prompt, nxt[row]])[None], use_cache=False).logits[0, -1]
        assert torch.allclose(step[row], reference, atol=1e-5, rtol=0)


@torch.no_grad()
def test_uniform_remote_code_model_matches_stock_llama(tmp_path):
    random_hf_model("llama").save_pretrained(tmp_path / "src")
    cfg, tensors, _ = load_hf(str(tmp_path / "src"))
    out = export_hf(cfg, tensors, tmp_path / "remote", remote_code=True)
    assert json.loads((out / "config.json").read_text())["model_type"] == "drprune"
    remote = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    ids = torch.randint(0, 131, (2, 5), generator=torch.Generator().manual_seed(5))
    a = greedy(remote, ids, 8, return_dict_in_generate=True, output_logits=True)
    b = greedy(stock, ids, 8, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.allclose(torch.stack(a.logits), torch.stack(b.logits), atol=1e-5, rtol=0)


def test_remote_code_files_import_only_torch_and_transformers():
    for name in export_module.REMOTE_CODE_FILES:
        tree = ast.parse(Path(export_module.__file__).with_name(name).read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert roots <= {"torch", "transformers"}, (name, roots)


def test_folder_loads_and_generates_offline(folder, tmp_path):
    code = ("import sys, torch, transformers\n"
            "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
            "ids = torch.tensor([[1, 2, 3]])\n"
            "out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,"
            " pad_token_id=0, return_dict_in_generate=True)\n"
            "print(type(m).__name__, type(out.past_key_values).__name__, out.sequences.shape[1])\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["DrpruneForCausalLM", "DynamicCache", "6"]
