"""Prompt sets: loading them from files, datasets or the bundled sets, and formatting them for a model.

Formatting, in order of preference:
  * the tokenizer's chat template, with a system prompt (dropped for templates that reject one);
    thinking models get an empty, closed thought block so we measure the answer, not the thought:
    templates that take `enable_thinking` (Qwen3) are rendered with it False; templates whose generation
    prompt opens a thought (DeepSeek-R1 distills) get it closed ("<think>\\n" → "<think>\\n\\n</think>\\n\\n");
  * without a template, the plain format `PLAIN_FORMAT` ("System: ...\\n" line only with a system prompt).
"""

from __future__ import annotations

import csv
import hashlib
import json
from importlib import resources
from pathlib import Path

from abliterate.errors import UserError

BUNDLED_SETS = ("harmful", "harmless")
SPLITS = ("train", "tune", "eval")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
PLAIN_FORMAT = "{system}User: {prompt}\nAssistant:"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def _bundled_path(name: str) -> Path:
    return Path(str(resources.files("abliterate") / "data" / "prompts" / f"{name}.jsonl"))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte {error.start}); re-save it as UTF-8") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory; give a prompt file (.txt, .jsonl, .csv, .parquet)") from None


def _records_jsonl(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number} is not valid JSON ({error.msg}); one JSON object per line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number} is not a JSON object; one object per line, e.g. {{\"prompt\": ...}}")
        records.append(record)
    return records


def _records_csv(path: Path) -> list[dict]:
    import io

    return list(csv.DictReader(io.StringIO(_read_text(path))))


def _records_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path} is not a readable parquet file ({error})") from None


def _pick_column(keys: list[str], column: str | None, source: str) -> str:
    if column is None:
        for guess in ("prompt", "text", "instruction", "goal", "question"):
            if guess in keys:
                return guess
        if len(keys) == 1:
            return keys[0]
        raise UserError(f"{source} has columns {keys}; say which holds the prompts with --column")
    if column not in keys:
        raise UserError(f"{source} has no column '{column}'; its columns are {keys}")
    return column


def _column(records: list[dict], column: str | None, source: str) -> list:
    if not records:
        return []
    name = _pick_column(list(records[0].keys()), column, source)
    return [record.get(name) for record in records]


def _from_dataset(dataset_id: str, column: str | None, split: str | None) -> list:
    import datasets

    try:
        data = datasets.load_dataset(dataset_id, split=split or "train")
    except Exception as error:  # datasets raises many types: offline, missing split, missing repo
        raise UserError(
            f"could not load dataset '{dataset_id}' (split {split or 'train'}): {str(error).splitlines()[0]}; "
            "check the id and split, and that the Hugging Face hub is reachable (or give a local file)"
        ) from None
    return list(data[_pick_column(list(data.column_names), column, dataset_id)])


def _split_records(records: list[dict], split: str | None, source: str) -> list[dict]:
    """A file with a `split` column is filtered by it; a file without one is split in order."""
    if split is None:
        return records
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; files have the splits {', '.join(SPLITS)}")
    if records and "split" in records[0]:
        return [r for r in records if r.get("split") == split]
    return carve(records, split)


def carve(items: list, split: str) -> list:
    """The fixed split of a set without one: first 40% train, next 30% tune, last 30% eval (disjoint)."""
    n = len(items)
    bounds = {"train": (0, n * 4 // 10), "tune": (n * 4 // 10, n * 7 // 10), "eval": (n * 7 // 10, n)}
    low, high = bounds[split]
    return items[low:high]


def _file_records(path: Path, source: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _records_jsonl(path)
    if suffix == ".csv":
        return _records_csv(path)
    if suffix == ".parquet":
        return _records_parquet(path)
    return [{"prompt": line} for line in _read_text(path).splitlines() if line.strip()]


def load_prompts(source: str, column: str | None = None, split: str | None = None) -> list[str]:
    """Prompts from a bundled set ("harmful", "harmless"), a .txt/.jsonl/.csv/.parquet file, or a dataset.

    `split` (train/tune/eval) selects rows by a file's `split` column (the bundled sets have one), else the
    fixed 40/30/30 split in file order (`carve`); for a dataset id it names the dataset's split (default
    train). None: every prompt.
    """
    path = Path(source)
    if source in BUNDLED_SETS:
        prompts = _column(_split_records(_records_jsonl(_bundled_path(source)), split, source), "prompt", source)
    elif path.is_dir():
        prompts = _from_dataset(str(path), column, split)  # a local dataset repository, read by `datasets`
    elif path.exists():
        records = _file_records(path, source)
        prompts = _column(_split_records(records, split, source), column, source) if records else []
    elif "/" in source and not source.startswith((".", "/")) and source.count("/") == 1:
        prompts = _from_dataset(source, column, split)
    else:
        raise UserError(f"prompt file not found: {source}; give a path, a dataset id (owner/name), "
                        f"or a bundled set ({', '.join(BUNDLED_SETS)})")
    prompts = [str(p).strip() for p in prompts if p is not None and str(p).strip()]
    if not prompts:
        raise UserError(f"no prompts in {source}" + (f" (split {split})" if split else "") + "; it is empty")
    return prompts


def prompt_set_hash(prompts: list[str]) -> str:
    """sha256 of the prompts in order, so a saved result names exactly what it was measured on."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def _template_renders(tokenizer, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def format_prompts(tokenizer, prompts: list[str], system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[str]:
    """Render each prompt as the model sees it just before it answers. `system_prompt`: None is the default
    system prompt, '' none at all (directions, search trials and evals must all see the same one)."""
    if system_prompt is None:
        system_prompt = DEFAULT_SYSTEM_PROMPT
    if getattr(tokenizer, "chat_template", None) is None:
        system = f"System: {system_prompt}\n" if system_prompt else ""
        return [PLAIN_FORMAT.format(system=system, prompt=p) for p in prompts]
    template_text = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    kwargs = {"enable_thinking": False} if "enable_thinking" in template_text else {}

    def messages(prompt: str, with_system: bool) -> list[dict]:
        head = [{"role": "system", "content": system_prompt}] if with_system and system_prompt else []
        return head + [{"role": "user", "content": prompt}]

    use_system = bool(system_prompt)
    if use_system:
        try:
            _template_renders(tokenizer, messages("x", True), **kwargs)
        except Exception:  # templates that reject a system role raise jinja's TemplateError
            use_system = False
    formatted = []
    for prompt in prompts:
        text = _template_renders(tokenizer, messages(prompt, use_system), **kwargs)
        if text.rstrip().endswith(THINK_OPEN):
            text = text.rstrip() + "\n\n" + THINK_CLOSE + "\n\n"
        formatted.append(text)
    return formatted


def format_conversation(tokenizer, messages: list[dict], **template_kwargs) -> str:
    """Render a whole conversation (system?, user, assistant, ..., user) ready for the next answer. Templates that
    reject a system role get the system prompt at the head of the first user turn; no template: the plain format."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if getattr(tokenizer, "chat_template", None) is None:
        lines = [f"System: {system[0]}"] if system and system[0] else []
        lines += [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in turns]
        return "\n".join(lines) + "\nAssistant:"
    try:
        return _template_renders(tokenizer, messages, **template_kwargs)
    except Exception:  # jinja's TemplateError: this template has no system role
        if not system or not turns:
            raise
        merged = [{"role": turns[0]["role"], "content": f"{system[0]}\n\n{turns[0]['content']}"}] + turns[1:]
        return _template_renders(tokenizer, merged, **template_kwargs)
