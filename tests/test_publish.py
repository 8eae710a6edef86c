"""`abliterate push`, offline: the exact commit it would make, through a fake HfApi that records every call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from conftest import build_tiny_model, build_tiny_tokenizer

from abliterate.ship import publish
from abliterate.cli.commands import main

SENTINEL = "hf_SENTINELtokenNEVERonDISK0123456789"
RUN_FILES = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja", "README.md", "abliteration.json", "reproduce/run.json",
             "reproduce/directions.safetensors", "reproduce/study.journal", "reproduce/config.toml"}


class FakeApi:
    """Records what would be sent to the hub; `public` pretends the repository already exists and is public."""

    instances: list[FakeApi] = []

    def __init__(self, token=None, public=False):
        self.token, self.public, self.calls = token, public, []
        FakeApi.instances.append(self)

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def repo_info(self, repo_id, **kwargs):
        self.calls.append(("repo_info", repo_id, kwargs))
        return SimpleNamespace(private=not self.public)

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, list(operations), kwargs))

    def commits(self):
        return [call for call in self.calls if call[0] == "create_commit"]


@pytest.fixture(autouse=True)
def no_login(monkeypatch, tmp_path):
    """No token anywhere unless a test sets one: the user's own login must not leak into the tests."""
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))
    FakeApi.instances.clear()


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", SENTINEL)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An output directory as `abliterate run` leaves it (same record, same save path), plus debris that must
    never be uploaded: temp files of an interrupted save, a lock, a .env and a token file."""
    from abliterate.measure.ablation import AblationParams
    from abliterate.core.settings import load_settings
    from abliterate.measure.directions import Directions
    from abliterate.measure.evaluate import Metrics
    from abliterate.core.save import model_card, save_into
    from abliterate.core.rundir import identity as _identity

    out = tmp_path_factory.mktemp("runs") / "run1"
    out.mkdir()
    settings = load_settings(None, trials=4, tune_prompts=16, eval_prompts=16, judge="phrase", system_prompt='say "hi"')
    (out / "run.json").write_text(json.dumps({"identity": _identity(settings), "batch_size": 8, "base": {}}))
    Directions(torch.nn.functional.normalize(torch.randn(4, 64), dim=-1), metadata={"model": "tiny"}).save(
        out / "directions.safetensors")
    (out / "study.journal").write_text('{"op_code": 0, "worker_id": "w", "study_name": "abliterate"}\n')
    base = {split: Metrics(refusals, 16, 0.0, 0.0, "phrase").to_dict() for split, refusals in (("tune", 13), ("eval", 15))}
    edited = {"tune": Metrics(2, 16, 0.331, 0.043, "phrase").to_dict(), "eval": Metrics(1, 16, 0.174, 0.023, "phrase").to_dict()}
    params = AblationParams.single_direction(1.5, 1.0, ("attn", "mlp"), False)
    record = {"tool": "abliterate 0.1.0", "base_model": "tiny", "revision": None, "trial": 1, "parameters": params.to_dict(),
              "directions": {"file": "directions.safetensors", "sha256": "0" * 64}, "seed": 0,
              "settings": settings.model_dump(mode="json"), "prompt_sets_sha256": {"train_harmful": "1" * 64},
              "judge": "phrase", "dtype": "float32", "batch_size": 8,
              "metrics": {"base": base, "abliterated": edited}, "trials_finished": 4}
    save_into(build_tiny_model("llama"), build_tiny_tokenizer(), out, {"README.md": model_card(record)},
              "abliteration.json", record)
    (out / ".saving").mkdir()
    (out / ".saving" / "model.safetensors").write_bytes(b"half-written")
    (out / "abliteration.json.partial").write_text("{")
    (out / "study.journal.lock").write_text("")
    (out / ".env").write_text("HF_TOKEN=hf_dotenvSECRET\n")
    (out / "token").write_text("hf_notmine\n")
    (out / ".cache" / "huggingface").mkdir(parents=True)
    (out / ".cache" / "huggingface" / "README.md.metadata").write_text("x")
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return Path(shutil.copytree(finished_run, tmp_path / "copy"))


def _card(operations) -> str:
    return next(op.path_or_fileobj for op in operations if op.path_in_repo == "README.md").decode()


def test_push_commits_exactly_the_model_card_record_and_bundle_in_one_commit(finished_run, online):
    api = FakeApi()
    url, uploads = publish.push(finished_run, "someone/tiny-abliterated", private=True, api=api)

    assert url == "https://huggingface.co/someone/tiny-abliterated"
    assert [call[0] for call in api.calls] == ["create_repo", "repo_info", "create_commit"]
    assert api.calls[0][2] == {"private": True, "repo_type": "model", "exist_ok": True}
    (_, repo_id, operations, options), = api.commits()
    assert repo_id == "someone/tiny-abliterated" and options["repo_type"] == "model"
    assert options["commit_message"] == "abliterate 0.1.0: tiny, abliterated"
    paths = [op.path_in_repo for op in operations]
    assert sorted(paths) == sorted(RUN_FILES)  # nothing else: no .saving/, .partial, lock, .env, token, .cache
    assert [u.path_in_repo for u in uploads] == paths
    by_path = {op.path_in_repo: op.path_or_fileobj for op in operations}
    assert by_path["model.safetensors"] == str(finished_run / "model.safetensors")
    assert by_path["reproduce/study.journal"] == str(finished_run / "study.journal")


def test_card_has_base_and_abliterated_numbers_held_out_split_judge_and_usage(finished_run, online):
    api = FakeApi()
    publish.push(finished_run, "someone/tiny-abliterated", api=api)
    card = _card(api.commits()[0][2])
    assert "| eval (held out) | 15/16 | 1/16 | 0.174 | 0.023 |" in card
    assert "| tune (optimised on) | 13/16 | 2/16 | 0.331 | 0.043 |" in card
    assert "`phrase` judge" in card and "refusals (base)" in card and "refusals (abliterated)" in card
    assert 'from_pretrained("someone/tiny-abliterated")' in card and "PATH_OR_REPO" not in card
    assert "abliterate eval someone/tiny-abliterated --base tiny --split eval" in card
    front = card.split("---")[1]
    assert "base_model: Qwen/Qwen2.5-Coder-0.5B-Instruct" in front  # the hub needs a hub id, not 'tiny'
    assert "hf download someone/tiny-abliterated --include 'reproduce/*'" in card
    assert "--pick trial:1" in card


def test_reproduce_config_resumes_the_same_run(finished_run, monkeypatch, tmp_path):
    """reproduce/config.toml loads back to settings with the run's identity (so `abliterate run` resumes)."""
    from abliterate.core.settings import load_settings
    from abliterate.core.rundir import identity as _identity

    plan = {u.path_in_repo: u.source for u in publish.plan_upload(finished_run, "someone/x")}
    (tmp_path / "config.toml").write_bytes(plan["reproduce/config.toml"])
    monkeypatch.chdir(tmp_path)
    settings = load_settings(str(tmp_path / "config.toml"))
    assert _identity(settings) == json.loads((finished_run / "run.json").read_text())["identity"]
    record = json.loads((finished_run / "abliteration.json").read_text())
    assert settings.model_dump(mode="json")["space"] == record["settings"]["space"]  # warm start included


