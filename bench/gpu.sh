#!/usr/bin/env bash
# On a machine with one CUDA GPU whose Python already has torch, triton, peft, pytest and
# matplotlib (e.g. the lent H200): install lorafast itself, run the GPU tests, then the layer
# benchmark for the Triton path (bf16, 4096x4096, 8192 tokens, r=16). Results go to $OUT (the
# device tool's output folder) or bench/results. Ends well inside 6 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu_machine.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu_machine.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
status=0
TRITON_INTERPRET=0 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/gpu_tests.log" || status=1
timeout 120 python3 bench/layer_ratios.py --device cuda --dtype bfloat16 --tokens 8192 --features 4096 \
    --rank 16 --dropout 0 0.1 --rounds 40 --out "$out" 2>&1 | tee "$out/gpu_bench.log" || status=1
exit $status
