"""Helpers shared by the Triton ops: availability, the interpreter, launch settings, output allocation, logging.

Triton is optional: CPU-only installs (macOS, Windows) have none, and every op then runs its PyTorch reference.
Kernel modules use ``from __future__ import annotations`` so their ``tl.constexpr`` annotations stay strings and
the modules import (and define nothing runnable) without Triton.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: dispatch never reaches a kernel
    triton = tl = None

logger = logging.getLogger("kernels")

_logged: set[str] = set()
_poison = False


def jit(fn):
    """``triton.jit`` when Triton is installed; otherwise the plain function (never launched)."""
    return fn if triton is None else triton.jit(fn)


def triton_available() -> bool:
    return triton is not None


def interpret_requested() -> bool:
    """TRITON_INTERPRET=1, read at call time (the dispatch's ``auto`` then runs Triton on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_active() -> bool:
    """Whether Triton can run kernels on the CPU in this process.

    Triton picks interpreter-or-compiler when a ``@triton.jit`` function is defined, and its own ``tl.sum``,
    ``tl.zeros``... are defined when ``triton`` is first imported (diffusers imports it): TRITON_INTERPRET=1
    must be in the environment before that, and still at launch (Triton 3.8 reads it again then).
    """
    if triton is None or not interpret_requested():
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.zeros, InterpretedFunction)


def log_once(message: str) -> None:
    """Fallbacks are logged once per distinct message, so a UNet's 50 layers do not flood the log."""
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


def next_pow2(n: int, minimum: int = 16) -> int:
    """Block sizes: powers of two (tl.arange), at least 16 (tl.dot's smallest tile on NVIDIA GPUs)."""
    return max(minimum, triton.next_power_of_2(n))


def is_interpreted(tensor: torch.Tensor) -> bool:
    """Launch heuristics differ: the interpreter runs programs one by one in numpy, so it wants few, big ones."""
    return tensor.device.type != "cuda" or interpreter_active()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs honour torch's TF32 switch, as cuBLAS does; fp16/bf16 always use tensor cores."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def upcast_dot(tensor: torch.Tensor) -> bool:
    """Triton 3.8's interpreter multiplies bf16 bit patterns as integers in ``tl.dot``. bf16 x bf16 products are
    exact in fp32, so upcasting the operands there gives what the GPU's tensor cores give."""
    return tensor.dtype == torch.bfloat16 and is_interpreted(tensor)


@contextmanager
def poison_outputs():
    """Tests: kernel outputs start as NaN, so an element a kernel fails to write cannot pass as correct."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def empty(shape, dtype: torch.dtype, device, permute: tuple[int, ...] | None = None) -> torch.Tensor:
    """A kernel's output buffer; ``permute`` gives the memory order (allocate in that order, return the inverse view)."""
    if permute is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    else:
        stored = torch.empty([shape[i] for i in permute], dtype=dtype, device=device)
        out = stored.permute([permute.index(i) for i in range(len(permute))])
    return out.fill_(float("nan")) if _poison else out


def device_context(tensor: torch.Tensor):
    """Triton launches on the current CUDA device and stream: make that the tensor's device (as Liger does)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else nullcontext()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast would run a matmul in here, or None. Custom Functions are invisible to autocast, so the
    fused ops cast their inputs themselves, as F.linear and SDPA do."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None
