"""Click options made from the settings schema (one declaration per option: name, type, help and default come
from the field), and the options commands share."""

from __future__ import annotations

import types
import typing

import click
from pydantic import BaseModel

from abliterate.core.arch import COMPONENT_KINDS
from abliterate.core.settings import MeasureSettings, ModelSettings, PromptSettings, toml_value
from abliterate.measure.ablation import AblationParams
from abliterate.errors import UserError

DEFAULT_MODEL = ModelSettings.model_fields["model"].default


def _click_type(annotation):
    """int, float, bool or str for a field's annotation (X | None counts as X; lists are comma-separated strings)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation if annotation in (int, float, bool) else str


def schema_options(schema: type[BaseModel], *names: str, unset: bool = False, flags: dict | None = None,
                   defaults: dict | None = None):
    """A decorator adding an option per field in `names`: `--kebab-name` (or `flags[name]`), passed as `name`.

    unset: the default is None, so what the user did not give is left to the other sources (TOML, environment) and
    the schema's default, which the help names. Else the default is the field's, or `defaults[name]` where a
    command keeps its own."""
    flags, defaults = flags or {}, defaults or {}

    def decorate(function):
        for name in reversed(names):
            field = schema.model_fields[name]
            kind = _click_type(field.annotation)
            default = defaults.get(name, field.get_default(call_default_factory=True))
            default = None if isinstance(default, list) and not default else default  # a comma list, empty
            declared = [flags.get(name, "--" + name.replace("_", "-")), name]
            if unset:
                shown = "" if default is None or default is False or default == [] else f" (default {toml_value(default).strip(chr(34))})"
                option = click.option(*declared, type=None if kind is bool else kind, is_flag=kind is bool,
                                      default=None, help=field.description + shown)
            elif kind is bool:
                option = click.option(*declared, is_flag=True, default=default, help=field.description)
            else:
                option = click.option(*declared, type=kind, default=default, show_default=default is not None,
                                      help=field.description)
            function = option(function)
        return function

    return decorate


def model_options(function=None, *, defaults: dict | None = None):
    """MODEL and the options that load it, shared by every command that loads a model."""
    def decorate(function):
        function = schema_options(ModelSettings, "revision", "dtype", "device_map", "quantize", "max_memory",
                                  "offload_folder", "trust_remote_code", defaults=defaults)(function)
        return click.argument("model", default=DEFAULT_MODEL, required=False)(function)

    return decorate(function) if function is not None else decorate


def prompt_options(function):
    """The prompt sets, their split and the system prompt of `directions`."""
    function = schema_options(MeasureSettings, "system_prompt")(function)
    function = click.option("--split", default=None, help="Split: train/tune/eval for the bundled sets (default train), "
                            "or a dataset split.")(function)
    return schema_options(PromptSettings, "harmful", "harmless", "column")(function)


def ablation_options(function):
    """Which ablation: one direction everywhere (--layer/--weight/--components/--norm-preserving) or --params."""
    decorators = [
        click.option("--layer", type=float, default=None,
                     help="Take the direction at this (fractional) layer and ablate it everywhere."),
        click.option("--weight", type=float, default=1.0, show_default=True, help="Ablation strength with --layer."),
        click.option("--params", "params_file", default=None,
                     help="A full parameter set (JSON: a run's abliteration.json or its 'parameters') instead of --layer."),
        click.option("--components", default="attn,mlp", show_default=True, help="With --layer: which components to edit."),
        click.option("--norm-preserving", is_flag=True, help="With --layer: keep each input feature's write vector length."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def ablation_params(layer, weight, params_file, components, norm_preserving):
    """The AblationParams the ablation options ask for."""
    if (layer is None) == (params_file is None):
        raise UserError("give exactly one of --layer L (one direction everywhere) or --params FILE.json")
    if params_file:
        return AblationParams.from_file(params_file)
    kinds = tuple(k.strip() for k in components.split(",") if k.strip())
    unknown = [k for k in kinds if k not in COMPONENT_KINDS]
    if unknown or not kinds:
        raise UserError(f"--components takes a comma list of {', '.join(COMPONENT_KINDS)}; got '{components}'")
    return AblationParams.single_direction(layer, weight, kinds, norm_preserving)


def comma_list(value: str | None) -> list[str] | None:
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]
