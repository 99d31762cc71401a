#!/usr/bin/env bash
# Fill device_carry/ (ignored by git) with what benchmarks/gpu_suite.py needs on a bare GPU machine that has torch,
# accelerate, huggingface_hub, safetensors, scipy and torchdiffeq but neither diffusers nor the data:
#   device_carry/wheels/         the pure-Python wheels it lacks (diffusers, importlib_metadata), no dependencies
#   device_carry/fashion-mnist/  Debian's dataset-fashion-mnist files (the four .gz of the IDX format)
# Run from anywhere, on a machine with pip access to PyPI and the Debian package installed
# (apt-get install dataset-fashion-mnist). BENCHMARKS.md ("The GPU suite") gives the command that uses them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
FASHION_MNIST_DIR=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
# the versions this project is tested with; the GPU machine's Python is 3.12
WHEELS=${WHEELS:-"diffusers==0.42.1 importlib_metadata==10.2.0"}

mkdir -p device_carry/wheels device_carry/fashion-mnist
rm -f device_carry/wheels/*.whl
# shellcheck disable=SC2086
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    --platform any -d device_carry/wheels $WHEELS
cp "$FASHION_MNIST_DIR"/*-ubyte.gz device_carry/fashion-mnist/
du -ch device_carry/wheels device_carry/fashion-mnist  # the run tool carries at most 64 MiB with the tree
