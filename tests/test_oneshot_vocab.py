"""Vocabulary pruning: kept-token text round-trips, logits on kept tokens are unchanged, bad input fails."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from drprune.errors import UserError
from drprune.models.config import ModelConfig
from drprune.models.decoder import PrunableDecoder
from drprune.oneshot.vocab import choose_tokens, load_vocab_files, merge_path, prune_tokenizer_folder, slice_vocab

LINES = [
    "the quick brown fox jumps over the lazy dog",
    "pruning a language model keeps the tokens that the data uses",
    "a small model trained on a few lines of text for a test",
    "the cat sat on the mat and the dog sat on the log",
    "numbers like 12345 and symbols like #@! appear rarely",
    "über café naïve façade — unicode words fall back to bytes",
] * 4
KEPT_TEXT = "the dog sat on the mat"


def train_sentencepiece(folder: Path, model_type: str = "bpe") -> Path:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(LINES), model_writer=buf, vocab_size=340,
                                   model_type=model_type, byte_fallback=True, hard_vocab_limit=False,
                                   character_coverage=1.0, num_threads=1, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    return folder / "tokenizer.model"


def train_byte_level_bpe(folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(LINES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|im_start|>")
    fast.save_pretrained(folder)
    return folder


def counts_of(ids: list[int], size: int) -> np.ndarray:
    return np.bincount(np.asarray(ids), minlength=size)


def test_merge_path_lists_intermediates_in_rank_order():
    ranks = {("a", "b"): 0, ("ab", "c"): 1, ("b", "c"): 2}
    assert merge_path("abc", lambda a, b: ranks.get((a, b))) == ["ab", "abc"]
    assert merge_path("bcx", lambda a, b: ranks.get((a, b))) == ["bc"]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_round_trip(tmp_path, model_type):
    import sentencepiece as spm

    model = train_sentencepiece(tmp_path / "src", model_type)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    files = load_vocab_files(model)
    calib = sp.encode(KEPT_TEXT)
    n_frequent = len(set(calib))
    keep, stats = choose_tokens(counts_of(calib, sp.get_piece_size()), n_frequent, files)
    assert stats["required"] == 260 and len(keep) < sp.get_piece_size()  # 3 control + 256 bytes + U+2581
    assert set(calib) <= set(keep)
    out = tmp_path / "out"
    out.mkdir()
    prune_tokenizer_folder(model, files, keep, out)
    new = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert new.get_piece_size() == len(keep)
    assert new.encode(KEPT_TEXT, out_type=str) == sp.encode(KEPT_TEXT, out_type=str)
    assert new.encode(KEPT_TEXT) == [keep.index(i) for i in calib]
    assert (new.unk_id(), new.bos_id(), new.eos_id()) == (sp.unk_id(), sp.bos_id(), sp.eos_id())
    other = LINES[4] + " " + LINES[5]  # mostly dropped pieces: still encodable, via bytes
    assert new.decode(new.encode(other)) == sp.decode(sp.encode(other))


@pytest.mark.parametrize("byte_fallback", [False, True])  # True: as transformers' GGUF conversion writes it
def test_byte_level_bpe_round_trip(tmp_path, byte_fallback):
    from tokenizers import Tokenizer

    folder = train_byte_level_bpe(tmp_path / "src")
    data = json.loads((folder / "tokenizer.json").read_text())
    data["model"]["byte_fallback"] = byte_fallback
    (folder / "tokenizer.json").write_text(json.dumps(data))
    old = Tokenizer.from_file(str(folder / "tokenizer.json"))
    files = load_vocab_files(folder)
    calib = old.encode(KEPT_TEXT).ids
    keep, stats = choose_tokens(counts_of(calib, old.get_vocab_size()), len(set(calib)), files)
    assert stats["required"] == 256 + 2 and stats["merge_parts"] > 0
    out = tmp_path / "out"
    out.mkdir()
    prune_tokenizer_folder(folder, files, keep, out)
    new = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert new.get_vocab_size() == len(keep)
    assert new.encode(KEPT_TEXT).tokens == old.encode(KEPT_TEXT).tokens
    assert new.encode(KEPT_TEXT).ids == [keep.index(i) for i in calib]
    other = "über 12345 #@! façade"
    assert new.decode(new.encode(other).ids) == other
    data = json.loads((out / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    for a, b in (m if isinstance(m, list) else m.split(" ") for m in data["model"]["merges"]):
        assert a in vocab and b in vocab and a + b in vocab
    decoder = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {v["content"]: int(k) for k, v in decoder.items()} == {"<|endoftext|>": 0, "<|im_start|>": 1}


@pytest.mark.parametrize("tied", [False, True])
def test_logits_on_kept_tokens_are_unchanged(tied):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, intermediate_size=24, context_length=16,
                      tie_word_embeddings=tied)
    dec = PrunableDecoder(cfg).eval()
    keep = sorted(set(torch.randperm(50)[:20].tolist()) | {0, 49})
    small = slice_vocab(dec, keep)
    ids = torch.tensor([keep[i] for i in torch.randint(0, len(keep), (2, 9)).tolist()[0] + [0]])[None]
    new_ids = torch.tensor([[keep.index(i) for i in ids[0].tolist()]])
    with torch.no_grad():
        assert torch.allclose(small(new_ids), dec(ids)[..., keep], atol=1e-6)
    assert small.cfg.vocab_size == len(keep)
    assert small.num_params() == dec.num_params() - (50 - len(keep)) * 16 * (1 if tied else 2)


def test_unsupported_tokenizers(tmp_path):
    from tokenizers import Tokenizer, models

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    (tmp_path / "wp").mkdir()
    wp.save(str(tmp_path / "wp" / "tokenizer.json"))
    with pytest.raises(UserError, match="'WordPiece' tokenizers is not supported"):
        load_vocab_files(tmp_path / "wp")
    (tmp_path / "tt").mkdir()
    (tmp_path / "tt" / "qwen.tiktoken").write_text("YQ== 0\n")
    with pytest.raises(UserError, match="not supported for this tokenizer type"):
        load_vocab_files(tmp_path / "tt")


def test_keep_bounds(tmp_path):
    model = train_sentencepiece(tmp_path / "src")
    files = load_vocab_files(model)
    counts = np.ones(files[0].size, dtype=np.int64)
    with pytest.raises(UserError, match="must be in 1.."):
        choose_tokens(counts, files[0].size, files)
    with pytest.raises(UserError, match="must be in 1.."):
        choose_tokens(counts, 0, files)


def test_llama_style_folder_prunes_both_files_consistently(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizerFast

    model = train_sentencepiece(tmp_path / "spm")
    old = LlamaTokenizerFast(vocab_file=str(model), legacy=False)  # tokenizer.json: byte-fallback BPE
    old.save_pretrained(tmp_path / "src")
    files = load_vocab_files(tmp_path / "src")
    assert sorted(f.name for f in files) == ["tokenizer.json", "tokenizer.model"]
    calib = old(KEPT_TEXT, add_special_tokens=False)["input_ids"]
    keep, stats = choose_tokens(counts_of(calib, len(old)), len(set(calib)), files)
    assert stats["merge_parts"] > 0  # the characters the HF BPE starts from are kept with the pieces
    out = tmp_path / "out"
    out.mkdir()
    prune_tokenizer_folder(tmp_path / "src", files, keep, out)
    new = AutoTokenizer.from_pretrained(out)
    assert new.tokenize(KEPT_TEXT) == old.tokenize(KEPT_TEXT)
    assert new(KEPT_TEXT)["input_ids"] == [keep.index(i) for i in old(KEPT_TEXT)["input_ids"]]
    sp_old = spm.SentencePieceProcessor(model_file=str(model))
    sp_new = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp_new.encode(KEPT_TEXT) == [keep.index(i) for i in sp_old.encode(KEPT_TEXT)]
    other = LINES[4] + " " + LINES[5]
    assert new.decode(new(other, add_special_tokens=False)["input_ids"]) == other
