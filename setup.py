"""Install: ``pip install --no-build-isolation -e .[test]`` after torch (see README.md).

``--no-build-isolation`` matters: the C++ extension in csrc/ is built against the torch already installed,
so the build must not fetch a second torch into an isolated environment.

The extension (``csrc._C``, the layout of pytorch/extension-cpp): every ``csrc/*.cpp`` always, plus
``csrc/cuda/*.cu`` when CUDA is wanted. Environment knobs:
- ``USE_CUDA=1`` builds the CUDA sources (needs a CUDA toolkit and a CUDA build of torch), ``USE_CUDA=0`` never;
  unset: only when torch sees a GPU and a toolkit is installed, so a CPU machine builds C++ only, in about
  a minute and a half on two cores.
- ``DEBUG=1`` builds with ``-O0 -g``.
If the extension is not built, ``csrc`` falls back to its pure-Python twin (same results, logged once).
"""

import glob
import os

from setuptools import find_packages, setup

LIBRARY = "csrc"


def get_extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as err:
        raise SystemExit(
            f"error: building the C++ extension csrc._C needs torch, which cannot be imported ({err}).\n"
            "Install torch first, then install this package without build isolation:\n"
            "    pip install torch==2.14.1 torchvision==0.29.1\n"
            '    pip install --no-build-isolation -e ".[test]"'
        ) from None

    debug = os.getenv("DEBUG", "0") == "1"
    wanted = os.getenv("USE_CUDA", "auto").lower()
    if wanted == "auto":
        use_cuda = torch.cuda.is_available() and torch.version.cuda is not None and CUDA_HOME is not None
    else:
        use_cuda = wanted in ("1", "true", "yes", "on")
        if use_cuda and (torch.version.cuda is None or CUDA_HOME is None):
            raise SystemExit(
                f"error: USE_CUDA={wanted} but {'this torch is a CPU build' if torch.version.cuda is None else 'no CUDA toolkit was found (set CUDA_HOME)'}; "
                "unset USE_CUDA to build the C++ extension without CUDA"
            )
    if use_cuda and not torch.cuda.is_available() and not os.getenv("TORCH_CUDA_ARCH_LIST"):
        # No GPU to ask; the CUDA sources hold host code only, so the architecture list hardly matters.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

    # -ffp-contract=off: the planner's double arithmetic must match csrc/fallback.py bit for bit.
    cxx = ["-O0" if debug else "-O3", "-ffp-contract=off"]  # py_limited_api below defines Py_LIMITED_API
    nvcc = ["-O0" if debug else "-O3"]
    link = []
    if debug:
        cxx.append("-g")
        nvcc.append("-g")
        link += ["-O0", "-g"]

    this_dir = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join(this_dir, LIBRARY, "*.cpp")))
    sources = [os.path.relpath(s, this_dir) for s in sources]
    if use_cuda:
        cuda_sources = sorted(glob.glob(os.path.join(this_dir, LIBRARY, "cuda", "*.cu")))
        sources += [os.path.relpath(s, this_dir) for s in cuda_sources]
        extension = CUDAExtension
        compile_args = {"cxx": cxx + ["-DWITH_CUDA"], "nvcc": nvcc + ["-DWITH_CUDA"]}
    else:
        extension = CppExtension
        compile_args = {"cxx": cxx}
    print(f"building {LIBRARY}._C with {'CUDA' if use_cuda else 'C++ only'} ({len(sources)} sources)")
    ext_modules = [
        extension(
            f"{LIBRARY}._C",
            sources,
            extra_compile_args=compile_args,
            extra_link_args=link,
            py_limited_api=True,
        )
    ]
    return ext_modules, {"build_ext": BuildExtension}


ext_modules, cmdclass = get_extensions()

setup(
    name="instructvideo-engine",
    version="0.1.0",
    description="Fast InstructVideo reward fine-tuning of text-to-video diffusion models",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "csrc", "csrc.*"]),
    # the built-in world model and reward (python -m engine.world.build regenerates them)
    package_data={"engine": ["presets/*.yaml", "assets/*.json", "assets/*.pt", "assets/*.safetensors",
                             "assets/world-t2v/*.json", "assets/world-t2v/*/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "torchvision<=0.29.1",
        "diffusers>=0.30",
        "transformers>=4.40,<5.25",  # 5.25 needs the hub package named `kernels`, which this project's kernels/ shadows
        "peft>=0.13",
        "accelerate",  # empty-weight construction of large reward models (VideoAlign)
        "open_clip_torch>=2.24",
        "safetensors",
        "av>=12",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "pillow",
        "numpy",
        "tensorboard",
        "nvidia-ml-py",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark", "pytest-xdist"],
        "dev": ["pytest>=8", "pytest-benchmark", "pytest-xdist", "ruff"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
