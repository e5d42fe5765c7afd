#!/bin/bash
# Downloads, into .whl/ (git-ignored), the wheels of the packages this project needs that the lent GPU machine
# lacks (it has jax 0.11 with CUDA, flax, optax, orbax-checkpoint and chex on Python 3.12, and no network):
# grain, ml-collections, clu, tensorflow-datasets and their small dependencies, 15 wheels, about 10 MB.
# benchmarks/gpu_session.sh installs them there; carry the folder: run(..., carry=[".whl"]).
# Run on the CPU machine, from the repository root: bash benchmarks/gpu_wheels.sh
set -euo pipefail
mkdir -p .whl
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
for package in grain==0.2.18 array-record ml-collections clu==0.0.12 tensorflow-datasets==4.9.10 dm-tree \
               immutabledict simple-parsing tensorflow-metadata termcolor toml dm-pix docstring-parser portpicker; do
  # shellcheck disable=SC2086  # the platform flags are meant to split
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d .whl "$package"
done
python3 -m pip wheel -q --no-deps -w .whl promise  # an sdist only on the index; builds a pure-Python wheel
ls .whl | wc -l | xargs echo "wheels in .whl:"
