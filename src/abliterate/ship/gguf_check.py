"""The check after `abliterate export gguf`: llama.cpp's greedy continuations of the file against the HF model's."""

from __future__ import annotations

from pathlib import Path

from abliterate.core.load import load_model
from abliterate.core.prompts import format_prompts, load_prompts
from abliterate.measure.engines.transformers import generate
from abliterate.ship.gguf_export import compare_greedy, llama_cpp_greedy


def check_gguf(hf_dir: Path, gguf_file: Path, n_prompts: int, n_tokens: int):
    """Agreement of greedy tokens on `n_prompts` bundled eval-split prompts (half benign, half harmful)."""
    loaded = load_model(str(hf_dir), dtype="float32")
    prompts = format_prompts(loaded.tokenizer, load_prompts("harmless", split="eval")[: n_prompts // 2]
                             + load_prompts("harmful", split="eval")[: n_prompts - n_prompts // 2])
    hf_tokens = generate(loaded.model, loaded.tokenizer, prompts, n_tokens, batch_size=1).tokens
    prompt_ids = [loaded.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    del loaded
    return compare_greedy(hf_tokens, llama_cpp_greedy(gguf_file, prompt_ids, n_tokens))
