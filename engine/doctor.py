"""``python -m engine.doctor``: one screen about this machine and install to paste into a bug report (versions,
the device and its bf16 support, free memory, the C++ extension, which fused kernels run and why any does not,
the attention backend, and what ``--attention xformers`` would run). Exit 0 whenever it could look; it changes nothing."""

from __future__ import annotations

import io
import os
import platform
import sys
from contextlib import redirect_stdout
from importlib import metadata
from unittest import mock

import torch

PACKAGES = ("torch", "torchvision", "triton", "diffusers", "transformers", "peft", "open_clip_torch", "safetensors",
            "av", "tensorboard", "nvidia-ml-py", "xformers")
KERNELS = ("lora_linear", "temporal_attention", "cfg_ddim_step", "cfg_flow_step")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def _host_memory() -> str:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return f"{_gib(os.sysconf('SC_AVPHYS_PAGES') * page)} free of {_gib(os.sysconf('SC_PHYS_PAGES') * page)}"
    except (ValueError, OSError, AttributeError):  # not every OS names these
        return "unknown"


def _devices() -> list[tuple[str, str]]:
    from engine.runtime import native_bf16

    rows = [("cpu", f"{os.cpu_count()} cores, bf16 units: {'yes' if native_bf16(torch.device('cpu')) else 'no'}, "
                    f"memory {_host_memory()}")]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            major, minor = torch.cuda.get_device_capability(index)
            rows.append((f"cuda:{index}", f"{torch.cuda.get_device_name(index)}, capability {major}.{minor}, bf16: "
                                          f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}, memory {_gib(free)} "
                                          f"free of {_gib(total)}"))
    else:
        rows.append(("cuda", f"not available (torch built with CUDA {torch.version.cuda})" if torch.version.cuda
                     else "not available (a CPU build of torch)"))
    return rows


def _extension() -> str:
    import csrc

    if not csrc.extension_available():
        return f"not loaded ({csrc.extension_error()}); the Python fallback runs ({csrc.BUILD_HINT})"
    return f"built, CUDA part {'built' if csrc.extension_has_cuda() else 'not built'}"


def _attention(device: torch.device) -> str:
    if device.type == "cuda":
        enabled = [name for name, on in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                                         ("memory-efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                                         ("cuDNN", torch.backends.cuda.cudnn_sdp_enabled()),
                                         ("math", torch.backends.cuda.math_sdp_enabled())) if on]
        return (f"PyTorch SDPA ({', '.join(enabled)} enabled); temporal self-attention in an accelerated UNet: the "
                f"fused kernel when it runs (above), else the same SDPA")
    return ("PyTorch SDPA (CPU); temporal self-attention in an accelerated UNet: the fused kernel when it runs "
            "(above), else the same SDPA")


def _xformers(device: torch.device) -> str:
    """What ``--attention xformers`` gives a UNet3D here: the engine's own switch (``use_attention``) run on the tiny
    UNet3D on ``device``, with diffusers' check that xformers' attention runs there. (Wan and CogVideoX take
    diffusers' attention dispatcher, which checks nothing: README, ``--attention``.)"""
    from engine.acceleration import use_attention
    from engine.models import tiny_model

    said = io.StringIO()
    with redirect_stdout(said):
        ran = use_attention(tiny_model(seed=0, device=device), "xformers")
    if ran == "xformers":
        return f"xformers' memory-efficient attention (xformers {_version('xformers')})"
    return said.getvalue().strip().removeprefix("--attention xformers: ")


def _self_checks(device: torch.device) -> dict[str, str | None]:
    """Each kernel run once at a small shape, so that its self-check (kernels.dispatch) runs: kernel -> None
    (passed) or why it fell back to its reference."""
    import kernels
    from kernels import dispatch

    g = torch.Generator().manual_seed(0)
    x = lambda *shape: torch.randn(shape, generator=g).to(device)  # noqa: E731
    with mock.patch.dict(os.environ, {"KERNEL_SELF_CHECK": "1"}):
        kernels.lora_linear(x(16, 64), x(32, 64), x(32), x(4, 64), x(32, 4), 1.0)
        kernels.temporal_attention(x(2, 4, 16, 32), x(2, 4, 16, 32), x(2, 4, 16, 32))
        kernels.cfg_ddim_step(x(2, 4, 8, 8), x(2, 4, 8, 8), x(2, 4, 8, 8), 3.0, 0.5, 0.7)
        kernels.cfg_flow_step(x(2, 4, 8, 8), x(2, 4, 8, 8), x(2, 4, 8, 8), 3.0, 0.7, 0.5)
    return {kernel: reason for (kernel, _, _), reason in dispatch.self_check_results().items()}


def _kernel_state(kernel: str, fused: bool, why: str, checks: dict[str, str | None]) -> str:
    if not fused:
        return f"reference: {why}"
    if kernel not in checks:
        return f"fused: {why}"
    return f"fused: {why}, self-check passed" if checks[kernel] is None else f"reference: {checks[kernel]}"


def report() -> str:
    from kernels import dispatch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = [f"python {platform.python_version()} on {platform.platform()}", "", "packages:"]
    lines += [f"  {p:<16} {_version(p)}" for p in PACKAGES]
    lines += ["", "devices:"] + [f"  {name:<8} {text}" for name, text in _devices()]
    lines += ["", f"C++ extension (csrc._C): {_extension()}", "",
              f"fused kernels on {device.type} (backend {dispatch.get_backend().value}):"]
    fused, why = dispatch.device_status(device)
    checks = _self_checks(device) if fused else {}
    lines += [f"  {k:<19} {_kernel_state(k, fused, why, checks)}" for k in KERNELS]
    lines += ["", f"attention: {_attention(device)}", f"--attention xformers (a UNet3D): {_xformers(device)}",
              f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    argparse.ArgumentParser(prog="python -m engine.doctor", description=__doc__.split("\n\n")[0]).parse_args(argv)
    print(report())


if __name__ == "__main__":
    sys.exit(main())
