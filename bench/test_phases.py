"""``pytest bench/``: where the time of one fine-tuning step goes, per configuration, at a mid size.

The mid-size model (bench.fullsize.midsize: the ModelScope UNet at 2/5 width, 16 frames of 128 x 128, HPSv2's loss on
ViT-B-16) runs here for real, side by side in one run: the plain diffusers + peft loop a user would otherwise write
(bench.recipes.PlainLoop, decoding the 4 SegVR frames or all 16), the official recipe, and this engine with its
no-grad steps run exactly (``--no-grad-path off``) and the way ``auto`` picks on this machine. Each step is split by
bench.recipes.PhaseClock into no-grad steps, the gradient steps' forward, decode, reward, backward (recomputation
included), optimizer, and the chain-memory planner's and host store's calls. Beside each phase's share of the time
stands its share of the FLOPs, counted on the meta device with the same code. On CUDA (bench/gpu.sh) the same table
is measured at the same size with the GPU synchronised at every phase boundary.

Configurations 1, 2 and K = all of the costs table are left out here: with gradient through 12-20 steps they take
minutes per step at this size on a 2-core CPU; their FLOPs are in the costs table. K = 4 is timed on CUDA only.
The report goes to stdout, bench/RESULTS.md ("time per phase (CPU)" or "(CUDA)") and bench/results_phases_<device>.json.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import statistics
from pathlib import Path

import pytest
import torch

from bench import fullsize
from bench.counters import FlopCount, NoGradReuse
from bench.recipes import BY_KEY, PHASES, PhaseClock, PlainLoop, Step
from bench.report import markdown_table, measured_line, update_section
from engine.runtime import NoGradPath

HERE = Path(__file__).parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Timed steps per configuration, after one warm-up step: one on a CPU, where a step at this size takes about a minute
# (with two and a whole warm-up step, ``pytest bench/`` took 21 minutes, over its 15), two on CUDA; more with
# BENCH_PHASE_ROUNDS.
ROUNDS = int(os.environ.get("BENCH_PHASE_ROUNDS", "1" if DEVICE == "cpu" else "2"))


@functools.cache
def pristine(device: str):
    """The mid-size model and reward, built once per device (about 10 s on this CPU); ``build`` copies them."""
    return fullsize.midsize(device)


def build(key: str, device: str):
    """(title, step) of configuration ``key`` on a fresh copy of the mid-size model."""
    model, reward = copy.deepcopy(pristine(device))
    shapes = (fullsize.MID_LATENT, fullsize.CONTEXT)
    if key.startswith("plain"):
        decode_all = key == "plain16"
        title = f"plain diffusers + peft loop, {'all 16' if decode_all else '4'} frames decoded"
        return title, PlainLoop(model, reward, *shapes, decode_all=decode_all)
    recipe, path = {"official": ("official", "off"), "engine_off": ("engine", "off"), "engine": ("engine", "auto"),
                    "engine_k4": ("engine_k4", "auto"), "engine_compile": ("engine", "compile")}[key]
    mode = NoGradPath(path, torch.device(device)).mode
    title = f"{BY_KEY[recipe].title.split('. ', 1)[1]}, no-grad path {path}" + (f" ({mode})" if path == "auto" else "")
    return title, Step(model, reward, BY_KEY[recipe], *shapes, optimizer=True, no_grad_path=path)


# Timed on CUDA only: K = 4, whose host store is the same RAM on a CPU (at this size it ran a 24 GiB machine out of
# memory), and torch.compile of the no-grad steps (CUDA graphs; on this CPU it measured 0.95x of eager at this size
# after a 30 s compile, see engine.runtime.NoGradPath).
KEYS = ["plain4", "plain16", "official", "engine_off", "engine"] + (["engine_k4", "engine_compile"] if DEVICE == "cuda" else [])
RESULTS_JSON = HERE / f"results_phases_{DEVICE}.json"
CPU_JSON = HERE / "results_phases_cpu.json"  # where the CPU run keeps the FLOP counts


@pytest.fixture(scope="module")
def report():
    """Every figure of this run, saved after each test (a run cut short keeps what it measured); rendered at the end."""
    figures: dict[str, dict] = {}
    yield figures
    if not figures:
        return
    text = render(figures)
    print("\n" + text)
    update_section(HERE / "RESULTS.md", f"time per phase ({DEVICE.upper()})", text)


def record(report: dict, key: str, title: str, field: str, value: dict) -> None:
    """Into this run's figures and, merged with what earlier runs measured, into RESULTS_JSON."""
    report.setdefault(key, {"title": title})[field] = value
    saved = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    saved.setdefault(key, {}).update({"title": title, field: value})
    RESULTS_JSON.write_text(json.dumps(saved, indent=2))


