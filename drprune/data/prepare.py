"""`drprune data prepare` / `merge`: raw text per domain → packed MDS shards.

Output: OUT/train/<domain>, OUT/eval/<domain>, OUT/eval/eval_merge; columns `tokens` (uint16 when the
vocabulary fits, else uint32) and `set` (the domain name). Everything is written under a temporary
folder renamed to OUT at the end (drprune.atomic), so a failure or a kill leaves nothing behind.

Eval-only ("held-out") domains (`eval_only=` / `--eval-only-domain`) are tokenized whole into
OUT/eval/<name> only: no OUT/train/<name>, and they are not in eval/eval_merge, which is the
training-time evaluator of the training domains. OUT/domains.json ({"train": [...], "eval_only":
[...]}, read back with `read_domains`) tells the two kinds apart for users, the loaders (which
refuse an eval-only domain in set_names) and `drprune eval`; its "tokenizer" entry records which
tokenizer made the ids (drprune.data.identity), so training and eval refuse a model with another one.

A synthetic "repeats" domain (`repeats_from=` / `--repeats-from DOMAIN`, named by `--repeats-name`)
is built from the train split of training domains: their text with spans of it repeated at a
distance within each row (drprune.data.repeats, which says how it differs from the copy probe). It
is written to OUT/train/<name> only, never to eval/ nor eval/eval_merge, so the copy probe and every
eval split stay held out; domains.json lists it under "train" (the mixture samples it like any other
domain) and describes it under "repeats".
"""
from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drprune.atomic import atomic_output, check_output
from drprune.data.repeats import limits_for, repeat_rows
from drprune.data.shards import Packer, ShardReader, finish, open_writer, token_dtype
from drprune.data.identity import DOMAINS_FILE, IDENTITY_KEY, tokenizer_identity
from drprune.data.sources import Tokenizer, check_source, iter_documents
from drprune.errors import UserError
from drprune.progress import Progress, track

log = logging.getLogger(__name__)

EVAL_MERGE = "eval_merge"
BATCH_DOCS = 256


@dataclass
class SplitStats:
    """What `prepare` wrote for one domain and split; `dropped` counts tail tokens too few for a sequence."""

    domain: str
    split: str
    documents: int
    tokens: int
    sequences: int
    dropped: int
    eval_only: bool = False  # a held-out domain (split "eval", never trained on)
    repeats_of: tuple[str, ...] = ()  # a synthetic repeats domain: the domains its text came from


def _check_names(names: list[str], eval_only: list[str] | None = None) -> None:
    eval_only = eval_only or []
    for name in [*names, *eval_only]:
        _check_name(name)
    if both := sorted(set(names) & set(eval_only)):
        raise UserError(f"domains {both} are given both as training (--domain) and eval-only "
                        "(--eval-only-domain) domains; a domain is one or the other")
    if len(set(names)) != len(names) or len(set(eval_only)) != len(eval_only):
        raise UserError(f"duplicate domain names in {[*names, *eval_only]}")


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or name == EVAL_MERGE:
        raise UserError(f"invalid domain name {name!r} (no '/', no leading '.', not {EVAL_MERGE!r})")


def _check_repeats(repeats_from: list[str], name: str, domains: list[str], eval_only: list[str]) -> None:
    """The repeats domain draws on training domains only and takes a name no other domain has."""
    if not repeats_from:
        return
    _check_name(name)
    if held_out := sorted(set(repeats_from) & set(eval_only)):
        raise UserError(f"--repeats-from {held_out}: eval-only domains are never trained on, so their text cannot "
                        "feed the repeats domain; name training (--domain) domains")
    if unknown := sorted(set(repeats_from) - set(domains)):
        raise UserError(f"--repeats-from names {unknown}, which are not among the --domain names {domains}")
    if len(set(repeats_from)) != len(repeats_from):
        raise UserError(f"--repeats-from {repeats_from} names a domain twice")
    if name in domains or name in eval_only:
        raise UserError(f"--repeats-name {name!r} is already a domain's name; pick another one")


