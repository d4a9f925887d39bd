#!/usr/bin/env bash
# GPU tests and benchmarks on a machine with one CUDA GPU; `--dry-run` runs every step on a CPU machine.
#
# Needs: a Python with torch (CUDA build), triton, peft, transformers, tokenizers, pytest, pytest-benchmark
# and matplotlib, and bitsandbytes for the QLoRA benchmarks; lorafast is installed from this checkout. Runs the
# compiled kernels' tests (tests/test_cuda.py, both GEMM paths), then the benchmark suite (bench/), then its QLoRA
# part (LoRA and DoRA; bf16 compute, NF4 double quant: 4096→4096 and 4096→11008 layers at n=8192, r=16, and a
# 0.4B-class step), and writes logs, benchmark.json, benchmark_qlora.json, the reports and gemm_paths.md (the GEMM
# path auto chose per layer shape, both paths' timings, the ratios against a frozen nn.Linear and PEFT) to $OUT
# (default bench/results). Every step has its own timeout, set from the measured cold compile of the kernel variants
# it builds (see the note at the timeouts below): about 8 minutes in all on one H100 with a cold Triton cache, 9.5 at
# most.
#
# A preflight first names what Triton needs to compile and launch and is missing (a C compiler, Python.h, libcuda),
# before anything runs; `--preflight` runs only that. The run ends with a summary ($OUT/summary.md): each failed step, and every missed benchmark
# target (the report's "NO" rows). The exit status is non-zero only for failures; a missed target is reported, not
# failed, unless LORAFAST_BENCH_STRICT=1 makes targets assertions (then its benchmark fails).
#
# --dry-run: the same steps on CPU tensors, so that a GPU's first minute measures instead of crashing: the install
# is checked with `pip install --dry-run` (this checkout runs from PYTHONPATH, nothing is installed), the GPU test
# file runs with every kernel through Triton's interpreter (smaller shapes), and the benchmark suite runs the GPU
# plan at its smallest shapes, one round (LORAFAST_BENCH_DRY_RUN=1). About 2 to 3 minutes on 2 cores.
#
# The model benchmarks read SumPubMed from ../shared/sumpubmed, or from LORAFAST_SUMPUBMED.
set -uo pipefail
cd "$(dirname "$0")/.."
dry_run=0 preflight_only=0
case "${1:-}" in
    --dry-run) dry_run=1 ;;
    --preflight) preflight_only=1 ;;
    "") ;;
    *) echo "usage: bash bench/gpu.sh [--dry-run | --preflight]" >&2; exit 2 ;;
esac
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failures=()
fail() { failures+=("$1"); echo "FAILED: $1" >&2; }

