"""Progress reads well wherever stderr goes: a bar on a terminal, periodic log lines in a file, and no
carriage returns or cursor-up codes in a log (what the demo's log used to hold for every bar refresh)."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drprune import progress
from drprune.progress import TQDM_SWITCH, Progress, bars_off_terminal, composer_console, track

BAR_CODES = ("\r", "\x1b[")


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, so tqdm draws."""

    def isatty(self) -> bool:
        return True


def codes(text: str) -> int:
    return sum(text.count(c) for c in BAR_CODES)


def raw(path: Path) -> str:
    """A file's text as written (read_text would turn carriage returns into newlines)."""
    return path.read_bytes().decode()


def progress_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == progress.__name__]


def test_in_a_file_a_loop_logs_a_line_per_interval_and_a_last_one(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=progress.__name__)
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f, contextlib.redirect_stderr(f):
        assert list(track(range(5), "score", unit="batches", every_s=0.0)) == [0, 1, 2, 3, 4]
    lines = progress_records(caplog)
    assert len(lines) == 6  # one per item (interval 0), then the closing line
    assert lines[1].startswith("score: 2/5 batches (40%)")
    assert lines[-1].startswith("score: 5 batches done in")
    assert raw(err) == ""


def test_in_a_file_a_loop_shorter_than_the_interval_says_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=progress.__name__)
    with open(tmp_path / "stderr.txt", "w") as f, contextlib.redirect_stderr(f):
        with Progress("prepare", unit="docs") as p:  # the default interval: 30 s
            for _ in range(1000):
                p.update(3)
    assert p.done == 3000
    assert progress_records(caplog) == []
    assert raw(tmp_path / "stderr.txt") == ""


def test_unknown_total_logs_counts_and_large_ones_read_with_separators(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=progress.__name__)
    with open(tmp_path / "stderr.txt", "w") as f, contextlib.redirect_stderr(f):
        with Progress("export", total=7_000_000, unit="params", every_s=0.0) as p:
            p.update(3_500_000)
        list(track(iter("abc"), "text", unit="docs", every_s=0.0))
    lines = progress_records(caplog)
    assert lines[0].startswith("export: 3,500,000/7,000,000 params (50%)")
    assert lines[2].startswith("text: 1 docs, ")  # an iterator has no length: counts only


def test_on_a_terminal_a_bar_is_drawn_and_nothing_is_logged(caplog):
    caplog.set_level(logging.INFO, logger=progress.__name__)
    tty = Terminal()
    with contextlib.redirect_stderr(tty):
        assert sum(track(range(5), "score", unit="batches", every_s=0.0)) == 10
    drawn = tty.getvalue()
    assert drawn.startswith("\rscore:   0%") and "0/5" in drawn and drawn.endswith("\r")  # drawn, then cleared
    assert progress_records(caplog) == []


def test_a_requested_composer_bar_becomes_console_lines_off_a_terminal(tmp_path):
    with open(tmp_path / "stderr.txt", "w") as f, contextlib.redirect_stderr(f):
        assert composer_console(True, False) == (False, True)
        assert composer_console(False, False) == (False, False)
        assert composer_console(False, True) == (False, True)
    with contextlib.redirect_stderr(Terminal()):
        assert composer_console(True, False) == (True, False)


def test_other_libraries_bars_are_switched_off_in_logs(tmp_path, monkeypatch):
    monkeypatch.delenv(TQDM_SWITCH, raising=False)
    with contextlib.redirect_stderr(Terminal()):
        bars_off_terminal()
    assert TQDM_SWITCH not in os.environ
    with open(tmp_path / "stderr.txt", "w") as f, contextlib.redirect_stderr(f):
        bars_off_terminal()
    assert os.environ[TQDM_SWITCH] == "1"