def read_domains(root: Path) -> dict[str, list[str]] | None:
    """ROOT/domains.json as {"train": [...], "eval_only": [...]}, or None when absent (older data)."""
    path = Path(root) / DOMAINS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is corrupted: {err}") from err
    if not isinstance(data, dict) or not all(
            isinstance(data.get(k), list) and all(isinstance(n, str) for n in data[k]) for k in ("train", "eval_only")):
        raise UserError(f"{path} must hold {{\"train\": [names], \"eval_only\": [names]}}")
    return {"train": list(data["train"]), "eval_only": list(data["eval_only"])}


def prepare(domains: dict[str, Path], tokenizer: str, max_seq_len: int, out: Path, *,
            eval_fraction: float = 0.01, eval_sources: dict[str, Path] | None = None,
            max_tokens: int | None = None, seed: int = 0, text_field: str = "text",
            token_width: str = "auto", overwrite: bool = False,
            eval_only: dict[str, Path] | None = None, repeats_from: list[str] | None = None,
            repeats_name: str = "repeats") -> list[SplitStats]:
    """Tokenize, pack and write every domain; `max_tokens` caps the train tokens of each domain.

    `eval_only` {name: source}: held-out domains, all of their documents packed into OUT/eval/<name>
    only (reported with split "eval" and eval_only=True), never in train/ nor in eval/eval_merge.
    `repeats_from` [training domain names]: also write OUT/train/<repeats_name>, made from their train
    split (module docstring), seeded by `seed`.
    """
    eval_sources = {k: Path(v) for k, v in (eval_sources or {}).items()}
    domains = {k: Path(v) for k, v in domains.items()}
    held_out = {k: Path(v) for k, v in (eval_only or {}).items()}
    _check_names(list(domains), list(held_out))
    repeats_from = list(repeats_from or [])
    _check_repeats(repeats_from, repeats_name, list(domains), list(held_out))
    if repeats_from:
        limits_for(max_seq_len)  # rows too short for a span and its copy fail here, before tokenizing
    if not domains:
        raise UserError("every domain is eval-only: at least one training domain is needed (--domain NAME=PATH)"
                        if held_out else "no --domain NAME=PATH given")
    if unknown := set(eval_sources) & set(held_out):
        raise UserError(f"--eval-domain {sorted(unknown)}: an eval-only domain's eval data is its whole "
                        "--eval-only-domain source; give its text there")
    if unknown := set(eval_sources) - set(domains):
        raise UserError(f"--eval-domain names {sorted(unknown)} are not among the --domain names")
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0.0 and set(eval_sources) != set(domains):
        raise UserError("--eval-fraction 0 needs an --eval-domain for every domain (eval/ needs data)")
    if max_seq_len < 2:
        raise UserError(f"--max-seq-len must be >= 2, got {max_seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens (the train-token budget per domain) must be >= 1, got {max_tokens}; "
                        "leave it out to use all the text")
    check_output(out, overwrite, folder=True)
    for path in [*domains.values(), *eval_sources.values(), *held_out.values()]:
        check_source(path)
    tok = Tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size, token_width)
    log.info("vocab %d -> tokens stored as %s; EOS id %d appended after every document",
             tok.vocab_size, dtype.name, tok.eos_id)

    stats: list[SplitStats] = []
    start = time.perf_counter()
    with atomic_output(Path(out), overwrite, folder=True) as tmp:
        for name, path in domains.items():
            stats += _prepare_domain(name, path, eval_sources.get(name), tok, dtype, max_seq_len, tmp,
                                     eval_fraction, max_tokens, seed, text_field)
        for name, path in held_out.items():
            stats.append(_prepare_eval_only(name, path, tok, dtype, max_seq_len, tmp, text_field))
        listing = {"train": list(domains), "eval_only": list(held_out)}
        if repeats_from:
            stats.append(_prepare_repeats(repeats_name, repeats_from, tmp, dtype, max_seq_len, seed))
            listing["train"].append(repeats_name)
            listing["repeats"] = {repeats_name: {"from": repeats_from, "seed": seed,
                                                 **limits_for(max_seq_len).as_dict()}}
        merged = merge(tmp / "eval", tmp / "eval", EVAL_MERGE, list(domains))  # natural training domains only
        stats.append(SplitStats("(all)", f"eval/{EVAL_MERGE}", 0, merged * max_seq_len, merged, 0))
        (tmp / DOMAINS_FILE).write_text(json.dumps({**listing, IDENTITY_KEY: tokenizer_identity(tok, tokenizer)},
                                                   indent=2) + "\n")
    seconds = time.perf_counter() - start
    total = sum(s.tokens for s in stats if s.domain != "(all)")
    log.info("prepared %d tokens in %.1fs (%.0f tokens/s) into %s", total, seconds, total / seconds, out)
    return stats


