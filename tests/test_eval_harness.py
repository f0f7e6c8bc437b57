"""`drprune eval --tasks`: the local lm-eval task pack run through the real harness, offline, on tiny models.

The harness's scores are checked against log-likelihoods computed by hand, a model that reproduces the
copy items must beat a random one, a checkpoint must score like its exported folder (remote code
included), and bad input must fail before any model is loaded.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from drprune.cli import main as drprune
from drprune.errors import UserError
from drprune.eval.harness import (CHOICE_WORDS, CONTEXT_WORDS, COPY_WORDS, check_tasks, cloze_items, copy_items,
                                  fetch_standard, held_out_texts, hub_offline, write_task_pack, written_by_drprune)
from tests.conftest import VOCAB, random_hf_model

ROWS = 16


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # tests never reach the network


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<eos>": VOCAB - 1}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A word-level tokenizer (1 word = 1 token), a random tiny llama with it, and prepared MDS data."""
    from drprune.data.prepare import prepare

    root = tmp_path_factory.mktemp("harness")
    tok = _word_tokenizer()
    tok.save_pretrained(root / "tok")
    random_hf_model("llama").save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{w}" for w in rng.integers(0, 120, size=int(rng.integers(20, 60)))) for _ in range(200)]
    (root / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare({"a": root / "a.jsonl"}, str(root / "tok"), 48, root / "mds", eval_fraction=0.3, seed=0)
    return {"tok": root / "tok", "hf": root / "hf", "mds": root / "mds"}


def _eval(model: Path, tasks: str, data: Path, out: Path, *extra: str) -> dict:
    assert drprune(["eval", str(model), "--tasks", tasks, "--data", str(data), "--json", str(out),
                    "--task-rows", str(ROWS), "--bootstrap", "50", *extra]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def random_run(world, tmp_path_factory) -> tuple[dict, str]:
    import contextlib
    import io

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("HF_HUB_OFFLINE", "1")
        results = _eval(world["hf"], "drprune_copy,drprune_cloze", world["mds"],
                        tmp_path_factory.mktemp("out") / "r.json")
    return results, printed.getvalue()


def _items(world, name: str, out: Path, seed: int = 0) -> list[dict]:
    folder = write_task_pack([name], world["mds"], world["tok"], out, rows=ROWS, seed=seed)
    return [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]


@torch.no_grad()
def _loglik(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log p(continuation | context) and whether greedy decoding gives exactly the continuation."""
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    cont = torch.tensor(whole[len(ctx):])
    logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0, len(ctx) - 1:], -1)
    return logp.gather(1, cont[:, None]).sum().item(), bool((logp.argmax(-1) == cont).all())


def test_local_pack_through_the_harness_matches_hand_computed_scores(world, random_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    results, printed = random_run
    assert set(results["results"]) == {"drprune_copy", "drprune_cloze"}
    metrics = {"drprune_copy": {"acc"}, "drprune_cloze": {"acc", "acc_norm"}}
    for task, names in metrics.items():
        assert results["n-samples"][task] == {"original": ROWS, "effective": ROWS}
        for name in names:
            assert 0.0 <= results["results"][task][f"{name},none"] <= 1.0
        assert f"|{task}" in printed
    assert results["config"]["model_args"]["pretrained"] == str(world["hf"])

    # The items are deterministic given the seed; the harness's accuracies equal hand-computed ones.
    cloze = _items(world, "drprune_cloze", tmp_path / "a")
    assert cloze == _items(world, "drprune_cloze", tmp_path / "b")
    assert cloze != _items(world, "drprune_cloze", tmp_path / "c", seed=1)
    model = AutoModelForCausalLM.from_pretrained(world["hf"]).eval()
    tok = AutoTokenizer.from_pretrained(world["hf"])
    acc, acc_norm = [], []
    for item in cloze:
        lls = np.array([_loglik(model, tok, item["context"], " " + c)[0] for c in item["choices"]])
        acc.append(lls.argmax() == item["label"])
        acc_norm.append((lls / [len(c) for c in item["choices"]]).argmax() == item["label"])
    cloze_scores = results["results"]["drprune_cloze"]
    assert math.isclose(cloze_scores["acc,none"], np.mean(acc), abs_tol=1e-9)
    assert math.isclose(cloze_scores["acc_norm,none"], np.mean(acc_norm), abs_tol=1e-9)
    copy = _items(world, "drprune_copy", tmp_path / "d")
    greedy = [_loglik(model, tok, item["context"], item["continuation"])[1] for item in copy]
    assert math.isclose(results["results"]["drprune_copy"]["acc,none"], np.mean(greedy), abs_tol=1e-9)


def test_copy_task_scores_a_model_that_copies_above_a_random_one(world, random_run, tmp_path):
    """A model trained on the copy items continues every repeat exactly; the random one continues none."""
    from transformers import AutoTokenizer

    items = _items(world, "drprune_copy", tmp_path / "items")
    tok = AutoTokenizer.from_pretrained(world["tok"])
    ids = torch.tensor([tok(i["context"] + i["continuation"])["input_ids"] for i in items])
    assert ids.shape == (ROWS, 2 * COPY_WORDS)
    model = random_hf_model("llama", seed=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small only pay for a second thread (busy-waiting on a loaded machine)
    try:
        for _ in range(100):  # about 25 steps memorise the items
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss.item() < 0.01:
                break
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(tmp_path / "copier")
    tok.save_pretrained(tmp_path / "copier")
    copier = _eval(tmp_path / "copier", "drprune_copy", world["mds"], tmp_path / "copier.json")
    assert copier["results"]["drprune_copy"]["acc,none"] == 1.0
    assert random_run[0]["results"]["drprune_copy"]["acc,none"] <= 0.1


def test_checkpoint_scores_like_its_remote_code_folder(world, tmp_path):
    """A per-layer compact checkpoint is exported to a temp remote-code folder (trusted: drprune wrote it)."""
    from drprune.compact.fold import compact_decoder
    from tests.test_compact import PER_LAYER, random_masks
    from tests.test_export import export, source_decoder

    decoder = source_decoder(tmp_path, world["hf"])
    folder = export(tmp_path, compact_decoder(decoder, random_masks(decoder.cfg, PER_LAYER)))
    assert written_by_drprune(folder) and not written_by_drprune(world["hf"])
    for name in os.listdir(world["tok"]):
        (folder / name).write_bytes((world["tok"] / name).read_bytes())
    from_folder = _eval(folder, "drprune_cloze", world["mds"], tmp_path / "folder.json", "--limit", "8")
    from_ckpt = _eval(tmp_path / "hf.pt", "drprune_cloze", world["mds"], tmp_path / "ckpt.json", "--limit", "8",
                      "--tokenizer", str(world["tok"]))
    assert from_ckpt["results"] == from_folder["results"]
    assert from_ckpt["n-samples"]["drprune_cloze"] == {"original": ROWS, "effective": 8}
    assert from_ckpt["config"]["model_args"]["trust_remote_code"] is True
    assert from_ckpt["config"]["model_args"]["pretrained"] == str(tmp_path / "hf.pt")


def test_text_folder_items_are_the_text_that_follows(tmp_path):
    rng = np.random.default_rng(3)
    words = [f"x{i}" for i in rng.integers(0, 1000, size=400)]
    (tmp_path / "sub").mkdir()
    (tmp_path / "one.txt").write_text(" ".join(words[:200]))
    (tmp_path / "sub" / "two.txt").write_text("\n".join(words[200:]))
    texts = held_out_texts(tmp_path, tmp_path, max_rows=10)
    assert " ".join(" ".join(t.split()) for t in texts) == " ".join(words)
    width = CONTEXT_WORDS + CHOICE_WORDS
    items = cloze_items(texts, 100, seed=0)
    assert len(items) == 2 * (200 // width)  # every whole window of each file, no more
    for item in items:
        context, choices = item["context"].split(), item["choices"]
        start = next(i for i in range(len(words)) if words[i:i + CONTEXT_WORDS] == context)
        assert choices[item["label"]] == " ".join(words[start + CONTEXT_WORDS:start + width])
        assert len(set(choices)) == 4 and all(len(c.split()) == CHOICE_WORDS for c in choices)
    assert len({i["label"] for i in items}) > 1
    for item in copy_items(texts, 20, seed=0):
        span = item["context"].split()[:COPY_WORDS]
        assert item["context"].split() == span + span[:1] and item["continuation"] == " " + " ".join(span[1:])
        assert set(span) <= set(words)


def test_hub_offline_switches_the_hub_off_and_restores(monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    before = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    with hub_offline():
        assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
        assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == before
    assert "HF_DATASETS_OFFLINE" not in os.environ and os.environ["HF_HUB_OFFLINE"] == "1"


def test_standard_task_offline_needs_its_dataset_in_the_cache(monkeypatch, tmp_path):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    with pytest.raises(UserError, match="arc_easy needs allenai/ai2_arc"):
        check_tasks(["arc_easy"], have_data=False)
    (tmp_path / "hub" / "datasets--allenai--ai2_arc").mkdir(parents=True)
    assert check_tasks(["arc_easy", "ai2_arc"], have_data=False) == ([], ["arc_easy", "ai2_arc"])
    with hub_offline(), pytest.raises(UserError, match="cannot get the datasets of arc_easy .*connected machine"):
        fetch_standard(["arc_easy"])  # the folder holds no data: loading it fails before any model is loaded
    monkeypatch.delenv("HF_HUB_OFFLINE")  # connected: a download is allowed, nothing is checked
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    assert check_tasks(["hellaswag"], have_data=False) == ([], ["hellaswag"])


@pytest.mark.parametrize("args,message", [
    (["{missing}", "--tasks", "nope,drprune_copy", "--data", "{tmp}"],
     "unknown task(s) nope: local tasks (built from --data, no network): drprune_cloze, drprune_copy"),
    (["{missing}", "--tasks", "arc_easy"], "arc_easy needs allenai/ai2_arc"),
    (["{missing}", "--tasks", "drprune_cloze"], "pass --data DIR"),
    (["{ckpt}", "--tasks", "drprune_copy", "--data", "{tmp}"], "pass --tokenizer"),
    (["{missing}", "--tasks", "drprune_copy", "--data", "{tmp}", "--task-rows", "0"], "--task-rows=0 must be >= 1"),
    (["{missing}", "--tasks", " , "], "names no task"),
    (["{missing}"], "--data is required"),
])
def test_bad_input_fails_before_loading_a_model(tmp_path, monkeypatch, capsys, args, message):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    (tmp_path / "ckpt.pt").write_bytes(b"not read")
    values = {"missing": str(tmp_path / "no-model"), "ckpt": str(tmp_path / "ckpt.pt"), "tmp": str(tmp_path)}
    assert drprune(["eval", *(a.format(**values) for a in args)]) == 2
    err = capsys.readouterr().err
    assert "drprune: error:" in err and message in err


def test_data_without_text_is_refused(world, tmp_path, capsys):
    assert drprune(["eval", str(world["hf"]), "--tasks", "drprune_copy", "--data", str(tmp_path)]) == 2
    assert "neither eval/ (an MDS folder) nor *.txt files" in capsys.readouterr().err


def test_report_task_rows_put_each_metric_of_each_model_in_its_cell():
    from drprune.demo.report import task_rows

    tasks = {"source": {"drprune_cloze": {"acc": 0.5, "acc_stderr": 0.125, "acc_norm": 0.25}},
             "pruned": {"drprune_cloze": {"acc": 0.375}}}
    assert task_rows(tasks, ["source", "pruned"]) == [["drprune_cloze", "acc", "0.500 ± 0.125", "0.375"],
                                                      ["drprune_cloze", "acc_norm", "0.250", "n/a"]]


def _require_demo_packages() -> None:
    from tests.test_demo import DEMO_MODULES

    if missing := [m for m in DEMO_MODULES if importlib.util.find_spec(m) is None]:
        pytest.skip(f"demo packages not installed ({', '.join(missing)}): run DEMO_INSTALL_ONLY=1 bash scripts/demo.sh")


def test_demo_refuses_an_unknown_task_before_building_anything(tmp_path, capsys):
    _require_demo_packages()
    assert drprune(["demo", "--out", str(tmp_path / "out"), "--tasks", "nope"]) == 2
    assert "unknown task(s) nope" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_demo_reports_task_scores_of_every_model(tmp_path):
    from tests.test_demo import ARGS, MODELS

    _require_demo_packages()
    out = tmp_path / "out"
    assert drprune(["demo", "--out", str(out), *ARGS, "--tasks", "drprune_copy,drprune_cloze"]) == 0
    tasks = json.loads((out / "summary.json").read_text())["tasks"]
    assert set(tasks) == set(MODELS)
    for scores in tasks.values():
        assert set(scores) == {"drprune_copy", "drprune_cloze"}
        assert all(0.0 <= scores[t][m] <= 1.0 for t, m in [("drprune_copy", "acc"), ("drprune_cloze", "acc"),
                                                           ("drprune_cloze", "acc_norm")])
    report = (out / "report.md").read_text()
    source_cell = f"{tasks['source']['drprune_cloze']['acc_norm']:.3f}"
    assert "## lm-eval tasks" in report and f"| drprune_cloze | acc_norm | {source_cell}" in report
