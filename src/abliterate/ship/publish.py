"""Publishing a saved model to the Hugging Face Hub: what goes up (decided offline), then one atomic commit.

`plan_upload` reads an output directory and lists exactly what would be committed, by allowlist: the model files,
the model card (README.md, with the run's numbers), `abliteration.json`, and a `reproduce/` bundle with the run's
state (`run.json`, `directions.safetensors`, `study.journal`). Nothing else in the directory ever goes up:
no temporary `.partial`/`.saving` paths, no lock files, no `.env`, no credentials.
`push` creates the repository if needed and commits the plan in one `create_commit`: all or nothing.
The token is huggingface_hub's business (HF_TOKEN or the cached `hf auth login`); we never write it anywhere.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import NamedTuple

from abliterate.version import __version__
from abliterate.core.settings import toml_value
from abliterate.errors import UserError

RECORD, RUN_STATE = "abliteration.json", "run.json"
REPRODUCE_DIR = "reproduce"
# The run's state, uploaded under reproduce/: downloaded there, it is a run directory `abliterate run` resumes.
REPRODUCE_FILES = ("run.json", "directions.safetensors", "study.journal")
MODEL_FILES = (
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
)
TEMPLATES_DIR = "additional_chat_templates"  # transformers saves extra named chat templates here


class Upload(NamedTuple):
    source: Path | bytes  # a file in the output directory, or generated content (the hub's model card)
    path_in_repo: str

    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("not user/name")
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"--repo must be a repository id like user/name (letters, digits, '-', '_', '.'); "
                        f"got '{repo_id}'") from None
    return repo_id


def read_record(out: Path) -> dict | None:
    path = out / RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); was the run interrupted?") from None


def _weight_files(out: Path) -> list[Path]:
    """The safetensors weights: the shards named by an index, or the single `model.safetensors`."""
    indexes = sorted(out.glob("*.safetensors.index.json"))
    if indexes:
        files = set(indexes)
        for index in indexes:
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise UserError(f"{index} is not a valid safetensors index") from None
            missing = sorted(name for name in shards if not (out / name).is_file())
            if missing:
                raise UserError(f"{out} is incomplete: {index.name} lists {', '.join(missing)}, which is missing")
            files |= {out / name for name in shards}
        return sorted(files)
    single = out / "model.safetensors"
    return [single] if single.is_file() else []


def check_output(out_dir: str | Path) -> tuple[Path, dict | None]:
    """A finished abliterate output (model + abliteration.json) or a complete HF model directory; else UserError."""
    out = Path(out_dir)
    if not out.is_dir():
        raise UserError(f"{out} is not a directory; give the output directory of abliterate run or apply")
    record = read_record(out)
    if record is None and (out / RUN_STATE).is_file():
        raise UserError(f"{out} holds an unfinished run (no {RECORD} yet); run the same `abliterate run` command "
                        "to finish and save it, then push")
    missing = [name for name, present in (("config.json", (out / "config.json").is_file()),
                                           ("model weights (model.safetensors or a sharded index)", _weight_files(out)))
               if not present]
    if missing:
        raise UserError(f"{out} is not a complete model: missing {' and '.join(missing)}")
    return out, record


def _remote_code_files(out: Path) -> list[Path]:
    """A model with its own code (config.json `auto_map`) needs its .py files beside the weights."""
    try:
        config = json.loads((out / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{out / 'config.json'} is not valid JSON") from None
    return sorted(out.glob("*.py")) if isinstance(config, dict) and config.get("auto_map") else []


def _has_run_numbers(card: str, record: dict) -> bool:
    """The card shows base and abliterated refusals on the held-out split, and the judge."""
    base, edited = record["metrics"]["base"]["eval"], record["metrics"]["abliterated"]["eval"]
    return ("eval (held out)" in card and f"{base['refusals']}/{base['total']}" in card
            and f"{edited['refusals']}/{edited['total']}" in card and f"`{record.get('judge')}`" in card)


def _hub_base_model(reference: str | None) -> str | None:
    """The base model as the hub knows it (front matter `base_model` must be a hub id), or None."""
    from abliterate.core.bundled import BUNDLED

    if not reference:
        return None
    if reference in BUNDLED:
        return BUNDLED[reference].base_model
    if reference.count("/") != 1 or reference.startswith((".", "/", "~")) or Path(reference).expanduser().exists():
        return None
    return reference


def _bare_card(record: dict | None, out: Path) -> str:
    """A card for a model without run numbers (`abliterate apply`, or any HF directory)."""
    base = (record or {}).get("base_model")
    title = f"{base} — abliterated" if base else out.resolve().name
    lines = ["---", *([f"base_model: {base}"] if base else []), "library_name: transformers",
             "tags:", "- abliterated", "---", "", f"# {title}", ""]
    if record:
        lines += ["The refusal direction removed from the weights by directional ablation (abliterate); "
                  "no measurements were recorded.",
                  f"Measure it: `abliterate eval PATH{f' --base {base}' if base else ''}`.", "",
                  "## Parameters", "", "```json", json.dumps(record.get("parameters", {}), indent=2), "```", ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")',
              'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")', "```", ""]
    return "\n".join(lines)


def hub_card(out: Path, record: dict | None, repo_id: str, bundle: list[str]) -> str:
    """The model card as published: the directory's README.md if it has the run's numbers (so hand edits are
    kept), else one made from the record; usage pointed at the repository; a valid `base_model`; the bundle."""
    from abliterate.core.save import model_card

    readme = out / "README.md"
    card = readme.read_text(encoding="utf-8") if readme.is_file() else None
    if record and "metrics" in record:
        if card is None or not _has_run_numbers(card, record):
            card = model_card(record)
    elif card is None:
        card = _bare_card(record, out)
    card = card.replace("PATH_OR_REPO", repo_id).replace("abliterate eval PATH ", f"abliterate eval {repo_id} ")
    card = card.replace("abliterate eval PATH`", f"abliterate eval {repo_id}`")
    if card.startswith("---\n") and record:
        front, sep, body = card[4:].partition("\n---")
        hub_base = _hub_base_model(record.get("base_model"))
        line = f"base_model: {hub_base}" if hub_base else ""
        front = re.sub(r"(?m)^base_model:.*$\n?", line + "\n" if line else "", front)
        card = "---\n" + front + sep + body
    if bundle and record and f"{REPRODUCE_DIR}/" not in card:
        card = card.rstrip("\n") + "\n\n" + _reproduce_section(record, repo_id, bundle)
    return card


def reproduce_config(record: dict) -> str:
    """The run's settings as a TOML file for `abliterate run --config`: the same identity, so the bundle resumes."""
    settings = {k: v for k, v in record["settings"].items() if v is not None and k != "device_map"}
    space = settings.pop("space", {})
    lines = [f"# settings of the run that made {record['base_model']} abliterated ({record.get('tool', 'abliterate')})"]
    lines += [f"{key} = {toml_value(value)}" for key, value in settings.items()]
    lines += ["", "[space]", *(f"{key} = {toml_value(value)}" for key, value in space.items())]
    return "\n".join(lines) + "\n"


