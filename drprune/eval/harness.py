"""lm-evaluation-harness tasks for `drprune eval --tasks`: drprune's local task pack and standard tasks.

The local pack (configs/eval_tasks/*.yaml) holds harness tasks over JSONL files that drprune builds from
held-out text before each run, so they need no network: `--data` is a prepared MDS folder (its eval
rows, decoded with the model's tokenizer) or a folder of .txt files. The YAML files are templates: each
run writes a copy whose `dataset_kwargs.data_files` points at that run's JSONL.
- drprune_copy: a span of random words from the text repeated; acc = exact greedy continuation of the
  repeat (the text form of drprune/eval/copying.py's probe).
- drprune_cloze: a passage and four continuations of equal length (the true one, three from other
  passages); acc / acc_norm.
Standard harness tasks (arc_easy, hellaswag, ...) download their datasets from the Hugging Face hub; one
whose dataset cannot be had (the hub switched off by HF_HUB_OFFLINE / HF_DATASETS_OFFLINE and the dataset
not in the local cache, or a failed download) is refused before the model is loaded.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from drprune.errors import UserError
from drprune.paths import config_dir
from drprune.atomic import visible, write_json
from drprune.compact.export import export_checkpoint, runs_only_drprune_code
from drprune.compute import Compute, resolve_compute
from drprune.convert.checkpoint import TOKENIZER_FILES, resolve_hf_dir
from drprune.convert.hf import REMOTE_MODEL_TYPE
from drprune.data.identity import check_data_tokenizer, check_token_ids
from drprune.data.prepare import EVAL_MERGE
from drprune.eval.perplexity import read_token_rows

log = logging.getLogger(__name__)

TASK_PACK = config_dir("eval_tasks")
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PACKAGED_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # dataset_path values that read data_files
CONTEXT_WORDS, CHOICE_WORDS, COPY_WORDS = 32, 8, 16  # words per cloze passage / candidate / copied span
N_CHOICES = 4


# ---------------------------------------------------------------- task names

def parse_tasks(text: str) -> list[str]:
    """'a, b,a' -> ['a', 'b'] (order kept, duplicates dropped)."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise UserError("--tasks names no task: pass e.g. --tasks drprune_copy,drprune_cloze")
    return names


def local_tasks() -> dict[str, Path]:
    """{task name: template YAML} of the local pack."""
    import yaml

    return {yaml.safe_load(p.read_text())["task"]: p for p in sorted(TASK_PACK.glob("*.yaml"))}


@functools.lru_cache(maxsize=1)
def _standard_manager() -> Any:
    """The harness's TaskManager over its own tasks; building its index reads ~15k YAML files (seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _standard_index() -> dict[str, Any]:
    return _standard_manager().task_index


def fetch_standard(names: list[str]) -> None:
    """Build the standard tasks once, which downloads their datasets (or finds them in the HF cache), so a
    machine that cannot reach the hub fails here, before the model is loaded."""
    try:
        _standard_manager().load(names)
    except Exception as err:  # noqa: BLE001 - no network, unknown or gated dataset: all need the user
        raise UserError(f"cannot get the datasets of {', '.join(names)} ({type(err).__name__}: {err}): standard "
                        "tasks download them from the Hugging Face hub, so run them on a connected machine") from err


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_is_offline() -> bool:
    """True when the environment switches the Hugging Face hub off (read now, not at import)."""
    import datasets
    from huggingface_hub import constants

    return (any(_truthy(os.environ.get(v)) for v in OFFLINE_VARS) or constants.HF_HUB_OFFLINE
            or datasets.config.HF_HUB_OFFLINE)


def _datasets_of(name: str, index: dict[str, Any], seen: set[str]) -> set[str | None]:
    """Hub dataset ids a task, group or tag reads (None: one drprune cannot tell, e.g. a Python task)."""
    from lm_eval.tasks._index import Kind

    if name in seen:
        return set()
    seen.add(name)
    entry = index.get(name)
    if entry is None:
        return {None}
    if entry.kind is Kind.TAG:
        members: list[Any] = sorted(entry.tags)
    elif entry.kind is Kind.GROUP:
        members = list(entry.cfg.get("task") or [])
    else:
        return {_dataset_id(entry.cfg)}
    out: set[str | None] = set()
    for member in members:
        if isinstance(member, dict) and "dataset_path" in member:
            out.add(_dataset_id(member))
        else:
            member_name = member.get("task") if isinstance(member, dict) else member
            out |= _datasets_of(member_name, index, seen) if isinstance(member_name, str) else {None}
    return out


def _dataset_id(cfg: dict[str, Any] | None) -> str | None:
    """The hub dataset a task config reads: "" for packaged builders (json, csv, ...) over local files
    only, None when drprune cannot tell (a remote URL outside the hub)."""
    path = (cfg or {}).get("dataset_path")
    if path not in PACKAGED_BUILDERS:
        return path
    files = ((cfg or {}).get("dataset_kwargs") or {}).get("data_files") or {}
    values = files.values() if isinstance(files, dict) else [files]
    flat = [f for v in values for f in ([v] if isinstance(v, str) else v)]
    remote = [f for f in flat if "://" in f]
    if not remote:
        return ""  # local files: nothing to download
    prefix = "hf://datasets/"
    return "/".join(remote[0][len(prefix):].split("/")[:2]) if remote[0].startswith(prefix) else None


def dataset_is_cached(dataset: str) -> bool:
    """Whether a hub dataset is in the local hub cache or in the datasets library's cache."""
    import datasets
    from huggingface_hub import constants

    return ((Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}").is_dir()
            or (Path(datasets.config.HF_DATASETS_CACHE) / dataset.replace("/", "___")).is_dir())


