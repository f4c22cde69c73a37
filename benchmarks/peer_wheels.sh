#!/usr/bin/env bash
# Download the peer libraries as wheels into .whl/ for a GPU machine that cannot reach PyPI
# (the device tool: carry ".whl", then install them with the line printed at the end).
# Only what that machine's image lacks (it has numpy, scipy, tqdm, einops, opt-einsum,
# linear-operator, h5py, torchvision): the four peers and the small pure-Python packages they need.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pyhessian==0.1 hessian-eigenthings==1.0.0a5 curvlinops-for-pytorch==3.0.1 skerch==1.2.0 \
  backpack-for-pytorch==1.7.1 einconv==0.1.0 unfoldNd==0.2.3 torch-dct==0.1.6
echo "on the GPU machine: python3 -m pip install -q --no-index --no-deps --no-compile \\"
echo "  --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:\$PWD/src"
