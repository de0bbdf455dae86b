"""Where and in what precision the engine's commands run: one place for --device, --precision and --no-grad-path."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

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


def frozen_dtype(setting: str, precision: str, device: torch.device) -> torch.dtype:
    """The dtype the frozen weights are held in (``--frozen-dtype``): auto is the autocast dtype where the step runs
    under autocast (bf16 on CUDA: half the weights' memory, as diffusers' LoRA scripts hold them; autocast computes
    in it anyway), else fp32."""
    amp = autocast_dtype(precision, device)
    if setting == "fp32" or (setting == "auto" and amp is None):
        return torch.float32
    if amp is None:
        raise UserError(f"--frozen-dtype {setting} needs the step under autocast (--precision bf16 or auto, on CUDA): "
                        f"without it fp32 activations would meet {setting} weights; use --frozen-dtype fp32 here")
    return amp if setting == "auto" else torch.bfloat16


@contextmanager
def quiet_casts():
    """diffusers warns at every ``.to(dtype)`` of a whole model that it should have been loaded in that dtype
    instead, naming the modules it keeps in fp32 (none, for the models the engine casts): the engine casts its
    frozen weights, and a count its meta-device models, on purpose."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def autocast(device: torch.device, precision: str):
    dtype = autocast_dtype(precision, device)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def native_bf16(device: torch.device) -> bool:
    """bf16 matmuls run in hardware here: a CUDA GPU that supports bf16, or a CPU whose oneDNN has bf16 units
    (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class NoGradPath:
    """How the edit chain's no-grad steps call the denoiser. They are most of a step's work (11 of the 12 CFG steps of
    the official recipe) and need no autograd, so they may take a faster path than the gradient steps:

    - ``bf16``: under bf16 autocast (results change by bf16 rounding only); on a CPU with AMX the no-grad steps take
      well under the fp32 time (bench/RESULTS.md, "time per phase (CPU)"); on CUDA, ``--precision auto`` already
      runs every step in bf16.
    - ``compile``: a ``torch.compile``d denoiser (CUDA graphs on CUDA, where the chain's shapes are static); the timestep
      goes in as a tensor so that the twelve timesteps share one graph.
    - ``off``: exactly like the gradient steps.
    - ``auto``: bf16 on a CPU with bf16 units when the run itself is fp32, otherwise off (compile stays opt-in: on
      this project's CPU it measured 0.95x of eager after a 30 s compile, and NaN under bf16 autocast).
    """

    MODES = ("auto", "off", "bf16", "compile")

    def __init__(self, mode: str, device: torch.device, precision: str = "auto", compile_backend: str = "inductor"):
        if mode not in self.MODES:
            raise UserError(f"--no-grad-path {mode!r} is not one of {', '.join(self.MODES)}")
        if mode == "auto":
            mode = "bf16" if autocast_dtype(precision, device) is None and device.type == "cpu" and native_bf16(device) \
                else "off"
        self.mode, self.device, self.compile_backend = mode, device, compile_backend
        self._compiled: dict[int, torch.nn.Module] = {}

    @classmethod
    def resolve(cls, mode: str, device: torch.device, precision: str = "auto") -> "NoGradPath | None":
        """The path for ``mode``, or None where it resolves to off (the no-grad steps then run as the others)."""
        path = cls(mode, device, precision)
        return None if path.mode == "off" else path

    def context(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.mode == "bf16" else nullcontext()

    def denoiser(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` itself, or its compiled twin (made once; it shares the weights, so LoRA updates reach it)."""
        if self.mode != "compile":
            return module
        if id(module) not in self._compiled:
            mode = "reduce-overhead" if self.device.type == "cuda" and self.compile_backend == "inductor" else None
            self._compiled[id(module)] = torch.compile(module, backend=self.compile_backend, mode=mode, dynamic=False)
        return self._compiled[id(module)]

    def timestep(self, t: int) -> int | torch.Tensor:
        """A tensor under compile (one graph for every timestep), the plain int otherwise."""
        return torch.tensor(t, device=self.device) if self.mode == "compile" else t
