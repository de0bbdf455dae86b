"""The fused LoRA linear against its reference (peft's arithmetic) and a float64 computation: output and the
gradients of x, A and B, over ragged shapes, ranks 1..64, strided inputs and three dtypes.

Where the kernels run, and the marks these tests share: kernel_support.py.
"""

import pytest
import torch

import kernels
from kernel_support import DEVICE, KERNEL_TEST
from kernels.lora_linear import lora_gemm

pytestmark = KERNEL_TEST
FLOOR = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # relative error allowed whatever the reference's
SMALL_TILES = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)


def layer(lead, k, n, rank, bias, dtype, seed=0):
    """x, W, b, A, B like a peft layer whose B has been trained away from zero."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s, std=1.0: (torch.randn(s, generator=g) * std).to(DEVICE, dtype)  # noqa: E731
    x = rand(*lead, k).requires_grad_()
    w, b = rand(n, k, std=k ** -0.5), (rand(n) if bias else None)
    a, bb = rand(rank, k, std=k ** -0.5).requires_grad_(), rand(n, rank, std=0.5).requires_grad_()
    return x, w, b, a, bb


def forward_backward(fn, x, w, b, a, bb, scale, upstream):
    out = fn(x, w, b, a, bb, scale)
    return (out, *torch.autograd.grad(out, (x, a, bb), upstream))


def check(got, ref, truth, dtype):
    for g, r, t in zip(got, ref, truth):
        assert g.dtype == r.dtype and g.shape == r.shape and not g.isnan().any()
        err, ref_err = (g.double() - t).abs().max(), (r.double() - t).abs().max()
        assert err <= 2 * ref_err + FLOOR[dtype] * t.abs().max(), (err, ref_err)


def compare(lead, k, n, rank, bias, dtype, scale=0.75, make_x=None, make_upstream=None):
    x, w, b, a, bb = layer(lead, k, n, rank, bias, dtype)
    upstream = torch.randn(*lead, n, device=DEVICE).to(dtype)
    if make_x is not None:
        x, upstream = make_x(x.detach()).requires_grad_(), make_upstream(upstream)
    with kernels.use_backend("fused"):
        got = forward_backward(kernels.lora_linear, x, w, b, a, bb, scale, upstream)
    ref = forward_backward(kernels.lora_linear_ref, x, w, b, a, bb, scale, upstream)
    t64 = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (x, w, b, a, bb)]
    truth = forward_backward(kernels.lora_linear_ref, *t64, scale, upstream.double())
    check(got, ref, truth, dtype)


@pytest.mark.parametrize("lead, k, n, rank, bias", [
    ((3, 37), 40, 77, 1, True),     # M = 111, N and K not multiples of any tile
    ((130,), 320, 40, 64, False),   # rank 64, K spans two interpreter tiles of 256
    ((2, 5, 13), 77, 320, 4, True),
    ((1,), 8, 16, 3, True),         # a single row, dims under the 16-wide dot minimum
])
def test_fp32_matches_reference_and_float64(lead, k, n, rank, bias):
    compare(lead, k, n, rank, bias, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_reference_and_float64(dtype):
    compare((3, 45), 72, 96, 4, True, dtype)


def test_column_major_input_and_gradient():
    """x and dY as transposed views (what a permute in the caller leaves behind) are read through their strides."""
    compare((37,), 40, 48, 8, True, torch.float32, make_x=lambda x: x.t().contiguous().t(),
            make_upstream=lambda u: u.t().contiguous().t())


@pytest.mark.parametrize("rank", [1, 5, 64])
def test_every_tile_path_with_small_tiles(rank):
    """Many row, column and K tiles: grouped program order, the K loop, T written once per row block."""
    m, k, n = 97, 75, 70
    x, w, b, a, bb = layer((m,), k, n, rank, True, torch.float32, seed=rank)
    x, a, bb = x.detach(), a.detach(), bb.detach()
    out, t = lora_gemm(x, w.t(), a.t(), bb.t(), b, 0.5, store_t=True, tiles=SMALL_TILES)
    xd, wd, bd, ad, bbd = (v.double() for v in (x, w, b, a, bb))
    torch.testing.assert_close(out.double(), xd @ wd.t() + bd + 0.5 * (xd @ ad.t()) @ bbd.t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t.double(), xd @ ad.t(), atol=1e-5, rtol=1e-5)


def test_gradients_only_where_needed():
    """No x gradient (a frozen first layer): dS comes from dY B directly; still right for A and B."""
    x, w, b, a, bb = layer((20,), 24, 28, 4, False, torch.float32)
    x = x.detach()
    upstream = torch.randn(20, 28, device=DEVICE)
    with kernels.use_backend("fused"):
        grads = torch.autograd.grad(kernels.lora_linear(x, w, b, a, bb, 2.0), (a, bb), upstream)
    ref = torch.autograd.grad(kernels.lora_linear_ref(x, w, b, a, bb, 2.0), (a, bb), upstream)
    for got, expected in zip(grads, ref):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_trainable_base_weight_falls_back_to_the_reference():
    """The kernel never computes dW: a base weight that needs a gradient must not get a silent None."""
    x, w, b, a, bb = layer((10,), 16, 12, 2, True, torch.float32)
    w.requires_grad_()
    with kernels.use_backend("fused"):
        out = kernels.lora_linear(x, w, b, a, bb, 1.0)
    assert out.grad_fn is not None and "LoRALinearFunction" not in type(out.grad_fn).__name__
    (dw,) = torch.autograd.grad(out.sum(), [w])
    torch.testing.assert_close(dw, torch.autograd.grad(kernels.lora_linear_ref(x, w, b, a, bb, 1.0).sum(), [w])[0])


def test_autocast_runs_the_kernel_in_the_autocast_dtype():
    x, w, b, a, bb = layer((4, 9), 32, 24, 4, True, torch.float32)
    with kernels.use_backend("fused"), torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = kernels.lora_linear(x, w, b, a, bb, 1.0)
        ref = kernels.lora_linear_ref(x, w, b, a, bb, 1.0)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=2e-2)
