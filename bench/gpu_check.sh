#!/usr/bin/env bash
# On a CUDA machine: the device tests on CUDA, then trials per minute of a short ResNet-20 search on random
# 3x32x32 data, CUDA against the CPU. Needs no internet and no dataset.
#   bench/gpu_check.sh [trials]       (PYTHON=... picks the interpreter; default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TRIALS=${1:-6}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true

"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA on this machine")'
"$PYTHON" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(), "torch", torch.__version__)'

echo "== device tests on cuda"
# The bench below runs whatever the tests say; the script's status is the tests'.
status=0
AUTOPRUNE_TEST_DEVICE=cuda "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_task_api.py || status=$?

echo "== trials per minute and final training, ResNet-20 on random 3x32x32 data"
"$PYTHON" bench/bench_device.py --devices cuda cpu --trials "$TRIALS"
exit $status
