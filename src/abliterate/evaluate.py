"""Measuring a model: greedy responses for the refusal judge, and next-token distributions for KL.

    KL(base ‖ model) = (1/N) Σ_prompts Σ_tokens p_base(t) · (log p_base(t) − log p_model(t))   (batchmean)
    measured on the first generated token of benign prompts: how much the edit moved the model.
"""

from __future__ import annotations

import torch


def _batches(items: list, batch_size: int):
    for start in range(0, len(items), batch_size):
        yield start, items[start:start + batch_size]


@torch.no_grad()
def generate_greedy(model, tokenizer, formatted_prompts: list[str], max_new_tokens: int = 32,
                    batch_size: int = 16) -> list[str]:
    """Greedy continuations, decoded without special tokens, in the order of the prompts."""
    device = next(model.parameters()).device
    responses = []
    for _, batch in _batches(formatted_prompts, batch_size):
        inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return responses


@torch.no_grad()
def next_token_logprobs(model, tokenizer, formatted_prompts: list[str], batch_size: int = 16) -> torch.Tensor:
    """[N, vocab] float32 log-probabilities of the first response token."""
    device = next(model.parameters()).device
    rows = []
    for _, batch in _batches(formatted_prompts, batch_size):
        inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1, :]
        rows.append(torch.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(rows)


def kl_divergence(base_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """KL(base ‖ model), batchmean over prompts."""
    if base_logprobs.shape != logprobs.shape:
        raise ValueError(f"vocabularies differ: {tuple(base_logprobs.shape)} vs {tuple(logprobs.shape)}")
    return float(torch.nn.functional.kl_div(logprobs, base_logprobs, log_target=True, reduction="batchmean"))


def count_refusals(responses: list[str], judge) -> int:
    return sum(judge.is_refusal(response) for response in responses)
