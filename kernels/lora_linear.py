"""Fused LoRA linear: ``y = x W^T + b + s (x A^T) B^T`` with W, b frozen and A [r, K], B [N, r] trained.

peft runs three GEMMs and an add: x is read twice, and the [M, N] low-rank product is written and read back
before the add, which at ModelScope's width 320 (memory-bound on an H100) roughly doubles HBM traffic.
Here one kernel computes

    OUT = IN @ P + s (IN @ Q) @ R   (+ bias),   and writes T = IN @ Q   ([M, r], tiny) for backward,

accumulating IN @ P and IN @ Q from the same tiles of IN in its K loop and adding the low-rank product in the
epilogue. The same kernel does both passes (LoRAFusion's structure):

    forward   IN = x,  P = W^T, Q = A^T, R = B^T  ->  OUT = y,  T = x A^T
    backward  IN = dY, P = W,   Q = B,   R = A    ->  OUT = dX, T = dS = dY B

so nothing of size M x N is materialised besides dY. Then dA = s dS^T x and dB = s dY^T (x A^T) are skinny
GEMMs with long reductions over M, left to cuBLAS. dW and db are never computed (the base layer is frozen).
Each program recomputes its [BLOCK_M, r] slice of IN @ Q; with BLOCK_N = 64..128 and r padded to 16 that is
12-25% extra tensor-core work in a memory-bound kernel.
"""

from __future__ import annotations

import numbers

import torch

from kernels import _utils, dispatch
from kernels._utils import jit, tl, triton
from kernels.reference import lora_linear_ref

