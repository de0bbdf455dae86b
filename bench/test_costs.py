"""``pytest bench/``: what each fine-tuning configuration costs, against full fine-tuning.

Three kinds of figures, each from a measurement made in this run:
- at full ModelScope size on the meta device (exact, machine-independent): trainable parameters, optimizer and
  gradient bytes, FLOPs per fine-tuning step (FlopCounterMode's formulas) and bytes saved for backward (saved-tensor hooks);
- on the tiny preset on this machine's CPU: wall time per step (pytest-benchmark), as ratios to configuration 1;
- on CUDA, when a GPU is present: wall time, peak memory and MFU at full size with random weights.
The report goes to stdout, bench/RESULTS.md (its "costs" section) and bench/results_costs.json.
Only exact relations are asserted; times never are.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import platform
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from bench import fullsize
from bench.counters import FlopCount, NoGradReuse, count_step
from bench.recipes import BY_KEY, RECIPES, PlainLoop, Step, trainable_bytes
from bench.report import markdown_table, update_section
from csrc import STAT_NAMES

HERE = Path(__file__).parent
BATCH = 1
GB = 1e9
# The device budget the engine's planner gets at full size in these counts: bf16 activations of one gradient
# step fit in it, so the planner keeps them instead of recomputing; more steps spill to host memory.
ENGINE_BUDGET = 4 * 1024 ** 3


def fullsize_step(recipe, device="meta", dtype=torch.float32, budget=ENGINE_BUDGET):
    model = fullsize.modelscope(device, dtype)
    reward = fullsize.hpsv2(device, dtype)
    step = Step(model, reward, recipe, fullsize.LATENT, fullsize.CONTEXT, batch=BATCH, memory_budget=budget)
    return model, reward, step


def count_fullsize(recipe) -> dict:
    """FLOPs and bytes saved for backward of one step at full size, in bf16 (how the engine trains on a GPU)."""
    _, _, step = fullsize_step(recipe, dtype=torch.bfloat16)
    flops, saved = count_step(step)
    host = dict(zip(STAT_NAMES, step.memory.store.stats()))["peak_host_bytes"] if step.memory is not None else 0
    return {**trainable_bytes(step.params), "tflops": flops / 1e12,
            "saved_gb_bf16": saved / GB, "host_gb_bf16": host / GB}


def test_flop_count_equals_flop_counter_mode():
    """FlopCount is FlopCounterMode's total without the module tracking (one tiny UNet forward and backward on the
    meta device, where attention runs as matmuls); on the CPU it also counts the fused attention FlopCounterMode
    leaves out, as the meta device does with ``fused_attention_on_meta`` (the forecast's way)."""
    from torch.utils.flop_counter import FlopCounterMode

    from engine.counting import fused_attention_on_meta
    from engine.models import tiny_model

    unet = tiny_model().denoiser.requires_grad_(True)

    def forward_backward(device):
        latent = torch.randn(2, 4, 4, 8, 8, device=device)
        context = torch.randn(2, 77, unet.config.cross_attention_dim, device=device)
        unet.to(device)(latent, 500, context).sample.square().mean().backward()

    with FlopCount() as cpu:
        forward_backward("cpu")
    with FlopCounterMode(display=False) as cpu_theirs:
        forward_backward("cpu")
    with FlopCount() as ours:
        forward_backward("meta")
    with FlopCounterMode(display=False) as theirs:
        forward_backward("meta")
    with fused_attention_on_meta(), FlopCount() as fused:
        forward_backward("meta")
    assert ours.total == theirs.get_total_flops() > 0
    assert cpu.total == fused.total > cpu_theirs.get_total_flops()


@pytest.mark.parametrize("family, key", [("unet3d", "draft1"), ("unet3d", "official"), ("unet3d", "engine"),
                                         ("wan", "engine"), ("cogvideox", "engine")])
def test_no_grad_reuse_counts_every_call(family, key):
    """Reusing counts (FlopCount's of ops, NoGradReuse's of no-grad denoiser calls) gives the FLOPs and saved bytes
    of running every op (tiny models, meta device)."""
    from engine.models import tiny_model
    from engine.rewards import ColorfulnessReward

    def counts(reuse):
        torch.manual_seed(0)
        model = tiny_model(device="meta", family=family)
        step = Step(model, ColorfulnessReward(), BY_KEY[key], model.latent_shape(9, 32, 32),
                    (getattr(model, "text_length", 77), 32), batch=2)  # ModelScope's CLIP: 77 tokens
        return count_step(step, reuse)

    reused, every = counts(reuse=True), counts(reuse=False)
    assert reused == every and reused[0] > 0


def test_no_grad_reuse_counts_every_call_of_the_plain_loop():
    """The same for the plain diffusers + peft loop, whose timesteps are CPU tensors."""
    from engine.models import tiny_model
    from engine.rewards import ColorfulnessReward

    def flops(reuse):
        torch.manual_seed(0)
        loop = PlainLoop(tiny_model(device="meta"), ColorfulnessReward(), (4, 8, 16, 16), (77, 32))
        with NoGradReuse(loop.model.denoiser) if reuse else nullcontext(), FlopCount(reuse) as counter:
            loop("meta")
        return counter.total

    assert flops(reuse=True) == flops(reuse=False) > 0


@pytest.fixture(scope="module")
def report():
    """Collects every figure; writes the table once all tests of the module have run."""
    figures: dict[str, dict] = {r.key: {"title": r.title} for r in RECIPES}
    yield figures
    if "tflops" not in figures["full"]:
        return  # a partial run (tests deselected, as .ci/run's) keeps the last complete table and its JSON
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    (HERE / "results_costs.json").write_text(json.dumps({"meta": meta, "configurations": figures}, indent=2))
    text = render(figures, meta)
    print("\n" + text)
    update_section(HERE / "RESULTS.md", "costs", text)


def render(figures: dict, meta: dict) -> str:
    base = figures["full"]
    rows = []
    for key, f in figures.items():
        if "tflops" not in f:
            continue
        rows.append([
            f["title"], f"{f['trainable_params'] / 1e6:,.2f} M", f"{f['optimizer_bytes'] / GB:.3f}",
            f"{f['gradient_bytes'] / GB:.3f}", f"{f['tflops']:.1f}", f"{base['tflops'] / f['tflops']:.2f}x",
            f"{f['saved_gb_bf16']:.2f}", f"{f.get('host_gb_bf16', 0.0):.2f}",
            f"{f['cpu_s'] / base['cpu_s']:.3f}" if "cpu_s" in f and "cpu_s" in base else "-",
        ])
    lines = [f"Measured {meta['date']} with torch {meta['torch']}, Python {meta['python']}; "
             f"CPU timings on {meta['cpu']} (tiny preset, ratios to configuration 1).", "",
             markdown_table(["configuration", "trainable", "AdamW state GB", "grad GB", "TFLOP / step",
                             "fewer FLOPs than 1", "saved for backward GB (bf16)", "spilled to host GB",
                             "CPU time / step vs 1"], rows)]
    official, engine = figures["official"], figures["engine"]
    if "tflops" in official and "tflops" in engine:
        lines += ["", f"- FLOPs, this engine / official recipe: {engine['tflops'] / official['tflops']:.3f} (goal <= 0.85); "
                      f"full fine-tuning / this engine: {base['tflops'] / engine['tflops']:.1f}x (goal >= 5x).",
                  f"- Saved for backward at K = 1 in bf16: {engine['saved_gb_bf16']:.2f} GB (goal <= 4 GB); "
                  f"K = all: {figures['engine_kall'].get('saved_gb_bf16', float('nan')):.2f} GB "
                  f"({figures['engine_kall'].get('saved_gb_bf16', float('nan')) / engine['saved_gb_bf16']:.2f}x of K = 1; goal: at most 1.10x)."]
    if any("cuda_s" in f for f in figures.values()):
        cuda_rows = [[f["title"], f"{f['cuda_s']:.3f}", f"{f['cuda_peak_gb']:.1f}", f"{f['mfu']:.1%}",
                      f"{f.get('gpu_util', float('nan')):.0f}", f"{f.get('gpu_power_w', float('nan')):.0f}"]
                     for f in figures.values() if "cuda_s" in f]
        lines += ["", f"On {meta['cuda_device']} (full size, random weights, bf16 autocast, batch {BATCH}):", "",
                  markdown_table(["configuration", "s / step", "peak GB", "MFU", "GPU util %", "power W"], cuda_rows)]
        if "cuda_s" in official and "cuda_s" in engine:
            lines.append(f"\n- Speed-up of this engine over the official recipe, measured side by side: "
                         f"{official['cuda_s'] / engine['cuda_s']:.2f}x (goal >= 2x at >= 35% MFU).")
    else:
        lines += ["", "No GPU in this run: the CUDA rows (wall time, peak memory, MFU at full size) were not measured."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ full size, meta
@pytest.mark.parametrize("key", [r.key for r in RECIPES])
def test_fullsize_counts(key, report):
    report[key].update(count_fullsize(BY_KEY[key]))
    assert report[key]["tflops"] > 0


def test_exact_relations(report):
    """Only what the counts make exact: fewer FLOPs for this engine, far fewer than full fine-tuning."""
    f = {k: v["tflops"] for k, v in report.items()}
    assert f["engine"] < f["official"] < f["draft1"] < f["full"]
    assert f["official"] * 3 < f["full"]
    assert report["engine"]["trainable_params"] < report["full"]["trainable_params"] / 100


# ------------------------------------------------------------------------------------------ tiny, CPU time
def test_official_step_checkpoint_recomputes_the_gradient_step_once():
    """The official recipe's outer checkpoint adds exactly one forward of the gradient step (with its blocks
    checkpointed too, that step's UNet runs three times: forward, the step's recomputation, each block's)."""
    from engine.models import tiny_model
    from engine.rewards import ColorfulnessReward

    shape, context = (4, 4, 8, 8), (77, 32)

    def flops(recipe):
        torch.manual_seed(0)
        step = Step(tiny_model(), ColorfulnessReward(), recipe, shape, context, batch=2)
        with FlopCount() as counter:
            step("cpu")
        return step, counter.total

    official = BY_KEY["official"]
    step, with_outer = flops(official)
    _, blocks_only = flops(dataclasses.replace(official, step_checkpoint=False))
    x = torch.randn(2, *shape)
    with FlopCount() as one_step, torch.no_grad():
        step.chain.guided_step(x, step.chain.timesteps[-1], torch.randn(2, *context), torch.randn(2, *context), None)
    assert with_outer - blocks_only == one_step.total > 0


@pytest.fixture(scope="module")
def tiny_model():
    from engine.models import tiny_model

    return tiny_model()


@pytest.mark.parametrize("key", [r.key for r in RECIPES])
def test_tiny_cpu_time(key, benchmark, tiny_model, report):
    from engine.rewards import ColorfulnessReward

    model = copy.deepcopy(tiny_model)
    shape = (4, 8, 16, 16)
    step = Step(model, ColorfulnessReward(), BY_KEY[key], shape, (77, 32), batch=2)

    def run():
        for p in step.params:
            p.grad = None
        step("cpu")

    benchmark.pedantic(run, rounds=2, warmup_rounds=1, iterations=1)  # median of 2: pytest bench/ within 15 min
    report[key]["cpu_s"] = benchmark.stats.stats.median


# ------------------------------------------------------------------------------------------ CUDA, full size
def peak_bf16_tflops() -> float:
    """The device's dense bf16 matmul rate, measured here (8192^3 GEMMs)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 20 * 2 * 8192 ** 3 / (start.elapsed_time(end) / 1e3) / 1e12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: full-size wall time, memory and MFU")
@pytest.mark.parametrize("key", ["official", "engine"])
def test_cuda_fullsize(key, report):
    import kernels
    from engine.tracking import gpu_stats

    recipe = BY_KEY[key]
    model, reward, step = fullsize_step(recipe, device="cuda", budget="auto")
    if key == "engine":
        from engine.acceleration import accelerate

        accelerate(model.denoiser)
    else:
        kernels.set_backend("reference")
    # model FLOPs: forward + backward of the configuration without recomputation, counted on the meta device
    _, _, plain = fullsize_step(dataclasses.replace(recipe, memory="none"))
    with FlopCount() as counter:
        plain("meta")
    torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for i in range(4):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step("cuda")
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    stats = gpu_stats()
    seconds = sorted(times[1:])[len(times[1:]) // 2]
    report[key].update({"cuda_s": seconds, "cuda_peak_gb": torch.cuda.max_memory_allocated() / GB,
                        "mfu": counter.total / seconds / (peak_bf16_tflops() * 1e12),
                        "gpu_util": stats.get("utilization_percent", float("nan")),
                        "gpu_power_w": stats.get("power_watts", float("nan"))})
    kernels.set_backend("auto")
