"""Build a multi-domain raw-text corpus from a small YAML (configs/demo/corpus.yaml).

Each domain is a name plus files or globs; the output is one JSONL file per domain (one document
chunk per line) that `drprune data prepare` reads. Documents are cut into paragraph-aligned chunks
so the per-document eval holdout works even for domains made of a few long files (licenses).

Domain keys: `files` (required), `format` (text | conversations | python_strings) and `eval_only`
(true/false, default false). An eval-only ("held-out") domain is built like any other, so
`build_corpus` returns an entry for it too, but it must never be trained on: the caller asks
`spec.eval_only_names()` (and `spec.train_names()` for the rest) and passes those JSONL files to
`prepare(..., eval_only={name: path})` instead of `domains=`. A spec whose every domain is
eval-only is refused by `load_spec` (at least one training domain is needed).

`format: python_strings` reads a Python file without running it and takes its string literals
(docstrings, and string constants such as the stdlib's pydoc_data/topics.py, the Python
documentation's prose) in source order, one document each; literals without any whitespace
(identifiers, dictionary keys) and f-string pieces are skipped. Implicitly concatenated literals
form one string.
"""
from __future__ import annotations

import ast
import glob
import importlib.util
import json
import random
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from drprune.atomic import write_text
from drprune.errors import UserError

FORMATS = ("text", "conversations", "python_strings")
DOMAIN_KEYS = ("files", "format", "eval_only")
_PKG = re.compile(r"\{pkg:([A-Za-z0-9_.]+)\}")


@dataclass
class Domain:
    """One `domains:` entry of the corpus YAML: its file patterns and how to read them."""

    name: str
    patterns: list[str]
    format: str = "text"
    eval_only: bool = False  # held out: evaluated, never trained on (see the module docstring)


@dataclass
class CorpusSpec:
    """The parsed corpus YAML (`load_spec`); relative patterns resolve against `root`, the YAML's folder."""

    domains: list[Domain]
    packages: dict[str, str] = field(default_factory=dict)
    max_chars_per_domain: int = 600_000
    chunk_chars: int = 2000
    seed: int = 0
    root: Path = Path(".")

    def train_names(self) -> list[str]:
        """The domains to train on, in YAML order."""
        return [d.name for d in self.domains if not d.eval_only]

    def eval_only_names(self) -> list[str]:
        """The held-out domains (`eval_only: true`), in YAML order: evaluate them, never train on them."""
        return [d.name for d in self.domains if d.eval_only]


def load_spec(path: str | Path) -> CorpusSpec:
    """Parse and validate the corpus YAML (no file is read yet besides the YAML itself)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"corpus config {path} does not exist")
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"corpus config {path} is not valid YAML: {' '.join(str(err).split())}; fix the file") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("domains"), dict) or not raw["domains"]:
        raise UserError(f"{path}: needs a non-empty `domains:` mapping of name -> {{files: [...]}}")
    domains = []
    for name, node in raw["domains"].items():
        files = node.get("files") if isinstance(node, dict) else None
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise UserError(f"{path}: domain {name!r} needs `files:` as a non-empty list of paths or globs")
        if unknown := sorted(str(k) for k in node if k not in DOMAIN_KEYS):
            raise UserError(f"{path}: domain {name!r} has unknown keys {unknown}; valid: {', '.join(DOMAIN_KEYS)}")
        fmt = node.get("format", "text")
        if fmt not in FORMATS:
            raise UserError(f"{path}: domain {name!r} has format {fmt!r}; valid: {', '.join(FORMATS)}")
        eval_only = node.get("eval_only", False)
        if not isinstance(eval_only, bool):
            raise UserError(f"{path}: domain {name!r} has eval_only: {eval_only!r}; it must be true or false")
        domains.append(Domain(str(name), files, fmt, eval_only))
    if all(d.eval_only for d in domains):
        raise UserError(f"{path}: every domain is eval_only; at least one training domain is needed")
    spec = CorpusSpec(domains, dict(raw.get("packages") or {}), root=path.parent.resolve())
    for key in ("max_chars_per_domain", "chunk_chars", "seed"):
        if key in raw:
            setattr(spec, key, int(raw[key]))
    if spec.max_chars_per_domain <= 0 or spec.chunk_chars <= 0:
        raise UserError(f"{path}: max_chars_per_domain and chunk_chars must be positive")
    return spec


def missing_packages(spec: CorpusSpec) -> list[str]:
    """Import names used as {pkg:NAME} placeholders that are not installed."""
    names = {m for d in spec.domains for p in d.patterns for m in _PKG.findall(p)}
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


def install_hint(spec: CorpusSpec, names: list[str]) -> str:
    """The pip command (no deps) for the missing {pkg:NAME} packages, with requirements from the YAML's `packages:`."""
    reqs = " ".join(spec.packages.get(n, n) for n in names)
    return f"{sys.executable} -m pip install --no-deps {reqs}"