def check_tasks(names: list[str], *, have_data: bool) -> tuple[list[str], list[str]]:
    """(local, standard) task names; raises UserError for unknown names, local tasks without data and
    standard tasks whose datasets cannot be had offline. Cheap unless a non-local name is given."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"--tasks needs lm-evaluation-harness: run  {sys.executable} -m pip install -e '.[eval]'  "
                        "in the drprune checkout (or pip install lm-eval==0.4.13 accelerate)")
    pack = local_tasks()
    local = [n for n in names if n in pack]
    standard = [n for n in names if n not in pack]
    local_note = f"local tasks (built from --data, no network): {', '.join(pack)}"
    if standard:
        index = _standard_index()
        if unknown := [n for n in standard if n not in index]:
            raise UserError(f"unknown task(s) {', '.join(unknown)}: {local_note}; standard lm-eval tasks "
                            "(arc_easy, hellaswag, ...) download their datasets, so they need a connected machine")
    if local and not have_data:
        raise UserError(f"task(s) {', '.join(local)} are built from held-out text: pass --data DIR "
                        "(an MDS folder from `drprune data prepare`, or a folder of .txt files)")
    if standard and hub_is_offline():
        index = _standard_index()
        missing = {n: sorted(str(d) for d in _datasets_of(n, index, set()) if d != "" and
                             (d is None or not dataset_is_cached(d))) for n in standard}
        if missing := {n: d for n, d in missing.items() if d}:
            detail = "; ".join(f"{n} needs {', '.join(d)}" for n, d in missing.items())
            raise UserError(f"the Hugging Face hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and "
                            f"these tasks need a dataset download that is not in the local cache: {detail}. "
                            f"Run them on a connected machine (or fill the HF cache there first); offline, use the "
                            f"{local_note}")
    return local, standard


# ---------------------------------------------------------------- held-out text -> JSONL

def held_out_texts(data: Path, tokenizer_dir: Path, max_rows: int) -> list[str]:
    """Texts of an MDS folder's eval domains (at most `max_rows` rows each, decoded) or of *.txt files."""
    data = Path(data)
    if not data.is_dir():
        raise UserError(f"--data {data} is not a folder (an MDS folder from `drprune data prepare`, or .txt files)")
    eval_dir = data / "eval"
    if eval_dir.is_dir():
        from transformers import AutoTokenizer


        domains = [p for p in visible(eval_dir) if p.is_dir() and p.name != EVAL_MERGE]
        if not domains:
            raise UserError(f"no eval domains under {eval_dir}")
        recorded = check_data_tokenizer(data, tokenizer=str(tokenizer_dir))  # the ids are decoded with it
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        texts: list[str] = []
        for folder in domains:
            rows = read_token_rows(folder, max_rows)
            if not recorded:
                check_token_ids(int(rows.max()), len(tokenizer), folder)
            texts += tokenizer.batch_decode(rows.tolist(), skip_special_tokens=True)
        return texts
    files = sorted(data.rglob("*.txt"))
    if not files:
        raise UserError(f"--data {data} has neither eval/ (an MDS folder) nor *.txt files")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def cloze_items(texts: list[str], rows: int, seed: int) -> list[dict[str, Any]]:
    """Up to `rows` items: CONTEXT_WORDS words, the CHOICE_WORDS that follow and 3 other passages' endings."""
    width = CONTEXT_WORDS + CHOICE_WORDS
    windows = [words[i:i + width] for words in (t.split() for t in texts)
               for i in range(0, len(words) - width + 1, width)]
    if len(windows) < N_CHOICES:
        raise UserError(f"drprune_cloze needs at least {N_CHOICES} passages of {width} words in --data, "
                        f"found {len(windows)}: give it more text")
    rng = np.random.default_rng([seed, 0])
    picked = rng.permutation(len(windows))[:rows]
    if len(picked) < rows:
        log.warning("drprune_cloze: %d items (the data holds only %d passages of %d words)",
                    len(picked), len(windows), width)
    endings = [" ".join(w[CONTEXT_WORDS:]) for w in windows]
    items = []
    for i in picked:
        choices = [endings[i]]
        for j in rng.permutation(len(windows)):
            if len(choices) == N_CHOICES:
                break
            if endings[j] not in choices:
                choices.append(endings[j])
        if len(choices) < N_CHOICES:
            raise UserError("drprune_cloze needs passages with different endings: give --data more varied text")
        label = int(rng.integers(0, N_CHOICES))
        choices.insert(label, choices.pop(0))
        items.append({"context": " ".join(windows[i][:CONTEXT_WORDS]), "choices": choices, "label": label})
    return items


