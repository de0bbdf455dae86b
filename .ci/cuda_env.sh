# CI, sourced: a CUDA toolchain from pip matching torch's CUDA version, on a machine without a GPU, so that the
# build of csrc._C that follows (USE_CUDA=1) compiles csrc/cuda/ too. Sets CUDA_HOME, PATH and LIBRARY_PATH.
cuda=$(python -c "import torch; print(torch.version.cuda or '')")
if [ -z "$cuda" ]; then
    echo "error: this torch is a CPU build; the CUDA build of csrc._C needs a CUDA build of torch" >&2; exit 2
fi
major=${cuda%%.*}
if [ "$major" -lt 13 ]; then
    echo "error: torch is built for CUDA $cuda; this script knows the pip layout of CUDA 13 and later" >&2; exit 2
fi
# Everything pinned to torch's CUDA release: left to the resolver, nvvm and crt come from a newer release and
# ptxas rejects the PTX that cicc writes ("Unsupported .version").
echo "installing the CUDA $cuda compiler from pip"
pip install -q "nvidia-cuda-nvcc==$cuda.*" "nvidia-cuda-cccl==$cuda.*" "nvidia-nvvm==$cuda.*" "nvidia-cuda-crt==$cuda.*"
CUDA_HOME=$(python -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu$major'))")
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
# The runtime wheel ships libcudart.so.13 only; the linker's -lcudart wants the unversioned name.
mkdir -p build/cuda-link && ln -sf "$(ls "$CUDA_HOME"/lib/libcudart.so.* | head -1)" build/cuda-link/libcudart.so
export LIBRARY_PATH="$PWD/build/cuda-link${LIBRARY_PATH:+:$LIBRARY_PATH}"
nvcc --version | tail -1
