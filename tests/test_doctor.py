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
                   "temporal_attention", "cfg_ddim_step", "attention: PyTorch SDPA", "--attention xformers: "):
        assert needed in out, needed
    assert "reference: CPU tensors run the PyTorch reference unless TRITON_INTERPRET=1" in out


def test_kernel_status_follows_the_backend():
    if dispatch._utils.triton_available():
        assert dispatch.device_status("cuda") == (True, "Triton on CUDA")
    with dispatch.use_backend("reference"):
        assert dispatch.device_status("cuda") == (False, "the backend is set to 'reference'")


def test_doctor_says_what_attention_xformers_would_run(monkeypatch):
    """SDPA and why where xformers does not import or cannot run on the device; its attention where one call of it
    at a small shape runs."""
    import types

    import torch

    from engine import doctor

    monkeypatch.setitem(sys.modules, "xformers", None)  # as if not installed
    assert doctor._xformers(torch.device("cpu")).startswith("SDPA: xformers does not import (ModuleNotFoundError")
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = lambda q, k, v: q
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    sys.modules["xformers"].ops = ops
    assert doctor._xformers(torch.device("cpu")) == "SDPA: xformers' memory-efficient attention runs on CUDA only"
    if torch.cuda.is_available():
        assert doctor._xformers(torch.device("cuda")).startswith("xformers' memory-efficient attention")
        ops.memory_efficient_attention = lambda q, k, v: (_ for _ in ()).throw(NotImplementedError("no operator"))
        assert doctor._xformers(torch.device("cuda")) == "SDPA: xformers' attention fails here (no operator)"
