"""ChainMemory: the chain-memory manager hooked into autograd (unit forwards, saved-tensor hooks, the plan).

It wraps the denoiser's units, measures them on the first gradient steps, solves the plan (``budget``) and runs
every unit call by its decision: kept, spilled to the host store, or recomputed (``recompute``).
"""

from __future__ import annotations

import logging
import math
import weakref
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._pytree import tree_flatten

import csrc
from csrc import DECISION_NAMES, KEEP, OFFLOAD, RECOMPUTE, RECOMPUTE_OFFLOAD, STAT_NAMES, Plan, Rates

from engine.errors import UserError
from engine.memory.budget import DEFAULT_RATES, inflight_bytes, make_plan, parse_budget, parse_host_budget
from engine.memory.recompute import _Recompute, _Spilled
from engine.memory.units import ChainProfile, UnitCost, _storage, _storage_ids, denoiser_units

logger = logging.getLogger(__name__)


class ChainMemory:
    """Bounded device memory for backpropagation through ``grad_steps`` UNet steps; see the ``engine.memory`` docstring.

    Args:
        unet: the denoiser, a UNet3DConditionModel or a video transformer (LoRA may be injected before or after).
        grad_steps: K, the gradient steps the chain runs.
        budget: device bytes for saved activations ("8GiB", an int) or "auto" (today's K=1 footprint).
        host_budget: host bytes the plan may spill ("32GiB", an int, "auto": half of what this machine has
            available), None: no limit.
        granularity: "layers" (default) or "blocks"; see ``denoiser_units``.
        backend: "extension", "python" or None (the extension when built; see ``csrc.backend``).
        host_offload: allow spilling to host memory (pinned on CUDA); off, the plan only keeps or recomputes.
        rates: the cost model's machine; default ``DEFAULT_RATES`` for the UNet's device.
        prefetch_depth: groups copied back ahead of backward (1 = double buffering).
        resolution: byte buckets of the planner's knapsack.
        decisions: force decisions instead of planning: one decision for every item, or
            ``f(step, call, unit_name) -> decision`` (tests and experiments).
        profile: a ChainProfile measured earlier (skips the measuring step when the signature matches).
        max_inflight_bytes: device bytes of spills whose copy has not finished before forward waits; by default
            the in-flight allowance the plan reserves (before the plan: a quarter of the budget, at most 1 GiB).
        strict: a budget below the least the plan needs raises ``UserError`` (naming that least) when the plan is
            made, inside the first chain's forward, before any backward; otherwise a warning and the least-memory
            plan.
    """

    def __init__(self, unet: nn.Module, grad_steps: int, budget: int | str = "auto", *, granularity: str = "layers",
                 backend: str | None = None, host_offload: bool = True, rates: Rates | None = None,
                 prefetch_depth: int = 1, resolution: int = 1024,
                 decisions: int | Callable[[int, int, str], int] | None = None,
                 profile: ChainProfile | None = None, max_inflight_bytes: int | None = None, strict: bool = False,
                 host_budget: int | str | None = None):
        if grad_steps < 1:
            raise ValueError(f"grad_steps must be at least 1, got {grad_steps}")
        self.unet = unet
        self.grad_steps = int(grad_steps)
        self.budget = parse_budget(budget)
        self.host_budget = None if host_budget is None else parse_host_budget(host_budget)
        self.device = next(unet.parameters()).device
        self.backend = csrc.backend(backend, self.device)
        self.host_offload = host_offload
        base = rates or DEFAULT_RATES["cpu" if self.device.type == "cpu" else "cuda"]
        self.rates = base if host_offload else base._replace(host_bytes_per_s=0.0)
        self.prefetch_depth, self.resolution, self.strict = prefetch_depth, resolution, strict
        self._fixed_inflight = max_inflight_bytes is not None
        if max_inflight_bytes is None:
            max_inflight_bytes = 1 << 30 if self.budget == "auto" else max(1, min(1 << 30, self.budget // 4))
        self.store = self.backend.Store(max_inflight_bytes, prefetch_depth, self.device.type == "cuda")
        self.units = denoiser_units(unet, granularity)
        self.profile = profile
        self.plan: Plan | None = None
        self._forced = self._forced_fn(decisions)
        self._least = RECOMPUTE_OFFLOAD if self.rates.host_bytes_per_s > 0 else RECOMPUTE
        self._today_at_k1 = self.budget == "auto" and self.grad_steps == 1
        self._probe_decision = RECOMPUTE if self._today_at_k1 else self._least
        # runtime state
        self._step: int | None = None
        self._call = 0
        self._unet_calls = 0
        self._mode = "plan"
        self._step_ok = True
        self._records: list[UnitCost] = []
        self._records_later: list[UnitCost] = []
        self._signature: tuple | None = None
        self._weights: set[int] = set()
        self._spilled: dict[tuple, tuple] = {}
        self._next_group = 0
        self._warned: set[str] = set()
        self.region_bytes: int | None = None  # what the reward side saves, measured by region()
        self.counters = {"calls": {n: 0 for n in DECISION_NAMES}, "recomputes": 0, "max_recompute_bytes": 0,
                         "measured_steps": 0, "regions": {"keep": 0, "offload": 0}}
        self._wrap()
        self._hook = unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True)
        if self.profile is not None:
            try:
                self._make_plan()
            except UserError:
                self.revert()  # the model as it was: nothing half-wrapped behind a refused budget
                raise

    # -- wiring ----------------------------------------------------------------------------------------------
    def _wrap(self):
        self._previous: list[tuple[nn.Module, object]] = []
        for index, (name, module) in enumerate(self.units):
            original = module.forward
            self._previous.append((module, module.__dict__.get("forward")))

            def forward(*args, _unit=index, _original=original, **kwargs):
                if self._step is None or not torch.is_grad_enabled():
                    return _original(*args, **kwargs)
                return self._run(_unit, _original, args, kwargs)

            forward.__chain_memory_unit__ = name
            module.forward = forward  # an instance attribute: the state dict and the class are untouched

    def revert(self) -> None:
        """Restore the units' forwards and wait for the copies."""
        for module, previous in self._previous:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._previous = []
        self._hook.remove()
        self.store.synchronize()

    @contextmanager
    def step_context(self, index: int):
        """Gradient step ``index`` (0 .. K-1) of the chain runs inside; a chain built with ``EditChain(..., memory=this)`` enters it."""
        if index == 0:
            self._weights = _storage_ids(self.unet)  # LoRA may have been added since the last iteration
            self._spilled.clear()
            self._unet_calls = 0
            if self._mode == "probe" and self._records:  # the last chain ran fewer steps than measured for
                self._finish_probe()
            self._mode = "forced" if self._forced is not None else "plan"
        self._step, self._call, self._step_ok = index, 0, True
        try:
            yield
            if self._mode == "probe" and index == min(1, self.grad_steps - 1):
                self._finish_probe()
        finally:
            self._step = None

    @contextmanager
    def region(self, *modules: nn.Module):
        """Run the reward side inside: its saved tensors stay on the device if they fit the budget beside the
        chain's plan, else go to the host store (``modules``' weights never move). See the ``engine.memory``
        docstring."""
        spill_possible = self.budget != "auto" and self.rates.host_bytes_per_s > 0 and self._forced is None
        if not (spill_possible and torch.is_grad_enabled()):
            yield
            return
        fits = (self.region_bytes is not None and self.plan is not None
                and self.region_bytes + self.plan.device_bytes <= self.budget)
        self.counters["regions"]["keep" if fits else "offload"] += 1
        if fits:
            yield
            return
        weights, self._weights = self._weights, self._weights | set().union(*map(_storage_ids, modules))
        spilled = []
        try:
            # a group per storage: backward brings back one at a time, prefetching the ones saved before it
            with saved_tensors_hooks(*self._spill_functions(None, on_put=spilled.append)):
                yield
        finally:
            self._weights = weights
        if self.region_bytes is None:
            self.region_bytes = sum(spilled)

    def _on_unet_call(self, module, args, kwargs):
        if self._step is None or not torch.is_grad_enabled():
            return None
        signature = self._signature_of(args, kwargs)
        if self._step == 0 and self._unet_calls == 0:
            if self._mode == "forced":
                pass
            elif (self.profile is None or self.profile.signature != signature
                  or (self.grad_steps > 1 and self.profile.later is None)):
                self._mode, self._records, self._records_later = "probe", [], []
            elif self.plan is None:
                self._make_plan()
            self._signature = signature
        elif signature != self._signature:
            self._step_ok = False
            self._warn("signature", "the UNet's inputs changed shape within one chain; that step runs in the "
                                    "least-memory mode")
        self._unet_calls += 1
        return None

    @staticmethod
    def _signature_of(args, kwargs) -> tuple:
        leaves, _ = tree_flatten((args, kwargs))
        tensors = tuple((tuple(t.shape), t.dtype, t.device.type) for t in leaves if isinstance(t, torch.Tensor))
        device_type = "cuda" if any(t[2] == "cuda" for t in tensors) else "cpu"
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        return tensors + (("autocast", autocast),)

    # -- deciding ------------------------------------------------------------------------------------------------
    @staticmethod
    def _forced_fn(decisions):
        if decisions is None:
            return None
        if callable(decisions):
            return decisions
        if isinstance(decisions, int) and 0 <= decisions < len(DECISION_NAMES):
            return lambda step, call, name: decisions
        raise ValueError(f"decisions must be one of {list(range(len(DECISION_NAMES)))} or a callable, got {decisions!r}")

    def _decide(self, unit: int) -> tuple[int, UnitCost | None]:
        step, call = self._step, self._call
        self._call += 1
        name = self.units[unit][0]
        if self._mode == "forced":
            return int(self._forced(step, call, name)), None
        if self._mode == "probe":
            if step <= 1:
                record = UnitCost(unit, name)
                (self._records if step == 0 else self._records_later).append(record)
                return self._probe_decision, record
            return self._least, None
        if not self._step_ok or self.plan is None:
            return self._least, None
        calls = self.profile.step_calls(step)
        if (step >= self.grad_steps or call >= len(calls) or calls[call].unit != unit
                or len(calls) != len(self.profile.calls)):
            self._warn("sequence", "the chain ran more gradient steps or unit calls than planned for; the extra "
                                   "ones run in the least-memory mode")
            return self._least, None
        return self.plan.decisions[step * len(calls) + call], None

    def _finish_probe(self):
        self.profile = ChainProfile(self._signature, self._records, self._records_later or None)
        self._records, self._records_later = [], []
        self.counters["measured_steps"] += 1
        self._make_plan()
        self._mode = "plan"

    def _make_plan(self):
        self.plan, budget = make_plan(self.profile, self.grad_steps, self.budget, self.rates, self.backend,
                                      self.prefetch_depth, self.resolution, self._today_at_k1, self.host_budget)
        if self._today_at_k1:
            return
        if not self._fixed_inflight:
            self.store.set_max_inflight_bytes(inflight_bytes(self.profile, self.grad_steps, self.prefetch_depth))
        if not self.plan.feasible and self.strict:
            least = self.plan.device_bytes
            if self.host_budget is not None and self.plan.host_bytes > self.host_budget and least <= budget:
                spill = self.plan.host_bytes
                raise UserError(f"--host-memory-budget {self.host_budget} B is below the {spill} B ({spill / 2 ** 20:.1f} "
                                f"MiB) that {self.grad_steps} gradient step(s) spill at least within --memory-budget "
                                f"{budget} B with this model and shape; pass --host-memory-budget "
                                f"{math.ceil(spill / 2 ** 20)}MiB or more, a larger --memory-budget, or fewer "
                                "--grad-steps")
            raise UserError(f"--memory-budget {budget} B is below the {least} B ({least / 2 ** 20:.1f} MiB) that "
                            f"{self.grad_steps} gradient step(s) need at least with this model and shape; pass "
                            f"--memory-budget {math.ceil(least / 2 ** 20)}MiB or more, or fewer --grad-steps")
        if not self.plan.feasible:
            self._warn("budget", f"warning: memory budget {budget} B is below the {self.plan.device_bytes} B "
                                 f"({self.plan.device_bytes / 2 ** 20:.1f} MiB) that {self.grad_steps} gradient step(s) "
                                 f"need at least with this model and shape; running the least-memory plan (a "
                                 f"--memory-budget of at least {self.plan.device_bytes} B fits it)")

    # -- running ---------------------------------------------------------------------------------------------
    def _run(self, unit: int, original, args, kwargs):
        decision, record = self._decide(unit)
        self.counters["calls"][DECISION_NAMES[decision]] += 1
        if decision == KEEP:
            return original(*args, **kwargs)
        if decision == OFFLOAD:
            with self._spill_hooks(self._new_group()):
                return original(*args, **kwargs)
        if decision in (RECOMPUTE, RECOMPUTE_OFFLOAD):
            frame = _Recompute(self, original, args, kwargs, decision == RECOMPUTE_OFFLOAD, record)
            return frame.run(args, kwargs)
        raise ValueError(f"unknown decision {decision} for unit {self.units[unit][0]}")

    def _is_weight(self, t: torch.Tensor) -> bool:
        """A parameter (or a view of one): the UNet's, the region's modules', any trainable leaf, or any other
        ``nn.Parameter``, such as the gathered frozen weights FSDP swaps in for a forward (new each step, so not
        among the UNet's at step 0). Weights are never spilled, recomputed or counted."""
        base = t if t._base is None else t._base
        return isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad) or _storage(t)[0] in self._weights

    def _new_group(self) -> int:
        self._next_group += 1
        return self._next_group

    def _spill_hooks(self, group: int):
        return saved_tensors_hooks(*self._spill_functions(group))

    def _spill_functions(self, group: int | None, on_put: Callable[[int], None] | None = None):
        """(pack, unpack): saved tensors go to the store by whole storage (views of one storage share one entry)
        and come back as views with the same offset, sizes and strides: backward then runs the very same kernels,
        bit for bit (a contiguous copy of a strided view changes the rounding of the matmuls that read it).
        ``group`` None gives every new storage a group of its own; ``on_put`` receives each new entry's bytes."""

        def pack(t: torch.Tensor):
            if self._is_weight(t):
                return t
            storage = t.untyped_storage()
            key = (storage._cdata, t._version)
            hit = self._spilled.get(key)
            handle = hit[1]() if hit is not None and hit[0]() is not None else None
            if handle is None:
                whole = t.new_empty(0, dtype=torch.uint8).set_(storage)
                own = self._new_group() if group is None else group
                handle = _Spilled(self.store, self.store.put(whole, own), own)
                self._spilled[key] = (weakref.ref(t), weakref.ref(handle))
                if on_put is not None:
                    on_put(storage.nbytes())
            elif group is not None and handle.group != group:
                self.store.share(handle.key, group)  # one host copy; this unit's prefetch brings it back too
            return handle, handle.group if group is None else group, t.dtype, t.storage_offset(), t.shape, t.stride()

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            handle, asking, dtype, offset, shape, stride = packed
            whole = self.store.get(handle.key, asking)
            return whole.new_empty(0, dtype=dtype).set_(whole.untyped_storage(), offset, shape, stride)

        return pack, unpack

    def _note_recompute(self, nbytes: int):
        self.counters["recomputes"] += 1
        self.counters["max_recompute_bytes"] = max(self.counters["max_recompute_bytes"], nbytes)

    def _unit_name(self, fn) -> str:
        for name, module in self.units:
            if getattr(fn, "__self__", None) is module:
                return name
        return getattr(fn, "__qualname__", "a unit")

    def _warn(self, key: str, message: str):
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # -- reporting -------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Plan summary, store statistics (host/device bytes, copies, prefetch hits) and what ran."""
        store = dict(zip(STAT_NAMES, self.store.stats()))
        out = {"backend": self.backend.name, "plan": self.plan.summary() if self.plan else None, "store": store,
               **{k: (dict(v) if isinstance(v, dict) else v) for k, v in self.counters.items()}}
        out["peak_transient_bytes"] = self.counters["max_recompute_bytes"] + store["peak_device_bytes"]
        return out

    def table(self) -> str:
        """One line per unit call of a step: measured bytes and FLOPs and the decision of every step."""
        if self.profile is None or self.plan is None:
            return "no plan yet (the first gradient step measures the units)"
        calls, k = self.profile.calls, self.grad_steps
        short = {KEEP: "K", OFFLOAD: "O", RECOMPUTE: "R", RECOMPUTE_OFFLOAD: "X"}
        lines = [f"{'unit':<40} {'saved MiB':>10} {'inputs MiB':>10} {'GFLOP':>9}  steps 0..{k - 1} "
                 "(K keep, O offload, R recompute, X recompute+offload inputs)"]
        for j, c in enumerate(calls):
            row = "".join(short[self.plan.decisions[s * len(calls) + j]] for s in range(k))
            lines.append(f"{c.name:<40} {c.act_bytes / 2**20:>10.1f} {c.input_bytes / 2**20:>10.1f} "
                         f"{c.flops / 1e9:>9.2f}  {row}")
        return "\n".join(lines)
