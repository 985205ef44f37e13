#!/usr/bin/env bash
# The GPU checks in one call, on a machine with a CUDA GPU and PyTorch, from the runtime-only
# bundle that `make gpu-bundle` builds on any machine (${BUNDLE:-build/gpu-bundle}, ≤ 16 MiB):
#   1. the preflight (tools/gpu_preflight.py): stops here, saying why, without a usable GPU
#   2. the GPU tests of tests/test_cuda.py, ${GPU_TEST_JOBS:-4} pytest workers
#   3. benchmarks/bench_gpu.py at N = ${GPU_LENGTHS:-4096} for ${GPU_KERNELS:-softmax elu1 clipped}
# Nothing is compiled by TVM there: every library loads from the bundle. Logs and tables go to
# ${OUT:-benchmarks/results}. Exit status: 0 all passed, 1 a test or benchmark failed, 2 stopped.
# ${PYTHON:-python3}: the Python that has torch.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$repo/benchmarks/results}"
bundle="${BUNDLE:-$repo/build/gpu-bundle}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if [ ! -f "$bundle/env.sh" ]; then
    echo "gpu_check: no bundle at $bundle: run 'make gpu-bundle' first (and carry build/gpu-bundle)"
    exit 2
fi
t0=$(date +%s)
# shellcheck source=/dev/null
source "$bundle/env.sh" || exit 2
cd /tmp                                            # attndsl from the bundle, not ./attndsl
"$py" "$repo/tools/gpu_preflight.py" 2>&1 | tee "$out/gpu_preflight.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2
status=0
"$py" -m pytest -q -p no:cacheprovider -n "${GPU_TEST_JOBS:-4}" --rootdir "$repo" "$repo/tests/test_cuda.py" \
    -k "test_gpu_ or test_run_for_cuda_checks" 2>&1 | tee "$out/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
for kernel in ${GPU_KERNELS:-softmax elu1 clipped}; do
    "$py" "$repo/benchmarks/bench_gpu.py" --kernel "$kernel" --lengths "${GPU_LENGTHS:-4096}" \
        2>&1 | tee "$out/bench_gpu_$kernel.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    cp "$repo"/benchmarks/results/bench_gpu_"$kernel".* "$out"/ 2>/dev/null
done
echo "gpu_check: done in $(( $(date +%s) - t0 )) s, status $status"
exit $status
