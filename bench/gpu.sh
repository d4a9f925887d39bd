#!/usr/bin/env bash
# GPU tests and benchmarks on a machine with one CUDA GPU; `--dry-run` runs every step on a CPU machine.
#
# Needs: a Python with torch (CUDA build), triton, peft, transformers, tokenizers, pytest, pytest-benchmark
# and matplotlib, and bitsandbytes for the QLoRA benchmarks; lorafast is installed from this checkout. Runs the
# compiled kernels' tests (tests/test_cuda.py, both GEMM paths), then the benchmark suite (bench/), then its QLoRA
# part (LoRA and DoRA; bf16 compute, NF4 double quant: 4096→4096 and 4096→11008 layers at n=8192, r=16, and a
# 0.4B-class step), and writes logs, benchmark.json, benchmark_qlora.json, the reports and gemm_paths.md (the GEMM
# path auto chose per layer shape, both paths' timings, the ratios against a frozen nn.Linear and PEFT) to $OUT
# (default bench/results). Every step has its own timeout: at most 8 minutes in all, with a cold Triton cache on
# one H100.
#
# --dry-run: the same steps on CPU tensors, so that a GPU's first minute measures instead of crashing: the install
# is checked with `pip install --dry-run` (this checkout runs from PYTHONPATH, nothing is installed), the GPU test
# file runs with every kernel through Triton's interpreter (smaller shapes), and the benchmark suite runs the GPU
# plan at its smallest shapes, one round (LORAFAST_BENCH_DRY_RUN=1). About 2 to 3 minutes on 2 cores.
#
# The model benchmarks read SumPubMed from ../shared/sumpubmed, or from LORAFAST_SUMPUBMED.
set -uo pipefail
cd "$(dirname "$0")/.."
dry_run=0
case "${1:-}" in
    --dry-run) dry_run=1 ;;
    "") ;;
    *) echo "usage: bash bench/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ $dry_run = 1 ]; then
    export TRITON_INTERPRET=1 LORAFAST_BACKEND=triton LORAFAST_BENCH_DRY_RUN=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    device=cpu tests_timeout=120 bench_timeout=210 qlora_timeout=240
    echo "dry run on $(nproc) CPU cores: no GPU" | tee "$out/gpu_machine.txt"
    install=(python3 -m pip install -q --dry-run --no-deps --no-build-isolation -e .)
else
    export TRITON_INTERPRET=0
    device=cuda tests_timeout=120 bench_timeout=210 qlora_timeout=150
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu_machine.txt"
    install=(python3 -m pip install -q --no-deps --no-build-isolation -e .)
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu_machine.txt"
"${install[@]}" || exit 1
status=0
timeout $tests_timeout python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$out/gpu_tests.log" || status=1
if grep -qE "[0-9]+ skipped" "$out/gpu_tests.log"; then  # a skip here means the GPU was not used
    echo "tests/test_cuda.py skipped tests" >&2
    status=1
fi
started=$(date +%s)
timeout $bench_timeout python3 -m pytest -q -p no:cacheprovider --benchmark --benchmark-json "$out/benchmark.json" \
    --ignore bench/test_qlora_bench.py 2>&1 | tee "$out/gpu_bench.log" || status=1
# The report of this run (written by the suite under bench/results/<device>-<time>/) and its GEMM paths table.
newest=$(ls -dt bench/results/$device-* 2>/dev/null | head -1)
if [ -n "$newest" ] && [ "$(stat -c %Y "$newest")" -ge "$started" ]; then
    [ "$newest" -ef "$out" ] || cp "$newest"/report.* "$out/"
    awk '/^## /{on = /^## GEMM paths/} on' "$newest/report.md" | tee "$out/gemm_paths.md"
    grep -E "^\| (GPU|CPU) .*(frozen|PEFT)" "$newest/report.md" | tee -a "$out/gemm_paths.md"
    grep -q "^| 4096→4096 | 8192 | 16 |" "$out/gemm_paths.md" || [ $dry_run = 1 ] || status=1
else
    echo "the benchmark suite wrote no report" >&2
    status=1
fi
# QLoRA, in a suite of its own so that its report does not replace the one above.
started=$(date +%s)
timeout $qlora_timeout python3 -m pytest -q -p no:cacheprovider -rs --benchmark --benchmark-json \
    "$out/benchmark_qlora.json" bench/test_qlora_bench.py 2>&1 | tee "$out/gpu_bench_qlora.log" || status=1
if grep -qE "[0-9]+ skipped" "$out/gpu_bench_qlora.log"; then  # bitsandbytes missing
    echo "bench/test_qlora_bench.py skipped benchmarks" >&2
    status=1
fi
newest=$(ls -dt bench/results/$device-* 2>/dev/null | head -1)
if [ -n "$newest" ] && [ "$(stat -c %Y "$newest")" -ge "$started" ]; then
    cp "$newest/report.md" "$out/report_qlora.md"
fi
echo "bench/gpu.sh$([ $dry_run = 1 ] && echo ' --dry-run'): exit status $status, results in $out"
exit $status