def render(figures: dict) -> str:
    device = DEVICE
    flops_from = "counted on the meta device in this run"
    if not any("flops" in f for f in figures.values()) and CPU_JSON.exists():
        # FLOPs are exact and device-independent: an earlier run's meta-device counts serve (they take minutes)
        counted = json.loads(CPU_JSON.read_text())
        for key, f in figures.items():
            same = counted.get(key, {}) if key != "engine_compile" else counted.get("engine", {})  # same FLOPs
            if "flops" in same:
                f["flops"] = same["flops"]
        flops_from = f"counted on the meta device by `pytest bench/test_phases.py -k flop` ({CPU_JSON.name})"
    base = figures.get("plain4", {}).get(device)
    rows = []
    for key in KEYS:
        f = figures.get(key, {})
        if device not in f:
            continue
        seconds, total = f[device], sum(f[device].values())
        flops = f.get("flops", {})
        flop_total = sum(flops.values()) or 1
        cells = [f"{seconds.get(p, 0.0):.2f} ({seconds.get(p, 0.0) / total:.0%} / {flops.get(p, 0) / flop_total:.0%})"
                 for p in PHASES]
        rows.append([f["title"], f"{total:.1f}", f"{total / sum(base.values()):.2f}x" if base else "-", *cells])
    where = "on this CPU" if device == "cpu" else f"on {torch.cuda.get_device_name()} (bf16 autocast)"
    lines = [measured_line(), "",
             f"`pytest bench/test_phases.py` (BENCH_PHASE_ROUNDS={ROUNDS}): one step of batch 1 at mid size "
             f"(ModelScope UNet at 2/5 width, 16 x 128 x 128, reward on ViT-B-16) {where}, "
             f"{'median of ' + str(ROUNDS) + ' timed steps' if ROUNDS > 1 else 'one timed step'} after one warm-up{' (on a CPU without its no-grad steps)' if DEVICE == 'cpu' else ''}. Each phase: seconds (share of the step's time / share of its FLOPs, {flops_from}).",
             "",
             markdown_table(["configuration", "s / step", "vs plain loop"] + list(PHASES), rows)]
    if "engine" in figures and "engine_off" in figures and device in figures["engine"]:
        fast, exact = figures["engine"][device]["no-grad steps"], figures["engine_off"][device]["no-grad steps"]
        lines += ["", f"- No-grad steps, auto path / exact path: {fast / exact:.2f}x of the time."]
    return "\n".join(lines)


@pytest.mark.parametrize("key", KEYS)
def test_flop_shares(key, report):
    """FLOPs per phase on the meta device (exact); the second step, once the planner has measured its units."""
    title, step = build(key, "meta")
    clock = PhaseClock()
    with NoGradReuse(step.model.denoiser):
        with FlopCount():  # not counted, but its meta ops' outputs serve the counted step
            step("meta")
        with FlopCount() as counter:
            clock.counter = counter
            step("meta", clock)
    record(report, key, title, "flops", dict(clock.flops))
    assert clock.flops["no-grad steps"] > 0 and clock.flops["backward"] > 0


@pytest.mark.parametrize("key", KEYS)
def test_time_per_phase(key, report):
    device = DEVICE
    title, step = build(key, device)
    clocks = []
    with torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False):
        # warm-up: the planner measures its units, allocators and caches fill; on a CPU without the no-grad steps
        # (60% of a step at this size, nothing in them to measure), so that pytest bench/ stays within 15 minutes
        step(device, no_grad_steps=device == "cuda")
        for _ in range(ROUNDS):
            clocks.append(PhaseClock(sync=device == "cuda"))
            step(device, clocks[-1])
    median = {p: statistics.median(c.seconds.get(p, 0.0) for c in clocks) for p in PHASES}
    record(report, key, title, device, median)
    assert median["no-grad steps"] > 0 and median["backward"] > 0


@pytest.mark.parametrize("key", ["plain4", "engine"])
def test_phases_partition_the_step(key):
    """On the tiny preset: the phases' FLOPs add up to the whole step's, and nested phases are not counted twice."""
    from engine.models import tiny_model
    from engine.rewards import ColorfulnessReward

    model, shapes = tiny_model(), ((4, 8, 16, 16), (77, 32))
    step = PlainLoop(model, ColorfulnessReward(), *shapes) if key == "plain4" else \
        Step(model, ColorfulnessReward(), BY_KEY["engine"], *shapes, optimizer=True)
    step("cpu")
    clock = PhaseClock()
    with FlopCount() as counter:
        clock.counter = counter
        step("cpu", clock)
    assert sum(clock.flops.values()) == counter.total > 0
    assert set(clock.seconds) <= set(PHASES)
    assert clock.flops["no-grad steps"] > clock.flops["gradient steps, forward"] > 0
