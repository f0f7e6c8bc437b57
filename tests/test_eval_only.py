"""Eval-only (held-out) domains: corpus YAML, `prepare(eval_only=...)`, the CLI flag, and the guarantee
that training never reads them (set_names refused; never in a train batch over a whole epoch)."""
from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from drprune.cli import main
from drprune.data.loaders import (build_eval_dataloader, build_train_dataloader, eval_only_domains, set_names_of,
                                  validate_data_config)
from drprune.data.prepare import prepare, read_domains, summary_table
from drprune.data.shards import ShardReader
from drprune.demo.corpus import build_corpus, load_spec
from drprune.errors import ConfigError, UserError
from drprune.run_config import RunConfig

# Word-level vocabulary: training words t0..t99 -> ids 0..99, held-out words h0..h49 -> ids 100..149,
# EOS 150. Every token of the held-out domain is in [100, 150), so a batch tells where it came from.
N_TRAIN_WORDS, N_HELD_WORDS = 100, 50
HELD = range(N_TRAIN_WORDS, N_TRAIN_WORDS + N_HELD_WORDS)
EOS = N_TRAIN_WORDS + N_HELD_WORDS
SEQ = 8


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(N_TRAIN_WORDS)} | {f"h{i}": N_TRAIN_WORDS + i for i in range(N_HELD_WORDS)}
    vocab["<eos>"] = EOS
    core = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    out = tmp_path_factory.mktemp("tok") / "words"
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>").save_pretrained(out)
    return out


def _docs(prefix: str, n_words: int, n_docs: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"{prefix}{w}" for w in rng.integers(0, n_words, size=int(rng.integers(10, 30))))
            for _ in range(n_docs)]


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("src")
    return {"a": _write_jsonl(tmp / "a.jsonl", _docs("t", 50, 60, 1)),
            "b": _write_jsonl(tmp / "b.jsonl", _docs("t", N_TRAIN_WORDS, 60, 2)),
            "held": _write_jsonl(tmp / "held.jsonl", _docs("h", N_HELD_WORDS, 80, 3)),
            "tiny": _write_jsonl(tmp / "tiny.jsonl", ["h1 h2"])}


@pytest.fixture(scope="module")
def root(tmp_path_factory, word_tokenizer, sources) -> Path:
    out = tmp_path_factory.mktemp("data") / "mds"
    prepare({"a": sources["a"], "b": sources["b"]}, str(word_tokenizer), SEQ, out, eval_fraction=0.2, seed=4,
            eval_only={"held": sources["held"]})
    return out


def _all_tokens(folder: Path) -> np.ndarray:
    reader = ShardReader(folder)
    return np.stack([reader[i]["tokens"] for i in range(len(reader))])


# ----- corpus YAML --------------------------------------------------------------------------------
def _spec(tmp_path: Path, domains: dict) -> Path:
    (tmp_path / "t.txt").write_text("some text\n\nmore text")
    path = tmp_path / "corpus.yaml"
    path.write_text(yaml.safe_dump({"domains": domains}, sort_keys=False))
    return path


def test_load_spec_parses_eval_only(tmp_path):
    spec = load_spec(_spec(tmp_path, {"a": {"files": ["t.txt"]}, "h": {"files": ["t.txt"], "eval_only": True},
                                      "b": {"files": ["t.txt"], "eval_only": False}}))
    assert [(d.name, d.eval_only) for d in spec.domains] == [("a", False), ("h", True), ("b", False)]
    assert spec.train_names() == ["a", "b"] and spec.eval_only_names() == ["h"]
    assert set(build_corpus(spec, tmp_path / "out")) == {"a", "h", "b"}  # built like any other domain


@pytest.mark.parametrize("domains, message", [
    ({"a": {"files": ["t.txt"]}, "h": {"files": ["t.txt"], "eval_only": "yes"}},
     "eval_only: 'yes'; it must be true or false"),
    ({"a": {"files": ["t.txt"]}, "h": {"files": ["t.txt"], "eval_only": 1}},
     "eval_only: 1; it must be true or false"),
    ({"h": {"files": ["t.txt"], "eval_only": True}}, "at least one training domain is needed"),
    ({"a": {"files": ["t.txt"]}, "h": {"files": ["t.txt"], "eval-only": True}}, r"unknown keys \['eval-only'\]"),
])
def test_load_spec_rejects_bad_eval_only(tmp_path, domains, message):
    with pytest.raises(UserError, match=message):
        load_spec(_spec(tmp_path, domains))


