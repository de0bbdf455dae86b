"""The kernels compiled for real GPUs on a machine without one: what a GPU user's first launch would compile.

    python -m kernels.aot                       # ModelScope's shapes, sm_80 and sm_90: a table; exit 1 on a misfit
    python -m kernels.aot --frames 16 --ranks 4 --capabilities 90

    launches = record_launches(lambda: run_ops_on_meta_tensors())   # the launchers' own tiles and specialisation
    reports = [compile_for(launch, capability) for launch in launches for capability in (80, 90)]

``record_launches`` runs the ops' fused paths on meta tensors as if they were CUDA tensors, with every Triton
kernel replaced by a recorder: the launchers pick their GPU tiles, and each launch is specialised the way Triton
specialises it (integers equal to 1 become constants, integers divisible by 16 and 16-byte-aligned pointers get
divisibility hints). ``compile_for`` compiles one launch with ``triton.compile`` for an NVIDIA target through
Triton's bundled ptxas and reads registers and spills from ptxas' own log, shared memory from the metadata.
Triton's interpreter replaces the kernels, so this runs in a process without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import inspect
import io
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from kernels import _utils
from kernels._utils import triton

KERNEL_MODULES = ("kernels.lora_linear", "kernels.temporal_attention", "kernels.cfg_ddim")
# Most shared memory one block may use (bytes): A100 (sm_80) 163 KiB, H100 / H200 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


@dataclass(frozen=True)
class Launch:
    """One kernel launch, specialised as Triton specialises it; hashable, so repeated launches collapse."""

    kernel_name: str
    signature: tuple[tuple[str, str], ...]  # (argument, Triton type or "constexpr")
    constants: tuple[tuple[str, object], ...]
    aligned: tuple[int, ...]  # argument positions with a divisibility-by-16 hint
    num_warps: int
    num_stages: int

    @property
    def settings(self) -> str:
        """The launcher's choices: block sizes and flags, warps, stages."""
        blocks = ", ".join(f"{k}={v}" for k, v in self.constants if k.isupper() and k != "INPUT_PRECISION")
        unit = " ".join(k.removeprefix("stride_") for k, v in self.constants if k.startswith("stride_"))
        return f"{blocks}, warps={self.num_warps}, stages={self.num_stages}" + (f", unit strides {unit}" if unit else "")


@dataclass(frozen=True)
class CompileReport:
    launch: Launch
    capability: int
    registers: int
    spill_bytes: int  # spill stores + spill loads
    shared_bytes: int

    @property
    def shared_limit(self) -> int:
        return SHARED_LIMIT[self.capability]

    @property
    def fits(self) -> bool:
        return (self.spill_bytes == 0 or self.accepted_spill) and self.shared_bytes <= self.shared_limit

    @property
    def accepted_spill(self) -> bool:
        """The temporal-attention backward spills a few dozen bytes from 32 frames on, at every warp count and
        stage count tried (its [L, L] tiles; see temporal_attention._settings): correct, slower, and known."""
        return self.launch.kernel_name == "_temporal_attn_bwd_kernel" and dict(self.launch.constants)["BLOCK_L"] >= 32


