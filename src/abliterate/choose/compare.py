"""`abliterate compare`: several models measured the same way against one base, an offline HTML report, and a
blind sample sheet for a human reader.

Models (`ModelSpec`): anything `load_model` takes (a saved directory, `tiny`, a hub id, a `.gguf`), or a base model
with an ablation applied in memory: `BASE::DIRECTIONS::PARAMS`, where PARAMS is a JSON file (a parameter set or a
run's `abliteration.json`) or `layer=L[,weight=W]`. Any spec may start with `NAME=` to name its row.

The base (`--base`, else the one base every saved model's `abliteration.json` or variant names, else the first
model) is always a row. Every model answers the same raw prompts, formatted with its own chat template and the
same system prompt, decoded greedily with the same token budgets and batch size:

    refusals          judge verdicts on the held-out harmful prompts (bundled `eval` split)
    over-refusals     judge verdicts on benign requests that sound harmful (data/probes/borderline.jsonl)
    KL, multi-token KL  against the base on the benign `eval` prompts (evaluate.Baseline: one baseline for all)
    capability        exact match on the probe set (probes.py: arithmetic, facts, code output, reasoning)
    consistency       agreement of the answers to paraphrases of one question (probes.py)
    tokens/s          generation throughput over all its answers (tokens computed / seconds), the same batches for all
    peak memory       weights + the largest extra memory while the model was measured (CUDA: allocator peak;
                      CPU: resident set, sampled every 10 ms, above its level when measuring started)

Blind sheet: for each sheet prompt, every model's answer under a letter, the letters shuffled per prompt
(`random.Random(seed)`); the letter → model key goes to a separate `key.json`. `reveal` joins a reader's ratings
with the key.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import random
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from abliterate.core.settings import CompareSettings
from abliterate.errors import UserError

VARIANT_SEPARATOR = "::"
SHEET_FILE, KEY_FILE, RATINGS_FILE, REPORT_FILE, RESULTS_FILE = "sheet.md", "key.json", "ratings.csv", "report.html", "results.json"
_LABEL = re.compile(r"^([A-Za-z0-9_.+-]+)=(?!=)(.+)$")

TITLE_SCATTER = "Refusals vs KL"
TITLE_BARS = "Per-model metrics"
TITLE_STRENGTH = "Base model: refusal-direction strength per layer"
TITLE_WEIGHTS = "Layer weights per model"


# --- which models ---------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    label: str
    reference: str  # what is loaded: the model, or the base of a variant
    directions: str | None = None  # a variant: this directions file ...
    params: object = None  # ... and these AblationParams, applied in memory
    record: dict | None = None  # a saved model's abliteration.json
    text: str = ""  # the spec as given

    @property
    def is_variant(self) -> bool:
        return self.directions is not None

    def ablation_params(self):
        """The parameters behind this model, if known (a variant's, or a saved model's record)."""
        if self.params is not None:
            return self.params
        if self.record and "parameters" in self.record:
            from abliterate.measure.ablation import AblationParams

            try:
                return AblationParams.from_dict(self.record["parameters"])
            except UserError:
                return None
        return None


def _short_name(reference: str) -> str:
    name = Path(reference.rstrip("/")).name or reference
    return name.removesuffix(".gguf") or reference


def _params_from(text: str, spec: str):
    from abliterate.measure.ablation import AblationParams

    if "=" in text and not Path(text).exists():
        values = {}
        for part in text.split(","):
            key, _, value = part.partition("=")
            try:
                values[key.strip()] = float(value)
            except ValueError:
                raise UserError(f"model spec '{spec}': '{part}' is not key=number; use layer=L[,weight=W] or a JSON file") from None
        unknown = set(values) - {"layer", "weight"}
        if unknown or "layer" not in values:
            raise UserError(f"model spec '{spec}': inline parameters are layer=L[,weight=W] (got {text})")
        layer, weight = values["layer"], values.get("weight", 1.0)
        return AblationParams.single_direction(layer, weight), f"L{layer:g}w{weight:g}"
    path = Path(text)
    description = path.parent.name if path.stem == "abliteration" and path.parent.name else path.stem
    return AblationParams.from_file(path), description


def parse_spec(text: str) -> ModelSpec:
    """`[NAME=]MODEL` or `[NAME=]BASE::DIRECTIONS::PARAMS` (see the module docstring)."""
    label = None
    match = _LABEL.match(text)
    if match and not Path(text).exists() and VARIANT_SEPARATOR not in match.group(1):
        label, body = match.group(1), match.group(2)
    else:
        body = text
    if VARIANT_SEPARATOR in body:
        parts = body.split(VARIANT_SEPARATOR)
        if len(parts) != 3 or not all(p.strip() for p in parts):
            raise UserError(f"model spec '{text}': an in-memory variant is BASE::DIRECTIONS::PARAMS "
                            "(PARAMS: a JSON file or layer=L[,weight=W])")
        base, directions, params_text = (p.strip() for p in parts)
        if not Path(directions).is_file():
            raise UserError(f"model spec '{text}': directions file not found: {directions}")
        params, description = _params_from(params_text, text)
        return ModelSpec(label or f"{_short_name(base)}+{description}", base, directions, params, None, text)
    record = None
    record_path = Path(body) / "abliteration.json"
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except json.JSONDecodeError:
            record = None
    return ModelSpec(label or _short_name(body), body, record=record, text=text)


def same_reference(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def choose_base(specs: list[ModelSpec], base: str | None) -> str:
    """--base, else the single base the models name (variants' BASE, saved models' base_model), else the first."""
    if base:
        return base
    named = []
    for spec in specs:
        if spec.is_variant:
            named.append(spec.reference)
        elif spec.record and spec.record.get("base_model"):
            named.append(spec.record["base_model"])
    distinct = []
    for name in named:
        if not any(same_reference(name, seen) for seen in distinct):
            distinct.append(name)
    if len(distinct) > 1:
        raise UserError(f"the models come from different bases ({', '.join(distinct)}); say which is the base with --base")
    return distinct[0] if distinct else specs[0].reference


def plan_models(texts: list[str], base: str | None) -> tuple[list[ModelSpec], int]:
    """The rows to measure (specs, with the base added if it is not one of them) and the base row's index."""
    def too_few() -> UserError:
        return UserError(f"compare needs at least two models (got {len(texts)}); e.g. abliterate compare tiny run1, "
                         "tiny tiny::dirs.safetensors::layer=15, or one saved run (its base comes from its record)")

    if not texts:
        raise too_few()
    specs = [parse_spec(t) for t in texts]
    base_reference = choose_base(specs, base)
    base_index = next((i for i, s in enumerate(specs) if not s.is_variant and same_reference(s.reference, base_reference)), None)
    if base_index is None:  # one model alone is enough when it names its base (a run's record, a variant, --base)
        specs.insert(0, ModelSpec(_short_name(base_reference), base_reference, text=base_reference))
        base_index = 0
    if len(specs) < 2:
        raise too_few()
    seen: dict[str, int] = {}
    for spec in specs:
        count = seen.get(spec.label, 0) + 1
        seen[spec.label] = count
        if count > 1:
            spec.label = f"{spec.label}-{count}"
    return specs, base_index