def copy_items(texts: list[str], rows: int, seed: int) -> list[dict[str, Any]]:
    """`rows` spans of COPY_WORDS words drawn uniformly (with replacement) from the text's distinct words."""
    pool = sorted({w for t in texts for w in t.split()})
    if len(pool) < 2:
        raise UserError(f"drprune_copy needs at least 2 distinct words in --data, found {len(pool)}")
    rng = np.random.default_rng([seed, 1])
    items = []
    for _ in range(rows):
        span = [pool[k] for k in rng.integers(0, len(pool), size=COPY_WORDS)]
        items.append({"context": " ".join(span + span[:1]), "continuation": " " + " ".join(span[1:])})
    return items


BUILDERS = {"drprune_cloze": cloze_items, "drprune_copy": copy_items}


def write_task_pack(names: list[str], data: Path, tokenizer_dir: Path, out: Path, *, rows: int,
                    seed: int) -> Path:
    """out/<task>.jsonl and out/<task>.yaml (the template pointed at it) for each local task; returns out."""
    import yaml

    texts = held_out_texts(data, tokenizer_dir, max_rows=rows)
    pack = local_tasks()
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        items = BUILDERS[name](texts, rows, seed)
        jsonl = out / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
        cfg = yaml.safe_load(pack[name].read_text())
        cfg["dataset_kwargs"] = {"data_files": {"test": str(jsonl)}, "cache_dir": str(out / "hf_datasets")}
        (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        log.info("%s: %d items from %s", name, len(items), data)
    return out


# ---------------------------------------------------------------- model and run

@contextmanager
def hub_offline() -> Iterator[None]:
    """Switch the hub off for the block (env and the flags the libraries read at import), then restore."""
    import datasets
    from huggingface_hub import constants

    saved_env = {v: os.environ.get(v) for v in OFFLINE_VARS}
    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE
    os.environ.update(dict.fromkeys(OFFLINE_VARS, "1"))
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES if name != "generation_config.json")


