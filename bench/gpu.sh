#!/usr/bin/env bash
# GPU tests and benchmarks on a machine with one CUDA GPU.
#
# Needs: a Python with torch (CUDA build), triton, peft, transformers, tokenizers, pytest, pytest-benchmark
# and matplotlib, and bitsandbytes for the QLoRA benchmarks (skipped without it); lorafast is installed from
# this checkout. Runs the compiled kernels' tests
# (tests/test_cuda.py), then the benchmark suite (bench/), and writes logs, benchmark.json and the
# report to $OUT (default bench/results). Sized to end within 9 minutes with a cold Triton cache.
#
# The model benchmarks read SumPubMed from ../shared/sumpubmed, or from LORAFAST_SUMPUBMED.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu_machine.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu_machine.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
status=0
TRITON_INTERPRET=0 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/gpu_tests.log" || status=1
timeout 210 python3 -m pytest -q -p no:cacheprovider --benchmark --benchmark-json "$out/benchmark.json" \
    --ignore bench/test_qlora_bench.py 2>&1 | tee "$out/gpu_bench.log" || status=1
newest=$(ls -dt bench/results/cuda-* 2>/dev/null | head -1)
[ -n "$newest" ] && cp "$newest"/report.* "$out/"
# QLoRA (bf16 compute, NF4 double quant): 4096→4096 and 4096→11008 layers at n=8192, r=16, and a 1B-class step.
timeout 150 python3 -m pytest -q -p no:cacheprovider --benchmark --benchmark-json "$out/benchmark_qlora.json" \
    bench/test_qlora_bench.py 2>&1 | tee "$out/gpu_bench_qlora.log" || status=1
newest_qlora=$(ls -dt bench/results/cuda-* 2>/dev/null | head -1)
if [ -n "$newest_qlora" ] && [ "$newest_qlora" != "$newest" ]; then
    cp "$newest_qlora"/report.md "$out/report_qlora.md"
fi
exit $status
