"""Which implementation an op runs: its Triton kernel ("fused") or its PyTorch reference.

``auto`` (the default) runs Triton on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how the tests
run the kernels); everything else runs the reference. Inputs a kernel does not support (dtype, shape, frozen
weights that need a gradient...) run the reference too, logged once per reason: slower, never wrong.

The backend is a process-wide setting rather than a context variable on purpose: autograd runs backward, and
the forward recomputation of checkpointed blocks, on its own threads, and those must make the same choice.

Each kernel checks itself once per process, device and shape class (dtypes, and every size rounded up to a power
of two) at its first real call of that class: its output against the reference's on the same inputs (forward,
no gradient; never inside CUDA-graph capture). A compile or launch error, or a gap past the dtype's tolerance,
sends that class to the reference from then on, logged once with the kernel, device, shapes and reason. On CUDA
the check is on; ``KERNEL_SELF_CHECK=1`` forces it on (the CPU under Triton's interpreter), ``0`` off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from enum import Enum

import torch
from torch.utils._pytree import tree_flatten

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


# ---------------------------------------------------------------------------------- the self-check
TOLERANCE = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}  # max gap / max |reference|
_verdicts: dict[tuple, str | None] = {}  # (kernel, device, shape class) -> None (checked, fine) or why it is off


def self_check_results() -> dict[tuple, str | None]:
    """Every check made in this process: (kernel, device, shape class) -> None (passed) or the reason it failed."""
    return dict(_verdicts)


def _self_check_on(tensors: list[torch.Tensor]) -> bool:
    forced = os.environ.get("KERNEL_SELF_CHECK", "")
    if forced in ("0", "1"):
        return forced == "1"
    return any(t.is_cuda for t in tensors)


def _shape_class(tensors: list[torch.Tensor]) -> tuple:
    return tuple((str(t.dtype).removeprefix("torch."), tuple(1 << max(d - 1, 0).bit_length() for d in t.shape))
                 for t in tensors)


def _check(fused: Callable, reference: Callable, args, kwargs) -> str | None:
    """None when ``fused`` gives ``reference``'s output on these inputs within the tolerance, else why not."""
    detach = lambda a: a.detach() if isinstance(a, torch.Tensor) else a  # noqa: E731
    args, kwargs = [detach(a) for a in args], {k: detach(v) for k, v in kwargs.items()}
    with torch.no_grad():
        try:
            got = tree_flatten(fused(*args, **kwargs))[0]
        except Exception as err:  # noqa: BLE001 (Triton's compile and launch errors have many types)
            text = str(err).strip().splitlines()
            return f"it failed to compile or launch ({type(err).__name__}: {text[0] if text else ''})"
        want = tree_flatten(reference(*args, **kwargs))[0]
    for g, w in zip(got, want):
        if not isinstance(w, torch.Tensor):
            continue
        gap = ((g.float() - w.float()).abs().max() / w.float().abs().max().clamp(min=1e-6)).item()
        tolerance = TOLERANCE.get(w.dtype, TOLERANCE[torch.float32])
        if not gap <= tolerance:  # NaN fails too
            return f"its output differs from the reference by {gap:.1e} of the reference's largest value (tolerance {tolerance:.0e})"
    return None


def _passes_self_check(name: str, fused: Callable, reference: Callable, tensors, args, kwargs) -> bool:
    if not _self_check_on(tensors) or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return True
    key = (name, str(tensors[0].device), _shape_class(tensors))
    if key not in _verdicts:
        _verdicts[key] = _check(fused, reference, args, kwargs)
        if _verdicts[key] is not None:
            _utils.log_once(f"{name} on {key[1]} for shapes {key[2]}: {_verdicts[key]}; running the PyTorch "
                            "reference for these shapes")
    return _verdicts[key] is None


def run(name: str, fused: Callable, reference: Callable, unsupported: Callable[..., str | None], *args, **kwargs):
    """Call ``fused`` or ``reference`` on the arguments, per the backend, ``unsupported`` (a reason or None) and
    the kernel's self-check."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if not _wants_fused(tensors):
        return reference(*args, **kwargs)
    reason = _cannot_launch(tensors) or unsupported(*args, **kwargs)
    if reason is not None:
        _utils.log_once(f"{name}: {reason}; running the PyTorch reference")
        return reference(*args, **kwargs)
    if not _passes_self_check(name, fused, reference, tensors, args, kwargs):
        return reference(*args, **kwargs)
    return fused(*args, **kwargs)
