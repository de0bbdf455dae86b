"""Temporal attention: ``softmax(q k^T * scale) v`` over the frames of many short sequences.

In a video UNet's temporal layers every (batch, pixel, head) is its own sequence of F frames: 16 frames, head
dim 64, tens of thousands of sequences. FlashAttention-style kernels put one sequence in a 128-row tile (1/8
of it useful at 16 frames) and put the batch on a grid axis limited to 65,535 (SDPA and xformers fail past
that: pytorch#142228, xformers#845). Here a program holds BLOCK_G whole sequences as [G, L, D] tiles, does
both products as batched ``tl.dot`` and the exact softmax in registers, and the flattened sequence-group index
is grid axis 0 (2**31 - 1 programs).

q, k, v and the gradients are read through their strides as 4-D [B, H, L, D] views, so diffusers' layout
(to_q output [B*h*w, F, heads * D] viewed as [B*h*w, heads, F, D]) needs no permute copy, and the output is
allocated in the [B, L, H, D] memory order so that merging the heads back is a free view too.

Backward recomputes P from the saved log-sum-exp (base 2) and gets delta = rowsum(dO * O) as rowsum(P * dP),
so O is not read again.
"""

from __future__ import annotations

import math
import numbers

import torch

from kernels import _utils, dispatch
from kernels._utils import jit, tl, triton
from kernels.reference import temporal_attention_ref

MAX_LEN = 64
MAX_HEAD_DIM = 128
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


