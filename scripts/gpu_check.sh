#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call: build the CUDA extension, run the tests on
# the GPU, run compute-sanitizer on the CUDA backend, run the benchmarks, sweep tile sizes.
#   bash scripts/gpu_check.sh [build] [tests] [sanitize] [bench] [tune] [counters] [sweep]
#                             [profile]
#   (default: build tests sanitize bench; "tune" runs scripts/tune_latent_attention.py,
#   "counters" ncu on the Gaussian kernels, "sweep" scripts/sweep_cuda_gaussian.py,
#   "profile" scripts/profile_model_step.py with its device-idle report)
# Each step runs under its own time limit so one slow step cannot eat the lease:
#   AMVL_GPU_TESTS   pytest targets for "tests"      (default: tests/)
#   AMVL_GPU_BENCH   pytest targets for "bench"      (default: benchmarks/)
#   AMVL_GPU_BENCH_SELECT  a pytest -k expression for "bench" (default: every case)
#   AMVL_GPU_PROFILE_ARGS  arguments of profile_model_step.py for "profile"
#   AMVL_GPU_LIMIT_<STEP>  seconds for that step     (defaults below)
#   AMVL_GPU_SKIP_ENV=1    skip the versions section (for a second invocation in one call)
# Logs go to $OUT/gpu_check.log; benchmark rows stream to $OUT/rows.jsonl as they are measured
# and the per-benchmark JSON lands in $OUT at the end (the device tool brings back 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
steps=${*:-build tests sanitize bench}
status=0

section() { echo -e "\n===== $* ($(date +%T))" | tee -a "$LOG"; }
run() {  # run LIMIT CMD...: the command's output to the log, its failure to $status
  local limit=$1; shift
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "!!! timed out after ${limit}s: $*" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=$rc
  return "$rc"
}
xdist=""
python3 -c "import xdist" 2>/dev/null && xdist="-n 8"

if [ "${AMVL_GPU_SKIP_ENV:-0}" != 1 ]; then
  section env
  run 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  run 60 python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name())"
fi

for step in $steps; do
  case $step in
    build)
      section "build (pip install -e . --no-build-isolation)"
      AMVL_FORCE_CUDA_BUILD=1 AMVL_CUDA_ARCHS=90 run "${AMVL_GPU_LIMIT_BUILD:-240}" \
        python3 -m pip install --no-build-isolation --no-deps --no-index -e .
      run 60 python3 -c "import amvl_kernels as ak; print('cuda extension:', ak.cuda_extension_available())"
      ;;
    tests)
      section "tests on the GPU"
      # shellcheck disable=SC2086
      run "${AMVL_GPU_LIMIT_TESTS:-300}" python3 -m pytest -q -p no:cacheprovider $xdist \
        -rfE ${AMVL_GPU_TESTS:-tests/}
      ;;
    sanitize)
      section "compute-sanitizer on the CUDA backend"
      run "${AMVL_GPU_LIMIT_SANITIZE:-120}" compute-sanitizer --tool memcheck --error-exitcode 1 \
        python3 scripts/sanitize_gaussian_kl.py
      run "${AMVL_GPU_LIMIT_SANITIZE:-120}" compute-sanitizer --tool racecheck --error-exitcode 1 \
        python3 scripts/sanitize_gaussian_kl.py --quick
      ;;
    counters)
      # Nsight Compute on the Gaussian kernels of both backends at 4096 x 4096 bf16: how close
      # each is to the memory and issue ceilings, occupancy, stall reasons.
      section "hardware counters of the Gaussian kernels (ncu)"
      run "${AMVL_GPU_LIMIT_COUNTERS:-90}" ncu --clock-control none --target-processes all \
        --kernel-name regex:"gaussian_kl|forward_kernel|backward_kernel" --launch-count 8 \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section InstructionStats \
        python3 scripts/sweep_cuda_gaussian.py --once
      ;;
    sweep)
      section "CUDA backend launch shapes, side by side with Triton"
      run "${AMVL_GPU_LIMIT_SWEEP:-120}" python3 scripts/sweep_cuda_gaussian.py \
        --json "$OUT/sweep_cuda_gaussian.json"
      ;;
    bench)
      section "benchmarks"
      # shellcheck disable=SC2086
      AMVL_BENCH_OUT="$OUT" run "${AMVL_GPU_LIMIT_BENCH:-300}" python3 -m pytest -q \
        -p no:cacheprovider ${AMVL_GPU_BENCH:-benchmarks/} --benchmark \
        --benchmark-columns=median,rounds ${AMVL_GPU_BENCH_SELECT:+-k "$AMVL_GPU_BENCH_SELECT"}
      ;;
    profile)
      section "training-step profile, with where the device idled"
      # shellcheck disable=SC2086
      run "${AMVL_GPU_LIMIT_PROFILE:-150}" python3 scripts/profile_model_step.py \
        ${AMVL_GPU_PROFILE_ARGS:---model 7b-proxy --providers plain,shared_amvl --gaps 12} \
        --json "$OUT/profile.json"
      ;;
    tune)
      section "attention tile sweep"
      run "${AMVL_GPU_LIMIT_TUNE:-240}" python3 scripts/tune_latent_attention.py \
        --json "$OUT/tune.json"
      ;;
    *) echo "unknown step $step" | tee -a "$LOG"; status=2 ;;
  esac
done
section "done, status $status"
exit "$status"
