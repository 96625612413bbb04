#!/usr/bin/env bash
# DAAM (castorini/daam, "What the DAAM", ACL 2023) in a virtual environment of its own, for the masks-stage peer
# benchmark (bench_peers.py). DAAM pins diffusers, transformers and accelerate to versions far older than this
# project's, so it cannot share the project's environment; its tracer is run in a subprocess of this venv.
#
#   experiments/benchmarks/setup_daam.sh            # creates .venv-daam (or $DAAM_VENV) when missing
#
# torch is the project's pinned version (requirements.lock), so that both sides run the same kernels.
# huggingface_hub is held below 0.26: diffusers 0.21.2 (DAAM's pin) imports `cached_download`, which later
# huggingface_hub releases removed. numpy is held below 2: transformers 4.30.2 and DAAM's numba predate it.
# matplotlib: daam 0.2.0 imports it (daam/utils.py) without declaring it.
set -euo pipefail
cd "$(dirname "$0")/../.."
DAAM_VENV=${DAAM_VENV:-.venv-daam}
PYTHON=${PYTHON:-python3}
DAAM_VERSION=0.2.0
TORCH_PIN=$(grep -E '^torch==' requirements.lock)
STAMP="$DAAM_VENV/.installed-daam-$DAAM_VERSION"

if [ -e "$STAMP" ]; then
    exit 0
fi
test -x "$DAAM_VENV/bin/python" || "$PYTHON" -m venv "$DAAM_VENV"
"$DAAM_VENV/bin/python" -m pip install -q --upgrade pip
"$DAAM_VENV/bin/python" -m pip install -q "daam==$DAAM_VERSION" "$TORCH_PIN" "huggingface_hub<0.26" "numpy<2" matplotlib
# The tracer must import in this environment, with the pinned diffusers.
"$DAAM_VENV/bin/python" - <<'PY'
import diffusers, transformers, torch
import daam  # noqa: F401  (imports its tracer, spacy, matplotlib ...)
from daam.trace import UNetCrossAttentionHooker  # noqa: F401
print(f"DAAM environment ready: daam {daam.__version__}, diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, torch {torch.__version__}")
PY
touch "$STAMP"
