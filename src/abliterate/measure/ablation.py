"""Directional ablation: one parameterisation, two exact realisations.

For every edited layer ℓ and component c (attention, MLP) with kernel weight w:

    r  = the refusal direction used at ℓ      (one direction interpolated at a fractional layer index,
                                                or ℓ's own direction), unit norm
    u  = normalize(g ⊙ r)  if c's output passes a norm with weight g before the residual add
                            (Gemma 2/3, OLMo 2): then rᵀ(g ⊙ x/rms(x)) = 0  ⇔  uᵀx = 0, so the edit is exact
       = r                 otherwise
    W' = W − w·u(uᵀW)      for each writer W ([hidden, in]); bias b' = b − w·u(uᵀb)
    norm-preserving:  W'[:, j] ← W'[:, j] · ‖W[:, j]‖ / ‖W'[:, j]‖   (each input feature's write keeps its length)

Layer kernel for a component with max_weight w, max_weight_position p, min_weight m, min_weight_distance d:

    weight(ℓ) = w + (|ℓ − p| / d)·(m − w)   if |ℓ − p| ≤ d,   else ℓ is left unedited.

Realisations:
  (a) `ablate(...)` — reversible, in memory: forward hooks compute out − w·u(uᵀout) on each component's
      output (the same linear map as W', so exact), or, for norm-preserving edits (not linear in the output),
      the edited tensors are swapped in and the untouched originals swapped back. `.remove()` restores the
      model bit for bit; switching parameters needs no reload.
  (b) `bake(...)` — W' written into the weights, for saving.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from abliterate.core.arch import COMPONENT_KINDS, Adapter, Component
from abliterate.errors import UserError


@dataclass
class Kernel:
    """Per-layer weights of one component: a peak at `max_weight_position`, falling off linearly."""

    max_weight: float = 1.0
    max_weight_position: float = 0.0
    min_weight: float = 1.0
    min_weight_distance: float = 1e9

    def weight(self, layer: int) -> float | None:
        distance = abs(layer - self.max_weight_position)
        if distance > self.min_weight_distance:
            return None
        if self.min_weight_distance == 0:
            return self.max_weight
        return self.max_weight + (distance / self.min_weight_distance) * (self.min_weight - self.max_weight)


@dataclass
class ComponentParams:
    """Which direction a component removes (None: each layer its own) and how strongly, layer by layer."""

    direction_index: float | None = None
    kernel: Kernel = field(default_factory=Kernel)


@dataclass
class AblationParams:
    components: dict[str, ComponentParams]
    norm_preserving: bool = False

    @classmethod
    def single_direction(cls, layer: float, weight: float = 1.0, components=COMPONENT_KINDS,
                         norm_preserving: bool = False) -> "AblationParams":
        """The direction taken at (fractional) `layer`, removed from every layer at `weight`."""
        kernel = Kernel(weight, 0.0, weight, math.inf)
        return cls({kind: ComponentParams(layer, kernel) for kind in components}, norm_preserving)

    def to_dict(self) -> dict:
        return {"components": {k: asdict(v) for k, v in self.components.items()},
                "norm_preserving": self.norm_preserving}

    @classmethod
    def from_dict(cls, data: dict) -> "AblationParams":
        try:
            components = {}
            for kind, value in data["components"].items():
                if kind not in COMPONENT_KINDS:
                    raise UserError(f"unknown component '{kind}' in parameters; use one of {', '.join(COMPONENT_KINDS)}")
                kernel = Kernel(**{k: float(v) for k, v in value.get("kernel", {}).items()})
                index = value.get("direction_index")
                components[kind] = ComponentParams(None if index is None else float(index), kernel)
            return cls(components, bool(data.get("norm_preserving", False)))
        except (KeyError, TypeError, AttributeError) as error:
            raise UserError(f"malformed ablation parameters ({error}); expected "
                            '{"components": {"attn": {"direction_index": 14.5, "kernel": {...}}, ...}}') from None

    @classmethod
    def from_file(cls, path: str | Path) -> "AblationParams":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"parameters file not found: {path}") from None
        except json.JSONDecodeError as error:
            raise UserError(f"parameters file {path} is not valid JSON ({error})") from None
        # a run's record (abliteration.json) holds the parameters under "parameters"
        return cls.from_dict(data["parameters"] if isinstance(data, dict) and "parameters" in data else data)


def interpolated_direction(directions: torch.Tensor, index: float) -> torch.Tensor:
    """Linear interpolation between the directions of the two layers around a fractional index, renormalised."""
    n_layers = directions.shape[0]
    if not 0 <= index <= n_layers - 1:
        raise UserError(f"direction layer {index:g} is out of range; this model has layers 0..{n_layers - 1}")
    low = int(math.floor(index))
    high = min(low + 1, n_layers - 1)
    frac = index - low
    direction = (1 - frac) * directions[low].double() + frac * directions[high].double()
    return torch.nn.functional.normalize(direction, dim=0).float()


@dataclass
class Edit:
    """Remove unit direction `u` (output space of `component`) at strength `weight`."""

    component: Component
    u: torch.Tensor
    weight: float


def plan_edits(adapter: Adapter, directions: torch.Tensor, params: AblationParams) -> list[Edit]:
    """Turn parameters into concrete per-component edits (pure: reads the model, changes nothing)."""
    if directions.shape != (adapter.n_layers, adapter.hidden_size):
        raise UserError(
            f"directions have shape {tuple(directions.shape)} but this model has {adapter.n_layers} layers of "
            f"size {adapter.hidden_size}; measure directions on this model with `abliterate directions`"
        )
    edits = []
    for kind, component_params in params.components.items():
        shared = (None if component_params.direction_index is None
                  else interpolated_direction(directions, component_params.direction_index))
        for layer in range(adapter.n_layers):
            weight = component_params.kernel.weight(layer)
            if weight is None or weight == 0:
                continue
            r = shared if shared is not None else torch.nn.functional.normalize(directions[layer].float(), dim=0)
            component = adapter.component(kind, layer)
            u = r if component.post_norm_scale is None else torch.nn.functional.normalize(
                component.post_norm_scale.to(r.device) * r, dim=0)
            edits.append(Edit(component, u, float(weight)))
    return edits


# --- the tensor core ------------------------------------------------------------------------------


def project_out(weight: torch.Tensor, u: torch.Tensor, strength: float, hidden_axis: int) -> torch.Tensor:
    """W − strength·u(uᵀW) along `hidden_axis` (works for [hidden, in], [in, hidden], [E, ·, ·] and bias [.., hidden])."""
    w = weight.float()
    u = u.to(w.device, torch.float32)
    moved = w.movedim(hidden_axis, -1)  # [..., hidden]
    coefficients = moved @ u  # [...]
    edited = moved - strength * coefficients.unsqueeze(-1) * u
    return edited.movedim(-1, hidden_axis)


def preserve_norms(original: torch.Tensor, edited: torch.Tensor, hidden_axis: int) -> torch.Tensor:
    """Rescale each input feature's write vector (norm taken over the hidden axis) to its original length."""
    original_norm = original.float().norm(dim=hidden_axis, keepdim=True)
    edited_norm = edited.norm(dim=hidden_axis, keepdim=True).clamp_min(1e-12)
    return edited * (original_norm / edited_norm)


