#!/usr/bin/env bash
# Train on one machine with all its devices (1 CPU, 1-8 GPUs or a single TPU host): one process, no
# jax.distributed. Restarting the same command resumes from the newest checkpoint in WORKDIR.
#
#   launch/single_host.sh configs/demo.py:runlocal /tmp/gt_demo_local [--config.total_steps=100 ...]
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG[:ARGS] WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
[[ "${workdir}" == *://* ]] || workdir=$(realpath -m -- "${workdir}")  # relative to the caller, not the repository
# A config file found from the caller's directory too (its own configs); else the repository's (configs/...).
config_file=${config%%:*}
[[ -f "${config_file}" ]] && config="$(realpath -- "${config_file}")${config:${#config_file}}"
cd "$(dirname "$0")/.."
exec python -m gaussiantoken_jax.main --config="${config}" --workdir="${workdir}" "$@"
