#!/usr/bin/env bash
# One call on a GPU machine: build the extension, run the GPU tests, the benchmarks, a memory
# checker and the rest of the suite, each stage inside a share of one fixed time budget, and leave
# the logs and results in one folder.
#
#   bash benchmarks/gpu_run.sh "$OUT"
#
# NOTE [fitting the lease]: GPU machines are often had for a short, fixed slot, start-up
# included. So the script keeps to LLACA_GPU_BUDGET_S seconds (default 480) whatever happens: every stage runs under `timeout` with
# the smaller of its own cap and what is left, the most valuable evidence comes first (the build,
# then the CUDA and Triton kernels against the reference on the GPU, then the docs/spec.md section 5
# figures, then the Triton block/warps timings, then memcheck, then everything else), and a stage
# that did not fit says so in summary.txt instead of eating the next one's time. The benchmarks
# write their JSON after every measurement, so a stage cut short still returns what it measured.
# It writes exactly the 8 files below, flat in the folder, so that little has to be copied back. The table, CSV and plots are redrawn from the JSON: `python -m benchmarks --replot DIR`.
#
#   summary.txt        device, versions, backend status, each stage's exit code and seconds,
#                      and the closing lines of each stage (also printed last, for the reply)
#   build.log          pip's build of the extension (nvcc for LLACA_CUDA_ARCH, default 9.0)
#   tests_gpu.log      the CUDA and Triton kernels on the GPU: parity, graphs, AMP, sharded
#   results.json       python -m benchmarks (full GPU sizes), with the rows left out if any
#   triton_tune.json   python -m benchmarks.triton_tune: Triton's block size x warps, timed
#   bench.log          the output of both
#   memcheck.log       compute-sanitizer memcheck over a few small CUDA cases
#   tests_rest.log     the rest of the suite
#
# It installs nothing from the network (GPU machines often have none): torch, triton,
# matplotlib, tqdm, pytest and pytest-benchmark must already be installed there. LLACA_GPU_SKIP_BUILD=1 uses the llaca_optim already
# importable (tests/toolchain/test_gpu_script.py runs the script that way, on a CPU, with a tiny budget).
set -uo pipefail
out="${1:-${OUT:?usage: bash benchmarks/gpu_run.sh OUTPUT_DIR}}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
budget="${LLACA_GPU_BUDGET_S:-480}"
deadline=$((SECONDS + budget))
summary="$out/summary.txt"
scratch="$(mktemp -d)"
: > "$summary"

# stage NAME CAP_S LOG COMMAND...: runs COMMAND under the smaller of CAP_S and the time left,
# output into LOG, and records the exit code and seconds (124: cut by the time limit).
# limit_for CAP_S: the smaller of CAP_S and the seconds left in the budget.
limit_for() {
  local left=$((deadline - SECONDS))
  echo $(($1 < left ? $1 : left))
}

stage() {
  local name=$1 cap=$2 log=$3
  shift 3
  local limit
  limit=$(limit_for "$cap")
  if ((limit < 5)); then
    echo "stage $name: not run, the budget of ${budget} s is spent" | tee -a "$log" >> "$summary"
    return 0
  fi
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "stage $name: rc=$rc in $((SECONDS - t0)) s (limit ${limit} s)$( ((rc == 124)) && echo ', cut by the limit')" >> "$summary"
  return 0
}

# The closing lines of a log in the summary, which is printed last: what a reader sees first.
tail_into_summary() {
  { echo "--- $1 (last $2 lines)"; tail -n "$2" "$out/$1" 2>/dev/null; echo; } >> "$summary"
}

{
  echo "gpu_run.sh, budget ${budget} s, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 || true
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" 2>&1
} >> "$summary"

# The CUDA kernels for Hopper (H100/H200) by default; MAX_JOBS: the three .cu files
# and the host sources build side by side.
export LLACA_CUDA_ARCH="${LLACA_CUDA_ARCH:-9.0}" MAX_JOBS="${MAX_JOBS:-8}"
if [[ "${LLACA_GPU_SKIP_BUILD:-0}" == 1 ]]; then
  echo "LLACA_GPU_SKIP_BUILD=1: using the llaca_optim already installed" > "$out/build.log"
