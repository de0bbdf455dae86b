#!/usr/bin/env bash
# Build csrc._C with its CUDA sources on a machine without a GPU (a compile error in csrc/cuda/ fails), with the
# CUDA toolchain of .ci/cuda_env.sh. The CUDA build replaces the C++-only csrc/_C*.so of this checkout (it loads
# and runs on a CPU machine too). .ci/run does the same in one step: it sources cuda_env.sh before installing.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/cuda_env.sh
USE_CUDA=1 python setup.py -q build_ext --inplace
python -c "import csrc; assert csrc.backend('extension').cuda, csrc.extension_error(); print('csrc._C built with CUDA')"