def _prepare_domain(name: str, path: Path, eval_path: Path | None, tok: Tokenizer, dtype: np.dtype,
                    seq_len: int, root: Path, eval_fraction: float, max_tokens: int | None,
                    seed: int, text_field: str) -> list[SplitStats]:
    train = Packer(open_writer(root / "train" / name, dtype), name, seq_len, dtype)
    evals = Packer(open_writer(root / "eval" / name, dtype), name, seq_len, dtype)
    # Holdout is per document, seeded by (seed, domain name): stable when domains are added.
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    holdout = eval_fraction if eval_path is None else 0.0
    budget_hit = False
    with Progress(f"prepare {name}", unit="docs") as progress:
        for batch in _batches(iter_documents(path, text_field)):
            ids = tok.encode(batch)
            to_eval = rng.random(len(ids)) < holdout
            train.add([d for d, e in zip(ids, to_eval) if not e], tok.eos_id)
            evals.add([d for d, e in zip(ids, to_eval) if e], tok.eos_id)
            progress.update(len(batch))
            if max_tokens is not None and train.tokens >= max_tokens:
                budget_hit = True
                break
        if eval_path is not None:
            for batch in _batches(iter_documents(eval_path, text_field)):
                evals.add(tok.encode(batch), tok.eos_id)
                progress.update(len(batch))
    if budget_hit:
        log.info("domain %s: token budget %d reached, rest of %s skipped", name, max_tokens, path)
    train.close()
    evals.close()
    for packer, split in ((train, "train"), (evals, "eval")):
        if packer.sequences == 0:
            raise UserError(f"domain {name}: the {split} split has no full {seq_len}-token sequence "
                            f"({packer.tokens} tokens); give more text, a smaller --max-seq-len "
                            + ("or a larger --eval-fraction" if split == "eval" else "or a smaller --eval-fraction"))
        log.info("domain %s %s: %d docs, %d tokens, %d sequences, %d tail tokens dropped",
                 name, split, packer.documents, packer.tokens, packer.sequences, packer.dropped)
    return [SplitStats(name, s, p.documents, p.tokens, p.sequences, p.dropped)
            for p, s in ((train, "train"), (evals, "eval"))]


def _prepare_eval_only(name: str, path: Path, tok: Tokenizer, dtype: np.dtype, seq_len: int, root: Path,
                       text_field: str) -> SplitStats:
    """Every document of a held-out domain into root/eval/<name>; nothing under train/."""
    evals = Packer(open_writer(root / "eval" / name, dtype), name, seq_len, dtype)
    with Progress(f"prepare {name} (eval-only)", unit="docs") as progress:
        for batch in _batches(iter_documents(path, text_field)):
            evals.add(tok.encode(batch), tok.eos_id)
            progress.update(len(batch))
    evals.close()
    if evals.sequences == 0:
        raise UserError(f"eval-only domain {name}: {path} holds no full {seq_len}-token sequence "
                        f"({evals.tokens} tokens); give more text or a smaller --max-seq-len")
    log.info("eval-only domain %s: %d docs, %d tokens, %d sequences, %d tail tokens dropped",
             name, evals.documents, evals.tokens, evals.sequences, evals.dropped)
    return SplitStats(name, "eval", evals.documents, evals.tokens, evals.sequences, evals.dropped, eval_only=True)


