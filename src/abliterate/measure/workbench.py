"""The measuring core: one loaded model and everything measured against it.

A `Workbench` owns the model (through its engine), the prompt splits formatted for it, the judge, the batch size and
the base model's measurements per split. `run`, `eval`, `compare`, `verify`, the benchmarks and the Python API are
short compositions of its five calls:

    bench = Workbench.open("tiny", PromptSplits.read(tune=32, eval=64), judge="classifier")
    bench.use(bench.directions())                        # refusal directions from the train split
    before = bench.base_refusals("eval")                 # the base model (its KL against itself is 0)
    after = bench.measure(params, "eval")                # an ablation, applied in memory and removed afterwards
    bench.bake(params); bench.save("out", record)        # into the weights, then a Hugging Face folder
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from pathlib import Path

from abliterate.plugins import ENGINES, Engine, plugin
from abliterate.version import __version__
from abliterate.core.judges import get_judge
from abliterate.core.load import LoadedModel, load_model
from abliterate.core.prompts import format_prompts, load_prompts, prompt_set_hash
from abliterate.core.save import model_card, save_into
from abliterate.measure.ablation import AblationParams, plan_edits
from abliterate.measure.directions import Directions, measure_directions
from abliterate.measure.engines import engine_name
from abliterate.errors import UserError
from abliterate.measure.evaluate import Baseline, Metrics, check_same_vocabulary, evaluate, refused_subset

SPLITS = ("train", "tune", "eval")


@dataclass
class PromptSplits:
    """Harmful and harmless prompts (raw, unformatted) of each split: train (directions), tune (the search), eval
    (held out: the final report only)."""

    train: tuple[list[str], list[str]] = ([], [])
    tune: tuple[list[str], list[str]] = ([], [])
    eval: tuple[list[str], list[str]] = ([], [])

    @classmethod
    def read(cls, harmful: str = "harmful", harmless: str = "harmless", column: str | None = None,
             train: int = 128, tune: int = 48, eval: int = 100) -> "PromptSplits":
        """Each set's splits (bundled sets, files or datasets), the first `train`/`tune`/`eval` prompts of each."""
        return cls(*((load_prompts(harmful, column, split)[:limit], load_prompts(harmless, column, split)[:limit])
                     for split, limit in zip(SPLITS, (train, tune, eval))))

    def hashes(self) -> dict:
        return {f"{split}_{kind}": prompt_set_hash(prompts)
                for split in SPLITS for kind, prompts in zip(("harmful", "harmless"), getattr(self, split))}


