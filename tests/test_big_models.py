"""Big models: bitsandbytes 4-bit loading (measured through hooks, saved by a full-precision bake), accelerate
offload under `max_memory`, and the memory plan that refuses, in one line and before anything is written, a model
that cannot fit."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import build_tiny_model, build_tiny_tokenizer
from safetensors.torch import load_file

from abliterate.cli.commands import main
from abliterate.core import memory
from abliterate.core.memory import GIB, load_bytes, parse_max_memory, plan_load
from abliterate.errors import UserError
from abliterate.measure.ablation import AblationParams

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install 'abliterate[quant]')")
SMALL = ["--trials", "2", "--startup-trials", "2", "--tune-prompts", "3", "--eval-prompts", "3", "--max-new-tokens", "4",
         "--judge", "phrase"]
# A 70B llama's shape (config only: the plan never reads weights).
LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5}


@pytest.fixture(scope="module")
def quant_model_dir(tmp_path_factory):
    """A tiny llama whose linear layers' input sizes are multiples of 64 (bitsandbytes' CPU 4-bit block)."""
    path = tmp_path_factory.mktemp("tiny-llama-q")
    build_tiny_model("llama", intermediate_size=128).save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("big-prompts")
    (path / "harmful.txt").write_text("\n".join(f"Do bad thing number {i}" for i in range(10)))
    (path / "harmless.txt").write_text("\n".join(f"Bake cake number {i}" for i in range(10)))
    (path / "config.toml").write_text("direction_prompts = 4\nkl_tokens = 2\n")
    return path


def run_args(model, prompts, out, *extra):
    return ["run", str(model), "-o", str(out), "--harmful", str(prompts / "harmful.txt"), "--harmless",
            str(prompts / "harmless.txt"), "--config", str(prompts / "config.toml"), *SMALL, *extra]


def invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture
def machine(monkeypatch):
    """This machine as the plan sees it: 16 GiB RAM free, no GPU, 50 GiB free disk (changeable per test)."""
    state = {"ram": 16 * GIB, "gpus": [], "disk": 50 * GIB}
    monkeypatch.setattr(memory, "available_memory", lambda folder=None: (state["ram"], state["gpus"], state["disk"]))
    return state


@pytest.fixture
def config_only_70b(tmp_path):
    folder = tmp_path / "llama-70b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_70B))
    return folder


# ----------------------------------------------------------------------------------------- the plan


def test_plan_counts_4bit_linears_at_4_5_bits_and_the_rest_in_the_dtype():
    full, quantized = load_bytes(LLAMA_70B, 2), load_bytes(LLAMA_70B, 2, "4bit")
    assert 130 * GIB < full < 132 * GIB  # 70.6 B parameters x 2 bytes
    assert 37 * GIB < quantized < 40 * GIB  # linears at 4.5 bits, 2 x 1 B embedding parameters at 2 bytes


def test_max_memory_parses_pairs_and_json_and_refuses_junk():
    assert parse_max_memory("cpu=2GB, 0=20GB") == {"cpu": 2 * GIB, 0: 20 * GIB}
    assert parse_max_memory('{"cpu": "512MB", "cuda:1": 1000}') == {"cpu": 512 << 20, 1: 1000}
    for bad in ("cpu", "gpu=2GB", "cpu=lots", "{oops"):
        with pytest.raises(UserError):
            parse_max_memory(bad)


def test_plan_says_what_would_fit_in_one_line():
    with pytest.raises(UserError) as refused:
        plan_load(LLAMA_70B, 2, "none", None, ram=16 * GIB, gpus=[], disk=50 * GIB, reference="llama-70b")
    line = str(refused.value)
    assert "\n" not in line and "would fit: --quantize 4bit" not in line  # 40 GiB does not fit 12 GiB of RAM either
    assert line.endswith("would fit: a GPU of 192 GB; or --quantize 4bit on a GPU of 48 GB")
    assert plan_load(LLAMA_70B, 2, "4bit", None, ram=16 * GIB, gpus=[48 * GIB], disk=0)["fits"]
    assert plan_load(LLAMA_70B, 2, "none", {"cpu": 8 * GIB}, ram=16 * GIB, gpus=[], disk=200 * GIB)["fits"]


def test_run_refuses_a_model_that_fits_nowhere_before_writing(config_only_70b, prompts, tmp_path, machine):
    out = tmp_path / "never"
    result = CliRunner().invoke(main, run_args(config_only_70b, prompts, out, "--max-memory", "cpu=8GB"))
    assert result.exit_code == 2
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "needs about" in line and "would fit: --quantize 4bit" in line
    assert not out.exists()
    machine["disk"] = 10 * GIB  # now not even 4-bit fits RAM and disk: only other hardware would
    result = CliRunner().invoke(main, run_args(config_only_70b, prompts, out))
    assert result.exit_code == 2 and "a GPU of" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_apply_plans_before_loading(config_only_70b, tmp_path, machine):
    directions = tmp_path / "d.safetensors"
    from abliterate.measure.directions import Directions

    Directions(torch.zeros(80, 8192), torch.zeros(80, 8192), torch.zeros(80, 8192)).save(directions)
    result = CliRunner().invoke(main, ["apply", str(config_only_70b), "--directions", str(directions), "--layer",
                                       "0.5", "-o", str(tmp_path / "out"), "--dtype", "bfloat16"])
    assert result.exit_code == 2 and "needs about" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_missing_bitsandbytes_is_one_line(quant_model_dir, prompts, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    result = CliRunner().invoke(main, run_args(quant_model_dir, prompts, tmp_path / "out", "--quantize", "4bit"))
    assert result.exit_code == 2 and "bitsandbytes" in result.output and "pip install" in result.output
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- loading and running


@needs_bnb
def test_a_4bit_workbench_measures_trials_through_hooks_and_refuses_to_bake(quant_model_dir):
    from abliterate.measure.workbench import PromptSplits, Workbench

    splits = PromptSplits(train=([f"Do bad {i}" for i in range(4)], [f"Bake cake {i}" for i in range(4)]),
                          tune=(["Do bad x", "Do bad y"], ["Bake y", "Bake z"]))
    bench = Workbench.open(str(quant_model_dir), splits, judge="phrase", dtype="float32", quantize="4bit",
                           max_new_tokens=4, kl_tokens=2)
    assert type(bench.model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    bench.use(bench.directions())
    assert bench.current_directions.directions.shape == (4, 64) and bench.current_directions.directions.isfinite().all()
    params = AblationParams.single_direction(0.5, 1.0)
    assert bench.measure(params, "tune").kl > 0  # the hooks fired on the 4-bit writers
    assert bench.measure(None, "tune").kl == pytest.approx(0, abs=1e-6)  # and were removed
    with pytest.raises(UserError, match="cannot be edited"):
        bench.bake(params)


@needs_bnb
def test_a_4bit_run_saves_the_full_precision_bake(quant_model_dir, prompts, tmp_path):
    out = tmp_path / "run"
    result = invoke(run_args(quant_model_dir, prompts, out, "--quantize", "4bit",
                             "--dtype", "float32"))
    assert result.exit_code == 0, result.output
    record = json.loads((out / "abliteration.json").read_text())
    assert record["settings"]["quantize"] == "4bit" and "4bit" in record["measured_on"]
    base, baked = load_file(quant_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert base.keys() == baked.keys() and all(baked[k].dtype == base[k].dtype == torch.float32 for k in base)
    changed = [k for k in base if not torch.equal(base[k], baked[k])]
    assert changed and all("o_proj" in k or "down_proj" in k for k in changed)


def test_a_quantised_run_refuses_norm_preserving_trials(quant_model_dir, prompts, tmp_path):
    config = tmp_path / "np.toml"
    config.write_text("direction_prompts = 4\n[space]\nnorm_preserving = [false, true]\n")
    args = run_args(quant_model_dir, prompts, tmp_path / "out", "--quantize", "4bit")
    args[args.index(str(prompts / "config.toml"))] = str(config)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "norm-preserving" in result.output and not (tmp_path / "out").exists()


def test_a_run_under_max_memory_completes_with_disk_offload(quant_model_dir, prompts, tmp_path):
    out, offload = tmp_path / "run", tmp_path / "offload"
    weights = (quant_model_dir / "model.safetensors").stat().st_size
    result = invoke(run_args(quant_model_dir, prompts, out, "--max-memory", "cpu=0.05MB", "--offload-folder",
                             str(offload), "--dtype", "float32"))
    assert weights > 0.05 * (1 << 20)  # the model does not fit the limit: accelerate offloads it to disk
    assert result.exit_code == 0, result.output
    record = json.loads((out / "abliteration.json").read_text())
    assert "disk" in record["devices"]  # accelerate placed weights on disk (read from the safetensors in place)
    base, baked = load_file(quant_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert base.keys() == baked.keys() and record["metrics"]["abliterated"]["eval"]["total"] == 3
    assert any(not torch.equal(base[k], baked[k]) for k in base)


def test_quantize_is_part_of_a_runs_identity_and_older_runs_resume_unquantised(tmp_path):
    from abliterate.core.rundir import RUN_FILE, identity, prepare
    from abliterate.core.settings import load_settings

    out = tmp_path / "old-run"
    out.mkdir()
    before = identity(load_settings())
    del before["quantize"]  # a run made before the setting existed loaded full precision
    (out / RUN_FILE).write_text(json.dumps({"identity": before}))
    prepare(out, load_settings())  # resumes
    with pytest.raises(UserError, match="quantize"):
        prepare(out, load_settings(quantize="4bit"))
