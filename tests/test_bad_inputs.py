"""The bad-input matrix: every CLI and the run config, given what a new user might give them.

Each case runs in a fresh folder and must end with exit code 2, exactly one `drprune: error:` line
that names the problem (a distinctive substring per case), no traceback, and nothing left behind:
the output path does not exist afterwards and its folder holds exactly what it held before (no
temp files or folders). Inputs are shared tiny fixtures built once per module; broken copies are
made per case. The network is never touched (HF_HUB_OFFLINE=1; a bare name is "not found").
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from drprune.cli import main as drprune
from drprune.convert.checkpoint import decoder_checkpoint_state, load_model_state, save_checkpoint
from drprune.data.prepare import prepare
from drprune.data.testing import write_synthetic_mds
from tests.conftest import VOCAB, random_hf_model
from tests.test_compact import random_decoder
from tests.test_compact_cli import CFG, pruning_lm
from tests.test_data_integrity import word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "prune.yaml")
SEQ = 64
IS_ROOT = os.geteuid() == 0  # chmod does not stop root: read-only cases use a path under a file instead


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# ---------------------------------------------------------------- shared inputs, built once

def _docs(path: Path, seed: int, n: int = 80) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text("".join(json.dumps({"text": " ".join(f"w{i}" for i in rng.integers(0, VOCAB - 1, 40))}) + "\n"
                            for _ in range(n)))
    return path


def _hf_with_tokenizer(folder: Path, tok: Path) -> Path:
    random_hf_model("llama").save_pretrained(folder)
    for f in tok.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def _gguf(path: Path, arch: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    from tokenizers import Tokenizer, models

    tmp = tmp_path_factory.mktemp("bad-inputs")
    tok, tok_b = word_tokenizer(tmp / "tok", 0), word_tokenizer(tmp / "tok_b", 1)
    web, code = _docs(tmp / "web.jsonl", 0), _docs(tmp / "code.jsonl", 1)
    prepare({"web": web, "code": code}, str(tok), SEQ, tmp / "data", eval_fraction=0.2)
    write_synthetic_mds(tmp / "big", {"web": "random", "code": "random"}, seq_len=SEQ, vocab_size=500,
                        n_train=4, n_eval=2)  # ids up to 499, no tokenizer record
    hf = _hf_with_tokenizer(tmp / "hf", tok)
    _hf_with_tokenizer(tmp / "hf_b", tok_b)
    random_hf_model("pythia").save_pretrained(tmp / "pythia")
    small = random_hf_model("llama")
    small.resize_token_embeddings(64)
    small.save_pretrained(tmp / "small_vocab")
    assert drprune(["convert", "hf-to-composer", str(hf), str(tmp / "model.pt")]) == 0
    assert drprune(["convert", "composer-to-hf", str(tmp / "model.pt"), str(tmp / "hf_ck"),
                    "--tokenizer", str(tok)]) == 0
    torch.save({"state": {"model": pruning_lm().state_dict()}}, tmp / "prune.pt")
    plain = {k: v for k, v in load_model_state(tmp / "model.pt").items() if not k.endswith("_extra_state")}
    torch.save(plain, tmp / "sheared.pt")
    torch.save([1, 2, 3], tmp / "list.pt")
    torch.save({"x": torch.nn.Linear(2, 2)}, tmp / "module.pt")  # needs full unpickling
    save_checkpoint(decoder_checkpoint_state(random_decoder(CFG)), tmp / "plain_model.pt")
    (tmp / "text.txt").write_text("not a checkpoint, not a model, just text\n")
    (tmp / "empty").write_bytes(b"")
    (tmp / "emptydir").mkdir()
    (tmp / "wp").mkdir()
    Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]")).save(str(tmp / "wp" / "tokenizer.json"))
    _gguf(tmp / "bert.gguf", "bert")
    (tmp / "corpus_bad.yaml").write_text("domains: [unclosed\n")
    return {"tok": str(tok), "tok_b": str(tok_b), "data": str(tmp / "data"), "big": str(tmp / "big"),
            "hf": str(hf), "hf_b": str(tmp / "hf_b"), "pythia": str(tmp / "pythia"),
            "small_vocab": str(tmp / "small_vocab"), "ckpt": str(tmp / "model.pt"), "hf_ck": str(tmp / "hf_ck"),
            "prune": str(tmp / "prune.pt"), "sheared": str(tmp / "sheared.pt"), "list": str(tmp / "list.pt"),
            "pickle": str(tmp / "module.pt"), "plain_model": str(tmp / "plain_model.pt"),
            "text": str(tmp / "text.txt"), "empty": str(tmp / "empty"), "emptydir": str(tmp / "emptydir"),
            "wp": str(tmp / "wp"), "bert_gguf": str(tmp / "bert.gguf"), "web": str(web),
            "corpus_bad": str(tmp / "corpus_bad.yaml")}


# ---------------------------------------------------------------- per-case broken inputs (into {i}, outputs in {w})

def _flip(path: Path, at: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _copy(world, i: Path, key: str, name: str | None = None) -> Path:
    src = Path(world[key])
    dst = i / (name or src.name)
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def _shard(folder: Path) -> Path:
    return next(folder.glob("shard.*.mds"))


def hf_config(text: str):
    def setup(world, i, w):
        (_copy(world, i, "hf") / "config.json").write_text(text)
    return setup


def hf_config_edit(**changes):
    def setup(world, i, w):
        config = _copy(world, i, "hf") / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))
    return setup


def hf_truncated_weights(world, i, w):
    _truncate(_copy(world, i, "hf") / "model.safetensors")


def hf_flipped_weights(world, i, w):
    _flip(_copy(world, i, "hf_ck", "hf") / "model.safetensors")


def hf_no_weights(world, i, w):
    (_copy(world, i, "hf") / "model.safetensors").unlink()


def hf_missing_tensor(world, i, w):
    from safetensors.torch import load_file, save_file

    weights = _copy(world, i, "hf") / "model.safetensors"
    tensors = load_file(weights)
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, weights, metadata={"format": "pt"})


def ckpt_truncated(world, i, w):
    _truncate(_copy(world, i, "ckpt"))


def ckpt_flipped(world, i, w):
    _flip(_copy(world, i, "ckpt"), 0.5)


def prune_truncated(world, i, w):
    _truncate(_copy(world, i, "prune"))


def flipped_shard(split: str):
    """A copy of the data with one byte of the shard of `split` (e.g. eval/web) flipped."""
    def setup(world, i, w):
        _flip(_shard(_copy(world, i, "data") / split), 0.5)
    return setup


def data_truncated_shard(world, i, w):
    _truncate(_shard(_copy(world, i, "data") / "train" / "web"), 0.7)


def data_garbage_index(world, i, w):
    (_copy(world, i, "data") / "eval" / "web" / "index.json").write_text("{garbage")


def data_garbage_domains(world, i, w):
    (_copy(world, i, "data") / "domains.json").write_text("[oops")


def existing_file(name: str):
    def setup(world, i, w):
        (w / name).write_text("an earlier result\n")
    return setup


def existing_dir(name: str):
    def setup(world, i, w):
        (w / name).mkdir()
        (w / name / "keep.txt").write_text("an earlier result\n")
    return setup


UNDER_FILE = existing_file("f")  # {w}/f: a file where the command needs a folder (outputs go under it)


def readonly(world, i, w):
    """{w}/ro: a folder nobody may write (chmod 555), or as root (where chmod is no obstacle) a file."""
    ro = w / "ro"
    if IS_ROOT:
        ro.write_text("a file: nothing can be created under it\n")
    else:
        ro.mkdir()
        ro.chmod(0o555)


def save_folder_with_checkpoint(world, i, w):
    (w / "run").mkdir()
    torch.save({"state": {}}, w / "run" / "ep0-ba4-rank0.pt")


def sharded_unfinished(world, i, w):
    """A sharded checkpoint folder whose save was killed before `.metadata` (written last)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"state": {"model": pruning_lm().state_dict()}}, storage_writer=dcp.FileSystemWriter(str(i / "ep0-ba2")),
             no_dist=True)
    (i / "ep0-ba2" / ".metadata").unlink()