# %% Compute kernels ------------------------------------------------------------------------------------------------
@jit
def _sequence_group(S, L, D, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's BLOCK_G sequence indices (int64), its frame indices and the [G, L, D] in-bounds mask."""
    seq = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    frame = tl.arange(0, BLOCK_L)
    d = tl.arange(0, BLOCK_D)
    mask = (seq < S)[:, None, None] & (frame < L)[None, :, None] & (d < D)[None, None, :]
    return seq, frame, mask


@jit
def _tile_offsets(seq, frame, H, BLOCK_D: tl.constexpr, stride_b, stride_h, stride_l, stride_d):
    """Element offsets of the [G, L, D] tile of sequences ``seq`` (= b * H + h) in a strided [B, H, L, D] view."""
    b, h = seq // H, seq % H
    d = tl.arange(0, BLOCK_D)
    return (b * stride_b + h * stride_h)[:, None, None] + frame[None, :, None] * stride_l + d[None, None, :] * stride_d


@jit
def _temporal_attn_fwd_kernel(
    # pointers
    Q, K, V, OUT, LSE,
    # sizes: S = B * H sequences of L frames, head dim D
    S, H, L, D,
    # strides ([B, H, L, D] views)
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
    # scalars
    qk_scale,  # softmax scale * log2(e)
    # meta
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # -- program -> BLOCK_G sequences; [G, L, D] tiles through the strides
    seq, frame, mask = _sequence_group(S, L, D, BLOCK_G, BLOCK_L, BLOCK_D)
    q = tl.load(Q + _tile_offsets(seq, frame, H, BLOCK_D, sqb, sqh, sql, sqd), mask=mask, other=0.0)
    k = tl.load(K + _tile_offsets(seq, frame, H, BLOCK_D, skb, skh, skl, skd), mask=mask, other=0.0)
    v = tl.load(V + _tile_offsets(seq, frame, H, BLOCK_D, svb, svh, svl, svd), mask=mask, other=0.0)
    if UPCAST_DOT:
        q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)

    # -- scores and exact softmax (base 2) in registers; padded key frames get no weight
    s = tl.dot(q, tl.permute(k, (0, 2, 1)), out_dtype=tl.float32, input_precision=INPUT_PRECISION) * qk_scale
    s = tl.where((frame < L)[None, None, :], s, float("-inf"))
    m = tl.max(s, 2)
    p = tl.exp2(s - m[:, :, None])
    denom = tl.sum(p, 2)
    p = p / denom[:, :, None]
    o = tl.dot(p.to(v.dtype), v, out_dtype=tl.float32, input_precision=INPUT_PRECISION)

    # -- masked stores: O, and the log-sum-exp for backward
    tl.store(OUT + _tile_offsets(seq, frame, H, BLOCK_D, sob, soh, sol, sod), o.to(OUT.dtype.element_ty), mask=mask)
    tl.store(LSE + seq[:, None] * L + frame[None, :], m + tl.log2(denom),
             mask=(seq < S)[:, None] & (frame < L)[None, :])


@jit
def _temporal_attn_bwd_kernel(
    # pointers
    Q, K, V, DO, LSE, DQ, DK, DV,
    # sizes
    S, H, L, D,
    # strides ([B, H, L, D] views; DQ, DK, DV share one layout)
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sdob, sdoh, sdol, sdod, sgb, sgh, sgl, sgd,
    # scalars
    scale, qk_scale,
    # meta
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq, frame, mask = _sequence_group(S, L, D, BLOCK_G, BLOCK_L, BLOCK_D)
    q = tl.load(Q + _tile_offsets(seq, frame, H, BLOCK_D, sqb, sqh, sql, sqd), mask=mask, other=0.0)
    k = tl.load(K + _tile_offsets(seq, frame, H, BLOCK_D, skb, skh, skl, skd), mask=mask, other=0.0)
    v = tl.load(V + _tile_offsets(seq, frame, H, BLOCK_D, svb, svh, svl, svd), mask=mask, other=0.0)
    do = tl.load(DO + _tile_offsets(seq, frame, H, BLOCK_D, sdob, sdoh, sdol, sdod), mask=mask, other=0.0)
    lse = tl.load(LSE + seq[:, None] * L + frame[None, :], mask=(seq < S)[:, None] & (frame < L)[None, :], other=0.0)
    if UPCAST_DOT:
        q, k, v, do = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32), do.to(tl.float32)

    # -- P^T [G, key, query] recomputed from the log-sum-exp; padded keys carry no probability. Padded queries
    #    have dO = 0, which zeroes their column of dS^T below, so they leave dK, dV untouched.
    st = tl.dot(k, tl.permute(q, (0, 2, 1)), out_dtype=tl.float32, input_precision=INPUT_PRECISION) * qk_scale
    pt = tl.where((frame < L)[None, :, None], tl.exp2(st - lse[:, None, :]), 0.0)

    # -- dV = P^T dO;  dP^T = V dO^T;  delta = rowsum(dO * O) = colsum(P^T * dP^T);  dS^T = P^T (dP^T - delta)
    dv = tl.dot(pt.to(do.dtype), do, out_dtype=tl.float32, input_precision=INPUT_PRECISION)
    dpt = tl.dot(v, tl.permute(do, (0, 2, 1)), out_dtype=tl.float32, input_precision=INPUT_PRECISION)
    delta = tl.sum(pt * dpt, 1)
    dst = (pt * (dpt - delta[:, None, :])).to(q.dtype)

    # -- dK = dS^T Q * scale;  dQ = dS K * scale
    dk = tl.dot(dst, q, out_dtype=tl.float32, input_precision=INPUT_PRECISION) * scale
    dq = tl.dot(tl.permute(dst, (0, 2, 1)), k, out_dtype=tl.float32, input_precision=INPUT_PRECISION) * scale

    g_off = _tile_offsets(seq, frame, H, BLOCK_D, sgb, sgh, sgl, sgd)
    tl.store(DQ + g_off, dq.to(DQ.dtype.element_ty), mask=mask)
    tl.store(DK + g_off, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=mask)


# %% Launchers ------------------------------------------------------------------------------------------------------
_BLHD = (0, 2, 1, 3)  # memory order of outputs and gradients: heads merge back into [B, L, H * D] as a view


def _settings(x: torch.Tensor, seq_len: int, head_dim: int, backward: bool) -> dict:
    """BLOCK_G sequences per program: about 4096 (forward) / 2048 (backward, seven live tiles) elements per
    [G, L, D] tile on a GPU. At 16 frames, head dim 64 that is G = 4 / 2 and 80 / 122 registers with 4 warps,
    no spills (ptxas, sm_80 and sm_90). From 32 frames the 16-bit backward spills 56-64 bytes even at G = 1,
    with 4, 8 or 16 warps (``python -m kernels.aot``): correct, slower. The interpreter gets 64K-element tiles, since it runs programs one at a time."""
    block_l, block_d = _utils.next_pow2(seq_len), _utils.next_pow2(head_dim)
    budget = 1 << 16 if _utils.is_interpreted(x) else (2048 if backward else 4096)
    block_g = max(1, min(256, budget // (block_l * block_d)))
    return dict(BLOCK_G=block_g, BLOCK_L=block_l, BLOCK_D=block_d, num_warps=8 if block_l >= 32 else 4)


def attention_forward(q, k, v, scale: float):
    """(1) 4-D views of one shape; (2) O in [B, L, H, D] memory order + LSE [B*H, L] fp32; (3) launch."""
    bsz, heads, seq_len, head_dim = q.shape
    o = _utils.empty(q.shape, q.dtype, q.device, permute=_BLHD)
    lse = _utils.empty((bsz * heads, seq_len), torch.float32, q.device)
    cfg = _settings(q, seq_len, head_dim, backward=False)
    grid = (triton.cdiv(bsz * heads, cfg["BLOCK_G"]),)
    with _utils.device_context(q):
        _temporal_attn_fwd_kernel[grid](
            q, k, v, o, lse, bsz * heads, heads, seq_len, head_dim,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(), scale * _LOG2E,
            UPCAST_DOT=_utils.upcast_dot(q), INPUT_PRECISION=_utils.dot_precision(q.dtype), **cfg,
        )
    return o, lse


def attention_backward(q, k, v, lse, do, scale: float):
    bsz, heads, seq_len, head_dim = q.shape
    dq, dk, dv = (_utils.empty(q.shape, q.dtype, q.device, permute=_BLHD) for _ in range(3))
    cfg = _settings(q, seq_len, head_dim, backward=True)
    grid = (triton.cdiv(bsz * heads, cfg["BLOCK_G"]),)
    with _utils.device_context(q):
        _temporal_attn_bwd_kernel[grid](
            q, k, v, do, lse, dq, dk, dv, bsz * heads, heads, seq_len, head_dim,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), scale, scale * _LOG2E,
            UPCAST_DOT=_utils.upcast_dot(q), INPUT_PRECISION=_utils.dot_precision(q.dtype), **cfg,
        )
    return dq, dk, dv


# %% Autograd -------------------------------------------------------------------------------------------------------
class TemporalAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = attention_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, lse = ctx.saved_tensors
        return (*attention_backward(q, k, v, lse, do, ctx.scale), None)


# %% Public functions -----------------------------------------------------------------------------------------------
def _as_4d(x: torch.Tensor) -> torch.Tensor:
    """[..., L, D] -> [B, H, L, D]: a view for 3-D and 4-D inputs (more leading dims may copy)."""
    if x.ndim == 3:
        return x.unsqueeze(1)
    return x if x.ndim == 4 else x.flatten(0, -4)


def _unsupported(q, k, v, scale=None) -> str | None:
    if q.ndim < 3 or not (q.shape == k.shape == v.shape):
        return f"shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} (supported: equal, [..., L, D])"
    dtypes = {q.dtype, k.dtype, v.dtype}
    autocast = _utils.autocast_dtype(q.device.type)
    if not dtypes <= set(_DTYPES) or (len(dtypes) > 1 and autocast is None) or autocast not in (None, *_DTYPES):
        return f"dtypes {sorted(map(str, dtypes))} (supported: one of fp32, fp16, bf16 for all)"
    seq_len, head_dim = q.shape[-2:]
    if seq_len > MAX_LEN or head_dim > MAX_HEAD_DIM:
        return f"{seq_len} frames x head dim {head_dim} (supported: up to {MAX_LEN} x {MAX_HEAD_DIM})"
    if q.numel() == 0:
        return "empty input"
    if scale is not None and not isinstance(scale, numbers.Real):
        return "scale must be a Python number"
    return None


def _fused(q, k, v, scale=None):
    dtype = _utils.autocast_dtype(q.device.type)
    if dtype is not None:  # what autocast does for SDPA
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o = TemporalAttentionFunction.apply(_as_4d(q), _as_4d(k), _as_4d(v), scale)
    return o if q.ndim == 4 else o.reshape(q.shape)


def temporal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` for q, k, v [..., L, D] of one shape and any strides (L <= 64 frames, D <= 128),
    scale 1/sqrt(D) by default: SDPA without mask, dropout or causality. Dispatches between the Triton kernel and
    ``kernels.reference.temporal_attention_ref`` (see ``kernels.dispatch``)."""
    return dispatch.run("temporal_attention", _fused, temporal_attention_ref, _unsupported, q, k, v, scale)
