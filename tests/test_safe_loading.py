"""Safe loading: no checkpoint runs code unless --trust-pickle, checksums catch bit flips, the hub only on
request (`hub:NAME`), remote code only when it is byte for byte drprune's own."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
import shlex
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from drprune.cli import main as drprune
from drprune.compact.export import export_hf, runs_only_drprune_code
from drprune.convert.checkpoint import (decoder_checkpoint_state, load_model_state, save_checkpoint,
                                        write_hf_folder)
from drprune.convert.integrity import FOLDER_CHECKSUMS_FILE
from drprune.data.testing import write_synthetic_mds
from drprune.errors import UserError
from drprune.models.config import LayerSpec, ModelConfig
from tests.test_compact import random_decoder
from tests.test_compact_cli import CFG, pruning_lm
from tests.conftest import random_hf_model

ROOT = Path(__file__).resolve().parents[1]


class RunsCode:
    """Unpickling this calls os.system (here: writes a marker file), as a hostile published checkpoint could."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo ran > {shlex.quote(str(self.marker))}",)


def hostile(path: Path, state: dict, marker: Path) -> str:
    torch.save({"state": {"model": state}, "extra": RunsCode(marker)}, path)
    return str(path)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = drprune(argv)
    return rc, capsys.readouterr().err


def member_offset(path: Path, suffix: str) -> int:
    """Byte offset of a stored (uncompressed) zip member's data, e.g. a tensor storage of a torch.save file."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    head = path.read_bytes()[info.header_offset:info.header_offset + 30]
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


def llama_folder(tmp_path: Path) -> Path:
    random_hf_model("llama").save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- pickles that run code

@pytest.mark.parametrize("command", ["compact", "composer-to-hf"])
def test_code_in_a_checkpoint_never_runs_without_trust_pickle(tmp_path, capsys, command):
    marker = tmp_path / "marker"
    if command == "compact":
        ckpt = hostile(tmp_path / "in.pt", pruning_lm().state_dict(), marker)
        argv, out = ["compact", ckpt, "--out", str(tmp_path / "out.pt")], tmp_path / "out.pt"
    else:
        ckpt = hostile(tmp_path / "in.pt", decoder_checkpoint_state(random_decoder(CFG)), marker)
        argv, out = ["convert", "composer-to-hf", ckpt, str(tmp_path / "hf")], tmp_path / "hf"
    rc, err = run_cli(argv, capsys)
    assert rc == 2 and not marker.exists() and not out.exists()
    assert err.startswith("drprune: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "--trust-pickle" in err and "posix.system" in err and "arbitrary code" in err

    rc, _ = run_cli([*argv, "--trust-pickle"], capsys)  # the one way to allow it: the payload runs, the file loads
    assert rc == 0 and marker.read_text() == "ran\n" and out.exists()


def test_eval_oneshot_and_run_config_refuse_code_too(tmp_path, capsys):
    marker = tmp_path / "marker"
    ckpt = hostile(tmp_path / "in.pt", decoder_checkpoint_state(random_decoder(CFG)), marker)
    data = write_synthetic_mds(tmp_path / "mds", {"a": "random"}, seq_len=16, vocab_size=97, n_train=24, n_eval=4)
    for argv in (["eval", ckpt, "--data", str(data)],
                 ["oneshot", "layers", ckpt, "--num-blocks-to-prune", "1", "--calib", str(data),
                  "--out", str(tmp_path / "os")]):
        rc, err = run_cli(argv, capsys)
        assert rc == 2 and "--trust-pickle" in err and not marker.exists(), argv
    rc, _ = run_cli(["eval", ckpt, "--data", str(data), "--trust-pickle", "--bootstrap", "10"], capsys)
    assert rc == 0 and marker.exists()
    marker.unlink()

    from drprune.train import main as train

    args = [str(ROOT / "configs/tiny/continue_pretrain.yaml"), f"model.path={ckpt}", f"data_local={data}",
            "callbacks.data_loading.set_names=[a]", f"save_folder={tmp_path / 'run'}", "max_seq_len=16",
            "model.max_seq_len=16", "max_duration=1ba", "eval_interval=1ba", "save_interval=1ba",
            "loggers.inmemory={}"]
    assert train(args) == 2
    err = capsys.readouterr().err
    assert "trust_pickle: true" in err and not marker.exists()
    assert train([*args, "trust_pickle=true"]) == 0 and marker.exists()


def test_own_checkpoints_need_no_pickle_and_composer_training_state_is_allowed(tmp_path, capsys):
    own = save_checkpoint(decoder_checkpoint_state(random_decoder(CFG)), tmp_path / "own.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(own) == []  # tensors, containers, plain values
    torch.load(own, weights_only=True)

    # What a Composer training checkpoint holds besides the model: RNG states (numpy arrays), a timedelta,
    # torch's version string. drprune allow-lists exactly those plain types.
    lm = pruning_lm()
    run = tmp_path / "latest-rank0.pt"
    torch.save({"state": {"model": lm.state_dict(), "timestamp": {"batch": 4, "wct": datetime.timedelta(seconds=3)},
                          "metadata": {"torch": torch.__version__}},
                "rng": [{"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}]},
               run)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(run)
    assert "numpy.ndarray" in unsafe and "datetime.timedelta" in unsafe
    rc, err = run_cli(["compact", str(run), "--out", str(tmp_path / "small.pt")], capsys)
    assert rc == 0, err


@pytest.mark.parametrize("content,message", [(b"", "not a PyTorch checkpoint"),
                                             (b"hello, I am text\n", "not a PyTorch checkpoint")])
def test_empty_or_text_file_is_named_as_not_a_checkpoint(tmp_path, capsys, content, message):
    (tmp_path / "x.pt").write_bytes(content)
    rc, err = run_cli(["convert", "composer-to-hf", str(tmp_path / "x.pt"), str(tmp_path / "hf")], capsys)
    assert rc == 2 and message in err and "mmap" not in err


# ---------------------------------------------------------------- checksums

def test_a_bit_flip_in_a_checkpoint_tensor_is_named(tmp_path, capsys):
    ckpt = save_checkpoint(decoder_checkpoint_state(random_decoder(CFG)), tmp_path / "m.pt")
    good = load_model_state(ckpt)
    assert len([v for v in good.values() if torch.is_tensor(v)]) > 10
    flip(ckpt, member_offset(ckpt, "data/3") + 7)
    with pytest.raises(UserError, match=r"tensor model\.transformer\.\S+ does not match the sha256"):
        load_model_state(ckpt)
    rc, err = run_cli(["convert", "composer-to-hf", str(ckpt), str(tmp_path / "hf")], capsys)
    assert rc == 2 and f"checkpoint {ckpt} is corrupted: tensor model.transformer." in err
    assert not (tmp_path / "hf").exists()


def test_a_changed_config_in_a_checkpoint_is_caught(tmp_path):
    ckpt = save_checkpoint(decoder_checkpoint_state(random_decoder(CFG)), tmp_path / "m.pt")
    obj = torch.load(ckpt, weights_only=True)
    obj["state"]["model"]["model._extra_state"]["model_config"]["n_layers"] = 3  # the checksums stay the old ones
    torch.save(obj, ckpt)
    with pytest.raises(UserError, match=r"its config \(non-tensor entries\) does not match"):
        load_model_state(ckpt)


def test_hf_folder_checksums_cover_every_shard_and_catch_a_flip(tmp_path, capsys):
    decoder = random_decoder(CFG)
    tensors = {k: v for k, v in decoder.state_dict().items() if not k.endswith("_extra_state")}
    one = write_hf_folder(CFG, tensors, tmp_path / "one")
    record = json.loads((one / FOLDER_CHECKSUMS_FILE).read_text())
    assert record == {"algorithm": "sha256",
                      "files": {"model.safetensors":
                                hashlib.sha256((one / "model.safetensors").read_bytes()).hexdigest()}}
    many = write_hf_folder(CFG, tensors, tmp_path / "many", max_shard_bytes=20_000)
    shards = sorted(p.name for p in many.glob("*.safetensors"))
    assert len(shards) > 3 and sorted(json.loads((many / FOLDER_CHECKSUMS_FILE).read_text())["files"]) == shards
    assert drprune(["convert", "hf-to-composer", str(many), str(tmp_path / "ok.pt")]) == 0

    victim = many / shards[1]
    flip(victim, victim.stat().st_size - 3)
    rc, err = run_cli(["convert", "hf-to-composer", str(many), str(tmp_path / "bad.pt")], capsys)
    assert rc == 2 and f"{victim} is corrupted: its sha256 does not match {FOLDER_CHECKSUMS_FILE}" in err
    assert not (tmp_path / "bad.pt").exists()


def test_truncated_safetensors_and_garbage_config_are_user_errors(tmp_path, capsys):
    hf_dir = llama_folder(tmp_path)
    weights = hf_dir / "model.safetensors"  # written by transformers: no checksums, safetensors itself refuses
    weights.write_bytes(weights.read_bytes()[:-100])
    rc, err = run_cli(["convert", "hf-to-composer", str(hf_dir), str(tmp_path / "a.pt")], capsys)
    assert rc == 2 and f"cannot read {weights}" in err and "Traceback" not in err
    (hf_dir / "config.json").write_text("{not json")
    rc, err = run_cli(["convert", "hf-to-composer", str(hf_dir), str(tmp_path / "a.pt")], capsys)
    assert rc == 2 and "config.json is not valid JSON" in err


# ---------------------------------------------------------------- the hub only on request

def test_a_missing_model_path_never_contacts_the_hub(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(a) or str(tmp_path))
    data = write_synthetic_mds(tmp_path / "mds", {"a": "random"}, seq_len=8, vocab_size=97, n_train=2, n_eval=2)
    for argv in (["convert", "hf-to-composer", "HuggingFaceTB/SmolLM2-135M", str(tmp_path / "o.pt")],
                 ["eval", "meta-llama/Llama-2-7b-hf", "--data", str(data)]):
        rc, err = run_cli(argv, capsys)
        assert rc == 2 and "not found (use hub:NAME to download from the Hugging Face Hub)" in err, err
    assert calls == []
    rc, err = run_cli(["convert", "hf-to-composer", "hub:", str(tmp_path / "o.pt")], capsys)
    assert rc == 2 and "names no repo" in err


def test_hub_prefix_downloads(tmp_path, monkeypatch):
    import huggingface_hub

    hf_dir = llama_folder(tmp_path)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **k: calls.append(repo) or str(hf_dir))
    assert drprune(["convert", "hf-to-composer", "hub:org/tiny-model", str(tmp_path / "o.pt")]) == 0
    assert calls == ["org/tiny-model"] and (tmp_path / "o.pt").is_file()


# ---------------------------------------------------------------- remote code

def test_remote_code_is_trusted_only_when_it_is_drprunes_own(tmp_path):
    from drprune.eval.harness import written_by_drprune

    cfg = ModelConfig(**{**CFG.to_dict(), "n_layers": 2,
                         "layers": [LayerSpec(4, 2, 48), LayerSpec(2, 1, 20)]})
    decoder = random_decoder(cfg)
    folder = export_hf(cfg, {k: v for k, v in decoder.state_dict().items() if not k.endswith("_extra_state")},
                       tmp_path / "remote")
    assert runs_only_drprune_code(folder) and written_by_drprune(folder)

    def tampered(name: str, change) -> Path:
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        change(copy)
        return copy

    cases = [
        tampered("code", lambda d: (d / "modeling_drprune.py").write_text(
            (d / "modeling_drprune.py").read_text() + "\nimport os\n")),
        tampered("extra", lambda d: (d / "helper.py").write_text("print('hi')\n")),
        tampered("automap", lambda d: (d / "config.json").write_text(json.dumps(
            {**json.loads((d / "config.json").read_text()), "auto_map": {"AutoModelForCausalLM": "evil--m.M"}}))),
        tampered("tokenizer", lambda d: (d / "tokenizer_config.json").write_text(
            json.dumps({"auto_map": {"AutoTokenizer": ["t.T", None]}}))),
    ]
    for case in cases:
        assert not runs_only_drprune_code(case), case.name
        with pytest.raises(UserError, match="never runs foreign remote code"):
            written_by_drprune(case)