# --- measuring ------------------------------------------------------------------------------------


@dataclass
class PromptSets:
    harmful: list[str]
    borderline: list[str]
    benign: list[str]  # for KL
    probes: list  # probes.Probe
    groups: list  # probes.ParaphraseGroup

    @property
    def paraphrases(self) -> list[str]:
        return [p for group in self.groups for p in group.prompts]


def select_probes(probes, n: int) -> list:
    """n probes taken round-robin over their kinds (file order within a kind), so every kind is represented."""
    by_kind: dict[str, list] = {}
    for probe in probes:
        by_kind.setdefault(probe.kind, []).append(probe)
    chosen, depth = [], 0
    while len(chosen) < n and any(depth < len(v) for v in by_kind.values()):
        for items in by_kind.values():
            if depth < len(items) and len(chosen) < n:
                chosen.append(items[depth])
        depth += 1
    order = {id(p): i for i, p in enumerate(probes)}
    return sorted(chosen, key=lambda p: order[id(p)])


def read_prompt_sets(settings: CompareSettings) -> PromptSets:
    from abliterate.measure import probes
    from abliterate.core.prompts import load_prompts

    return PromptSets(load_prompts("harmful", split="eval")[: settings.limit], list(probes.borderline_prompts())[: settings.limit],
                      load_prompts("harmless", split="eval")[: settings.limit],
                      select_probes(probes.capability_probes(), settings.probes),
                      list(probes.paraphrase_groups())[: settings.paraphrase_groups])


class MemoryMeter:
    """Peak memory while measuring: CUDA allocator peak, or the process's resident set sampled every 10 ms."""

    def __init__(self, model):
        self.model = model
        self.cuda = any(p.device.type == "cuda" for p in model.parameters())
        self.peak_extra = 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            for device in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(device)
        else:
            self._start = self._peak = _rss()

            def sample():
                while not self._stop.wait(0.01):
                    self._peak = max(self._peak, _rss())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_total = sum(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count()))
        else:
            self._stop.set()
            self._thread.join()
            self.peak_extra = max(0, self._peak - self._start)
            self.peak_total = weights_bytes(self.model) + self.peak_extra


