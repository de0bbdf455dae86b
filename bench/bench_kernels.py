"""Benchmark the fused kernels against what they replace, at ModelScope / zeroscope shapes, on one GPU.

    python -m bench.bench_kernels --out bench_kernels.json      # or: python bench/bench_kernels.py --out ...
    python -m bench.bench_kernels --quick                       # one shape per op

Ops, providers (the first baseline present is the reference for "speedup"), shapes:
- lora_linear: peft's lora.Linear (needs peft), the same math unfused in torch, fused. Rank 4 on the attention
  projections of each UNet level: width 320/640/1280 at latents 32x32 (256 px) and 72x128 (576x1024), 16
  frames, CFG batch 2, so M = 2 * 16 * h * w tokens.
- temporal_attention: diffusers' path (view/transpose, SDPA, transpose + reshape copy), xformers (if installed;
  it takes the [B, F, heads, D] layout directly), fused (strided reads, output already in merged-head order).
  16 frames, head dim 64, B*h*w*heads sequences: 10,240 at 32x32 width 320 up to 92,160 at 72x128, where SDPA
  and xformers hit the 65,535 CUDA grid limit (pytorch#142228, xformers#845): the error is reported.
- cfg_ddim_step: diffusers' CFG combine + DDIMScheduler.step (needs diffusers), the PyTorch reference
  (the same closed form, unfused), fused. x fp32 [2, 4, 16, h, w], eps in --dtype.

Modes: "fwd" under no_grad (the chain's no-grad steps), "fwd+bwd" with gradient. Time is the median of
triton.testing.do_bench (20th/80th percentiles in the JSON); throughput is TFLOP/s for LoRA and GB/s (minimal
HBM traffic: each operand read once, each result written once) for the memory-bound ops, with the fraction
of the device's peak. "max diff" compares each forward output with the first provider's (for cfg_ddim_step in
bf16 it mostly shows diffusers' CFG combine rounding in bf16, which the reference and the kernel do in fp32).
Without CUDA it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402

# Dense bf16 tensor-core TFLOP/s and HBM bytes/s by device name (vendor datasheets; ~800 TFLOP/s is what a
# lent H100 actually reached here).
PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.039e12)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LATENTS = {"32x32": (32, 32), "72x128": (72, 128)}
LEVELS = ((320, 1), (640, 2), (1280, 4))  # (width, spatial downsampling) of the UNet levels with attention
DEVICE = "cuda"


# -- timing ---------------------------------------------------------------------------------------------------------
def measure(fn, grad_to_none=None) -> tuple[float, float, float]:
    from triton.testing import do_bench

    fn()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    return tuple(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]))


def run_case(op, shape, mode, provider, fn, peaks, grad_to_none=None, flops=None, nbytes=None):
    """One timed row; ``peaks`` = (FLOP/s, bytes/s), either None when unknown."""
    row = dict(op=op, shape=shape, mode=mode, provider=provider)
    try:
        ms, p20, p80 = measure(fn, grad_to_none)
    except Exception as err:  # e.g. SDPA past 65,535 sequences: report it, keep benchmarking
        row["error"] = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        return row
    row.update(ms=ms, ms_p20=p20, ms_p80=p80)
    if flops is not None:  # compute-bound view: % of the tensor-core peak
        row["tflops"] = flops / ms * 1e-9
        row["pct_peak"] = 100 * flops / (ms * 1e-3) / peaks[0] if peaks[0] else None
    if nbytes is not None:
        row["gbs"] = nbytes / ms * 1e-6
        if flops is None:  # memory-bound view: % of the HBM peak
            row["pct_peak"] = 100 * nbytes / (ms * 1e-3) / peaks[1] if peaks[1] else None
    return row


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# -- LoRA linear ------------------------------------------------------------------------------------------------------
def peft_layer(weight, bias, lora_A, lora_B, scale):
    """A peft lora.Linear around ``weight`` holding the same A, B (None when peft is not installed)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        return None
    n, k = weight.shape
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(k, n, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    rank = lora_A.shape[0]
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=scale * rank, target_modules=["proj"]), holder)
    layer = holder.proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        if bias is not None:
            layer.base_layer.bias.copy_(bias)
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
    layer.base_layer.requires_grad_(False)
    return layer