def _package_dir(name: str) -> str:
    found = importlib.util.find_spec(name)
    if found is None or not found.submodule_search_locations:
        raise UserError(f"package {name!r} is not installed (or is not a package folder)")
    return list(found.submodule_search_locations)[0]


def resolve_files(spec: CorpusSpec, domain: Domain) -> list[Path]:
    """Expand placeholders and globs; every pattern must match at least one file."""
    out: list[Path] = []
    for pattern in domain.patterns:
        expanded = _PKG.sub(lambda m: _package_dir(m.group(1)), pattern)
        expanded = expanded.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
        if not Path(expanded).is_absolute():
            expanded = str(spec.root / expanded)
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"domain {domain.name!r}: {pattern!r} matches no file (expanded: {expanded})")
        out += files
    return list(dict.fromkeys(out))


def _conversations(path: Path) -> Iterator[str]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"cannot read conversations from {path}: {err}") from err
    dialogues = data.get("conversations") if isinstance(data, dict) else None
    if not isinstance(dialogues, list):
        raise UserError(f"{path}: format `conversations` needs a top-level `conversations:` list")
    for turns in dialogues:
        if isinstance(turns, list) and turns:
            yield "\n".join(f"{'A' if i % 2 == 0 else 'B'}: {str(t).strip()}" for i, t in enumerate(turns))


def _python_strings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as err:
        raise UserError(f"cannot read string literals from {path} (format python_strings): {err}") from err
    nodes = list(ast.walk(tree))
    in_fstring = {id(v) for n in nodes if isinstance(n, ast.JoinedStr) for v in n.values}
    found = [n for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in in_fstring]
    for node in sorted(found, key=lambda n: (n.lineno, n.col_offset)):
        if any(c.isspace() for c in node.value):
            yield node.value


def _documents(path: Path, fmt: str) -> Iterator[str]:
    if fmt == "conversations":
        yield from _conversations(path)
        return
    if fmt == "python_strings":
        yield from _python_strings(path)
        return
    try:
        yield path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path} as UTF-8 text: {err}") from err


def chunk(text: str, size: int) -> list[str]:
    """Paragraph-aligned pieces of about `size` characters (a longer paragraph stays whole)."""
    pieces, current = [], ""
    for para in re.split(r"\n\s*\n", text.strip()):
        if current and len(current) + len(para) + 2 > size:
            pieces.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current.strip():
        pieces.append(current)
    return pieces


def build_corpus(spec: CorpusSpec, out_dir: str | Path) -> dict[str, dict[str, int]]:
    """Write out_dir/<domain>.jsonl for every domain (eval-only ones too); returns files/chunks/chars per domain.

    Which of them are held out is `spec.eval_only_names()`; the returned dict does not say.
    """
    if missing := missing_packages(spec):
        raise UserError(f"the corpus needs packages that are not installed ({', '.join(missing)}): "
                        f"run  {install_hint(spec, missing)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for domain in spec.domains:
        files = resolve_files(spec, domain)
        random.Random(f"{spec.seed}:{domain.name}").shuffle(files)
        chunks, chars = [], 0
        for path in files:
            for doc in _documents(path, domain.format):
                for piece in chunk(doc, spec.chunk_chars):
                    chunks.append(piece)
                    chars += len(piece)
            if chars >= spec.max_chars_per_domain:
                break
        if not chunks:
            raise UserError(f"domain {domain.name!r}: its files hold no text")
        write_text(out_dir / f"{domain.name}.jsonl", "".join(json.dumps({"text": c}) + "\n" for c in chunks))
        stats[domain.name] = {"files": len(files), "chunks": len(chunks), "chars": chars}
    return stats
