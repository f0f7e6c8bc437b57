"""The model's context length (HF max_position_embeddings, and the RoPE scaling computed from it) is the
source's through conversion, a pruning run at a shorter training length, compaction and every export.

The source uses YaRN without `original_max_position_embeddings`, so its RoPE frequencies are computed from
the context length: a model rebuilt with the training length as its context rotates positions differently,
and logits at positions past the training length show it.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from drprune.cli import main
from drprune.compact.export import export_hf
from drprune.convert.checkpoint import config_of_state, load_decoder, load_model_state, save_checkpoint
from drprune.masks import mask_generator_from_state
from drprune.models.config import ModelConfig, with_context_length
from drprune.models.decoder import PrunableDecoder
from drprune.run_config import ModelSection
from drprune.data.testing import write_synthetic_mds
from drprune.train import build_trainer, load_config, model_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "prune.yaml")
CONTEXT, TRAIN_LEN, PROBE_LEN = 8192, 64, 100
YARN = {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.25}
IDS = torch.randint(0, 49152, (2, PROBE_LEN), generator=torch.Generator().manual_seed(3))


def source_model(rope_scaling: dict | None) -> transformers.LlamaForCausalLM:
    """A random llama with configs/tiny/prune.yaml's shape and an 8192-token context."""
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                      tie_word_embeddings=True, max_position_embeddings=CONTEXT,
                                      rope_scaling=rope_scaling)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.1)
    return model