def _specialise(kernel, args: tuple, kwargs: dict) -> Launch:
    kwargs = dict(kwargs)
    options = {name: kwargs.pop(name) for name in _LAUNCH_OPTIONS if name in kwargs}
    bound = inspect.signature(kernel.fn).bind(*args, **kwargs).arguments
    signature, constants, aligned = [], [], []
    for position, param in enumerate(kernel.params):
        value = bound[param.name]
        if param.is_constexpr or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            kind = "constexpr"
            constants.append((param.name, value))
        elif isinstance(value, torch.Tensor):
            kind = _POINTER_TYPES[value.dtype]
            aligned.append(position)  # fresh allocations and the views the launchers see start 16-byte aligned
        elif isinstance(value, bool):
            kind = "i1"
        elif isinstance(value, int):
            kind = "i32" if -(2 ** 31) <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                aligned.append(position)
        elif isinstance(value, float):
            kind = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: cannot specialise argument {param.name}={value!r}")
        signature.append((param.name, kind))
    return Launch(kernel.fn.__name__, tuple(signature), tuple(constants), tuple(aligned),
                  options.get("num_warps", 4), options.get("num_stages", 3))


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args)`` records the launch instead of running it."""

    def __init__(self, kernel, launches: list[Launch]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(_specialise(self.kernel, args, kwargs))


@contextlib.contextmanager
def _recording(launches: list[Launch]):
    modules = [importlib.import_module(name) for name in KERNEL_MODULES]
    swapped = [(module, name, value) for module in modules for name, value in vars(module).items()
               if isinstance(value, triton.runtime.JITFunction)]
    is_interpreted = _utils.is_interpreted
    try:
        for module, name, kernel in swapped:
            setattr(module, name, _Recorder(kernel, launches))
        _utils.is_interpreted = lambda tensor: False  # the launchers pick their GPU settings
        yield
    finally:
        _utils.is_interpreted = is_interpreted
        for module, name, kernel in swapped:
            setattr(module, name, kernel)


def record_launches(run: Callable[[], object]) -> list[Launch]:
    """The distinct launches ``run`` makes, in order. ``run`` calls the ops' ``_fused`` paths on meta tensors
    (forward, and backward where it calls it)."""
    launches: list[Launch] = []
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        with _recording(launches):
            run()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return list(dict.fromkeys(launches))


_PTXAS_USAGE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.S)


def compile_for(launch: Launch, capability: int) -> CompileReport:
    """``triton.compile`` for an NVIDIA GPU of this compute capability (80: A100, 90: H100 / H200)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = next(m for m in map(importlib.import_module, KERNEL_MODULES) if hasattr(m, launch.kernel_name))
    kernel = getattr(module, launch.kernel_name)
    source = ASTSource(kernel, dict(launch.signature), dict(launch.constants),
                       {(position,): [["tt.divisibility", 16]] for position in launch.aligned})
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed by Triton
        knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its report
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    usage = _PTXAS_USAGE.search(log.getvalue())
    if usage is None:
        raise RuntimeError(f"{launch.kernel_name}: no register report in ptxas' log:\n{log.getvalue()}")
    stores, loads, registers = map(int, usage.groups())
    return CompileReport(launch, capability, registers, stores + loads, int(compiled.metadata.shared))


# %% ModelScope's shapes ----------------------------------------------------------------------------------------------
WIDTHS = (320, 640, 1280)  # UNet3D block channels; attention heads of dim 64
TEXT_WIDTH, TEXT_TOKENS = 1024, 77  # cross-attention keys and values come from the OpenCLIP text states
LATENT_SIDE = 32  # 256 x 256 videos
_DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _meta(*shape, dtype, grad=False):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


def _lora_layers(dtype, frames: int, rank: int, training: bool) -> None:
    """to_q / to_k / to_v (no bias), to_out.0 (bias) and cross-attention to_k / to_v, forward and backward."""
    lora_linear = importlib.import_module("kernels.lora_linear")
    pixels = frames * LATENT_SIDE ** 2
    # fp32 launches the kernel only with TF32 on (full fp32 goes to cuBLAS: see lora_linear._unsupported);
    # record_launches restores the switch
    torch.backends.cuda.matmul.allow_tf32 = dtype == torch.float32
    for width in WIDTHS:
        for in_features, tokens, bias in ((width, pixels, False), (width, pixels, True),
                                          (TEXT_WIDTH, frames * TEXT_TOKENS, False)):
            x, lora_a = _meta(tokens, in_features, dtype=dtype, grad=training), _meta(rank, in_features, dtype=dtype, grad=training)
            weight, lora_b = _meta(width, in_features, dtype=dtype), _meta(width, rank, dtype=dtype, grad=training)
            with torch.set_grad_enabled(training):
                y = lora_linear._fused(x, weight, _meta(width, dtype=dtype) if bias else None, lora_a, lora_b, 1.0)
            if training:
                y.sum().backward()
    torch.backends.cuda.matmul.allow_tf32 = False


