#!/usr/bin/env bash
# One short GPU check (minutes): the engine in bf16 on a DeBERTa-v3-base-sized model.
# Run on the GPU machine from the repository root; needs the venv with a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -f artifacts/prepared/pairs.csv ] || { $PY -m pipeline.sample_data --if-missing && $PY -m pipeline.prepare; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY bench/gpu_check.py "$@"
$PY bench/gpu_check.py --compile "$@"