def bench_lora(m, width, rank, dtype, peaks, shape):
    dev = DEVICE
    x = torch.randn(m, width, device=dev, dtype=dtype)
    weight = torch.randn(width, width, device=dev, dtype=dtype) * width ** -0.5
    bias = torch.randn(width, device=dev, dtype=dtype)
    lora_A = (torch.randn(rank, width, device=dev, dtype=dtype) * width ** -0.5).requires_grad_()
    lora_B = (torch.randn(width, rank, device=dev, dtype=dtype) * 0.05).requires_grad_()
    scale = 1.0
    dy = torch.randn(m, width, device=dev, dtype=dtype)
    layer = peft_layer(weight, bias, lora_A.detach(), lora_B.detach(), scale)

    def fused(inp):
        with kernels.use_backend("fused"):
            return kernels.lora_linear(inp, weight, bias, lora_A, lora_B, scale)

    providers = {"torch": lambda inp: F.linear(inp, weight, bias) + scale * F.linear(F.linear(inp, lora_A), lora_B)}
    if layer is not None:
        providers = {"peft": layer, **providers}
    providers["fused"] = fused
    params = {"fused": [lora_A, lora_B], "torch": [lora_A, lora_B]}
    if layer is not None:
        params["peft"] = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]

    fwd_flops = 2 * m * width * width + 4 * m * width * rank
    bwd_flops = 2 * m * width * width + 8 * m * width * rank  # dX (+ dS, dS A) and dA, dB
    el = x.element_size()
    rows = []
    with torch.no_grad():
        expected = providers[next(iter(providers))](x)
        for name, fn in providers.items():
            row = run_case("lora_linear", shape, "fwd", name, lambda fn=fn: fn(x), peaks, flops=fwd_flops,
                           nbytes=el * (2 * m * width + width * width))
            row["max_diff"] = max_diff(fn(x), expected)
            rows.append(row)
    xg = x.clone().requires_grad_()
    for name, fn in providers.items():
        rows.append(run_case("lora_linear", shape, "fwd+bwd", name, lambda fn=fn: fn(xg).backward(dy), peaks,
                             grad_to_none=[xg, *params[name]], flops=fwd_flops + bwd_flops,
                             nbytes=el * (5 * m * width + 2 * width * width)))
    return rows


# -- temporal attention -----------------------------------------------------------------------------------------------
def xformers_ops():
    """xformers.ops where it imports (the temporal-attention rows then include its memory-efficient attention)."""
    try:
        import xformers.ops as xops
    except ImportError:
        return None
    return xops


def bench_attention(bhw, heads, dtype, peaks, shape, frames=16, head_dim=64):
    dev = DEVICE
    width = heads * head_dim
    q, k, v = (torch.randn(bhw, frames, width, device=dev, dtype=dtype) for _ in range(3))
    dy = torch.randn(bhw, frames, width, device=dev, dtype=dtype)

    def split(t):  # diffusers' view: [B*h*w, heads, F, D], no copy
        return t.view(bhw, frames, heads, head_dim).transpose(1, 2)

    def sdpa(qq, kk, vv):  # AttnProcessor2_0: SDPA, then transpose + reshape (a copy)
        out = F.scaled_dot_product_attention(split(qq), split(kk), split(vv))
        return out.transpose(1, 2).reshape(bhw, frames, width)

    def fused(qq, kk, vv):
        with kernels.use_backend("fused"):
            out = kernels.temporal_attention(split(qq), split(kk), split(vv))
        return out.transpose(1, 2).reshape(bhw, frames, width)  # a view: the kernel wrote [B, F, heads, D]

    providers = {"sdpa": sdpa}
    xops = xformers_ops()
    if xops is not None:
        providers["xformers"] = lambda qq, kk, vv: xops.memory_efficient_attention(
            *(t.view(bhw, frames, heads, head_dim) for t in (qq, kk, vv))).reshape(bhw, frames, width)
    providers["fused"] = fused

    io = bhw * frames * width * q.element_size()  # one [B*h*w, F, C] tensor
    rows = []
    with torch.no_grad():
        expected = None
        for name, fn in providers.items():
            row = run_case("temporal_attention", shape, "fwd", name, lambda fn=fn: fn(q, k, v), peaks, nbytes=4 * io)
            if "error" not in row:
                out = fn(q, k, v)
                expected = out if expected is None else expected
                row["max_diff"] = max_diff(out, expected)
            rows.append(row)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    for name, fn in providers.items():
        rows.append(run_case("temporal_attention", shape, "fwd+bwd", name, lambda fn=fn: fn(qg, kg, vg).backward(dy),
                             peaks, grad_to_none=[qg, kg, vg], nbytes=12 * io))
    return rows


# -- CFG + DDIM step --------------------------------------------------------------------------------------------------
def ddim_scheduler():
    try:
        from diffusers import DDIMScheduler
    except ImportError:
        return None
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    scheduler.set_timesteps(20)
    return scheduler


