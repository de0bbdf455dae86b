"""Budgets and plans: parse a memory budget, the cost model's default rates, and solve a profile's plan.

``make_plan`` turns a measured ``ChainProfile`` into the planner's decisions for K gradient steps (``csrc``:
the C++ extension or its Python twin); ``inflight_bytes`` is the device allowance for spills still copying.
"""

from __future__ import annotations

import math
import os
import re

import csrc
from csrc import RECOMPUTE, Plan, Rates

from engine.memory.units import ChainProfile

_BYTE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10**3, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
               "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


def parse_budget(value: int | float | str | None) -> int | str:
    """'auto' (or None) stays 'auto'; '8GiB', '8G' (= GiB), '8GB' (= 1e9), '512MiB', 1e9 and 1000000 become bytes."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return "auto"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _BYTE_UNITS:
            raise ValueError(f"memory budget {value!r} is not a size; use e.g. 8GiB, 12GB, 512MiB, a byte count "
                             "or 'auto'")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _BYTE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory budget {value!r} must be positive (or 'auto')")
    return size



# Cost-model rates per device type, assumed, not measured (no GPU has run this yet): CUDA is H100-class with bf16
# autocast (about 990 TFLOP/s dense on the data sheet, taken as 400 sustained for the mix of GEMMs and
# memory-bound ops), HBM3, PCIe 5 pinned copies. CPU: a few cores.
# The meta device models the GPU it stands in for.
DEFAULT_RATES = {
    "cuda": Rates(flops_per_s=400e12, device_bytes_per_s=3.0e12, host_bytes_per_s=25e9),
    "cpu": Rates(flops_per_s=1e11, device_bytes_per_s=2e10, host_bytes_per_s=1e10),
}



def available_host_bytes() -> int:
    """This machine's memory available to a new process (Linux: MemAvailable; elsewhere its physical memory)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_host_budget(value: int | float | str | None) -> int:
    """Host bytes the plan may spill: a size (0: none), or 'auto' = half of what this machine has available now."""
    if str(value).strip() == "0":
        return 0
    budget = parse_budget(value)
    return available_host_bytes() // 2 if budget == "auto" else budget


def make_plan(profile: ChainProfile, grad_steps: int, budget: int | str, rates: Rates, backend, prefetch_depth: int,
              resolution: int, today_at_k1: bool, host_budget: int | None = None) -> tuple[Plan, int | None]:
    """The plan for ``grad_steps`` steps of ``profile`` and the budget in bytes it was solved for.

    ``today_at_k1`` (the "auto" budget with K=1): every unit recomputed with its inputs kept, no budget (None).
    Otherwise an "auto" budget is the K=1 footprint (all inputs kept plus the largest unit rematerialised), or
    the least feasible one if larger. ``host_budget``: the most it may spill to the host (None: no limit)."""
    calls = profile.calls
    act, inp, flops = profile.columns(grad_steps)
    today = sum(c.input_bytes for c in calls) + max((c.act_bytes for c in calls), default=0)
    if today_at_k1:
        cost = sum(backend.option_costs(c.act_bytes, c.input_bytes, c.flops, *rates)[RECOMPUTE] for c in calls)
        return csrc.summarize([RECOMPUTE] * len(calls), act, inp, flops, today, today - sum(inp), 1, True,
                              cost), None
    if budget == "auto":
        least = csrc.fallback.reserve_bytes(act, inp, rates.host_bytes_per_s > 0, prefetch_depth)
        budget = max(today, least)

    def solve(rates: Rates) -> Plan:
        return csrc.make_plan(act, inp, flops, budget, rates, prefetch_depth, resolution, backend)

    plan = solve(rates)
    if host_budget is None or plan.host_bytes <= host_budget:
        return plan, budget
    plan = within_host(solve, rates, host_budget)
    plan.cost = sum(backend.option_costs(a, x, f, *rates)[d] for d, a, x, f in zip(plan.decisions, act, inp, flops))
    return plan, budget  # its cost at the host's real rate


def within_host(solve, rates: Rates, host_budget: int, rounds: int = 30) -> Plan:
    """The least-cost plan that spills at most ``host_budget``: the solver (``solve(rates)``, which minimises
    modelled time within the device budget) run with the host's copies priced dearer, its rate scaled down by a
    factor found by bisection (a dearer host, fewer spills: more recomputation or more kept on the device). When
    even the dearest host spills more than ``host_budget``, that plan (the fewest spills the device budget allows),
    marked infeasible."""
    low, high = math.log(1e-12), 0.0  # log of the factor: ``high`` spills too much, ``low`` the least there is
    best = solve(rates._replace(host_bytes_per_s=rates.host_bytes_per_s * math.exp(low)))
    if not (best.feasible and best.host_bytes <= host_budget):
        best.feasible = False
        return best
    for _ in range(rounds):
        middle = (low + high) / 2
        plan = solve(rates._replace(host_bytes_per_s=rates.host_bytes_per_s * math.exp(middle)))
        if plan.feasible and plan.host_bytes <= host_budget:
            best, low = plan, middle
        else:
            high = middle
    return best


def inflight_bytes(profile: ChainProfile, grad_steps: int, prefetch_depth: int) -> int:
    """A spilled tensor holds its device memory until its copy lands: the plan's reserve for that, at least 1."""
    act, inp, _ = profile.columns(grad_steps)
    largest = max((max(a, x) for a, x in zip(act, inp)), default=0)
    return max(1, prefetch_depth * largest)
