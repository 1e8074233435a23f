#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call: build the CUDA extension, run the whole
# test suite on the GPU, run compute-sanitizer on the CUDA backend, run the benchmarks.
# Logs go to $OUT/gpu_check.log, benchmark JSON to $OUT/<bench>.json (the device tool brings
# back at most 8 files). Steps can be chosen: `bash scripts/gpu_check.sh build tests bench`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
steps=${*:-build tests sanitize bench}
status=0

section() { echo -e "\n===== $* ($(date +%T))" | tee -a "$LOG"; }
run() { "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || status=$rc; return "$rc"; }

section env
run nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
run python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name())"

for step in $steps; do
  case $step in
    build)
      section "build (pip install -e . --no-build-isolation)"
      AMVL_FORCE_CUDA_BUILD=1 AMVL_CUDA_ARCHS=90 run python3 -m pip install --no-build-isolation --no-deps -e .
      run python3 -c "import amvl_kernels as ak; print('cuda extension:', ak.cuda_extension_available())"
      ;;
    tests)
      section "tests on the GPU"
      run python3 -m pytest -q -p no:cacheprovider tests/
      ;;
    sanitize)
      section "compute-sanitizer on the CUDA backend"
      for tool in memcheck racecheck; do
        run compute-sanitizer --tool "$tool" --error-exitcode 1 python3 scripts/sanitize_gaussian_kl.py
      done
      ;;
    bench)
      section "benchmarks"
      AMVL_BENCH_OUT="$OUT" run python3 -m pytest -q -p no:cacheprovider benchmarks/ --benchmark \
        --benchmark-columns=median,rounds
      ;;
    *) echo "unknown step $step" | tee -a "$LOG"; status=2 ;;
  esac
done
section "done, status $status"
exit "$status"
