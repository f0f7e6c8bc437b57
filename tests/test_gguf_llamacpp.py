"""drprune's GGUF files run in llama.cpp itself (slow; needs `pip install -e '.[llamacpp]'`, which compiles
llama.cpp through llama-cpp-python): on held text and 32 greedy tokens, llama.cpp picks the same tokens as
transformers and its logits match. Covered: a per-layer-shaped model (`deci`, LLaMA and Qwen2: per-layer KV
heads and MLP widths, a removed layer, removed attention and MLP sub-layers) and the demo's uniform export (`llama`).
Both runtimes get the same token ids; llama.cpp's own tokenizer (built from the GGUF vocab) is checked to
give those ids for the held text and the same text for the generated ids.

Tolerances: an f32 GGUF with an f32 KV cache differs by summation order only. An f16 GGUF may differ from
the fp32 model by as much as transformers itself does when it runs the same model in float16 (llama.cpp's
f16 matrix products round activations to f16 as well as weights); that yardstick is measured per model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import transformers

from drprune.cli import main
from drprune.convert.gguf_export import hf_to_gguf
from tests.test_gguf_export import _smollm2_gguf, per_layer_decoder, remote_code_folder, train_bpe

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip(
    "llama_cpp", reason="needs llama-cpp-python: pip install -e '.[llamacpp]' (compiles llama.cpp, ~10-20 min)")

N_NEW = 32
HELD = "Quick zebras vow to pack jugs: 1234 boxes, judged by a sphinx of quartz!"  # not the tokenizer's text
DEMO_HELD = "In 1969, two astronauts walked on the Moon while a third orbited above them. The mission"


@dataclass
class Run:
    """The token ids (prompt + greedy tokens), the logits at every position, the greedy tokens."""

    ids: list[int]
    logits: np.ndarray
    tokens: list[int]


def run_llamacpp(llm, prompt: list[int]) -> Run:
    """Greedy decoding with llama.cpp's KV cache: the prompt in one batch, then one token at a time."""
    llm.reset()
    llm.eval(prompt)
    tokens: list[int] = []
    for _ in range(N_NEW):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    return Run(prompt + tokens, np.array(llm.scores[:llm.n_tokens], dtype=np.float64), tokens)


def run_transformers(model, prompt: list[int]) -> Run:
    """transformers' own greedy generate (KV cache), then one forward pass over the whole sequence."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                             do_sample=False, pad_token_id=0)
    return Run(out[0].tolist(), forward(model, out[0].tolist()), out[0, len(prompt):].tolist())


def forward(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def relative_error(logits: np.ndarray, ref: Run) -> float:
    """max |logit - reference logit| / max |reference logit|, over every position."""
    return float(np.abs(logits - ref.logits).max() / np.abs(ref.logits).max())


def compare(gguf_file: Path, model, tokenizer, text: str, f32_cache: bool) -> tuple[float, Run]:
    """(llama.cpp's relative logit error, transformers' run) on `text`'s token ids and 32 greedy tokens. The
    greedy tokens must agree (so both gave logits for the same sequence) and decode to the same text, and
    llama.cpp's training context is the HF config's. `f32_cache` keeps llama.cpp's K/V in f32 (its default
    rounds them to f16)."""
    cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_cache else {}
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=256, logits_all=True, n_threads=2, verbose=False, **cache)
    assert llm._model.n_ctx_train() == model.config.max_position_embeddings  # the context llama.cpp offers
    prompt = tokenizer(text, add_special_tokens=False).input_ids
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == prompt
    ours, ref = run_llamacpp(llm, prompt), run_transformers(model, prompt)
    assert ours.tokens == ref.tokens
    # random byte tokens may not form UTF-8: both sides show invalid bytes as U+FFFD
    assert llm.detokenize(ref.tokens, special=True).decode(errors="replace") == tokenizer.decode(ref.tokens)
    return relative_error(ours.logits, ref), ref


def check_f16(gguf_file: Path, load: Callable[[torch.dtype], object], tokenizer, text: str) -> None:
    """An f16 GGUF in llama.cpp (default settings) is no further from the fp32 model than transformers'
    float16 run of the same model, on the same tokens."""
    error, ref = compare(gguf_file, load(torch.float32), tokenizer, text, f32_cache=False)
    yardstick = relative_error(forward(load(torch.float16), ref.ids), ref)
    print(f"\n{gguf_file.name}: llama-cpp-python {llama_cpp.__version__}, {len(ref.ids) - N_NEW} prompt + {N_NEW} "
          f"greedy tokens agree; max |dlogit| / max |logit|: llama.cpp f16 {error:.2e}, transformers float16 "
          f"{yardstick:.2e}")
    assert error <= yardstick


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def per_layer(request, tmp_path_factory) -> tuple[Path, Path]:
    """(remote-code HF folder, tokenizer folder) of drprune's per-layer test model of each family."""
    tmp = tmp_path_factory.mktemp(f"per_layer_{request.param}")
    tokenizer_dir = train_bpe(tmp / "bpe")
    return remote_code_folder(tmp, per_layer_decoder(request.param), tokenizer_dir), tokenizer_dir