def _reproduce_section(record: dict, repo_id: str, bundle: list[str]) -> str:
    files = ", ".join(f"`{name}`" for name in bundle)
    return f"""## Reproduce

`{REPRODUCE_DIR}/` holds the run's state ({files}) and its settings (`config.toml`). Downloaded, it is a run
directory: `abliterate run` re-bakes trial {record['trial']} from the base model and measures it again (add
`--trials N` to search on; a local base model path must exist on your machine):

```bash
hf download {repo_id} --include '{REPRODUCE_DIR}/*' --local-dir run
abliterate run --config run/{REPRODUCE_DIR}/config.toml -o run/{REPRODUCE_DIR} --pick trial:{record['trial']}
```
"""


def plan_upload(out_dir: str | Path, repo_id: str = "PATH_OR_REPO") -> list[Upload]:
    """Exactly what a push commits, in repository order. Reads the directory; writes nothing; no network."""
    return _plan(out_dir, repo_id)[0]


def _plan(out_dir: str | Path, repo_id: str) -> tuple[list[Upload], dict | None]:
    out, record = check_output(out_dir)
    uploads = [Upload(path, path.name) for path in _weight_files(out)]
    uploads += [Upload(out / name, name) for name in MODEL_FILES if (out / name).is_file()]
    templates = out / TEMPLATES_DIR
    if templates.is_dir():
        uploads += [Upload(path, f"{TEMPLATES_DIR}/{path.name}") for path in sorted(templates.glob("*.jinja"))]
    uploads += [Upload(path, path.name) for path in _remote_code_files(out)]
    is_run = record is not None and "metrics" in record and "settings" in record  # a finished `abliterate run`
    resumable = is_run and (out / RUN_STATE).is_file()
    bundle = [name for name in REPRODUCE_FILES if resumable and (out / name).is_file()]
    uploads.append(Upload(hub_card(out, record, repo_id, bundle).encode("utf-8"), "README.md"))
    if record is not None:
        uploads.append(Upload(out / RECORD, RECORD))
    uploads += [Upload(out / name, f"{REPRODUCE_DIR}/{name}") for name in bundle]
    if bundle:
        uploads.append(Upload(reproduce_config(record).encode("utf-8"), f"{REPRODUCE_DIR}/config.toml"))
    return uploads, record


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _resolve_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def commit_message(record: dict | None) -> str:
    base = (record or {}).get("base_model")
    return f"abliterate {__version__}: " + (f"{base}, abliterated" if base else "upload model")