def test_the_cli_loads_no_bar_library_before_the_switch():
    """tqdm reads its switch once, at import: parsing a command must not import it (nor what imports it)."""
    code = ("import sys; from drprune.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('tqdm', 'transformers', 'datasets', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_library_bar_started_after_the_switch_stays_off_in_a_file(tmp_path):
    """What the CLI does, in a fresh interpreter: the switch, then a library's plain tqdm bar (as
    transformers draws while de-quantizing a GGUF file). Without the switch the same bar lands in the file."""
    code = ("import sys; from drprune.progress import bars_off_terminal; {switch}; from tqdm.auto import tqdm; "
            "sum(tqdm(range(3), desc='library'))")
    env = {k: v for k, v in os.environ.items() if k != TQDM_SWITCH}
    written = []
    for switch in ("bars_off_terminal()", "None"):
        err = tmp_path / "stderr.txt"
        with open(err, "w") as f:
            subprocess.run([sys.executable, "-c", code.format(switch=switch)], stderr=f, env=env, check=True)
        written.append(raw(err))
    assert written[0] == ""
    assert "library: 100%" in written[1] and codes(written[1]) >= 2


@pytest.mark.slow
def test_gguf_to_hf_in_a_log_file_shows_no_transformers_bar(tmp_path):
    """transformers draws a bar while it de-quantizes a GGUF file (the demo's first step): into a log
    file when called as a library here (tqdm loaded long ago), not by `drprune` with stderr a file."""
    from drprune.cli import main
    from drprune.convert.gguf import gguf_to_hf
    from tests.test_gguf_export import hf_folder, train_bpe

    src = hf_folder(tmp_path, "llama_tied", train_bpe(tmp_path / "tok"))
    assert main(["convert", "hf-to-gguf", str(src), str(tmp_path / "m.gguf"), "--dtype", "f32"]) == 0
    library, command = tmp_path / "library.txt", tmp_path / "command.txt"
    with open(library, "w") as f, contextlib.redirect_stderr(f):
        gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf-library")
    env = {k: v for k, v in os.environ.items() if k != TQDM_SWITCH}
    with open(command, "w") as f:
        subprocess.run([sys.executable, "-m", "drprune.cli", "convert", "gguf-to-hf", str(tmp_path / "m.gguf"),
                        str(tmp_path / "hf-command")], stderr=f, env=env, check=True, timeout=300)
    assert "de-quantizing GGUF tensors" in raw(library) and codes(raw(library)) >= 2
    assert codes(raw(command)) == 0 and "wrote HF folder" in raw(command)


def test_eval_and_merge_write_no_bar_codes_to_a_log_file(tmp_path):
    """`drprune eval` (perplexity per domain, copy probe) and `drprune data merge` with stderr a file:
    no carriage return, no escape code. The same eval on a terminal draws bars (the check is not vacuous)."""
    from drprune.cli import main
    from drprune.data.testing import write_synthetic_mds
    from tests.conftest import VOCAB, random_hf_model

    data = write_synthetic_mds(tmp_path / "mds", {"a": "repetitive", "b": "random"}, seq_len=16,
                               vocab_size=VOCAB, n_train=4, n_eval=6)
    random_hf_model("llama").save_pretrained(tmp_path / "hf")
    args = ["eval", str(tmp_path / "hf"), "--data", str(data), "--batch-size", "2", "--bootstrap", "50",
            "--copy-probe", "--copy-rows", "4"]
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f, contextlib.redirect_stderr(f):
        assert main(args) == 0
        assert main(["data", "merge", "--input-dir", str(data / "train"), "--output-dir", str(tmp_path / "m"),
                     "--output-split", "all", "--split-names", "a", "b"]) == 0
    assert codes(raw(err)) == 0
    tty = Terminal()
    with contextlib.redirect_stderr(tty):
        assert main(args) == 0
    assert codes(tty.getvalue()) >= 6  # at least a redraw and a clear for each of 2 domains + the probe


def test_training_with_progress_bar_logs_console_lines_without_cursor_codes(tmp_path):
    """The demo's configs ask Composer for a progress bar; in a log file it was one line per refresh with
    cursor-up codes. Off a terminal the run logs Composer's console lines instead: one per batch here."""
    from drprune.data.testing import write_synthetic_mds
    from drprune.train import build_trainer, load_config

    data = write_synthetic_mds(tmp_path / "mds", {"a": "repetitive", "b": "random"}, seq_len=64,
                               vocab_size=49152, n_train=16, n_eval=4)
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "prune.yaml"
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f, contextlib.redirect_stderr(f):
        trainer = build_trainer(load_config(str(config), [
            f"data_local={data}", "callbacks.data_loading.set_names=[a,b]", f"save_folder={tmp_path / 'run'}",
            "max_duration=2ba", "progress_bar=true", "log_to_console=false", "console_log_interval=1ba",
            "eval_interval=1000ba"]))
        trainer.fit()
        trainer.close()
    text = raw(err)
    assert codes(text) == 0
    assert [line.split("]")[0] for line in text.splitlines() if line.startswith("[batch=")] == \
        ["[batch=1/2", "[batch=2/2"]



def test_compaction_and_hf_export_count_every_tensor_and_parameter(tmp_path, caplog, monkeypatch):
    """With a line per update (interval 0): compaction logs one line per compact tensor and a last one;
    the HF export counts parameters as they reach the disk, all of them by its last line."""
    import torch

    from drprune.compact.export import export_hf
    from drprune.compact.fold import compact_decoder
    from drprune.masks.base import MaskSet
    from drprune.models.config import ModelConfig
    from drprune.models.decoder import PrunableDecoder

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger=progress.__name__)
    torch.manual_seed(0)
    decoder = PrunableDecoder(ModelConfig(vocab_size=32, d_model=16, n_layers=3, n_heads=2, intermediate_size=32))
    small = compact_decoder(decoder, MaskSet(layer=torch.tensor([1.0, 0.0, 1.0])))
    tensors = {k: v for k, v in small.state_dict().items() if not k.endswith("_extra_state")}
    assert len(tensors) == 3 + 2 * 9  # wte, output, ln_f; per kept layer 2 norms, 4 attention and 3 MLP matrices
    compact_lines = [m for m in progress_records(caplog) if m.startswith("compact: ")]
    assert len(compact_lines) == len(tensors) + 1
    assert compact_lines[-1].startswith(f"compact: {len(tensors)} tensors done")
    caplog.clear()
    export_hf(small.cfg, tensors, tmp_path / "hf")
    params = sum(t.numel() for t in tensors.values())
    lines = progress_records(caplog)
    assert lines[-2].startswith(f"export hf: {params:,}/{params:,} params (100%)")
    assert lines[-1].startswith(f"export hf: {params:,} params done")
