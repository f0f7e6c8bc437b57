"""`drprune convert`: hf-to-composer and composer-to-hf."""
from __future__ import annotations

import argparse
import json
import logging

from drprune.errors import UserError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser("convert", help="convert checkpoints between HF and Composer")
    sub = convert.add_subparsers(dest="direction", required=True)

    h2c = sub.add_parser("hf-to-composer", help="HF folder (or hub id) -> Composer checkpoint")
    h2c.add_argument("hf_dir", help="local HF model folder or hub repo id")
    h2c.add_argument("out", help="output checkpoint path (.pt)")
    h2c.add_argument("--overwrite", action="store_true")
    h2c.set_defaults(func=hf_to_composer)

    c2h = sub.add_parser("composer-to-hf", help="Composer checkpoint -> HF folder (config.json + safetensors)")
    c2h.add_argument("ckpt", help="Composer checkpoint (.pt), e.g. the output of `drprune compact`")
    c2h.add_argument("out_dir")
    c2h.add_argument("overrides", nargs="*", metavar="key=value",
                     help="config.json fields (optional; the shape is read from the checkpoint)")
    c2h.add_argument("--tokenizer", help="folder whose tokenizer files are copied into the output")
    c2h.add_argument("--max-shard-size", type=float, default=2.0, help="GiB per safetensors shard")
    c2h.add_argument("--overwrite", action="store_true")
    c2h.set_defaults(func=composer_to_hf)

    g2h = sub.add_parser("gguf-to-hf", help="llama-family GGUF file -> HF folder (de-quantized, with tokenizer)")
    g2h.add_argument("gguf_file")
    g2h.add_argument("out_dir")
    g2h.add_argument("--overwrite", action="store_true")
    g2h.set_defaults(func=gguf_to_hf)


def gguf_to_hf(args: argparse.Namespace) -> None:
    from drprune.convert.gguf import gguf_to_hf as convert

    convert(args.gguf_file, args.out_dir, overwrite=args.overwrite)


def hf_to_composer(args: argparse.Namespace) -> None:
    from drprune.convert.checkpoint import load_hf, save_checkpoint
    from drprune.models.decoder import PrunableDecoder

    cfg, tensors, hf_dir = load_hf(args.hf_dir)
    log.info("read %s: family=%s d_model=%d layers=%d heads=%d/%d", hf_dir, cfg.family, cfg.d_model,
             cfg.n_layers, cfg.n_heads, cfg.n_kv_heads)
    state = {f"model.{k}": v for k, v in tensors.items()}
    state["model._extra_state"] = PrunableDecoder.extra_state_for(cfg)
    save_checkpoint(state, args.out, overwrite=args.overwrite)


def parse_overrides(items: list[str]) -> dict:
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
    from drprune.compact.export import export_hf, hf_config
    from drprune.convert.checkpoint import config_of_state, decoder_state, load_model_state, mapped_releaser
    from drprune.convert.hf import hf_config_dict, stock_class_fits

    state = load_model_state(args.ckpt)
    if any(k.startswith("mask_generator.") for k in state):
        raise UserError(
            f"{args.ckpt} is a pruning checkpoint with masks: run `drprune compact {args.ckpt}` first "
            "and convert its output"
        )
    cfg = config_of_state(state)
    overrides = parse_overrides(args.overrides)
    overrides.pop("model_class", None)  # the seed's flag; the class follows from the checkpoint
    derived = hf_config_dict(cfg) if stock_class_fits(cfg) else hf_config(cfg)
    conflicts = {k: (v, derived[k]) for k, v in overrides.items() if k in derived and derived[k] != v}
    if conflicts:
        raise UserError(
            "overrides contradict the checkpoint's shape (drop them; the shape is read from the "
            f"checkpoint): {', '.join(f'{k}={v!r} but checkpoint has {d!r}' for k, (v, d) in conflicts.items())}"
        )
    export_hf(
        cfg, decoder_state(state), args.out_dir, tokenizer_dir=args.tokenizer, config_overrides=overrides,
        max_shard_bytes=int(args.max_shard_size * 1024**3), overwrite=args.overwrite, release=mapped_releaser(state),
    )
