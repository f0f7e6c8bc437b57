"""`drprune oneshot ...` end to end: outputs load in transformers and match the masked / sliced model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from drprune.cli import main as drprune
from drprune.convert.checkpoint import load_any_decoder, load_decoder
from drprune.data.testing import write_synthetic_mds
from drprune.eval.perplexity import read_token_rows
from tests.conftest import VOCAB, random_hf_model
from tests.test_oneshot_vocab import KEPT_TEXT, train_byte_level_bpe


@pytest.fixture
def mds(tmp_path):
    return write_synthetic_mds(tmp_path / "mds", {"easy": "repetitive", "hard": "random"}, seq_len=12,
                               vocab_size=VOCAB, n_train=4, n_eval=3)


def hf_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits


def test_layers_from_prunegpt_style_config(tmp_path, mds, capsys):
    src = tmp_path / "hf"
    random_hf_model("llama").save_pretrained(src)
    config = tmp_path / "layers.json"
    config.write_text(json.dumps({"model_name": str(src), "num_blocks_to_prune": 1, "skip_blocks": [0],
                                  "pruning_method": "angular_distance", "pruning_token": "last",
                                  "save_directory": str(tmp_path / "out"), "calib": str(mds),
                                  "eval_data": str(mds)}))
    assert drprune(["oneshot", "layers", "--config", str(config), "--batch-size", "3"]) == 0
    printed = capsys.readouterr().out
    assert "removing blocks" in printed and "ppl after" in printed
    removed = json.loads((tmp_path / "out" / "removed.json").read_text())
    assert removed["method"] == "angular" and len(removed["removed_blocks"]) == 1
    assert removed["removed_blocks"][0] != 0 and len(removed["scores"]) == 3
    assert removed["result"]["n_layers"] == 2
    full = load_any_decoder(str(src))
    masks = {"layer": torch.ones(3)}
    masks["layer"][removed["removed_blocks"]] = 0
    ids = torch.from_numpy(read_token_rows(mds / "eval" / "hard"))
    with torch.no_grad():
        expected = full(ids, masks)
    assert torch.allclose(hf_logits(tmp_path / "out" / "hf", ids), expected, atol=1e-5)
    assert torch.allclose(load_decoder(tmp_path / "out" / "model.pt")(ids), expected, atol=1e-5)
    evals = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert set(evals["before"]) == {"easy", "hard"} == set(evals["after"])


def test_width_to_shape_with_gqa(tmp_path, mds, capsys):
    src = tmp_path / "hf"
    random_hf_model("llama_gqa").save_pretrained(src)
    out = tmp_path / "out"
    assert drprune(["oneshot", "width", str(src), "--importance", "taylor", "--hidden-size", "48",
                    "--num-attention-heads", "2", "--intermediate-size", "64", "--calib", str(mds),
                    "--out", str(out)]) == 0
    cfg = json.loads((out / "hf" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"]) == (48, 2, 1, 64)
    removed = json.loads((out / "removed.json").read_text())
    assert len(removed["hidden_dims"]) == 16 and all(len(g) == 1 for g in removed["kv_groups"].values())
    full = load_any_decoder(str(src))
    hidden = torch.ones(64)
    hidden[removed["hidden_dims"]] = 0
    head = torch.ones(3, 2)
    for layer, groups in removed["kv_groups"].items():
        head[int(layer), groups] = 0
    inter = torch.ones(3, 96)
    for layer, channels in removed["intermediate_channels"].items():
        inter[int(layer), channels] = 0
    ids = torch.from_numpy(read_token_rows(mds / "eval" / "hard"))
    with torch.no_grad():
        expected = full(ids, {"hidden": hidden, "head": head, "intermediate": inter})
    assert torch.allclose(hf_logits(out / "hf", ids), expected, atol=1e-4)
    # OUT/masks.safetensors holds the same selection, on the source shape, and warm-starts L0
    from drprune.masks.base import MaskSet
    from drprune.masks.l0 import L0MaskGenerator

    masks = MaskSet.load(out / "masks.safetensors", full.cfg)
    assert torch.equal(masks["hidden"], hidden) and torch.equal(masks["head"], head)
    assert torch.equal(masks["intermediate"], inter)
    assert MaskSet.source_config(out / "masks.safetensors") == full.cfg
    gen = L0MaskGenerator(full.cfg, pruning_modules=["hidden", "head", "intermediate"],
                          target_model={"d_model": 48, "n_heads": 2, "n_kv_heads": 1, "intermediate_size": 64},
                          init_masks=str(out / "masks.safetensors"))
    assert all(torch.equal(gen.hard_masks()[k] != 0, masks[k] != 0) for k in masks)


def test_width_ratio_gives_per_layer_shapes(tmp_path, mds):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "hf"
    random_hf_model("qwen2").save_pretrained(src)
    out = tmp_path / "out"
    assert drprune(["oneshot", "width", str(src), "--importance", "activation", "--pruning-ratio", "0.5",
                    "--block-mlp-layer-start", "1", "--block-attention-layer-end", "2", "--calib", str(mds),
                    "--out", str(out)]) == 0
    removed = json.loads((out / "removed.json").read_text())
    assert removed["result"]["per_layer"] == [[2, 96], [2, 48], [4, 48]]
    full = load_any_decoder(str(src))
    head, inter = torch.ones(3, 2), torch.ones(3, 96)
    for layer, groups in removed["kv_groups"].items():
        head[int(layer), groups] = 0
    for layer, channels in removed["intermediate_channels"].items():
        inter[int(layer), channels] = 0
    ids = torch.from_numpy(read_token_rows(mds / "eval" / "easy"))
    with torch.no_grad():
        expected = full(ids, {"head": head, "intermediate": inter})
        got = AutoModelForCausalLM.from_pretrained(out / "hf", trust_remote_code=True).eval()(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_vocab_on_byte_level_bpe_model(tmp_path, capsys):
    from transformers import AutoTokenizer

    src = train_byte_level_bpe(tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(src)
    model = random_hf_model("llama")
    model.resize_token_embeddings(len(tok))
    model.config.eos_token_id, model.config.bos_token_id = tok.eos_token_id, tok.bos_token_id
    model.save_pretrained(src)
    (tmp_path / "calib.txt").write_text((KEPT_TEXT + "\n") * 3)
    n = len(set(tok(KEPT_TEXT)["input_ids"]))
    out = tmp_path / "out"
    assert drprune(["oneshot", "vocab", str(src), "--keep", str(n), "--calib", str(tmp_path / "calib.txt"),
                    "--out", str(out)]) == 0
    removed = json.loads((out / "removed.json").read_text())
    keep = removed["kept_token_ids"]
    assert removed["data_tokens_covered"] == 1.0 and removed["result"]["vocab_size"] == len(keep) < len(tok)
    new_tok = AutoTokenizer.from_pretrained(out / "hf")
    old_ids = tok(KEPT_TEXT)["input_ids"]
    new_ids = new_tok(KEPT_TEXT)["input_ids"]
    assert new_ids == [keep.index(i) for i in old_ids]
    assert new_tok.convert_ids_to_tokens(new_ids) == tok.convert_ids_to_tokens(old_ids)
    assert new_tok.decode(new_tok("über 42!")["input_ids"]) == "über 42!"
    assert torch.allclose(hf_logits(out / "hf", torch.tensor([new_ids])),
                          hf_logits(src, torch.tensor([old_ids]))[..., keep], atol=1e-5)
    cfg = json.loads((out / "hf" / "config.json").read_text())
    assert cfg["vocab_size"] == len(keep) and cfg["eos_token_id"] == keep.index(tok.eos_token_id)


@pytest.mark.parametrize("argv,msg", [
    (["width", "{src}", "--importance", "l1", "--pruning-ratio", "1.5"], "strictly between 0 and 1"),
    (["width", "{src}", "--importance", "l1", "--hidden-size", "65"], "larger than the source"),
    (["width", "{src}", "--importance", "taylor", "--hidden-size", "32"], "pass --calib"),
    (["layers", "{src}", "--num-blocks-to-prune", "2", "--skip-blocks", "1", "--calib", "{mds}"], "consecutive"),
    (["layers", "{src}", "--num-blocks-to-prune", "1", "--calib", "{tmp}/missing"], "does not exist"),
    (["layers", "{src}", "--config", "{tmp}/bad.yaml"], "unknown key 'num_blocks'"),
    (["vocab", "{src}", "--keep", "5", "--calib", "{mds}"], "pass --tokenizer"),
    (["vocab", "{src}", "--keep", "5", "--calib", "{mds}", "--tokenizer", "{tmp}/wp"], "not supported"),
])
def test_bad_input_is_a_user_error(tmp_path, mds, capsys, argv, msg):
    from tokenizers import Tokenizer, models

    src = tmp_path / "hf"
    random_hf_model("llama").save_pretrained(src)
    (tmp_path / "bad.yaml").write_text("num_blocks: 2\n")
    (tmp_path / "wp").mkdir()
    Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]")).save(str(tmp_path / "wp" / "tokenizer.json"))
    args = [a.replace("{src}", str(src)).replace("{mds}", str(mds)).replace("{tmp}", str(tmp_path)) for a in argv]
    assert drprune(["oneshot", *args, "--out", str(tmp_path / "out")]) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("configs/oneshot/*")), ids=lambda p: p.name)
def test_shipped_configs_resolve(path):
    from drprune.cli import build_parser
    from drprune.oneshot.cli import resolve_options

    command = path.name.split("_")[0].split(".")[0]
    args = build_parser().parse_args(["oneshot", command, "model-dir", "--out", "out", "--config", str(path)])
    opts = resolve_options(args)
    assert opts.model == "model-dir" and opts.max_rows >= 1
    if command == "width":
        from drprune.models.config import ModelConfig
        from drprune.oneshot.width import TARGET_KEYS, plan_target

        smollm2 = ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                              intermediate_size=1536)
        plan_target(smollm2, {k: getattr(opts, k) for k in TARGET_KEYS if getattr(opts, k) not in (None, [])})


def test_calibration_rows_are_balanced_round_robin(tmp_path):
    from drprune.oneshot.calib import balanced_quota, load_rows

    assert balanced_quota([100] * 5, 16) == [4, 3, 3, 3, 3]
    assert balanced_quota([1, 100, 100], 9) == [1, 4, 4]   # a small domain's share goes to the others
    assert balanced_quota([2, 3], 50) == [2, 3]
    root = write_synthetic_mds(tmp_path / "m", {f"d{i}": "random" for i in range(5)}, seq_len=12,
                               vocab_size=64, n_train=20, n_eval=4)
    rows = load_rows(root, tokenizer=None, seq_len=12, max_rows=16)
    per_domain = [read_token_rows(root / "train" / f"d{i}") for i in range(5)]
    taken = [sum(any(np.array_equal(r, x) for x in d) for r in rows) for d in per_domain]
    assert len(rows) == 16 and taken == [4, 3, 3, 3, 3]