def _rss() -> int:
    """This process's resident set in bytes (psutil comes with accelerate; /proc where it is missing)."""
    try:
        import psutil  # noqa: F401 - is it there?
    except ImportError:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            return 0
        import os

        return pages * os.sysconf("SC_PAGE_SIZE")
    return _process().memory_info().rss


@functools.lru_cache(maxsize=1)
def _process():
    import psutil

    return psutil.Process()


def weights_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@dataclass
class ModelResult:
    label: str
    spec: str
    is_base: bool
    refusals: int
    total: int
    over_refusals: int
    over_total: int
    kl: float | None
    kl_multi_token: float | None
    capability: int
    capability_total: int
    capability_by_kind: dict
    consistency: float | None  # None without paraphrase groups
    tokens_per_second: float
    peak_memory_bytes: int
    degenerate: int = 0
    layer_weights: dict | None = None  # component -> weight per layer
    lm_eval: dict | None = None  # task -> metric -> value
    answers: dict = field(default_factory=dict)  # harmful, borderline, probes, paraphrases

    def to_dict(self, answers: bool = True) -> dict:
        data = asdict(self)
        if not answers:
            data.pop("answers")
        return data


def measure_model(bench, spec: ModelSpec, is_base: bool, prompts: PromptSets, settings: CompareSettings) -> ModelResult:
    """Every column for one model, with its ablation (if a variant) applied in memory for the duration."""
    from abliterate.measure import probes as probe_scoring
    from abliterate.measure.evaluate import measure_refusals

    params = spec.ablation_params()
    timing = {"seconds": 0.0, "tokens": 0}

    def timed(function, *args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        timing["seconds"] += time.perf_counter() - start
        timing["tokens"] += result.tokens_generated
        return result

    def refusals(items):  # every answer read to its end: the report shows them
        return timed(measure_refusals, bench.engine, bench.format(items), bench.judge, settings.max_new_tokens,
                     bench.batch_size, early_stop=False)

    ablation = params if spec.is_variant else None  # a saved model's recorded params are for the plot only
    with bench.applied(ablation, _variant_directions(bench, spec)), MemoryMeter(bench.model) as meter:
        harmful, borderline = refusals(prompts.harmful), refusals(prompts.borderline)
        baseline = bench.baseline("eval")
        kl, kl_multi = baseline.kl(bench.engine, bench.batch_size), baseline.kl_multi_token(bench.engine, bench.batch_size)
        probe_generation = timed(bench.generate, [p.prompt for p in prompts.probes], settings.probe_tokens)
        paraphrase_answers = timed(bench.generate, prompts.paraphrases, settings.probe_tokens).texts
    capability = probe_scoring.score_capability(prompts.probes, probe_generation.texts)
    consistency = probe_scoring.score_consistency(prompts.groups, paraphrase_answers) if prompts.groups else None
    layer_weights = None
    if params is not None:
        from abliterate.choose.report import kernel_curves

        layer_weights = kernel_curves(params, bench.loaded.adapter.n_layers)
    return ModelResult(
        spec.label, spec.text, is_base, harmful.refusals, harmful.total, borderline.refusals, borderline.total,
        kl, kl_multi,
        capability.correct, capability.total, capability.by_kind, consistency,
        timing["tokens"] / max(timing["seconds"], 1e-9), int(meter.peak_total), harmful.degenerate, layer_weights,
        answers={"harmful": harmful.responses, "borderline": borderline.responses, "probes": probe_generation.texts,
                 "paraphrases": paraphrase_answers})


def _variant_directions(bench, spec: ModelSpec):
    """A variant's directions, fitted to the bench's model (None for a plain model)."""
    from abliterate.measure.directions import Directions

    return Directions.load(spec.directions).fitted_to(bench.loaded.adapter) if spec.is_variant else None


def _tokenizer_of(reference: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    from abliterate.core.load import hub_error, resolve

    source = resolve(reference)
    try:
        return AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        if not source.is_local:
            raise hub_error(source, error) from None
        raise UserError(f"could not load the tokenizer of {reference} ({str(error).splitlines()[0]})") from None


def check_vocabularies(specs: list[ModelSpec], base_reference: str, trust_remote_code: bool) -> None:
    """KL compares token distributions: every model must share the base's vocabulary (checked before loading weights)."""
    base_vocab = _tokenizer_of(base_reference, trust_remote_code).get_vocab()
    checked = {base_reference}
    for spec in specs:
        if spec.reference in checked:
            continue
        vocab = _tokenizer_of(spec.reference, trust_remote_code).get_vocab()
        if vocab != base_vocab:
            raise UserError(f"{spec.label} and the base {base_reference} have different tokenizers ({len(vocab)} vs "
                            f"{len(base_vocab)} tokens); KL needs models with the base's vocabulary (e.g. models made from it)")
        checked.add(spec.reference)


@dataclass
class Comparison:
    results: list[ModelResult]
    base_label: str
    base_reference: str
    settings: dict
    strength: dict | None = None  # {"strength": [...], "relative": [...], "source": str}
    lm_eval_note: str | None = None
    created: str = ""

    def to_dict(self, answers: bool = True) -> dict:
        return {"base": self.base_label, "base_model": self.base_reference, "created": self.created,
                "settings": self.settings, "strength": self.strength, "lm_eval_note": self.lm_eval_note,
                "models": [r.to_dict(answers) for r in self.results]}


def _directions_for_plot(specs, settings: CompareSettings, base_loaded, status):
    """The base's per-layer strength: --directions, a variant's directions, a run directory's, or measured now."""
    from abliterate.measure.directions import Directions, measure_directions

    candidates = []
    if settings.directions:
        candidates.append(settings.directions)
    candidates += [s.directions for s in specs if s.is_variant]
    candidates += [str(Path(s.reference) / "directions.safetensors") for s in specs
                   if not s.is_variant and (Path(s.reference) / "directions.safetensors").is_file()]
    for index, path in enumerate(candidates):
        directions = Directions.load(path)
        if directions.harmful_mean is None:
            continue
        try:
            return directions.fitted_to(base_loaded.adapter), path
        except UserError:
            if index == 0 and settings.directions:
                raise
    if settings.direction_prompts <= 0:
        return None, None
    from abliterate.core.prompts import load_prompts

    n = settings.direction_prompts
    status(f"measuring the base's refusal directions on {n} + {n} train prompts (for the strength plot)")
    harmful, harmless = load_prompts("harmful", split="train")[:n], load_prompts("harmless", split="train")[:n]
    directions = measure_directions(base_loaded, harmful, harmless, system_prompt=settings.system_prompt,
                                    batch_size=settings.batch_size)
    return directions, f"measured on {n} + {n} bundled train prompts"


def lm_eval_missing() -> str | None:
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        return "lm-eval skipped: lm-evaluation-harness is not installed (pip install lm-eval)"
    return None


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int) -> dict:
    """task → metric → value, through lm-evaluation-harness on the model object as it is (hooks included)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    output = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                                     tasks=tasks, limit=limit)
    scores = {}
    for task, metrics in (output or {}).get("results", {}).items():
        scores[task] = {name: float(value) for name, value in metrics.items()
                        if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name}
    return scores


def lm_eval_deltas(results: list[ModelResult], base_label: str) -> dict[str, dict[str, dict[str, float]]]:
    """label → task → metric → (model − base), for every metric both have."""
    base = next((r.lm_eval for r in results if r.label == base_label), None) or {}
    deltas = {}
    for result in results:
        if result.lm_eval is None:
            continue
        deltas[result.label] = {task: {m: v - base[task][m] for m, v in metrics.items() if m in base.get(task, {})}
                                for task, metrics in result.lm_eval.items()}
    return deltas


def compare(texts: list[str], base: str | None, settings: CompareSettings, status=lambda message: None) -> Comparison:
    """Measure every model (see the module docstring). Models are loaded one at a time, the base first; variants of
    an already loaded model reuse it (their ablation is hooks, removed after measuring)."""
    from abliterate.core.judges import get_judge, judge_refusals

    specs, base_index = plan_models(texts, base)
    base_spec = specs[base_index]
    judge = get_judge(settings.judge)
    judge_refusals(judge, ["warm-up"])  # the judge's lazy set-up (encoder, classifier) is no model's memory or time
    prompts = read_prompt_sets(settings)
    lm_note = lm_eval_missing() if settings.lm_eval_tasks else None
    check_vocabularies(specs, base_spec.reference, settings.trust_remote_code)
    groups = _by_model(specs, base_index)
    results: list[ModelResult | None] = [None] * len(specs)
    base_bench = strength = None
    for reference, members in groups.items():
        bench = _open(reference, prompts, judge, settings, status)
        if base_bench is None:  # the base comes first
            status(f"measuring the base's benign answers ({len(prompts.benign)} prompts, {settings.kl_tokens} tokens)")
            base_bench = bench
            bench.baseline("eval")
            strength = _strength(specs, settings, bench, status)
        else:
            bench.against(base_bench)
        for index in members:
            status(f"measuring {specs[index].label}: {len(prompts.harmful)} harmful, {len(prompts.borderline)} borderline, "
                   f"{len(prompts.probes)} probe and {len(prompts.paraphrases)} paraphrase prompts")
            results[index] = measure_model(bench, specs[index], index == base_index, prompts, settings)
            if settings.lm_eval_tasks and lm_note is None:
                lm_note = _lm_eval_into(results[index], bench, specs[index], settings, status)
        bench.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if lm_note:
        for result in results:
            result.lm_eval = None
    data = settings.model_dump(exclude={"model", "revision", "max_batch_size"})
    data["prompt_counts"] = {"harmful": len(prompts.harmful), "borderline": len(prompts.borderline), "benign": len(prompts.benign),
                             "probes": len(prompts.probes), "paraphrase_groups": len(prompts.groups)}
    return Comparison(results, base_spec.label, base_spec.reference, data, strength, lm_note,
                      time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _by_model(specs: list[ModelSpec], base_index: int) -> dict[str, list[int]]:
    """Spec indices grouped by the model they load, the base's model first."""
    groups: dict[str, list[int]] = {}
    for index, spec in enumerate(specs):
        key = next((k for k in groups if same_reference(k, spec.reference)), spec.reference)
        groups.setdefault(key, []).append(index)
    base_group = next(k for k, members in groups.items() if base_index in members)
    return {base_group: groups[base_group]} | {k: v for k, v in groups.items() if k != base_group}


def _open(reference: str, prompts: PromptSets, judge, settings: CompareSettings, status):
    from abliterate.measure.workbench import PromptSplits, Workbench

    status(f"loading {reference}")
    return Workbench.open(reference, PromptSplits(eval=(prompts.harmful, prompts.benign)), judge, settings.dtype,
                          settings.device_map, trust_remote_code=settings.trust_remote_code, engine=settings.engine,
                          **settings.loading(), tensor_parallel=settings.tensor_parallel,
                          batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
                          kl_tokens=settings.kl_tokens, system_prompt=settings.system_prompt)


def _strength(specs: list[ModelSpec], settings: CompareSettings, bench, status) -> dict | None:
    """The base's refusal-direction strength per layer, absolute and relative to the harmless mean's norm."""
    directions, source = _directions_for_plot(specs, settings, bench.loaded, status)
    if directions is None:
        return None
    values = directions.strength()
    relative = (values / directions.harmless_mean.norm(dim=-1).float().clamp_min(1e-12)).tolist()
    return {"strength": values.tolist(), "relative": relative, "source": source}


def _lm_eval_into(result: ModelResult, bench, spec: ModelSpec, settings: CompareSettings, status) -> str | None:
    """Run lm-eval on this model (its ablation re-applied); a note (and no more lm-eval) when it cannot run."""
    status(f"lm-eval on {spec.label}: {', '.join(settings.lm_eval_tasks)}")
    try:
        with bench.applied(spec.ablation_params() if spec.is_variant else None, _variant_directions(bench, spec)):
            result.lm_eval = run_lm_eval(bench.model, bench.tokenizer, settings.lm_eval_tasks, settings.lm_eval_limit,
                                         settings.batch_size)
    except Exception as error:  # noqa: BLE001 - lm-eval raises anything from dataset downloads to unknown task names
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"lm-eval skipped: it could not run {', '.join(settings.lm_eval_tasks)} ({type(error).__name__}: {first}); "
                "its task data may be unreachable (offline?) or a task name unknown")
    return None


