#!/usr/bin/env bash
# Everything a lent GPU is for, in one script: build the extension there, run the CUDA tests, run
# a subset of them under compute-sanitizer (memcheck, racecheck), run the benchmark. Logs and
# results go to $OUT, at most 8 files (what the device tool brings back):
#   report.md build.log cuda_tests.txt memcheck.txt racecheck.txt + the benchmark's JSON/MD/PNG
# Commit report.md and the benchmark files under bench/results/ afterwards.
#
# Usage, from the repository root on the GPU machine (stages run in the order given; each call of
# the device tool may run at most 10 minutes, so split them over calls on a warm machine):
#   bench/gpu_session.sh build test sanitize     # then, in a second call:
#   bench/gpu_session.sh bench
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-$REPO/bench/results/gpu_session}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
REPORT="$OUT/report.md"
status=0

note() { echo "$*" | tee -a "$REPORT"; }

# pytest outside the source tree, so the installed package is imported, not the source one.
run_tests() {
  local dir
  dir=$(mktemp -d)
  ln -s "$REPO/tests" "$dir/tests"
  (cd "$dir" && "$@")
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(build test sanitize bench)
for stage in "${stages[@]}"; do
  case "$stage" in
    build)
      {
        echo "# GPU session $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null)"
        echo '```'
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        "$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
        echo '```'
      } >> "$REPORT"
      TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
        "$PYTHON" -m pip install -v --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 \
        || { note "build: FAILED (see build.log)"; tail -40 "$OUT/build.log"; exit 1; }
      spills=$(grep -cE "[1-9][0-9]* bytes spill" "$OUT/build.log")
      note "build: ok; kernels with register spills: $spills"
      (cd / && "$PYTHON" -m partialconv_cuda.info) | sed 's/^/    /' >> "$REPORT"
      ;;
    test)
      run_tests "$PYTHON" -m pytest tests -m cuda -q -rfEs -p no:cacheprovider > "$OUT/cuda_tests.txt" 2>&1 || status=1
      note "CUDA tests (pytest tests -m cuda): $(tail -1 "$OUT/cuda_tests.txt")"
      ;;
    sanitize)
      # A subset small enough for the sanitizers' slowdown, still covering every kernel of ours: on
      # the fused path (the vendor path adds cuDNN and ATen's kernels, and our mask_scales_kernel,
      # which the fused path runs too).
      subset=(tests/test_forward.py::test_layouts_give_the_same_numbers
              tests/test_forward.py::test_nan_and_inf_in_holes_contribute_nothing
              tests/test_forward.py::test_empty_batch
              tests/test_backward.py::test_gradients_match_reference_autograd
              tests/test_backward.py::test_mask_gets_no_gradient_and_holes_get_zero)
      for tool in memcheck racecheck; do
        run_tests compute-sanitizer --tool "$tool" --error-exitcode 1 \
          "$PYTHON" -m pytest "${subset[@]}" -m cuda -k cuda-fused -q -p no:cacheprovider > "$OUT/$tool.txt" 2>&1 || status=1
        note "compute-sanitizer $tool: $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/$tool.txt" | tail -2 | tr '\n' ' ')"
      done
      ;;
    bench)
      "$PYTHON" -m bench --out "$OUT" 2>&1 | tail -60 || status=1
      note "benchmark: written to $OUT (python -m bench --out \$OUT)"
      ;;
    *)
      echo "unknown stage $stage (build, test, sanitize, bench)"; exit 2 ;;
  esac
done
exit $status