else
  stage build 240 "$out/build.log" \
    python3 -m pip install --no-deps --no-build-isolation --no-index -v -e .
fi
# A failed build must not be retried on first use by every later process, outside any stage's
# time limit: what did not build stays unavailable, and the stages say so.
export LLACA_NO_JIT=1
python3 -c "import llaca_optim; [print(k, ok, why) for k, (ok, why) in llaca_optim.backend_status().items()]" >> "$summary" 2>&1

# The kernels on the GPU against the reference, graph capture and replay, GradScaler, deferred
# blends, a tensor past 2^31 elements, and the sharded GPU jobs (one rank over NCCL, the real
# kernels' sums-out mode).
# `-k "cuda or triton or gpu"` keeps test_parity.py to the GPU backends' cases.
pytest_q=(python3 -m pytest -q -p no:cacheprovider)
# pytest keeps this order of files: the docs/spec.md section 3 cases first, should the stage be cut.
stage tests_gpu 170 "$out/tests_gpu.log" "${pytest_q[@]}" \
  tests/backends/test_parity.py tests/backends/test_cuda_backend.py tests/backends/test_cuda_gpu.py \
  tests/backends/test_deferred_blend.py tests/backends/test_large_tensors.py tests/optim/test_sharded.py \
  -k "cuda or triton or gpu"

# docs/spec.md section 5: every workload at GPU size, fp32 and bf16; the sweeps get what time is left.
# --time-limit leaves the measurement under way 45 s to finish inside the stage's limit.
bench_limit=$(limit_for 170)
stage bench 170 "$out/bench.log" python3 -m benchmarks --no-progress --out "$scratch/bench" \
  --time-limit $((bench_limit > 60 ? bench_limit - 45 : bench_limit / 2))
[[ -f "$scratch/bench/results.json" ]] && cp "$scratch/bench/results.json" "$out/results.json"

# Triton's block size and warps per program, chosen by measurement (set by hand after).
stage triton_tune 90 "$out/bench.log" python3 -m benchmarks.triton_tune \
  --out "$out/triton_tune.json" --time-limit 45

# Out-of-bounds accesses and races show nothing in the results; compute-sanitizer finds them
# (a few small cases: it slows kernels down a hundredfold).
if command -v compute-sanitizer > /dev/null; then
  stage memcheck 60 "$out/memcheck.log" compute-sanitizer --tool memcheck --print-limit 20 \
    "${pytest_q[@]}" tests/backends/test_cuda_backend.py tests/backends/test_deferred_blend.py \
    -k "(same_bits or reusing or nonfinite or really_deferred) and not triton"
else
  echo "stage memcheck: not run, compute-sanitizer is not on this machine" \
    | tee "$out/memcheck.log" >> "$summary"
fi

# Everything else, whatever time is left (on a CPU machine this is most of the suite), less the
# sanitizer rerun: CPU-only, minutes long, and run by CI.
stage tests_rest 9999 "$out/tests_rest.log" "${pytest_q[@]}" \
  --ignore tests/toolchain/test_gpu_script.py --ignore tests/toolchain/test_sanitizers.py \
  --ignore tests/backends/test_cuda_gpu.py --ignore tests/backends/test_cuda_backend.py \
  --ignore tests/backends/test_deferred_blend.py --ignore tests/optim/test_sharded.py \
  --ignore tests/backends/test_large_tensors.py

# The reply shows the end of the output: the least telling first, the GPU tests last.
tail_into_summary build.log 5
tail_into_summary memcheck.log 8
tail_into_summary tests_rest.log 15
if [[ -f "$out/results.json" ]]; then
  { echo "--- results.json, in brief"; python3 -m benchmarks --brief "$out" 2>&1; } >> "$summary"
fi
tail_into_summary tests_gpu.log 30
rm -rf "$scratch"
echo "gpu_run.sh: $SECONDS s in all" >> "$summary"
cat "$summary"