def edited_tensor(original: torch.Tensor, u: torch.Tensor, strength: float, hidden_axis: int,
                  norm_preserving: bool = False) -> torch.Tensor:
    """W' = W − strength·u(uᵀW), optionally norm-preserving, computed in float32 and returned in W's dtype.

    The one place an edited tensor is made from its original: `bake` (in memory) and the shard-wise bake
    (ship/shard_bake.py) both call it, so their results are equal bit for bit."""
    edited = project_out(original, u, strength, hidden_axis)
    if norm_preserving:
        edited = preserve_norms(original, edited, hidden_axis)
    return edited.to(original.dtype)


@dataclass
class TensorEdit:
    """One tensor a plan changes (a writer's weight or bias) and how: `edited_tensor(tensor, u, strength, ...)`."""

    parameter: torch.nn.Parameter
    u: torch.Tensor
    strength: float
    hidden_axis: int
    norm_preserving: bool


def tensor_edits(edits: list[Edit], norm_preserving: bool = False) -> list[TensorEdit]:
    """The edits as tensor operations, in the order `bake` performs them (a bias is never norm-preserved)."""
    operations = []
    for edit in edits:
        for writer in edit.component.writers:
            operations.append(TensorEdit(writer.weight_param, edit.u, edit.weight, writer.hidden_axis, norm_preserving))
            if writer.bias_param is not None:
                operations.append(TensorEdit(writer.bias_param, edit.u, edit.weight, -1, False))
    return operations


# --- (b) bake into the weights ---------------------------------------------------------------------


@torch.no_grad()
def bake(edits: list[Edit], norm_preserving: bool = False) -> None:
    """Write the edits into the weights, in place."""
    for operation in tensor_edits(edits, norm_preserving):
        tensor = operation.parameter.data
        tensor.copy_(edited_tensor(tensor, operation.u, operation.strength, operation.hidden_axis,
                                   operation.norm_preserving))


# --- (a) reversible, in memory ----------------------------------------------------------------------


class Ablation:
    """An ablation applied in memory. `remove()` restores the model exactly; also a context manager."""

    def __init__(self):
        self._hooks = []
        self._swapped = []  # (parameter, original tensor)

    def _add_hook(self, edit: Edit) -> None:
        u_cache: dict = {}

        def project(x: torch.Tensor) -> torch.Tensor:
            key = (x.device, x.dtype)
            if key not in u_cache:
                u_cache[key] = edit.u.to(x.device, x.dtype)
            u = u_cache[key]
            # x − w·(x·u)u in two kernels (matmul, addcmul): on a GPU a decode step is bound by kernel launches
            return torch.addcmul(x, (x @ u).unsqueeze(-1), u, value=-edit.weight)

        def hook(module, args, output):
            if isinstance(output, tuple):
                return (project(output[0]),) + tuple(output[1:])
            return project(output)

        self._hooks.append(edit.component.output_module.register_forward_hook(hook))

    @torch.no_grad()
    def _swap(self, edit: Edit) -> None:
        for operation in tensor_edits([edit], norm_preserving=True):
            param = operation.parameter
            self._swapped.append((param, param.data))
            param.data = edited_tensor(param.data, operation.u, operation.strength, operation.hidden_axis,
                                       operation.norm_preserving)

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        for param, original in reversed(self._swapped):
            param.data = original
        self._hooks.clear()
        self._swapped.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def ablate(edits: list[Edit], norm_preserving: bool = False) -> Ablation:
    """Apply edits reversibly. Plain edits cost no memory (hooks); norm-preserving ones hold edited copies."""
    ablation = Ablation()
    for edit in edits:
        if norm_preserving:
            ablation._swap(edit)
        else:
            ablation._add_hook(edit)
    return ablation
