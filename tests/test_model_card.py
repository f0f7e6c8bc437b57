"""Every HF folder drprune writes has a README.md model card: YAML front matter, provenance, shapes, counts, loading."""
from __future__ import annotations

import pytest
import transformers
import yaml

from drprune.cli import main
from drprune.compact.export import export_hf
from drprune.compact.fold import compact_decoder
from drprune.convert.model_card import EvalTable, ModelCard, render_card, source_facts
from drprune.demo.pipeline import card_eval_tables
from drprune.models.shapes import config_params
from drprune.models.config import ModelConfig
from tests.test_compact import PER_LAYER, random_decoder, random_masks
from tests.test_compact_cli import CFG, pruning_lm, write

LLAMA = ModelConfig(family="llama", vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                    intermediate_size=48)


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def table_row(text: str, label: str) -> list[str]:
    """The cells after the label of the first markdown table row named `label`."""
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def count(cell: str) -> int:
    return int(cell.replace(",", ""))


def source_folder(tmp_path, license_text: str = "license: mit\n"):
    """A HF folder laid out as a huggingface_hub cache snapshot, its README telling a license."""
    folder = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abc"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text(f"---\n{license_text}tags: [x]\n---\n# tiny\n")
    return folder


def test_compact_cli_writes_a_card_whose_facts_match_the_model(tmp_path):
    ckpt = write(tmp_path / "latest-rank0.pt", pruning_lm().state_dict())
    src = source_folder(tmp_path)
    hf = tmp_path / "hf"
    assert main(["compact", ckpt, "--out", str(tmp_path / "small.pt"), "--hf", str(hf), "--base-model", str(src)]) == 0
    text = (hf / "README.md").read_text()
    meta = front_matter(text)
    assert meta["base_model"] == "acme/tiny-llama" and meta["license"] == "mit"
    assert meta["library_name"] == "transformers"
    assert meta["tags"][:3] == ["drprune", "pruned", "l0"]

    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    source, target, this = table_row(text, "parameters")
    source, this = count(source), count(this)
    assert target == ""  # a target shape, not a parameter budget
    assert this == model.num_parameters() == config_params(model_config(hf))
    assert source == random_decoder(CFG).num_params() == config_params(CFG)
    assert table_row(text, "layers") == ["4", "3", "3"]  # source, target, achieved
    assert table_row(text, "hidden size") == ["32", "24", "24"]
    assert "trust_remote_code" not in text
    assert f"| source | {ckpt} |" in text and '`["head", "intermediate", "layer", "hidden"]`' in text

    # the compact checkpoint carries the card: exporting it again later renders the same provenance
    assert main(["convert", "composer-to-hf", str(tmp_path / "small.pt"), str(tmp_path / "hf2"),
                 "--base-model", str(src)]) == 0
    assert (tmp_path / "hf2" / "README.md").read_text() == text


def model_config(hf) -> ModelConfig:
    from drprune.convert.checkpoint import load_hf

    return load_hf(str(hf))[0]


@pytest.mark.parametrize("per_layer", [False, True])
def test_trust_remote_code_instruction_iff_the_folder_needs_remote_code(tmp_path, per_layer):
    decoder = random_decoder(LLAMA)
    small = compact_decoder(decoder, random_masks(LLAMA, PER_LAYER)) if per_layer else decoder
    tensors = {k: v for k, v in small.state_dict().items() if not k.endswith("_extra_state")}
    out = export_hf(small.cfg, tensors, tmp_path / "hf", card=ModelCard(source="src", method="random"))
    text = (out / "README.md").read_text()
    remote = (out / "modeling_drprune.py").exists()
    assert remote == per_layer
    assert ("trust_remote_code=True" in text) == remote
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote)
    assert count(table_row(text, "parameters")[-1]) == model.num_parameters() == small.num_params()
    if per_layer:  # shapes vary: one row per layer with its heads and widths
        for i in range(small.cfg.n_layers):
            spec = small.cfg.layer_spec(i)
            assert table_row(text, str(i))[:3] == [str(spec.n_heads), str(spec.n_kv_heads), str(spec.intermediate_size)]


