"""Chain memory at ModelScope size: saved-activation bytes and FLOPs of the gradient part of a fine-tuning step.

    python -m pytest bench/bench_memory.py -s      # about two minutes on a CPU; writes bench/results_memory.json

What you will see, for K = 1, 4, 12 gradient steps of the official chain (D=20, tau=0.6: 12 steps run, CFG pair
in one batched UNet call, 16 x 32 x 32 latent, fp32, LoRA rank 4):
- the full-size UNet3DConditionModel (1.41B parameters) built on the meta device, so nothing is allocated;
- saved-activation bytes counted with saved-tensor hooks (``SavedTensorMeter``: what autograd keeps on the
  device at the end of forward) plus the transient of backward (one unit rematerialised plus prefetched copies,
  from ChainMemory's own statistics), and FLOPs counted with FlopCounterMode's formulas over forward and backward;
- three policies: plain autograd (no checkpointing), today's block recompute (every top-level block recomputed,
  its inputs kept: ``checkpoint_blocks``' policy, measured through ChainMemory at block granularity so the inputs
  it keeps are counted), and the planned policy at an 8 GiB budget (``ChainMemory``);
- the recompute overhead as a ratio of FLOPs to plain autograd's.
On a GPU (when one is present) the second test measures peak memory and step time and the copy overlap.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench.counters import FlopCount
from engine.chain import EditChain
from engine.lora import add_lora
from engine.memory import ChainMemory, SavedTensorMeter, parse_budget
from engine.models import VideoDiffusion

from bench.report import update_section

K_VALUES = (1, 4, 12)
BUDGET = "8GiB"
RESULTS = Path(__file__).with_name("results_memory.json")

# unet/config.json of text-to-video-ms-1.7b (REFERENCE.md, "Full-size configurations")
MODELSCOPE_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
    up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
    attention_head_dim=64, norm_num_groups=32, norm_eps=1e-5,
)
LATENT = (1, 4, 16, 32, 32)  # batch 1 video: 16 frames of 256x256 through the KL-f8 VAE
CONTEXT = (1, 77, 1024)


class UNetOnly(SimpleNamespace):
    """What the chain uses of a ``VideoDiffusion`` (``denoiser``, ``scheduler``, ``predict``), without the VAE and
    the text encoder."""

    predict = VideoDiffusion.predict


def modelscope(device) -> UNetOnly:
    """The UNet (with LoRA, as fine-tuning runs it) and the DDIM scheduler config, on ``device``."""
    from diffusers import DDIMScheduler, UNet3DConditionModel

    with torch.device(device):
        unet = UNet3DConditionModel(**MODELSCOPE_UNET)
    add_lora(unet, rank=4)
    unet.eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    return UNetOnly(denoiser=unet, scheduler=scheduler)


def gradient_part(model, k: int, memory: ChainMemory | None, latent, context, autocast=None, count: bool = True):
    """The last K steps of the official chain with gradient, a scalar loss and its backward.

    Returns (saved bytes at the end of forward, forward FLOPs, total FLOPs); without ``count`` (a timed run: a FLOP
    count runs every op through Python, on the kernels' reference path) no FLOPs, (bytes, 0, 0)."""
    chain = EditChain(model, ddim_steps=20, tau=0.6, grad_steps=k, guidance=3.0, eta=0.0, memory=memory)
    meter = SavedTensorMeter(model.denoiser)
    with FlopCount() if count else nullcontext(FlopCount()) as flops:
        with meter, (autocast or torch.autocast("cpu", enabled=False)):
            out = chain.denoise(latent, context, context, None, chain.timesteps[-k:], k)
        forward = flops.total
        out.float().square().mean().backward()
    if memory is not None:
        memory.revert()
    return meter.bytes, forward, flops.total


@pytest.fixture(scope="module")
def meta_model():
    return modelscope("meta")


@pytest.fixture(scope="module")
def meta_profile(meta_model):
    """The per-unit measurement ChainMemory makes on its first two gradient steps, done once for all K."""
    latent, context = torch.empty(LATENT, device="meta"), torch.empty(CONTEXT, device="meta")
    memory = ChainMemory(meta_model.denoiser, 2, BUDGET)
    gradient_part(meta_model, 2, memory, latent, context)
    return memory.profile


def _gib(n: float) -> float:
    return n / 2**30


def _write_results(key: str, value) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")


@pytest.fixture(scope="module")
def meta_rows(meta_model, meta_profile):
    latent, context = torch.empty(LATENT, device="meta"), torch.empty(CONTEXT, device="meta")
    rows, started = [], time.perf_counter()
    for k in K_VALUES:
        plain_bytes, forward, plain_flops = gradient_part(meta_model, k, None, latent, context)

        today = ChainMemory(meta_model.denoiser, k, granularity="blocks", decisions=2)  # RECOMPUTE every block
        today_bytes, _, today_flops = gradient_part(meta_model, k, today, latent, context)
        today_transient = today.stats()["peak_transient_bytes"]

        planned = ChainMemory(meta_model.denoiser, k, BUDGET, profile=meta_profile)
        planned_bytes, _, planned_flops = gradient_part(meta_model, k, planned, latent, context)
        stats = planned.stats()
        rows.append(dict(
            k=k,
            forward_tflop_per_step=forward / k / 1e12,
            plain=dict(saved_gib=_gib(plain_bytes), peak_gib=_gib(plain_bytes), tflop=plain_flops / 1e12),
            today_blocks=dict(saved_gib=_gib(today_bytes), peak_gib=_gib(today_bytes + today_transient),
                              tflop=today_flops / 1e12, overhead=today_flops / plain_flops),
            planned=dict(saved_gib=_gib(planned_bytes), peak_gib=_gib(planned_bytes + stats["peak_transient_bytes"]),
                         planned_device_gib=_gib(stats["plan"]["device_bytes"]), host_gib=_gib(stats["plan"]["host_bytes"]),
                         tflop=planned_flops / 1e12, overhead=planned_flops / plain_flops,
                         decisions=stats["plan"]["counts"], backend=stats["backend"]),
            # one whole fine-tuning step also runs 12 - K steps without gradient (forward only)
            step_tflop_plain=(plain_flops + (12 - k) * forward / k) / 1e12,
            step_tflop_planned=(planned_flops + (12 - k) * forward / k) / 1e12,
        ))
    seconds = time.perf_counter() - started

    header = (f"{'K':>3} | {'plain GiB':>9} {'TFLOP':>7} | {'blocks GiB':>10} {'TFLOP':>7} {'x':>5} | "
              f"{'planned GiB':>11} {'host GiB':>8} {'TFLOP':>7} {'x':>5} | decisions (keep/offload/recompute/rec+off)")
    lines = [f"ModelScope UNet3D (1.41B) on meta, CFG pair, 16x32x32, fp32, budget {BUDGET}: gradient part of one "
             "fine-tuning step (peak = saved at end of forward + backward transient)", header, "-" * len(header)]
    for r in rows:
        p, t, q = r["plain"], r["today_blocks"], r["planned"]
        counts = "/".join(str(q["decisions"][n]) for n in ("keep", "offload", "recompute", "recompute_offload"))
        lines.append(f"{r['k']:>3} | {p['peak_gib']:>9.2f} {p['tflop']:>7.1f} | {t['peak_gib']:>10.2f} {t['tflop']:>7.1f} "
                     f"{t['overhead']:>5.2f} | {q['peak_gib']:>11.2f} {q['host_gib']:>8.2f} {q['tflop']:>7.1f} "
                     f"{q['overhead']:>5.2f} | {counts}")
    print("\n" + "\n".join(lines) + f"\n({seconds:.0f} s)")
    _write_results("meta", dict(budget=BUDGET, latent=LATENT, rows=rows, table=lines))
    update_section(RESULTS.with_name("RESULTS.md"), "chain memory",
                   f"Measured {time.strftime('%Y-%m-%d')} on the meta device (torch {torch.__version__}); "
                   "no GPU in this run.\n\n```\n" + "\n".join(lines) + "\n```")

    return rows


def test_meta_saved_bytes_and_flops(meta_rows):
    rows, budget = meta_rows, parse_budget(BUDGET)
    first, last = rows[0], rows[-1]
    # plain autograd grows linearly with K; the plan stays within the budget whatever K is
    assert last["plain"]["saved_gib"] == pytest.approx(K_VALUES[-1] * first["plain"]["saved_gib"], rel=0.01)
    for r in rows:
        assert r["planned"]["planned_device_gib"] <= _gib(budget)
    # recompute never costs more than one extra forward per gradient step (ratio <= 1 + fwd/(fwd+bwd))
    for r in rows:
        assert 1.0 <= r["planned"]["overhead"] <= r["today_blocks"]["overhead"] + 1e-9


def test_meta_measured_peak_within_budget(meta_rows):
    """Measured, not planned: saved bytes at the end of forward plus the backward transient (one unit
    rematerialised, the store's device copies) stay within the budget and do not grow with K."""
    budget = parse_budget(BUDGET)
    for r in meta_rows:
        assert r["planned"]["peak_gib"] <= _gib(budget)
    assert meta_rows[-1]["planned"]["peak_gib"] <= 1.1 * meta_rows[0]["planned"]["peak_gib"] + 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (peak memory and step time)")
def test_gpu_peak_memory_and_step_time():
    """Peak memory (max_memory_allocated) and step time on the GPU, bf16 autocast, with the copies' overlap."""
    model = modelscope("cuda")
    latent = torch.randn(LATENT, device="cuda")
    context = torch.randn(CONTEXT, device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    rows = []
    for k in K_VALUES:
        for policy in ("plain", "planned"):
            memory = None
            if policy == "planned":
                memory = ChainMemory(model.denoiser, k, BUDGET)
                gradient_part(model, k, memory, latent, context, autocast, count=False)  # measures the units
                memory = ChainMemory(model.denoiser, k, BUDGET, profile=memory.profile)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            started = time.perf_counter()
            try:
                saved, _, _ = gradient_part(model, k, memory, latent, context, autocast, count=False)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - started
                peak = torch.cuda.max_memory_allocated() - base
                row = dict(k=k, policy=policy, peak_gib=_gib(peak), seconds=seconds, saved_gib=_gib(saved))
                if memory is not None:
                    s = memory.stats()["store"]
                    delivered = s["ready_on_get"] + s["waited_on_get"] + s["demand_copies"]
                    row.update(host_gib=_gib(s["d2h_bytes"]), copies_ready_when_needed=s["ready_on_get"],
                               overlap=(s["ready_on_get"] / delivered) if delivered else None,
                               plan=memory.stats()["plan"])
            except torch.OutOfMemoryError:
                row = dict(k=k, policy=policy, peak_gib=None, seconds=None, error="out of memory")
            finally:
                for p in model.denoiser.parameters():
                    p.grad = None
                torch.cuda.empty_cache()
            rows.append(row)
            print(row)
    _write_results("gpu", dict(device=torch.cuda.get_device_name(), budget=BUDGET, rows=rows))
    for row in rows:
        if row["policy"] == "planned":
            assert row["peak_gib"] is not None
