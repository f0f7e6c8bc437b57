"""Data integrity: prepared data records its tokenizer and shard hashes; eval, training and one-shot
calibration refuse another tokenizer's data, corrupted or truncated shards and ids beyond the vocabulary."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from drprune.cli import main as drprune
from drprune.convert.checkpoint import decoder_checkpoint_state, save_checkpoint
from drprune.data.identity import vocab_digest
from drprune.data.prepare import prepare
from drprune.data.testing import write_synthetic_mds
from tests.conftest import VOCAB, random_hf_model
from tests.test_compact import random_decoder
from tests.test_compact_cli import CFG

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "prune.yaml")


def word_tokenizer(folder: Path, seed: int) -> Path:
    """A word-level tokenizer of VOCAB tokens; another seed gives the same words under other ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(VOCAB - 1)]
    np.random.default_rng(seed).shuffle(words)
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)} | {"<eos>": VOCAB - 1}, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Data prepared with tokenizer A; HF model folders (vocab VOCAB) holding tokenizer A or B."""
    tmp = tmp_path_factory.mktemp("integrity")
    tok_a, tok_b = word_tokenizer(tmp / "tok_a", 0), word_tokenizer(tmp / "tok_b", 1)
    rng = np.random.default_rng(0)
    (tmp / "docs.jsonl").write_text("".join(
        json.dumps({"text": " ".join(f"w{i}" for i in rng.integers(0, VOCAB - 1, 40))}) + "\n" for _ in range(120)))
    prepare({"web": tmp / "docs.jsonl"}, str(tok_a), 64, tmp / "data", eval_fraction=0.2)
    out = {"tok_a": tok_a, "tok_b": tok_b, "data": tmp / "data"}
    for name, tok in (("model_a", tok_a), ("model_b", tok_b)):
        random_hf_model("llama").save_pretrained(tmp / name)
        for f in tok.iterdir():
            (tmp / name / f.name).write_bytes(f.read_bytes())
        out[name] = tmp / name
    return out


def fails(argv: list[str], capsys, *needles: str) -> str:
    capsys.readouterr()  # drop the output of the set-up (progress bars)
    assert drprune(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("drprune: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def train_fails(args: list[str], capsys, *needles: str) -> None:
    from drprune.train import main as train

    capsys.readouterr()
    assert train([TINY, *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def run_args(data: Path, save: Path, *extra: str) -> list[str]:
    return [f"data_local={data}", "callbacks.data_loading.set_names=[web]", f"save_folder={save}",
            "loggers.inmemory={}", f"model.vocab_size={VOCAB}", *extra]


# ---------------------------------------------------------------- what prepare records

def test_prepare_records_the_tokenizer_and_shard_hashes(world):
    from transformers import AutoTokenizer

    recorded = json.loads((world["data"] / "domains.json").read_text())["tokenizer"]
    vocab_a = AutoTokenizer.from_pretrained(world["tok_a"]).get_vocab()
    vocab_b = AutoTokenizer.from_pretrained(world["tok_b"]).get_vocab()
    assert len(vocab_a) == len(vocab_b) == VOCAB
    assert recorded == {"source": str(world["tok_a"]), "vocab_size": VOCAB, "vocab_sha256": vocab_digest(vocab_a)}
    assert vocab_digest(vocab_b) != recorded["vocab_sha256"]  # same size, other ids: told apart
    for split in ("train/web", "eval/web", "eval/eval_merge"):
        shards = json.loads((world["data"] / split / "index.json").read_text())["shards"]
        assert shards and all(len(s["raw_data"]["hashes"]["xxh64"]) == 16 for s in shards)


# ---------------------------------------------------------------- another tokenizer, same vocab size

def test_eval_refuses_data_of_another_tokenizer_of_the_same_size(world, capsys):
    fails(["eval", str(world["model_b"]), "--data", str(world["data"])], capsys,
          f"was prepared with tokenizer {world['tok_a']} ({VOCAB} tokens", "model's tokenizer is",
          f"--tokenizer {world['model_b']}")
    assert drprune(["eval", str(world["model_a"]), "--data", str(world["data"]), "--bootstrap", "20",
                    "--json", str(world["data"].parent / "a.json")]) == 0
    ppl = json.loads((world["data"].parent / "a.json").read_text())["domains"]["web"]["ppl"]
    assert math.isfinite(ppl) and ppl > 1


def test_training_and_oneshot_refuse_data_of_another_tokenizer(world, tmp_path, capsys):
    from drprune.train import build_trainer, load_config

    train_fails(run_args(world["data"], tmp_path / "b", f"tokenizer={world['tok_b']}"), capsys,
                "was prepared with tokenizer", str(world["tok_b"]))
    assert not (tmp_path / "b").exists()
    train_fails(run_args(world["data"], tmp_path / "m", f"tokenizer={tmp_path / 'nope'}"), capsys,
                f"tokenizer={tmp_path / 'nope'} does not exist")
    build_trainer(load_config(TINY, run_args(world["data"], tmp_path / "a", f"tokenizer={world['tok_a']}"))).close()
    fails(["oneshot", "layers", str(world["model_b"]), "--num-blocks-to-prune", "1", "--calib", str(world["data"]),
           "--out", str(tmp_path / "os")], capsys, "was prepared with tokenizer")
    assert not (tmp_path / "os").exists()


def test_recorded_vocabulary_larger_than_the_model_is_refused(world, tmp_path, capsys):
    ckpt = save_checkpoint(decoder_checkpoint_state(random_decoder(CFG)), tmp_path / "small.pt")  # vocab 97
    fails(["eval", str(ckpt), "--data", str(world["data"])], capsys,
          f"({VOCAB} tokens", "larger than the model's vocab_size 97")
    train_fails(run_args(world["data"], tmp_path / "run", "model.vocab_size=100"), capsys,
                "larger than the model's vocab_size 100")


# ---------------------------------------------------------------- ids beyond the vocabulary (no record)

def test_ids_beyond_the_vocabulary_are_refused_before_training_and_calibration(tmp_path, capsys):
    data = write_synthetic_mds(tmp_path / "mds", {"web": "random"}, seq_len=64, vocab_size=VOCAB + 69,
                               n_train=16, n_eval=4)
    assert not (data / "domains.json").exists()  # nothing recorded: the ids themselves are scanned
    train_fails(run_args(data, tmp_path / "run"), capsys, "beyond the model's vocab_size 131", "train/web")
    assert not (tmp_path / "run").exists()
    model = tmp_path / "hf"
    random_hf_model("llama").save_pretrained(model)
    fails(["oneshot", "layers", str(model), "--num-blocks-to-prune", "1", "--calib", str(data),
           "--out", str(tmp_path / "os")], capsys, "beyond the model's vocab_size 131")
    fails(["eval", str(model), "--data", str(data)], capsys, "beyond the model's vocab")


# ---------------------------------------------------------------- corrupted and truncated shards

def corrupt(folder: Path, truncate: bool) -> Path:
    shard = folder / "shard.00000.mds"
    data = bytearray(shard.read_bytes())
    if truncate:
        data = data[:-7]
    else:
        data[-5] ^= 0x10  # a token byte of the last sample
    shard.write_bytes(bytes(data))
    return shard


@pytest.mark.parametrize("truncate", [False, True], ids=["bit-flip", "truncated"])
def test_eval_and_calibration_name_a_bad_shard(tmp_path, capsys, truncate):
    data = write_synthetic_mds(tmp_path / "mds", {"web": "random"}, seq_len=16, vocab_size=VOCAB, n_train=8, n_eval=4)
    model = tmp_path / "hf"
    random_hf_model("llama").save_pretrained(model)
    eval_shard = corrupt(data / "eval" / "web", truncate)
    train_shard = corrupt(data / "train" / "web", truncate)
    # a truncated shard may be caught first by the folder's completion marker (file sizes), which names it too
    what = ("truncated", "incomplete") if truncate else ("corrupted: its xxh64 hash does not match",)
    err = fails(["eval", str(model), "--data", str(data), "--domains", "web"], capsys, str(eval_shard.parent),
                eval_shard.name)
    assert any(w in err for w in what), err
    err = fails(["oneshot", "layers", str(model), "--num-blocks-to-prune", "1", "--calib", str(data),
                 "--out", str(tmp_path / "os")], capsys, str(train_shard.parent), train_shard.name)
    assert any(w in err for w in what) and not (tmp_path / "os").exists(), err


@pytest.mark.parametrize("truncate", [False, True], ids=["bit-flip", "truncated"])
def test_training_names_a_bad_shard_before_it_starts(tmp_path, capsys, truncate):
    data = write_synthetic_mds(tmp_path / "mds", {"web": "random"}, seq_len=64, vocab_size=VOCAB, n_train=8, n_eval=4)
    shard = corrupt(data / "train" / "web", truncate)
    train_fails(run_args(data, tmp_path / "run"), capsys, f"shard {shard} is",
                "truncated" if truncate else "xxh64 hash does not match")
    assert not (tmp_path / "run").exists()
