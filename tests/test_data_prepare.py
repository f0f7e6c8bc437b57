"""`drprune data prepare` / `merge`: round trip, token widths, every source kind, bad input, shard checks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from drprune.cli import main
from drprune.data.prepare import prepare
from drprune.data.shards import ShardReader, verify_split
from drprune.errors import UserError

DOCS = [f"Document {i}: the {'quick ' * (i % 5)}brown fox {i * 7} jumps over {'lazy ' * (i % 3)}dogs.\nEnd {i}."
        for i in range(40)]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE fast tokenizer trained on DOCS (decodes back exactly)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(DOCS, vocab_size=300, min_frequency=1, special_tokens=["<eos>"], show_progress=False)
    out = tmp_path_factory.mktemp("tok") / "hf"
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>").save_pretrained(out)
    return out


def _write_sources(tmp: Path) -> dict[str, Path]:
    folder = tmp / "txt"
    folder.mkdir()
    for i, doc in enumerate(DOCS):
        (folder / f"{i:03d}.txt").write_text(doc)
    (tmp / "docs.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)) + "\n")
    (tmp / "docs.json").write_text(json.dumps([{"text": d} for d in DOCS]))
    (tmp / "one.txt").write_text(DOCS[0])
    return {"txt": folder, "jsonl": tmp / "docs.jsonl", "json": tmp / "docs.json"}


def _tokens(folder: Path) -> np.ndarray:
    reader = ShardReader(folder)
    return np.concatenate([reader[i]["tokens"] for i in range(len(reader))])


def test_round_trip_every_source_kind(tmp_path, hf_tokenizer):
    from transformers import AutoTokenizer

    sources = _write_sources(tmp_path)
    stats = prepare(sources, str(hf_tokenizer), 16, tmp_path / "out", eval_fraction=0.0,
                    eval_sources={k: tmp_path / "one.txt" for k in sources})
    tok = AutoTokenizer.from_pretrained(hf_tokenizer)
    expected = np.concatenate([tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in DOCS])
    for name in sources:
        train = _tokens(tmp_path / "out" / "train" / name)
        assert train.dtype == np.uint16 and len(train) == len(expected) // 16 * 16
        assert np.array_equal(train, expected[: len(train)])  # packing keeps order, drops only the tail
        pieces = tok.decode(train.tolist()).split("<eos>")
        assert pieces[:-1] == DOCS[: len(pieces) - 1]  # decodes back to the source text
        row = next(s for s in stats if s.domain == name and s.split == "train")
        assert (row.documents, row.tokens, row.sequences) == (40, len(expected), len(expected) // 16)
        assert row.dropped == len(expected) % 16
    merged = ShardReader(tmp_path / "out" / "eval" / "eval_merge")
    expected = [n for n in sources for _ in range(len(ShardReader(tmp_path / "out" / "eval" / n)))]
    assert [merged[i]["set"] for i in range(len(merged))] == expected


def test_hf_dataset_source_holdout_and_plain_streaming_reads_the_shards(tmp_path, hf_tokenizer):
    import datasets
    from streaming import StreamingDataset

    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "hfds"))
    stats = prepare({"web": tmp_path / "hfds"}, str(hf_tokenizer), 8, tmp_path / "out", eval_fraction=0.25, seed=1)
    train, evals = (next(s for s in stats if s.split == split) for split in ("train", "eval"))
    assert train.documents + evals.documents == 40 and 4 <= evals.documents <= 16
    plain = StreamingDataset(local=str(tmp_path / "out" / "train" / "web"), shuffle=False, batch_size=1)
    rows = [s for s in plain]
    assert len(rows) == train.sequences and all(r["set"] == "web" for r in rows)
    assert np.array_equal(np.concatenate([r["tokens"] for r in rows]), _tokens(tmp_path / "out" / "train" / "web"))


def test_sentencepiece_tokenizer_counts_match(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(DOCS * 3), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   eos_id=2, bos_id=-1, unk_id=0, pad_id=-1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    _write_sources(tmp_path)
    stats = prepare({"j": tmp_path / "docs.jsonl"}, str(tmp_path / "sp.model"), 32, tmp_path / "out",
                    eval_fraction=0.0, eval_sources={"j": tmp_path / "docs.json"})
    expected = np.concatenate([sp.encode(d) + [2] for d in DOCS])
    assert stats[0].tokens == len(expected)
    assert np.array_equal(_tokens(tmp_path / "out" / "train" / "j"), expected[: len(expected) // 32 * 32])


def test_large_vocab_uses_uint32_and_a_forced_uint16_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70_000)} | {"<eos>": 70_000}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>").save_pretrained(tmp_path / "big")
    (tmp_path / "d.txt").write_text(" ".join(f"w{i}" for i in range(69_990, 70_000)) * 2)
    prepare({"d": tmp_path / "d.txt"}, str(tmp_path / "big"), 4, tmp_path / "out", eval_fraction=0.0,
            eval_sources={"d": tmp_path / "d.txt"})
    assert _tokens(tmp_path / "out" / "train" / "d").dtype == np.uint32
    assert int(_tokens(tmp_path / "out" / "train" / "d").max()) == 70_000
    with pytest.raises(UserError, match="70001 tokens does not fit uint16"):
        prepare({"d": tmp_path / "d.txt"}, str(tmp_path / "big"), 4, tmp_path / "out16", token_width="uint16")
    assert not (tmp_path / "out16").exists()


def _cli(*args: str) -> int:
    return main(["data", *args])


@pytest.mark.parametrize("make, message", [
    (lambda t: (t / "a" / "empty.txt").write_text("  \n"), "empty.txt is empty"),
    (lambda t: (t / "a" / "bad.txt").write_bytes(b"\xff\xfe\x00bad"), "cannot read .*bad.txt"),
    (lambda t: (t / "b.jsonl").write_text('{"text": "x"}\n{oops\n'), "b.jsonl:2: invalid JSON"),
    (lambda t: (t / "b.jsonl").write_text('{"body": "x"}\n'), "b.jsonl:1: no string field 'text'"),
    (lambda t: (t / "b.jsonl").unlink(), "domain source .*b.jsonl does not exist"),
])
def test_bad_input_is_a_clear_error_and_leaves_nothing(tmp_path, hf_tokenizer, capsys, make, message):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ok.txt").write_text(" ".join(DOCS))
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": " ".join(DOCS)}) + "\n")
    make(tmp_path)
    rc = _cli("prepare", "--domain", f"a={tmp_path / 'a'}", "--domain", f"b={tmp_path / 'b.jsonl'}",
              "--tokenizer", str(hf_tokenizer), "--max-seq-len", "8", "--out", str(tmp_path / "out"),
              "--eval-fraction", "0.0", "--eval-domain", f"a={tmp_path / 'a' / 'ok.txt'}",
              "--eval-domain", f"b={tmp_path / 'a' / 'ok.txt'}")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n in ("a", "b.jsonl") if (tmp_path / n).exists())


def test_existing_output_is_refused_unless_overwrite_and_merge_cli(tmp_path, hf_tokenizer, capsys):
    (tmp_path / "d.txt").write_text(" ".join(DOCS))
    args = ["prepare", "--domain", f"d={tmp_path / 'd.txt'}", "--tokenizer", str(hf_tokenizer), "--max-seq-len", "8",
            "--out", str(tmp_path / "out"), "--eval-fraction", "0", "--eval-domain", f"d={tmp_path / 'd.txt'}"]
    assert _cli(*args) == 0
    assert "documents" in capsys.readouterr().out  # the summary table
    assert _cli(*args) == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert _cli(*args, "--overwrite") == 0
    assert _cli("merge", "--input-dir", str(tmp_path / "out" / "eval"), "--output-dir", str(tmp_path / "m"),
                "--output-split", "both", "--split-names", "d", "eval_merge") == 0
    n = len(ShardReader(tmp_path / "out" / "eval" / "d"))
    assert len(ShardReader(tmp_path / "m" / "both")) == 2 * n
    assert _cli("merge", "--input-dir", str(tmp_path / "out" / "eval"), "--output-dir", str(tmp_path / "m"),
                "--output-split", "x", "--split-names", "nope") == 2
    assert "nope is not an MDS folder" in capsys.readouterr().err


def test_truncated_or_corrupted_shard_is_named(tmp_path):
    from drprune.data.testing import write_synthetic_mds

    root = write_synthetic_mds(tmp_path / "data", {"a": "random"}, seq_len=8, vocab_size=100, n_train=20, n_eval=2)
    shard = root / "train" / "a" / "shard.00000.mds"
    assert verify_split(shard.parent) == 20
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"shard {shard} is corrupted: its xxh64 hash"):
        verify_split(shard.parent)
    shard.write_bytes(bytes(data[:-5]))
    with pytest.raises(UserError, match=f"shard {shard} is truncated"):
        verify_split(shard.parent)
