"""Prepacked linear weights (packed.py): inside the block the model computes what it computes outside it -- through
trials that swap weights in and out -- and afterwards the modules are exactly as before."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, build_tiny_tokenizer

from abliterate.measure.engines import packed as packed_module
from abliterate.measure.ablation import AblationParams, ComponentParams, Kernel, ablate, plan_edits
from abliterate.core.arch import adapter_for
from abliterate.measure.engines.transformers import generate, next_token_logprobs
from abliterate.measure.engines.packed import packable, packed_linears

PROMPTS = ["<|user|>Say hi<|end|><|assistant|>", "<|user|>Tell me a longer story please<|end|><|assistant|>",
           "<|user|>x<|end|><|assistant|>", "<|user|>What is two plus two?<|end|><|assistant|>",
           "<|user|>Name a colour<|end|><|assistant|>"]

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def norm_preserving_edits(model, strength: float):
    adapter = adapter_for(model)
    directions = torch.nn.functional.normalize(torch.randn(adapter.n_layers, adapter.hidden_size,
                                                           generator=torch.Generator().manual_seed(1)), dim=-1)
    kernel = Kernel(strength, adapter.n_layers - 1, strength / 2, adapter.n_layers)
    params = AblationParams({kind: ComponentParams(1.0, kernel) for kind in ("attn", "mlp")}, norm_preserving=True)
    return plan_edits(adapter, directions, params)


def measure(model, tokenizer):
    logprobs = next_token_logprobs(model, tokenizer, PROMPTS, batch_size=8)
    return logprobs, generate(model, tokenizer, PROMPTS, 8, batch_size=8).tokens


def test_packed_model_computes_what_the_plain_one_does_through_swapped_weights():
    model, tokenizer = build_tiny_model("qwen2"), build_tiny_tokenizer()
    plain = {"base": measure(model, tokenizer)}
    for strength in (0.6, 1.3):  # two trials, each swapping edited copies in and back out
        with ablate(norm_preserving_edits(model, strength), norm_preserving=True):
            plain[strength] = measure(model, tokenizer)
    with packed_linears(model) as active:
        assert active
        assert all(isinstance(module.__dict__.get("forward"), packed_module._PackedForward) for module in packable(model))
        for key in ("base", 0.6, "base", 1.3, "base"):
            if key == "base":
                logprobs, tokens = measure(model, tokenizer)
            else:
                with ablate(norm_preserving_edits(model, key), norm_preserving=True):
                    logprobs, tokens = measure(model, tokenizer)
            assert (logprobs - plain[key][0]).abs().max() < 1e-4, key  # not a stale pack of another trial's weights
            assert tokens == plain[key][1], key
    assert not any("forward" in module.__dict__ for module in model.modules())
    assert torch.equal(measure(model, tokenizer)[0], plain["base"][0])  # bit for bit the model it was


def test_nothing_is_packed_where_it_cannot_pay_or_is_not_safe(monkeypatch):
    bf16 = build_tiny_model("llama").to(torch.bfloat16)
    with packed_linears(bf16) as active:
        assert not active and packable(bf16) == []  # bfloat16: the plain path (unmeasured on CPUs)

    model = build_tiny_model("llama")
    hooked = next(module for module in model.modules() if type(module) is torch.nn.Linear)
    hooked._hf_hook = object()  # accelerate wraps this module's forward: leave it to accelerate
    assert hooked not in packable(model) and len(packable(model)) > 0

    monkeypatch.setattr(packed_module, "_available_memory", lambda: 1000)  # the copies would not fit
    with packed_linears(model) as active:
        assert not active
        assert not any("forward" in module.__dict__ for module in model.modules())
    monkeypatch.setattr(packed_module, "_available_memory", lambda: None)
    monkeypatch.setattr(packed_module, "ENABLED", False)
    with packed_linears(model) as active:
        assert not active


def test_a_packed_product_that_disagrees_is_never_used(monkeypatch):
    model = build_tiny_model("llama")
    monkeypatch.setattr(packed_module, "_pack", lambda weight: torch.ops.mkldnn._reorder_linear_weight(
        (weight * 1.5).contiguous()))  # a broken build, as far as the check can tell
    with packed_linears(model) as active:
        assert not active
        assert not any("forward" in module.__dict__ for module in model.modules())


def test_a_run_records_the_same_trials_packed_as_plain(tiny_model_dir, tmp_path, monkeypatch):
    """`run` packs for its trials (a CPU, float32: forced, as `auto` picks bfloat16 where the CPU has fast bf16)
    and the packing changes no recorded number."""
    import json
    from contextlib import contextmanager

    from click.testing import CliRunner

    from abliterate.search import run as run_module
    from abliterate.cli.commands import main
    from abliterate.search.study import open_study

    (tmp_path / "harmful.txt").write_text("\n".join(f"Do bad thing number {i}" for i in range(10)))
    (tmp_path / "harmless.txt").write_text("\n".join(f"Bake cake number {i}" for i in range(10)))
    packed_during_trials = []

    @contextmanager
    def spy(model, *args, **kwargs):
        with packed_linears(model, *args, **kwargs) as active:
            packed_during_trials.append(active)
            yield active

    monkeypatch.setattr(run_module, "packed_linears", spy)
    monkeypatch.setenv("ABLITERATE_DIRECTION_PROMPTS", "4")
    monkeypatch.setenv("ABLITERATE_BATCH_SIZE", "8")
    trials = {}
    for packed in (True, False):
        monkeypatch.setattr(packed_module, "ENABLED", packed)
        out = tmp_path / f"run-{packed}"
        result = CliRunner().invoke(main, [
            "run", str(tiny_model_dir), "-o", str(out), "--harmful", str(tmp_path / "harmful.txt"), "--harmless",
            str(tmp_path / "harmless.txt"), "--trials", "4", "--startup-trials", "2", "--tune-prompts", "6",
            "--eval-prompts", "3", "--max-new-tokens", "6", "--dtype", "float32"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        trials[packed] = [t.values for t in open_study(str(out / "study.journal"), 0, 2).get_trials(deepcopy=False)]
        assert json.loads((out / "abliteration.json").read_text())["trials_finished"] == 4
    assert packed_during_trials == [True, False]
    assert [refusals for refusals, _ in trials[True]] == [refusals for refusals, _ in trials[False]]
    assert [kl for _, kl in trials[True]] == pytest.approx([kl for _, kl in trials[False]], rel=1e-3, abs=1e-6)