def byte_level_bpe(out: Path) -> Path:
    """A small byte-level BPE tokenizer (the kind GGUF export writes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
    return out


def logits(model, ids: torch.Tensor, masks=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits if masks is None and hasattr(model, "config") else model(ids, masks)


@pytest.mark.parametrize("rope_scaling", [YARN, None], ids=["yarn", "plain"])
def test_the_source_context_survives_training_at_64_tokens_compaction_and_export(tmp_path, rope_scaling):
    src = source_model(rope_scaling)
    src.save_pretrained(tmp_path / "src")
    assert main(["convert", "hf-to-composer", str(tmp_path / "src"), str(tmp_path / "src.pt")]) == 0
    converted = load_decoder(tmp_path / "src.pt").eval()
    assert converted.cfg.context_length == CONTEXT and converted.cfg.rope_scaling == rope_scaling
    # YaRN's frequencies and attention_factor as transformers computes them, up to position 100
    assert torch.allclose(logits(converted, IDS), logits(src, IDS), atol=1e-5, rtol=0)

    data = write_synthetic_mds(tmp_path / "mds", {"a": "random", "b": "repetitive"}, seq_len=TRAIN_LEN,
                               vocab_size=49152, n_train=16, n_eval=4)
    trainer = build_trainer(load_config(TINY, [
        f"model.path={tmp_path / 'src.pt'}", f"data_local={data}", "callbacks.data_loading.set_names=[a,b]",
        f"save_folder={tmp_path / 'run'}", "loggers.inmemory={}", "max_duration=4ba", "save_interval=4ba",
        "eval_interval=4ba"]))
    assert trainer.state.model.model.cfg.context_length == CONTEXT
    trainer.fit()
    trainer.close()
    ckpt = tmp_path / "run" / "latest-rank0.pt"
    state = load_model_state(ckpt)
    cfg = config_of_state(state)
    assert (cfg.context_length, cfg.rope_scaling) == (CONTEXT, rope_scaling)
    masked = load_decoder(ckpt).eval()
    assert torch.equal(masked.rotary.inv_freq, src.model.rotary_emb.inv_freq)
    if rope_scaling is not None:  # the run's training length as the context would rotate differently
        short = PrunableDecoder(ModelConfig.from_dict({**cfg.to_dict(), "context_length": TRAIN_LEN}))
        assert not torch.allclose(short.rotary.inv_freq, masked.rotary.inv_freq)
    masks = mask_generator_from_state(cfg, state).hard_masks()

    tok = byte_level_bpe(tmp_path / "tok")
    assert main(["compact", str(ckpt), "--out", str(tmp_path / "small.pt"), "--hf", str(tmp_path / "hf"),
                 "--tokenizer", str(tok)]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["max_position_embeddings"] == CONTEXT and config["rope_scaling"] == rope_scaling
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert exported.config.num_hidden_layers == 3  # pruned: the tiny target keeps 3 of 4 layers
    expected = logits(masked, IDS, masks)
    assert torch.allclose(logits(exported, IDS), expected, atol=1e-5, rtol=0)  # positions 64..99 included

    if rope_scaling is None:  # GGUF has no RoPE scaling; its context is the HF config's
        gguf = pytest.importorskip("gguf")
        out = tmp_path / "m.gguf"
        assert main(["convert", "hf-to-gguf", str(tmp_path / "hf"), str(out), "--dtype", "f32"]) == 0
        assert gguf.GGUFReader(str(out)).fields["llama.context_length"].contents() == CONTEXT


def test_an_explicit_context_length_is_allowed_and_keeps_the_rope_frequencies(tmp_path):
    """`--context-length`, or the override max_position_embeddings=N, sets the context; YaRN's frequencies are
    pinned to the old one (original_max_position_embeddings), so the exported model computes the same logits."""
    src = source_model(YARN)
    src.save_pretrained(tmp_path / "src")
    assert main(["convert", "hf-to-composer", str(tmp_path / "src"), str(tmp_path / "src.pt")]) == 0
    assert main(["convert", "composer-to-hf", str(tmp_path / "src.pt"), str(tmp_path / "a"),
                 "max_position_embeddings=32768"]) == 0
    assert main(["convert", "composer-to-hf", str(tmp_path / "src.pt"), str(tmp_path / "b"),
                 "--context-length", "32768"]) == 0
    for name in ("a", "b"):
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["max_position_embeddings"] == 32768
        assert config["rope_scaling"] == {**YARN, "original_max_position_embeddings": CONTEXT}
        exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        assert torch.allclose(logits(exported, IDS), logits(src, IDS), atol=1e-5, rtol=0)
    plain = with_context_length(ModelConfig(context_length=4096), 16384)
    assert (plain.context_length, plain.rope_scaling) == (16384, None)


def test_a_run_keeps_the_checkpoint_context_unless_told(tmp_path):
    state = {"model._extra_state": PrunableDecoder.extra_state_for(
        ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, intermediate_size=48, context_length=CONTEXT))}
    section = ModelSection.read({"path": "src.pt", "max_seq_len": TRAIN_LEN})
    assert model_config(section, state, TRAIN_LEN).context_length == CONTEXT
    assert model_config(ModelSection.read({"context_length": 16384}), state, TRAIN_LEN).context_length == 16384
    # a model built from YAML keys alone takes the training length as its context
    scratch = ModelSection.read({"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4,
                                 "intermediate_size": 48})
    assert model_config(scratch, None, TRAIN_LEN).context_length == TRAIN_LEN


def test_an_older_checkpoint_reads_its_max_seq_len_as_the_context(tmp_path, caplog):
    """Checkpoints written before the split hold only `max_seq_len` (the run's value): it stays the context."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, intermediate_size=48)
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("context_length", "dtype")} | {"max_seq_len": 128}
    decoder = PrunableDecoder(cfg)
    state = {f"model.{k}": v for k, v in decoder.state_dict().items() if not k.endswith("_extra_state")}
    save_checkpoint({**state, "model._extra_state": {"model_config": old}}, tmp_path / "old.pt")
    with caplog.at_level(logging.INFO):
        assert load_decoder(tmp_path / "old.pt").cfg.context_length == 128
        assert main(["convert", "composer-to-hf", str(tmp_path / "old.pt"), str(tmp_path / "hf")]) == 0
    assert "max_seq_len=128 is read as the model's context length" in caplog.text
    assert "writing float32" in caplog.text  # no recorded source dtype either
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["max_position_embeddings"], config["torch_dtype"]) == (128, "float32")
    shutil.rmtree(tmp_path / "hf")


def test_the_remote_code_export_applies_yarn_like_transformers(tmp_path):
    src = source_model(YARN)
    src.save_pretrained(tmp_path / "src")
    assert main(["convert", "hf-to-composer", str(tmp_path / "src"), str(tmp_path / "src.pt")]) == 0
    decoder = load_decoder(tmp_path / "src.pt")
    tensors = {k: v for k, v in decoder.state_dict().items() if not k.endswith("_extra_state")}
    export_hf(decoder.cfg, tensors, tmp_path / "remote", remote_code=True)
    config = json.loads((tmp_path / "remote" / "config.json").read_text())
    assert (config["max_position_embeddings"], config["rope_scaling"]) == (CONTEXT, YARN)
    remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "remote", trust_remote_code=True).eval()
    assert torch.allclose(logits(remote, IDS), logits(src, IDS), atol=1e-5, rtol=0)