def sharded_whole(world, i, w):
    import torch.distributed.checkpoint as dcp

    dcp.save({"state": {"model": {}}}, storage_writer=dcp.FileSystemWriter(str(i / "ep0-ba2")), no_dist=True)


def text_docs(world, i, w):
    (i / "docs.txt").write_text("w1 w2 w3\n")
    (i / "bad.jsonl").write_text('{"text": "w1 w2"}\n{not json\n')
    (i / "body.jsonl").write_text('{"body": "w1 w2"}\n')
    (i / "docs.csv").write_text("w1,w2\n")
    (i / "nodocs").mkdir()


def config_files(world, i, w):
    (i / "list.yaml").write_text("- a\n- b\n")
    (i / "broken.yaml").write_text("max_duration: [20ba\n")
    (i / "empty.yaml").write_text("")
    (i / "self.yaml").write_text("base: self.yaml\n")
    (i / "nobase.yaml").write_text("base: missing.yaml\nmax_duration: 20ba\n")
    (i / "unknown.yaml").write_text("num_blocks: 2\n")
    (i / "dtype.yaml").write_text("dtype: half\n")


# ---------------------------------------------------------------- the matrix

@dataclass
class Case:
    id: str
    argv: str                       # whitespace-separated; {name} placeholders (world, {i} inputs, {w} outputs)
    needles: tuple[str, ...]        # each must be in the `drprune: error:` line
    setup: Callable | None = None
    kind: str = "cli"               # cli: drprune.cli.main; train: drprune.train.main on TINY + TRAIN + argv;
    #                                 train-raw: drprune.train.main on argv alone


def C(id: str, argv: str, *needles: str, setup: Callable | None = None, kind: str = "cli") -> Case:
    return Case(id, argv, needles, setup, kind)


OUT_EXISTS = ("already exists", "--overwrite")
WRITABLE = "choose a writable"
RO = "{w}/ro/out"

PREPARE = "data prepare --tokenizer {tok} --max-seq-len 64 --domain web={web}"
MERGE = "data merge --input-dir {data}/eval --output-dir {w}/m"
H2C = "convert hf-to-composer"
C2H = "convert composer-to-hf {ckpt}"
EVAL = "eval {hf} --data {data}"
LAYERS = "oneshot layers {hf} --num-blocks-to-prune 1 --calib {data}"
WIDTH = "oneshot width {hf} --importance l1"
VOCAB_ = "oneshot vocab {hf} --keep 8 --calib {data}"
DEMO = "demo --gguf {bert_gguf} --out {w}/demo"
TRAIN = ("data_local={data} callbacks.data_loading.set_names=[web,code] save_folder={w}/run "
         f"model.vocab_size={VOCAB} loggers.inmemory={{}}")

