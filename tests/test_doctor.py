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
                   "temporal_attention", "cfg_ddim_step", "attention: PyTorch SDPA"):
        assert needed in out, needed
    assert "reference: CPU tensors run the PyTorch reference unless TRITON_INTERPRET=1" in out


def test_kernel_status_follows_the_backend():
    if dispatch._utils.triton_available():
        assert dispatch.device_status("cuda") == (True, "Triton on CUDA")
    with dispatch.use_backend("reference"):
        assert dispatch.device_status("cuda") == (False, "the backend is set to 'reference'")
