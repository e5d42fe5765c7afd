#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: the same command on every host of the slice, where jax.distributed
# finds the other hosts from the TPU metadata (GAUSSIANTOKEN_DISTRIBUTED=auto). WORKDIR must be shared by
# all hosts (a gs:// bucket). Rerunning the command resumes from the newest checkpoint.
#
#   launch/tpu_vm.sh my-tpu us-central2-b configs/imagenet.py gs://my-bucket/gt_imagenet [--config.F=V ...]
# The repository must be checked out at ~/gaussiantoken_jax on every host, with the package installed
# (`pip install -e . gcsfs` and `jax[tpu]`; gcsfs lets the checkpoints and logs go to a gs:// WORKDIR).
# The run lasts as long as this ssh session: start it inside tmux or screen.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG[:ARGS] WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
# Every argument quoted for the remote shell, so that values with spaces or quotes arrive as given.
command=$(printf '%q ' python3 -m gaussiantoken_jax.main --config="${config}" --workdir="${workdir}" "$@")
gcloud compute tpus tpu-vm ssh "${tpu}" --zone="${zone}" --worker=all \
  --command="cd ~/gaussiantoken_jax && GAUSSIANTOKEN_DISTRIBUTED=auto ${command}"