def test_python_strings_format_takes_the_prose_not_the_code(tmp_path):
    (tmp_path / "m.py").write_text('"""Module doc.\n\nSecond paragraph."""\n'
                                   'TOPICS = {"key": "The first topic\\n" "continues here.", "k2": "Another topic."}\n'
                                   'def f(x):\n    """Function doc."""\n    return f"value {x} here"\n')
    path = tmp_path / "corpus.yaml"
    domains = {"py": {"files": ["m.py"], "format": "python_strings"}}
    path.write_text(yaml.safe_dump({"chunk_chars": 20, "domains": domains}))
    build_corpus(load_spec(path), tmp_path / "out")
    texts = [json.loads(line)["text"] for line in (tmp_path / "out" / "py.jsonl").read_text().splitlines()]
    assert texts == ["Module doc.", "Second paragraph.", "The first topic\ncontinues here.", "Another topic.",
                     "Function doc."]
    (tmp_path / "m.py").write_text("def broken(:\n")
    with pytest.raises(UserError, match="cannot read string literals from .*m.py"):
        build_corpus(load_spec(path), tmp_path / "out")


def test_stdlib_python_docs_yield_real_prose(tmp_path):
    topics = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    if not topics.is_file():
        pytest.skip("this Python has no pydoc_data/topics.py")
    path = tmp_path / "corpus.yaml"
    path.write_text(yaml.safe_dump({"domains": {"docs": {"files": ["{stdlib}/pydoc_data/topics.py"],
                                                         "format": "python_strings"}}}))
    stats = build_corpus(load_spec(path), tmp_path / "out")
    text = (tmp_path / "out" / "docs.jsonl").read_text()
    assert stats["docs"]["chars"] > 150_000
    assert "topics = {" not in text and "statement" in text


# ----- prepare ------------------------------------------------------------------------------------
def test_prepare_writes_eval_only_domains_to_eval_only(root, sources):
    assert sorted(p.name for p in (root / "train").iterdir()) == ["a", "b"]
    assert sorted(p.name for p in (root / "eval").iterdir()) == ["a", "b", "eval_merge", "held"]
    merged = ShardReader(root / "eval" / "eval_merge")
    assert {merged[i]["set"] for i in range(len(merged))} == {"a", "b"}
    listed = json.loads((root / "domains.json").read_text())
    assert {k: listed[k] for k in ("train", "eval_only")} == {"train": ["a", "b"], "eval_only": ["held"]}
    assert set(listed) == {"train", "eval_only", "tokenizer"}  # the tokenizer identity: test_data_integrity.py
    assert read_domains(root) == {"train": ["a", "b"], "eval_only": ["held"]}
    held = _all_tokens(root / "eval" / "held")
    assert np.isin(held, [*HELD, EOS]).all()  # the test below can tell held-out tokens apart
    n_tokens = sum(len(json.loads(line)["text"].split()) + 1 for line in sources["held"].read_text().splitlines())
    assert held.size == n_tokens // SEQ * SEQ  # every document, packed
    for split in ("train", "eval"):
        assert not np.isin(np.concatenate([_all_tokens(root / split / d).ravel() for d in "ab"]), HELD).any()
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_prepare_reports_eval_only_in_stats_and_table(tmp_path, word_tokenizer, sources):
    stats = prepare({"a": sources["a"]}, str(word_tokenizer), SEQ, tmp_path / "out", eval_fraction=0.2,
                    eval_only={"held": sources["held"], "held2": sources["b"]})
    rows = [(s.domain, s.split, s.eval_only) for s in stats]
    assert rows == [("a", "train", False), ("a", "eval", False), ("held", "eval", True), ("held2", "eval", True),
                    ("(all)", "eval/eval_merge", False)]
    assert next(s for s in stats if s.domain == "held").documents == 80
    assert re.search(r"^held\s+eval \(eval-only\)\s+80\s", summary_table(stats), re.M)