# --- presenting -----------------------------------------------------------------------------------


def format_bytes(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _signed(value) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


TABLE_COLUMNS = ("model", "refusals", "over-refusals", "KL", "multi-token KL", "capability", "consistency", "tokens/s",
                 "peak memory")


def table_rows(comparison: Comparison) -> list[list[str]]:
    rows = []
    for r in comparison.results:
        rows.append([r.label + (" (base)" if r.is_base else ""), f"{r.refusals}/{r.total}", f"{r.over_refusals}/{r.over_total}",
                     _fmt(r.kl), _fmt(r.kl_multi_token), f"{r.capability}/{r.capability_total}", _fmt(r.consistency, 2),
                     f"{r.tokens_per_second:.1f}", format_bytes(r.peak_memory_bytes)])
    return rows


COLUMN_NOTES = {
    "refusals": "judged refusals of the held-out harmful prompts (bundled eval split), fewer is the goal",
    "over-refusals": "refusals of benign requests that sound harmful (data/probes/borderline.jsonl)",
    "KL": "first-token KL(base ‖ model) on benign eval prompts (batchmean)",
    "multi-token KL": "per-token KL along the base's own greedy continuation, teacher-forced",
    "capability": "exact match on short-answer probes (arithmetic, facts, code output, step-by-step reasoning)",
    "consistency": "share of agreeing answer pairs among three paraphrases of one question, averaged",
    "tokens/s": "generated tokens per second over all its answers, same batches for all (in-memory variants pay for their hooks)",
    "peak memory": "weights + the largest extra memory while measuring (CUDA: allocator peak; CPU: sampled resident set)",
}


def report_html(comparison: Comparison, sheet_name: str | None = SHEET_FILE) -> str:
    from abliterate.choose import report

    results = comparison.results
    labels = [r.label for r in results]
    settings = comparison.settings
    counts = settings["prompt_counts"]
    blocks = [report.heading("Models"), report.table(list(TABLE_COLUMNS), table_rows(comparison),
                                                     {i for i, r in enumerate(results) if r.is_base}),
              report.definitions(COLUMN_NOTES)]
    by_kind = sorted({k for r in results for k in r.capability_by_kind})
    if by_kind:
        blocks.append(report.table(["model", *by_kind],
                                   [[r.label, *(f"{r.capability_by_kind.get(k, [0, 0])[0]}/{r.capability_by_kind.get(k, [0, 0])[1]}"
                                                for k in by_kind)] for r in results], caption="capability by kind"))
    points = [{"label": r.label, "kl": r.kl or 0.0, "refusals": r.refusals / max(r.total, 1)} for r in results]
    front = report.pareto_mask([(p["refusals"], p["kl"]) for p in points])
    for point, on_front in zip(points, front):
        point["front"] = on_front
    blocks += [report.heading("Refusals vs KL"),
               report.figure(report.plot_refusals_vs_kl(points, TITLE_SCATTER, "refusal rate (held-out harmful prompts)"),
                             "Each model at (first-token KL against the base, refusal rate). The red steps join the models no "
                             "other beats on both; the base sits at KL 0.")]
    bars = {"refusal rate": [r.refusals / max(r.total, 1) for r in results],
            "over-refusal rate": [r.over_refusals / max(r.over_total, 1) for r in results],
            "first-token KL": [r.kl for r in results],
            "capability (exact match)": [r.capability / max(r.capability_total, 1) for r in results],
            "consistency": [r.consistency for r in results],
            "tokens/s": [r.tokens_per_second for r in results]}
    blocks += [report.heading("Per-model metrics"), report.figure(report.plot_bars(labels, bars, TITLE_BARS),
                                                                 "The table's columns as bars, one colour per model.")]
    blocks.append(report.heading("Where the refusal direction lives"))
    if comparison.strength:
        strength = comparison.strength
        blocks.append(report.figure(report.plot_strength(strength["strength"], strength["relative"], TITLE_STRENGTH),
                                    f"Base model {comparison.base_reference}: ‖mean harmful − mean harmless‖ of the last-token "
                                    f"residual after each layer (directions {strength['source']}); the line divides it by "
                                    "the harmless mean's norm."))
    else:
        blocks.append(report.note("no directions: the strength plot needs --directions or --direction-prompts > 0"))
    curves = {r.label: r.layer_weights for r in results if r.layer_weights}
    if curves:
        blocks.append(report.figure(report.plot_layer_weights(curves, TITLE_WEIGHTS),
                                    "Ablation weight per layer and component (0: not edited), from each model's parameters "
                                    "(abliteration.json or the variant's parameters)."))
    else:
        blocks.append(report.note("no model records its ablation parameters (abliteration.json), so no layer-weight curves"))
    if comparison.lm_eval_note:
        blocks += [report.heading("lm-evaluation-harness"), report.note(comparison.lm_eval_note)]
    elif any(r.lm_eval for r in results):
        deltas = lm_eval_deltas(results, comparison.base_label)
        columns = sorted({(t, m) for d in deltas.values() for t, ms in d.items() for m in ms})
        rows = [[label, *(_signed(deltas[label].get(t, {}).get(m)) for t, m in columns)] for label in deltas]
        blocks += [report.heading("lm-evaluation-harness (model − base)"),
                   report.table(["model", *(f"{t} {m}" for t, m in columns)], rows)]
    facts = {"base": f"{comparison.base_label} ({comparison.base_reference})",
             "prompts": f"{counts['harmful']} harmful, {counts['borderline']} borderline, {counts['benign']} benign (KL), "
                        f"{counts['probes']} probes, {counts['paraphrase_groups']} paraphrase groups",
             "decoding": f"greedy, {settings['max_new_tokens']} new tokens (probes {settings['probe_tokens']}), batch "
                         f"{settings['batch_size']}, multi-token KL over {settings['kl_tokens']} tokens",
             "judge": settings["judge"], "dtype": settings["dtype"],
             "system prompt": settings["system_prompt"] if settings["system_prompt"] is not None else "You are a helpful assistant."}
    if sheet_name:
        facts["blind sheet"] = f"{sheet_name} (rate it before opening {KEY_FILE}; then abliterate compare reveal)"
    blocks += [report.heading("Set-up"), report.definitions(facts)]
    return report.page("abliterate compare", f"{len(results)} models against {comparison.base_label}; {comparison.created}",
                       blocks)


# --- blind sheet ----------------------------------------------------------------------------------


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def make_sheet(items: list[tuple[str, str, str]], answers: dict[str, list[str]], seed: int) -> tuple[str, dict, str]:
    """items: (prompt id, kind, prompt); answers: model label → answer per item. Returns (sheet markdown, key,
    ratings CSV template). Letters are shuffled per prompt; the sheet names no model."""
    rng = random.Random(seed)
    labels = list(answers)
    letters = [chr(ord("A") + i) for i in range(len(labels))] if len(labels) <= 26 else [f"M{i + 1}" for i in range(len(labels))]
    lines = ["# Blind sample sheet", "",
             f"Each prompt has {len(labels)} answers, one per model, under letters shuffled for every prompt. Rate each "
             f"answer from 1 (useless) to 5 (excellent) in `{RATINGS_FILE}` (columns prompt_id, letter, rating).",
             f"Do not open `{KEY_FILE}` before you have rated; then run `abliterate compare reveal {SHEET_FILE} {RATINGS_FILE}`.", ""]
    key = {"seed": seed, "models": labels, "prompts": {}}
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["prompt_id", "letter", "rating"])
    for index, (prompt_id, kind, prompt) in enumerate(items):
        order = labels[:]
        rng.shuffle(order)
        mapping = dict(zip(letters, order))
        key["prompts"][prompt_id] = {"kind": kind, "prompt": prompt, "letters": mapping}
        lines += [f"## {prompt_id} ({kind})", "", _fence(prompt), ""]
        for letter, label in mapping.items():
            answer = answers[label][index].strip() or "(no answer)"
            lines += [f"**{letter}**", "", _fence(answer), ""]
            writer.writerow([prompt_id, letter, ""])
    return "\n".join(lines), key, rows.getvalue()


