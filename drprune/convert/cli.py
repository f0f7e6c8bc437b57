"""`drprune convert`: hf-to-composer, composer-to-hf, gguf-to-hf and hf-to-gguf."""
from __future__ import annotations

import argparse
import json
import logging

from drprune.atomic import check_output
from drprune.cli_options import add_export_options, add_trust_pickle
from drprune.errors import UserError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `drprune convert` and its four directions to the sub-commands."""
    convert = subparsers.add_parser("convert", help="convert checkpoints between HF and Composer")
    sub = convert.add_subparsers(dest="direction", required=True)

    h2c = sub.add_parser("hf-to-composer", help="HF folder (or hub:NAME) -> Composer checkpoint")
    h2c.add_argument("hf_dir", help="local HF model folder, or hub:NAME to download NAME from the Hugging Face Hub")
    h2c.add_argument("out", help="output checkpoint path (.pt)")
    h2c.add_argument("--overwrite", action="store_true")
    add_trust_pickle(h2c)
    h2c.set_defaults(func=hf_to_composer)

    c2h = sub.add_parser("composer-to-hf", help="Composer checkpoint -> HF folder (config.json + safetensors)")
    c2h.add_argument("ckpt", help="Composer checkpoint (.pt), e.g. the output of `drprune compact`")
    c2h.add_argument("out_dir")
    c2h.add_argument("overrides", nargs="*", metavar="key=value",
                     help="config.json fields (optional; the shape is read from the checkpoint; "
                          "max_position_embeddings=N and torch_dtype=D are --context-length and --dtype)")
    c2h.add_argument("--tokenizer", help="folder whose tokenizer files are copied into the output")
    c2h.add_argument("--max-shard-size", type=float, default=2.0, help="GiB per safetensors shard")
    c2h.add_argument("--base-model", metavar="HF_DIR_OR_ID",
                     help="the source model (hub id or HF folder): the README names it and its license")
    add_export_options(c2h)
    c2h.add_argument("--overwrite", action="store_true")
    add_trust_pickle(c2h)
    c2h.set_defaults(func=composer_to_hf)

    g2h = sub.add_parser("gguf-to-hf", help="llama-family GGUF file -> HF folder (de-quantized, with tokenizer)")
    g2h.add_argument("gguf_file")
    g2h.add_argument("out_dir")
    g2h.add_argument("--overwrite", action="store_true")
    g2h.set_defaults(func=gguf_to_hf)

    h2g = sub.add_parser("hf-to-gguf",
                         help="llama-family HF folder (or drprune checkpoint) -> GGUF file with tokenizer")
    h2g.add_argument("hf_dir", help="HF model folder, or a compacted drprune checkpoint (.pt)")
    h2g.add_argument("out", help="output .gguf file")
    h2g.add_argument("--dtype", default="f16", help="f32, f16 (default) or q8_0 for the matrices; norms stay f32")
    h2g.add_argument("--tokenizer", help="folder with the tokenizer (default: HF_DIR; required for a checkpoint)")
    h2g.add_argument("--overwrite", action="store_true")
    h2g.set_defaults(func=hf_to_gguf)


def hf_to_gguf(args: argparse.Namespace) -> None:
    """`convert hf-to-gguf`; OUT is checked before the (slow) model read."""
    from drprune.convert.gguf_export import hf_to_gguf as convert

    check_output(args.out, args.overwrite)
    convert(args.hf_dir, args.out, dtype=args.dtype, tokenizer_dir=args.tokenizer, overwrite=args.overwrite)


def gguf_to_hf(args: argparse.Namespace) -> None:
    """`convert gguf-to-hf`; OUT_DIR is checked before the (slow) model read."""
    from drprune.convert.gguf import gguf_to_hf as convert

    check_output(args.out_dir, args.overwrite, folder=True)
    convert(args.gguf_file, args.out_dir, overwrite=args.overwrite)


def hf_to_composer(args: argparse.Namespace) -> None:
    """`convert hf-to-composer`; the checkpoint carries the config, so later steps need no shape flags."""
    from drprune.convert.checkpoint import load_hf, save_checkpoint
    from drprune.models.decoder import PrunableDecoder

    check_output(args.out, args.overwrite)
    cfg, tensors, hf_dir = load_hf(args.hf_dir, args.trust_pickle)
    log.info("read %s: family=%s d_model=%d layers=%d heads=%d/%d context=%d dtype=%s", hf_dir, cfg.family,
             cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.context_length, cfg.dtype or "unknown")
    state = {f"model.{k}": v for k, v in tensors.items()}
    state["model._extra_state"] = PrunableDecoder.extra_state_for(cfg)
    save_checkpoint(state, args.out, overwrite=args.overwrite)


def parse_overrides(items: list[str]) -> dict:
    """'key=value' items as a dict; a value is parsed as JSON when it can be (numbers, booleans), else kept as text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def composer_to_hf(args: argparse.Namespace) -> None:
    """`convert composer-to-hf`; a `model_class` override is dropped: the checkpoint decides the class."""
    from drprune.compact.export import export_checkpoint

    if not args.max_shard_size > 0:
        raise UserError(f"--max-shard-size={args.max_shard_size} must be > 0 (GiB per safetensors file, e.g. 2)")
    if args.context_length is not None and args.context_length < 1:
        raise UserError(f"--context-length={args.context_length} must be >= 1 (the model's context, e.g. 8192)")
    check_output(args.out_dir, args.overwrite, folder=True)
    overrides = parse_overrides(args.overrides)
    overrides.pop("model_class", None)  # the seed's flag; the class follows from the checkpoint
    export_checkpoint(args.ckpt, args.out_dir, tokenizer_dir=args.tokenizer, config_overrides=overrides,
                      max_shard_bytes=int(args.max_shard_size * 1024**3), overwrite=args.overwrite,
                      base_model=args.base_model, trust_pickle=args.trust_pickle, dtype=args.dtype,
                      context_length=args.context_length)