@pytest.mark.parametrize("domains, eval_only, extra, message", [
    ({"a": "a"}, {"a": "held"}, {}, r"domains \['a'\] are given both as training"),
    ({}, {"held": "held"}, {}, "every domain is eval-only: at least one training domain is needed"),
    ({"a": "a"}, {"held": "held"}, {"eval_sources": {"held": "b"}}, "an eval-only domain's eval data is its whole"),
    ({"a": "a"}, {"eval_merge": "held"}, {}, "invalid domain name 'eval_merge'"),
    ({"a": "a"}, {"tiny": "tiny"}, {}, "eval-only domain tiny: .*tiny.jsonl holds no full 8-token sequence"),
])
def test_prepare_refuses_bad_eval_only(tmp_path, word_tokenizer, sources, domains, eval_only, extra, message):
    extra = {k: {n: sources[s] for n, s in v.items()} for k, v in extra.items()}
    with pytest.raises(UserError, match=message):
        prepare({n: sources[s] for n, s in domains.items()}, str(word_tokenizer), SEQ, tmp_path / "out",
                eval_fraction=0.2, eval_only={n: sources[s] for n, s in eval_only.items()}, **extra)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_eval_only_domain_flag(tmp_path, word_tokenizer, sources, capsys):
    common = ["data", "prepare", "--tokenizer", str(word_tokenizer), "--max-seq-len", str(SEQ),
              "--eval-fraction", "0.2"]
    assert main([*common, "--domain", f"a={sources['a']}", "--eval-only-domain", f"held={sources['held']}",
                 "--eval-only-domain", f"more={sources['b']}", "--out", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    for name in ("held", "more"):
        assert re.search(rf"^{name}\s+eval \(eval-only\)", table, re.M), table
    assert read_domains(tmp_path / "out") == {"train": ["a"], "eval_only": ["held", "more"]}
    assert not (tmp_path / "out" / "train" / "held").exists() and (tmp_path / "out" / "eval" / "held").is_dir()
    assert main([*common, "--eval-only-domain", f"held={sources['held']}", "--out", str(tmp_path / "o2")]) == 2
    assert "at least one training domain is needed" in capsys.readouterr().err
    assert main([*common, "--domain", f"a={sources['a']}", "--eval-only-domain", f"a={sources['held']}",
                 "--out", str(tmp_path / "o3")]) == 2
    assert "given both as training (--domain) and eval-only (--eval-only-domain)" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


# ----- training never reads them ------------------------------------------------------------------
def _cfg(root: Path, workers: int = 0, dynamic: bool = True, **data_loading):
    node = {"dynamic": dynamic, **data_loading}
    return OmegaConf.create({
        "data_local": str(root), "max_seq_len": SEQ, "seed": 5, "max_duration": "10ba", "global_train_batch_size": 4,
        "train_loader": {"num_workers": workers, "dataset": {"split": "train", "shuffle": True}},
        "eval_loader": {"num_workers": 0, "dataset": {"split": "eval_merge"}},
        "callbacks": {"data_loading": node},
    })


def data_of(cfg):
    """The data section the loaders take, read the way a run reads it."""
    return RunConfig.from_cfg(cfg).data


def test_set_names_with_an_eval_only_domain_is_refused(root, tmp_path):
    cfg = _cfg(root, set_names=["a", "held", "b"], proportion=[0.4, 0.2, 0.4])
    with pytest.raises(ConfigError, match=r"set_names lists \['held'\]: eval-only \(held-out\).*Remove \['held'\] "
                                          r"from set_names.*drprune eval MODEL --data .* --domains held"):
        validate_data_config(data_of(cfg))
    with pytest.raises(ConfigError, match="eval-only"):
        build_train_dataloader(data_of(cfg), 4)
    with pytest.raises(ConfigError, match="eval-only"):  # the non-dynamic path too
        validate_data_config(data_of(_cfg(root, dynamic=False, set_names=["a", "held", "b"])))
    # Without domains.json (data written by hand): eval/<name> without train/<name> is still eval-only.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "domains.json").unlink()
    assert eval_only_domains(copy) == ["held"]
    with pytest.raises(ConfigError, match=r"set_names lists \['held'\]"):
        validate_data_config(data_of(_cfg(copy, set_names=["a", "held", "b"], proportion=[0.4, 0.2, 0.4])))


def test_without_set_names_the_train_folders_define_the_domains(root):
    cfg = _cfg(root)
    assert set_names_of(data_of(cfg)) == ["a", "b"]
    validate_data_config(data_of(cfg))
    sets = np.concatenate([b["set"].numpy() for b in build_eval_dataloader(data_of(cfg), 4)])
    assert set(sets.tolist()) == {0, 1}  # eval_merge: the training domains only


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_only_domain_never_in_a_training_batch_over_a_whole_epoch(root, workers):
    sizes = [len(ShardReader(root / "train" / d)) for d in "ab"]
    total = sum(sizes)
    # Non-dynamic: one shuffled epoch over data_local/train covers every train sample exactly once.
    cfg = _cfg(root, workers, dynamic=False)
    cfg.train_loader.drop_last = False
    batches = list(build_train_dataloader(data_of(cfg), 4))
    ids = np.concatenate([b["idx"].numpy() for b in batches])
    assert sorted(ids.tolist()) == list(range(total))
    _check_training_batches(batches)
    # Dynamic mixture (set_names from train/): draw until every sample of both domains has come out.
    loader = build_train_dataloader(data_of(_cfg(root, workers, proportion=[0.5, 0.5])), 4)
    seen, batches = set(), []
    for batch in loader:
        batches.append(batch)
        seen.update(batch["idx"].tolist())
        if len(seen) == total or len(batches) > 50 * total:
            break
    assert seen == set(range(total))  # a full pass over each training domain
    _check_training_batches(batches)


def _check_training_batches(batches) -> None:
    ids = np.concatenate([b["input_ids"].numpy().ravel() for b in batches])
    sets = np.concatenate([b["set"].numpy() for b in batches])
    assert set(sets.tolist()) == {0, 1}
    assert not np.isin(ids, HELD).any()
    assert np.isin(ids, [*range(N_TRAIN_WORDS), EOS]).all()