def test_per_layer_model_in_llamacpp_f32(tmp_path, per_layer):
    folder, tokenizer_dir = per_layer
    gguf_file = hf_to_gguf(folder, tmp_path / "per_layer-f32.gguf", dtype="f32")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    error, _ = compare(gguf_file, model, transformers.AutoTokenizer.from_pretrained(tokenizer_dir), HELD,
                       f32_cache=True)
    print(f"\n{gguf_file.name}: llama-cpp-python {llama_cpp.__version__}, max |dlogit| / max |logit| {error:.2e}")
    assert error <= 1e-5


def test_per_layer_model_in_llamacpp_f16(tmp_path, per_layer):
    folder, tokenizer_dir = per_layer

    def load(dtype: torch.dtype):
        return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                                 torch_dtype=dtype).eval()

    gguf_file = hf_to_gguf(folder, tmp_path / "per_layer-f16.gguf", dtype="f16")
    check_f16(gguf_file, load, transformers.AutoTokenizer.from_pretrained(tokenizer_dir), HELD)


def check_demo_output(hf_dir: Path, gguf_file: Path) -> None:
    """The demo's f16 GGUF in llama.cpp against its HF folder (a stock LlamaForCausalLM) in transformers."""

    def load(dtype: torch.dtype):
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=dtype).eval()
        assert type(model).__name__ == "LlamaForCausalLM"
        return model

    check_f16(gguf_file, load, transformers.AutoTokenizer.from_pretrained(hf_dir), DEMO_HELD)


def test_demo_uniform_export_in_llamacpp(tmp_path):
    """The demo's source (SmolLM2-135M-Instruct from its GGUF) pruned one-shot to the demo's default target
    shape (24 of 30 layers, 2 of 3 KV groups, MLP 1024; L2 weight importance), then the demo's GGUF export."""
    from drprune.demo.pipeline import build_source, export_gguf

    build_source(_smollm2_gguf(), None, tmp_path / "source")
    assert main(["oneshot", "width", str(tmp_path / "source" / "hf"), "--out", str(tmp_path / "pruned"),
                 "--importance", "l2", "--num-attention-heads", "6", "--num-key-value-heads", "2",
                 "--intermediate-size", "1024", "--drop-layers", *map(str, range(22, 28))]) == 0
    export_gguf(tmp_path / "pruned" / "hf", tmp_path / "pruned.gguf")
    check_demo_output(tmp_path / "pruned" / "hf", tmp_path / "pruned.gguf")


def test_a_demo_output_folder_in_llamacpp():
    """A real `drprune demo` output (hf/ and pruned.gguf), named by DRPRUNE_DEMO_OUT."""
    out = os.environ.get("DRPRUNE_DEMO_OUT")
    if not out:
        pytest.skip("set DRPRUNE_DEMO_OUT to a `drprune demo --out` folder to check its pruned.gguf in llama.cpp")
    check_demo_output(Path(out) / "hf", Path(out) / "pruned.gguf")
