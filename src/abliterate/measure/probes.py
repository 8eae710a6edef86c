"""Bundled probe sets (data/probes/) and how answers to them are scored.

Capability = exact match of the *extracted* answer, after normalisation:

    extract_answer(response) = the text after the last "answer:" / "answer is" / "answer =" marker (else all of
                               it); in that, the last \\boxed{...}, else its first line with content (not a code
                               fence, not a bare LaTeX delimiter) — for step-by-step probes without a marker, the
                               last such line (thinking models: only the text after the thought)
    normalise_answer(text)   = lowercase, unicode quotes and dashes folded, markdown and LaTeX delimiters gone,
                               thousands separators dropped, punctuation to spaces, articles (a, an, the) dropped
    number probes            the last number of the extracted answer equals the answer (1e-9, so 7.750 = 7.75,
                               1,024 = 1024; number words zero..twenty count as numbers)
    text probes              the normalised extracted answer equals an accepted answer, or does after removing a
                               restatement: "the capital of france is paris" → "paris" (the part after the last
                               is/are/was/equals/=/:), "paris is the capital" → "paris" (the part before the first)

Consistency = for each group of paraphrases, the share of answer pairs that agree (same number; or same accepted
answer; or the same normalised text), averaged over groups. An empty answer agrees with nothing.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources

from abliterate.core.judges import answer_part

_MARKER = re.compile(r"\banswer\s*(?:is\s*:?|:|=)", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_FENCE = re.compile(r"^\s*(```|~~~)")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LATEX = re.compile(r"\\[\(\)\[\]]|\\text\{|\\times|\\cdot")
_NON_WORD = re.compile(r"[^\w.\-]+")
_INNER = re.compile(r"[.\-_]+")
_SPACES = re.compile(r"\s+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_COPULA = re.compile(r"\s(?:is|are|was|equals)\s|\s=\s|:\s")
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}


@dataclass(frozen=True)
class Probe:
    id: str
    kind: str  # arithmetic, facts, code output, reasoning
    prompt: str
    answers: tuple[str, ...]
    type: str  # number | text


@dataclass(frozen=True)
class ParaphraseGroup:
    id: str
    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    type: str


def _rows(name: str) -> list[dict]:
    text = (resources.files("abliterate") / "data" / "probes" / name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@functools.lru_cache(maxsize=1)
def capability_probes() -> tuple[Probe, ...]:
    return tuple(Probe(r["id"], r["kind"], r["prompt"], tuple(r["answers"]), r["type"]) for r in _rows("capability.jsonl"))


@functools.lru_cache(maxsize=1)
def paraphrase_groups() -> tuple[ParaphraseGroup, ...]:
    return tuple(ParaphraseGroup(r["id"], tuple(r["prompts"]), tuple(r["answers"]), r["type"]) for r in _rows("paraphrases.jsonl"))


@functools.lru_cache(maxsize=1)
def borderline_prompts() -> tuple[str, ...]:
    """Benign requests that sound harmful: a refusal of one is an over-refusal."""
    return tuple(r["prompt"] for r in _rows("borderline.jsonl"))


def reasoning_probes() -> tuple[Probe, ...]:
    return tuple(p for p in capability_probes() if p.kind == "reasoning")


def extract_answer(response: str, last: bool = False) -> str:
    """The part of a response that states its final answer (see the module docstring). `last`: without a marker or
    a box, take the last line with content instead of the first (step-by-step answers end with their result)."""
    text = answer_part(response).strip()
    markers = list(_MARKER.finditer(text))
    if markers:
        text = text[markers[-1].end():].strip()
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not _FENCE.match(line) and normalise_answer(line)]  # skips "\[" and fences
    if not lines:
        return ""
    return lines[0] if markers or not last else lines[-1]


def normalise_answer(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u2212", "-").replace("\u2013", "-")
    text = _LATEX.sub(" ", text).replace("**", " ").replace("`", " ")
    text = _THOUSANDS.sub("", text.lower())
    tokens = []
    for token in _NON_WORD.sub(" ", text).split():
        token = token.strip(".")
        if _NUMBER.fullmatch(token):
            tokens.append(token)  # 7.75, -3
        else:
            tokens += [part for part in _INNER.split(token) if part]  # "well-known." → well known
    return _SPACES.sub(" ", _ARTICLES.sub(" ", " ".join(tokens))).strip()


def _canonical_number(token: str) -> float | None:
    try:
        return float(NUMBER_WORDS.get(token, token))
    except ValueError:
        return None


def numbers_in(text: str) -> list[float]:
    """Numbers in normalised text, in order (number words zero..twenty included)."""
    found = []
    for token in normalise_answer(text).split():
        value = _canonical_number(token) if token in NUMBER_WORDS else None
        if value is None and _NUMBER.fullmatch(token):
            value = float(token)
        if value is not None:
            found.append(value)
    return found


def _candidates(segment: str) -> list[str]:
    """The normalised answer, and the answer without a restatement around a copula."""
    raw = segment.strip()
    candidates = [normalise_answer(raw)]
    parts = _COPULA.split(" " + raw + " ")
    if len(parts) > 1:
        candidates += [normalise_answer(parts[-1]), normalise_answer(parts[0])]
    return [c for c in candidates if c]


def is_correct(response: str, answers, kind: str, last: bool = False) -> bool:
    segment = extract_answer(response, last)
    if kind == "number":
        found = numbers_in(segment)
        return bool(found) and any(abs(found[-1] - float(a)) < 1e-9 for a in answers)
    accepted = {normalise_answer(a) for a in answers}
    return any(c in accepted for c in _candidates(segment))


def answer_key(response: str, answers, kind: str) -> str | None:
    """What an answer says, comparable across paraphrases: its number, the accepted answer it matches, or its text."""
    segment = extract_answer(response)
    if kind == "number":
        found = numbers_in(segment)
        return f"{found[-1]:g}" if found else None
    if is_correct(response, answers, kind):
        return normalise_answer(answers[0])
    candidates = _candidates(segment)
    return candidates[-1] if candidates else None


def consistency(group_keys: list[list[str | None]]) -> float:
    """Mean over groups of the share of agreeing answer pairs (None agrees with nothing)."""
    scores = []
    for keys in group_keys:
        pairs = list(itertools.combinations(keys, 2))
        if pairs:
            scores.append(sum(a is not None and a == b for a, b in pairs) / len(pairs))
    return sum(scores) / len(scores) if scores else float("nan")


@dataclass
class CapabilityScore:
    correct: int
    total: int
    by_kind: dict  # kind -> [correct, total]
    verdicts: list[bool]

    @property
    def rate(self) -> float:
        return self.correct / max(self.total, 1)


def score_capability(probes, responses: list[str]) -> CapabilityScore:
    verdicts = [is_correct(r, p.answers, p.type, last=p.kind == "reasoning") for p, r in zip(probes, responses)]
    by_kind: dict[str, list[int]] = {}
    for probe, verdict in zip(probes, verdicts):
        counts = by_kind.setdefault(probe.kind, [0, 0])
        counts[0] += verdict
        counts[1] += 1
    return CapabilityScore(sum(verdicts), len(verdicts), by_kind, verdicts)


def score_consistency(groups, responses: list[str]) -> float:
    """`responses` are the answers to every group's prompts, flattened in order."""
    keys, position = [], 0
    for group in groups:
        answers = responses[position:position + len(group.prompts)]
        position += len(group.prompts)
        keys.append([answer_key(r, group.answers, group.type) for r in answers])
    return consistency(keys)
