"""The fused temporal attention against its reference (SDPA) and a float64 computation: output and the
gradients of q, k and v, over odd frame counts, head dims, strided layouts, dtypes and more than 65,536
sequences (past SDPA's and xformers' CUDA grid limit).

Where the kernels run, and the marks these tests share: kernel_support.py.
"""

import pytest
import torch

import kernels
from kernel_support import DEVICE, KERNEL_TEST

pytestmark = KERNEL_TEST
FLOOR = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # relative error allowed whatever the reference's


def attention_f64(q, k, v, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def qkv(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3)]


def forward_backward(fn, q, k, v, upstream, scale=None):
    out = fn(q, k, v, scale)
    return (out, *torch.autograd.grad(out, (q, k, v), upstream))


def compare(q, k, v, dtype, scale=None):
    upstream = torch.randn(q.shape, device=DEVICE).to(dtype)
    with kernels.use_backend("fused"):
        got = forward_backward(kernels.temporal_attention, q, k, v, upstream, scale)
    ref = forward_backward(kernels.temporal_attention_ref, q, k, v, upstream, scale)
    t64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    truth = forward_backward(attention_f64, *t64, upstream.double(), scale)
    for g, r, t in zip(got, ref, truth):
        assert g.dtype == r.dtype and g.shape == r.shape and not g.isnan().any()
        err, ref_err = (g.double() - t).abs().max(), (r.double() - t).abs().max()
        assert err <= 2 * ref_err + FLOOR[dtype] * t.abs().max(), (err, ref_err)


@pytest.mark.parametrize("shape", [
    (3, 2, 7, 8),     # odd frame count, head dim under the 16-wide dot minimum
    (2, 3, 13, 40),   # ModelScope's 40-wide heads padded to 64
    (1, 2, 16, 80),
    (2, 1, 16, 128),
    (1, 1, 64, 16),   # the longest sequence supported
    (5, 1, 1, 16),    # one frame: softmax of a single score
    (70, 13, 16),     # 3-D [sequences, frames, dim]
])
def test_fp32_matches_reference_and_float64(shape):
    compare(*qkv(shape, torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_reference_and_float64(dtype):
    compare(*qkv((4, 2, 16, 64), dtype), dtype)


def test_custom_scale():
    compare(*qkv((2, 2, 9, 16), torch.float32), torch.float32, scale=0.3)


def test_diffusers_layout_is_read_through_strides():
    """A projection [B*h*w, F, heads * D] viewed as [B*h*w, heads, F, D]: no copy in, heads merge back as a view."""
    batch, frames, heads, dim = 6, 11, 3, 24
    q, k, v = (t.detach().unflatten(-1, (heads, dim)).transpose(1, 2).requires_grad_()
               for t in qkv((batch, frames, heads * dim), torch.float32))
    assert not q.is_contiguous()
    compare(q, k, v, torch.float32)
    with kernels.use_backend("fused"):
        out = kernels.temporal_attention(q, k, v)
    merged = out.transpose(1, 2).reshape(batch, frames, heads * dim)
    assert merged.data_ptr() == out.data_ptr() and merged.is_contiguous()


def test_more_sequences_than_a_cuda_grid_axis_allows():
    """70,000 sequences: one grid axis-0 index per group of sequences, no 65,535 limit."""
    q, k, v = qkv((70_000, 5, 8), torch.float32, seed=1)
    upstream = torch.randn(q.shape, device=DEVICE)
    with kernels.use_backend("fused"):
        got = forward_backward(kernels.temporal_attention, q, k, v, upstream)
    ref = forward_backward(kernels.temporal_attention_ref, q, k, v, upstream)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4)


def test_unsupported_shapes_fall_back_to_the_reference():
    q, k, v = qkv((2, 1, 65, 8), torch.float32)  # more frames than the kernel holds
    with kernels.use_backend("fused"):
        out = kernels.temporal_attention(q, k, v)
    assert "TemporalAttentionFunction" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, kernels.temporal_attention_ref(q, k, v))