def _network_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors

    # HfHubHTTPError and OfflineModeIsEnabled are OSErrors (so are requests' and socket errors); the HTTP client's
    # own errors (httpx / httpx2 HTTPError: connect, timeout) are not, huggingface_hub re-exports their base.
    http_error = getattr(errors, "HTTPError", None)
    return (OSError,) + ((http_error,) if isinstance(http_error, type) else ())


def _explain(error: BaseException, repo_id: str) -> str:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if status == 401:
        return f"the hub rejected the token ({detail}); run `hf auth login` or set HF_TOKEN to a write token"
    if status == 403:
        return f"no write access to {repo_id} ({detail}); check the namespace and the token's permissions"
    return f"upload to {repo_id} failed: {detail}"


def push(out_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None, api=None, status=None):
    """Create the repository (if needed) and commit the planned files in one commit. Returns (url, uploads).

    `token=None`: huggingface_hub resolves it (HF_TOKEN, then the cached login). `api`: an `HfApi`-like object.
    `status(line)` hears when the checks have passed and the upload starts."""
    check_repo_id(repo_id)
    uploads, record = _plan(out_dir, repo_id)
    if _offline():
        raise UserError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it (or use --dry-run to see the plan)")
    if token is None and _resolve_token() is None:
        raise UserError("no Hugging Face token: run `hf auth login` or set HF_TOKEN to a token with write access")
    from huggingface_hub import CommitOperationAdd, HfApi

    api = api if api is not None else HfApi(token=token)
    if status:
        status(f"uploading {len(uploads)} files to {repo_id} in one commit")
    operations = [CommitOperationAdd(path_in_repo=u.path_in_repo,
                                     path_or_fileobj=u.source if isinstance(u.source, bytes) else str(u.source))
                  for u in uploads]
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if private and not getattr(api.repo_info(repo_id, repo_type="model"), "private", True):
            raise UserError(f"{repo_id} already exists and is public; make it private on the hub first, or choose "
                            "another --repo (nothing was uploaded)")
        api.create_commit(repo_id, operations, commit_message=commit_message(record), repo_type="model")
    except _network_errors() as error:
        raise UserError(_explain(error, repo_id)) from None
    return str(getattr(url, "url", None) or url or f"https://huggingface.co/{repo_id}"), uploads
