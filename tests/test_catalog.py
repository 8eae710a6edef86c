"""`abliterate models` (the catalog filtered by memory) and `abliterate models estimate` (weights + KV cache)."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ARCH_CONFIGS, build_tiny_model, invoke

from abliterate.choose.catalog import GIB, TIERS, estimate, fit, kv_cache_bytes, load_catalog, parse_memory, read_model_config, select
from abliterate.cli.commands import main
from abliterate.errors import UserError


def assert_user_error(result):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output


def listing(*args) -> dict:
    result = invoke("models", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def keys(data: dict) -> set[str]:
    return {row["key"] for row in data["models"]}


# ------------------------------------------------------------------------------------------ memory sizes


@pytest.mark.parametrize("text", ["16GB", "16gb", "16 GB", "16GiB", "16g", "16384MB", "0.015625TB"])
def test_parse_memory_accepts_the_usual_spellings(text):
    assert parse_memory(text) == 16 * GIB


@pytest.mark.parametrize("text", ["16XB", "16", "sixteen GB", "16 G B", "-4GB", "0GB"])
def test_parse_memory_refuses_anything_else(text):
    with pytest.raises(UserError):
        parse_memory(text)


def test_unknown_memory_unit_is_one_error_line_exit_2():
    result = invoke("models", "--memory", "16XB")
    assert_user_error(result)
    assert "GB" in result.stderr  # says what is accepted


# ------------------------------------------------------------------------------------------ the catalog


def test_memory_filters_the_catalog():
    small, medium, large = (keys(listing("--memory", m)) for m in ("16GB", "32GB", "64GB"))
    assert {"llama-8b-abliterated", "dolphin-8b", "hermes-mistral-7b", "qwen3-vl-8b"} == small
    assert small < medium < large
    assert "r1-distill-32b" in medium and not {"r1-distill-70b", "hermes-70b"} & medium
    assert {"r1-distill-70b", "hermes-70b", "dolphin-70b"} <= large
    assert "r1-1776" not in large  # 671B needs a cluster
    assert keys(listing("--memory", "4GB")) == set()
    everything = listing()
    assert len(everything["models"]) == len(load_catalog().models) and everything["memory_bytes"] is None


def test_each_row_shows_which_quant_fits_and_what_it_needs():
    data = listing("--memory", "16GB")
    for row in data["models"]:
        assert row["fit"]["needs_bytes"] <= 0.75 * 16 * GIB
        assert row["fit"]["quant"] in row["sizes_bytes"] and row["fit"]["placement"] == "CPU/unified"
    gpu = listing("--vram", "8GB")
    assert {row["fit"]["placement"] for row in gpu["models"]} == {"GPU"}
    assert all(row["fit"]["needs_bytes"] <= 8 * GIB for row in gpu["models"])
    offload = listing("--vram", "8GB", "--memory", "32GB")
    assert "GPU+CPU" in {row["fit"]["placement"] for row in offload["models"]}


def test_default_pick_per_tier():
    catalog = load_catalog()
    assert catalog.default_for("entry").key == "llama-8b-abliterated"
    assert catalog.default_for("medium").key == "r1-distill-32b"
    assert catalog.default_for("large").key == "r1-distill-70b"
    assert listing("--memory", "16GB")["pick"] == "llama-8b-abliterated"
    assert listing("--memory", "32GB")["pick"] == "r1-distill-32b"
    assert listing("--memory", "64GB")["pick"] == "r1-distill-70b"
    first = listing("--memory", "16GB")["models"][0]
    assert first["key"] == "llama-8b-abliterated" and first["default"]
    text = CliRunner(env={"COLUMNS": "300"}).invoke(main, ["models", "--memory", "16GB"], catch_exceptions=False)
    assert text.exit_code == 0 and "llama-8b-abliterated *" in text.stdout and "pick: llama-8b-abliterated" in text.stdout


def test_superseded_model_is_marked_with_its_replacement():
    row = next(r for r in listing()["models"] if r["key"] == "r1-1776")
    assert row["superseded_by"] == "r1-distill-70b"
    assert listing("--memory", "2TB")["pick"] != "r1-1776"
    result = CliRunner(env={"COLUMNS": "300"}).invoke(main, ["models"], catch_exceptions=False)
    assert "r1-1776 (superseded → r1-distill-70b)" in result.stdout


def test_use_filter():
    coding = listing("--use", "coding")
    assert coding["models"] and all("coding" in row["uses"] for row in coding["models"])
    assert "qwen3-coder-30b" in keys(coding)
    reasoning = listing("--use", "reasoning", "--memory", "64GB")
    assert all(row["reasoning"] or "reasoning" in row["uses"] for row in reasoning["models"])
    assert reasoning["pick"] == "r1-distill-70b"


def test_catalog_facts_are_consistent_with_the_reference_documents():
    catalog = load_catalog()
    for entry in catalog.models:
        stated = float(entry.parameters_stated.rstrip("B")) * 1e9
        assert abs(entry.parameters - stated) / stated < 0.10, (entry.key, entry.parameters)  # counted from config
        for quant, gigabytes in entry.reference_sizes_gb.items():  # computed GGUF sizes vs the documents' tables
            assert abs(entry.size_bytes(quant) / 1e9 - gigabytes) / gigabytes < 0.15, (entry.key, quant)
        assert entry.sources["licence"] in ("model card", "reference 003")
        if entry.superseded_by is None:  # every current model fits its tier; no default fits the tier below
            assert fit(entry, catalog.tiers[entry.tier].memory_bytes) is not None, entry.key
    for lower, upper in zip(TIERS, TIERS[1:-1]):
        assert fit(catalog.default_for(upper), catalog.tiers[lower].memory_bytes) is None, upper


# ------------------------------------------------------------------------------------------ estimate


def safetensors_bytes(path) -> int:
    """Sum of the tensor bytes in a .safetensors file, from its header."""
    with open(path, "rb") as file:
        header = json.loads(file.read(struct.unpack("<Q", file.read(8))[0]))
    return sum(end - start for name, value in header.items() if name != "__metadata__"
               for start, end in [value["data_offsets"]])


@pytest.mark.parametrize("model_type", sorted(ARCH_CONFIGS))
def test_estimate_matches_a_saved_directory_exactly(model_type, tmp_path):
    build_tiny_model(model_type).save_pretrained(tmp_path)
    real = safetensors_bytes(tmp_path / "model.safetensors")
    result = estimate(read_model_config(str(tmp_path)).config)
    assert result["format"] == "float32"
    assert abs(result["weights_bytes"] - real) <= 0.15 * real  # the requirement ...
    assert result["weights_bytes"] == real  # ... and in fact exact: every parameter counted from config.json


def test_estimate_command_on_a_directory(tiny_model_dir):
    result = invoke("models", "estimate", tiny_model_dir, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["weights_bytes"] == safetensors_bytes(tiny_model_dir / "model.safetensors")
    assert data["gpu"]["vram_bytes"] == data["weights_bytes"] + data["kv_cache_bytes"] + data["overhead_bytes"]
    assert data["cpu"]["ram_bytes"] == data["gpu"]["vram_bytes"] and data["gpu"]["ram_bytes"] == GIB
    assert data["context"] == 128  # the model's maximum, below the 8192 default
    quant = json.loads(invoke("models", "estimate", tiny_model_dir, "--quant", "q4_k_m", "--json").stdout)
    assert quant["weights_bytes"] == int(data["parameters"] * 4.85 / 8) and quant["kv_bytes_per_element"] == 2
    text = invoke("models", "estimate", tiny_model_dir)
    assert text.exit_code == 0 and "on GPU: VRAM" in text.stdout and "CPU only: system RAM" in text.stdout


def test_kv_cache_formula_by_hand():
    catalog = load_catalog()
    # Llama 3.1 8B: 2 (K, V) x 32 layers x 8 KV heads (GQA) x 128 head_dim x 8192 tokens x 2 bytes = 1 GiB
    assert kv_cache_bytes(catalog.get("llama-8b-abliterated").config, 8192) == 2 * 32 * 8 * 128 * 8192 * 2 == GIB
    # batch scales it
    assert kv_cache_bytes(catalog.get("llama-8b-abliterated").config, 8192, batch=3) == 3 * GIB
    # Gemma 3 27B: 62 layers, every 6th full (10), the other 52 cache at most the 1024-token window
    gemma = catalog.get("gemma3-27b").config
    assert kv_cache_bytes(gemma, 8192) == 2 * 16 * 128 * (10 * 8192 + 52 * 1024) * 2
    assert kv_cache_bytes(gemma, 512) == 2 * 16 * 128 * 62 * 512 * 2  # window longer than the context
    # DeepSeek-V3 MLA: one latent of kv_lora_rank + qk_rope_head_dim per token and layer
    assert kv_cache_bytes(catalog.get("r1-1776").config, 8192) == 61 * (512 + 64) * 8192 * 2
    # gpt-oss: alternating 128-token sliding layers, 8 KV heads x 64
    assert kv_cache_bytes(catalog.get("gpt-oss-20b").config, 8192) == 2 * 8 * 64 * (12 * 8192 + 12 * 128) * 2


def test_estimate_a_catalog_model_offline():
    data = json.loads(invoke("models", "estimate", "r1-distill-70b", "--quant", "Q4_K_M", "--context", "8192", "--json").stdout)
    assert data["parameters"] == 70_553_706_496  # Llama-3.3-70B's published count
    assert 39 * GIB < data["weights_bytes"] < 41 * GIB and data["kv_cache_bytes"] == 80 * 2 * 8 * 128 * 8192 * 2
    bf16 = json.loads(invoke("models", "estimate", "huihui-ai/DeepSeek-R1-Distill-Llama-70B-abliterated", "--json").stdout)
    assert bf16["format"] == "bfloat16" and bf16["weights_bytes"] == 2 * bf16["parameters"]


def test_estimate_reads_a_gguf_header_and_its_real_tensor_bytes(tmp_path):
    import gguf

    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    hidden, layers, vocab = 64, 2, 320
    for name, value in (("block_count", layers), ("embedding_length", hidden), ("feed_forward_length", 96),
                        ("head_count", 4), ("head_count_kv", 2), ("context_length", 2048)):
        getattr(writer, f"add_{name}")(value)
    writer.add_vocab_size(vocab)
    writer.add_tensor("token_embd.weight", np.zeros((vocab, hidden), dtype=np.float16))
    for layer in range(layers):
        writer.add_tensor(f"blk.{layer}.attn_q.weight", np.zeros((hidden, hidden), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = json.loads(invoke("models", "estimate", path, "--context", "1024", "--json").stdout)
    assert data["format"] == "as stored" and data["weights_bytes"] == vocab * hidden * 2 + layers * hidden * hidden * 4
    assert data["parameters"] == vocab * hidden + layers * hidden * hidden
    assert data["kv_cache_bytes"] == 2 * layers * 2 * (hidden // 4) * 1024 * 2
    assert data["max_context"] == 2048


def test_estimate_bad_input_is_one_error_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert_user_error(invoke("models", "estimate", "nobody-abliterate-test/not-a-model"))  # offline hub id
    assert_user_error(invoke("models", "estimate", tmp_path / "missing" / "dir"))
    assert_user_error(invoke("models", "estimate", "r1-distill-70b", "--dtype", "bf16", "--quant", "Q4_K_M"))
    assert_user_error(invoke("models", "estimate", "r1-distill-70b", "--quant", "Q1_XX"))
    assert_user_error(invoke("models", "estimate", "r1-distill-70b", "--context", "0"))
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf")
    assert_user_error(invoke("models", "estimate", tmp_path / "broken.gguf"))
    assert re.search(r"offline", invoke("models", "estimate", "nobody-abliterate-test/not-a-model").stderr)


def test_select_rejects_bad_use_and_context():
    with pytest.raises(UserError):
        select(use="poetry")
    assert_user_error(invoke("models", "--context", "0"))
