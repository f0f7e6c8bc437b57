"""drprune's own run files (masks, mixture summary and plots, mask report) go where Composer puts checkpoints:
a `{run_name}` save_folder formatted as Composer formats it, an object-store URI through the logger's
upload_file (never a local folder named `s3:`)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from composer.core import Timestamp
from composer.loggers import Logger, LoggerDestination, RemoteUploaderDownloader
from safetensors import safe_open

from drprune.callbacks.data_loading import DynamicLoadingCallback
from drprune.callbacks.pruning import PruningCallback
from drprune.data.testing import write_synthetic_mds
from drprune.errors import ConfigError
from drprune.mixture import parse_update_type
from drprune.run_files import RunFiles, uploader_for
from drprune.train import build_trainer, load_config
from tests.test_compact_cli import pruning_lm

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "prune.yaml")
RUN_FILES = {"zs_s3.safetensors", "mask_report.json", "layer_widths.png", "data_loading_summary.json",
             "domain_weights.png", "domain_eval_loss.png"}


class Uploads(LoggerDestination):
    """A logger destination that keeps what it is asked to upload (as a RemoteUploaderDownloader would)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def upload_file(self, state, remote_file_name: str, file_path: Path, *, overwrite: bool) -> None:
        assert overwrite  # a file rewritten at every eval replaces the previous upload
        self.files[remote_file_name] = Path(file_path).read_bytes()


class _Dataset:
    def update_proportion(self, p: list[float]) -> None:
        self.p = p


def write_every_run_file(save_folder: str) -> Uploads:
    """Run the callbacks' writers as a run does at an eval (step 3) and at the end, run name `r`."""
    lm = pruning_lm()
    state = SimpleNamespace(model=lm, run_name="r", timestamp=Timestamp(batch=3), eval_metric_values={})
    uploads = Uploads()
    logger = Logger(state, destinations=[uploads])
    pruning = PruningCallback(save_folder)
    pruning.eval_end(state, logger)
    pruning.fit_end(state, logger)
    DynamicLoadingCallback(["a", "b"], [0.5, 0.5], parse_update_type("constant"), _Dataset(),
                           save_folder=save_folder).fit_end(state, logger)
    return uploads


def test_a_run_name_save_folder_is_formatted_as_composer_formats_it(tmp_path):
    uploads = write_every_run_file(str(tmp_path / "runs" / "{run_name}"))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]
    assert {p.name for p in (tmp_path / "runs" / "r").iterdir()} == RUN_FILES
    assert uploads.files == {}
    report = json.loads((tmp_path / "runs" / "r" / "mask_report.json").read_text())
    assert report["source_params"] > report["kept_params"] > 0


def test_an_object_store_save_folder_gets_the_files_through_the_logger(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uploads = write_every_run_file("s3://bucket/runs/{run_name}")
    assert sorted(uploads.files) == sorted(f"runs/r/{name}" for name in RUN_FILES)
    assert list(tmp_path.iterdir()) == []  # no local `s3:` folder, no staging left behind
    staged = tmp_path.parent / "masks.safetensors"
    staged.write_bytes(uploads.files["runs/r/zs_s3.safetensors"])
    with safe_open(str(staged), framework="pt") as f:  # what was uploaded is the whole mask file
        assert sorted(f.keys()) == ["head", "hidden", "intermediate", "layer"]
    assert json.loads(uploads.files["runs/r/data_loading_summary.json"])["final_proportion"] == [0.5, 0.5]
    assert sorted(write_every_run_file("s3://bucket").files) == sorted(RUN_FILES)  # the bucket's root


def test_an_object_store_save_folder_gets_composers_uploader_once():
    [uploader] = uploader_for("s3://bucket/runs/x", [])
    assert isinstance(uploader, RemoteUploaderDownloader) and uploader.remote_bucket_name == "bucket"
    assert uploader_for("s3://bucket/other", [uploader]) == []  # one already reaches that bucket
    assert uploader_for("runs/{run_name}", []) == [] and uploader_for(None, []) == []
    with pytest.raises(ConfigError, match="Composer cannot upload to foo:// object stores"):
        uploader_for("foo://bucket/x", [])
    assert RunFiles(None).enabled is False


def test_a_training_run_writes_its_files_beside_its_checkpoints_in_the_formatted_folder(tmp_path, monkeypatch):
    data = write_synthetic_mds(tmp_path / "data", {"a": "repetitive", "b": "random"}, seq_len=64, vocab_size=49152,
                               n_train=16, n_eval=4)
    monkeypatch.chdir(tmp_path)
    trainer = build_trainer(load_config(TINY, [
        f"data_local={data}", "callbacks.data_loading.set_names=[a,b]", "save_folder=runs/{run_name}",
        "max_duration=2ba", "eval_interval=2ba", "save_interval=2ba", "console_log_interval=1ba",
        "log_to_console=false"]))
    trainer.fit()
    trainer.close()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["tiny-prune"]
    files = {p.name for p in (tmp_path / "runs" / "tiny-prune").iterdir()}
    assert {"ep0-ba2-rank0.pt", "zs_s2.safetensors", "mask_report.json", "data_loading_summary.json",
            "expected_sparsity.png"} <= files