CASES = [
    # ---- usage mistakes (argparse): the same one line
    C("unknown-command", "prune {hf}", "argument command: invalid choice: 'prune'"),
    C("prepare-missing-required", "data prepare --domain web={web}", "the following arguments are required",
      "--tokenizer"),
    # ---- data prepare
    C("prepare-no-domain", "data prepare --tokenizer {tok} --max-seq-len 64 --out {w}/o", "no --domain"),
    C("prepare-domain-not-pair", "data prepare --tokenizer {tok} --max-seq-len 64 --domain web --out {w}/o",
      "'web' is not NAME=VALUE"),
    C("prepare-source-missing", "data prepare --tokenizer {tok} --max-seq-len 64 --domain web={i}/nope.txt --out {w}/o",
      "nope.txt does not exist"),
    C("prepare-source-empty-folder", "data prepare --tokenizer {tok} --max-seq-len 64 --domain web={i}/nodocs "
      "--out {w}/o", "holds no .txt files", setup=text_docs),
    C("prepare-source-wrong-type", "data prepare --tokenizer {tok} --max-seq-len 64 --domain web={i}/docs.csv "
      "--out {w}/o", "unsupported file type '.csv'", setup=text_docs),
    C("prepare-source-corrupt-jsonl", "data prepare --tokenizer {tok} --max-seq-len 8 --domain web={i}/bad.jsonl "
      "--out {w}/o", "bad.jsonl:2: invalid JSON", setup=text_docs),
    C("prepare-text-field-missing", "data prepare --tokenizer {tok} --max-seq-len 8 --domain web={i}/body.jsonl "
      "--out {w}/o", "no string field 'text'", setup=text_docs),
    C("prepare-too-little-text", "data prepare --tokenizer {tok} --max-seq-len 64 --domain web={i}/docs.txt "
      "--out {w}/o", "no full 64-token sequence", "smaller --max-seq-len", setup=text_docs),
    C("prepare-tokenizer-missing", "data prepare --tokenizer {i}/nope --max-seq-len 64 --domain web={web} --out {w}/o",
      "tokenizer", "nope does not exist"),
    C("prepare-tokenizer-text-file", "data prepare --tokenizer {text} --max-seq-len 64 --domain web={web} "
      "--out {w}/o", "text.txt is a file"),
    C("prepare-tokenizer-empty-folder", "data prepare --tokenizer {emptydir} --max-seq-len 64 --domain web={web} "
      "--out {w}/o", "is a folder without tokenizer files"),
    C("prepare-seq-len-0", "data prepare --tokenizer {tok} --max-seq-len 0 --domain web={web} --out {w}/o",
      "--max-seq-len must be >= 2"),
    C("prepare-seq-len-negative", "data prepare --tokenizer {tok} --max-seq-len -5 --domain web={web} --out {w}/o",
      "--max-seq-len must be >= 2"),
    C("prepare-seq-len-not-int", "data prepare --tokenizer {tok} --max-seq-len abc --domain web={web} --out {w}/o",
      "--max-seq-len", "invalid int value"),
    C("prepare-eval-fraction-1.5", f"{PREPARE} --eval-fraction 1.5 --out {{w}}/o", "--eval-fraction must be in [0, 1)"),
    C("prepare-eval-fraction-negative", f"{PREPARE} --eval-fraction -0.1 --out {{w}}/o",
      "--eval-fraction must be in [0, 1)"),
    C("prepare-eval-fraction-0-no-eval-domain", f"{PREPARE} --eval-fraction 0 --out {{w}}/o",
      "--eval-fraction 0 needs an --eval-domain"),
    C("prepare-max-tokens-0", f"{PREPARE} --max-tokens 0 --out {{w}}/o", "--max-tokens", ">= 1"),
    C("prepare-max-tokens-negative", f"{PREPARE} --max-tokens -1 --out {{w}}/o", "--max-tokens", ">= 1"),
    C("prepare-domain-named-eval-merge", "data prepare --tokenizer {tok} --max-seq-len 64 --domain eval_merge={web} "
      "--out {w}/o", "invalid domain name 'eval_merge'"),
    C("prepare-duplicate-domain", f"{PREPARE} --domain web={{web}} --out {{w}}/o", "--domain web given twice"),
    C("prepare-eval-domain-unknown", f"{PREPARE} --eval-domain code={{web}} --out {{w}}/o",
      "are not among the --domain names"),
    C("prepare-train-and-eval-only", f"{PREPARE} --eval-only-domain web={{web}} --out {{w}}/o",
      "both as training (--domain) and eval-only"),
    C("prepare-out-exists", f"{PREPARE} --out {{w}}/o", *OUT_EXISTS, setup=existing_dir("o")),
    C("prepare-out-under-file", f"{PREPARE} --out {{w}}/f/o", "f is a file", WRITABLE, setup=UNDER_FILE),
    C("prepare-out-read-only", f"{PREPARE} --out {RO}", WRITABLE, setup=readonly),
    # ---- data merge
    C("merge-input-missing", "data merge --input-dir {i}/nope --output-dir {w}/m --output-split all "
      "--split-names web", "is not an MDS folder"),
    C("merge-split-missing", f"{MERGE} --output-split all --split-names web nope", "nope", "is not an MDS folder"),
    C("merge-split-is-text-folder", "data merge --input-dir {i} --output-dir {w}/m --output-split all "
      "--split-names nodocs", "nodocs", "is not an MDS folder", setup=text_docs),
    C("merge-corrupt-index", "data merge --input-dir {i}/data/eval --output-dir {w}/m --output-split all "
      "--split-names web code", "index.json", "copy the folder again", setup=data_garbage_index),
    C("merge-output-exists", "data merge --input-dir {data}/eval --output-dir {w} --output-split all "
      "--split-names web code", *OUT_EXISTS, setup=existing_dir("all")),
    C("merge-output-under-file", "data merge --input-dir {data}/eval --output-dir {w}/f --output-split all "
      "--split-names web code", "f is a file", WRITABLE, setup=UNDER_FILE),
    C("merge-output-read-only", f"data merge --input-dir {{data}}/eval --output-dir {RO} --output-split all "
      "--split-names web code", WRITABLE, setup=readonly),
    C("merge-output-split-invalid", f"{MERGE} --output-split ../up --split-names web code", "--output-split",
      "'../up'"),
    # ---- convert hf-to-composer
    C("h2c-missing-folder", f"{H2C} {{i}}/nope {{w}}/m.pt", "not found", "hub:NAME"),
    C("h2c-bare-hub-name", f"{H2C} HuggingFaceTB/NoSuchModel-135M {{w}}/m.pt", "not found", "hub:NAME"),
    C("h2c-text-file", f"{H2C} {{text}} {{w}}/m.pt", "is a file, not a HF model folder"),
    C("h2c-empty-folder", f"{H2C} {{emptydir}} {{w}}/m.pt", "has no config.json"),
    C("h2c-garbage-config", f"{H2C} {{i}}/hf {{w}}/m.pt", "config.json is not valid JSON",
      setup=hf_config("{garbage")),
    C("h2c-config-not-object", f"{H2C} {{i}}/hf {{w}}/m.pt", "must hold a JSON object", setup=hf_config("[1, 2]")),
    C("h2c-config-unsupported-type", f"{H2C} {{i}}/hf {{w}}/m.pt", "bert", setup=hf_config_edit(model_type="bert")),
    C("h2c-config-missing-keys", f"{H2C} {{i}}/hf {{w}}/m.pt", "has no 'vocab_size'",
      setup=hf_config('{"model_type": "llama"}')),
    C("h2c-config-vocab-mismatch", f"{H2C} {{i}}/hf {{w}}/m.pt", "has shape [131, 64]", "[200, 64]",
      setup=hf_config_edit(vocab_size=200)),
    C("h2c-config-hidden-mismatch", f"{H2C} {{i}}/hf {{w}}/m.pt", "config.json implies",
      setup=hf_config_edit(hidden_size=32)),
    C("h2c-config-heads-0", f"{H2C} {{i}}/hf {{w}}/m.pt", "config.json", setup=hf_config_edit(num_attention_heads=0)),
    C("h2c-truncated-safetensors", f"{H2C} {{i}}/hf {{w}}/m.pt", "model.safetensors", "truncated or corrupted",
      setup=hf_truncated_weights),
    C("h2c-bit-flipped-safetensors", f"{H2C} {{i}}/hf {{w}}/m.pt", "model.safetensors is corrupted",
      setup=hf_flipped_weights),
    C("h2c-no-weights", f"{H2C} {{i}}/hf {{w}}/m.pt", "no *.safetensors", setup=hf_no_weights),
    C("h2c-missing-tensor", f"{H2C} {{i}}/hf {{w}}/m.pt", "missing keys", "blocks.1.mlp.up_proj.weight",
      setup=hf_missing_tensor),
    C("h2c-out-exists", f"{H2C} {{hf}} {{w}}/m.pt", *OUT_EXISTS, setup=existing_file("m.pt")),
    C("h2c-out-is-folder", f"{H2C} {{hf}} {{w}}/m.pt --overwrite", "is a folder", setup=existing_dir("m.pt")),
    C("h2c-out-under-file", f"{H2C} {{hf}} {{w}}/f/m.pt", "f is a file", WRITABLE, setup=UNDER_FILE),
    C("h2c-out-read-only", f"{H2C} {{hf}} {RO}.pt", WRITABLE, setup=readonly),
    C("h2c-hub-empty-name", f"{H2C} hub: {{w}}/m.pt", "names no repo"),
    # ---- convert composer-to-hf
    C("c2h-missing", "convert composer-to-hf {i}/nope.pt {w}/hf", "nope.pt does not exist"),
    C("c2h-empty-file", "convert composer-to-hf {empty} {w}/hf", "is not a PyTorch checkpoint"),
    C("c2h-text-file", "convert composer-to-hf {text} {w}/hf", "is not a PyTorch checkpoint"),
    C("c2h-folder", "convert composer-to-hf {emptydir} {w}/hf", "is a folder, not a checkpoint file"),
    C("c2h-truncated", "convert composer-to-hf {i}/model.pt {w}/hf", "is not a PyTorch checkpoint",
      setup=ckpt_truncated),
    C("c2h-bit-flipped", "convert composer-to-hf {i}/model.pt {w}/hf", "model.pt", "corrupted", setup=ckpt_flipped),
    C("c2h-unsafe-pickle", "convert composer-to-hf {pickle} {w}/hf", "--trust-pickle"),
    C("c2h-not-a-state-dict", "convert composer-to-hf {list} {w}/hf", "neither a Composer checkpoint"),
    C("c2h-no-config", "convert composer-to-hf {sheared} {w}/hf", "carries no model config"),
    C("c2h-override-not-pair", f"{C2H} {{w}}/hf hidden_size", "'hidden_size' is not key=value"),
    C("c2h-override-contradicts", f"{C2H} {{w}}/hf hidden_size=7", "contradict"),
    C("c2h-shard-size-0", f"{C2H} {{w}}/hf --max-shard-size 0", "--max-shard-size", "> 0"),
    C("c2h-shard-size-negative", f"{C2H} {{w}}/hf --max-shard-size -1", "--max-shard-size", "> 0"),
    C("c2h-tokenizer-missing", f"{C2H} {{w}}/hf --tokenizer {{i}}/nope", "nope does not exist"),
    C("c2h-tokenizer-no-files", f"{C2H} {{w}}/hf --tokenizer {{emptydir}}", "holds no tokenizer files"),
    C("c2h-out-exists", f"{C2H} {{w}}/hf", *OUT_EXISTS, setup=existing_dir("hf")),
    C("c2h-out-is-file", f"{C2H} {{w}}/hf --overwrite", "is a file", setup=existing_file("hf")),
    C("c2h-out-under-file", f"{C2H} {{w}}/f/hf", "f is a file", WRITABLE, setup=UNDER_FILE),
    C("c2h-out-read-only", f"{C2H} {RO}", WRITABLE, setup=readonly),
    C("c2h-pruning-checkpoint", "convert composer-to-hf {prune} {w}/hf", "drprune compact"),
    C("c2h-context-length-0", f"{C2H} {{w}}/hf --context-length 0", "--context-length=0 must be >= 1"),
    C("c2h-context-override-not-int", f"{C2H} {{w}}/hf max_position_embeddings=long", "must be a positive integer"),
    C("c2h-context-override-disagrees", f"{C2H} {{w}}/hf max_position_embeddings=4096 --context-length 8192",
      "disagree"),
    C("c2h-dtype-unknown", f"{C2H} {{w}}/hf --dtype fp8", "--dtype", "invalid choice"),
    C("c2h-dtype-override-unknown", f"{C2H} {{w}}/hf torch_dtype=fp8", "dtype 'fp8' is not one of"),
    C("c2h-dtype-override-disagrees", f"{C2H} {{w}}/hf torch_dtype=float16 --dtype bfloat16", "disagree"),
    # ---- convert gguf-to-hf
    C("g2h-missing", "convert gguf-to-hf {i}/nope.gguf {w}/hf", "nope.gguf does not exist"),
    C("g2h-empty", "convert gguf-to-hf {empty} {w}/hf", "is not a readable GGUF file"),
    C("g2h-text", "convert gguf-to-hf {text} {w}/hf", "is not a readable GGUF file"),
    C("g2h-folder", "convert gguf-to-hf {emptydir} {w}/hf", "is a folder, not a GGUF file"),
    C("g2h-unsupported-architecture", "convert gguf-to-hf {bert_gguf} {w}/hf", "'bert' is not supported"),
    C("g2h-out-exists", "convert gguf-to-hf {bert_gguf} {w}/hf", *OUT_EXISTS, setup=existing_dir("hf")),
    C("g2h-out-under-file", "convert gguf-to-hf {bert_gguf} {w}/f/hf", "f is a file", WRITABLE, setup=UNDER_FILE),
    # ---- convert hf-to-gguf
    C("h2g-missing", "convert hf-to-gguf {i}/nope {w}/m.gguf", "not found", "hub:NAME"),
    C("h2g-bad-dtype", "convert hf-to-gguf {hf} {w}/m.gguf --dtype q4", "--dtype 'q4' is not one of"),
    C("h2g-checkpoint-without-tokenizer", "convert hf-to-gguf {ckpt} {w}/m.gguf", "pass --tokenizer"),
    C("h2g-tokenizer-missing", "convert hf-to-gguf {ckpt} {w}/m.gguf --tokenizer {i}/nope", "nope"),
    C("h2g-word-level-tokenizer", "convert hf-to-gguf {hf} {w}/m.gguf", "byte-level BPE"),
    C("h2g-pythia", "convert hf-to-gguf {pythia} {w}/m.gguf", "pythia"),
    C("h2g-pruning-checkpoint", "convert hf-to-gguf {prune} {w}/m.gguf --tokenizer {tok}", "drprune compact"),
    C("h2g-text-file", "convert hf-to-gguf {text} {w}/m.gguf --tokenizer {tok}", "is not a PyTorch checkpoint"),
    C("h2g-out-exists", "convert hf-to-gguf {hf} {w}/m.gguf", *OUT_EXISTS, setup=existing_file("m.gguf")),
    C("h2g-out-under-file", "convert hf-to-gguf {hf} {w}/f/m.gguf", "f is a file", WRITABLE, setup=UNDER_FILE),
    # ---- compact
    C("compact-missing", "compact {i}/nope.pt --out {w}/c.pt", "nope.pt does not exist"),
    C("compact-empty", "compact {empty} --out {w}/c.pt", "is not a PyTorch checkpoint"),
    C("compact-text", "compact {text} --out {w}/c.pt", "is not a PyTorch checkpoint"),
    C("compact-folder", "compact {emptydir} --out {w}/c.pt", "is a folder, not a checkpoint file"),
    C("compact-truncated", "compact {i}/prune.pt --out {w}/c.pt", "is not a PyTorch checkpoint",
      setup=prune_truncated),
    C("compact-sharded-unfinished", "compact {i}/ep0-ba2 --out {w}/c.pt", "has no .metadata", "killed while saving",
      setup=sharded_unfinished),
    C("compact-no-mask-generator", "compact {plain_model} --out {w}/c.pt", "no mask generator"),
    C("compact-unsafe-pickle", "compact {pickle} --out {w}/c.pt", "--trust-pickle"),
    C("compact-tokenizer-without-hf", "compact {prune} --out {w}/c.pt --tokenizer {tok}", "add --hf DIR"),
    C("compact-tokenizer-not-folder", "compact {prune} --out {w}/c.pt --hf {w}/hf --tokenizer {text}",
      "is not a folder"),
    C("compact-hf-exists", "compact {prune} --out {w}/c.pt --hf {w}/hf", *OUT_EXISTS, setup=existing_dir("hf")),
    C("compact-out-exists", "compact {prune} --out {w}/c.pt", *OUT_EXISTS, setup=existing_file("c.pt")),
    C("compact-out-under-file", "compact {prune} --out {w}/f/c.pt", "f is a file", WRITABLE, setup=UNDER_FILE),
    C("compact-hf-under-file", "compact {prune} --out {w}/c.pt --hf {w}/f/hf", "f is a file", WRITABLE,
      setup=UNDER_FILE),
    C("compact-out-read-only", f"compact {{prune}} --out {RO}.pt", WRITABLE, setup=readonly),
    C("compact-dtype-without-hf", "compact {prune} --out {w}/c.pt --dtype bfloat16", "add --hf DIR"),
    C("compact-context-length-without-hf", "compact {prune} --out {w}/c.pt --context-length 8192", "add --hf DIR"),
    C("compact-context-length-0", "compact {prune} --out {w}/c.pt --hf {w}/hf --context-length 0",
      "--context-length=0 must be >= 1"),
    C("compact-dtype-unknown", "compact {prune} --out {w}/c.pt --hf {w}/hf --dtype half", "invalid choice"),
    C("compact-out-is-input", "compact {i}/prune.pt --out {i}/prune.pt --overwrite", "is the input checkpoint",
      setup=lambda world, i, w: _copy(world, i, "prune")),
    # ---- eval (perplexity)
    C("eval-model-missing", "eval {i}/nope --data {data}", "not found", "hub:NAME"),
    C("eval-bare-hub-name", "eval HuggingFaceTB/NoSuchModel-135M --data {data}", "not found", "hub:NAME"),
    C("eval-model-text", "eval {text} --data {data}", "is not a PyTorch checkpoint"),
    C("eval-model-empty-folder", "eval {emptydir} --data {data}", "has no config.json"),
    C("eval-no-data", "eval {hf}", "--data is required"),
    C("eval-data-missing", "eval {hf} --data {i}/nope", "does not exist"),
    C("eval-data-is-file", "eval {hf} --data {text}", "text.txt is a file"),
    C("eval-batch-size-0", f"{EVAL} --batch-size 0", "--batch-size=0 must be >= 1"),
    C("eval-max-rows-0", f"{EVAL} --max-rows 0", "--max-rows=0 must be >= 1"),
    C("eval-bootstrap-0", f"{EVAL} --bootstrap 0", "--bootstrap=0 must be >= 1"),
    C("eval-copy-span-1", f"{EVAL} --copy-span 1", "--copy-span=1 must be >= 2"),
    C("eval-seed-negative", f"{EVAL} --seed -3", "--seed=-3 must be >= 0"),
    C("eval-batch-size-not-int", f"{EVAL} --batch-size x", "--batch-size", "invalid int value"),
    C("eval-unknown-domain", f"{EVAL} --domains web nope", "nope"),
    C("eval-unknown-split", f"{EVAL} --split nope", "does not exist"),
    C("eval-tokenizer-mismatch", "eval {hf_b} --data {data}", "was prepared with tokenizer"),
    C("eval-vocab-mismatch", "eval {small_vocab} --data {data}", "larger than the model's vocab_size 64"),
    C("eval-ids-beyond-vocab", "eval {hf} --data {big}", "beyond the model's vocab"),
    C("eval-flipped-shard", "eval {hf} --data {i}/data", "shard", "is corrupted", setup=flipped_shard("eval/web")),
    C("eval-garbage-index", "eval {hf} --data {i}/data", "index.json", "copy the folder again",
      setup=data_garbage_index),
    C("eval-garbage-domains-json", "eval {hf} --data {i}/data", "domains.json is corrupted",
      setup=data_garbage_domains),
    C("eval-json-under-file", f"{EVAL} --json {{w}}/f/r.json", "f is a file", WRITABLE, setup=UNDER_FILE),
    C("eval-json-is-folder", f"{EVAL} --json {{w}}/r.json --overwrite", "is a folder", setup=existing_dir("r.json")),
    C("eval-json-exists", f"{EVAL} --json {{w}}/r.json", *OUT_EXISTS, setup=existing_file("r.json")),
    C("eval-json-read-only", f"{EVAL} --json {RO}.json", WRITABLE, setup=readonly),
    C("eval-device-unknown", f"{EVAL} --device tpu", "--device 'tpu' is not a device"),
    C("eval-device-unsupported", f"{EVAL} --device mps", "--device mps is not supported"),
    C("eval-dtype-unknown", f"{EVAL} --dtype fp8", "--dtype", "invalid choice"),
    *([] if torch.cuda.is_available() else [  # where torch sees no GPU
        C("eval-device-cuda-without-cuda", f"{EVAL} --device cuda", "no CUDA device", "--device cpu"),
        C("layers-device-cuda-without-cuda", f"{LAYERS} --out {{w}}/o --device cuda", "no CUDA device"),
        C("tasks-device-cuda-without-cuda", "eval {hf} --tasks drprune_copy --data {data} --device cuda",
          "no CUDA device")]),
    # ---- eval --tasks
    C("tasks-empty", "eval {hf} --tasks ,", "names no task"),
    C("tasks-unknown", "eval {hf} --tasks no_such_task", "unknown task(s) no_such_task"),
    C("tasks-local-without-data", "eval {hf} --tasks drprune_copy", "pass --data"),
    C("tasks-checkpoint-without-tokenizer", "eval {ckpt} --tasks drprune_copy --data {data}", "pass --tokenizer"),
    C("tasks-tokenizer-no-files", "eval {hf} --tasks drprune_copy --data {data} --tokenizer {emptydir}",
      "holds no tokenizer files"),
    C("tasks-standard-offline", "eval {hf} --tasks arc_easy", "HF_HUB_OFFLINE"),
    C("tasks-rows-0", "eval {hf} --tasks drprune_copy --data {data} --task-rows 0", "--task-rows=0 must be >= 1"),
    C("tasks-limit-0", "eval {hf} --tasks drprune_copy --data {data} --limit 0", "--limit=0 must be >= 1"),
    C("tasks-json-under-file", "eval {hf} --tasks drprune_copy --data {data} --json {w}/f/r.json", "f is a file",
      WRITABLE, setup=UNDER_FILE),
    # ---- oneshot
    C("layers-model-missing", "oneshot layers {i}/nope --num-blocks-to-prune 1 --calib {data} --out {w}/o",
      "does not exist", "hub:NAME"),
    C("layers-bare-hub-name", "oneshot layers HuggingFaceTB/NoSuchModel-135M --num-blocks-to-prune 1 --calib {data} "
      "--out {w}/o", "does not exist", "hub:NAME"),
    C("layers-model-text", "oneshot layers {text} --num-blocks-to-prune 1 --calib {data} --out {w}/o",
      "is not a PyTorch checkpoint"),
    C("layers-no-out", f"{LAYERS}", "needs --out"),
    C("layers-blocks-0", "oneshot layers {hf} --num-blocks-to-prune 0 --calib {data} --out {w}/o",
      "num_blocks_to_prune=0 must be in 1..2"),
    C("layers-blocks-too-many", "oneshot layers {hf} --num-blocks-to-prune 5 --calib {data} --out {w}/o",
      "num_blocks_to_prune=5 must be in 1..2 for a 3-block model"),
    C("layers-bad-method", f"{LAYERS} --pruning-method foo --out {{w}}/o", "foo"),
    C("layers-calib-missing", "oneshot layers {hf} --num-blocks-to-prune 1 --calib {i}/nope --out {w}/o",
      "does not exist"),
    C("layers-no-calib", "oneshot layers {hf} --num-blocks-to-prune 1 --out {w}/o", "--calib"),
    C("layers-batch-size-0", f"{LAYERS} --batch-size 0 --out {{w}}/o", "--batch-size=0 must be an integer >= 1"),
    C("layers-max-rows-0", f"{LAYERS} --max-rows 0 --out {{w}}/o", "--max-rows=0 must be an integer >= 1"),
    C("layers-tokenizer-mismatch", "oneshot layers {hf_b} --num-blocks-to-prune 1 --calib {data} --out {w}/o",
      "was prepared with tokenizer"),
    C("layers-ids-beyond-vocab", "oneshot layers {hf} --num-blocks-to-prune 1 --calib {big} --out {w}/o",
      "beyond the model's vocab_size"),
    C("layers-truncated-calib", "oneshot layers {hf} --num-blocks-to-prune 1 --calib {i}/data --out {w}/o",
      "is incomplete", "shard.00000.mds", setup=data_truncated_shard),
    C("layers-device-unknown", f"{LAYERS} --out {{w}}/o --device tpu", "is not a device"),
    C("layers-dtype-from-config-unknown", f"{LAYERS} --config {{i}}/dtype.yaml --out {{w}}/o", "--dtype 'half'",
      setup=config_files),
    C("layers-config-missing", f"{LAYERS} --config {{i}}/nope.yaml --out {{w}}/o", "nope.yaml does not exist"),
    C("layers-config-broken", f"{LAYERS} --config {{i}}/broken.yaml --out {{w}}/o", "cannot parse", "fix the file",
      setup=config_files),
    C("layers-config-list", f"{LAYERS} --config {{i}}/list.yaml --out {{w}}/o", "must hold a mapping",
      setup=config_files),
    C("layers-config-unknown-key", f"{LAYERS} --config {{i}}/unknown.yaml --out {{w}}/o", "unknown key 'num_blocks'",
      setup=config_files),
    C("layers-out-exists", f"{LAYERS} --out {{w}}/o", *OUT_EXISTS, setup=existing_dir("o")),
    C("layers-out-under-file", f"{LAYERS} --out {{w}}/f/o", "f is a file", WRITABLE, setup=UNDER_FILE),
    C("layers-out-read-only", f"{LAYERS} --out {RO}", WRITABLE, setup=readonly),
    C("layers-eval-data-missing", f"{LAYERS} --eval-data {{i}}/nope --out {{w}}/o", "nope"),
    C("width-hidden-larger", f"{WIDTH} --hidden-size 65 --out {{w}}/o", "larger than the source"),
    C("width-kv-heads-0", f"{WIDTH} --num-key-value-heads 0 --out {{w}}/o",
      "--num-key-value-heads=0 must be an integer >= 1"),
    C("width-heads-not-group", f"{WIDTH} --num-attention-heads 3 --num-key-value-heads 2 --out {{w}}/o",
      "num_attention_heads"),
    C("width-intermediate-0", f"{WIDTH} --intermediate-size 0 --out {{w}}/o", "--intermediate-size=0"),
    C("width-ratio-1.5", f"{WIDTH} --pruning-ratio 1.5 --out {{w}}/o", "strictly between 0 and 1"),
    C("width-ratio-negative", f"{WIDTH} --pruning-ratio -0.2 --out {{w}}/o", "strictly between 0 and 1"),
    C("width-bad-importance", f"{WIDTH[:-3]} foo --hidden-size 32 --out {{w}}/o", "foo"),
    C("width-taylor-without-calib", "oneshot width {hf} --importance taylor --hidden-size 32 --out {w}/o",
      "pass --calib"),
    C("width-drop-layers-out-of-range", f"{WIDTH} --drop-layers 7 --out {{w}}/o", "drop_layers entry 7"),
    C("vocab-keep-0", "oneshot vocab {hf} --keep 0 --calib {data} --tokenizer {tok} --out {w}/o", "--keep=0"),
    C("vocab-no-tokenizer-for-mds", "oneshot vocab {pythia} --keep 8 --calib {data} --out {w}/o", "pass --tokenizer"),
    C("vocab-wordpiece", f"{VOCAB_} --tokenizer {{wp}} --out {{w}}/o", "not supported"),
    C("vocab-seq-len-0", "oneshot vocab {hf} --keep 8 --calib {i}/docs.txt --seq-len 0 --out {w}/o", "--seq-len=0",
      setup=text_docs),
    # ---- demo (options only: every case fails in the preflight, before anything is built)
    C("demo-steps-0", f"{DEMO} --steps 0", "--steps must be >= 1"),
    C("demo-prune-steps-too-many", f"{DEMO} --steps 3 --prune-steps 5", "--prune-steps must be in [1, --steps)"),
    C("demo-kd-1.5", f"{DEMO} --kd 1.5", "--kd", "[0, 1]"),
    C("demo-seq-len-2", f"{DEMO} --seq-len 2", "--seq-len must be >= 4"),
    C("demo-batch-size-0", f"{DEMO} --batch-size 0", "--batch-size must be >= 1"),
    C("demo-eval-rows-0", f"{DEMO} --eval-rows 0", "--eval-rows must be >= 1"),
    C("demo-source-layers-0", f"{DEMO} --source-layers 0", "--source-layers must be >= 1"),
    C("demo-target-unknown-key", f"{DEMO} --target n_blocks=3", "--target keys ['n_blocks'] are unknown"),
    C("demo-target-not-integer", f"{DEMO} --target n_layers=abc", "'n_layers=abc' is not key=integer"),
    C("demo-gguf-missing", "demo --gguf {i}/nope.gguf --out {w}/demo", "nope.gguf does not exist"),
    C("demo-corpus-missing", f"{DEMO} --corpus {{i}}/nope.yaml", "nope.yaml does not exist"),
    C("demo-corpus-broken", f"{DEMO} --corpus {{corpus_bad}}", "corpus_bad.yaml"),
    C("demo-out-is-file", "demo --gguf {bert_gguf} --out {w}/demo", "exists and is not a folder",
      setup=existing_file("demo")),
    C("demo-tasks-unknown", f"{DEMO} --tasks no_such_task", "unknown task(s) no_such_task"),
    # ---- training: python -m drprune.train CONFIG overrides (the tiny config plus TRAIN)
    C("train-config-missing", "{i}/nope.yaml", "nope.yaml does not exist", kind="train-raw"),
    C("train-config-folder", "{emptydir}", "is a folder, not a config file", kind="train-raw"),
    C("train-config-broken-yaml", "{i}/broken.yaml", "broken.yaml", "YAML", setup=config_files, kind="train-raw"),
    C("train-config-list", "{i}/list.yaml", "list.yaml", "mapping", setup=config_files, kind="train-raw"),
    C("train-config-empty", "{i}/empty.yaml", "empty.yaml", "empty", setup=config_files, kind="train-raw"),
    C("train-config-self-base", "{i}/self.yaml", "includes itself", setup=config_files, kind="train-raw"),
    C("train-config-base-missing", "{i}/nobase.yaml", "`base: missing.yaml`", setup=config_files,
      kind="train-raw"),
    C("train-no-arguments", "", "CONFIG.yaml", kind="train-raw"),
    C("train-stray-quote", "max_duration='20ba", "max_duration='20ba", "quote", kind="train"),
    C("train-override-not-pair", "max_duration", "'max_duration' is not key=value", kind="train"),
    C("train-delete-missing-key", "~model.no_such_key", "has no key model.no_such_key", kind="train"),
    C("train-typo-top-level-key", "max_duraton=20ba", "max_duraton", "max_duration", kind="train"),
    C("train-typo-top-level-key-2", "save_intervall=10ba", "save_intervall", "save_interval", kind="train"),
    C("train-bogus-precision", "precision=fp13", "precision='fp13'", "amp_bf16", kind="train"),
    C("train-max-duration-abc", "max_duration=abc", "max_duration='abc'", "20ba", kind="train"),
    C("train-max-duration-epochs-dynamic", "max_duration=2ep", "has no epochs", kind="train"),
    C("train-eval-interval-abc", "eval_interval=abc", "eval_interval='abc'", kind="train"),
    C("train-batch-size-0", "global_train_batch_size=0", "global_train_batch_size=0", "positive", kind="train"),
    C("train-batch-size-negative", "global_train_batch_size=-4", "global_train_batch_size=-4", kind="train"),
    C("train-microbatch-0", "device_train_microbatch_size=0", "device_train_microbatch_size=0", kind="train"),
    C("train-seed-abc", "seed=abc", "seed='abc'", kind="train"),
    C("train-max-seq-len-0", "max_seq_len=0", "max_seq_len=0 must be an integer >= 1", kind="train"),
    C("train-max-seq-len-beyond-data", "max_seq_len=128", "holds 64-token sequences", kind="train"),
    C("train-model-seq-differs-from-data", "model.max_seq_len=32", "model.max_seq_len=32", "max_seq_len=64",
      "model.context_length", kind="train"),
    C("train-context-shorter-than-data", "model.context_length=32", "max_seq_len=64", "context length 32",
      "model.context_length=64", kind="train"),
    C("train-context-length-0", "model.context_length=0", "model.context_length=0", kind="train"),
    C("train-n-kv-heads-0", "model.n_kv_heads=0", "model.n_kv_heads=0", kind="train"),
    C("train-vocab-negative", "model.vocab_size=-1", "model.vocab_size=-1", kind="train"),
    C("train-heads-not-dividing", "model.n_heads=3", "not divisible", kind="train"),
    C("train-unknown-model-key", "model.n_layer=3", "n_layer", kind="train"),
    C("train-data-local-missing", "data_local={i}/nope", "is not a folder", kind="train"),
    C("train-data-local-file", "data_local={text}", "is not a folder", kind="train"),
    C("train-set-name-without-folder", "callbacks.data_loading.set_names=[web,nope]", "['nope'] have no folder",
      kind="train"),
    C("train-set-names-miss-eval-merge-domain", "callbacks.data_loading.set_names=[web]", "['code']",
      "add them to set_names",
      kind="train"),
    C("train-set-names-duplicate", "callbacks.data_loading.set_names=[web,web]", "has duplicates", kind="train"),
    C("train-proportion-sum", "callbacks.data_loading.proportion=[0.5,0.6]", "must sum to 1", kind="train"),
    C("train-proportion-negative", "callbacks.data_loading.proportion=[1.5,-0.5]", "non-negative", kind="train"),
    C("train-proportion-length", "callbacks.data_loading.proportion=[1.0]", "has 1 entries but set_names has 2",
      kind="train"),
    C("train-proportion-not-numbers", "callbacks.data_loading.proportion=[a,b]",
      "proportion[0]='a' must be a finite number", kind="train"),
    C("train-reference-loss-length",
      "callbacks.data_loading.update_type=dro callbacks.data_loading.reference_loss=[2.0]",
      "reference_loss has 1 values for 2 domains", kind="train"),
    C("train-reference-loss-missing", "callbacks.data_loading.update_type=dro", "reference_loss is required",
      kind="train"),
    C("train-rho-negative", "callbacks.data_loading.update_type=dro callbacks.data_loading.reference_loss=[2,2] "
      "callbacks.data_loading.rho=-1", "rho=-1", kind="train"),
    C("train-min-prob-1.5", "callbacks.data_loading.update_type=dro callbacks.data_loading.reference_loss=[2,2] "
      "callbacks.data_loading.min_prob=1.5", "min_prob=1.5", kind="train"),
    C("train-ema-2", "callbacks.data_loading.update_type=dro callbacks.data_loading.reference_loss=[2,2] "
      "callbacks.data_loading.ema=2", "ema=2", kind="train"),
    C("train-update-type-bogus", "callbacks.data_loading.update_type=bogus", "bogus", kind="train"),
    C("train-dynamic-not-bool", "callbacks.data_loading.dynamic=maybe", "dynamic='maybe' must be true or false",
      kind="train"),
    C("train-unknown-callback", "callbacks.no_such_cb={}", "callbacks.no_such_cb is unknown", kind="train"),
    C("train-unknown-logger", "loggers.wandbb={}", "did you mean loggers.wandb", kind="train"),
    C("train-target-heads-not-group", "model.mask_generator.target_model.n_heads=3", "whole number of GQA groups",
      kind="train"),
    C("train-target-larger", "model.mask_generator.target_model.d_model=512", "larger than the source", kind="train"),
    C("train-target-layers-0", "model.mask_generator.target_model.n_layers=0", "must be a positive integer",
      kind="train"),
    C("train-unknown-pruning-module", "model.mask_generator.pruning_modules=[head,attention]", "unknown modules",
      kind="train"),
    C("train-unknown-mask-generator", "model.mask_generator.name=foo", "name='foo' is unknown", kind="train"),
    C("train-model-path-missing", "model.path={i}/nope.pt", "nope.pt does not exist", kind="train"),
    C("train-model-path-text", "model.path={text}", "is not a PyTorch checkpoint", kind="train"),
    C("train-model-path-folder", "model.path={emptydir}", "is a folder, not a checkpoint file", kind="train"),
    C("train-model-path-truncated", "model.path={i}/model.pt", "is not a PyTorch checkpoint", setup=ckpt_truncated,
      kind="train"),
    C("train-model-path-unsafe-pickle", "model.path={pickle}", "trust_pickle", kind="train"),
    C("train-trust-pickle-not-bool", "trust_pickle=maybe model.path={ckpt}", "trust_pickle='maybe'", kind="train"),
    C("train-load-path-missing", "load_path={i}/nope.pt", "load_path", "nope.pt does not exist", kind="train"),
    C("train-load-path-truncated", "load_path={i}/model.pt", "load_path", "not a complete checkpoint",
      setup=ckpt_truncated, kind="train"),
    C("train-load-path-sharded-unfinished", "load_path={i}/ep0-ba2", "load_path", "has no .metadata",
      setup=sharded_unfinished, kind="train"),
    C("train-load-path-sharded-into-ddp", "load_path={i}/ep0-ba2", "is a sharded checkpoint folder",
      "fsdp_config.state_dict_type=sharded", setup=sharded_whole, kind="train"),
    C("train-model-path-sharded-unfinished", "model.path={i}/ep0-ba2", "has no .metadata", setup=sharded_unfinished,
      kind="train"),
    C("train-save-folder-under-file", "save_folder={w}/f/run", "f", WRITABLE, setup=UNDER_FILE, kind="train"),
    C("train-save-folder-read-only", "save_folder={w}/ro/run", WRITABLE, setup=readonly, kind="train"),
    C("train-save-folder-has-checkpoints", "", "already holds checkpoints", "autoresume=true",
      setup=save_folder_with_checkpoint, kind="train"),
    C("train-tokenizer-mismatch", "tokenizer={tok_b}", "was prepared with tokenizer", kind="train"),
    C("train-tokenizer-missing", "tokenizer={i}/nope", "nope does not exist", kind="train"),
    C("train-vocab-smaller-than-data", "model.vocab_size=64", "larger than the model's vocab_size 64", kind="train"),
    C("train-ids-beyond-vocab", "data_local={big}", "beyond the model's vocab_size", kind="train"),
    C("train-flipped-shard", "data_local={i}/data", "shard", "is corrupted", setup=flipped_shard("train/code"),
      kind="train"),
    C("train-truncated-shard", "data_local={i}/data", "shard", "truncated or corrupted", setup=data_truncated_shard,
      kind="train"),
    C("train-eval-split-missing", "eval_loader.dataset.split=nope", "no MDS data", kind="train"),
    C("train-optimizer-unknown", "optimizer.name=adam", "optimizer.name='adam' must be one of 'decoupled_adamw'",
      kind="train"),
    C("train-scheduler-unknown", "scheduler.name=foo", "scheduler.name='foo' is unknown", kind="train"),
    C("train-typo-top", "max_duraton=3ba", "max_duraton", "did you mean max_duration?", kind="train"),
    C("train-typo-loader", "train_loader.num_worker=1", "did you mean train_loader.num_workers?", kind="train"),
    C("train-typo-dataset", "eval_loader.dataset.shufle=true", "did you mean eval_loader.dataset.shuffle?",
      kind="train"),
    C("train-typo-mixture", "callbacks.data_loading.rhoo=0.2", "did you mean callbacks.data_loading.rho?",
      kind="train"),
    C("train-typo-optimizer", "optimizer.lrr=1e-3", "did you mean optimizer.lr?", kind="train"),
    C("train-typo-clipping", "algorithms.gradient_clipping.clipping_treshold=1",
      "did you mean algorithms.gradient_clipping.clipping_threshold?", kind="train"),
    C("train-typo-model", "model.n_layer=2", "did you mean model.n_layers?", kind="train"),
    C("train-typo-mask-generator", "model.mask_generator.droprate=0.1",
      "did you mean model.mask_generator.droprate_init?", kind="train"),
    C("train-typo-target", "model.mask_generator.target_model.n_head=2",
      "did you mean model.mask_generator.target_model.n_heads?", kind="train"),
    C("train-typo-fsdp", "fsdp_config.sharding_strateg=FULL_SHARD", "did you mean fsdp_config.sharding_strategy?",
      kind="train"),
    C("train-typo-scheduler-option", "scheduler.t_warmpu=1ba", "t_warmpu", "composer.optim", kind="train"),
    C("train-typo-callback-option", "callbacks.speed_monitor.window=3", "callbacks.speed_monitor", "window",
      kind="train"),
    C("train-betas-length", "optimizer.betas=[0.9]", "optimizer.betas=[0.9] must have 2 values", kind="train"),
    C("train-distillation-weight", "distillation.teacher={ckpt} distillation.kl_weight=2", "outside [0, 1]",
      kind="train"),
    C("train-num-workers-negative", "train_loader.num_workers=-1", "num_workers=-1", kind="train"),
]


