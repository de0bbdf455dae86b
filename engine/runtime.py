"""Where and in what precision the engine's commands run: one place for --device and --precision."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from engine.errors import UserError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto = CUDA when visible; a bare "cuda" means this process's GPU (LOCAL_RANK under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for CUDA but no GPU is visible; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 (auto) or fp16 on CUDA; None means plain fp32 (always on the CPU)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


def autocast(device: torch.device, precision: str):
    dtype = autocast_dtype(precision, device)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
