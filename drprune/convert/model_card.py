"""The README.md (model card) of every HF folder drprune writes.

A pruned folder on its own says nothing about where it came from; the card records what a user
needs to trust and reuse it: the source model, the pruning method and its options, the requested
and the achieved shape, parameter counts, training tokens, evaluation results and how to load it.
Writers know the shape (the config); callers fill a `ModelCard` with what only they know. The card
is JSON round-trippable, so `drprune compact` stores it in the compact checkpoint and a later
`drprune convert composer-to-hf` renders it.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from drprune import __version__
from drprune.convert.hf import EXTRA_STATE_KEY, HUB_PREFIX
from drprune.models.shapes import RESIDUAL_SELECTIONS, config_params
from drprune.models.config import LayerSpec, ModelConfig

log = logging.getLogger(__name__)

CARD_KEY = "model_card"  # key of the card in a checkpoint's `model._extra_state`
README = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_CACHE = re.compile(r"^models--([^/]+?)--(.+)$")  # huggingface_hub's cache folder of a repo
# ModelConfig target keys -> rows of the shape table
_SHAPE_ROWS = {"n_layers": "layers", "n_heads": "attention heads", "n_kv_heads": "KV heads",
               "head_dim": "head dim", "d_model": "hidden size", "intermediate_size": "intermediate size",
               "vocab_size": "vocab size"}


@dataclass
class EvalTable:
    """One table of scores: a caption saying what the numbers are, one column per model."""

    caption: str
    columns: list[str]
    rows: dict[str, list[Any]]  # row label -> one value per column (None: not measured)


@dataclass
class ModelCard:
    """What the writer of a folder cannot see for itself: where the model came from and how it scored."""

    source: str | None = None  # the source model as the user named it (folder, hub id, checkpoint)
    base_model: str | None = None  # the source's hub id, for the front matter
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    method: str | None = None  # short name of the pruning method; None: not pruned here
    options: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)  # the requested shape (ModelConfig keys)
    source_config: dict[str, Any] | None = None  # ModelConfig.to_dict() of the source
    training_tokens: int | None = None
    evaluation: list[EvalTable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelCard":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["evaluation"] = [t if isinstance(t, EvalTable) else EvalTable(**t)
                                for t in values.get("evaluation", [])]
        return cls(**values)

    def with_source_facts(self, name_or_path: str | Path) -> "ModelCard":
        """This card with the base model and license that the source model tells (fields already set win)."""
        facts = {k: v for k, v in source_facts(name_or_path).items() if getattr(self, k) is None}
        return ModelCard.from_dict({**self.to_dict(), **facts})


def card_of_state(state: Mapping[str, Any]) -> ModelCard | None:
    """The card a checkpoint carries in its extra state (`drprune compact` writes one), if any."""
    extra = state.get(EXTRA_STATE_KEY)
    data = extra.get(CARD_KEY) if isinstance(extra, dict) else None
    return ModelCard.from_dict(data) if isinstance(data, dict) else None


def source_facts(name_or_path: str | Path) -> dict[str, str]:
    """base_model and license of a source model, where they can be known without a network.

    A hub id (`org/name` or `hub:org/name`) is its own base_model; a local folder tells its license in
    its README's front matter and its hub id when it is a huggingface_hub cache snapshot
    (`models--org--name/snapshots/...`).
    """
    path = Path(name_or_path)
    if not path.exists():
        name = str(name_or_path).removeprefix(HUB_PREFIX)
        return {"base_model": name} if _HUB_ID.match(name) else {}
    out: dict[str, str] = {}
    for part in path.resolve().parts:
        match = _HUB_CACHE.match(part)
        if match:
            out["base_model"] = f"{match.group(1)}/{match.group(2)}"
    readme = path / README
    if path.is_dir() and readme.is_file():
        meta = _front_matter(readme)
        out.update({k: str(meta[k]) for k in ("license", "license_name", "license_link") if meta.get(k)})
    return out


def _front_matter(readme: Path) -> dict[str, Any]:
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(readme) or {}
    except Exception as err:  # noqa: BLE001 - a malformed card of someone else's model must not stop an export
        log.warning("cannot read the front matter of %s (%s): the card names no license", readme, err)
        return {}


# ---------------------------------------------------------------- rendering

def render_card(card: ModelCard, cfg: ModelConfig, *, remote_code: bool, tokenizer: bool = True) -> str:
    """README.md text for a folder holding a model of shape `cfg` (and a tokenizer, when `tokenizer`)."""
    sections = [_front(card), _intro(card), _provenance(card), _shape(card, cfg)]
    if card.evaluation:
        sections.append("## Evaluation\n\n" + "\n\n".join(_eval_table(t) for t in card.evaluation))
    sections.append(_usage(remote_code, tokenizer))
    return "\n\n".join(s for s in sections if s) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _front(card: ModelCard) -> str:
    from huggingface_hub import ModelCardData

    tags = ["drprune"] + (["pruned", _slug(card.method)] if card.method else [])
    data = ModelCardData(base_model=card.base_model, library_name="transformers", license=card.license,
                         license_name=card.license_name, license_link=card.license_link,
                         pipeline_tag="text-generation", tags=tags)
    return f"---\n{data.to_yaml()}\n---"


def _intro(card: ModelCard) -> str:
    what = (f"pruned with drprune (method `{card.method}`)" if card.method
            else "written by drprune (no pruning recorded)")
    source = f" from `{card.source}`" if card.source else ""
    name = card.base_model or card.source
    lines = [f"# {Path(name).name if name else 'drprune model'}{' (pruned)' if card.method else ''}", "",
             f"A causal language model {what}{source}."]
    lines += ["", *card.notes] if card.notes else []
    return "\n".join(lines)


def _provenance(card: ModelCard) -> str:
    rows = [("written by", f"drprune {__version__}")]
    rows += [(label, value) for label, value in (("source", card.source), ("base model", card.base_model),
                                                 ("license", card.license), ("method", card.method)) if value]
    rows += [(f"option `{k}`", f"`{json.dumps(v)}`") for k, v in card.options.items()]
    if card.training_tokens is not None:
        rows.append(("training tokens", f"{card.training_tokens:,}"))
    return "## Provenance\n\n" + _table(["", ""], [[a, str(b)] for a, b in rows])


def _shape_column(cfg: ModelConfig) -> dict[str, str]:
    varies = not cfg.is_uniform
    col = {label: str(getattr(cfg, key)) for key, label in _SHAPE_ROWS.items()}
    if varies:
        for key in ("n_heads", "n_kv_heads", "intermediate_size"):
            col[_SHAPE_ROWS[key]] = "per layer, below"
    col["parameters"] = f"{config_params(cfg):,}"
    col["non-embedding parameters"] = f"{config_params(cfg, embeddings=False):,}"
    return col


def _shape(card: ModelCard, cfg: ModelConfig) -> str:
    columns: dict[str, dict[str, str]] = {}
    if card.source_config is not None:
        columns["source"] = _shape_column(ModelConfig.from_dict(card.source_config))
    if card.target:
        columns["target"] = {_SHAPE_ROWS[k]: str(v) for k, v in card.target.items() if k in _SHAPE_ROWS}
    columns["this model"] = _shape_column(cfg)
    labels = [*_SHAPE_ROWS.values(), "parameters", "non-embedding parameters"]
    body = _table(["", *columns], [[label, *(c.get(label, "") for c in columns.values())] for label in labels])
    if not cfg.is_uniform:
        body += "\n\nLayers differ in shape:\n\n" + _per_layer(cfg)
    return "## Shape\n\n" + body


def _per_layer(cfg: ModelConfig) -> str:
    specs = [cfg.layer_spec(i) for i in range(cfg.n_layers)]
    residual = [n for n in RESIDUAL_SELECTIONS if any(getattr(s, n) is not None for s in specs)]

    def width(s: LayerSpec, name: str) -> str:
        if not (s.has_attn if name.startswith("attn") else s.has_mlp):
            return "–"  # the sub-layer is removed
        selection = getattr(s, name)
        return str(cfg.d_model if selection is None else len(selection))

    rows = [[str(i), str(s.n_heads), str(s.n_kv_heads), str(s.intermediate_size), *(width(s, n) for n in residual)]
            for i, s in enumerate(specs)]
    return _table(["layer", "heads", "KV heads", "intermediate", *(f"{n} width" for n in residual)], rows)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _eval_table(table: EvalTable) -> str:
    rows = [[label, *(_cell(v) for v in values)] for label, values in table.rows.items()]
    return f"{table.caption}\n\n" + _table(["", *table.columns], rows)


def _usage(remote_code: bool, tokenizer: bool) -> str:
    flag = ", trust_remote_code=True" if remote_code else ""
    why = ("\n\nNo stock transformers class holds this shape (e.g. layers that differ): the folder ships its own "
           "modeling code (`modeling_drprune.py`, model_type `drprune`), so loading needs `trust_remote_code=True`."
           if remote_code else "")
    return ("## How to load\n\n```python\nfrom transformers import AutoModelForCausalLM"
            + (", AutoTokenizer" if tokenizer else "") + "\n\n"
            'path = "path/to/this/folder"  # or its hub repo id\n'
            f"model = AutoModelForCausalLM.from_pretrained(path{flag})\n"
            + ("tokenizer = AutoTokenizer.from_pretrained(path)\n" if tokenizer else "")
            + "```" + why + ("" if tokenizer else "\n\nThe folder holds no tokenizer: use the source model's."))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_card(card: ModelCard | None, cfg: ModelConfig, folder: Path, *, remote_code: bool) -> None:
    """README.md inside a folder being written (the caller's atomic temporary), after its tokenizer files."""
    tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    (folder / README).write_text(render_card(card or ModelCard(), cfg, remote_code=remote_code, tokenizer=tokenizer))