def test_private_flag_passes_through_and_a_public_repo_is_not_pushed_to_as_private(finished_run, online):
    api = FakeApi()
    publish.push(finished_run, "someone/x", private=False, api=api)
    assert api.calls[0][2]["private"] is False and "repo_info" not in [c[0] for c in api.calls]
    public = FakeApi(public=True)
    with pytest.raises(publish.UserError, match="exists and is public"):
        publish.push(finished_run, "someone/x", private=True, api=public)
    assert not public.commits()


def test_token_is_never_written(run_copy, online, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    before = {p: p.stat().st_mtime_ns for p in run_copy.rglob("*")}
    result = CliRunner().invoke(main, ["push", str(run_copy), "--repo", "someone/x"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].endswith("to https://huggingface.co/someone/x")
    api, = FakeApi.instances
    assert api.token is None  # huggingface_hub resolves HF_TOKEN itself; we do not pass it around
    assert {p: p.stat().st_mtime_ns for p in run_copy.rglob("*")} == before  # nothing written or changed
    for path in run_copy.rglob("*"):
        assert not path.is_file() or SENTINEL.encode() not in path.read_bytes(), path
    for op in api.commits()[0][2]:
        data = op.path_or_fileobj if isinstance(op.path_or_fileobj, bytes) else Path(op.path_or_fileobj).read_bytes()
        for secret in (SENTINEL, "hf_dotenvSECRET", "hf_notmine"):
            assert secret.encode() not in data, (secret, op.path_in_repo)


def test_sharded_plain_hf_directory(tmp_path, online):
    """Any complete HF model directory goes up: every shard and the index; no record, no bundle, a bare card."""
    out = tmp_path / "plain"
    build_tiny_model("llama").save_pretrained(out, max_shard_size="200KB")
    build_tiny_tokenizer().save_pretrained(out)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1
    paths = {u.path_in_repo for u in publish.plan_upload(out, "someone/plain")}
    assert set(shards) | {"model.safetensors.index.json", "README.md", "config.json"} <= paths
    assert not any(p.startswith("reproduce/") for p in paths) and "abliteration.json" not in paths
    (out / shards[0]).unlink()
    with pytest.raises(publish.UserError, match=f"lists {shards[0]}, which is missing"):
        publish.plan_upload(out, "someone/plain")


def test_card_is_regenerated_from_the_record_when_missing_or_lacking_the_numbers(run_copy):
    (run_copy / "README.md").write_text("# my model\n")
    card = next(u.source for u in publish.plan_upload(run_copy, "someone/x") if u.path_in_repo == "README.md").decode()
    assert "| eval (held out) | 15/16 | 1/16 | 0.174 | 0.023 |" in card and "# my model" not in card
    assert not (run_copy / "README.md").read_text().startswith("---")  # the directory itself is left alone


def test_apply_output_gets_a_bare_card_with_a_hub_valid_base_model(tiny_model_dir, tmp_path):
    out = Path(shutil.copytree(tiny_model_dir, tmp_path / "applied"))
    (out / "abliteration.json").write_text(json.dumps({"base_model": str(tmp_path), "parameters": {"norm_preserving": False}}))
    plan = {u.path_in_repo: u.source for u in publish.plan_upload(out, "someone/applied")}
    assert "abliteration.json" in plan and not any(p.startswith("reproduce/") for p in plan)
    card = plan["README.md"].decode()
    assert "no measurements were recorded" in card and 'from_pretrained("someone/applied")' in card
    assert "base_model:" not in card.split("---")[1]  # a local path is no hub id: left out of the metadata


def _error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_cli_dry_run_lists_the_operations_offline(finished_run):
    result = CliRunner().invoke(main, ["push", str(finished_run), "--repo", "someone/x", "--private", "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("would create (private) or update https://huggingface.co/someone/x with one commit of 12 files")
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(RUN_FILES)
    assert "generated" in next(line for line in lines if line.split()[0] == "README.md")


def test_cli_refuses_unfinished_or_incomplete_directories(run_copy, online):
    (run_copy / "abliteration.json").unlink()
    line = _error_line(CliRunner().invoke(main, ["push", str(run_copy), "--repo", "someone/x"]))
    assert "unfinished run (no abliteration.json" in line
    (run_copy / "run.json").unlink()
    (run_copy / "model.safetensors").unlink()
    line = _error_line(CliRunner().invoke(main, ["push", str(run_copy), "--repo", "someone/x", "--dry-run"]))
    assert "missing model weights" in line
    line = _error_line(CliRunner().invoke(main, ["push", str(run_copy / "nope"), "--repo", "someone/x"]))
    assert "not a directory" in line
    assert not FakeApi.instances


@pytest.mark.parametrize("repo", ["name-only", "a/b/c", "user/bad name", "user/-x", "/x"])
def test_cli_bad_repo_id(finished_run, repo):
    assert "user/name" in _error_line(CliRunner().invoke(main, ["push", str(finished_run), "--repo", repo]))


def test_cli_no_token_or_offline(finished_run, monkeypatch):
    line = _error_line(CliRunner().invoke(main, ["push", str(finished_run), "--repo", "someone/x"]))
    assert "HF_HUB_OFFLINE" in line  # conftest keeps tests offline
    monkeypatch.delenv("HF_HUB_OFFLINE")
    line = _error_line(CliRunner().invoke(main, ["push", str(finished_run), "--repo", "someone/x"]))
    assert "hf auth login" in line and "HF_TOKEN" in line


def test_network_errors_are_one_line(finished_run, online, monkeypatch):
    from huggingface_hub import errors

    class Down(FakeApi):
        def create_repo(self, repo_id, **kwargs):
            raise ConnectionError("Failed to resolve 'huggingface.co'\nmore detail")

    class Unauthorized(FakeApi):
        def create_commit(self, repo_id, operations, **kwargs):
            response = SimpleNamespace(status_code=401, headers={}, request=None)
            raise errors.HfHubHTTPError("401 Client Error: Unauthorized", response=response)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", Down)
    result = CliRunner().invoke(main, ["push", str(finished_run), "--repo", "someone/x"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.splitlines() == ["uploading 12 files to someone/x in one commit",
                                          "error: upload to someone/x failed: Failed to resolve 'huggingface.co'"]
    with pytest.raises(publish.UserError, match="rejected the token"):
        publish.push(finished_run, "someone/x", api=Unauthorized())