# What Triton needs before its first launch: a C compiler and Python.h (it builds its launcher, driver.c), libcuda.
preflight() {
    local missing=()
    if [ -n "${CC:-}" ]; then
        command -v "$CC" >/dev/null || missing+=("the C compiler CC=$CC")
    elif ! command -v gcc >/dev/null && ! command -v clang >/dev/null; then
        missing+=("a C compiler (gcc or clang, or set CC)")
    fi
    python3 - <<'PY' || missing+=("Python.h (the Python development headers, e.g. apt install python3-dev)")
import os, sys, sysconfig
scheme = sysconfig.get_default_scheme()
scheme = "posix_prefix" if scheme == "posix_local" else scheme  # as Triton's build does
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths(scheme=scheme)["include"], "Python.h")) else 1)
PY
    if [ $dry_run = 0 ]; then
        python3 -c "from triton.backends.nvidia.driver import libcuda_dirs; libcuda_dirs()" >/dev/null 2>&1 ||
            missing+=("libcuda.so.1 (the NVIDIA driver library; run ldconfig, or set LD_LIBRARY_PATH)")
    fi
    [ ${#missing[@]} = 0 ] && { echo "preflight: C compiler, Python.h$([ $dry_run = 0 ] && echo ', libcuda') found"; return 0; }
    printf 'preflight: Triton cannot compile or launch kernels here: missing %s\n' "${missing[@]}" >&2
    return 1
}

if [ $preflight_only = 1 ]; then
    preflight
    exit
fi

# Timeouts. A cold Triton cache compiles every kernel variant a step launches, one after another, before it runs.
# Measured offline with bench/cold_compile.py (the launches of this script's dry run recorded, then every variant a GPU
# run builds compiled with triton.compile for sm_90 into an empty cache, one CPU core, 2026-12-07): tests/test_cuda.py
# 128 variants in 89 s, the benchmark suite 140 more in 80 s (all autotune configs the pruning keeps for a large
# layer: an upper bound), QLoRA 15 more in 11 s; 283 variants, 180 s, 0.3-2.1 s each. Each timeout is 1.5x its
# step's compile plus an allowance for the run itself on an H100 (not measured yet: the step times in the summary
# are the measurement to set them from): tests 134 + 66 s (torch.compile's own build included), benchmarks
# 120 + 130 s, QLoRA 17 + 103 s; 570 s at most, about 8 minutes expected. The dry run compiles nothing.
if [ $dry_run = 1 ]; then
    export TRITON_INTERPRET=1 LORAFAST_BACKEND=triton LORAFAST_BENCH_DRY_RUN=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    device=cpu tests_timeout=120 bench_timeout=210 qlora_timeout=240
    echo "dry run on $(nproc) CPU cores: no GPU" | tee "$out/gpu_machine.txt"
    install=(python3 -m pip install -q --dry-run --no-deps --no-build-isolation -e .)
    preflight || echo "preflight: (dry run: the interpreter needs none of it; a GPU run would stop here)" >&2
else
    export TRITON_INTERPRET=0
    device=cuda tests_timeout=200 bench_timeout=250 qlora_timeout=120
    preflight || exit 1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu_machine.txt"
    install=(python3 -m pip install -q --no-deps --no-build-isolation -e .)
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu_machine.txt"
"${install[@]}" || exit 1
step_times=()
timed() { step_times+=("$1: $(($(date +%s) - $2)) s of its ${3} s timeout"); }
started=$(date +%s)
timeout $tests_timeout python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$out/gpu_tests.log"
code=${PIPESTATUS[0]}
timed tests/test_cuda.py "$started" "$tests_timeout"
[ "$code" = 0 ] || fail "tests/test_cuda.py (exit $code; 124: over its ${tests_timeout}s timeout)"
if grep -qE "[0-9]+ skipped" "$out/gpu_tests.log"; then  # a skip here means the GPU was not used
    fail "tests/test_cuda.py skipped tests"
fi
started=$(date +%s)
timeout $bench_timeout python3 -m pytest -q -p no:cacheprovider --benchmark --benchmark-json "$out/benchmark.json" \
    --ignore bench/test_qlora_bench.py 2>&1 | tee "$out/gpu_bench.log"
code=${PIPESTATUS[0]}
timed "the benchmark suite" "$started" "$bench_timeout"
[ "$code" = 0 ] || fail "the benchmark suite (exit $code; 124: over its ${bench_timeout}s timeout)"
# The report of this run (written by the suite under bench/results/<device>-<time>/) and its GEMM paths table.
newest=$(ls -dt bench/results/$device-* 2>/dev/null | head -1)
if [ -n "$newest" ] && [ "$(stat -c %Y "$newest")" -ge "$started" ]; then
    [ "$newest" -ef "$out" ] || cp "$newest"/report.* "$out/"
    awk '/^## /{on = /^## GEMM paths/} on' "$newest/report.md" | tee "$out/gemm_paths.md"
    grep -E "^\| (GPU|CPU) .*(frozen|PEFT)" "$newest/report.md" | tee -a "$out/gemm_paths.md"
    grep -q "^| 4096→4096 | 8192 | 16 |" "$out/gemm_paths.md" || [ $dry_run = 1 ] ||
        fail "the GEMM paths table has no 4096→4096, n=8192, r=16 row"
else
    fail "the benchmark suite wrote no report"
fi
# QLoRA, in a suite of its own so that its report does not replace the one above.
started=$(date +%s)
timeout $qlora_timeout python3 -m pytest -q -p no:cacheprovider -rs --benchmark --benchmark-json \
    "$out/benchmark_qlora.json" bench/test_qlora_bench.py 2>&1 | tee "$out/gpu_bench_qlora.log"
code=${PIPESTATUS[0]}
timed bench/test_qlora_bench.py "$started" "$qlora_timeout"
[ "$code" = 0 ] || fail "bench/test_qlora_bench.py (exit $code; 124: over its ${qlora_timeout}s timeout)"
if grep -qE "[0-9]+ skipped" "$out/gpu_bench_qlora.log"; then  # bitsandbytes missing
    fail "bench/test_qlora_bench.py skipped benchmarks"
fi
newest=$(ls -dt bench/results/$device-* 2>/dev/null | head -1)
if [ -n "$newest" ] && [ "$(stat -c %Y "$newest")" -ge "$started" ]; then
    cp "$newest/report.md" "$out/report_qlora.md"
fi

# Summary: failures decide the exit status; missed targets are listed (the dry run's figures mean nothing).
missed=$(cat "$out/report.md" "$out/report_qlora.md" 2>/dev/null | grep -E '^\| .* \| NO \|$')
{
    echo "# bench/gpu.sh$([ $dry_run = 1 ] && echo ' --dry-run') summary"
    echo
    echo "## Step times"
    for t in "${step_times[@]}"; do echo "- $t"; done
    echo
    echo "## Failures (${#failures[@]})"
    for f in "${failures[@]}"; do echo "- $f"; done
    echo
    echo "## Missed targets ($(printf '%s' "$missed" | grep -c .))$([ $dry_run = 1 ] && echo ' (dry run: meaningless)')"
    [ -n "$missed" ] && { echo "| target | measured | limit | met |"; echo "|---|---|---|---|"; echo "$missed"; }
} | tee "$out/summary.md"
status=$([ ${#failures[@]} = 0 ] && echo 0 || echo 1)
echo "bench/gpu.sh$([ $dry_run = 1 ] && echo ' --dry-run'): exit status $status, results in $out"
exit $status
