#!/bin/bash
# Every GPU check of this project in one device run, sized for a session's 15 minutes of device time (start-up
# included): the Pallas splat kernel against the XLA path and its benchmark (benchmarks/splat_gpu_check.sh), then
# the train step and encode throughput of the CIFAR and ImageNet configs in bfloat16 against a bfloat16 matmul
# (benchmarks/train_step_bench.py). Each part runs under its own timeout, so a slow part leaves the others their
# time, and the whole stays inside one call's 10 minutes.
#
#   bash benchmarks/gpu_wheels.sh                        # on the CPU machine, once: the missing packages, .whl/
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)     # the device tool
#
# The log goes to $OUT/gpu_session.log (it comes back) and to the terminal. Without .whl/ the install is
# skipped (a machine that has the packages). The LPIPS weights cannot be fetched there (no network), so the
# benchmark times LPIPS with random VGG16 weights of the same shapes and says so.
set -u
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp}/gpu_session.log
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --target .gpu_site .whl/*.whl
  export PYTHONPATH=.gpu_site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  timeout 240 bash benchmarks/splat_gpu_check.sh; echo "splat check: exit $?"
  timeout 150 $PY benchmarks/train_step_bench.py --config=configs/cifar10.py --batch_size=64 \
    --config.model.conv_dtype=bfloat16 --noparts; echo "CIFAR bench: exit $?"
  timeout 180 $PY benchmarks/train_step_bench.py --config=configs/imagenet.py --batch_size=16 \
    --encode_batch_size=16 --config.model.conv_dtype=bfloat16 --noparts; echo "ImageNet bench: exit $?"
} 2>&1 | tee "$LOG"
