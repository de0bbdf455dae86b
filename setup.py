"""Install: ``pip install --no-build-isolation -e .[test]`` after torch (see README.md).

``--no-build-isolation`` matters: the C++ extension in csrc/ is built against the torch already installed,
so the build must not fetch a second torch into an isolated environment.
"""

from setuptools import find_packages, setup

setup(
    name="instructvideo-engine",
    version="0.1.0",
    description="Fast InstructVideo reward fine-tuning of text-to-video diffusion models",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "csrc", "csrc.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "torchvision<=0.29.1",
        "diffusers>=0.30",
        "transformers>=4.40",
        "peft>=0.13",
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
        "test": ["pytest>=8", "pytest-benchmark"],
        "dev": ["pytest>=8", "pytest-benchmark", "ruff"],
    },
)