def sheet_items(prompts: PromptSets, n: int) -> list[tuple[str, str, str, str, int]]:
    """(id, kind, prompt, answer set, index): half harmful prompts, half borderline ones."""
    harmful = min(len(prompts.harmful), (n + 1) // 2)
    borderline = min(len(prompts.borderline), n - harmful)
    return ([(f"h{i + 1:02d}", "harmful request", prompts.harmful[i], "harmful", i) for i in range(harmful)]
            + [(f"b{i + 1:02d}", "benign request", prompts.borderline[i], "borderline", i) for i in range(borderline)])


def write_outputs(comparison: Comparison, out_dir: Path, prompts: PromptSets | None = None) -> dict[str, Path]:
    """report.html, results.json and (with sheet prompts) sheet.md, ratings.csv, key.json; atomically."""
    import shutil

    from abliterate.choose.report import write_html

    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    written = {}
    n_sheet = comparison.settings.get("sheet_prompts", 0)
    sheet_name = None
    if n_sheet and prompts is not None:
        items = sheet_items(prompts, n_sheet)
        answers = {r.label: [r.answers[kind][i] for *_, kind, i in items] for r in comparison.results}
        seed = comparison.settings.get("seed")
        seed = secrets.randbits(32) if seed is None else seed
        sheet, key, ratings = make_sheet([(pid, kind, prompt) for pid, kind, prompt, *_ in items], answers, seed)
        (partial / SHEET_FILE).write_text(sheet, encoding="utf-8")
        key["sheet_sha256"] = hashlib.sha256(sheet.encode()).hexdigest()
        (partial / KEY_FILE).write_text(json.dumps(key, indent=2) + "\n")
        (partial / RATINGS_FILE).write_text(ratings)
        sheet_name = SHEET_FILE
        written.update(sheet=out_dir / SHEET_FILE, key=out_dir / KEY_FILE, ratings=out_dir / RATINGS_FILE)
    write_html(partial / REPORT_FILE, report_html(comparison, sheet_name))
    (partial / RESULTS_FILE).write_text(json.dumps(comparison.to_dict(), indent=2) + "\n")
    written.update(report=out_dir / REPORT_FILE, results=out_dir / RESULTS_FILE)
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked before measuring)
    partial.rename(out_dir)
    return written


