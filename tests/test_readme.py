"""The README's set-up commands are the ones CI runs and the CLI really has."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_commands = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("pip install torch")]
    assert len(ci_commands) == 1
    assert ci_commands[0] in (ROOT / "README.md").read_text()


def test_readme_main_job_uses_existing_commands():
    from abliterate.cli.commands import main

    readme = (ROOT / "README.md").read_text()
    main_job = next(line for line in readme.splitlines() if line.startswith("pip install torch") and "pytest" not in line)
    for command in [part.split()[1] for part in main_job.split("&&") if part.split()[0] == "abliterate"]:
        assert command in main.commands, command


def test_ci_builds_llama_cpp_with_the_projects_flags_and_pin():
    """One llama.cpp build everywhere: the flags and version the code names, never a cached wheel built otherwise."""
    import re

    from abliterate.ship.gguf_export import LLAMA_CPP_CMAKE_ARGS, LLAMA_CPP_INSTALL

    command = next(line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("pip install torch"))
    assert f'CMAKE_ARGS="{LLAMA_CPP_CMAKE_ARGS}" pip install --no-cache-dir llama-cpp-python==' in command
    pinned = re.search(r"llama-cpp-python==([0-9.]+)", (ROOT / "pyproject.toml").read_text()).group(1)
    assert f"llama-cpp-python=={pinned} " in command and LLAMA_CPP_INSTALL.endswith(f"llama-cpp-python=={pinned}")
    assert "-DGGML_AMX_INT8=OFF" in LLAMA_CPP_CMAKE_ARGS and "-DGGML_NATIVE=OFF" in LLAMA_CPP_CMAKE_ARGS