MAX_RANK = 64
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# %% Compute kernel -------------------------------------------------------------------------------------------------
@jit
def _lora_gemm_kernel(
    # pointers
    IN, P, Q, R, BIAS, OUT, T,
    # sizes: IN [M, K], P [K, N], Q [K, RANK], R [RANK, N]
    M, N, K, RANK,
    # strides
    stride_im, stride_ik, stride_pk, stride_pn, stride_qk, stride_qr, stride_rr, stride_rn,
    stride_om, stride_on, stride_tm, stride_tr,
    # scalars
    scale,
    # meta
    HAS_BIAS: tl.constexpr, STORE_T: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # -- program id -> output tile, GROUP_M row-tiles at a time so that programs running together share IN in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    # -- row / column / rank indices; rows in int64 so M * stride may pass 2**31
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    in_ptrs = IN + rm[:, None] * stride_im + rk[None, :] * stride_ik
    p_ptrs = P + rk[:, None] * stride_pk + rn[None, :] * stride_pn
    q_ptrs = Q + rk[:, None] * stride_qk + rr[None, :] * stride_qr

    # -- K loop: IN @ P and IN @ Q from the same IN tile, fp32 accumulators
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(in_ptrs, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        p = tl.load(p_ptrs, mask=k_ok[:, None] & (rn[None, :] < N), other=0.0)
        q = tl.load(q_ptrs, mask=k_ok[:, None] & (rr[None, :] < RANK), other=0.0)
        if UPCAST_DOT:
            a, p, q = a.to(tl.float32), p.to(tl.float32), q.to(tl.float32)
        acc = tl.dot(a, p, acc, input_precision=INPUT_PRECISION)
        t = tl.dot(a, q, t, input_precision=INPUT_PRECISION)
        in_ptrs += BLOCK_K * stride_ik
        p_ptrs += BLOCK_K * stride_pk
        q_ptrs += BLOCK_K * stride_qk

    # -- epilogue: + s (IN @ Q) @ R, with IN @ Q rounded to IN's dtype first, as peft's lora_A output is
    t_lo = t.to(IN.dtype.element_ty)
    r = tl.load(R + rr[:, None] * stride_rr + rn[None, :] * stride_rn,
                mask=(rr[:, None] < RANK) & (rn[None, :] < N), other=0.0)
    if UPCAST_DOT:
        acc += scale * tl.dot(t_lo.to(tl.float32), r.to(tl.float32), input_precision=INPUT_PRECISION)
    else:
        acc += scale * tl.dot(t_lo, r, out_dtype=tl.float32, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]

    # -- masked stores; T once per row block (by the first column of programs)
    row_ok = rm[:, None] < M
    tl.store(OUT + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(OUT.dtype.element_ty),
             mask=row_ok & (rn[None, :] < N))
    if STORE_T:
        tl.store(T + rm[:, None] * stride_tm + rr[None, :] * stride_tr, t_lo,
                 mask=row_ok & (rr[None, :] < RANK) & (pid_n == 0))


# %% Launcher -------------------------------------------------------------------------------------------------------
def default_tiles(inp: torch.Tensor, n: int, k: int) -> dict:
    """Tile sizes. GPU: 128 x 64 tiles, BLOCK_K 32, 8 warps, 3 stages: the largest tiles that compile without
    register spills on both sm_80 and sm_90 for every dtype, rank (up to 64) and pass (``python -m kernels.aot``;
    BLOCK_N 128 or BLOCK_K 64 spill on sm_80 when T is stored or the rank is 64). The interpreter pays ~0.1 ms
    per tl op whatever the tile size, so it gets a few big tiles."""
    if _utils.is_interpreted(inp):
        return dict(BLOCK_M=512, BLOCK_N=min(256, _utils.next_pow2(n)), BLOCK_K=min(256, _utils.next_pow2(k)),
                    GROUP_M=8, num_warps=4, num_stages=1)
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)


def lora_gemm(inp, p, q, r, bias, scale: float, store_t: bool, tiles: dict | None = None):
    """OUT = inp @ p + scale (inp @ q) @ r (+ bias), and T = inp @ q when ``store_t``; any strides.

    (1) checks shapes; (2) allocates OUT [M, N] in inp's dtype and T [M, r]; (3) launches one program per tile.
    ``tiles`` overrides ``default_tiles`` (tests use small tiles to cover the multi-tile paths).
    """
    m, k = inp.shape
    n, rank = p.shape[1], q.shape[1]
    assert p.shape[0] == k and q.shape[0] == k and r.shape == (rank, n), (inp.shape, p.shape, q.shape, r.shape)
    assert 1 <= rank <= MAX_RANK, rank
    out = _utils.empty((m, n), inp.dtype, inp.device)
    t = _utils.empty((m, rank), inp.dtype, inp.device) if store_t else out
    cfg = tiles or default_tiles(inp, n, k)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    with _utils.device_context(inp):
        _lora_gemm_kernel[grid](
            inp, p, q, r, bias if bias is not None else out, out, t,
            m, n, k, rank,
            inp.stride(0), inp.stride(1), p.stride(0), p.stride(1), q.stride(0), q.stride(1), r.stride(0), r.stride(1),
            out.stride(0), out.stride(1), t.stride(0), t.stride(1),
            scale,
            HAS_BIAS=bias is not None, STORE_T=store_t, UPCAST_DOT=_utils.upcast_dot(inp),
            INPUT_PRECISION=_utils.dot_precision(inp.dtype), BLOCK_R=_utils.next_pow2(rank), **cfg,
        )
    return out, (t if store_t else None)


# %% Autograd -------------------------------------------------------------------------------------------------------
class LoRALinearFunction(torch.autograd.Function):
    """Gradients (unsloth's derivation, with S = x A^T and dS = dY B):
        dX = dY W + s dS A        (one pass of the fused kernel, which also writes dS)
        dA = s dS^T x             dB = s dY^T S
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, store_s):
        x2d = x.reshape(-1, x.shape[-1])
        y, s = lora_gemm(x2d, weight.t(), lora_A.t(), lora_B.t(), bias, scale, store_t=store_s)
        ctx.save_for_backward(x2d, weight, lora_A, lora_B, s)
        ctx.scale = scale
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_A, lora_B, s = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dy2d = dy.reshape(-1, dy.shape[-1])
        dx = ds = None
        if need_x:
            dx, ds = lora_gemm(dy2d, weight, lora_B, lora_A, None, ctx.scale, store_t=need_a)
            dx = dx.view(*dy.shape[:-1], weight.shape[1])
        elif need_a:
            ds = dy2d @ lora_B
        da = torch.mm(ds.t(), x2d).mul_(ctx.scale) if need_a else None
        db = torch.mm(dy2d.t(), s).mul_(ctx.scale) if need_b else None
        return dx, None, None, da, db, None, None


# %% Public functions -----------------------------------------------------------------------------------------------
def _unsupported(x, weight, bias, lora_A, lora_B, scale) -> str | None:
    tensors = [x, weight, lora_A, lora_B] + ([bias] if bias is not None else [])
    n, k = weight.shape if weight.ndim == 2 else (-1, -1)
    rank = lora_A.shape[0]
    if (x.ndim == 0 or x.shape[-1] != k or lora_A.shape != (rank, k) or lora_B.shape != (n, rank)
            or (bias is not None and bias.shape != (n,))):
        return "shapes do not fit x [..., K], weight [N, K], bias [N], lora_A [r, K], lora_B [N, r]"
    dtypes = {t.dtype for t in tensors}
    autocast = _utils.autocast_dtype(x.device.type)  # casts every operand to one dtype, as for F.linear
    if not dtypes <= set(_DTYPES) or (len(dtypes) > 1 and autocast is None) or autocast not in (None, *_DTYPES):
        return f"dtypes {sorted(map(str, dtypes))} (supported: one of fp32, fp16, bf16 for all)"
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return "the base weight or bias needs a gradient (the kernel treats the base layer as frozen)"
    if x.is_cuda and x.dtype == torch.float32 and autocast is None and _utils.dot_precision(x.dtype) == "ieee":
        return ("fp32 without TF32 (torch.backends.cuda.matmul.allow_tf32 is False): cuBLAS runs it, since "
                "Triton's FMA GEMM spills registers at every tile size")
    if not 1 <= rank <= MAX_RANK:
        return f"rank {rank} (supported: 1..{MAX_RANK})"
    if x.numel() == 0:
        return "empty input"
    if not isinstance(scale, numbers.Real):
        return "scale must be a Python number"
    return None


def _fused(x, weight, bias, lora_A, lora_B, scale):
    dtype = _utils.autocast_dtype(x.device.type)
    if dtype is not None:  # what autocast does for F.linear: every operand in the autocast dtype
        x, weight, lora_A, lora_B = (t.to(dtype) for t in (x, weight, lora_A, lora_B))
        bias = bias.to(dtype) if bias is not None else None
    # S = x A^T is only needed for dB; inside forward autograd has switched grad mode off, so decide here
    store_s = torch.is_grad_enabled() and lora_B.requires_grad
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scale), store_s)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``x W^T + b + scale (x A^T) B^T`` for x [..., K], weight [N, K] and bias [N] (frozen), lora_A [r, K] and
    lora_B [N, r]: peft's ``lora.Linear`` with one adapter. Dispatches between the Triton kernel and
    ``kernels.reference.lora_linear_ref`` (see ``kernels.dispatch``)."""
    return dispatch.run("lora_linear", _fused, lora_linear_ref, _unsupported, x, weight, bias, lora_A, lora_B, scale)
