#!/bin/bash
# The GPU check of issue 9 in one run, most wanted first: versions and kernel-vs-XLA correctness, the kernel
# variants beside the XLA path, the benchmark table, the test file's compiled-kernel classes, then Nsight
# Compute's view of the default tile, the scalar loops and the culled tiles (where ncu is installed). Run from the repository root
# on a GPU machine:
#   PYTHONUNBUFFERED=1 bash benchmarks/splat_gpu_check.sh 2>&1 | tee LOG
set -u
PY=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
$PY benchmarks/splat_gpu_check.py check; check=$?
$PY benchmarks/splat_gpu_check.py sweep; sweep=$?
$PY benchmarks/splat_bench.py; bench=$?
# The compiled-kernel classes only (the lowering tests are the CPU suite's); tests/conftest.py pins the suite to
# the CPU unless JAX_PLATFORMS says otherwise.
JAX_PLATFORMS=cuda,cpu $PY -m pytest tests/test_pallas_splat.py -q -k "TestSplat and not Interpret" \
  -p no:cacheprovider; tests=$?
if command -v ncu > /dev/null; then  # 6 kernels: the forward and backward of three variants
  timeout 150 ncu --target-processes all --clock-control none -k regex:splat -c 6 --section SpeedOfLight \
    --section LaunchStats --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
    $PY benchmarks/splat_gpu_check.py profile
  echo "ncu: exit $?"
fi
echo "exit codes: check $check, sweep $sweep, bench $bench, tests $tests"
exit $((check || sweep || bench || tests))