def check_output_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"output {out_dir} already exists and is not empty (a previous sheet's key would be lost); "
                        "choose another -o or remove it")
    if not out_dir.parent.exists():
        raise UserError(f"directory {out_dir.parent} does not exist; create it or choose another -o")


# --- reveal ---------------------------------------------------------------------------------------


def read_key(sheet: str | Path, key_file: str | Path | None = None) -> tuple[dict, list[str]]:
    """The key of a sheet (SHEET = sheet.md or its directory; the key beside it unless given), and warnings."""
    sheet = Path(sheet)
    sheet_file = sheet / SHEET_FILE if sheet.is_dir() else sheet
    key_path = Path(key_file) if key_file else sheet_file.parent / KEY_FILE
    if not key_path.is_file():
        raise UserError(f"no key found at {key_path}; give the sheet written by `abliterate compare` (its {KEY_FILE} "
                        "lies beside it) or --key FILE")
    try:
        key = json.loads(key_path.read_text())
        key["prompts"], key["models"]  # noqa: B018 - both must be there
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{key_path} is not a compare key ({error})") from None
    warnings = []
    if sheet_file.is_file() and key.get("sheet_sha256"):
        if hashlib.sha256(sheet_file.read_bytes()).hexdigest() != key["sheet_sha256"]:
            warnings.append(f"{sheet_file} differs from the sheet this key was written with (edited, or another compare's?)")
    elif not sheet_file.is_file():
        raise UserError(f"sheet not found: {sheet_file}")
    return key, warnings


