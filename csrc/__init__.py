"""Checkpoint planner and store for backpropagation through the sampling chain, one API over two backends.

- ``csrc._C``: the C++ extension (``csrc/*.cpp``, plus ``csrc/cuda/*.cu`` in CUDA builds), built by setup.py.
- ``csrc.fallback``: its pure-Python twin, used when the extension is not built (logged once); same results.

    from csrc import backend, make_plan, Rates
    plan = make_plan(act_bytes, input_bytes, flops, budget=8 << 30, rates=Rates(400e12, 3e12, 25e9))
    store = backend().Store(max_inflight_bytes=1 << 30, prefetch_depth=1, pin_memory=True)
    key = store.put(tensor, group)  ...  tensor = store.get(key, group)  ...  store.release(key)

``CHAIN_MEMORY_BACKEND=python`` (or ``extension``) forces one backend; ``backend(name)`` does the same per call.
engine/memory/ (``ChainMemory``) uses both pieces to run the gradient steps of the chain.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from csrc import fallback
from csrc.fallback import DECISION_NAMES, KEEP, OFFLOAD, RECOMPUTE, RECOMPUTE_OFFLOAD, STAT_NAMES

__all__ = ["DECISION_NAMES", "KEEP", "OFFLOAD", "RECOMPUTE", "RECOMPUTE_OFFLOAD", "STAT_NAMES", "Backend", "Plan",
           "Rates", "backend", "extension_available", "extension_error", "extension_has_cuda", "make_plan"]

logger = logging.getLogger(__name__)
BUILD_HINT = 'build it with: pip install --no-build-isolation -e ".[test]"'


class Rates(NamedTuple):
    """What the planner's cost model knows about the machine."""

    flops_per_s: float         # device compute rate
    device_bytes_per_s: float  # device memory bandwidth
    host_bytes_per_s: float    # device <-> host copy bandwidth (0: never spill to the host)


# %% Loading the extension ------------------------------------------------------------------------------------------
_extension_state: dict[str, object] = {}


def _load() -> bool:
    if "ok" not in _extension_state:
        try:
            from csrc import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)

            torch.ops.chain_memory.plan  # noqa: B018
            _extension_state.update(ok=True, error=None, cuda=bool(torch.ops.chain_memory.cuda_built()))
        except (ImportError, OSError, RuntimeError, AttributeError) as err:
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
            _extension_state.update(ok=False, error=reason, cuda=False)
    return bool(_extension_state["ok"])


def extension_available() -> bool:
    """True when csrc._C is built and loads against this torch."""
    return _load()


def extension_has_cuda() -> bool:
    """True when csrc._C loads and was built with its CUDA part (csrc/cuda/*.cu)."""
    return _load() and bool(_extension_state["cuda"])


def extension_error() -> str | None:
    """Why csrc._C did not load (None when it did)."""
    _load()
    return _extension_state["error"]  # type: ignore[return-value]


# %% Backends -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    """One implementation of the planner and the store."""

    name: str   # "extension" or "python"
    cuda: bool  # whether its store can copy CUDA tensors

    def plan(self, act_bytes, input_bytes, flops, budget, flops_per_s, device_bytes_per_s, host_bytes_per_s,
             prefetch_depth, resolution):
        """(decisions, reserve, quantum, feasible, cost); see make_plan for the meaning."""
        args = ([int(a) for a in act_bytes], [int(x) for x in input_bytes], [float(f) for f in flops], int(budget),
                float(flops_per_s), float(device_bytes_per_s), float(host_bytes_per_s), int(prefetch_depth),
                int(resolution))
        if self.name == "extension":
            decisions, reserve, quantum, feasible, cost = torch.ops.chain_memory.plan(*args)
            return list(decisions), int(reserve), int(quantum), bool(feasible), float(cost)
        return fallback.plan(*args)

    def option_costs(self, act_bytes, input_bytes, flops, flops_per_s, device_bytes_per_s, host_bytes_per_s):
        args = (int(act_bytes), int(input_bytes), float(flops), float(flops_per_s), float(device_bytes_per_s),
                float(host_bytes_per_s))
        if self.name == "extension":
            return list(torch.ops.chain_memory.option_costs(*args))
        return fallback.option_costs(*args)

    def Store(self, max_inflight_bytes: int = 1 << 30, prefetch_depth: int = 1, pin_memory: bool = False):
        """A store object: put(tensor, group) -> key, share(key, group), get(key, group) -> tensor (group: the
        group asking, -1 = the key's own), prefetch_group(group), release(key) -> bool, synchronize(),
        stats() -> list (STAT_NAMES order), reset_peaks(), trim()."""
        if self.name == "extension":
            return torch.classes.chain_memory.Store(int(max_inflight_bytes), int(prefetch_depth), bool(pin_memory))
        return fallback.Store(max_inflight_bytes, prefetch_depth, pin_memory)


