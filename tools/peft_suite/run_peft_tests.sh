#!/usr/bin/env bash
# Run PEFT's own LoRA tests twice, without and with lorafast.patch_peft on every model PEFT builds or loads, and
# compare the two runs case for case (exit 1 if a case passing without lorafast fails with it).
#
#   tools/peft_suite/run_peft_tests.sh /path/to/peft-checkout [pytest args]
#
# The checkout is PEFT's source at the tag of the installed peft (its tests/ folder is what runs), e.g.
#   git clone --depth 1 --branch v$(python -c "import peft; print(peft.__version__)") \
#       https://github.com/huggingface/peft /tmp/peft-src
# Default pytest args: the LoRA cases (--lora-only) of tests/test_custom_models.py. Cases that need the Hugging
# Face hub are skipped in both runs (HF_HUB_OFFLINE=1 unless set otherwise; --tiny-hub-models builds PEFT's tiny
# random hub models locally instead).
# PEFT's own pytest options are dropped: its coverage addopts (pytest-cov is not needed here) and its filter that makes
# transformers' deprecation warnings errors (a transformers newer than the tests warns on PEFT's own calls, failing
# both runs alike).
# Reports: $OUT_DIR (default /tmp/lorafast-peft-suite)/{unpatched,patched}.{xml,log}.
set -euo pipefail
peft_src=${1:?usage: run_peft_tests.sh PEFT_CHECKOUT [pytest args]}
shift
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${OUT_DIR:-/tmp/lorafast-peft-suite}
mkdir -p "$out"
args=("$@")
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
[ ${#args[@]} -eq 0 ] && args=(tests/test_custom_models.py --lora-only)
cd "$peft_src"
for mode in unpatched patched; do
  patch=$([ "$mode" = patched ] && echo 1 || echo 0)
  rm -f "$out/$mode.xml"  # a run that cannot start must not be compared through an earlier report
  LORAFAST_PEFT_PATCH=$patch PYTHONPATH="$repo:$here${PYTHONPATH:+:$PYTHONPATH}" \
    python -m pytest -o addopts="" -o filterwarnings="ignore::FutureWarning:transformers" -p lorafast_peft_plugin -p no:cacheprovider -q -rs "${args[@]}" \
    --junitxml="$out/$mode.xml" >"$out/$mode.log" 2>&1 || true
  tail -n 2 "$out/$mode.log"
done
python "$here/compare.py" "$out/unpatched.xml" "$out/patched.xml"
