#!/usr/bin/env bash
# One command for a CUDA machine (about 8 minutes): CLAF whole-scan inference fp32 vs bf16 autocast, training
# it/s of every model fp32 vs bf16-mixed, `lungcad analyze` timing -> bench/results_gpu.md (bench/gpu_bench.py).
# Without CUDA it prints one line and exits 0. Options: --budget-s S, --steps N, --out FILE.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE="${WANDB_MODE:-disabled}"
exec "$PYTHON" -m bench.gpu_bench "$@"