def read_ratings(path: str | Path) -> list[tuple[str, str, float]]:
    """(prompt id, letter, rating) from a CSV (prompt_id, letter, rating) or JSON ([{...}] or {id: {letter: rating}});
    blank ratings are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ratings file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    rows = []
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} is not valid JSON ({error})") from None
        if isinstance(data, dict):
            data = [{"prompt_id": pid, "letter": letter, "rating": rating}
                    for pid, letters in data.items() if isinstance(letters, dict) for letter, rating in letters.items()]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError(f"{path}: expected a list of {{prompt_id, letter, rating}} objects or {{prompt_id: {{letter: rating}}}}")
        records = [(i + 1, r) for i, r in enumerate(data)]
    else:
        reader = csv.DictReader(io.StringIO(text))
        fields = {(f or "").strip().lower() for f in reader.fieldnames or []}
        if not {"prompt_id", "letter", "rating"} <= fields:
            raise UserError(f"{path} needs the columns prompt_id, letter, rating (it has {', '.join(sorted(fields)) or 'none'})")
        records = [(i + 2, {(k or "").strip().lower(): v for k, v in r.items()}) for i, r in enumerate(reader)]
    for line, record in records:
        rating = record.get("rating")
        if rating is None or str(rating).strip() == "":
            continue
        try:
            value = float(rating)
        except (TypeError, ValueError):
            raise UserError(f"{path}: row {line}: rating '{rating}' is not a number") from None
        if not math.isfinite(value):
            raise UserError(f"{path}: row {line}: rating '{rating}' is not a finite number")
        rows.append((str(record.get("prompt_id", "")).strip(), str(record.get("letter", "")).strip().upper(), value))
    return rows


def reveal(key: dict, ratings: list[tuple[str, str, float]], source: str = "ratings") -> dict:
    """Join ratings with the key: per model, the mean rating overall and by prompt kind."""
    if not ratings:
        raise UserError(f"{source} holds no ratings yet; fill in the rating column (e.g. 1 to 5) first")
    seen = set()
    per_model: dict[str, list[float]] = {label: [] for label in key["models"]}
    per_kind: dict[str, dict[str, list[float]]] = {label: {} for label in key["models"]}
    for prompt_id, letter, value in ratings:
        prompt = key["prompts"].get(prompt_id)
        if prompt is None:
            raise UserError(f"{source}: prompt id '{prompt_id}' is not on the sheet (its ids: {', '.join(list(key['prompts'])[:4])}, ...)")
        if letter not in prompt["letters"]:
            raise UserError(f"{source}: prompt {prompt_id} has no answer '{letter}' (letters {', '.join(prompt['letters'])})")
        if (prompt_id, letter) in seen:
            raise UserError(f"{source}: answer {prompt_id} {letter} is rated twice")
        seen.add((prompt_id, letter))
        label = prompt["letters"][letter]
        per_model[label].append(value)
        per_kind[label].setdefault(prompt["kind"], []).append(value)
    expected = sum(len(p["letters"]) for p in key["prompts"].values())
    models = []
    for label, values in per_model.items():
        models.append({"model": label, "mean": sum(values) / len(values) if values else None, "ratings": len(values),
                       "by_kind": {kind: sum(v) / len(v) for kind, v in sorted(per_kind[label].items())}})
    models.sort(key=lambda m: -math.inf if m["mean"] is None else -m["mean"])
    return {"models": models, "rated": len(seen), "answers": expected}
