"""The synthetic "repeats" domain: rows repeat spans of a domain's train text, it reaches train/ and
domains.json only (never an eval split), and a training run's mixture samples it like any other domain."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from composer.loggers import InMemoryLogger

from drprune.callbacks.data_loading import DynamicLoadingCallback
from drprune.cli import main
from drprune.data.prepare import prepare, read_domains
from drprune.data.repeats import copied_positions, limits_for, repeat_row, repeat_rows
from drprune.data.shards import ShardReader
from drprune.errors import UserError
from drprune.train import build_trainer, load_config

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("river stone market lamp signal garden winter copper ladder orbit violin harbor pencil meadow cabinet "
         "thunder saddle mirror canyon velvet").split()
EVAL_WORDS = "zebra quartz fjord kayak juniper".split()  # eval text only: its tokens never reach train/
DOCS = [" ".join(np.random.default_rng(i).choice(WORDS, size=30)) + f" number {i}." for i in range(120)]
EVAL_DOCS = [" ".join(np.random.default_rng(i).choice(EVAL_WORDS, size=30)) for i in range(20)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(DOCS + EVAL_DOCS, vocab_size=320, min_frequency=1, special_tokens=["<eos>"],
                            show_progress=False)
    out = tmp_path_factory.mktemp("tok") / "hf"
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("src")
    out = {}
    for name, docs in (("a", DOCS[:60]), ("b", DOCS[60:100]), ("held", DOCS[100:]), ("a_eval", EVAL_DOCS)):
        out[name] = tmp / f"{name}.jsonl"
        out[name].write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer, sources) -> Path:
    out = tmp_path_factory.mktemp("data") / "out"
    prepare({"a": sources["a"], "b": sources["b"]}, str(tokenizer), 64, out, eval_fraction=0.2, seed=3,
            eval_sources={"a": sources["a_eval"]}, eval_only={"held": sources["held"]}, repeats_from=["a"])
    return out


def rows_of(folder: Path) -> np.ndarray:
    reader = ShardReader(folder)
    return np.stack([reader[i]["tokens"] for i in range(len(reader))]).astype(np.int64)


def test_limits_differ_from_the_copy_probe():
    assert limits_for(128).as_dict() == {"span": [8, 32], "gap": [16, 64]}  # the probe: one 64-token span, gap 0
    assert limits_for(2048) == limits_for(128)
    assert limits_for(32).as_dict() == {"span": [4, 8], "gap": [8, 16]}
    with pytest.raises(UserError, match=">= 8 tokens"):
        limits_for(4)


def test_rows_copy_earlier_spans_and_use_fresh_text_in_order():
    text = np.arange(10_000)  # every fresh token distinct, so copies are the only repeats
    rng = np.random.default_rng(0)
    limits = limits_for(128)
    made = list(repeat_rows(np.array_split(text, 37), 128, rng))
    assert len(made) > 50
    fresh = []
    spans = []
    for row, copies in made:
        assert len(copies) >= 1
        copied = np.zeros(128, dtype=bool)
        for c in copies:
            assert c.src + c.length <= c.dst
            assert np.array_equal(row[c.dst:c.dst + c.length], row[c.src:c.src + c.length])
            copied[c.dst:c.dst + c.length] = True
            spans.append(c.length)
        fresh.append(row[~copied])
    assert np.array_equal(np.concatenate(fresh), text[:sum(len(f) for f in fresh)])  # each fresh token once, in order
    assert limits.min_span <= np.median(spans) and max(spans) <= limits.max_span
    row, copies = made[0]
    source = copied_positions(copies, 128)
    t = np.nonzero(source >= 0)[0]
    assert (row[t + 1] == row[source[t]]).all() and (row[t] == row[source[t] - 1]).all()
    assert repeat_row(text[:50], 128, rng, limits) is None  # not enough text for a row


def test_prepare_writes_the_repeats_domain_to_train_only(prepared):
    assert (prepared / "train" / "repeats" / "index.json").is_file()
    assert not (prepared / "eval" / "repeats").exists()
    domains = read_domains(prepared)
    assert domains == {"train": ["a", "b", "repeats"], "eval_only": ["held"]}
    listing = json.loads((prepared / "domains.json").read_text())
    assert listing["repeats"] == {"repeats": {"from": ["a"], "seed": 3, "span": [8, 16], "gap": [16, 32]}}
    merged = ShardReader(prepared / "eval" / "eval_merge")
    assert {merged[i]["set"] for i in range(len(merged))} == {"a", "b"}
    rows, source_rows = rows_of(prepared / "train" / "repeats"), rows_of(prepared / "train" / "a")
    assert {ShardReader(prepared / "train" / "repeats")[0]["set"]} == {"repeats"}
    assert len(rows) > len(source_rows)  # a third of each row is copies, so the text fills more rows
    assert np.array_equal(rows[0][:16], source_rows[0][:16])  # rows open with the train text, in order
    for row in rows:  # every row repeats a span of at least 8 tokens at a later offset
        grams = {}
        found = False
        for i in range(len(row) - 7):
            key = row[i:i + 8].tobytes()
            if key in grams and i >= grams[key] + 8:
                found = True
                break
            grams.setdefault(key, i)
        assert found
    only_eval = set(rows_of(prepared / "eval" / "a").ravel().tolist()) - set(source_rows.ravel().tolist())
    assert only_eval and not only_eval & set(rows.ravel().tolist())  # no eval text in the repeats domain


@pytest.mark.parametrize("kwargs,msg", [
    ({"repeats_from": ["c"]}, "not among the --domain names"),
    ({"repeats_from": ["held"]}, "eval-only domains are never trained on"),
    ({"repeats_from": ["a"], "repeats_name": "b"}, "already a domain's name"),
    ({"repeats_from": ["a"], "repeats_name": "eval_merge"}, "invalid domain name"),
    ({"repeats_from": ["a", "a"]}, "names a domain twice"),
])
def test_bad_repeats_requests_fail_before_tokenizing(tmp_path, sources, kwargs, msg):
    with pytest.raises(UserError, match=msg):
        prepare({"a": sources["a"], "b": sources["b"]}, "no-such-tokenizer", 64, tmp_path / "out",
                eval_only={"held": sources["held"]}, **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_builds_it_from_several_domains(tmp_path, tokenizer, sources, capsys):
    out = tmp_path / "out"
    assert main(["data", "prepare", "--domain", f"a={sources['a']}", "--domain", f"b={sources['b']}",
                 "--tokenizer", str(tokenizer), "--max-seq-len", "32", "--out", str(out), "--eval-fraction", "0.2",
                 "--repeats-from", "a", "--repeats-from", "b", "--repeats-name", "copies"]) == 0
    assert "train (repeats of a, b)" in capsys.readouterr().out
    assert read_domains(out)["train"] == ["a", "b", "copies"]
    reader = ShardReader(out / "train" / "copies")
    assert reader.seq_len() == 32 and len(reader) > len(ShardReader(out / "train" / "a"))
    assert not (out / "eval" / "copies").exists()


def test_a_training_mixture_samples_it_by_name(tmp_path, prepared):
    cfg = load_config(str(ROOT / "configs" / "tiny" / "prune.yaml"), [
        f"data_local={prepared}", "callbacks.data_loading.set_names=[a,b,repeats]", f"save_folder={tmp_path / 'run'}",
        "max_duration=2ba", "eval_interval=2ba", "loggers.inmemory={}", "callbacks.data_loading.update_type=dro",
        "callbacks.data_loading.reference_loss=[1.0,1.0,1.0]"])
    trainer = build_trainer(cfg)
    trainer.fit()
    callback = next(c for c in trainer.state.callbacks if isinstance(c, DynamicLoadingCallback))
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    trainer.close()
    assert callback.set_names == ["a", "b", "repeats"]
    assert callback.tokens_seen[2] > 0 and callback.ema_loss[2] is not None
    assert "metrics/train/repeats_weight" in memory.data
