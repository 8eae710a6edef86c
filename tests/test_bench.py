"""bench/harness.py writes complete results and renders the README table; every benchmark script still starts."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["trial", "packed", "shared_head", "prefix", "eval", "directions", "gguf_read", "serve", "scale", "engines"]


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("harness", ROOT / "bench" / "harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["harness"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    del sys.modules["harness"]


def test_record_writes_every_field_through_a_temporary_file(harness, tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace

    def replace(source, target):
        renames.append((Path(source), Path(target)))
        assert json.loads(Path(source).read_text())["name"] == "packed"  # complete before it is renamed
        real_replace(source, target)

    monkeypatch.setattr(harness.os, "replace", replace)
    path = tmp_path / "results" / "packed.json"
    harness.record("packed", {"generation_speedup": 1.45, "same_tokens": 24, "gap": [float("nan")]}, "python bench/packed.py",
                   title="prepacked weights", headline="1.45x", path=path)

    data = json.loads(path.read_text())
    assert data["figures"] == {"generation_speedup": 1.45, "same_tokens": 24, "gap": [None]}  # strict JSON: no NaN
    assert data["command"] == "python bench/packed.py" and data["title"] == "prepacked weights"
    assert data["date"][:4].isdigit() and data["commit"] and isinstance(data["dirty"], bool)
    assert {"cpu", "cores", "flags", "torch", "threads"} <= data["machine"].keys()
    assert [target for _, target in renames] == [path] and renames[0][0].parent == path.parent
    assert not renames[0][0].exists() and list(path.parent.iterdir()) == [path]


def test_table_renders_the_newest_first(harness, tmp_path):
    machine = {"cpu": "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz", "cores": 2,
               "flags": ["avx2", "avx512f", "avx512_bf16", "amx_tile"]}
    for name, date, dirty in (("prefix", "2026-11-24T10:00:00+00:00", False), ("packed", "2026-12-01T09:00:00+00:00", True)):
        result = harness.Result(name=name, title=f"{name} title", headline=f"{name} 1.5x", figures={}, machine=machine,
                                command=f"python bench/{name}.py", date=date, commit="abc1234", dirty=dirty)
        harness.write_json(tmp_path / f"{name}.json", vars(result))

    readme = harness.table_rows(harness.load_results(tmp_path))
    assert readme == [
        "| packed title | `python bench/packed.py` | 2026-12-01 | 2-core Intel Xeon Platinum 8480+ (AVX-512, AVX512-BF16, "
        "AMX) | packed 1.5x (uncommitted code) |",
        "| prefix title | `python bench/prefix.py` | 2026-11-24 | 2-core Intel Xeon Platinum 8480+ (AVX-512, AVX512-BF16, "
        "AMX) | prefix 1.5x |",
    ]
    ledger = harness.table_rows(harness.load_results(tmp_path), ledger=True)
    assert ledger[0].startswith("| 2026-12-01 | abc1234 (dirty) | 2-core Intel Xeon")

    table = subprocess.run([sys.executable, str(ROOT / "bench" / "harness.py"), "table", "--results", str(tmp_path)],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert table[0] == "| benchmark | command | date | machine | newest figure |" and table[2:] == readme


def test_machine_summary_names_an_avx2_cpu_and_a_gpu(harness):
    described = {"cpu": "AMD EPYC 7R13 48-Core Processor", "cores": 2, "flags": ["avx2"]}
    assert harness.machine_summary(described) == "2-core AMD EPYC 7R13 (AVX2 only)"
    assert harness.machine_summary({**described, "gpu": "NVIDIA H200"}) == "1 NVIDIA H200, 2-core AMD EPYC 7R13 (AVX2 only)"


def test_the_recorded_command_leaves_out_where_the_result_went(harness):
    script = str(ROOT / "bench" / "prefix.py")
    assert harness.this_command([script, "--repeats", "1", "--json", "/tmp/x.json"]) == "python bench/prefix.py --repeats 1"
    assert harness.this_command([script, "--json=/tmp/x.json", "--model", "a b"]) == "python bench/prefix.py --model 'a b'"


def test_alternate_takes_turns_and_keeps_what_each_returned(harness):
    calls = []
    timings = harness.alternate({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, repeats=2)
    assert calls == ["a", "b", "a", "b"]
    assert timings["a"].values == [1, 1] and len(timings["b"].seconds) == 2 and timings["b"].best >= 0
    assert harness.ratio(3.0, 1.5) == 2.0


@pytest.fixture(scope="module")
def helps():
    """Every script's --help, started together (each imports torch and abliterate: seconds apiece)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    running = {name: subprocess.Popen([sys.executable, f"bench/{name}.py", "--help"], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in SCRIPTS}
    outputs = {name: process.communicate(timeout=300) for name, process in running.items()}
    return {name: (running[name].returncode, *outputs[name]) for name in SCRIPTS}


def test_every_benchmark_script_is_checked():
    """heretic_adapter.py runs inside Heretic's own environment (vs_heretic.sh), not abliterate's; synthetic.py builds
    scale.py's models (a tool, not a benchmark)."""
    assert {path.stem for path in (ROOT / "bench").glob("*.py")} == {*SCRIPTS, "harness", "heretic_adapter", "synthetic"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_starts_and_takes_the_shared_options(helps, name):
    returncode, out, err = helps[name]
    assert returncode == 0, err
    assert "--json PATH" in out