def test_unpruned_folder_card_has_no_pruning_tags_and_no_license_unless_known(tmp_path):
    from drprune.convert.checkpoint import write_hf_folder

    decoder = random_decoder(LLAMA)
    tensors = {k: v for k, v in decoder.state_dict().items() if not k.endswith("_extra_state")}
    out = write_hf_folder(LLAMA, tensors, tmp_path / "hf")
    meta = front_matter((out / "README.md").read_text())
    assert meta["tags"] == ["drprune"] and "license" not in meta and "base_model" not in meta


def test_source_facts_and_explicit_fields():
    assert source_facts("acme/model-7b") == source_facts("hub:acme/model-7b") == {"base_model": "acme/model-7b"}
    assert source_facts("no/such/local/path") == {}
    card = ModelCard(license="apache-2.0").with_source_facts("acme/model-7b")
    assert (card.base_model, card.license) == ("acme/model-7b", "apache-2.0")


def test_source_readme_license_and_malformed_front_matter(tmp_path):
    assert source_facts(source_folder(tmp_path / "a")) == {"base_model": "acme/tiny-llama", "license": "mit"}
    assert source_facts(source_folder(tmp_path / "b", "license: [unclosed\n")) == {"base_model": "acme/tiny-llama"}


def test_card_round_trips_and_renders_eval_tables():
    table = EvalTable("Perplexity.", ["source", "pruned"], {"wiki": [10.0, 12.5], "code": [None, 3]})
    card = ModelCard(source="s", method="l0", training_tokens=1234, evaluation=[table])
    again = ModelCard.from_dict(card.to_dict())
    assert again == card
    text = render_card(again, LLAMA, remote_code=False)
    assert "## Evaluation" in text and table_row(text, "wiki") == ["10.000", "12.500"]
    assert table_row(text, "code") == ["–", "3"] and table_row(text, "training tokens") == ["1,234"]


def test_demo_cards_show_scores_with_intervals(tmp_path):
    def score(ppl: float) -> dict:
        return {"ppl": ppl, "lo": ppl - 1, "hi": ppl + 1, "rows": 8, "tokens": 512}

    def result(*ppls: float) -> dict:
        return {"domains": {d: score(p) for d, p in zip(("news", "code"), ppls)}, "geomean": score(min(ppls))}

    evals = {"source": {"in_domain": result(10, 20), "copy": score(2)},
             "pruned": {"in_domain": result(15, 25), "held_out": result(30, 40), "copy": score(3)}}
    with pytest.raises(KeyError):  # the source lacks held-out scores: the demo always scores both
        card_eval_tables(evals, "pruned")
    evals["source"]["held_out"] = result(28, 38)
    tables = card_eval_tables(evals, "pruned")
    assert [t.columns for t in tables] == [["source", "pruned"]] * 3
    assert tables[0].rows["news"] == ["10.00 [9.00, 11.00]", "15.00 [14.00, 16.00]"]
    assert tables[1].rows["geometric mean"] == ["28.00 [27.00, 29.00]", "30.00 [29.00, 31.00]"]
    assert tables[2].rows["copy probe"] == ["2.00 [1.00, 3.00]", "3.00 [2.00, 4.00]"]

    # the exported candidate's card: recipe, equal token budget, the tables above, the hub model behind the GGUF
    from types import SimpleNamespace

    from drprune.convert.checkpoint import decoder_checkpoint_state, save_checkpoint
    from drprune.demo.pipeline import MODEL_FILE, Budget, demo_card
    from drprune.demo.options import DemoOptions

    save_checkpoint(decoder_checkpoint_state(random_decoder(LLAMA)), tmp_path / "model.pt")
    c = SimpleNamespace(source=SimpleNamespace(dir=tmp_path), target={"n_layers": 2, "intermediate_size": 32},
                        evals=evals, budgets={"pruned": Budget("L0 + DRO", 3, 5, 8 * 4 * 64, 1.0, 1.0)})
    opts = DemoOptions(out=tmp_path / "out", steps=8, batch_size=4, seq_len=64)
    card = demo_card(c, opts, tmp_path / MODEL_FILE, "pruned")
    text = render_card(card, LLAMA, remote_code=False)
    meta = front_matter(text)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["tags"][:3] == ["drprune", "pruned", "l0"]
    assert table_row(text, "training tokens") == ["2,048"] and table_row(text, "layers") == ["3", "2", "3"]
    assert table_row(text, "copy probe") == ["2.00 [1.00, 3.00]", "3.00 [2.00, 4.00]"]