def _temporal_attention(dtype, frames: int) -> None:
    """Heads of dim 64 read as views of the [batch * h * w, frames, width] projections, as the engine does."""
    temporal_attention = importlib.import_module("kernels.temporal_attention")
    for width in WIDTHS:
        q, k, v = (_meta(LATENT_SIDE ** 2, frames, width, dtype=dtype, grad=True)
                   .unflatten(-1, (width // 64, 64)).transpose(1, 2) for _ in range(3))
        temporal_attention._fused(q, k, v).sum().backward()


def _cfg_ddim(dtype, frames: int) -> None:
    cfg_ddim = importlib.import_module("kernels.cfg_ddim")
    shape = (1, 4, frames, LATENT_SIDE, LATENT_SIDE)
    for eta in (0.0, 1.0):
        for prediction in ("epsilon", "v_prediction"):
            x, eps_u, eps_c = (_meta(*shape, dtype=dtype, grad=True) for _ in range(3))
            cfg_ddim._fused(x, eps_u, eps_c, 9.0, 0.5, 0.6, eta, _meta(*shape, dtype=dtype), prediction).sum().backward()
    x, v_u, v_c = (_meta(*shape, dtype=dtype, grad=True) for _ in range(3))
    cfg_ddim._fused_flow(x, v_u, v_c, 5.0, 0.5, 0.45).sum().backward()


def modelscope_launches(dtypes=tuple(_DTYPE_NAMES.values()), frames=(16, 32), ranks=(4, 8, 16, 32, 64)) -> list[Launch]:
    """Every distinct launch of the three ops in a ModelScope UNet3D at these dtypes, frame counts and LoRA ranks:
    sampling (no grad) and training (forward and backward)."""
    def run():
        for dtype in dtypes:
            for n_frames in frames:
                for rank in ranks:
                    for training in (False, True):
                        _lora_layers(dtype, n_frames, rank, training)
                _temporal_attention(dtype, n_frames)
                _cfg_ddim(dtype, n_frames)

    return record_launches(run)


def table(reports: list[CompileReport]) -> str:
    lines = [f"{'kernel':<26} {'sm':>3} {'regs':>5} {'spill B':>8} {'shared B':>9}  types | settings"]
    for r in reports:
        types = ",".join(sorted({kind.lstrip("*") for _, kind in r.launch.signature if kind.startswith("*")}))
        lines.append(f"{r.launch.kernel_name:<26} {r.capability:>3} {r.registers:>5} {r.spill_bytes:>8} "
                     f"{r.shared_bytes:>9}  {types} | {r.launch.settings}"
                     + ("   <-- MISFIT" if not r.fits else "   (known spill)" if r.spill_bytes else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", choices=list(_DTYPE_NAMES), default=list(_DTYPE_NAMES))
    parser.add_argument("--frames", nargs="+", type=int, default=[16, 32])
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16, 32, 64])
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiler processes")
    parser.add_argument("--capabilities", nargs="+", type=int, choices=sorted(SHARED_LIMIT), default=sorted(SHARED_LIMIT))
    args = parser.parse_args(argv)
    if not _utils.triton_available():
        parser.exit(2, "error: Triton is not installed; install the engine's requirements (pip install -e .)\n")
    if _utils.interpret_requested():
        parser.exit(2, "error: TRITON_INTERPRET=1 replaces the kernels with the interpreter; run without it\n")
    launches = modelscope_launches(tuple(_DTYPE_NAMES[d] for d in args.dtypes), tuple(args.frames), tuple(args.ranks))
    jobs = [(launch, capability) for launch in launches for capability in args.capabilities]
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(compile_for, *job) for job in jobs]
        for done, _ in enumerate(concurrent.futures.as_completed(futures), 1):
            if done % 20 == 0 or done == len(jobs):
                print(f"compiled {done}/{len(jobs)}", file=sys.stderr, flush=True)
        reports = [future.result() for future in futures]
    misfits = [r for r in reports if not r.fits]
    print(f"{len(launches)} distinct launches at ModelScope's shapes, Triton {triton.__version__}, each compiled for "
          + " and ".join(f"sm_{c}" for c in args.capabilities) + ":\n" + table(reports))
    if misfits:
        print(f"{len(misfits)} compiled kernels spill registers or pass the shared-memory limit "
              f"({', '.join(f'sm_{c}: {SHARED_LIMIT[c]} B' for c in args.capabilities)})")
    return 1 if misfits else 0


if __name__ == "__main__":
    sys.exit(main())
