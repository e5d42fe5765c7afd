#!/bin/bash
# The GPU checks of this project, in parts sized for a session's 15 minutes of device time (start-up included):
#   splat     the Pallas splat kernel against the XLA path, its benchmark, 16 kernel variants and an Nsight
#             Compute profile (splat_gpu_check.sh); on an H200, 136 s with 9 variants and no profile, and more
#             than 330 s with 12 and a profile of 4 kernels (its timeout cut that profile)
#   cifar     the CIFAR train step and encode throughput in bfloat16 against a bfloat16 matmul
#             (train_step_bench.py); 262 s there, 131 s of it compiling the step with and without LPIPS
#   imagenet  the same for the ImageNet config at batch 16, without the LPIPS variant (--nolpips: one step
#             program to compile, not two) and without XLA's Triton GEMM fusions, whose autotuning lengthens
#             GPU compiles (the dots go to cuBLAS); did not finish compiling in 180 s there with both step
#             programs and the fusions, so it is left out of `all` (splat, then cifar) and wants a call of its own
# Each part runs under its own timeout, so a slow part leaves the others their time.
#
#   bash benchmarks/gpu_wheels.sh                        # on the CPU machine, once: the missing packages, .whl/
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)     # the device tool
#   run(command="bash benchmarks/gpu_session.sh splat", ...)       # one part: look at it before the next
#
# The log goes to $OUT/gpu_session_PART.log (it comes back) and to the terminal. Without .whl/ the install is
# skipped (a machine that has the packages). The LPIPS weights cannot be fetched there (no network), so the
# benchmark times LPIPS with random VGG16 weights of the same shapes and says so.
set -u
PART=${1:-all}
case $PART in
  all|splat|cifar|imagenet) ;;
  *) echo "usage: $0 [all|splat|cifar|imagenet], got '$PART'" >&2; exit 2;;
esac
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp}/gpu_session_$PART.log
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --upgrade --target .gpu_site .whl/*.whl
  export PYTHONPATH=.gpu_site:$PYTHONPATH
fi
run_part() { [ "$PART" = all ] && [ "$1" != imagenet ] || [ "$PART" = "$1" ]; }
{
  if run_part splat; then timeout 400 bash benchmarks/splat_gpu_check.sh; echo "splat check: exit $?"; fi
  if run_part cifar; then
    timeout 300 $PY benchmarks/train_step_bench.py --config=configs/cifar10.py --batch_size=64 \
      --config.model.conv_dtype=bfloat16 --noparts --steps=6 --rounds=3; echo "CIFAR bench: exit $?"
  fi
  if run_part imagenet; then
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" timeout 500 $PY benchmarks/train_step_bench.py --config=configs/imagenet.py --batch_size=16 \
      --encode_batch_size=16 --config.model.conv_dtype=bfloat16 --noparts --nolpips --steps=4 --rounds=3
    echo "ImageNet bench: exit $?"
  fi
} 2>&1 | grep --line-buffered -v -E "^(I|W)[0-9]{4} .*(weights.py:[0-9]+\] pip:|cuda_timer.cc)" | tee "$LOG"
