#!/bin/bash
# The GPU check of issue 9 in one run: versions and kernel-vs-XLA correctness, the benchmark table, then the
# test file's compiled-kernel classes and lowering tests. Run from the repository root on a GPU machine:
#   PYTHONUNBUFFERED=1 bash benchmarks/splat_gpu_check.sh 2>&1 | tee LOG
set -u
PY=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
$PY benchmarks/splat_gpu_check.py; check=$?
$PY benchmarks/splat_bench.py; bench=$?
# The compiled-kernel classes only (the lowering tests are the CPU suite's); tests/conftest.py pins the suite to
# the CPU unless JAX_PLATFORMS says otherwise.
JAX_PLATFORMS=cuda,cpu $PY -m pytest tests/test_pallas_splat.py -q -k "TestSplat and not Interpret" \
  -p no:cacheprovider; tests=$?
echo "exit codes: check $check, bench $bench, tests $tests"
exit $((check || bench || tests))