@dataclass
class Workbench:
    loaded: LoadedModel
    prompts: PromptSplits
    judge: object
    batch_size: int = 16
    max_new_tokens: int = 32
    kl_tokens: int = 16
    system_prompt: str | None = None
    engine_name: str = "transformers"  # a name in abliterate.plugins.ENGINES
    tensor_parallel: int = 1  # GPUs the vllm engine splits the model over
    engine: Engine = field(init=False)
    baselines: dict[str, Baseline] = field(default_factory=dict, init=False)
    current_directions: Directions | None = field(default=None, init=False)
    base: "Workbench | None" = field(default=None, init=False)  # KL is measured against its model (default: own)

    def __post_init__(self):
        options = {"tensor_parallel": self.tensor_parallel} if self.engine_name == "vllm" else {}
        self.engine = plugin(ENGINES, self.engine_name).from_loaded(self.loaded, **options)

    @classmethod
    def open(cls, model: str, prompts: PromptSplits, judge: str = "classifier", dtype: str = "auto",
             device_map=None, revision: str | None = None, trust_remote_code: bool = False, engine: str = "auto",
             quantize: str = "none", max_memory=None, offload_folder: str | None = None, tensor_parallel: int = 1,
             **measuring) -> "Workbench":
        """Load `model` and set the bench up (`engine`: see `engine_name`; `quantize`, `max_memory`,
        `offload_folder`: see `load_model`; `measuring`: batch_size, max_new_tokens, kl_tokens, system_prompt)."""
        judge_object = get_judge(judge) if isinstance(judge, str) else judge
        name = engine_name(engine, tensor_parallel)
        loaded = load_model(model, dtype, device_map, revision, trust_remote_code, quantize, max_memory, offload_folder)
        return cls(loaded, prompts, judge_object, engine_name=name, tensor_parallel=tensor_parallel, **measuring)

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def format(self, prompts: list[str]) -> list[str]:
        """The prompts as the model sees them: its chat template, the system prompt, the assistant's turn opened."""
        return format_prompts(self.tokenizer, prompts, self.system_prompt)

    def choose_batch_size(self, max_batch_size: int = 64, split: str = "tune") -> int:
        """The fastest batch size that fits (timed on the split's harmful prompts); kept for every measurement."""
        self.batch_size = self.engine.choose_batch_size(self.format(getattr(self.prompts, split)[0]), max_batch_size,
                                                        self.max_new_tokens)
        return self.batch_size

    def against(self, base: "Workbench") -> "Workbench":
        """Measure KL against `base`'s model (the one this model was made from) instead of this model itself."""
        check_same_vocabulary(self.tokenizer, base.tokenizer)
        self.base = base
        return self

    def close(self) -> None:
        """Free the model; what was measured (baselines, tokenizer) stays, so another bench can measure against it."""
        getattr(self.engine, "close", lambda: None)()  # an engine with processes of its own (vLLM) stops them
        self.loaded.model = self.loaded.adapter = self.engine = None  # the adapter holds the modules too
        gc.collect()

    def refused(self, prompts: list[str]) -> list[str] | None:
        """The prompts the model refuses as it is now (None when it refuses too few for a direction of its own)."""
        return refused_subset(self.engine, prompts, self.format(prompts), self.judge,
                              self.max_new_tokens, self.batch_size)

    def directions(self, harmful: list[str] | None = None, harmless: list[str] | None = None, projected: bool = True,
                   winsorize: float | None = None, metadata: dict | None = None, progress=None) -> Directions:
        """Refusal directions per layer, from the train split unless prompts are given (`progress(n)`: n more done)."""
        return measure_directions(self.loaded, self.prompts.train[0] if harmful is None else harmful,
                                  self.prompts.train[1] if harmless is None else harmless,
                                  system_prompt=self.system_prompt, batch_size=self.batch_size, projected=projected,
                                  winsorize_quantile=winsorize, metadata=metadata, progress=progress)

    def baseline(self, split: str) -> Baseline:
        """The base model on the split's harmless prompts (first-token and continuation log-probs), measured once.
        Call it before editing the model: it measures the model as it is."""
        if self.base is not None:
            return self.base.baseline(split)
        if split not in self.baselines:
            self.baselines[split] = Baseline.measure(self.engine, self.format(getattr(self.prompts, split)[1]),
                                                     self.kl_tokens, batch_size=self.batch_size)
        return self.baselines[split]

    def measure(self, params: AblationParams | None, split: str, directions: Directions | None = None,
                kl: bool = True) -> Metrics:
        """Refusals on the split's harmful prompts and KL against the base on its harmless ones (`kl=False`: not
        measured, None), with `params` applied in memory (removed afterwards); None: the model as it is."""
        baseline = self.baseline(split) if kl else None
        harmful = self.format(getattr(self.prompts, split)[0])
        with self.applied(params, directions):
            return evaluate(self.engine, harmful, self.judge, baseline, self.max_new_tokens, self.batch_size)

    def base_refusals(self, split: str) -> Metrics:
        """The base model's refusals on the split (its KL against itself is 0 by definition: not measured)."""
        metrics = self.measure(None, split, kl=False)
        metrics.kl, metrics.kl_multi_token = 0.0, 0.0
        return metrics

    def applied(self, params: AblationParams | None, directions: Directions | None = None):
        """A context in which the model computes with `params` ablated (reversible; None: nothing changed)."""
        if params is None:
            return contextlib.nullcontext()
        return self.engine.ablated(self.edits(params, directions), params.norm_preserving)

    def generate(self, prompts: list[str], max_new_tokens: int | None = None, formatted: bool = False):
        """Greedy answers of the model as it is now (a `Generation`: texts and tokens)."""
        return self.engine.generate(prompts if formatted else self.format(prompts),
                                    max_new_tokens or self.max_new_tokens, self.batch_size)

    def edits(self, params: AblationParams, directions: Directions | None = None) -> list:
        """What `params` change in this model: per writer module, the direction removed and how strongly."""
        directions = directions or self.current_directions
        if directions is None:
            raise UserError("no refusal directions yet: measure them (bench.use(bench.directions())) or load a file")
        return plan_edits(self.loaded.adapter, directions.directions, params)

    def use(self, directions: Directions) -> Directions:
        """The directions `measure`, `bake` and `edits` use when none are given (fitted to this model's layers)."""
        self.current_directions = directions.fitted_to(self.loaded.adapter)
        return self.current_directions

    def bake(self, params: AblationParams, directions: Directions | None = None) -> list:
        """The ablation written into the weights (irreversible in memory); returns the edits made."""
        if self.loaded.quantize != "none":
            raise UserError(f"a {self.loaded.quantize} model's weights cannot be edited; bake on full-precision "
                            "weights (abliterate apply, or run's save, which does)")
        edits = self.edits(params, directions)
        self.engine.bake(edits, params.norm_preserving)  # every copy the engine computes with (vLLM keeps its own)
        return edits

    def save(self, output: str | Path, record: dict | None = None, record_name: str = "abliteration.json") -> Path:
        """The model as it is now, as a Hugging Face folder, with `record` (and, for a run's full record, the model
        card made from its numbers); written beside and moved in, the record last."""
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        record = record if record is not None else {"tool": f"abliterate {__version__}", "base_model": self.loaded.source.reference}
        card = {"README.md": model_card(record)} if "metrics" in record else {}
        save_into(self.model, self.tokenizer, output, card, record_name, record)
        return output
