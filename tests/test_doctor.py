"""``python -m engine.doctor``: exits 0 on a healthy CPU machine and names what a bug report needs."""

import os
import subprocess
import sys

from kernels import dispatch


def test_doctor_reports_versions_devices_extension_and_kernels():
    result = subprocess.run([sys.executable, "-m", "engine.doctor"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for needed in ("torch ", "triton ", "diffusers ", "bf16 units:", "C++ extension (csrc._C):", "lora_linear",
                   "temporal_attention", "cfg_ddim_step", "attention: PyTorch SDPA", "--attention xformers (a UNet3D): "):
        assert needed in out, needed
    assert "reference: CPU tensors run the PyTorch reference unless TRITON_INTERPRET=1" in out


def test_kernel_status_follows_the_backend():
    if dispatch._utils.triton_available():
        assert dispatch.device_status("cuda") == (True, "Triton on CUDA")
    with dispatch.use_backend("reference"):
        assert dispatch.device_status("cuda") == (False, "the backend is set to 'reference'")


def test_doctor_says_what_attention_xformers_gives_a_unet3d(monkeypatch):
    """The engine's own switch run on the tiny UNet3D: SDPA and why where xformers does not import (or, beside
    a GPU with xformers installed, its attention)."""
    import torch

    from engine import doctor

    assert doctor._xformers(torch.device("cpu")).startswith("not used: ")
    if torch.cuda.is_available() and doctor._version("xformers") != "not installed":  # bench/gpu.sh carries it
        assert doctor._xformers(torch.device("cuda")).startswith("xformers' memory-efficient attention")
    monkeypatch.setitem(sys.modules, "xformers", None)  # as if not installed
    said = doctor._xformers(torch.device("cpu"))
    assert said.startswith("not used: xformers does not import (ModuleNotFoundError") and said.endswith(
        f"install one built for torch {torch.__version__.split('+')[0]} with pip install --no-deps; attention runs on SDPA")