# ---------------------------------------------------------------- running a case

def _fill(text: str, paths: dict[str, str]) -> list[str]:
    return [re.sub(r"\{(\w+)\}", lambda m: paths.get(m[1], m[0]), part) for part in text.split()]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under `folder` (hidden ones too); files with their size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
            for p in sorted(folder.rglob("*"))}


def _run(kind: str, argv: list[str]) -> int:
    if kind == "cli":
        try:
            return drprune(argv)
        except SystemExit as exc:  # argparse: bad flag values
            return exc.code
    from drprune.train import main as train

    return train(argv)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world, tmp_path, capsys):
    inputs, work = tmp_path / "in", tmp_path / "work"
    inputs.mkdir()
    work.mkdir()
    if case.setup is not None:
        case.setup(world, inputs, work)
    paths = {**world, "i": str(inputs), "w": str(work)}
    argv = _fill(case.argv, paths)
    if case.kind == "train":
        argv = [TINY, *_fill(TRAIN, paths), *argv]
    before = _snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = _run(case.kind, argv)
        err = capsys.readouterr().err
    finally:
        if (work / "ro").is_dir():
            (work / "ro").chmod(stat.S_IRWXU)
    lines = [line for line in err.splitlines() if line.startswith("drprune: error:")]
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    for needle in case.needles:
        assert needle in lines[0], lines[0]
    assert _snapshot(tmp_path) == before, "output or temp files left behind"