def bench_cfg_ddim(h, w, dtype, peaks, shape, guidance=3.0, t=551):
    dev = DEVICE
    x = torch.randn(2, 4, 16, h, w, device=dev)
    eps = torch.randn(4, 4, 16, h, w, device=dev, dtype=dtype)
    eps_u, eps_c = eps.chunk(2)
    scheduler = ddim_scheduler()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2  # scaled_linear, as diffusers
    cumprod = torch.cumprod(1 - betas, 0)
    a_t, a_prev = float(cumprod[t]), float(cumprod[t - 50])

    providers = {}
    if scheduler is not None:
        providers["diffusers"] = lambda xx, eu, ec: scheduler.step(eu + guidance * (ec - eu), t, xx).prev_sample
    providers["reference"] = lambda xx, eu, ec: kernels.cfg_ddim_step_ref(xx, eu, ec, guidance, a_t, a_prev)

    def fused(xx, eu, ec):
        with kernels.use_backend("fused"):
            return kernels.cfg_ddim_step(xx, eu, ec, guidance, a_t, a_prev)

    providers["fused"] = fused
    n = x.numel()
    fwd_bytes = n * (4 + 2 * eps.element_size() + 4)
    rows = []
    with torch.no_grad():
        expected = providers[next(iter(providers))](x, eps_u, eps_c)
        for name, fn in providers.items():
            row = run_case("cfg_ddim_step", shape, "fwd", name, lambda fn=fn: fn(x, eps_u, eps_c), peaks,
                           nbytes=fwd_bytes)
            row["max_diff"] = max_diff(fn(x, eps_u, eps_c), expected)
            rows.append(row)
    xg, eug, ecg = x.clone().requires_grad_(), eps_u.clone().requires_grad_(), eps_c.clone().requires_grad_()
    g = torch.randn_like(x)
    for name, fn in providers.items():
        rows.append(run_case("cfg_ddim_step", shape, "fwd+bwd", name, lambda fn=fn: fn(xg, eug, ecg).backward(g),
                             peaks, grad_to_none=[xg, eug, ecg], nbytes=2 * fwd_bytes + n * 4))
    return rows


# -- report -----------------------------------------------------------------------------------------------------------
def with_speedups(rows):
    """speedup = baseline ms / provider ms, the baseline being the first provider of each (op, shape, mode)."""
    baseline = {}
    for row in rows:
        key = (row["op"], row["shape"], row["mode"])
        if key not in baseline and "ms" in row:
            baseline[key] = row["ms"]
        if "ms" in row and key in baseline:
            row["speedup"] = baseline[key] / row["ms"]
    return rows


def markdown(rows) -> str:
    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) and not math.isnan(v) else "-"

    lines = ["| op | shape | mode | provider | ms | TFLOP/s | GB/s | % peak | speedup | max diff |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = fmt(r.get("ms"), ".4f") if "error" not in r else "error: " + r["error"].replace("|", "/")
        lines.append(f"| {r['op']} | {r['shape']} | {r['mode']} | {r['provider']} | {ms} | {fmt(r.get('tflops'), '.1f')} "
                     f"| {fmt(r.get('gbs'), '.0f')} | {fmt(r.get('pct_peak'), '.1f')} | {fmt(r.get('speedup'), '.2f')} "
                     f"| {fmt(r.get('max_diff'), '.2e')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the rows and the environment as JSON here")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="one shape per op (the 32x32 latent, width 320)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak (TFLOP/s)")
    parser.add_argument("--peak-tbs", type=float, default=None, help="override the device's HBM peak (TB/s)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; the Triton kernels need a GPU (the CPU interpreter is for tests). "
              "Nothing measured.")
        return 0
    import triton

    name = torch.cuda.get_device_name()
    peak_flops, peak_bytes = next((p for key, p in PEAKS.items() if key in name), (None, None))
    peaks = (args.peak_tflops * 1e12 if args.peak_tflops else peak_flops,
             args.peak_tbs * 1e12 if args.peak_tbs else peak_bytes)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)

    latents = {"32x32": LATENTS["32x32"]} if args.quick else LATENTS
    levels = LEVELS[:1] if args.quick else LEVELS
    lora, attention, cfg, past_grid_limit = [], [], [], []
    for latent, (h, w) in latents.items():
        for width, down in levels:
            m = 2 * 16 * (h // down) * (w // down)
            lora += bench_lora(m, width, args.rank, dtype, peaks, f"{latent} w{width}: M={m} K=N={width} r={args.rank}")
            bhw, heads = 2 * (h // down) * (w // down), width // 64
            case = (bhw, heads, dtype, peaks, f"{latent} w{width}: {bhw * heads} seqs x 16 x 64")
            if bhw * heads > 65_535:  # SDPA / xformers may fail to launch there: measured last, see below
                past_grid_limit.append(case)
            else:
                attention += bench_attention(*case)
        cfg += bench_cfg_ddim(h, w, dtype, peaks, f"{latent}: x [2, 4, 16, {h}, {w}]")
    for case in past_grid_limit:  # last, in case a failed launch leaves the CUDA context unusable
        attention += bench_attention(*case)

    rows = with_speedups(lora + attention + cfg)
    print(f"# Fused kernels on {name} ({args.dtype}; torch {torch.__version__}, triton {triton.__version__})\n")
    print(markdown(rows))
    if None in peaks:
        print("\n% peak: unknown device; pass --peak-tflops and --peak-tbs")
    if xformers_ops() is None:
        print("\nxformers does not import here: the temporal-attention rows compare the fused kernel with SDPA only "
              "(pip install xformers to add its memory-efficient attention)")
    if args.out is not None:
        env = dict(device=name, dtype=args.dtype, torch=torch.__version__, triton=triton.__version__,
                   peak_flops=peaks[0], peak_bytes_per_s=peaks[1])
        args.out.write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
