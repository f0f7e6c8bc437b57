"""`drprune compact` on pruning checkpoints: the generator is rebuilt from the file, bad input is refused."""
from __future__ import annotations

import pytest
import torch

from drprune.cli import main
from drprune.convert.checkpoint import decoder_checkpoint_state, load_decoder, save_checkpoint
from drprune.masks import mask_generator_from_state
from drprune.masks.l0 import L0MaskGenerator
from drprune.models.composer_model import PrunableLM
from drprune.models.config import ModelConfig
from tests.test_compact import random_decoder

CFG = ModelConfig(family="llama", vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2,
                  intermediate_size=48, tie_word_embeddings=True)
TARGET = {"d_model": 24, "n_heads": 2, "n_layers": 3, "intermediate_size": 20}
MODULES = ["head", "intermediate", "layer", "hidden"]
IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))


def pruning_lm(cfg: ModelConfig = CFG, target: dict = TARGET) -> PrunableLM:
    lm = PrunableLM(cfg, L0MaskGenerator(cfg, MODULES, target, lagrangian_warmup_steps=4))
    lm.model.load_state_dict(random_decoder(cfg).state_dict())
    with torch.no_grad():
        for gate in lm.mask_generator.gates.values():
            gate.log_alpha.normal_(0, 2, generator=torch.Generator().manual_seed(5))
    return lm.eval()


def write(path, state) -> str:
    torch.save({"state": {"model": state, "optimizers": {"adam": {"note": "never read"}}}}, path)
    return str(path)


def test_compact_cli_folds_the_stored_masks_into_the_target_shape(tmp_path):
    lm = pruning_lm()
    ckpt = write(tmp_path / "latest-rank0.pt", lm.state_dict())
    assert main(["compact", ckpt, "--out", str(tmp_path / "small.pt")]) == 0
    small = load_decoder(tmp_path / "small.pt")
    c = small.cfg
    assert c.is_uniform and (c.d_model, c.n_heads, c.n_kv_heads, c.n_layers, c.intermediate_size) == (24, 2, 1, 3, 20)
    with torch.no_grad():
        expected = lm.model(IDS, lm.mask_generator.hard_masks())
        assert torch.allclose(small(IDS), expected, atol=1e-5, rtol=0)
    assert main(["compact", ckpt]) == 0  # default: pruned-<name> beside the input
    assert (tmp_path / "pruned-latest-rank0.pt").is_file()


def test_generator_rebuilt_from_checkpoint_equals_the_trained_one():
    lm = pruning_lm()
    rebuilt = mask_generator_from_state(CFG, lm.state_dict())
    assert rebuilt.init_params == lm.mask_generator.init_params
    for name, mask in lm.mask_generator.hard_masks().items():
        assert torch.equal(rebuilt.hard_masks()[name], mask)
    other = L0MaskGenerator(CFG, MODULES, {**TARGET, "n_layers": 2})
    with pytest.raises(ValueError, match="target_model"):
        other.load_state_dict({k[len("mask_generator."):]: v for k, v in lm.state_dict().items()
                               if k.startswith("mask_generator.")})


def test_bad_input_gives_clear_errors_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out.pt"

    def fails(ckpt: str, message: str) -> None:
        assert main(["compact", ckpt, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not any(p.name.startswith(".out.pt") for p in tmp_path.iterdir())  # no temporary left

    plain = tmp_path / "plain.pt"
    save_checkpoint(decoder_checkpoint_state(random_decoder(CFG)), plain)
    fails(str(plain), "no mask generator")

    wide = ModelConfig(**{**CFG.to_dict(), "intermediate_size": 64})
    state = {**pruning_lm().state_dict(),
             **{k: v for k, v in pruning_lm(wide).state_dict().items() if k.startswith("mask_generator.")}}
    fails(write(tmp_path / "mismatch.pt", state), "does not match its model")

    state = {k: v for k, v in pruning_lm().state_dict().items() if k != "mask_generator._extra_state"}
    fails(write(tmp_path / "old.pt", state), "does not record its config")

    fails(str(tmp_path / "missing.pt"), "does not exist")
    assert not out.exists()
    out.write_text("keep me")
    fails(write(tmp_path / "ok.pt", pruning_lm().state_dict()), "already exists")
    assert out.read_text() == "keep me"
