#!/usr/bin/env bash
# The GPU check (jobs/gpu_check.py) on a machine that has PyTorch and CUDA but not the project's other
# dependencies, and no network. The model library needs only open_clip (and its ftfy) beyond a PyTorch +
# transformers image; fetch their wheels where pip works, next to this repository:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 ftfy wcwidth
# then, on the GPU machine, from the repository root:  bash jobs/gpu_check.sh [RESULTS_DIR] [--cpu]
# (--cpu: every step on the CPU at tiny sizes, to check that the script runs where there is no GPU)
set -euo pipefail
results=${1:-.}
shift || true
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check-site .whl/*.whl
    export PYTHONPATH=/tmp/gpu-check-site
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
PYTHONUNBUFFERED=1 python3 jobs/gpu_check.py --json "$results/gpu_check.json" "$@"
