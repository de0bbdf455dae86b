"""Which implementation an op runs: its Triton kernel ("fused") or its PyTorch reference.

``auto`` (the default) runs Triton on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how the tests
run the kernels); everything else runs the reference. Inputs a kernel does not support (dtype, shape, frozen
weights that need a gradient...) run the reference too, logged once per reason: slower, never wrong.

The backend is a process-wide setting rather than a context variable on purpose: autograd runs backward, and
the forward recomputation of checkpointed blocks, on its own threads, and those must make the same choice.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from enum import Enum

import torch

from kernels import _utils


class Backend(str, Enum):
    AUTO = "auto"
    REFERENCE = "reference"
    FUSED = "fused"


_backend = Backend.AUTO


def get_backend() -> Backend:
    return _backend


def set_backend(name: str | Backend) -> Backend:
    """Switch every op to ``name``; returns the previous backend."""
    global _backend
    previous, _backend = _backend, Backend(name)
    return previous


@contextmanager
def use_backend(name: str | Backend):
    """``with use_backend("reference"): ...`` runs the block with every op on ``name``."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _wants_fused(tensors: list[torch.Tensor]) -> bool:
    if _backend is Backend.REFERENCE:
        return False
    if _backend is Backend.FUSED:
        return True
    return _utils.triton_available() and (any(t.is_cuda for t in tensors) or _utils.interpret_requested())


def _cannot_launch(tensors: list[torch.Tensor]) -> str | None:
    if not _utils.triton_available():
        return "Triton is not installed"
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"inputs on several devices ({', '.join(sorted(map(str, devices)))})"
    if any(not t.is_cuda for t in tensors) and not _utils.interpreter_active():
        return ("CPU tensors need Triton's interpreter: TRITON_INTERPRET=1 in the environment from before anything "
                "imports triton (diffusers does)")
    return None


def device_status(device: torch.device | str) -> tuple[bool, str]:
    """Whether the ops run their Triton kernels on tensors of ``device`` under the current backend, and why (what
    ``run`` decides before it looks at an op's own inputs)."""
    device = torch.device(device)
    if _backend is Backend.REFERENCE:
        return False, "the backend is set to 'reference'"
    if not _utils.triton_available():
        return False, "Triton is not installed"
    if device.type == "cuda":
        return True, "Triton on CUDA"
    if _backend is Backend.AUTO and not _utils.interpret_requested():
        return False, "CPU tensors run the PyTorch reference unless TRITON_INTERPRET=1 (the tests' setting)"
    if not _utils.interpreter_active():
        return False, "CPU tensors need Triton's interpreter: TRITON_INTERPRET=1 before anything imports triton"
    return True, "Triton under its interpreter (TRITON_INTERPRET=1)"


def run(name: str, fused: Callable, reference: Callable, unsupported: Callable[..., str | None], *args, **kwargs):
    """Call ``fused`` or ``reference`` on the arguments, per the backend and ``unsupported`` (a reason or None)."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if not _wants_fused(tensors):
        return reference(*args, **kwargs)
    reason = _cannot_launch(tensors) or unsupported(*args, **kwargs)
    if reason is not None:
        _utils.log_once(f"{name}: {reason}; running the PyTorch reference")
        return reference(*args, **kwargs)
    return fused(*args, **kwargs)