def hf_folder(model: str, tokenizer: str | None, tmp: Path, trust_pickle: bool = False) -> tuple[Path, Path]:
    """(HF folder, tokenizer folder) for MODEL: a folder (or `hub:NAME`) as is; a drprune checkpoint is
    exported into `tmp` the way `drprune convert composer-to-hf` does it."""

    tok = Path(tokenizer) if tokenizer is not None else None
    if tok is not None and not _has_tokenizer(tok):
        raise UserError(f"--tokenizer {tok} holds no tokenizer files")
    if Path(model).is_file():
        if tok is None:
            raise UserError(f"{model} is a checkpoint, which carries no tokenizer: pass --tokenizer FOLDER")
        folder = export_checkpoint(model, tmp / "hf", tokenizer_dir=tok, trust_pickle=trust_pickle)
        return folder, folder
    folder = resolve_hf_dir(model)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json: is it a Hugging Face model folder?")
    if tok is None and not _has_tokenizer(folder):
        raise UserError(f"{folder} holds no tokenizer files: pass --tokenizer FOLDER")
    return folder, tok or folder


def written_by_drprune(folder: Path) -> bool:
    """Remote code is trusted only in folders drprune wrote itself: model_type `drprune` and code that is
    byte for byte this drprune's (`runs_only_drprune_code`); any other remote code is refused."""

    if json.loads((Path(folder) / "config.json").read_text()).get("model_type") != REMOTE_MODEL_TYPE:
        return False
    if not runs_only_drprune_code(folder):
        raise UserError(f"{folder} says it is a drprune remote-code folder, but its code is not this drprune's own "
                        "(another version, or modified): drprune never runs foreign remote code. Re-export it "
                        "with `drprune convert composer-to-hf`, or load it yourself with trust_remote_code=True")
    return True


def run_tasks(model: str, tasks: list[str], *, data: str | Path | None = None, tokenizer: str | None = None,
              rows: int = 200, limit: int | None = None, batch_size: int = 8, bootstrap: int = 1000,
              seed: int = 0, trust_pickle: bool = False, compute: Compute | None = None) -> dict[str, Any]:
    """lm_eval.simple_evaluate of MODEL (HF folder, hub id or drprune checkpoint) on `tasks`; its results dict.

    The model runs on `compute`'s device and dtype (default: `resolve_compute()`'s auto choice). Every
    input is checked before the model is loaded. A run of local tasks only keeps the hub off.
    """
    compute = compute or resolve_compute()
    local, standard = check_tasks(tasks, have_data=data is not None)
    if standard:
        fetch_standard(standard)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="drprune-harness-") as tmp_name:
        tmp = Path(tmp_name)
        folder, tok = hf_folder(model, tokenizer, tmp, trust_pickle)
        include = write_task_pack(local, Path(data), tok, tmp / "tasks", rows=rows, seed=seed) if local else None
        model_args = {"pretrained": str(folder), "tokenizer": str(tok), "trust_remote_code": written_by_drprune(folder),
                      "dtype": compute.dtype_name}
        with nullcontext() if standard else hub_offline():
            results = simple_evaluate(
                model="hf", model_args=model_args, tasks=tasks, batch_size=batch_size, device=str(compute.device),
                limit=limit, bootstrap_iters=bootstrap, log_samples=False, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
                task_manager=(TaskManager(include_path=include, include_defaults=bool(standard)) if local
                              else _standard_manager()))
    if results is None:
        raise RuntimeError("lm_eval returned no results on rank 0")
    results["config"]["model_args"].update(pretrained=str(model), tokenizer=str(tokenizer or model))  # not temp paths
    return results


def scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of a results dict ('acc,none' -> 'acc'; stderr kept as 'acc_stderr')."""
    return {task: {key.split(",")[0]: float(v) for key, v in metrics.items()
                   if "," in key and isinstance(v, (int, float))}
            for task, metrics in results["results"].items()}


def write_results(results: dict[str, Any], path: str | Path) -> None:
    """The harness's results JSON, written atomically."""
    from lm_eval.utils import handle_non_serializable


    write_json(path, results, default=handle_non_serializable, ensure_ascii=False)


def markdown_tables(results: dict[str, Any]) -> str:
    """The harness's own markdown table(s): tasks, then groups when there are any."""
    from lm_eval.utils import make_table

    return make_table(results) + (("\n" + make_table(results, "groups")) if results.get("groups") else "")
