"""Prompt loading from every supported source, the bundled sets and their splits, and chat formatting."""

from __future__ import annotations

import json

import pytest
from conftest import build_tiny_tokenizer

from abliterate.errors import UserError
from abliterate.core.prompts import DEFAULT_SYSTEM_PROMPT, SPLITS, format_prompts, load_prompts


def test_bundled_sets_have_disjoint_splits_and_no_overlap():
    seen = {}
    for name in ("harmful", "harmless"):
        everything = load_prompts(name)
        assert len(everything) >= 500 and len(set(everything)) == len(everything)
        parts = [load_prompts(name, split=split) for split in SPLITS]
        assert sum(map(len, parts)) == len(everything)
        for a in range(3):
            for b in range(a + 1, 3):
                assert not set(parts[a]) & set(parts[b])
        seen[name] = set(everything)
    assert not seen["harmful"] & seen["harmless"]


def test_every_prefix_of_a_bundled_split_is_a_stratified_sample():
    """Runs take the first N prompts of a split: those must represent every category in proportion. (The files were
    once sorted by category, so 32 tune prompts were 32 cybercrime requests and the search never saw the rest.)"""
    from collections import Counter

    from abliterate.core.prompts import _bundled_path

    for name in ("harmful", "harmless"):
        rows = [json.loads(line) for line in _bundled_path(name).read_text().splitlines()]
        for split in SPLITS:
            categories = [row["category"] for row in rows if row["split"] == split]
            share = {category: count / len(categories) for category, count in Counter(categories).items()}
            for n in range(1, len(categories) + 1):
                counts = Counter(categories[:n])
                worst = max(abs(counts[category] - n * share[category]) for category in share)
                assert worst <= 1.0, (name, split, n, counts)


def test_file_formats(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\n  second  \n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["first", "second"]
    (tmp_path / "p.jsonl").write_text('{"q": "a", "x": 1}\n{"q": "b", "x": 2}\n')
    assert load_prompts(str(tmp_path / "p.jsonl"), column="q") == ["a", "b"]
    (tmp_path / "p.csv").write_text('id,prompt\n1,"hello, world"\n2,bye\n')
    assert load_prompts(str(tmp_path / "p.csv")) == ["hello, world", "bye"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x", "y"], "n": [1, 2]}), tmp_path / "p.parquet")
    assert load_prompts(str(tmp_path / "p.parquet")) == ["x", "y"]


def test_files_without_a_split_column_are_split_40_30_30_in_order(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(f"prompt {i}" for i in range(10)))
    parts = {split: load_prompts(str(tmp_path / "p.txt"), split=split) for split in SPLITS}
    assert parts == {"train": [f"prompt {i}" for i in range(4)], "tune": [f"prompt {i}" for i in range(4, 7)],
                     "eval": [f"prompt {i}" for i in range(7, 10)]}
    (tmp_path / "s.jsonl").write_text('{"prompt": "a", "split": "eval"}\n{"prompt": "b", "split": "train"}\n')
    assert load_prompts(str(tmp_path / "s.jsonl"), split="eval") == ["a"]


def test_local_dataset_directory_through_datasets(tmp_path):
    data = tmp_path / "my-dataset"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps({"instruction": f"task {i}"}) for i in range(3)))
    assert load_prompts(str(data), column="instruction", split="train") == ["task 0", "task 1", "task 2"]


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"\n  \n", "empty"),
    (b"caf\xe9\n", "not UTF-8"),
])
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_prompts(str(path))


def test_missing_things():
    with pytest.raises(UserError, match="not found"):
        load_prompts("./nope.txt")
    with pytest.raises(UserError, match="unknown split"):
        load_prompts("harmful", split="validation")
    with pytest.raises(UserError, match="could not load dataset"):
        load_prompts("nobody/no-such-dataset")


def test_missing_column(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"a": "x", "b": "y"}\n')
    with pytest.raises(UserError, match="no column 'prompt'"):
        load_prompts(str(tmp_path / "p.jsonl"), column="prompt")
    with pytest.raises(UserError, match="--column"):
        load_prompts(str(tmp_path / "p.jsonl"))


def test_chat_template_with_system_prompt():
    tokenizer = build_tiny_tokenizer()
    assert format_prompts(tokenizer, ["hi"], "Be brief.") == ["<|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>"]
    assert format_prompts(tokenizer, ["hi"], "") == ["<|user|>hi<|end|><|assistant|>"]


def test_template_that_rejects_system_prompt_gets_none():
    rejecting = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>")
    tokenizer = build_tiny_tokenizer(rejecting)
    assert format_prompts(tokenizer, ["hi"], "Be brief.") == ["<user>hi<assistant>"]


def test_plain_format_without_template():
    tokenizer = build_tiny_tokenizer(None)
    assert format_prompts(tokenizer, ["hi"], "Be brief.") == ["System: Be brief.\nUser: hi\nAssistant:"]
    assert format_prompts(tokenizer, ["hi"], "") == ["User: hi\nAssistant:"]
    # None is the default system prompt everywhere (a run's trials once saw none while its directions saw it)
    assert format_prompts(tokenizer, ["hi"], None) == format_prompts(tokenizer, ["hi"]) == [
        f"System: {DEFAULT_SYSTEM_PROMPT}\nUser: hi\nAssistant:"]


def test_thinking_models_get_a_closed_empty_thought():
    qwen3_like = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
                  "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}")
    assert format_prompts(build_tiny_tokenizer(qwen3_like), ["hi"], "") == ["<user>hi<assistant><think>\n\n</think>\n\n"]
    r1_like = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant><think>\n"
    assert format_prompts(build_tiny_tokenizer(r1_like), ["hi"], "") == ["<user>hi<assistant><think>\n\n</think>\n\n"]
