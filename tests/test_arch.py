"""Every supported family: the adapter finds each residual writer; in-memory ablation equals the bake;
removing it restores the model bit for bit; at weight 1 no edited contribution has a component along r."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCH_CONFIGS, build_tiny_model

from abliterate.measure.ablation import AblationParams, ComponentParams, Kernel, ablate, bake, plan_edits
from abliterate.core.arch import adapter_for
from abliterate.errors import UserError

INPUT_IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11], [9, 8, 7, 6, 5, 4, 3, 2]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def random_directions(adapter, seed=1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(adapter.n_layers, adapter.hidden_size, generator=generator), dim=-1)


PARAM_SETS = {
    "per-layer, weight 1": lambda n: AblationParams({k: ComponentParams(None, Kernel(1.0, 0, 1.0, n)) for k in ("attn", "mlp")}),
    "interpolated, kernel": lambda n: AblationParams({
        "attn": ComponentParams(1.5, Kernel(1.3, 2.0, 0.4, 1.5)),
        "mlp": ComponentParams(0.25, Kernel(0.8, 1.0, 0.2, 3.0)),
    }),
    "norm-preserving": lambda n: AblationParams({k: ComponentParams(None, Kernel(1.0, 1, 0.5, n)) for k in ("attn", "mlp")},
                                                norm_preserving=True),
}


@pytest.fixture(scope="module", params=sorted(ARCH_CONFIGS))
def arch_model(request):
    return request.param, build_tiny_model(request.param)


def test_adapter_finds_every_writer(arch_model):
    model_type, model = arch_model
    adapter = adapter_for(model)
    assert adapter.n_layers == 4 and len(adapter.components) == 8
    edited = {id(w.weight_param) for c in adapter.components for w in c.writers}
    # Every output projection and down projection in the text tower is edited; nothing else is.
    writer_suffixes = ("o_proj.weight", "down_proj.weight", "experts.down_proj", "attn.c_proj.weight",
                       "mlp.c_proj.weight", "attention.dense.weight", "self_attn.dense.weight",
                       "self_attention.dense.weight", "dense_4h_to_h.weight", "fc2.weight")
    for name, param in model.named_parameters():
        if "vision" in name or "visual" in name or "multi_modal" in name:
            continue
        expected = name.endswith(writer_suffixes)
        assert (id(param) in edited) == expected, f"{model_type}: {name} edited={id(param) in edited}, expected {expected}"
    if model_type in ("qwen3_moe", "mixtral", "qwen2_moe", "phimoe", "gpt_oss"):
        assert any(w.weight_param.ndim == 3 for c in adapter.components for w in c.writers), "fused experts missed"
    if model_type in ("qwen2_moe", "deepseek_v3"):
        assert any("shared_expert" in w.name for c in adapter.components for w in c.writers), "shared experts missed"
    if model_type in ("gemma2", "gemma3_text", "gemma3", "olmo2"):
        assert all(c.post_norm_scale is not None for c in adapter.components)


@pytest.mark.parametrize("param_set", sorted(PARAM_SETS))
def test_in_memory_equals_bake_and_removal_is_exact(arch_model, param_set):
    model_type, model = arch_model
    adapter = adapter_for(model)
    directions = random_directions(adapter)
    params = PARAM_SETS[param_set](adapter.n_layers)
    original = logits(model)

    edits = plan_edits(adapter, directions, params)
    assert edits, "no component was edited"
    with ablate(edits, params.norm_preserving):
        in_memory = logits(model)
    restored = logits(model)
    assert torch.equal(restored, original), "removing the ablation did not restore the model bit for bit"
    assert not torch.allclose(in_memory, original, atol=1e-4), "the ablation changed nothing"

    baked_model = copy.deepcopy(model)
    baked_adapter = adapter_for(baked_model)
    bake(plan_edits(baked_adapter, directions, params), params.norm_preserving)
    torch.testing.assert_close(logits(baked_model), in_memory, atol=2e-5, rtol=1e-4)


def _contribution_module(adapter, component, layer_module):
    """The module whose output is what this component adds to the residual (its post-norm, if any)."""
    post_norm = adapter.family.attention_post_norm if component.kind == "attn" else adapter.family.mlp_post_norm
    return getattr(layer_module, post_norm) if post_norm else component.output_module


@pytest.mark.parametrize("realisation", ["in-memory", "baked"])
def test_edited_contributions_have_no_component_along_direction(arch_model, realisation):
    model_type, model = arch_model
    model = copy.deepcopy(model) if realisation == "baked" else model
    adapter = adapter_for(model)
    directions = random_directions(adapter, seed=3)
    params = AblationParams({k: ComponentParams(None, Kernel(1.0, 0, 1.0, 99)) for k in ("attn", "mlp")})
    edits = plan_edits(adapter, directions, params)
    # Apply first: capture hooks registered afterwards see the edited output.
    ablation = ablate(edits) if realisation == "in-memory" else None
    if realisation == "baked":
        bake(edits)
    captured = {}
    handles = []
    for component in adapter.components:
        module = _contribution_module(adapter, component, adapter.layers[component.layer])

        def hook(mod, args, output, key=(component.kind, component.layer)):
            captured[key] = (output[0] if isinstance(output, tuple) else output).detach()
        handles.append(module.register_forward_hook(hook))
    try:
        logits(model)
    finally:
        for handle in handles:
            handle.remove()
        if ablation:
            ablation.remove()
    assert len(captured) == 2 * adapter.n_layers
    for (kind, layer), contribution in captured.items():
        along = (contribution @ directions[layer]).abs().max()
        scale = contribution.norm(dim=-1).max()
        assert along <= 1e-5 * max(1.0, float(scale)), f"{model_type} {kind}{layer}: |r·contribution| = {along:.2e}"


def test_norm_preserving_keeps_write_norms():
    model = build_tiny_model("llama")
    adapter = adapter_for(model)
    writer = adapter.component("mlp", 2).writers[0]
    before = writer.weight_param.detach().norm(dim=0).clone()  # per input feature, over the hidden axis
    params = AblationParams({"mlp": ComponentParams(None, Kernel(1.0, 2, 1.0, 0))}, norm_preserving=True)
    bake(plan_edits(adapter, random_directions(adapter), params), norm_preserving=True)
    torch.testing.assert_close(writer.weight_param.detach().norm(dim=0), before)


def test_unsupported_architecture_names_supported_families():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mamba", hidden_size=32, num_hidden_layers=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UserError) as error:
        adapter_for(model)
    message = str(error.value)
    assert "mamba" in message and "llama" in message and "gemma3_text" in message
