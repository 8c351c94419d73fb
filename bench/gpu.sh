#!/usr/bin/env bash
# The GPU run in one call: CIFAR indexing end to end (fp16, large batches, upscaling on the GPU) and text queries
# on CUDA, writing bench/results/gpu.md and gpu.json; without CUDA, a tiny CPU fallback (what CI runs).
# Usage: [PYTHON=...] bench/gpu.sh [--n 10000] [--batch-size 1024] [--out DIR] ...   (options of `python -m bench gpu`)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}  # PYTHON=/path/to/python picks another interpreter; else the checkout's .venv if any
if [[ -z ${PYTHON:-} && -x .venv/bin/python ]]; then python=.venv/bin/python; fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m bench gpu "$@"
