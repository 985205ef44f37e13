#!/usr/bin/env bash
# The GPU checks, for a lent GPU machine (the `device` tool) or any CUDA machine with PyTorch:
# the GPU tests of tests/test_cuda.py, then benchmarks/bench_gpu.py (elu1, softmax, clipped and rpe; GPU_KERNELS). Results
# go to ${OUT:-benchmarks/results}. Python packages the machine lacks (apache-tvm, apache-tvm-ffi,
# lark) are installed from wheels in .whl*/ folders (see tools/GPU.md) into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out="${OUT:-$PWD/benchmarks/results}"
mkdir -p "$out"
if ls .whl*/*.part* >/dev/null 2>&1; then          # a wheel carried in parts (over a call's limit)
    for base in $(ls .whl*/*.part* | sed 's/\.part.*//' | sort -u); do
        cat "$base".part* > "/tmp/$(basename "$base")"
    done
fi
wheels=$(ls .whl*/*.whl /tmp/*.whl 2>/dev/null)
# attndsl itself, built from this tree (pyproject.toml maps lowering/, schedules/, grammar/ into it)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
    --upgrade --target /tmp/site $wheels . || exit 1
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
repo="$PWD"
cd /tmp                                            # import the installed attndsl, not ./attndsl
python3 - <<'PY' || exit 1
import sys, torch, tvm, attndsl
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA GPU here")
print("torch", torch.__version__, torch.cuda.get_device_name(), "| tvm", tvm.__version__,
      "| TVM's CUDA runtime:", tvm.runtime.enabled("cuda"), "| attndsl from", attndsl.__file__)
PY
status=0
python3 -m pytest -q -p no:cacheprovider --rootdir "$repo" "$repo/tests/test_cuda.py" -k "gpu or run_for_cuda" \
    2>&1 | tee "$out/gpu_tests.log" || status=1
for kernel in ${GPU_KERNELS:-elu1 softmax clipped rpe}; do
    python3 "$repo/benchmarks/bench_gpu.py" --kernel "$kernel" --lengths "${GPU_LENGTHS:-1024,4096,16384}" \
        2>&1 | tee "$out/bench_gpu_$kernel.log" || status=1
    cp "$repo"/benchmarks/results/bench_gpu_"$kernel".* "$out"/ 2>/dev/null
done
exit $status
