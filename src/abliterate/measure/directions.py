"""Refusal directions, one per layer, from last-token residuals of harmful vs harmless prompts.

    h_ℓ(p)  = residual stream after decoder layer ℓ at the last token of prompt p (chat-formatted,
              so the last token is the end of the assistant prefix — where the model decides to refuse)
    μ⁺_ℓ    = mean over harmful prompts of h_ℓ,  μ⁻_ℓ = mean over harmless prompts
              (`run`: only the harmful prompts the base model refuses, evaluate.refused_subset)
    r_ℓ     = normalize(μ⁺_ℓ − μ⁻_ℓ)
    projected option:  r_ℓ = normalize(d − (d·m̂)m̂),  d = μ⁺_ℓ − μ⁻_ℓ,  m̂ = normalize(μ⁻_ℓ)
    winsorize option:  each residual clamped to ±(its q-quantile of |h|) before averaging (tames outliers;
                       `run` uses q = 0.99: a few dimensions carry |h| many times the rest's)
    positions option:  h_ℓ(p) = the mean of p's last N token residuals instead of the last one's

Means are accumulated in float64 as a stream over batches: only one batch's last-token residuals exist
at a time, never all residuals. The forward pass stops after the last decoder layer (no final norm,
no LM head: the directions do not need logits).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from abliterate.core.arch import Adapter
from abliterate.core.load import input_device
from abliterate.errors import UserError


class _StopForward(Exception):
    pass


@torch.no_grad()
def mean_last_token_residuals(model, tokenizer, adapter: Adapter, formatted_prompts: list[str],
                              batch_size: int = 16, winsorize_quantile: float | None = None,
                              progress=None, positions: int = 1) -> torch.Tensor:
    """[n_layers, hidden] float64 mean of each layer's last-token residual over the prompts (with `positions` > 1,
    of each prompt's mean over its last `positions` tokens)."""
    sums = torch.zeros(adapter.n_layers, adapter.hidden_size, dtype=torch.float64)
    captured: dict[int, torch.Tensor] = {}

    def capture(index: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured[index] = hidden[:, -positions:, :].float().mean(dim=1).detach()
            if index == adapter.n_layers - 1:
                raise _StopForward
        return hook

    handles = [layer.register_forward_hook(capture(i)) for i, layer in enumerate(adapter.layers)]
    device = input_device(model)
    # Similar lengths in a batch waste less compute on padding; the mean does not depend on order.
    order = sorted(range(len(formatted_prompts)), key=lambda i: len(formatted_prompts[i]))
    try:
        for start in range(0, len(order), batch_size):
            batch = [formatted_prompts[i] for i in order[start:start + batch_size]]
            inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            try:
                model(**inputs, use_cache=False)
            except _StopForward:
                pass
            for index in range(adapter.n_layers):
                residual = captured[index].float()
                if winsorize_quantile is not None:
                    bound = torch.quantile(residual.abs(), winsorize_quantile, dim=-1, keepdim=True)
                    residual = torch.maximum(torch.minimum(residual, bound), -bound)
                sums[index] += residual.double().sum(dim=0).cpu()
            captured.clear()
            if progress is not None:
                progress(len(batch))
    finally:
        for handle in handles:
            handle.remove()
    return sums / len(formatted_prompts)


def refusal_directions(harmful_mean: torch.Tensor, harmless_mean: torch.Tensor, projected: bool = False) -> torch.Tensor:
    """Unit direction per layer, float32 [n_layers, hidden]."""
    difference = harmful_mean.double() - harmless_mean.double()
    if projected:
        harmless_unit = torch.nn.functional.normalize(harmless_mean.double(), dim=-1)
        difference = difference - (difference * harmless_unit).sum(-1, keepdim=True) * harmless_unit
    return torch.nn.functional.normalize(difference, dim=-1).float()


@dataclass
class Directions:
    """Per-layer refusal directions plus the means they came from, and where they were measured."""

    directions: torch.Tensor  # [n_layers, hidden] float32, unit rows
    harmful_mean: torch.Tensor | None = None
    harmless_mean: torch.Tensor | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.directions.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.directions.shape[1]

    def strength(self) -> torch.Tensor:
        """‖μ⁺ − μ⁻‖ per layer: how separated harmful and harmless prompts are at each depth."""
        if self.harmful_mean is None or self.harmless_mean is None:
            return torch.full((self.n_layers,), float("nan"))
        return (self.harmful_mean - self.harmless_mean).norm(dim=-1).float()

    def check_fits(self, adapter: Adapter, source: str = "directions") -> None:
        if (self.n_layers, self.hidden_size) != (adapter.n_layers, adapter.hidden_size):
            measured_on = self.metadata.get("model", "another model")
            raise UserError(
                f"{source} were measured on {measured_on} ({self.n_layers} layers, hidden size {self.hidden_size}) "
                f"but this model has {adapter.n_layers} layers, hidden size {adapter.hidden_size}; "
                "measure directions on this model with `abliterate directions`"
            )

    def save(self, path: str | Path, also_pt: bool = False) -> Path:
        """safetensors with JSON metadata (atomic); `also_pt` writes a plain [n_layers, hidden] tensor `.pt` too."""
        path = Path(path)
        tensors = {"refusal_directions": self.directions.contiguous()}
        if self.harmful_mean is not None:
            tensors["harmful_mean"] = self.harmful_mean.double().contiguous()
            tensors["harmless_mean"] = self.harmless_mean.double().contiguous()
        partial = path.with_name(path.name + ".partial")
        save_file(tensors, str(partial), metadata={"abliterate": json.dumps(self.metadata)})
        partial.rename(path)
        if also_pt:
            pt_path = path.with_suffix(".pt")
            partial_pt = pt_path.with_name(pt_path.name + ".partial")
            torch.save(self.directions.clone(), partial_pt)
            partial_pt.rename(pt_path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Directions":
        """Read our safetensors, or another tool's `.pt` (a tensor [L, H], [L+1, H] with the embedding
        output first, or a single [H] direction used at every layer) — always with weights_only=True."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"directions file not found: {path}; make one with `abliterate directions`")
        if path.suffix == ".pt":
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # pickle errors and non-tensor content
                raise UserError(f"{path} is not a plain tensor file readable with weights_only=True ({error})") from None
            if isinstance(data, dict):
                data = data.get("refusal_directions", data.get("directions"))
            if not isinstance(data, torch.Tensor) or data.ndim not in (1, 2):
                raise UserError(f"{path} holds no [layers, hidden] or [hidden] tensor of directions")
            return cls(torch.nn.functional.normalize(data.float(), dim=-1), metadata={"source": str(path), "format": "pt"})
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                metadata = json.loads((handle.metadata() or {}).get("abliterate", "{}"))
            tensors = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise UserError(f"{path} is not a readable directions file ({error})") from None
        if "refusal_directions" not in tensors:
            raise UserError(f"{path} has no 'refusal_directions' tensor; make one with `abliterate directions`")
        return cls(tensors["refusal_directions"].float(), tensors.get("harmful_mean"), tensors.get("harmless_mean"), metadata)

    def fitted_to(self, adapter: Adapter) -> "Directions":
        """Adapt the layouts other tools write to .pt: one direction for all layers, or an extra embedding row."""
        directions = self.directions
        if self.metadata.get("format") == "pt":
            if directions.ndim == 1:
                directions = directions.expand(adapter.n_layers, -1).clone()
            elif directions.shape[0] == adapter.n_layers + 1:
                directions = directions[1:]
        fitted = Directions(directions, self.harmful_mean, self.harmless_mean, self.metadata)
        fitted.check_fits(adapter)
        return fitted


def measure_directions(loaded, harmful: list[str], harmless: list[str], system_prompt=None, batch_size: int = 16,
                       projected: bool = False, winsorize_quantile: float | None = None, progress=None,
                       metadata: dict | None = None, positions: int = 1) -> Directions:
    """Format both prompt sets for the model, stream their residual means, return per-layer directions."""
    from abliterate.core.prompts import DEFAULT_SYSTEM_PROMPT, format_prompts, prompt_set_hash

    system_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    if winsorize_quantile is not None and not 0 < winsorize_quantile <= 1:
        raise UserError(f"winsorize quantile must be in (0, 1], got {winsorize_quantile}")
    means = []
    for prompts in (harmful, harmless):
        formatted = format_prompts(loaded.tokenizer, prompts, system_prompt)
        means.append(mean_last_token_residuals(loaded.model, loaded.tokenizer, loaded.adapter, formatted,
                                               batch_size, winsorize_quantile, progress, positions))
    harmful_mean, harmless_mean = means
    info = {
        "model": loaded.source.reference,
        "revision": loaded.source.revision,
        "model_type": loaded.adapter.model_type,
        "n_layers": loaded.adapter.n_layers,
        "hidden_size": loaded.adapter.hidden_size,
        "harmful_count": len(harmful),
        "harmless_count": len(harmless),
        "harmful_sha256": prompt_set_hash(harmful),
        "harmless_sha256": prompt_set_hash(harmless),
        "system_prompt": system_prompt,
        "projected": projected,
        "winsorize_quantile": winsorize_quantile,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        **(metadata or {}),
    }
    return Directions(refusal_directions(harmful_mean, harmless_mean, projected), harmful_mean, harmless_mean, info)
