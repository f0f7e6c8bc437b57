"""Kill-anywhere safety: SIGKILL every writer at named points, then re-run it (slow: CI's slow step).

Each CLI command is killed at its kill points (drprune.atomic's DRPRUNE_TEST_KILL_AT hook: inside the
writer, before the fsync, before the rename, right after it), first with no output present, then
with --overwrite over a different previous output. After every kill the output is absent or the
previous one byte for byte (or, killed after the rename, the new one whole); a re-run of the same
command then succeeds, leaves no temp entry, and writes byte-identical files to an uninterrupted run
(mask files: identical tensors and metadata).

Training runs (L0 + dro+Dy with 2 loader workers, in one process and under `composer -n 2`, as DDP and
as FSDP2 with sharded checkpoints, and a hypernetwork) are killed at batches, while Composer writes a
checkpoint (half a file left; for a sharded checkpoint, a folder with rank 0's shard cut in half and
no .metadata) and while drprune writes masks; each autoresumes. Every batch of every run, killed or resumed, equals the
uninterrupted run's batch bit for bit: loss, sample ids (data order), domain proportions, mask
generator state (masks, Lagrange multipliers, hypernetwork) and model weights; the summaries the runs
leave are byte-identical too, and their mask files hold identical tensors and metadata.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from drprune.atomic import TMP_PREFIX
from drprune.data.testing import write_synthetic_mds
from tests.conftest import VOCAB, random_hf_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "prune.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env={**ENV, **env}, capture_output=True, text=True, timeout=600, cwd=ROOT)


def drprune(args: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "drprune.cli", *args], **({"DRPRUNE_TEST_KILL_AT": kill_at} if kill_at else {}))


def content(path: Path) -> object:
    """A file's bytes; a mask file (MaskSet.save) as its metadata and tensor bytes, since the safetensors
    writer it uses orders header metadata differently from one process to the next."""
    if not (path.suffix == ".safetensors" and path.name.startswith(("zs_s", "masks"))):
        return path.read_bytes()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys())}


def snapshot(path: Path) -> dict[str, object] | None:
    """Every file under `path` (or the file itself) -> its content; None when nothing is there."""
    if not os.path.lexists(path):
        return None
    if path.is_file():
        return {"": content(path)}
    return {str(p.relative_to(path)): content(p) for p in sorted(path.rglob("*")) if p.is_file()}


def temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(TMP_PREFIX)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from drprune.cli import main
    from tests.test_compact_cli import pruning_lm, write

    root = tmp_path_factory.mktemp("inputs")
    words = [f"w{i}" for i in range(60)]
    docs = {name: [" ".join(words[(i * k + name_i) % 60] for k in range(8 + i % 13)) for i in range(150)]
            for name_i, name in enumerate(("a", "b"))}
    for name, texts in docs.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(docs["a"] + docs["b"], vocab_size=300, min_frequency=1, special_tokens=["<eos>"],
                            show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>").save_pretrained(root / "tok")
    random_hf_model("llama").save_pretrained(root / "hf")
    assert main(["convert", "hf-to-composer", str(root / "hf"), str(root / "model.pt")]) == 0
    write(root / "prune.pt", pruning_lm().state_dict())
    write_synthetic_mds(root / "calib", {"a": "random"}, seq_len=16, vocab_size=VOCAB, n_train=8, n_eval=2)
    return {"root": root}


# command(inputs root, output) -> args;  kill points with no output present;  kill points over a previous output.
# A count is the n-th pass of that point in the process: nested outputs (oneshot's model.pt, hf/ and
# masks inside OUT) commit before the outer one, whose points come last.
COMMANDS = {
    "data-prepare": (
        lambda r, out: ["data", "prepare", "--domain", f"a={r / 'a.jsonl'}", "--domain", f"b={r / 'b.jsonl'}",
                        "--tokenizer", str(r / "tok"), "--max-seq-len", "16", "--eval-fraction", "0.2",
                        "--out", str(out), "--overwrite"],
        ["mds.row:40", "atomic.committed:1", "atomic.written:2"], ["atomic.synced:2", "atomic.committed:2"]),
    "compact": (
        lambda r, out: ["compact", str(r / "prune.pt"), "--out", str(out), "--overwrite"],
        ["atomic.begin", "atomic.written"], ["atomic.synced", "atomic.committed"]),
    "convert-composer-to-hf": (
        lambda r, out: ["convert", "composer-to-hf", str(r / "model.pt"), str(out), "--overwrite"],
        ["safetensors.tensor:4", "atomic.written"], ["atomic.synced", "atomic.committed"]),
    "oneshot-layers": (
        lambda r, out: ["oneshot", "layers", str(r / "hf"), "--num-blocks-to-prune", "1", "--calib", str(r / "calib"),
                        "--max-rows", "4", "--out", str(out), "--overwrite"],
        ["atomic.committed:1", "safetensors.tensor:3", "atomic.written:4"], ["atomic.synced:4", "atomic.committed:4"]),
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_killed_cli_writers_leave_nothing_half_written(tmp_path, inputs, name):
    command, fresh_points, overwrite_points = COMMANDS[name]
    root = inputs["root"]
    reference = tmp_path / "reference" / "out"
    proc = drprune(command(root, reference))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = snapshot(reference)

    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    for point in fresh_points:
        proc = drprune(command(root, out), kill_at=point)
        assert proc.returncode == -9, f"{point} was never reached: {proc.stderr[-2000:]}"
        assert not os.path.lexists(out), point
        assert temps(work), f"{point}: the kill left no temp entry, so cleaning goes untested"
    previous = work / "prev"
    if reference.is_dir():
        previous.mkdir()
        (previous / "previous.txt").write_text("an earlier output")
    else:
        previous.write_text("an earlier output")
    previous.rename(out)
    before = snapshot(out)
    for i, point in enumerate(overwrite_points):
        proc = drprune(command(root, out), kill_at=point)
        assert proc.returncode == -9, f"{point} was never reached: {proc.stderr[-2000:]}"
        last = i == len(overwrite_points) - 1  # killed right after the rename: the new output is whole
        assert snapshot(out) == (expected if last else before), point

    proc = drprune(command(root, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert snapshot(out) == expected
    assert temps(work) == []


# ---------------------------------------------------------------- training

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_synthetic_mds(tmp_path_factory.mktemp("mds") / "data", {"a": "repetitive", "b": "random"},
                               seq_len=64, vocab_size=49152, n_train=160, n_eval=8)


L0_DRO_DY = ["callbacks.data_loading.update_type=dro+Dy", "train_loader.num_workers=2"]
FSDP2_SHARDED = ({"FSDP_VERSION": "2"},
                 ["fsdp_config.sharding_strategy=FULL_SHARD", "fsdp_config.state_dict_type=sharded"])
# name: (ranks, overrides, environments of the killed runs, environment of every run)
RUNS = {
    "l0-dro+Dy-2workers": (1, L0_DRO_DY, [{"KILL_AT_BATCH": "2"}, {"KILL_AT_BATCH": "5"}, {"KILL_IN_CHECKPOINT": "6"},
                                         {"DRPRUNE_TEST_KILL_AT": "atomic.committed:2"}], {}),
    "hypernetwork": (1, ["callbacks.data_loading.update_type=dro", "model.mask_generator.name=hypernetwork",
                         "model.mask_generator.target_ratio=0.5", "model.mask_generator.lr=1e-2"],
                     [{"KILL_AT_BATCH": "4"}, {"KILL_IN_CHECKPOINT": "6"}], {}),
    "l0-dro+Dy-2workers-composer-n2": (2, L0_DRO_DY, [{"KILL_AT_BATCH": "5"}, {"KILL_IN_CHECKPOINT": "6"}], {}),
    "l0-dro+Dy-fsdp2-sharded-composer-n2": (2, [*L0_DRO_DY, *FSDP2_SHARDED[1]],
                                            [{"KILL_AT_BATCH": "5"}, {"KILL_IN_CHECKPOINT": "6"}], FSDP2_SHARDED[0]),
}


def train(record: Path, save: Path, data_dir: Path, ranks: int, extra: list[str], **env: str):
    args = [f"data_local={data_dir}", "callbacks.data_loading.set_names=[a,b]", f"save_folder={save}",
            "callbacks.data_loading.reference_loss=[9.0,9.0]", "max_duration=9ba", "eval_interval=3ba",
            "save_interval=3ba", "save_num_checkpoints_to_keep=-1", "autoresume=true", "log_to_console=false", *extra]
    script = [str(ROOT / "tests" / "scripts" / "train_recorded.py"), str(record), TINY, *args]
    if ranks == 1:
        return run([sys.executable, *script], **env)
    launcher = [str(Path(sys.executable).parent / "composer"), "-n", str(ranks), "--stdout", f"{record}-out{{rank}}",
                "--stderr", f"{record}-err{{rank}}"]
    return run([*launcher, *script], **env)


def rows(record: Path, rank: int = 0) -> list[dict]:
    path = Path(f"{record}-rank{rank}")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def logs(record: Path) -> str:
    return "".join(p.read_text()[-2000:] for p in sorted(record.parent.glob(f"{record.name}-err*")))


def outputs(save: Path) -> dict[str, object]:
    """The files a run writes besides Composer checkpoints (masks, summaries), which must not depend on kills."""
    return {p.name: content(p) for p in sorted(save.iterdir())
            if p.name.startswith(("zs_s", "data_loading", "mask_report")) and p.suffix in (".json", ".safetensors")}


@pytest.mark.parametrize("name", list(RUNS))
def test_killed_training_resumes_to_the_uninterrupted_run(tmp_path, data_dir, name):
    ranks, extra, kills, every = RUNS[name]
    proc = train(tmp_path / "ref", tmp_path / "ref-run", data_dir, ranks, extra, **every)
    assert proc.returncode == 0, proc.stderr[-3000:] + logs(tmp_path / "ref")
    reference = [rows(tmp_path / "ref", r) for r in range(ranks)]
    assert all([row["batch"] for row in ref] == list(range(1, 10)) for ref in reference)

    save = tmp_path / "run"
    for i, env in enumerate([*kills, {}]):
        record = tmp_path / f"try{i}"
        proc = train(record, save, data_dir, ranks, extra, **every, **env)
        failed = proc.returncode == -9 if ranks == 1 else proc.returncode != 0  # the launcher reports its own code
        assert failed if env else proc.returncode == 0, f"{env}: {proc.stderr[-3000:]}{logs(record)}"
        for rank in range(ranks):
            got = rows(record, rank)
            assert got, f"{env}: no batch ran on rank {rank}"
            for row in got:  # every batch, before the kill or after the resume, is the uninterrupted run's
                assert row == reference[rank][row["batch"] - 1], (env, rank, row["batch"])
    assert got[-1]["batch"] == 9
    sharded = "fsdp_config.state_dict_type=sharded" in extra
    if sharded:  # checkpoints are folders; the half-written one is set aside whole
        assert (save / "ep0-ba6.partial").is_dir() and not (save / "ep0-ba6.partial" / ".metadata").exists()
        assert (save / "ep0-ba9" / ".metadata").is_file() and os.readlink(save / "latest-rank0.pt") == "ep0-ba9"
    else:
        assert (save / "ep0-ba6-rank0.pt.partial").is_file()  # the half-written checkpoint, set aside
    assert outputs(save) == outputs(tmp_path / "ref-run") and "zs_s9.safetensors" in outputs(save)
    assert temps(save) == [] and not (save / ".drprune-run.lock").exists()
    shutil.rmtree(save)
