#!/usr/bin/env bash
# GPU engine benchmark (see experiments/bench_gpu.py): MLP at 10,000 and 100,000 clients, LeNet-5 and the CNN
# at 1,000 clients, the char transformer at 100 clients; samples/s, ratio to one centralized batch of the same
# samples and peak GPU memory, in one JSON.
#
#   bash experiments/bench_gpu.sh [--out bench_gpu.json] [--time-budget 420] [--only NAME,...]
#   bash experiments/bench_gpu.sh --dry-run --out /tmp/dry.json   # CPU, tiny sizes (CI)
#
# Needs CUDA unless --dry-run is given (it refuses with one line otherwise). Ray is not used.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$(command -v python || command -v python3)}"
BENCH_GPU_COMMAND="$(printf '%q ' bash "$0" "$@")"
export BENCH_GPU_COMMAND="${BENCH_GPU_COMMAND% }"
exec "$python" "$here/bench_gpu.py" "$@"
