"""The README's set-up commands are the ones CI runs and the CLI really has."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_commands = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("pip install torch")]
    assert len(ci_commands) == 1
    assert ci_commands[0] in (ROOT / "README.md").read_text()


def test_readme_main_job_uses_existing_commands():
    from abliterate.cli import main

    readme = (ROOT / "README.md").read_text()
    main_job = next(line for line in readme.splitlines() if line.startswith("pip install torch") and "pytest" not in line)
    for command in [part.split()[1] for part in main_job.split("&&") if part.split()[0] == "abliterate"]:
        assert command in main.commands, command
