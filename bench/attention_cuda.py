"""The denoiser's attention backends side by side (bench/gpu.sh, on CUDA): PyTorch SDPA as diffusers builds the
UNet, ``--attention xformers`` (``engine.acceleration.use_attention``: xformers' memory-efficient attention through
diffusers' processors) and the engine's fused temporal attention (``engine.acceleration.accelerate``, the spatial
attention on SDPA). Each runs the same forward and backward (gradient to the latents only, as with frozen weights
and LoRA) of the mid-size ModelScope UNet (``bench.fullsize.midsize``, 16 frames of 128 x 128) in bf16 on the same
inputs: which backend it ran, its prediction against SDPA's, time per step and peak memory.

    python -m bench.attention_cuda [--rounds 5] [--out FILE.json]

Writes the section "attention backends (CUDA)" of bench/RESULTS.md. ``--device cpu`` runs the same comparison on
the CPU (xformers then falls back to SDPA, and the fused kernel to its PyTorch reference): a check, not a timing.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from bench.report import markdown_table, measured_line, update_section

RESULTS = Path(__file__).parent / "RESULTS.md"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(model, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """One denoiser forward and a backward to the latents; the prediction."""
    x = latents.detach().requires_grad_()
    prediction = model.predict(model.denoiser, x, timesteps, context)
    prediction.float().square().mean().backward()
    return prediction.detach()


def measure(model, inputs: tuple[torch.Tensor, ...], rounds: int) -> dict:
    """The prediction (after a warm-up step), seconds per step over ``rounds`` steps and the peak memory."""
    device = inputs[0].device
    prediction = step(model, *inputs)
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(rounds):
        step(model, *inputs)
    _synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"prediction": prediction, "s_per_step": (time.perf_counter() - start) / rounds, "peak_bytes": peak}


def compare(model, inputs: tuple[torch.Tensor, ...], rounds: int) -> list[dict]:
    """A row per backend, each on its own copy of ``model``: the backend asked for, the one that ran, the largest
    difference of its prediction from SDPA's, time and peak memory; or the error that stopped it."""
    from engine.acceleration import accelerate, use_attention

    rows, reference = [], None
    for asked in ("sdpa", "xformers", "fused temporal attention"):
        copied = copy.deepcopy(model)
        try:
            fused = asked == "fused temporal attention"
            processors = accelerate(copied.denoiser, lora=False).attention_processors if fused else 0
            ran = None if fused else use_attention(copied, asked)
            figures = measure(copied, inputs, rounds)
        except Exception as err:  # e.g. a backend without a bf16 backward, or past a grid limit
            rows.append({"asked": asked, "ran": "", "error": (str(err).strip().splitlines() or [type(err).__name__])[0]})
            continue
        finally:
            del copied
        prediction = figures.pop("prediction")
        reference = prediction if reference is None else reference
        # named after the step: a self-check that failed in it sent the fused attention to its reference
        rows.append({"asked": asked, "ran": ran or _fused_path(processors, inputs[0].device),
                     "max_diff": (prediction.float() - reference.float()).abs().max().item(), **figures})
    return rows


def _fused_path(processors: int, device: torch.device) -> str:
    """Where the fused temporal attention ran: the Triton kernel, or its PyTorch reference and why (the backend,
    the device, or a failed self-check)."""
    from kernels import dispatch

    fused, why = dispatch.device_status(device)
    failed = [reason for (kernel, *_), reason in dispatch.self_check_results().items()
              if kernel == "temporal_attention" and reason is not None]
    path = (f"PyTorch reference ({why})" if not fused else
            f"PyTorch reference (its self-check failed: {failed[0]})" if failed else "Triton kernel")
    return f"{processors} temporal attentions on the {path}"


def render(rows: list[dict], device: torch.device) -> str:
    sdpa = rows[0].get("s_per_step")
    table = [[r["asked"], r["ran"], "", "", "", f"error: {r['error']}"] if "error" in r else
             [r["asked"], r["ran"], f"{r['max_diff']:.2e}", f"{r['s_per_step'] * 1e3:.1f}",
              f"{sdpa / r['s_per_step']:.2f}x" if sdpa else "",
              "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2 ** 30:.2f}"] for r in rows]
    return markdown_table(["asked", "ran", "largest difference from the first row's prediction", "ms / step",
                           "speed vs SDPA", "peak GiB"], table) + \
        f"\n\n({device.type}: forward and backward to the latents, bf16, batch 2)"


def main(argv: list[str] | None = None) -> list[dict]:
    from bench import fullsize

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a check of the comparison)")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per backend, after one warm-up step")
    parser.add_argument("--out", help="also write the rows here as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.attention_cuda: no CUDA device here; run it on a GPU (bash bench/gpu.sh xformers) "
                         "or pass --device cpu for a check")
    model, _ = fullsize.midsize(device)
    model.denoiser.to(torch.bfloat16).requires_grad_(False)
    generator = torch.Generator(device).manual_seed(0)
    inputs = (torch.randn(2, *fullsize.MID_LATENT, generator=generator, device=device, dtype=torch.bfloat16),
              torch.tensor([500, 500], device=device),
              torch.randn(2, *fullsize.CONTEXT, generator=generator, device=device, dtype=torch.bfloat16))
    rows = compare(model, inputs, args.rounds)
    text = render(rows, device)
    print(text)
    if device.type == "cuda":
        update_section(RESULTS, "attention backends (CUDA)", f"{measured_line()}\n\n`python -m bench.attention_cuda`"
                       f"\n\n{text}")
    kept = [{k: v for k, v in r.items() if k != "prediction"} for r in rows]
    if args.out:
        Path(args.out).write_text(json.dumps(kept, indent=2) + "\n")
    return kept


if __name__ == "__main__":
    main()