_logged_fallback: list[bool] = []


def backend(name: str | None = None, device: torch.device | str | None = None) -> Backend:
    """The backend to use: ``name`` ("extension", "python", "auto"/None), else $CHAIN_MEMORY_BACKEND, else the
    extension when it is built (and, for a CUDA ``device``, built with CUDA), else the fallback, logged once."""
    name = (name or os.environ.get("CHAIN_MEMORY_BACKEND") or "auto").lower()
    if name not in ("auto", "extension", "python"):
        raise ValueError(f"unknown chain-memory backend {name!r}; use 'extension', 'python' or 'auto'")
    needs_cuda = device is not None and torch.device(device).type == "cuda"
    if name == "python":
        return Backend("python", cuda=True)
    if name == "extension":
        if not _load():
            raise RuntimeError(f"the csrc._C extension is not available ({extension_error()}); {BUILD_HINT}")
        if needs_cuda and not _extension_state["cuda"]:
            raise RuntimeError("csrc._C was built without CUDA; rebuild with USE_CUDA=1 "
                               "(pip install --no-build-isolation -e .) or use the python backend")
        return Backend("extension", cuda=bool(_extension_state["cuda"]))
    if _load() and (not needs_cuda or _extension_state["cuda"]):
        return Backend("extension", cuda=bool(_extension_state["cuda"]))
    if not _logged_fallback:
        _logged_fallback.append(True)
        why = extension_error() or "it was built without CUDA and the model is on a GPU"
        logger.warning("csrc._C is not usable (%s); using the pure-Python checkpoint planner and store "
                       "(same results, slower bookkeeping); %s", why, BUILD_HINT)
    return Backend("python", cuda=True)


# %% Plans ----------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Decisions for every (gradient step, unit) item in forward order, and what they cost.

    The device holds ``resident_bytes`` of saved tensors at the end of forward and at most ``reserve`` more
    while one unit is rematerialised in backward; ``resident_bytes + reserve <= budget`` when ``feasible``.
    """

    decisions: list[int]
    budget: int
    reserve: int
    quantum: int
    feasible: bool
    cost: float                  # modelled extra seconds: recompute plus copies not hidden behind compute
    resident_bytes: int = 0      # device bytes kept for backward (KEEP activations, RECOMPUTE inputs)
    host_bytes: int = 0          # bytes spilled to the host
    recompute_flops: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def device_bytes(self) -> int:
        return self.resident_bytes + self.reserve

    def summary(self) -> dict:
        return dict(budget=self.budget, resident_bytes=self.resident_bytes, reserve=self.reserve,
                    device_bytes=self.device_bytes, host_bytes=self.host_bytes, recompute_flops=self.recompute_flops,
                    cost_s=self.cost, feasible=self.feasible, counts=dict(self.counts))


def summarize(decisions, act_bytes, input_bytes, flops, budget, reserve, quantum, feasible, cost) -> Plan:
    plan = Plan(list(decisions), int(budget), int(reserve), int(quantum), bool(feasible), float(cost))
    plan.counts = {name: 0 for name in DECISION_NAMES}
    for d, a, x, f in zip(plan.decisions, act_bytes, input_bytes, flops):
        plan.counts[DECISION_NAMES[d]] += 1
        plan.resident_bytes += a if d == KEEP else x if d == RECOMPUTE else 0
        plan.host_bytes += a if d == OFFLOAD else x if d == RECOMPUTE_OFFLOAD else 0
        plan.recompute_flops += f if d in (RECOMPUTE, RECOMPUTE_OFFLOAD) else 0.0
    return plan


def make_plan(act_bytes, input_bytes, flops, budget: int, rates: Rates, prefetch_depth: int = 1,
              resolution: int = 1024, backend_: Backend | None = None) -> Plan:
    """Choose KEEP / OFFLOAD / RECOMPUTE / RECOMPUTE_OFFLOAD for every item so the saved tensors fit ``budget``
    device bytes with the least modelled extra time (an exact knapsack over ``resolution`` byte buckets)."""
    be = backend_ or backend()
    decisions, reserve, quantum, feasible, cost = be.plan(act_bytes, input_bytes, flops, budget, *rates,
                                                          prefetch_depth, resolution)
    return summarize(decisions, act_bytes, input_bytes, flops, budget, reserve, quantum, feasible, cost)