# ---------------------------------------------------------------- the matrix is not vacuous

def test_the_matrix_is_large_and_its_inputs_are_valid_otherwise(world, tmp_path, capsys):
    """The same fixtures succeed when nothing is wrong, so every case above fails for its own reason."""
    from drprune.train import build_trainer, load_config

    assert len(CASES) >= 120 and len({c.id for c in CASES}) == len(CASES)
    assert drprune(["eval", world["hf"], "--data", world["data"], "--bootstrap", "10",
                    "--json", str(tmp_path / "r.json")]) == 0
    assert sorted(json.loads((tmp_path / "r.json").read_text())["domains"]) == ["code", "web"]
    assert drprune(["compact", world["prune"], "--out", str(tmp_path / "c.pt")]) == 0
    assert load_model_state(tmp_path / "c.pt")["model.transformer.wte.weight"].shape == (CFG.vocab_size, 24)
    assert drprune(["convert", "composer-to-hf", world["ckpt"], str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == VOCAB
    trainer = build_trainer(load_config(TINY, _fill(TRAIN, {"data": world["data"], "w": str(tmp_path)})))
    assert trainer.state.model.model.cfg.vocab_size == VOCAB and trainer.state.model.set_names == ["web", "code"]
    trainer.close()


def test_the_module_entry_point_reports_one_line(world, tmp_path):
    """`python -m drprune.train` in its own process: exit code 2 and one error line, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "drprune.train", TINY, *_fill(TRAIN, {**world, "w": str(tmp_path)}),
                           "max_duraton=20ba"], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("drprune: error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and "max_duration" in lines[0]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- every shipped run config loads

RUN_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                     if p.parent.name not in ("eval_tasks", "oneshot") and p.name != "corpus.yaml")


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_shipped_run_configs_pass_the_key_check(path):
    from omegaconf import OmegaConf

    from drprune.run_config import RunConfig
    from drprune.train import load_config

    cfg = load_config(str(path), [])
    for key in OmegaConf.missing_keys(cfg):  # ??? values are the user's to give: check every value given
        parent, _, leaf = key.rpartition(".")
        del (OmegaConf.select(cfg, parent) if parent else cfg)[leaf]
    for key in RunConfig.REQUIRED:
        cfg.setdefault(key, 1)
    run = RunConfig.from_cfg(cfg)
    if run.model.shape.get("context_length") is not None:
        run.check_model_fits_data(run.model.shape["context_length"])