def _prepare_repeats(name: str, sources: list[str], root: Path, dtype: np.dtype, seq_len: int,
                     seed: int) -> SplitStats:
    """root/train/<name>: repeats rows from the train split of each source domain (read back from root, so
    no eval document is ever used), domain by domain; each row's tokens come from one domain."""
    writer = open_writer(root / "train" / name, dtype)
    rng = np.random.default_rng([seed, zlib.crc32(f"repeats/{name}".encode())])
    rows = copies = 0
    with Progress(f"prepare {name} (repeats of {', '.join(sources)})", unit="rows") as progress:
        for source in sources:
            reader = ShardReader(root / "train" / source)
            chunks = (reader[i]["tokens"] for i in range(len(reader)))
            for row, row_copies in repeat_rows(chunks, seq_len, rng):
                writer.write({"tokens": row.astype(dtype), "set": name})
                rows += 1
                copies += len(row_copies)
                progress.update(1)
    finish(writer)
    if rows == 0:
        raise UserError(f"repeats domain {name}: the train text of {sources} is too short for one {seq_len}-token "
                        "row; give more text or a smaller --max-seq-len")
    log.info("repeats domain %s from %s: %d rows, %d copied spans (%.1f per row)", name, sources, rows, copies,
             copies / rows)
    return SplitStats(name, "train", 0, rows * seq_len, rows, 0, repeats_of=tuple(sources))


def _batches(docs, size: int = BATCH_DOCS):
    batch: list[str] = []
    for doc in docs:
        if doc:
            batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def merge(input_dir: Path, output_dir: Path, output_split: str, split_names: list[str],
          overwrite: bool = False) -> int:
    """Concatenate the MDS folders input_dir/<name> (in the given order) into output_dir/output_split."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not split_names:
        raise UserError("--split-names is empty")
    if not output_split or "/" in output_split or output_split.startswith("."):
        raise UserError(f"--output-split {output_split!r} must be a plain folder name (no '/', no leading '.'), "
                        f"e.g. {EVAL_MERGE}")
    check_output(output_dir / output_split, overwrite, folder=True)
    readers = [ShardReader(input_dir / name) for name in split_names]
    encodings = {r.folder: dict(zip(r.shards[0].column_names, r.shards[0].column_encodings)) for r in readers}
    first = next(iter(encodings.values()))
    for folder, enc in encodings.items():
        if enc != first or set(enc) != {"tokens", "set"}:
            raise UserError(f"{folder} has columns {enc}, expected {first} like the other splits")
    dtype = np.dtype(first["tokens"].split(":")[1])
    total = 0
    with atomic_output(output_dir / output_split, overwrite, folder=True) as tmp:
        writer = open_writer(tmp, dtype)
        for reader in readers:
            for i in track(range(len(reader)), f"merge {reader.folder.name}", unit="samples"):
                writer.write(reader[i])
            total += len(reader)
        finish(writer)
    log.info("merged %s into %s (%d samples)", split_names, output_dir / output_split, total)
    return total


def _split_label(s: SplitStats) -> str:
    if s.eval_only:
        return f"{s.split} (eval-only)"
    if s.repeats_of:
        return f"{s.split} (repeats of {', '.join(s.repeats_of)})"
    return s.split


def summary_table(stats: list[SplitStats]) -> str:
    """The stats as an aligned text table, for the CLI to print (the library only logs)."""
    rows = [("domain", "split", "documents", "tokens", "sequences", "dropped")]
    rows += [(s.domain, _split_label(s), str(s.documents), str(s.tokens), str(s.sequences), str(s.dropped))
             for s in stats]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)
