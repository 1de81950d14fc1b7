#!/usr/bin/env bash
# One call on a GPU machine: build the extension, run the tests (GPU tests included, Triton on
# CUDA tensors), run the benchmark suite, and put logs and results into one folder.
#
#   bash benchmarks/gpu_run.sh "$OUT"          # the device tool's output folder
#
# It installs nothing from the network (the device machines have none): torch, triton,
# matplotlib, tqdm, pytest and pytest-benchmark must already be there, as they are in the
# device image (see the device tool's KINDS.md).
set -uo pipefail
out="${1:-${OUT:?usage: bash benchmarks/gpu_run.sh OUTPUT_DIR}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$out/device.txt" 2>&1
# The CUDA kernels for Hopper (the lent machines are H100/H200); MAX_JOBS: the three .cu files.
export LLACA_CUDA_ARCH="${LLACA_CUDA_ARCH:-9.0}" MAX_JOBS="${MAX_JOBS:-8}"
python3 -m pip install --no-deps --no-build-isolation --no-index -v -e . > "$out/build.log" 2>&1 \
  || echo "extension build failed: the tests below say which backends remain" >> "$out/build.log"
python3 -c "import llaca_optim; print(llaca_optim.backend_status())" >> "$out/device.txt" 2>&1
# The CUDA backend first (the parity, determinism, AMP and graph tests on the GPU), then
# everything; -x would stop the rest at the first failure, so the logs are separate.
# test_sharded.py adds its GPU jobs there: one rank over NCCL, the real kernels' sharded mode.
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_backend.py tests/test_cuda_gpu.py \
  tests/test_deferred_blend.py tests/test_sharded.py 2>&1 \
  | tail -n 150 > "$out/tests_cuda.log"
# Out-of-bounds accesses and races show nothing in the results; compute-sanitizer finds them
# (a few small cases: it slows kernels down a hundredfold).
timeout 300 compute-sanitizer --tool memcheck --print-limit 20 python3 -m pytest -q -p no:cacheprovider \
  tests/test_cuda_backend.py tests/test_deferred_blend.py \
  -k "(same_bits or reusing or nonfinite or really_deferred) and not triton" 2>&1 | tail -n 60 > "$out/memcheck.log"
python3 -m pytest -q -p no:cacheprovider 2>&1 | tail -n 200 > "$out/tests.log"
python3 -m benchmarks --no-progress --out "$out/bench" 2>&1 | grep -v USDT | tail -n 200 > "$out/bench.log"
ls -R "$out"
