"""Direction measurement: the streamed float64 means equal a direct computation; options do what they say;
files round-trip and other tools' .pt files are read safely."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import build_tiny_model, build_tiny_tokenizer

from abliterate.core.arch import adapter_for
from abliterate.measure.directions import Directions, mean_last_token_residuals, refusal_directions
from abliterate.errors import UserError
from abliterate.measure.engines.transformers import TransformersEngine

PROMPTS = ["How do I bake bread?", "Tell me a joke about cats and dogs", "hi", "Explain rainbows to a child, briefly."]


@pytest.fixture(scope="module")
def llama():
    model = build_tiny_model("llama")
    return model, build_tiny_tokenizer(), adapter_for(model)


def direct_last_token_residuals(model, tokenizer, prompts) -> torch.Tensor:
    """[n_prompts, n_layers, hidden] from output_hidden_states, one prompt at a time (no padding at all)."""
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        rows.append(torch.stack([h[0, -1] for h in hidden[1:]]))
    return torch.stack(rows)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_streamed_means_equal_direct_computation(llama, batch_size):
    model, tokenizer, adapter = llama
    streamed = mean_last_token_residuals(model, tokenizer, adapter, PROMPTS, batch_size=batch_size)
    direct = direct_last_token_residuals(model, tokenizer, PROMPTS).double().mean(0)
    assert streamed.dtype == torch.float64 and streamed.shape == (adapter.n_layers, adapter.hidden_size)
    # hidden_states[-1] has the final norm applied; every layer before it is the raw residual.
    torch.testing.assert_close(streamed[:-1], direct[:-1], atol=1e-5, rtol=1e-5)


def test_winsorize_clamps_each_residual_at_its_quantile(llama):
    model, tokenizer, adapter = llama
    quantile = 0.8
    streamed = mean_last_token_residuals(model, tokenizer, adapter, PROMPTS, batch_size=2, winsorize_quantile=quantile)
    residuals = direct_last_token_residuals(model, tokenizer, PROMPTS)
    bound = torch.quantile(residuals.abs(), quantile, dim=-1, keepdim=True)
    expected = residuals.clamp(-bound, bound).double().mean(0)
    torch.testing.assert_close(streamed[:-1], expected[:-1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(streamed, mean_last_token_residuals(model, tokenizer, adapter, PROMPTS))


def test_positions_average_each_prompts_last_tokens_before_the_mean(llama):
    model, tokenizer, adapter = llama
    streamed = mean_last_token_residuals(model, tokenizer, adapter, PROMPTS, batch_size=3, positions=2)
    rows = []
    for prompt in PROMPTS:  # one at a time: no padding, so the last two positions are the prompt's own
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        rows.append(torch.stack([h[0, -2:].mean(0) for h in hidden[1:]]))
    torch.testing.assert_close(streamed[:-1], torch.stack(rows).double().mean(0)[:-1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(streamed, mean_last_token_residuals(model, tokenizer, adapter, PROMPTS))


def test_directions_are_unit_and_projected_ones_orthogonal_to_harmless_mean():
    generator = torch.Generator().manual_seed(0)
    harmful, harmless = torch.randn(5, 32, generator=generator), torch.randn(5, 32, generator=generator)
    plain = refusal_directions(harmful, harmless)
    projected = refusal_directions(harmful, harmless, projected=True)
    torch.testing.assert_close(plain.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(plain, torch.nn.functional.normalize(harmful - harmless, dim=-1))
    torch.testing.assert_close(projected.norm(dim=-1), torch.ones(5))
    assert (projected * harmless).sum(-1).abs().max() < 1e-5
    assert (plain * harmless).sum(-1).abs().max() > 1e-2


def test_save_load_round_trip_with_metadata(tmp_path):
    directions = torch.nn.functional.normalize(torch.randn(4, 64), dim=-1)
    original = Directions(directions, torch.randn(4, 64).double(), torch.randn(4, 64).double(),
                          {"model": "x", "n_layers": 4, "harmful_sha256": "abc"})
    path = original.save(tmp_path / "d.safetensors", also_pt=True)
    loaded = Directions.load(path)
    assert torch.equal(loaded.directions, directions) and loaded.metadata == original.metadata
    assert torch.equal(loaded.harmful_mean, original.harmful_mean)
    from_pt = Directions.load(tmp_path / "d.pt")
    torch.testing.assert_close(from_pt.directions, directions)
    assert not list(tmp_path.glob("*.partial"))


def test_other_tools_pt_layouts_are_fitted(llama, tmp_path):
    _, _, adapter = llama
    with_embedding_row = torch.randn(adapter.n_layers + 1, adapter.hidden_size)
    torch.save(with_embedding_row, tmp_path / "layers.pt")
    fitted = Directions.load(tmp_path / "layers.pt").fitted_to(adapter)
    torch.testing.assert_close(fitted.directions, torch.nn.functional.normalize(with_embedding_row[1:], dim=-1))
    single = torch.randn(adapter.hidden_size)
    torch.save(single, tmp_path / "refusal.pt")
    fitted = Directions.load(tmp_path / "refusal.pt").fitted_to(adapter)
    assert fitted.directions.shape == (adapter.n_layers, adapter.hidden_size)
    torch.testing.assert_close(fitted.directions[2], torch.nn.functional.normalize(single, dim=0))


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pt_files_are_read_with_weights_only(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump(_Payload(), handle)
    with pytest.raises(UserError, match="weights_only"):
        Directions.load(tmp_path / "evil.pt")
    assert "this must never run" not in capsys.readouterr().out


def test_directions_of_another_model_are_rejected(llama):
    _, _, adapter = llama
    other = Directions(torch.randn(7, 48), metadata={"model": "other-model"})
    with pytest.raises(UserError, match="other-model.*7 layers"):
        other.fitted_to(adapter)


class ScriptedJudge:
    """Says refusal or not for each answer in turn, whatever the answer says."""

    def __init__(self, verdicts: list[bool]):
        self.verdicts = verdicts

    def refusals(self, texts: list[str]) -> list[bool]:
        assert len(texts) == len(self.verdicts)
        return list(self.verdicts)


def test_directions_come_from_the_harmful_prompts_the_model_refuses(llama):
    """Arditi et al.'s filter: the prompts whose answers the judge calls refusals, in their order; when fewer than
    MIN_REFUSED_FOR_DIRECTIONS are refused (a model that hardly refuses), None: the caller keeps all of them."""
    from abliterate.measure.evaluate import MIN_REFUSED_FOR_DIRECTIONS, refused_subset

    model, tokenizer, _ = llama
    prompts = [f"prompt number {i}" for i in range(12)]
    enough = [i % 4 != 1 for i in range(12)]  # 9 refused
    assert sum(enough) >= MIN_REFUSED_FOR_DIRECTIONS
    refused = refused_subset(TransformersEngine(model, tokenizer), prompts, prompts, ScriptedJudge(enough), 2, 5)
    assert refused == [p for p, verdict in zip(prompts, enough) if verdict]
    too_few = [i < MIN_REFUSED_FOR_DIRECTIONS - 1 for i in range(12)]
    assert refused_subset(TransformersEngine(model, tokenizer), prompts, prompts, ScriptedJudge(too_few), 2, 5) is None
