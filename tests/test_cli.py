"""The command line on tiny random models: the happy path end to end, and every kind of bad input
answered by one line, exit code 2, no traceback and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from abliterate.measure.ablation import AblationParams, ablate, plan_edits
from abliterate.cli.commands import main
from abliterate.measure.directions import Directions
from abliterate.core.load import load_model


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def assert_clean_failure(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts")
    (path / "harmful.txt").write_text("Do a bad thing\nDo another bad thing\nBreak a rule now\n")
    (path / "harmless.txt").write_text("Bake a cake\nWrite a poem\nSay hello\n")
    return path


@pytest.fixture(scope="module")
def directions_file(tiny_model_dir, prompt_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("dirs") / "dirs.safetensors"
    result = run("directions", tiny_model_dir, "--harmful", prompt_files / "harmful.txt",
                 "--harmless", prompt_files / "harmless.txt", "-o", out)
    assert result.exit_code == 0, result.output
    assert "4 layers x 64" in result.stdout
    return out


def test_directions_file_records_its_provenance(directions_file, tiny_model_dir):
    loaded = Directions.load(directions_file)
    assert loaded.directions.shape == (4, 64)
    torch.testing.assert_close(loaded.directions.norm(dim=-1), torch.ones(4))
    meta = loaded.metadata
    assert meta["model"] == str(tiny_model_dir) and meta["n_layers"] == 4 and meta["hidden_size"] == 64
    assert meta["harmful_count"] == 3 and len(meta["harmful_sha256"]) == 64 and meta["projected"] is True


def test_directions_refused_only_keeps_every_prompt_of_a_model_that_hardly_refuses(tiny_model_dir, prompt_files, tmp_path):
    """3 harmful prompts are fewer than the filter needs (8 refused): all 3 are used, and the file and the output say so."""
    out = tmp_path / "refused.safetensors"
    result = run("directions", tiny_model_dir, "--harmful", prompt_files / "harmful.txt",
                 "--harmless", prompt_files / "harmless.txt", "--refused-only", "-o", out)
    assert result.exit_code == 0, result.output
    assert "hardly refuses" in result.stderr and "from 3 harmful (of 3)" in result.stdout
    meta = Directions.load(out).metadata
    assert (meta["harmful_filter"], meta["harmful_offered"], meta["harmful_count"]) == ("refused", 3, 3)


def test_apply_saves_a_model_plain_transformers_loads(directions_file, tiny_model_dir, tmp_path):
    out = tmp_path / "abliterated"
    result = run("apply", tiny_model_dir, "--directions", directions_file, "--layer", "1.5", "--weight", "0.8", "-o", out)
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "tokenizer.json", "abliteration.json"} <= {p.name for p in out.iterdir()}
    assert (out / "chat_template.jinja").exists() or "chat_template" in (out / "tokenizer_config.json").read_text()
    record = json.loads((out / "abliteration.json").read_text())
    assert record["parameters"]["components"]["attn"]["direction_index"] == 1.5

    # The saved weights equal the in-memory ablation of the original model.
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    saved = AutoModelForCausalLM.from_pretrained(out)
    original = load_model(str(tiny_model_dir), dtype="float32")
    params = AblationParams.single_direction(1.5, 0.8)
    with ablate(plan_edits(original.adapter, Directions.load(directions_file).directions, params)), torch.no_grad():
        expected = original.model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_apply_with_a_params_file(directions_file, tiny_model_dir, tmp_path):
    params = {"components": {"mlp": {"direction_index": None,
                                     "kernel": {"max_weight": 1.2, "max_weight_position": 2, "min_weight": 0.3,
                                                "min_weight_distance": 1.5}}},
              "norm_preserving": True}
    (tmp_path / "p.json").write_text(json.dumps(params))
    result = run("apply", tiny_model_dir, "--directions", directions_file, "--params", tmp_path / "p.json", "-o", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert "3 component edits" in result.stdout  # layers 1, 2, 3 are within distance 1.5 of position 2


def test_bad_inputs(tiny_model_dir, tiny_gemma_dir, prompt_files, directions_file, tmp_path):
    harmful, harmless = prompt_files / "harmful.txt", prompt_files / "harmless.txt"
    out = tmp_path / "out"
    prompts = ("--harmful", harmful, "--harmless", harmless)

    assert_clean_failure(run("directions", tmp_path / "missing-model", *prompts, "-o", tmp_path / "d.safetensors"),
                         "model not found")
    assert_clean_failure(run("directions", "nobody/no-such-model", *prompts, "-o", tmp_path / "d.safetensors"),
                         "hub")
    (tmp_path / "empty.txt").write_text("")
    assert_clean_failure(run("directions", tiny_model_dir, "--harmful", tmp_path / "empty.txt", "--harmless", harmless,
                             "-o", tmp_path / "d.safetensors"), "empty")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    assert_clean_failure(run("directions", tiny_model_dir, "--harmful", tmp_path / "latin1.txt", "--harmless", harmless,
                             "-o", tmp_path / "d.safetensors"), "UTF-8")
    assert not (tmp_path / "d.safetensors").exists()

    assert_clean_failure(run("apply", tiny_gemma_dir, "--directions", directions_file, "--layer", "1", "-o", out),
                         "4 layers", "measure directions on this model")
    assert_clean_failure(run("apply", tiny_model_dir, "--directions", directions_file, "--layer", "7", "-o", out),
                         "out of range", "0..3")
    assert_clean_failure(run("apply", tiny_model_dir, "--directions", tmp_path / "none.safetensors", "--layer", "1",
                             "-o", out), "not found")
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_failure(run("apply", tiny_model_dir, "--directions", directions_file, "--layer", "1", "-o", out),
                         "already exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_unsupported_architecture_fails_before_loading_weights(tmp_path, directions_file):
    from transformers import AutoConfig

    AutoConfig.for_model("mamba", hidden_size=32, num_hidden_layers=2, vocab_size=64).save_pretrained(tmp_path / "mamba")
    result = run("apply", tmp_path / "mamba", "--directions", directions_file, "--layer", "1", "-o", tmp_path / "o")
    assert_clean_failure(result, "'mamba' is not supported", "llama")


def test_console_script_exit_code_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "abliterate.cli", "apply", str(tmp_path / "nope"),
                             "--directions", "x.safetensors", "--layer", "1", "-o", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_eval_json_and_bad_inputs(tiny_model_dir, prompt_files, tmp_path):
    harmful, harmless = prompt_files / "harmful.txt", prompt_files / "harmless.txt"
    common = ("--harmful", harmful, "--harmless", harmless, "--max-new-tokens", "4", "--kl-tokens", "3")
    result = run("eval", tiny_model_dir, "--base", tiny_model_dir, *common, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"refusals", "total", "kl", "kl_multi_token", "judge"} <= data.keys()
    assert data["total"] == 3 and data["kl"] == pytest.approx(0, abs=1e-6) and data["kl_multi_token"] == pytest.approx(0, abs=1e-6)

    assert_clean_failure(run("eval", tiny_model_dir, "--split", "validation"), "unknown split")
    (tmp_path / "empty.jsonl").write_text("")
    assert_clean_failure(run("eval", tiny_model_dir, "--harmful", tmp_path / "empty.jsonl", "--harmless", harmless), "empty")
    (tmp_path / "cols.csv").write_text("a,b\nx,y\n")
    assert_clean_failure(run("eval", tiny_model_dir, "--harmful", tmp_path / "cols.csv", "--column", "prompt",
                             "--harmless", harmless), "no column 'prompt'")
    assert_clean_failure(run("eval", tiny_model_dir, "--judge", "oracle", *common), "unknown judge")


def test_eval_refuses_a_base_with_another_vocabulary(tiny_model_dir, prompt_files, tmp_path):
    from conftest import build_tiny_model, build_tiny_tokenizer

    other = tmp_path / "other-vocab"
    build_tiny_model("llama", vocab_size=320).save_pretrained(other)
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<extra_a>", "<extra_b>"])
    tokenizer.save_pretrained(other)
    result = run("eval", tiny_model_dir, "--base", other, "--harmful", prompt_files / "harmful.txt",
                 "--harmless", prompt_files / "harmless.txt", "--max-new-tokens", "2")
    assert_clean_failure(result, "different tokenizers")


def test_options_come_from_the_one_settings_schema():
    """Each command's option defaults are the schema's (per-command defaults named in core/settings.py); compare and
    verify take the schema's classes themselves."""
    from abliterate.choose import compare, verify
    from abliterate.core import settings

    def defaults(command):
        return {param.name: param.default for param in command.params if isinstance(param, __import__("click").Option)}

    verify_options = defaults(main.commands["verify"])
    compare_options = defaults(main.commands["compare"].commands["models"])
    assert verify.VerifySettings is settings.VerifySettings and compare.CompareSettings is settings.CompareSettings
    for options, schema in ((verify_options, settings.VerifySettings), (compare_options, settings.CompareSettings)):
        for name, value in options.items():
            if name in schema.model_fields:
                expected = schema.model_fields[name].get_default(call_default_factory=True)
                assert value == (expected or None if isinstance(expected, list) else expected), name
    assert verify_options["max_new_tokens"] == settings.VERIFY_MAX_NEW_TOKENS
    assert defaults(main.commands["eval"])["max_new_tokens"] == settings.MeasureSettings().max_new_tokens
    assert defaults(main.commands["chat"])["max_new_tokens"] == settings.CHAT_MAX_NEW_TOKENS
    assert defaults(main.commands["apply"])["dtype"] == settings.APPLY_DTYPE
    assert defaults(main.commands["directions"])["batch_size"] == settings.DIRECTIONS_BATCH_SIZE
    run_options = defaults(main.commands["run"])
    assert all(run_options[name] is None for name in run_options if name in settings.RunSettings.model_fields)  # TOML/env apply
