"""drprune.atomic: all-or-nothing outputs, stale temps of killed runs, completion markers, temp names skipped."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from drprune.atomic import (MARKER, TMP_PREFIX, atomic_output, check_complete, clean_stale, mark_complete,
                            temp_path, write_json)
from drprune.cli import main as drprune
from drprune.data.testing import write_synthetic_mds
from drprune.errors import UserError
from tests.conftest import VOCAB, random_hf_model


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def stale_name(folder: Path, name: str, pid: int, host: str | None = None) -> Path:
    """A temp entry as a process `pid` of this host (or of `host`) would have left it."""
    real = temp_path(folder / name)
    _, tag, _, rand = real.name[len(TMP_PREFIX):].rsplit("-", 3)
    return folder / f"{TMP_PREFIX}{name}-{host or tag}-{pid}-{rand}"


def test_file_output_is_all_or_nothing(tmp_path):
    out = tmp_path / "sub" / "a.json"
    write_json(out, {"x": 1})
    assert json.loads(out.read_text()) == {"x": 1}
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        write_json(out, {"x": 2}, overwrite=False)
    with pytest.raises(RuntimeError):
        with atomic_output(out, overwrite=True) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed in the middle")
    assert json.loads(out.read_text()) == {"x": 1}
    assert os.listdir(out.parent) == ["a.json"]


def test_folder_output_replaces_the_old_one_whole(tmp_path):
    out = tmp_path / "hf"
    with atomic_output(out, folder=True) as tmp:
        (tmp / "a").write_text("old")
        (tmp / "b").write_text("old")
    with atomic_output(out, overwrite=True, folder=True) as tmp:
        (tmp / "a").write_text("new")
        assert (out / "a").read_text() == "old" and (out / "b").is_file()  # untouched until the commit
    assert sorted(os.listdir(out)) == ["a"] and (out / "a").read_text() == "new"
    assert os.listdir(tmp_path) == ["hf"]


def test_an_output_under_a_file_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write output"):
        with atomic_output(tmp_path / "file" / "out.json") as tmp:
            tmp.write_text("{}")


def test_stale_temps_of_dead_processes_are_removed_by_the_next_writer(tmp_path):
    dead = stale_name(tmp_path, "model.pt", dead_pid())
    dead_dir = stale_name(tmp_path, "hf", dead_pid())
    live = stale_name(tmp_path, "hf", os.getppid())
    other_host = stale_name(tmp_path, "hf", dead_pid(), host="deadbeef")
    dead.write_text("partial")
    dead_dir.mkdir()
    (dead_dir / "shard").write_text("partial")
    live.mkdir()
    other_host.mkdir()
    write_json(tmp_path / "x.json", {})
    assert sorted(os.listdir(tmp_path)) == sorted(["x.json", live.name, other_host.name])
    assert clean_stale(tmp_path) == []


def test_kill_hook_leaves_only_a_stale_temp_which_the_next_run_removes(tmp_path):
    out = tmp_path / "o.txt"
    out.write_text("old")

    def killed_at(label: str) -> int:
        script = "import sys; from drprune.atomic import write_text; write_text(sys.argv[1], 'new')"
        proc = subprocess.Popen([sys.executable, "-c", script, str(out)],
                                env={**os.environ, "DRPRUNE_TEST_KILL_AT": label})
        assert proc.wait() == -9, label
        return proc.pid

    for label in ("atomic.written", "atomic.synced"):
        pid = killed_at(label)
        assert out.read_text() == "old"
        left = sorted(os.listdir(tmp_path))  # the previous kill's temp is gone, this one's is left
        assert len(left) == 2 and left[0].startswith(f"{TMP_PREFIX}o.txt-") and f"-{pid}-" in left[0]
    killed_at("atomic.committed")
    assert out.read_text() == "new"
    assert os.listdir(tmp_path) == ["o.txt"]


def test_completion_marker(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    (folder / "sub").mkdir()
    (folder / "sub" / "f").write_text("y")
    check_complete(folder)  # no marker: a folder from before markers existed
    mark_complete(folder)
    assert json.loads((folder / MARKER).read_text())["files"] == {"model.safetensors": 100, "sub/f": 1}
    check_complete(folder)
    (folder / "model.safetensors").write_bytes(b"x" * 60)
    with pytest.raises(UserError, match="incomplete: model.safetensors has 60 bytes, not 100"):
        check_complete(folder, "HF model folder")
    (folder / "sub" / "f").unlink()
    shutil.copytree(folder, tmp_path / f"{TMP_PREFIX}hf-0-1-2")
    with pytest.raises(UserError, match="unfinished output of a drprune run"):
        check_complete(tmp_path / f"{TMP_PREFIX}hf-0-1-2")


def test_written_outputs_carry_markers_and_readers_check_them(tmp_path, capsys):
    data = write_synthetic_mds(tmp_path / "mds", {"a": "random"}, seq_len=16, vocab_size=VOCAB, n_train=4, n_eval=3)
    for split in ("train/a", "eval/a", "eval/eval_merge"):
        assert (data / split / MARKER).is_file(), split
    random_hf_model("llama").save_pretrained(tmp_path / "src")
    assert drprune(["convert", "hf-to-composer", str(tmp_path / "src"), str(tmp_path / "m.pt")]) == 0
    assert drprune(["convert", "composer-to-hf", str(tmp_path / "m.pt"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / MARKER).is_file()
    shard = tmp_path / "hf" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    assert drprune(["eval", str(tmp_path / "hf"), "--data", str(data), "--bootstrap", "10"]) == 2
    assert "incomplete: model.safetensors has" in capsys.readouterr().err


def test_domain_listings_skip_temp_folders_of_killed_writers(tmp_path, capsys):
    """A kill during `data merge` leaves eval/.<name>-temp; eval must not take it for a domain."""
    from drprune.oneshot.runner import eval_domains

    data = write_synthetic_mds(tmp_path / "mds", {"a": "random", "b": "random"}, seq_len=16, vocab_size=VOCAB,
                               n_train=4, n_eval=3)
    shutil.copytree(data / "eval" / "eval_merge", stale_name(data / "eval", "m2", os.getpid()))
    shutil.copytree(data / "eval" / "a", data / "eval" / ".m2.tmp-123")  # an older drprune's temp name
    (data / "eval" / ".m2.tmp-123" / MARKER).unlink()
    assert eval_domains(str(data)) == ["a", "b"]
    random_hf_model("llama").save_pretrained(tmp_path / "hf")
    out = tmp_path / "ppl.json"
    assert drprune(["eval", str(tmp_path / "hf"), "--data", str(data), "--bootstrap", "10", "--json", str(out)]) == 0
    assert sorted(json.loads(out.read_text())["domains"]) == ["a", "b"]
