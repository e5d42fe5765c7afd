#!/bin/bash
# The GPU checks of this project, in parts, each one device-tool call (a session has 15 minutes of device time,
# start-up included, and a call at most 10; a machine starts in about 30 s):
#   splat     the Pallas splat kernel against the XLA path, 15 kernel variants, the benchmark table, the
#             compiled-kernel tests and an Nsight Compute profile of 6 kernels (splat_gpu_check.sh); on an H200,
#             136 s with 9 variants and no profile, and more than 330 s with 12 variants and a profile of 4
#             kernels (its timeout then cut the profile); give the call timeout_s=500
#   cifar     the CIFAR train step and encode throughput in bfloat16 against a bfloat16 matmul
#             (train_step_bench.py); 262 s there, 131 s of it compiling the step with and without LPIPS
#   imagenet  the same for the ImageNet config at batch $BATCH (default 16), without the LPIPS variant
#             (--nolpips: one step program to compile, not two) and without XLA's Triton GEMM fusions, whose
#             autotuning lengthens GPU compiles (the dots go to cuBLAS); 256 s there at batch 16 (2026-12-04),
#             127 s of it compiling the step
# Each part runs under its own timeout, so that what it printed comes back.
#
#   bash benchmarks/gpu_wheels.sh              # on the CPU machine, once: the missing packages, into .whl/
#   BATCH=32 bash benchmarks/gpu_session.sh imagenet --config.model.remat_norms=false   # flags after the part
#                                              # go to the train-step parts' train_step_bench.py
#   run(command="bash benchmarks/gpu_session.sh splat", carry=[".whl"], timeout_s=500)   # the device tool
#
# The log goes to $OUT/gpu_session_PART.log (it comes back) and to the terminal. The train-step parts also trace
# two steps and print where their device time went (trace_summary.py); the trace comes back as
# $OUT/PART_trace.json.gz. Without .whl/ the install is skipped (a machine that has the packages). The LPIPS
# weights cannot be fetched there (no network), so the benchmark times LPIPS with random VGG16 weights of the
# same shapes and says so.
set -u
PART=${1:-}
shift  # the rest goes to the train-step parts' train_step_bench.py, e.g. --config.model.remat_norms=false
case $PART in
  splat|cifar|imagenet) ;;
  *) echo "usage: $0 splat|cifar|imagenet [train_step_bench.py flags], got '$PART'" >&2; exit 2;;
esac
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp}/gpu_session_$PART.log
TRACE=/tmp/gpu_session_trace_$PART
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --upgrade --target .gpu_site .whl/*.whl
  export PYTHONPATH=.gpu_site:$PYTHONPATH
fi
{
  if [ "$PART" = splat ]; then timeout 460 bash benchmarks/splat_gpu_check.sh; echo "splat check: exit $?"; fi
  if [ "$PART" = cifar ]; then
    timeout 300 $PY benchmarks/train_step_bench.py --config=configs/cifar10.py --batch_size=64 \
      --config.model.conv_dtype=bfloat16 --noparts --steps=6 --rounds=3 --trace_dir="$TRACE" "$@"
    echo "CIFAR bench: exit $?"
  fi
  if [ "$PART" = imagenet ]; then
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" timeout 500 $PY benchmarks/train_step_bench.py \
      --config=configs/imagenet.py --batch_size="${BATCH:-16}" --encode_batch_size=16 \
      --config.model.conv_dtype=bfloat16 \
      --noparts --nolpips --steps=4 --rounds=3 --trace_dir="$TRACE" "$@"
    echo "ImageNet bench: exit $?"
  fi
  if [ "$PART" != splat ] && [ -d "$TRACE" ]; then  # where the traced steps' device time went
    $PY benchmarks/trace_summary.py "$TRACE" --top=40
    find "$TRACE" -name "*.trace.json.gz" -exec cp {} "${OUT:-/tmp}/${PART}_trace.json.gz" \;
  fi
} 2>&1 | grep --line-buffered -v -E "^(I|W)[0-9]{4} .*(weights.py:[0-9]+\] pip:|cuda_timer.cc)" | tee "$LOG"
